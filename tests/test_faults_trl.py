"""Fault injection at the trl level: SFTTrainer's preparation, broken on purpose.

Each test plants one fault in the installed trl (or in the peft object trl calls),
prepares a case that the fault must affect, and asserts that the harness reports a
divergence on the field that shows it.  The classic flow's faults need trl < 0.22
and the current flow's trl >= 0.26: on the other stack they are skipped with that
reason (CI runs this file on both stacks).
"""

from __future__ import annotations

import types
from importlib import metadata

import pytest
import torch

from conformance.engine.runner import run_case
from reference import select_profile
from reference.spec import AdapterSpec, Case, ModelSpec, QuantSpec, TrainingSpec
from reference.trl import select_trl_flow

FLOW = select_trl_flow()
classic_only = pytest.mark.skipif(not FLOW.classic, reason=f"classic trl flow only; trl {metadata.version('trl')} is installed")
current_only = pytest.mark.skipif(FLOW.classic, reason=f"current trl flow only; trl {metadata.version('trl')} is installed")

QV = AdapterSpec(r=4, lora_alpha=8, target_modules=("q_proj", "v_proj"), task_type="CAUSAL_LM")


def _case(quant: QuantSpec = QuantSpec(), load_dtype: str = "bfloat16", **training) -> Case:
    return Case(
        ModelSpec("llama", "CAUSAL_LM", num_layers=1, load_dtype=load_dtype),
        quant,
        QV,
        TrainingSpec(level="trl", **training),
    )


def _fields(case: Case) -> set[str]:
    outcome = run_case(case, select_profile())
    assert outcome.status == "diverge", f"the fault went unnoticed: {outcome.status}"
    return {d.field for d in outcome.divergences}


def test_clean_cases_agree():
    """Without a fault, every case these tests use agrees (or is a known divergence)."""
    cases = [
        _case(QuantSpec(kind="4bit", compute_dtype="bfloat16"), gradient_checkpointing=True, bf16=True),
        _case(QuantSpec(kind="4bit", quant_storage="bfloat16"), gradient_checkpointing=True),
        _case(QuantSpec(kind="8bit"), gradient_checkpointing=True),
        _case(gradient_checkpointing=True),
        _case(),
    ]
    for case in cases:
        assert run_case(case, select_profile()).status in ("agree", "known"), case.dumps()


# -- the current flow (trl >= 0.26) ------------------------------------------------------------


@current_only
def test_catches_quantized_trainables_cast_to_the_wrong_dtype(monkeypatch):
    """Fault: the cast of a quantized model's trainable parameters uses fp16, not bf16."""
    import trl.trainer.sft_trainer as sft

    proxy = types.SimpleNamespace(**{name: getattr(torch, name) for name in dir(torch) if not name.startswith("__")})
    proxy.bfloat16 = torch.float16
    monkeypatch.setattr(sft, "torch", proxy)
    assert "dtype" in _fields(_case(QuantSpec(kind="4bit", compute_dtype="bfloat16")))


@current_only
def test_catches_missing_input_require_grads(monkeypatch):
    """Fault: with gradient checkpointing, the trainer no longer makes the inputs require grad."""
    import peft

    monkeypatch.setattr(peft.PeftModel, "enable_input_require_grads", lambda self: None, raising=False)
    assert "input_grads" in _fields(_case(gradient_checkpointing=True))


@current_only
def test_catches_adapters_not_autocast(monkeypatch):
    """Fault: the trainer calls get_peft_model with autocast_adapter_dtype=False."""
    import trl.trainer.sft_trainer as sft

    original = sft.get_peft_model
    monkeypatch.setattr(sft, "get_peft_model", lambda *a, **k: original(*a, **{**k, "autocast_adapter_dtype": False}))
    assert "dtype" in _fields(_case(load_dtype="bfloat16"))


# -- the classic flow (trl 0.15 - 0.21) ------------------------------------------------------------


@classic_only
def test_catches_broken_sharded_qlora_detection():
    """Fault: the trainer no longer recognises Params4bit, so a CPU 4-bit model is not "sharded"
    and goes through the k-bit step (its norms are upcast and checkpointing turned on)."""
    import bitsandbytes as bnb

    # The class name is what trl compares; monkeypatch cannot restore a type's __name__.
    name = bnb.nn.Params4bit.__name__
    bnb.nn.Params4bit.__name__ = "Params4bitRenamed"
    try:
        fields = _fields(_case(QuantSpec(kind="4bit", compute_dtype="bfloat16"), gradient_checkpointing=True))
    finally:
        bnb.nn.Params4bit.__name__ = name
    assert fields & {"dtype", "gradient_checkpointing"}


@classic_only
def test_catches_skipped_kbit_step(monkeypatch):
    """Fault: the trainer skips prepare_model_for_kbit_training for an 8-bit model."""
    from trl import SFTTrainer

    monkeypatch.setattr(SFTTrainer, "_prepare_model_for_kbit_training", lambda self, model, args: model)
    fields = _fields(_case(QuantSpec(kind="8bit"), gradient_checkpointing=True))
    assert fields & {"dtype", "gradient_checkpointing"}


@classic_only
def test_catches_gradient_checkpointing_without_input_grads(monkeypatch):
    """Fault: with checkpointing on an unquantized model, the trainer does not arrange input grads."""
    from trl import SFTTrainer

    monkeypatch.setattr(SFTTrainer, "_enable_gradient_checkpointing", lambda self, model, args: model)
    assert "input_grads" in _fields(_case(gradient_checkpointing=True))


@classic_only
def test_catches_sharded_4bit_adapters_autocast(monkeypatch):
    """Fault: for sharded 4-bit models the trainer keeps autocast_adapter_dtype on, so adapters
    next to a bf16-stored 4-bit weight are upcast instead of following it."""
    import trl.trainer.sft_trainer as sft

    original = sft.get_peft_model
    monkeypatch.setattr(
        sft, "get_peft_model", lambda *a, **k: original(*a, **{k2: v for k2, v in k.items() if k2 != "autocast_adapter_dtype"})
    )
    assert "dtype" in _fields(_case(QuantSpec(kind="4bit", quant_storage="bfloat16")))
