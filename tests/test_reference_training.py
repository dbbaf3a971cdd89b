"""Unit tests of the reference without peft: trainability, the k-bit step, profiles."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from conformance.engine.models import build_model
from reference import ABSENT, PROFILES, AdapterSpec, ModelSpec, TrainingSpec
from reference import select_profile
from reference import errors
from reference.config import resolve
from reference.kbit import prepare_for_kbit_training
from reference.layers import SavedModule
from reference_helpers import (  # noqa: F401 - the shared helpers and fixtures
    REPO,
    CURRENT,
    NO_KBIT,
    LLAMA_LINEARS,
    llama,
    gpt2,
    prep,
    quiet_prep,
    lora_layers,
    targeted,
    qkeys,
    Attn,
    Toy,
    quantized,
    CONV1D_WARNING,
    LINEAR_WARNING,
    expect_warning,
    checkpointing,
    input_grads,
)


# -- trainability (notes §8, §9, §12) ----------------------------------------------------------------------------------


def _trainable(model: nn.Module) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def test_only_adapters_are_trainable_and_counts():
    model = llama()
    for p in model.parameters():
        p.requires_grad = True
    model = quiet_prep(model, r=2, target_modules=("q_proj",))
    assert _trainable(model) == {f"{k}.lora_{x}.default.weight" for k in qkeys(0, 1) for x in "AB"}
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 2 * 2 * (64 + 64)


def _bias_numel(model: nn.Module, pred) -> int:
    return sum(p.numel() for n, p in model.named_parameters() if pred(n))


@pytest.mark.parametrize("bias", ["none", "all", "lora_only", ABSENT])
def test_bias_modes_on_gpt2(bias):
    model = quiet_prep(gpt2(), r=2, bias=bias, target_modules=("c_attn",))
    lora = {n for n in _trainable(model) if ".lora_" in n}
    biases = _trainable(model) - lora
    assert sum(p.numel() for n, p in model.named_parameters() if n in lora) == 2 * 2 * (64 + 192)
    every_bias = {n for n, _ in model.named_parameters() if n.endswith(".bias")}
    if bias in ("none", ABSENT):
        assert biases == set()
    elif bias == "all":
        assert biases == every_bias
        assert {"transformer.ln_f.bias", "transformer.h.0.attn.c_attn.base_layer.bias"} <= biases
    else:
        assert biases == {f"transformer.h.{i}.attn.c_attn.base_layer.bias" for i in (0, 1)}


def test_bias_all_matches_whole_names_only():
    class WithTable(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(4, 4)
            self.my_bias_table = nn.Parameter(torch.zeros(3))
            self.bias = nn.Parameter(torch.zeros(2))

    model = quiet_prep(WithTable(), bias="all", target_modules=("proj",))
    assert "my_bias_table" not in _trainable(model)
    assert {"bias", "proj.base_layer.bias"} <= _trainable(model)


def test_lora_only_with_lora_bias():
    model = quiet_prep(gpt2(), bias="lora_only", lora_bias=True, target_modules=("c_attn",))
    assert {"transformer.h.0.attn.c_attn.base_layer.bias", "transformer.h.0.attn.c_attn.lora_B.default.bias"} <= _trainable(model)
    assert "transformer.h.0.attn.c_proj.bias" not in _trainable(model)


def test_modules_to_save_wrapper():
    model = quiet_prep(llama(), target_modules=("q_proj",), modules_to_save=("lm_head", "not_a_module"))
    wrapper = model.lm_head
    assert isinstance(wrapper, SavedModule)
    original, copy_ = wrapper.original_module.weight, wrapper.modules_to_save["default"].weight
    assert not original.requires_grad and copy_.requires_grad
    assert torch.equal(original, copy_) and original.data_ptr() != copy_.data_ptr()
    assert {"lm_head.original_module.weight", "lm_head.modules_to_save.default.weight"} <= {
        n for n, _ in model.named_parameters()}
    assert sum(isinstance(m, SavedModule) for m in model.modules()) == 1  # unknown names are ignored
    x = torch.randn(2, 64)
    assert torch.equal(wrapper(x), wrapper.modules_to_save["default"](x))


def test_modules_to_save_wraps_by_plain_string_suffix():
    model = quiet_prep(llama(), target_modules=("q_proj",), modules_to_save=("head",))
    assert isinstance(model.lm_head, SavedModule)


def test_bias_all_keeps_saved_originals_frozen():
    model = quiet_prep(build_model(ModelSpec("bert", "TOKEN_CLS", num_layers=1)), bias="all",
                       target_modules=("query", "value"), task_type="TOKEN_CLS")
    assert isinstance(model.classifier, SavedModule)
    trainable = _trainable(model)
    assert "classifier.modules_to_save.default.bias" in trainable
    assert "classifier.modules_to_save.default.weight" in trainable
    assert "classifier.original_module.bias" not in trainable
    assert "classifier.original_module.weight" not in trainable


@pytest.mark.parametrize("task", ["SEQ_CLS", "TOKEN_CLS"])
def test_classification_tasks_save_the_head(task):
    model = quiet_prep(llama(task, num_layers=1), target_modules=("q_proj",), task_type=task)
    assert isinstance(model.score, SavedModule)
    assert not model.score.original_module.weight.requires_grad
    assert model.score.modules_to_save["default"].weight.requires_grad


def test_without_task_type_the_head_stays_frozen_and_unwrapped():
    model = quiet_prep(llama("SEQ_CLS", num_layers=1), target_modules=("q_proj",))
    assert isinstance(model.score, nn.Linear) and not model.score.weight.requires_grad


@pytest.mark.xfail(strict=True, reason="notes §9: QUESTION_ANS adds qa_outputs to modules_to_save; the reference "
                   "only knows SEQ_CLS / TOKEN_CLS heads")
def test_question_answering_saves_qa_outputs():
    class QA(Toy):
        def __init__(self):
            super().__init__(1)
            self.qa_outputs = nn.Linear(8, 2)

    model = quiet_prep(QA(), target_modules="all-linear", task_type="QUESTION_ANS")
    assert isinstance(model.qa_outputs, SavedModule)


def test_kbit_step_on_an_unquantized_model():
    model = llama(load_dtype="bfloat16")
    model.model.norm.weight.requires_grad = True
    out = prepare_for_kbit_training(model)
    assert out is model
    assert all(not p.requires_grad for p in model.parameters())
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert not checkpointing(model)
    assert not input_grads(model)
    assert model.config.use_cache is True


def test_kbit_step_on_a_4bit_model(cache):
    model = quantized(cache, "4bit", load_dtype="bfloat16", compute_dtype="bfloat16", quant_storage="bfloat16")
    prepare_for_kbit_training(model)
    packed = {n: p for n, p in model.named_parameters() if type(p).__name__ == "Params4bit"}
    assert len(packed) == 7 and {p.dtype for p in packed.values()} == {torch.bfloat16}  # Params4bit not upcast
    others = {p.dtype for n, p in model.named_parameters() if n not in packed}
    assert others == {torch.float32}
    assert all(not p.requires_grad for p in model.parameters())
    assert checkpointing(model) and model.model.layers[0].gradient_checkpointing
    assert input_grads(model)
    assert model.model.layers[0]._gradient_checkpointing_func.keywords == {}  # `{}` passed, not None
    assert len(model.get_input_embeddings()._forward_hooks) == 2
    assert model.config.use_cache is True
    assert not model.training


def test_kbit_step_use_reentrant_false_adds_one_hook(cache):
    model = quantized(cache, "4bit")
    prepare_for_kbit_training(model, gradient_checkpointing_kwargs={"use_reentrant": False})
    assert model.model.layers[0]._gradient_checkpointing_func.keywords == {"use_reentrant": False}
    assert len(model.get_input_embeddings()._forward_hooks) == 1


def test_kbit_step_without_gradient_checkpointing(cache):
    model = quantized(cache, "4bit")
    prepare_for_kbit_training(model, use_gradient_checkpointing=False)
    assert not checkpointing(model) and not input_grads(model)


def test_kbit_step_keeps_int8_weights(cache):
    model = quantized(cache, "8bit", load_dtype="float16")
    prepare_for_kbit_training(model)
    int8 = [p for p in model.parameters() if type(p).__name__ == "Int8Params"]
    assert int8 and {p.dtype for p in int8} == {torch.int8}
    assert model.model.norm.weight.dtype == torch.float32
    assert checkpointing(model) and input_grads(model)


def test_prepare_honours_training_spec_gradient_checkpointing(cache):
    on = quiet_prep(quantized(cache, "4bit"), TrainingSpec(), target_modules=("q_proj",))
    off = quiet_prep(quantized(cache, "4bit"), TrainingSpec(gradient_checkpointing=False), target_modules=("q_proj",))
    skipped = quiet_prep(llama(load_dtype="bfloat16"), TrainingSpec(prepare_kbit=False), target_modules=("q_proj",))
    assert checkpointing(on) and input_grads(on)
    assert not checkpointing(off)
    assert skipped.model.norm.weight.dtype == torch.bfloat16  # no k-bit step: no upcast


# -- profiles ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "peft, expected",
    [("0.15.0", "seed"), ("0.15.2", "seed"), ("0.16.0", "peft-0.16"), ("0.21.2", "current"), ("0.21.0.dev0", "current"),
     ("absent", "current")],
)
def test_select_profile_by_versions(peft, expected):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert select_profile(versions={"peft": peft}).name == expected


def test_select_profile_warns_for_a_newer_peft():
    with pytest.warns(UserWarning, match="peft 0.30.0 is newer than the newest known profile"):
        profile = select_profile(versions={"peft": "0.30.0"})
    assert profile.name == "current"


def test_select_profile_by_name():
    assert select_profile("seed", versions={"peft": "0.21.2"}) is PROFILES["seed"]
    assert select_profile("current", versions={"peft": "0.15.0"}) is PROFILES["current"]
    with pytest.raises(ValueError, match="profile='bogus' is not one of seed, peft-0.16, peft-0.17, peft-0.18, peft-0.19, peft-0.20, current"):
        select_profile("bogus")


def test_profile_default_targets_differ_by_era():
    qwen3 = ModelSpec("qwen3", num_layers=1)
    assert targeted(build_model(qwen3)) == {"model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"}
    with pytest.raises(errors.NoDefaultTargets):
        prep(build_model(qwen3), profile=PROFILES["seed"])
    assert targeted(gpt2()) == {"transformer.h.0.attn.c_attn", "transformer.h.1.attn.c_attn"}


def test_profile_lora_defaults_apply_to_absent_fields():
    settings = resolve(AdapterSpec(), CURRENT)
    assert (settings.r, settings.lora_alpha, settings.lora_dropout, settings.bias) == (8, 8, 0.0, "none")
    assert (settings.use_rslora, settings.init_lora_weights, settings.fan_in_fan_out, settings.lora_bias) == (
        False, True, False, False)
    layers = lora_layers(quiet_prep(llama()))
    assert set(layers) == qkeys(0, 1, names=("q_proj", "v_proj"))
    q = layers["model.layers.0.self_attn.q_proj"]
    assert (q.r["default"], q.scaling["default"]) == (8, 1.0)
    assert isinstance(q.lora_dropout["default"], nn.Identity)


@pytest.mark.parametrize("coef, expected", [(0.001, True), (0.0, False)])
def test_trl_17_syncs_the_moe_router_aux_loss_into_the_config(coef, expected):
    from transformers import LlamaConfig, MixtralConfig

    from reference.trl import _sync_router_aux_loss

    model = nn.Module()
    model.config = MixtralConfig(router_aux_loss_coef=coef, output_router_logits=not expected)
    _sync_router_aux_loss(model)
    assert model.config.output_router_logits is expected
    dense = nn.Module()
    dense.config = LlamaConfig()  # a dense model's config has no coefficient: left alone
    dense.config.output_router_logits = "untouched"
    _sync_router_aux_loss(dense)
    assert dense.config.output_router_logits == "untouched"
