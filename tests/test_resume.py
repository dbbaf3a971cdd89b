"""Resuming from a saved adapter (``training.load_saved``): the reference's rules, agreement with
upstream's ``PeftModel.from_pretrained``, held-out faults in loading, and the registry entries a
resumed adapter meets.

Each side trains (seeded values), saves and loads its own adapter; the snapshot records every
loaded value against the loaded model (so a tensor the save or the load lost is a ``value``
divergence), which parameters train, and the training flags (``from_pretrained`` without
``is_trainable`` puts the model in eval mode).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from conformance.engine.features import CaseContext
from conformance.engine.known import default_registry
from conformance.engine.runner import run_case
from fault_kit import PROFILE, assert_caught, assert_clean
from reference import select_profile
from reference.resume import load_saved, resume, save_prepared
from reference.prepare import prepare_wrapped
from reference.spec import ABSENT, AdapterSpec, Case, ModelSpec, QuantSpec, TrainingSpec
from reference.trained import give_trained_copies, give_trained_values


def _model(model_type: str = "llama", dtype: str = "float32", task: str = "CAUSAL_LM"):
    from conformance.engine.models import build_model

    return build_model(ModelSpec(model_type, task, num_layers=1, load_dtype=dtype))


ADAPTER = AdapterSpec(r=4, target_modules=("q_proj", "v_proj"), modules_to_save=("lm_head",))


# -- the reference's rules -----------------------------------------------------------------------


@pytest.mark.parametrize("trainable", [ABSENT, False, True])
def test_loading_trains_only_with_is_trainable(trainable):
    training = TrainingSpec(prepare_kbit=False, load_saved=True, is_trainable=trainable)
    model, wrapper = resume(_model(), _model(), ADAPTER, training, PROFILE, seed=7)
    trains = trainable is True
    lora = [p for n, p in model.named_parameters() if ".lora_" in n]
    copy = model.lm_head.modules_to_save["default"].weight
    assert lora and all(p.requires_grad is trains for p in lora) and copy.requires_grad is trains
    assert wrapper.config["inference_mode"] is (not trains)
    layer = model.model.layers[0].self_attn.q_proj
    assert layer.training is trains and model.training is False  # from_pretrained(is_trainable=False) -> eval()


def test_the_loaded_adapter_holds_the_trained_values(tmp_path):
    source, wrapper = prepare_wrapped(_model(dtype="bfloat16"), ADAPTER, TrainingSpec(prepare_kbit=False), PROFILE)
    give_trained_values(source, 3)
    give_trained_copies(source, 3)
    save_prepared(source, wrapper, tmp_path)
    loaded, _ = load_saved(_model(dtype="bfloat16"), tmp_path, TrainingSpec(prepare_kbit=True, is_trainable=True),
                           PROFILE)
    saved = dict(source.named_parameters())
    for name, param in loaded.named_parameters():
        if ".lora_" in name or ".modules_to_save." in name:
            # the k-bit step made the copy fp32; the bf16 values load exactly
            assert torch.equal(param.float(), saved[name].float()), name
    assert loaded.lm_head.modules_to_save["default"].weight.dtype == torch.float32
    assert not torch.equal(loaded.lm_head.modules_to_save["default"].weight.float(),
                           loaded.lm_head.original_module.weight.float())


def test_the_stored_config_is_loaded_not_the_given_one(tmp_path):
    """A type's default targets and a classification head are resolved at save time: the loader
    reads them back from ``adapter_config.json``."""
    adapter = AdapterSpec(r=4, task_type="SEQ_CLS")
    source, wrapper = prepare_wrapped(_model(task="SEQ_CLS"), adapter, TrainingSpec(prepare_kbit=False), PROFILE)
    save_prepared(source, wrapper, tmp_path)
    text = (tmp_path / "adapter_config.json").read_text()
    assert '"q_proj"' in text and '"score"' in text and '"inference_mode": true' in text
    loaded, loaded_wrapper = load_saved(_model(task="SEQ_CLS"), tmp_path, TrainingSpec(prepare_kbit=False), PROFILE)
    assert hasattr(loaded.score, "modules_to_save")
    assert {n for n, _ in loaded.named_parameters() if ".lora_" in n} == {n for n, _ in source.named_parameters()
                                                                         if ".lora_" in n}


# -- agreement with upstream -----------------------------------------------------------------------


def _case(adapter: AdapterSpec = ADAPTER, *, model_type: str = "llama", dtype: str = "float32",
          quant: QuantSpec = QuantSpec(), trainable=ABSENT, kbit: bool = False) -> Case:
    return Case(ModelSpec(model_type, "CAUSAL_LM", num_layers=1, load_dtype=dtype), quant, adapter,
                TrainingSpec(prepare_kbit=kbit or quant.quantized, load_saved=True, is_trainable=trainable))


TRAINABLE = _case(trainable=True)
FROZEN = _case(trainable=False)
QLORA = _case(dtype="bfloat16", quant=QuantSpec(kind="4bit", compute_dtype="bfloat16"), trainable=True)
RESUME_CASES = [
    TRAINABLE,
    FROZEN,
    _case(),
    QLORA,
    _case(AdapterSpec(r=8, lora_alpha=16, target_modules="all-linear", use_rslora=True), model_type="gpt2",
          quant=QuantSpec(kind="8bit"), trainable=True),
    _case(AdapterSpec(r=4, target_modules=("q_proj",), bias="all"), model_type="opt", dtype="float16", trainable=True),
]


def test_clean_resume_cases_agree():
    assert_clean(RESUME_CASES, {"loraconfig-mutated-in-place", "inference-mode-leaves-saved-copy-trainable"},
                 numerics=True)


# -- held-out faults in upstream's loading ---------------------------------------------------------


def _after_from_pretrained(monkeypatch, corrupt, **forced):
    """Plant ``corrupt(peft_model)`` right after ``PeftModel.from_pretrained`` (``forced``
    overrides its keyword arguments)."""
    from peft import PeftModel

    original = PeftModel.from_pretrained.__func__

    def faulty(cls, model, model_id, *args, **kwargs):
        kwargs.update(forced)
        out = original(cls, model, model_id, *args, **kwargs)
        with torch.no_grad():
            corrupt(out)
        return out

    monkeypatch.setattr(PeftModel, "from_pretrained", classmethod(faulty))


def _save_drops(monkeypatch, part: str) -> None:
    """``save_pretrained`` leaves out every tensor whose key contains ``part``."""
    import peft.peft_model as peft_model

    original = peft_model.get_peft_model_state_dict

    def dropping(*args, **kwargs):
        return {k: v for k, v in original(*args, **kwargs).items() if part not in k}

    monkeypatch.setattr(peft_model, "get_peft_model_state_dict", dropping)


def test_catches_is_trainable_ignored(monkeypatch):
    _after_from_pretrained(monkeypatch, lambda pm: None, is_trainable=True)
    assert_caught([FROZEN], {"requires_grad"}, path=r".*\.lora_[AB]\.default\.weight")


def test_catches_a_model_left_in_training_mode(monkeypatch):
    _after_from_pretrained(monkeypatch, lambda pm: pm.train())
    assert_caught([FROZEN], {"lora_training", "model_training"})


def test_catches_a_saved_copy_that_is_not_loaded(monkeypatch):
    def reset(pm):
        wrapper = pm.base_model.model.lm_head
        wrapper.modules_to_save["default"].weight.copy_(wrapper.original_module.weight)

    _after_from_pretrained(monkeypatch, reset)
    assert_caught([TRAINABLE], {"value"}, path=r"lm_head\.modules_to_save\.default\.weight")


def test_catches_a_factor_the_save_dropped(monkeypatch):
    """save_pretrained loses every lora_B: the loaded adapter's B stays at its zero init."""
    _save_drops(monkeypatch, ".lora_B.")
    assert_caught([QLORA], {"value"}, path=r".*\.lora_B\.default\.weight")


def test_catches_a_stored_config_that_says_it_trains(monkeypatch):
    def flag(pm):
        pm.peft_config["default"].inference_mode = False

    _after_from_pretrained(monkeypatch, flag)
    assert_caught([FROZEN], {"adapter_config.inference_mode"})


def test_catches_a_loaded_factor_left_in_half_precision(monkeypatch):
    def halve(pm):
        layer = pm.base_model.model.model.layers[0].self_attn.q_proj
        layer.lora_A["default"].to(torch.bfloat16)

    _after_from_pretrained(monkeypatch, halve)
    assert_caught([QLORA], {"dtype"}, path=r".*q_proj\.lora_A\.default\.weight")


# -- the registry entries a resumed adapter meets ----------------------------------------------------


def _scope(entry_id: str, case: Case) -> bool:
    outcome = run_case(case, select_profile(), numerics=False)
    (entry,) = [e for e in default_registry().active if e.id == entry_id] or [None]
    if entry is None:
        pytest.skip(f"{entry_id} is not active on this stack")
    return entry.holds_for(CaseContext(case, outcome.reference, outcome.upstream, select_profile()))


LORA_ONLY = _case(AdapterSpec(r=4, bias="lora_only"), model_type="gpt2", trainable=True)


def test_inference_entries_cover_a_model_loaded_without_is_trainable():
    all_biases = dataclasses.replace(FROZEN, model=dataclasses.replace(FROZEN.model, model_type="gpt2"),
                                     adapter=AdapterSpec(r=4, bias="all"))
    assert _scope("inference-mode-leaves-biases-trainable", all_biases)
    trains = dataclasses.replace(all_biases, training=dataclasses.replace(all_biases.training, is_trainable=True))
    assert not _scope("inference-mode-leaves-biases-trainable", trains)


def test_lora_only_entry_needs_a_resumed_lora_only_adapter():
    assert _scope("lora-only-bias-not-saved", LORA_ONLY)
    fresh = dataclasses.replace(LORA_ONLY, training=TrainingSpec(prepare_kbit=False))
    assert not _scope("lora-only-bias-not-saved", fresh)
    all_biases = dataclasses.replace(LORA_ONLY, adapter=AdapterSpec(r=4, bias="all"))
    assert not _scope("lora-only-bias-not-saved", all_biases)


def test_lora_only_entry_catches_a_lost_factor_in_its_scope(monkeypatch):
    """Within the entry's scope (a resumed lora_only adapter), a factor the save lost still fails."""
    if not _scope("lora-only-bias-not-saved", LORA_ONLY):
        pytest.skip("the entry is not active on this stack")
    _save_drops(monkeypatch, ".lora_A.")
    assert_caught([LORA_ONLY], {"value"}, path=r".*\.lora_A\.default\.weight")


def test_lora_only_entry_does_not_excuse_a_lost_bias_elsewhere(monkeypatch):
    """The entry excuses the targeted layers' base biases only: a loaded model whose layer norm
    bias changed is still a divergence."""
    if not _scope("lora-only-bias-not-saved", LORA_ONLY):
        pytest.skip("the entry is not active on this stack")

    def nudge(pm):
        pm.base_model.model.transformer.ln_f.bias.add_(0.5)

    _after_from_pretrained(monkeypatch, nudge)
    assert_caught([LORA_ONLY], {"value"}, path=r"transformer\.ln_f\.bias")


HEAD_INSIDE = Case(ModelSpec("roberta", "SEQ_CLS", num_layers=1), QuantSpec(),
                   AdapterSpec(target_modules=("query", "dense"), task_type="SEQ_CLS"),
                   TrainingSpec(prepare_kbit=False, load_saved=True))


def test_reload_crash_entry_needs_lora_inside_a_saved_module():
    if not _scope("saved-copy-with-lora-inside-cannot-be-reloaded", HEAD_INSIDE):
        pytest.skip("the entry is not active on this stack")
    fresh = dataclasses.replace(HEAD_INSIDE, training=TrainingSpec(prepare_kbit=False))
    assert not _scope("saved-copy-with-lora-inside-cannot-be-reloaded", fresh)
    outside = dataclasses.replace(HEAD_INSIDE, adapter=AdapterSpec(target_modules=("query",), task_type="SEQ_CLS"))
    assert not _scope("saved-copy-with-lora-inside-cannot-be-reloaded", outside)


def test_reload_crash_entry_does_not_excuse_a_crash_elsewhere(monkeypatch):
    """A resumed adapter whose targets stay outside the head crashing the same way still fails."""
    if "saved-copy-with-lora-inside-cannot-be-reloaded" not in {e.id for e in default_registry().active}:
        pytest.skip("the entry is not active on this stack")
    outside = dataclasses.replace(HEAD_INSIDE, adapter=AdapterSpec(target_modules=("query",), task_type="SEQ_CLS"))

    def crash(pm):
        raise KeyError("base_model.model.classifier.dense.weight")

    _after_from_pretrained(monkeypatch, crash)
    assert_caught([outside], {"raised"}, path="<error>")
