"""``ensure_weight_tying``: the reference's rules, agreement with upstream, held-out faults.

The tie is a snapshot fact (``<model>.shared_storage``: groups of parameters on one storage), so a
tie upstream drops, or one it makes where none belongs, fails; so do the saved-copy and target
rewrites and the two warnings.
"""

from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch

from conformance.engine.features import CaseContext
from conformance.engine.known import default_registry
from conformance.engine.runner import run_case
from fault_kit import PROFILE, after_get_peft_model, assert_caught
from reference import errors, select_profile
from reference.config import resolve
from reference.notices import PreparationWarning
from reference.prepare import prepare
from reference.spec import AdapterSpec, Case, ModelSpec, QuantSpec, TrainingSpec
from reference.tying import plan_tying, tied_with_input_embedding

NO_KBIT = TrainingSpec(prepare_kbit=False)
pytestmark = pytest.mark.skipif("ensure_weight_tying" not in PROFILE.features,
                                reason="the installed peft has no ensure_weight_tying")


def _model(model_type: str = "gemma", dtype: str = "float32"):
    from conformance.engine.models import build_model

    return build_model(ModelSpec(model_type, "CAUSAL_LM", num_layers=1, load_dtype=dtype))


def _kinds(caught) -> set[str]:
    return {w.message.kind for w in caught if isinstance(w.message, PreparationWarning)}


# -- the reference's rules -----------------------------------------------------------------------


def test_tied_modules_are_those_sharing_the_input_embedding_weight():
    assert tied_with_input_embedding(_model("gemma")) == ["lm_head"]
    assert tied_with_input_embedding(_model("llama")) == []  # LlamaConfig does not tie


def test_saving_an_embedding_saves_the_input_embedding_and_ties_the_head_copy():
    model = _model()
    adapter = AdapterSpec(target_modules=("q_proj",), modules_to_save=("lm_head",), ensure_weight_tying=True)
    plan = plan_tying(model, resolve(adapter, PROFILE))
    assert plan.settings.modules_to_save == ("model.embed_tokens",) and plan.saved == ("lm_head",)
    prepared = prepare(model, adapter, NO_KBIT, PROFILE)
    head, emb = prepared.lm_head, prepared.model.embed_tokens
    assert head.modules_to_save["default"].weight is emb.modules_to_save["default"].weight
    assert head.modules_to_save["default"].weight.requires_grad and not head.original_module.weight.requires_grad
    assert head.modules_to_save["default"].bias is None


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_targeting_an_embedding_ties_the_head_lora_to_it(dtype):
    adapter = AdapterSpec(target_modules=("q_proj", "lm_head"), ensure_weight_tying=True)
    prepared = prepare(_model(dtype=dtype), adapter, NO_KBIT, PROFILE)
    head, emb = prepared.lm_head, prepared.model.embed_tokens
    a, b = head.lora_A["default"].weight, head.lora_B["default"].weight
    assert a.data_ptr() == emb.lora_embedding_B["default"].data_ptr()  # one storage, whatever the dtype
    assert b.data_ptr() == emb.lora_embedding_A["default"].data_ptr()
    assert torch.equal(a, emb.lora_embedding_B["default"].t()) and not b.any()
    assert a.dtype == torch.float32  # autocast_adapter_dtype upcast, tie kept
    bound = 1 / 64 ** 0.5  # the tied head's A is initialised as a Linear's (He-uniform)
    assert float(a.abs().max()) <= bound


def test_a_regex_target_is_alternated_with_the_input_embedding():
    adapter = AdapterSpec(target_modules=r".*\.(q_proj)|lm_head", ensure_weight_tying=True)
    plan = plan_tying(_model(), resolve(adapter, PROFILE))
    assert plan.settings.target_modules == r"(?:.*\.(q_proj)|lm_head|^model\.embed_tokens$)"
    assert plan.targets == ("lm_head",)


def test_the_two_warnings():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        prepare(_model("llama"), AdapterSpec(target_modules=("q_proj",), ensure_weight_tying=True), NO_KBIT, PROFILE)
        prepare(_model("gemma"), AdapterSpec(target_modules=("q_proj",), ensure_weight_tying=True), NO_KBIT, PROFILE)
    assert _kinds(caught) == {"weight_tying_nothing_tied", "weight_tying_nothing_asked"}


def test_a_decomposing_init_beside_tied_targets_is_refused():
    adapter = AdapterSpec(target_modules=("q_proj", "embed_tokens"), ensure_weight_tying=True, init_lora_weights="olora")
    with pytest.raises(errors.InvalidConfig) as info:
        prepare(_model("opt"), adapter, NO_KBIT, PROFILE)
    assert info.value.kind == "weight_tying_init_variant"


# -- agreement and held-out faults ----------------------------------------------------------------


def _case(model_type: str, adapter: AdapterSpec, dtype: str = "float32", quant: QuantSpec = QuantSpec(),
          training: TrainingSpec = NO_KBIT) -> Case:
    return Case(ModelSpec(model_type, "CAUSAL_LM", num_layers=1, load_dtype=dtype), quant, adapter, training)


SAVE = _case("gemma", AdapterSpec(target_modules=("q_proj",), modules_to_save=("embed_tokens",), ensure_weight_tying=True))
TARGET = _case("gemma", AdapterSpec(r=4, target_modules=("q_proj", "embed_tokens"), ensure_weight_tying=True))
TYING_CASES = [
    SAVE,
    TARGET,
    _case("gemma", AdapterSpec(target_modules=("q_proj",), modules_to_save=("lm_head",), ensure_weight_tying=True)),
    _case("opt", AdapterSpec(target_modules=("q_proj", "lm_head"), ensure_weight_tying=True), quant=QuantSpec(kind="8bit"),
          training=TrainingSpec(prepare_kbit=True)),
    _case("gemma", AdapterSpec(target_modules=("q_proj",), ensure_weight_tying=True)),
    _case("llama", AdapterSpec(target_modules=("q_proj",), modules_to_save=("embed_tokens",), ensure_weight_tying=True)),
]


def test_clean_tying_cases_agree():
    for case in TYING_CASES:
        outcome = run_case(case, PROFILE)
        assert outcome.status in ("agree", "known"), (case.dumps(), outcome.divergences)
        assert set(outcome.known) <= {"loraconfig-mutated-in-place"}, outcome.known
        assert outcome.numerics is not None


def _head(pm):
    return pm.base_model.model.lm_head


def test_catches_a_head_lora_that_is_not_tied(monkeypatch):
    def untie(pm, config):
        a = _head(pm).lora_A["default"]
        a.weight = torch.nn.Parameter(a.weight.detach().clone())

    after_get_peft_model(monkeypatch, untie)
    assert_caught([TARGET], {"shared_storage.lm_head.lora_A.default.weight = model.embed_tokens.lora_embedding_B.default"})


def test_catches_a_saved_head_copy_of_its_own(monkeypatch):
    def own_copy(pm, config):
        copy = _head(pm).modules_to_save["default"]
        copy.weight = torch.nn.Parameter(copy.weight.detach().clone())

    after_get_peft_model(monkeypatch, own_copy)
    assert_caught([SAVE], {"shared_storage.lm_head.modules_to_save.default.weight = "
                           "model.embed_tokens.modules_to_save.default.weight"})


def test_catches_tying_that_never_happens(monkeypatch):
    """peft skips the tying step: no rewrite, no tie, no LoRA on the head."""
    from peft.tuners.tuners_utils import BaseTuner

    monkeypatch.setattr(BaseTuner, "_check_tied_modules", lambda self, model, config: None)
    assert_caught([TARGET], {"lora.present"}, path="lm_head")
    assert_caught([SAVE], {"saved.present"}, path="lm_head")


def test_catches_a_tied_head_scaled_twice(monkeypatch):
    def double(pm, config):
        _head(pm).scaling["default"] *= 2

    after_get_peft_model(monkeypatch, double)
    assert_caught([TARGET], {"adapter[default].scaling"}, path="lm_head")


def test_catches_a_missing_warning(monkeypatch):
    import peft.tuners.tuners_utils as tuners_utils

    original = tuners_utils.warnings.warn

    def quiet(message, *args, **kwargs):
        if not str(message).startswith("You have requested `ensure_weight_tying`"):  # upstream's words only
            original(message, *args, **kwargs)

    monkeypatch.setattr(tuners_utils.warnings, "warn", quiet)
    assert_caught([TYING_CASES[4]], {"warnings.weight_tying_nothing_asked"})


# -- the registry entries ---------------------------------------------------------------------------


BF16_TARGET = dataclasses.replace(TARGET, model=dataclasses.replace(TARGET.model, load_dtype="bfloat16"))


def _scope(entry_id: str, case: Case) -> bool:
    outcome = run_case(case, select_profile(), numerics=False)
    (entry,) = [e for e in default_registry().active if e.id == entry_id]
    return entry.holds_for(CaseContext(case, outcome.reference, outcome.upstream, select_profile()))


def test_untie_entry_covers_half_precision_with_autocast_only():
    assert _scope("weight-tying-lost-to-adapter-upcast", BF16_TARGET)
    assert not _scope("weight-tying-lost-to-adapter-upcast", TARGET)
    no_autocast = dataclasses.replace(BF16_TARGET, training=TrainingSpec(prepare_kbit=False, autocast_adapter_dtype=False))
    assert not _scope("weight-tying-lost-to-adapter-upcast", no_autocast)


def test_untie_entry_catches_an_untied_head_in_fp32(monkeypatch):
    def untie(pm, config):
        b = _head(pm).lora_B["default"]
        b.weight = torch.nn.Parameter(b.weight.detach().clone())

    after_get_peft_model(monkeypatch, untie)
    assert_caught([TARGET], {"shared_storage.lm_head.lora_B.default.weight = model.embed_tokens.lora_embedding_A.default"})


def test_untie_entry_catches_a_different_fault_in_its_scope(monkeypatch):
    def double(pm, config):
        _head(pm).scaling["default"] *= 2

    after_get_peft_model(monkeypatch, double)
    assert_caught([BF16_TARGET], {"adapter[default].scaling"}, path="lm_head")


def test_decomposing_init_entry_needs_tying_through_the_targets():
    """OLoRA with the embedding among the modules to save ties nothing it could void: out of scope."""
    saved = dataclasses.replace(SAVE, adapter=dataclasses.replace(SAVE.adapter, init_lora_weights="olora"))
    assert not _scope("weight-tying-broken-by-decomposing-inits", saved)
    targeted = _case("opt", AdapterSpec(target_modules=("q_proj", "embed_tokens"), ensure_weight_tying=True,
                                        init_lora_weights="olora"))
    assert _scope("weight-tying-broken-by-decomposing-inits", targeted)
