"""``inference_mode=True``: the reference freezes everything; upstream's two deviations are
registry entries, each narrow; a planted fault (a trainable LoRA factor) is caught."""

from __future__ import annotations

import dataclasses

import pytest

from conformance.engine.diff import Divergence
from conformance.engine.features import CaseContext
from conformance.engine.known import load_registry
from conformance.engine.runner import run_case
from fault_kit import PROFILE, after_get_peft_model, assert_caught
from reference import select_profile
from reference.prepare import prepare_wrapped
from reference.spec import AdapterSpec, Case, ModelSpec, QuantSpec, TrainingSpec
from reference_helpers import gpt2

NO_KBIT = TrainingSpec(prepare_kbit=False)


def _gpt2(task: str = "CAUSAL_LM", **adapter) -> Case:
    spec = dict(r=4, target_modules=("c_attn",), inference_mode=True, task_type=task) | adapter
    return Case(ModelSpec("gpt2", task, num_layers=1), QuantSpec(), AdapterSpec(**spec), NO_KBIT)


@pytest.mark.parametrize("adapter", [{}, {"bias": "all"}, {"bias": "lora_only"}, {"modules_to_save": ("lm_head",)},
                                     {"use_dora": True}])
def test_reference_trains_nothing_and_stores_the_flag(adapter):
    model, wrapper = prepare_wrapped(gpt2(), AdapterSpec(r=4, target_modules=("c_attn",), inference_mode=True, **adapter),
                                     NO_KBIT, select_profile("current"))
    assert not [n for n, p in model.named_parameters() if p.requires_grad]
    assert dict(wrapper.config)["inference_mode"] is True
    assert any("lora_A" in n for n, _ in model.named_parameters())  # the adapter is there, frozen


def test_clean_inference_cases_agree_or_are_explained():
    for case in (_gpt2(), _gpt2(bias="all"), _gpt2("SEQ_CLS"), _gpt2(modules_to_save=("lm_head",))):
        outcome = run_case(case, PROFILE)
        assert outcome.status in ("agree", "known"), (case.dumps(), outcome.divergences)
        allowed = {"loraconfig-mutated-in-place", "inference-mode-leaves-biases-trainable",
                   "inference-mode-leaves-saved-copy-trainable"}
        assert set(outcome.known) <= allowed, outcome.known


def test_catches_a_lora_factor_left_trainable(monkeypatch):
    def trainable_b(peft_model, _config):
        for name, param in peft_model.named_parameters():
            if ".lora_B." in name:
                param.requires_grad_(True)

    after_get_peft_model(monkeypatch, trainable_b)
    assert_caught([_gpt2(), _gpt2(bias="all"), _gpt2("SEQ_CLS")], {"requires_grad"}, path=r".*lora_B\.default\.weight")


# -- the two entries are narrow ------------------------------------------------------------------

BIASES = "inference-mode-leaves-biases-trainable"
SAVED = "inference-mode-leaves-saved-copy-trainable"


def test_bias_entry_needs_inference_mode_and_a_bias_mode_that_trains_biases():
    registry = load_registry(versions={"peft": "0.21.2"})
    trainable = Divergence("transformer.h.0.ln_1.bias", "requires_grad", "False", "True")
    case = _gpt2(bias="all")

    def left(c: Case, d: Divergence = trainable) -> list:
        return registry.explain(CaseContext(c), [d])[0]

    assert left(case) == [] and left(_gpt2(bias="lora_only")) == []
    assert left(_gpt2(bias="none")) == [trainable] and left(_gpt2()) == [trainable]
    assert left(dataclasses.replace(case, adapter=dataclasses.replace(case.adapter, inference_mode=False))) == [trainable]
    lora = Divergence("transformer.h.0.attn.c_attn.lora_A.default.weight", "requires_grad", "False", "True")
    assert left(case, lora) == [lora]  # a trainable factor is no bias
    frozen = Divergence("transformer.h.0.ln_1.bias", "requires_grad", "True", "False")
    assert left(case, frozen) == [frozen]  # the other direction is another fault
    # a bias mode with no bias to train is out of scope: llama has no bias at all, and lora_only
    # on targets without a bias trains none (gpt2's c_attn has one: in scope above)
    llama = Case(ModelSpec("llama", "CAUSAL_LM", num_layers=1), QuantSpec(),
                 AdapterSpec(r=4, target_modules=("q_proj",), inference_mode=True, bias="all"), NO_KBIT)
    assert BIASES not in registry.scope(CaseContext(llama))
    assert BIASES not in registry.scope(CaseContext(dataclasses.replace(
        llama, adapter=dataclasses.replace(llama.adapter, bias="lora_only"))))
    assert BIASES in registry.scope(CaseContext(case))


def test_saved_copy_entry_is_for_peft_before_0_18_and_saved_copies_only():
    old = load_registry(versions={"peft": "0.15.2"})
    assert SAVED in {e.id for e in old.active}
    assert SAVED not in {e.id for e in load_registry(versions={"peft": "0.18.1"}).active}
    copy = Divergence("score.modules_to_save.default.weight", "requires_grad", "False", "True")
    case = _gpt2("SEQ_CLS")
    assert old.explain(CaseContext(case), [copy])[0] == []
    off = dataclasses.replace(case, adapter=dataclasses.replace(case.adapter, inference_mode=False))
    assert old.explain(CaseContext(off), [copy])[0] == [copy]
    original = Divergence("score.original_module.weight", "requires_grad", "False", "True")
    assert old.explain(CaseContext(case), [original])[0] == [original]
    crash = Divergence("<error>", "raised", "no error", "TypeError[saved_module_is_lora]: TypeError: x")
    assert old.explain(CaseContext(case), [crash])[0] == [crash]


def test_numerics_run_on_a_model_with_nothing_trainable():
    outcome = run_case(_gpt2(), PROFILE, numerics=True)
    assert outcome.status in ("agree", "known") and outcome.numerics is not None, outcome.divergences
    assert not outcome.numerics.get("both_raised")
