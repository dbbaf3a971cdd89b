"""Several adapters (``add_adapter`` / ``set_adapter``): the reference's rules, agreement with
upstream on both pinned stacks, held-out faults, and the registry entries they meet."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from conformance.engine.features import CaseContext
from conformance.engine.known import default_registry
from conformance.engine.models import cache_dir, load_model
from conformance.engine.runner import run_case
from fault_kit import PROFILE, assert_caught, assert_clean
from reference import select_profile
from reference.adapters import with_second_adapter
from reference.errors import InvalidConfig
from reference.layers import SavedModule
from reference.prepare import prepare_wrapped
from reference.spec import ABSENT, AdapterSpec, Case, ModelSpec, QuantSpec, TrainingSpec


def _case(first: AdapterSpec, second: AdapterSpec, switch=ABSENT, *, model_type: str = "llama",
          quant: QuantSpec = QuantSpec(), dtype: str = "float32") -> Case:
    return Case(ModelSpec(model_type, "CAUSAL_LM", num_layers=1, load_dtype=dtype), quant, first,
                TrainingSpec(prepare_kbit=quant.quantized, set_adapter=switch), second_adapter=second)


FIRST = AdapterSpec(r=4, target_modules=("q_proj",))
SECOND = AdapterSpec(r=2, lora_alpha=8, target_modules=("q_proj", "v_proj"), modules_to_save=("lm_head",))
ADDED = _case(FIRST, SECOND)
SWITCHED = _case(FIRST, SECOND, "second")


def _prepared(case: Case):
    model = load_model(case.model, case.quant, cache_dir())
    prepared, wrapper = prepare_wrapped(model, case.adapter, case.training, PROFILE)
    return prepared, with_second_adapter(prepared, wrapper, case, PROFILE)


# -- the reference's rules -------------------------------------------------------------------------


def test_an_added_adapter_is_frozen_and_inactive():
    model, facts = _prepared(ADDED)
    q, v = model.model.layers[0].self_attn.q_proj, model.model.layers[0].self_attn.v_proj
    assert set(q.lora_A) == {"default", "second"} and set(v.lora_A) == {"second"}
    assert q.active_adapters == ["default"] and v.active_adapters == ["default"]
    assert q.lora_A["default"].weight.requires_grad and not q.lora_A["second"].weight.requires_grad
    assert q.scaling == {"default": 2.0, "second": 4.0}
    head = model.lm_head
    assert isinstance(head, SavedModule) and head.active_adapter is None
    assert not head.modules_to_save["second"].weight.requires_grad
    x = torch.randn(1, 64)
    torch.testing.assert_close(v(x), v.base_layer(x))  # active for `default`, which it does not hold
    assert facts.active_adapters == ("default",) and facts.config["r"] == 4


def test_set_adapter_switches_what_trains_and_runs():
    model, facts = _prepared(SWITCHED)
    q = model.model.layers[0].self_attn.q_proj
    assert q.active_adapters == ["second"]
    assert not q.lora_A["default"].weight.requires_grad and q.lora_A["second"].weight.requires_grad
    assert model.lm_head.active_adapter == "second" and model.lm_head.modules_to_save["second"].weight.requires_grad
    assert facts.active_adapters == ("second",) and facts.config["r"] == 2 and facts.config["lora_alpha"] == 8


def test_two_adapters_with_biases_are_refused():
    case = _case(dataclasses.replace(FIRST, bias="all"), dataclasses.replace(SECOND, bias="lora_only"))
    with pytest.raises(InvalidConfig) as err:
        _prepared(case)
    assert isinstance(err.value, ValueError) and err.value.kind == "several_adapters_with_bias"


def test_the_case_json_carries_the_second_adapter():
    text = SWITCHED.dumps()
    assert '"second_adapter":{' in text and '"set_adapter":"second"' in text
    assert Case.loads(text) == SWITCHED


# -- agreement and faults --------------------------------------------------------------------------

CASES = [
    ADDED,
    SWITCHED,
    _case(AdapterSpec(r=4, modules_to_save=("lm_head",)),
          AdapterSpec(r=2, target_modules=("c_fc",), modules_to_save=("lm_head",)), "second", model_type="gpt2",
          quant=QuantSpec(kind="8bit")),
    _case(FIRST, AdapterSpec(r=8, target_modules=("o_proj",)), "second", dtype="bfloat16",
          quant=QuantSpec(kind="4bit", compute_dtype="bfloat16")),
]


def test_clean_adapter_cases_agree():
    assert_clean(CASES, {"loraconfig-mutated-in-place", "new-adapter-saved-copy-active"}, numerics=True)


def _after_add_adapter(monkeypatch, corrupt):
    from peft import PeftModel

    original = PeftModel.add_adapter

    def faulty(self, adapter_name, peft_config, *args, **kwargs):
        out = original(self, adapter_name, peft_config, *args, **kwargs)
        with torch.no_grad():
            corrupt(self, adapter_name)
        return out

    monkeypatch.setattr(PeftModel, "add_adapter", faulty)


def test_catches_an_added_adapter_left_trainable(monkeypatch):
    def unfreeze(pm, name):
        for n, p in pm.named_parameters():
            if f".{name}." in n and "lora_" in n:
                p.requires_grad_(True)

    _after_add_adapter(monkeypatch, unfreeze)
    assert_caught([ADDED], {"requires_grad"}, path=r".*\.lora_[AB]\.second\.weight")


def test_catches_an_added_adapter_scaled_as_the_first(monkeypatch):
    def rescale(pm, name):
        for m in pm.modules():
            if isinstance(getattr(m, "scaling", None), dict) and name in m.scaling and "default" in m.scaling:
                m.scaling[name] = m.scaling["default"]

    _after_add_adapter(monkeypatch, rescale)
    assert_caught([ADDED], {"adapter[second].scaling"})


def test_catches_a_switch_that_keeps_the_old_adapter_running(monkeypatch):
    """Numbers only: set_adapter marks the new adapter trainable but the layers still run `default`."""
    from peft import PeftModel

    original = PeftModel.set_adapter

    def faulty(self, adapter_name, *args, **kwargs):
        out = original(self, adapter_name, *args, **kwargs)
        for m in self.modules():
            if hasattr(m, "lora_A") and hasattr(m, "_active_adapter") and "default" in m.lora_A:
                m._active_adapter = ["default"]
        return out

    monkeypatch.setattr(PeftModel, "set_adapter", faulty)
    assert_caught([SWITCHED], {"numerics.logits", "numerics.train_logits", "numerics.grad", "numerics.train_grad"})


# -- the registry entries --------------------------------------------------------------------------


def _scope(entry_id: str, case: Case) -> bool:
    entries = [e for e in default_registry().active if e.id == entry_id]
    if not entries:
        pytest.skip(f"{entry_id} is not active on this stack")
    outcome = run_case(case, select_profile(), numerics=False)
    return entries[0].holds_for(CaseContext(case, outcome.reference, outcome.upstream, select_profile()))


def test_copy_active_entry_needs_a_module_saved_anew_and_no_switch():
    assert _scope("new-adapter-saved-copy-active", ADDED)
    assert not _scope("new-adapter-saved-copy-active", SWITCHED)
    both = _case(dataclasses.replace(FIRST, modules_to_save=("lm_head",)), SECOND)
    assert not _scope("new-adapter-saved-copy-active", both)


def test_copy_active_entry_does_not_excuse_a_trainable_second_factor(monkeypatch):
    if not [e for e in default_registry().active if e.id == "new-adapter-saved-copy-active"]:
        pytest.skip("the entry is not active on this stack")

    def unfreeze(pm, name):
        pm.base_model.model.model.layers[0].self_attn.v_proj.lora_A[name].weight.requires_grad_(True)

    _after_add_adapter(monkeypatch, unfreeze)
    assert_caught([ADDED], {"requires_grad"}, path=r".*v_proj\.lora_A\.second\.weight")


def test_switch_and_freeze_entries_are_scoped_by_what_each_adapter_saves():
    bare = _case(FIRST, SECOND, "default")
    assert _scope("set-adapter-trains-original-of-unsaved-module", bare)
    assert not _scope("set-adapter-trains-original-of-unsaved-module", SWITCHED)
    alone = _case(dataclasses.replace(FIRST, modules_to_save=("lm_head",)), AdapterSpec(r=2, target_modules=("v_proj",)))
    assert _scope("add-adapter-freezes-active-saved-copies", alone)
    assert not _scope("add-adapter-freezes-active-saved-copies", dataclasses.replace(
        alone, training=dataclasses.replace(alone.training, set_adapter="default")))


def test_switch_entry_excuses_a_tied_embedding_only_through_a_bare_saved_head(monkeypatch):
    """gemma3_text ties lm_head to embed_tokens: the original the switch makes trainable is listed
    as the embedding's weight.  Without the switch, an embedding made trainable still fails."""
    tied = _case(FIRST, SECOND, "default", model_type="gemma3_text")
    assert _scope("set-adapter-trains-original-of-unsaved-module", tied)
    plain = _case(FIRST, SECOND, model_type="gemma3_text")

    def train_embedding(pm, name):
        pm.base_model.model.model.embed_tokens.weight.requires_grad_(True)

    _after_add_adapter(monkeypatch, train_embedding)
    assert_caught([plain], {"requires_grad"}, path=r"model\.embed_tokens\.weight")
