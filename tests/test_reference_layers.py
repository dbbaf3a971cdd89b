"""Unit tests of the reference without peft: dropout, dispatch, init, warnings, dtype policy."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import nn

from reference import TrainingSpec
from reference import errors
from reference.dispatch import wrap
from reference.layers import AdapterParams, LoraEmbedding, LoraLinear
from reference.rules import adapter_dtype
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


# -- dropout (notes §6) ----------------------------------------------------------------------------------


@pytest.mark.parametrize("p, expected", [(0.0, nn.Identity), (-0.1, nn.Identity), (0.05, nn.Dropout), (1.0, nn.Dropout)])
def test_dropout_module(p, expected):
    layers = lora_layers(quiet_prep(llama(num_layers=1), lora_dropout=p, target_modules=("q_proj", "embed_tokens")))
    for layer in layers.values():
        module = layer.lora_dropout["default"]
        assert type(module) is expected
        if expected is nn.Dropout:
            assert module.p == p


# -- dispatch (notes §5, §6) --------------------------------------------------------------------------------


def test_conv1d_gets_fan_in_fan_out_true_with_a_warning():
    model = gpt2()
    with expect_warning("conv1d_fan_in_fan_out", CONV1D_WARNING):
        model = prep(model, r=4, target_modules=("c_attn",))
    layer = model.transformer.h[0].attn.c_attn
    assert isinstance(layer, LoraLinear) and layer.fan_in_fan_out is True
    assert (layer.in_features, layer.out_features) == (64, 192)
    assert layer.lora_A["default"].weight.shape == (4, 64)
    assert layer.lora_B["default"].weight.shape == (192, 4)
    assert type(layer.base_layer).__name__ == "Conv1D"


def test_conv1d_with_fan_in_fan_out_true_does_not_warn():
    model = gpt2()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = prep(model, fan_in_fan_out=True, target_modules=("c_attn",))
    assert not [w for w in caught if issubclass(w.category, UserWarning)], [str(w.message) for w in caught]
    assert model.transformer.h[1].attn.c_attn.fan_in_fan_out is True


def test_linear_with_fan_in_fan_out_true_warns_and_gets_false():
    model = llama()
    with expect_warning("linear_fan_in_fan_out", LINEAR_WARNING):
        model = prep(model, fan_in_fan_out=True, target_modules=("q_proj",))
    assert all(layer.fan_in_fan_out is False for layer in lora_layers(model).values())


def test_mixed_conv1d_and_linear_flip_the_shared_flag_in_order():
    layers = lora_layers(quiet_prep(gpt2(), target_modules=("c_attn", "lm_head")))
    assert layers["transformer.h.0.attn.c_attn"].fan_in_fan_out is True
    assert layers["transformer.h.1.attn.c_attn"].fan_in_fan_out is True
    assert layers["lm_head"].fan_in_fan_out is False


def test_embedding_layout():
    model = quiet_prep(llama(), r=4, target_modules=("embed_tokens",))
    layer = model.model.embed_tokens
    assert isinstance(layer, LoraEmbedding) and isinstance(layer.base_layer, nn.Embedding)
    assert layer.lora_embedding_A["default"].shape == (4, 256)
    assert layer.lora_embedding_B["default"].shape == (64, 4)
    names = {n for n, _ in model.named_parameters() if n.startswith("model.embed_tokens.")}
    assert names == {
        "model.embed_tokens.base_layer.weight",
        "model.embed_tokens.lora_embedding_A.default",
        "model.embed_tokens.lora_embedding_B.default",
    }
    assert not hasattr(layer, "lora_A")


def test_linear_layout():
    model = quiet_prep(llama(), r=4, target_modules=("k_proj",))
    layer = model.model.layers[0].self_attn.k_proj
    assert layer.lora_A["default"].weight.shape == (4, 64)
    assert layer.lora_B["default"].weight.shape == (32, 4)
    assert layer.lora_A["default"].bias is None and layer.lora_B["default"].bias is None
    names = {n for n, _ in model.named_parameters() if n.startswith("model.layers.0.self_attn.k_proj.")}
    assert names == {
        "model.layers.0.self_attn.k_proj.base_layer.weight",
        "model.layers.0.self_attn.k_proj.lora_A.default.weight",
        "model.layers.0.self_attn.k_proj.lora_B.default.weight",
    }


def test_wrap_rejects_unsupported_modules():
    with pytest.raises(errors.UnsupportedModule) as info:
        wrap("model.norm", nn.LayerNorm(8), False)
    assert info.value.kind == "unsupported_module"


def test_bnb_linear4bit_keeps_its_quantization(cache):
    model = quantized(cache, "4bit", quant_type="fp4", double_quant=True, compute_dtype="bfloat16")
    layer = quiet_prep(model, r=4, target_modules=("k_proj",)).model.layers[0].self_attn.k_proj
    base = layer.base_layer
    assert isinstance(layer, LoraLinear) and type(base).__name__ == "Linear4bit"
    assert type(base).__module__.startswith("bitsandbytes")
    assert base.compute_dtype == torch.bfloat16
    assert base.weight.quant_type == "fp4"
    assert base.weight.compress_statistics is True
    assert type(base.weight).__name__ == "Params4bit"
    assert (layer.in_features, layer.out_features) == (64, 32)
    assert layer.lora_A["default"].weight.shape == (4, 64)
    assert layer.lora_B["default"].weight.shape == (32, 4)
    assert layer.fan_in_fan_out is False


def test_bnb_linear8bitlt(cache):
    model = quiet_prep(quantized(cache, "8bit"), r=4, target_modules=("k_proj",))
    layer = model.model.layers[0].self_attn.k_proj
    base = layer.base_layer
    assert isinstance(layer, LoraLinear) and type(base).__name__ == "Linear8bitLt"
    assert type(base.weight).__name__ == "Int8Params" and base.weight.dtype == torch.int8
    assert tuple(base.weight.shape) == (32, 64)
    assert (layer.in_features, layer.out_features) == (64, 32)
    assert layer.lora_B["default"].weight.shape == (32, 4)


# -- init (notes §6) -----------------------------------------------------------------------------------------


def test_init_true():
    torch.manual_seed(0)
    layers = lora_layers(quiet_prep(llama(hidden_size=128), r=8, target_modules=("q_proj", "embed_tokens")))
    q = layers["model.layers.0.self_attn.q_proj"]
    a, b = q.lora_A["default"].weight, q.lora_B["default"].weight
    assert not b.any()
    bound = 1 / math.sqrt(128)
    assert a.abs().max() <= bound and a.abs().max() > bound / 2
    emb = layers["model.embed_tokens"]
    assert not emb.lora_embedding_A["default"].any()
    assert 0.8 < emb.lora_embedding_B["default"].std().item() < 1.2


def test_init_gaussian():
    torch.manual_seed(0)
    layers = lora_layers(quiet_prep(llama(hidden_size=128), r=8, init_lora_weights="gaussian",
                                    target_modules=("q_proj", "embed_tokens")))
    a = torch.cat([layers[k].lora_A["default"].weight.flatten() for k in qkeys(0, 1)])
    assert a.std().item() == pytest.approx(1 / 8, rel=0.15)
    assert a.abs().max() > 1 / math.sqrt(128)  # not the uniform init
    assert not any(layers[k].lora_B["default"].weight.any() for k in qkeys(0, 1))
    emb = layers["model.embed_tokens"]  # embeddings: the same as True
    assert not emb.lora_embedding_A["default"].any() and emb.lora_embedding_B["default"].any()


def test_init_false_leaves_both_factors_nonzero():
    layers = lora_layers(quiet_prep(llama(), init_lora_weights=False, target_modules=("q_proj", "embed_tokens")))
    q = layers["model.layers.0.self_attn.q_proj"]
    assert q.lora_A["default"].weight.any() and q.lora_B["default"].weight.any()
    emb = layers["model.embed_tokens"]
    assert emb.lora_embedding_A["default"].any() and emb.lora_embedding_B["default"].any()


@pytest.mark.parametrize("model_factory, target, out", [(llama, "q_proj", 64), (gpt2, "c_attn", 192)])
def test_lora_bias_is_zero_initialised_and_trainable(model_factory, target, out):
    model = quiet_prep(model_factory(), lora_bias=True, target_modules=(target,))
    for layer in lora_layers(model).values():
        bias = layer.lora_B["default"].bias
        assert bias is not None and bias.shape == (out,)
        assert not bias.any() and bias.requires_grad
    assert any(n.endswith("lora_B.default.bias") for n, p in model.named_parameters() if p.requires_grad)


def test_lora_bias_on_bnb_4bit(cache):
    model = quiet_prep(quantized(cache, "4bit"), lora_bias=True, target_modules=("q_proj",))
    bias = model.model.layers[0].self_attn.q_proj.lora_B["default"].bias
    assert bias.shape == (64,) and not bias.any() and bias.requires_grad


def test_lora_bias_on_layer_without_bias_warns():
    model = llama()
    with expect_warning("lora_bias_without_base_bias",
                        r"`lora_bias=True` was passed but the targeted layer of type Linear has no bias"):
        prep(model, lora_bias=True, target_modules=("q_proj",))


def test_lora_bias_on_layer_with_bias_does_not_warn():
    model = gpt2()  # Conv1D layers have a bias
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        prep(model, lora_bias=True, fan_in_fan_out=True, target_modules=("c_attn",))
    assert not [w for w in caught if issubclass(w.category, UserWarning)], [str(w.message) for w in caught]


def test_exclude_modules_that_exclude_nothing_warn():
    model = llama()
    with expect_warning("exclude_unused", r"You have passed exclude_modules=.* but no modules were excluded"):
        prep(model, target_modules=("q_proj",), exclude_modules=("nothing",))


def test_exclude_modules_that_exclude_something_do_not_warn():
    model = llama()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        prep(model, target_modules=("q_proj",), exclude_modules=("0.self_attn.q_proj",))
        prep(llama(), target_modules=("q_proj",), modules_to_save=("lm_head",), exclude_modules=("lm_head",))
    assert not [w for w in caught if issubclass(w.category, UserWarning)], [str(w.message) for w in caught]


@pytest.mark.parametrize("field", ["rank_pattern", "alpha_pattern"])
def test_unused_pattern_keys_warn(field):
    model = llama()
    with expect_warning(f"{field}_unused", rf"following {field} keys did not match any targeted module"):
        prep(model, target_modules=("q_proj",), **{field: (("proj", 2), ("q_proj", 4))})


def test_used_pattern_keys_do_not_warn():
    model = llama()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        prep(model, target_modules=("q_proj", "v_proj"), rank_pattern=(("q_proj", 2),), alpha_pattern=(("v_proj", 4),))
    assert not [w for w in caught if issubclass(w.category, UserWarning)], [str(w.message) for w in caught]


@pytest.mark.xfail(strict=True, reason="notes §4: unused rank_pattern / alpha_pattern keys are a RuntimeWarning; "
                   "the reference emits a PreparationWarning, a UserWarning")
@pytest.mark.parametrize("field", ["rank_pattern", "alpha_pattern"])
def test_unused_pattern_keys_warning_is_a_runtime_warning(field):
    model = llama()
    with pytest.warns(RuntimeWarning):
        prep(model, target_modules=("q_proj",), **{field: (("proj", 2),)})


# -- dtype policy (notes §10) ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "base, autocast, expected",
    [
        (torch.float16, True, torch.float32),
        (torch.float16, False, torch.float16),
        (torch.bfloat16, True, torch.float32),
        (torch.bfloat16, False, torch.bfloat16),
        (torch.float32, True, torch.float32),
        (torch.float32, False, torch.float32),
        (torch.uint8, False, torch.float32),  # packed 4-bit storage: no cast
        (torch.int8, False, torch.float32),  # 8-bit: no cast
        (torch.int8, True, torch.float32),
    ],
)
def test_adapter_dtype_table(base, autocast, expected):
    assert adapter_dtype(base, autocast) == expected


def _lora_dtypes(model: nn.Module) -> dict[str, set[torch.dtype]]:
    out: dict[str, set[torch.dtype]] = {}
    for name, layer in lora_layers(model).items():
        params = [p for n, p in layer.named_parameters() if "lora_" in n]
        out[name] = {p.dtype for p in params}
    return out


@pytest.mark.parametrize("load_dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("autocast", [True, False])
def test_half_precision_base_adapter_dtype(load_dtype, autocast):
    model = quiet_prep(llama(load_dtype=load_dtype), TrainingSpec(prepare_kbit=False, autocast_adapter_dtype=autocast),
                       target_modules=("q_proj", "embed_tokens"))
    expected = torch.float32 if autocast else getattr(torch, load_dtype)
    assert set().union(*_lora_dtypes(model).values()) == {expected}


@pytest.mark.parametrize("autocast, q_dtype", [(True, torch.float32), (False, torch.bfloat16)])
def test_4bit_adapter_follows_compute_dtype(cache, autocast, q_dtype):
    model = quantized(cache, "4bit", load_dtype="bfloat16", compute_dtype="bfloat16", quant_storage="bfloat16")
    model = quiet_prep(model, TrainingSpec(autocast_adapter_dtype=autocast), target_modules=("q_proj", "embed_tokens"))
    dtypes = _lora_dtypes(model)
    assert dtypes["model.layers.0.self_attn.q_proj"] == {q_dtype}
    assert dtypes["model.embed_tokens"] == {torch.float32}  # the k-bit step upcast the embedding


def test_4bit_float_storage_with_default_compute_is_fp32(cache):
    model = quantized(cache, "4bit", compute_dtype="float32", quant_storage="float16")
    model = quiet_prep(model, TrainingSpec(autocast_adapter_dtype=False), target_modules=("q_proj",))
    assert set().union(*_lora_dtypes(model).values()) == {torch.float32}


def test_8bit_adapter_is_fp32(cache):
    model = quiet_prep(quantized(cache, "8bit"), TrainingSpec(autocast_adapter_dtype=False), target_modules=("q_proj",))
    assert set().union(*_lora_dtypes(model).values()) == {torch.float32}


def test_saved_copies_are_never_autocast():
    model = quiet_prep(llama(load_dtype="bfloat16"), TrainingSpec(prepare_kbit=False, autocast_adapter_dtype=True),
                       target_modules=("q_proj",), modules_to_save=("lm_head",))
    assert model.lm_head.modules_to_save["default"].weight.dtype == torch.bfloat16
    assert model.lm_head.original_module.weight.dtype == torch.bfloat16




class _FakeBnbLinear(nn.Linear):
    """A half-precision Linear that reports itself as a bitsandbytes layer (the rounding rule
    keys on the base layer's module, not on the quantization itself)."""


_FakeBnbLinear.__module__ = "bitsandbytes.nn.modules"


@pytest.mark.parametrize("bnb", [False, True], ids=["plain-one-rounding", "bnb-update-rounded-first"])
def test_lora_update_rounding_follows_the_base_kind(bnb):
    torch.manual_seed(0)
    base = (_FakeBnbLinear if bnb else nn.Linear)(64, 64).to(torch.float16)
    layer = LoraLinear(base, 64, 64, False)
    layer.add_adapter("default", AdapterParams(r=4, alpha=8, dropout=0.0, use_rslora=False, init=False,
                                               lora_bias=False, autocast=True))
    for p in (layer.lora_A["default"].weight, layer.lora_B["default"].weight):
        assert p.dtype == torch.float32
    x = torch.randn(3, 64).to(torch.float16)
    with torch.no_grad():
        base_out = base(x)
        update = layer.lora_B["default"](layer.lora_A["default"](x.float())) * layer.scaling["default"]
        got = layer(x)
    expected = (base_out + update.half()) if bnb else (base_out + update).half()
    assert got.dtype == torch.float16
    assert torch.equal(got, expected)
    other = (base_out + update).half() if bnb else (base_out + update.half())
    assert not torch.equal(other, expected), "the two rounding orders must differ on this input"


def test_merging_a_lora_bias_without_a_base_bias_is_refused():
    from reference.errors import MergeImpossible
    from reference.merge import merge_and_unload as _unload

    model = nn.Sequential(nn.Linear(8, 8, bias=False))
    layer = LoraLinear(model[0], 8, 8, False)
    layer.add_adapter("default", AdapterParams(r=2, alpha=2, dropout=0.0, use_rslora=False, init=True,
                                               lora_bias=True, autocast=True))
    model[0] = layer
    with pytest.raises(RuntimeError) as info:
        _unload(model)
    assert isinstance(info.value, MergeImpossible) and info.value.kind == "merge_lora_bias_without_base_bias"
    with_bias = nn.Sequential(LoraLinear(nn.Linear(8, 8), 8, 8, False))
    with_bias[0].add_adapter("default", AdapterParams(r=2, alpha=2, dropout=0.0, use_rslora=False, init=True,
                                                      lora_bias=True, autocast=True))
    _unload(with_bias)
    assert type(with_bias[0]) is nn.Linear


def test_a_merge_folds_the_scaled_update_into_the_base():
    """merge_and_unload computes what the unmerged forward computes: W + s B A, b + s l."""
    from reference.merge import merge_and_unload

    torch.manual_seed(0)
    base = nn.Linear(8, 6)
    model = nn.Sequential(LoraLinear(base, 8, 6, False))
    model[0].add_adapter("default", AdapterParams(r=2, alpha=8, dropout=0.0, use_rslora=False, init=False,
                                                  lora_bias=True, autocast=True))
    with torch.no_grad():
        model[0].lora_B["default"].bias.normal_()
    x = torch.randn(4, 8)
    with torch.no_grad():
        unmerged = model(x)
        merge_and_unload(model)
        merged = model(x)
    assert type(model[0]) is nn.Linear
    torch.testing.assert_close(merged, unmerged, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("saved_head", [True, False])
def test_a_merge_that_parts_the_embeddings_unties_them_from_peft_0_19(saved_head):
    """peft >= 0.19 writes tie_word_embeddings=False (and warns) when a merge leaves the output
    embedding apart from the input one: a trained lm_head copy replaced it (trl 0.22 - 0.26 merge a
    passed-in PeftModel; found on trl 0.25.1, starcoder2).  A merge that keeps them together, or
    peft before 0.19, leaves the config alone."""
    from conformance.engine.models import load_model
    from conformance.engine.runner import cache_dir
    from reference.merge import merge_and_unload
    from reference.prepare import prepare_wrapped
    from reference.profiles import PROFILES
    from reference.spec import AdapterSpec, ModelSpec, QuantSpec

    adapter = AdapterSpec(r=2, target_modules=("q_proj",), task_type="CAUSAL_LM",
                          modules_to_save=("lm_head",) if saved_head else None)
    for name, unties in (("peft-0.19", saved_head), ("current", saved_head), ("peft-0.18", False), ("seed", False)):
        model = load_model(ModelSpec("starcoder2", num_layers=1), QuantSpec(), cache_dir())
        assert model.config.tie_word_embeddings is True
        prepare_wrapped(model, adapter, TrainingSpec(prepare_kbit=False), PROFILES[name])
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            merge_and_unload(model, PROFILES[name])
        kinds = [getattr(w.message, "kind", None) for w in caught]
        assert model.config.tie_word_embeddings is (not unties), name
        assert ("embeddings_untied_after_merge" in kinds) is unties, (name, kinds)
