"""Fault injection for what preparation does beyond shapes and flags: values, checkpointing
kwargs, per-model-type rules, config writes, the stored adapter config, hooks.

Each test plants one fault into upstream that no earlier snapshot field could see (the
shapes, dtypes, ``requires_grad`` flags and class of every tensor stay as they were) and
asserts the differential step catches it on the field named, with the numerical checks off
(the values are compared before any value is shared between the sides).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from conformance.engine.runner import run_case
from fault_kit import PROFILE, QLORA, _llama, after_get_peft_model, assert_caught
from reference.spec import AdapterSpec, Case, ModelSpec, QuantSpec, TrainingSpec
from strategies import cases, sample

NO_KBIT = TrainingSpec(prepare_kbit=False)
LLAMA_SAVE_HEAD = _llama(AdapterSpec(r=4, target_modules=("q_proj",), modules_to_save=("lm_head",)))
BERT_SEQ_CLS = Case(ModelSpec("bert", "SEQ_CLS", num_layers=1), adapter=AdapterSpec(target_modules=("query",),
                                                                                   task_type="SEQ_CLS"),
                    training=NO_KBIT)
GPT2_BIAS_ALL = Case(ModelSpec("gpt2", num_layers=1), adapter=AdapterSpec(r=2, target_modules=("c_attn",), bias="all"),
                     training=NO_KBIT)


_after_get_peft_model = after_get_peft_model


def _caught(case: Case, field: str, path_part: str) -> None:
    outcome = run_case(case, PROFILE, numerics=False)
    hits = [d for d in outcome.divergences if d.field == field and path_part in d.path]
    assert outcome.status == "diverge" and hits, [(d.path, d.field) for d in outcome.divergences]
    print(f"caught: {hits[0].path} {hits[0].field}: {hits[0].reference!r} / {hits[0].upstream!r}")


# -- values ------------------------------------------------------------------------------------------------


def test_catches_a_saved_copy_that_differs_from_its_original(monkeypatch):
    """Fault: the modules_to_save copy is not a copy: its weight is perturbed."""

    def perturb(peft_model, config):
        for name, param in peft_model.named_parameters():
            if ".modules_to_save." in name and name.endswith("weight"):
                param.add_(0.01)

    _after_get_peft_model(monkeypatch, perturb)
    _caught(LLAMA_SAVE_HEAD, "value", "lm_head.modules_to_save.default.weight")


def test_catches_a_saved_classification_head_whose_values_changed(monkeypatch):
    """Fault: the classification head saved for SEQ_CLS is re-initialised."""

    def reinit(peft_model, config):
        for name, param in peft_model.named_parameters():
            if "classifier" in name and ".modules_to_save." in name and name.endswith("bias"):
                param.zero_()

    _after_get_peft_model(monkeypatch, reinit)
    _caught(BERT_SEQ_CLS, "value", "classifier.modules_to_save.default.bias")


def test_catches_trainable_biases_reset_by_bias_all(monkeypatch):
    """Fault: bias="all" makes the biases trainable and resets them to zero (the zoo's biases are
    seeded noise, so a reset shows)."""

    def reset(peft_model, config):
        for name, param in peft_model.named_parameters():
            if name.endswith(".bias") and param.requires_grad and "lora_" not in name:
                param.zero_()

    _after_get_peft_model(monkeypatch, reset)
    _caught(GPT2_BIAS_ALL, "value", ".bias")


def test_catches_an_upcast_that_rounds_through_bf16(monkeypatch):
    """Fault: the k-bit step upcasts fp16 parameters to fp32 through bf16 (values rounded)."""
    import peft

    original = peft.prepare_model_for_kbit_training

    def faulty(model, *args, **kwargs):
        out = original(model, *args, **kwargs)
        with torch.no_grad():
            for name, param in out.named_parameters():
                if param.dtype == torch.float32 and "norm" in name:
                    param.data = param.data.to(torch.bfloat16).to(torch.float32)
        return out

    monkeypatch.setattr(peft, "prepare_model_for_kbit_training", faulty)
    _caught(QLORA, "value", "norm")


def test_catches_a_changed_buffer(monkeypatch):
    """Fault: preparation rescales the rotary frequencies (a buffer, not a parameter)."""

    def rescale(peft_model, config):
        for name, buf in peft_model.named_buffers():
            if name.endswith("inv_freq"):
                buf.mul_(2.0)

    _after_get_peft_model(monkeypatch, rescale)
    _caught(_llama(AdapterSpec(r=4, target_modules=("q_proj",))), "value", "inv_freq")


# -- checkpointing, hooks, config writes ---------------------------------------------------------------------


def test_catches_flipped_use_reentrant(monkeypatch):
    """Fault: the k-bit step installs checkpointing with use_reentrant flipped."""
    import peft

    original = peft.prepare_model_for_kbit_training

    def faulty(model, use_gradient_checkpointing=True, gradient_checkpointing_kwargs=None, **kwargs):
        kwargs_in = dict(gradient_checkpointing_kwargs or {"use_reentrant": True})
        kwargs_in["use_reentrant"] = not kwargs_in.get("use_reentrant", True)
        return original(model, use_gradient_checkpointing, kwargs_in, **kwargs)

    monkeypatch.setattr(peft, "prepare_model_for_kbit_training", faulty)
    case = dataclasses.replace(QLORA, training=TrainingSpec(prepare_kbit=True, gradient_checkpointing=True,
                                                            use_reentrant=False))
    _caught(case, "gradient_checkpointing_kwargs", "<model>")


def test_catches_an_extra_hook(monkeypatch):
    """Fault: preparation leaves a forward hook on every decoder layer."""

    def hook(peft_model, config):
        for name, module in peft_model.named_modules():
            if name.endswith("layers.0"):
                module.register_forward_hook(lambda m, i, o: o)

    _after_get_peft_model(monkeypatch, hook)
    _caught(_llama(AdapterSpec(r=4, target_modules=("q_proj",))), "hooks.model.layers.0", "<model>")


def test_catches_a_config_write(monkeypatch):
    """Fault: preparation turns the model's cache off at the peft level (only trl's trainer does)."""

    def write(peft_model, config):
        peft_model.base_model.model.config.use_cache = not peft_model.base_model.model.config.use_cache

    _after_get_peft_model(monkeypatch, write)
    _caught(_llama(AdapterSpec(r=4, target_modules=("q_proj",))), "config_writes.use_cache", "<model>")


# -- the PEFT wrapper ------------------------------------------------------------------------------------------


def test_catches_a_stored_config_that_is_not_what_was_prepared(monkeypatch):
    """Fault: the adapter config saved with the model says r=16 while the layers have r=4."""

    def restate(peft_model, config):
        peft_model.peft_config["default"] = dataclasses.replace(config, r=16)

    _after_get_peft_model(monkeypatch, restate)
    _caught(_llama(AdapterSpec(r=4, target_modules=("q_proj",))), "adapter_config.r", "<peft>")


def test_catches_an_inactive_adapter(monkeypatch):
    """Fault: preparation leaves no adapter active (training would update nothing)."""

    def deactivate(peft_model, config):
        peft_model.base_model.active_adapter = []

    _after_get_peft_model(monkeypatch, deactivate)
    _caught(_llama(AdapterSpec(r=4, target_modules=("q_proj",))), "active_adapters", "<peft>")


# -- per-model-type rules: every run reaches every type's default targets -----------------------------------


@pytest.mark.parametrize("model_type, wrong", [("gpt2", ["c_proj"]), ("bert", ["query"]), ("granite", ["q_proj"])])
def test_catches_a_default_target_change_for_one_model_type(monkeypatch, model_type, wrong):
    """Fault: peft's default-target table changes for one architecture (granite gains defaults it
    does not have).  The cell (model_type, default targets) of every run holds a case for it."""
    import peft.tuners.lora.model as lora_model

    table = dict(lora_model.LoraModel.target_module_mapping)
    table[model_type] = wrong
    monkeypatch.setattr(lora_model.LoraModel, "target_module_mapping", table)
    from strategies.coverage import cells

    cell = next(c for c in cells("peft") if c.model_type == model_type and c.target_kind == "default")
    drawn = sample(cases(model_types=(model_type,), quant_kinds=(cell.quantization,), target_kinds=("default",),
                         tasks=(cell.task,)), 3, 1)
    assert_caught(drawn, {"raised", "adapter_config.target_modules", "lora.present", "param.present"})


def test_value_checks_hold_on_clean_quantized_cases():
    """No fault: 4-bit and 8-bit preparations agree on every value (packed bytes and quant states)."""
    for quant in (QuantSpec(kind="4bit", double_quant=True, compute_dtype="bfloat16"), QuantSpec(kind="8bit")):
        case = dataclasses.replace(LLAMA_SAVE_HEAD, quant=quant, training=TrainingSpec(prepare_kbit=True))
        outcome = run_case(case, PROFILE, numerics=False)
        assert outcome.status in ("agree", "known"), outcome.divergences
        values = {p.value for p in outcome.upstream.params}
        assert values <= {"equal", "new"} and "equal" in values


def test_float_storage_4bit_weights_read_equal_and_a_flipped_byte_is_caught(monkeypatch):
    """A 4-bit weight kept in a float ``quant_storage`` holds packed bytes that may read as NaN:
    untouched, it is ``equal`` (compared as bytes, not as floats, where NaN != NaN would call it
    changed); one flipped byte in upstream's copy is caught on its value."""
    case = dataclasses.replace(LLAMA_SAVE_HEAD, quant=QuantSpec(kind="4bit", quant_storage="bfloat16"),
                               training=TrainingSpec(prepare_kbit=True))
    clean = run_case(case, PROFILE, numerics=False)
    assert clean.status in ("agree", "known"), clean.divergences
    packed = [p for p in clean.upstream.params if p.dtype == "bfloat16"]  # every 4-bit weight, NaN patterns or not
    assert len(packed) >= 10 and all(p.value == "equal" for p in packed), [(p.path, p.value) for p in packed]

    def corrupt(model, config):
        weight = model.get_submodule("base_model.model.model.layers.0.self_attn.q_proj.base_layer").weight
        weight.data.view(torch.uint8)[0, 0] ^= 0x01

    _after_get_peft_model(monkeypatch, corrupt)
    _caught(case, "value", "q_proj.base_layer.weight")
