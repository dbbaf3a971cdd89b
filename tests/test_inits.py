"""``init_lora_weights`` variants (olora, pissa, orthogonal): the reference's properties, the
numerical checks that hold each side to them, faults planted into upstream, and the narrowness
of the four registry entries they brought."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from conformance.engine.diff import Divergence
from conformance.engine.features import CaseContext
from conformance.engine.known import default_registry, load_registry
from conformance.engine.runner import run_case
from conformance.numerics.init import init_problems
from fault_kit import PROFILE, assert_caught
from reference import select_profile
from reference.errors import InvalidConfig, QuantizedInitUnsupported
from reference.inits import init_kind
from reference.layers import AdapterParams, LoraEmbedding, LoraLinear
from reference.spec import AdapterSpec, Case, ModelSpec, QuantSpec, TrainingSpec

VARIANTS = ("olora", "pissa", "orthogonal")


def _params(init: object, r: int = 4, alpha: float = 8) -> AdapterParams:
    return AdapterParams(r=r, alpha=alpha, dropout=0.0, use_rslora=False, init=init, lora_bias=False, autocast=True,
                         init_variants=VARIANTS)


def _layer(init: object, fan_in_fan_out: bool = False, r: int = 4, out: int = 24, inp: int = 16):
    torch.manual_seed(0)
    base = nn.Linear(inp, out)
    if fan_in_fan_out:  # a Conv1D-like layout: the weight stored (in, out)
        base.weight = nn.Parameter(base.weight.detach().T.contiguous())
    original = base.weight.detach().clone()
    layer = LoraLinear(base, inp, out, fan_in_fan_out)
    layer.add_adapter("default", _params(init, r=r))
    return layer, original


def _dense(w: torch.Tensor, fan_in_fan_out: bool) -> torch.Tensor:
    return (w.T if fan_in_fan_out else w).double()


@pytest.mark.parametrize("fan_in_fan_out", [False, True])
def test_olora_is_a_qr_split_whose_residual_keeps_the_weight(fan_in_fan_out):
    layer, original = _layer("olora", fan_in_fan_out)
    a, b = layer.lora_A["default"].weight.double(), layer.lora_B["default"].weight.double()
    assert a.shape == (4, 16) and b.shape == (24, 4)  # (r, in), (out, r) whatever the stored layout
    torch.testing.assert_close(b.T @ b, torch.eye(4, dtype=torch.float64), atol=1e-6, rtol=0)
    assert bool((torch.tril(a, diagonal=-1) == 0).all())
    held = _dense(layer.base_layer.weight.detach(), fan_in_fan_out)
    torch.testing.assert_close(held + layer.scaling["default"] * b @ a, _dense(original, fan_in_fan_out),
                               atol=1e-6, rtol=0)
    assert layer.base_layer.weight.shape == original.shape


def test_pissa_takes_the_top_singular_values_and_keeps_the_residual():
    layer, original = _layer("pissa")
    a, b = layer.lora_A["default"].weight.double(), layer.lora_B["default"].weight.double()
    s = layer.scaling["default"]
    top = torch.linalg.svdvals(original.double())[:4]
    torch.testing.assert_close(torch.diagonal(a @ a.T) * s, top, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(a @ a.T, b.T @ b, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(layer.base_layer.weight.double() + s * b @ a, original.double(), atol=1e-6, rtol=0)


def test_orthogonal_factors_multiply_to_zero_and_need_an_even_rank():
    layer, original = _layer("orthogonal")
    a, b = layer.lora_A["default"].weight.double(), layer.lora_B["default"].weight.double()
    assert float((b @ a).abs().max()) < 1e-6 and float(a.abs().max()) > 0 and float(b.abs().max()) > 0
    assert torch.equal(layer.base_layer.weight, original)
    with pytest.raises(InvalidConfig) as err:
        _layer("orthogonal", r=3)
    assert err.value.kind == "orthogonal_odd_rank" and isinstance(err.value, ValueError)


def test_pissa_refuses_a_quantized_base():
    bnb = pytest.importorskip("bitsandbytes")
    base = bnb.nn.Linear8bitLt(16, 24, has_fp16_weights=False)
    with pytest.raises(QuantizedInitUnsupported) as err:
        LoraLinear(base, 16, 24, False).add_adapter("default", _params("pissa"))
    assert err.value.kind == "pissa_quantized" and isinstance(err.value, TypeError)


def test_init_kinds_per_profile_and_embeddings_take_the_default():
    assert init_kind("OLoRA", VARIANTS) == "olora" and init_kind(True, ()) == "default"
    assert init_kind("gaussian", ()) == "gaussian" and init_kind(False, ()) == "none"
    seed = select_profile("seed").init_variants
    with pytest.raises(InvalidConfig) as err:
        init_kind("orthogonal", seed)  # peft 0.15 did not know it
    assert err.value.kind == "unknown_init"
    with pytest.raises(InvalidConfig):
        init_kind("pissa_niter_x", VARIANTS)
    emb = LoraEmbedding(nn.Embedding(10, 8))
    emb.add_adapter("default", _params("pissa"))
    assert bool((emb.lora_embedding_A["default"] == 0).all())


# -- the numerical checks catch each property broken -------------------------------------------------


class _Net(nn.Module):
    def __init__(self, layer: nn.Module):
        super().__init__()
        self.proj = layer


def _problems(init: object, corrupt=None, fan_in_fan_out: bool = False) -> list[str]:
    layer, original = _layer(init, fan_in_fan_out)
    loaded = nn.Linear(16, 24)
    loaded.weight = nn.Parameter(original.clone())
    if corrupt is not None:
        with torch.no_grad():
            corrupt(layer)
    return init_problems(_Net(layer), init, _Net(loaded)).get("proj", [])


@pytest.mark.parametrize("init", VARIANTS)
def test_clean_variants_have_no_init_problems(init):
    assert _problems(init) == []
    assert _problems(init, fan_in_fan_out=True) == []


@pytest.mark.parametrize("init, corrupt, found", [
    ("olora", lambda m: m.base_layer.weight.add_(m.scaling["default"] * m.lora_B["default"].weight
                                                 @ m.lora_A["default"].weight), "not the loaded weight"),
    ("olora", lambda m: m.lora_B["default"].weight.mul_(1.1), "not orthonormal"),
    ("olora", lambda m: m.lora_A["default"].weight.add_(0.01), "not upper triangular"),
    ("pissa", lambda m: m.lora_A["default"].weight.mul_(2.0), "A A^T != B^T B"),
    ("pissa", lambda m: (m.lora_A["default"].weight.mul_(2.0), m.lora_B["default"].weight.mul_(2.0)),
     "top singular values"),
    ("orthogonal", lambda m: m.lora_B["default"].weight.copy_(torch.randn(24, 4) / 10), "not zero"),
    ("orthogonal", lambda m: m.lora_A["default"].weight.mul_(3.0), "mean square of A"),
])
def test_each_broken_property_is_found(init, corrupt, found):
    problems = _problems(init, corrupt)
    assert any(found in p for p in problems), problems


# -- faults planted into upstream ---------------------------------------------------------------------------


def _llama(init: str, quant: QuantSpec = QuantSpec(), **adapter) -> Case:
    return Case(ModelSpec("llama", num_layers=2), quant,
                AdapterSpec(r=4, target_modules=("q_proj", "v_proj"), init_lora_weights=init, task_type="CAUSAL_LM",
                            **adapter),
                TrainingSpec(prepare_kbit=quant.quantized))


CLEAN = [_llama("olora"), _llama("pissa"), _llama("orthogonal"), _llama("olora", QuantSpec(kind="4bit")),
         _llama("olora", QuantSpec(kind="8bit")), _llama("pissa", lora_alpha=32, use_rslora=True)]


def test_clean_variant_cases_agree():
    for case in CLEAN:
        if case.adapter.init_lora_weights not in PROFILE.init_variants:
            continue
        outcome = run_case(case, PROFILE)
        assert outcome.status in ("agree", "known"), (case.dumps(), outcome.divergences)
        assert set(outcome.known) <= {"loraconfig-mutated-in-place"}, outcome.known


def _wrap(monkeypatch, method: str, after) -> None:
    from peft.tuners.lora.layer import LoraLayer

    original = getattr(LoraLayer, method)

    def faulty(self, adapter_name, *args, **kwargs):
        out = original(self, adapter_name, *args, **kwargs)
        with torch.no_grad():
            after(self, adapter_name)
        return out

    monkeypatch.setattr(LoraLayer, method, faulty)


def test_catches_olora_without_the_residual(monkeypatch):
    """The base keeps W: the residual's value differs, and the init check sees W + s*B@A != W."""
    def restore(layer, name):
        base = layer.get_base_layer()
        if base.weight.dtype.is_floating_point:
            base.weight.add_(layer.scaling[name] * layer.lora_B[name].weight @ layer.lora_A[name].weight)

    _wrap(monkeypatch, "olora_init", restore)
    assert_caught([CLEAN[0]], {"value"}, path=r".*q_proj\.base_layer\.weight")


def test_catches_pissa_with_the_scaling_left_in_the_singular_values(monkeypatch):
    """Numbers only: A and B scaled by sqrt(scaling), the residual recomputed so the base agrees too."""
    def rescale(layer, name):
        s = layer.scaling[name]
        layer.lora_A[name].weight.mul_(s ** 0.5)
        layer.lora_B[name].weight.mul_(s ** 0.5)

    _wrap(monkeypatch, "pissa_init", rescale)
    assert_caught([CLEAN[5], CLEAN[1]], {"numerics.init"})


def test_catches_an_orthogonal_init_whose_update_is_not_zero(monkeypatch):
    if "orthogonal" not in PROFILE.init_variants:
        pytest.skip("the installed peft has no orthogonal init")
    def random_b(layer, name):
        layer.lora_B[name].weight.copy_(torch.randn_like(layer.lora_B[name].weight) / 10)

    _wrap(monkeypatch, "orthogonal_init", random_b)
    assert_caught([CLEAN[2]], {"numerics.init", "numerics.init_output"})


# -- the registry entries are narrow -----------------------------------------------------------------------

def _gpt2(init: str, **adapter) -> Case:
    return Case(ModelSpec("gpt2", num_layers=1), QuantSpec(),
                AdapterSpec(r=4, target_modules=("c_attn",), init_lora_weights=init, **adapter),
                TrainingSpec(prepare_kbit=False))


def test_olora_conv1d_entry_excuses_only_its_shapes_and_residual(monkeypatch):
    registry = default_registry()
    outcome = run_case(_gpt2("olora"), PROFILE)
    assert outcome.status == "known" and "olora-ignores-conv1d-layout" in outcome.known, outcome.divergences
    assert "olora-ignores-conv1d-layout" not in registry.scope(CaseContext(_gpt2("pissa")))
    assert "olora-ignores-conv1d-layout" not in registry.scope(CaseContext(_llama("olora")))
    # in scope, another fault still fails: a frozen lora_B
    from fault_kit import after_get_peft_model

    def frozen_b(peft_model, _config):
        for name, param in peft_model.named_parameters():
            if ".lora_B." in name:
                param.requires_grad_(False)

    after_get_peft_model(monkeypatch, frozen_b)
    faulty = run_case(_gpt2("olora"), PROFILE)
    assert faulty.status == "diverge" and any(d.field == "requires_grad" for d in faulty.divergences)


def test_orthogonal_bnb_entry_needs_an_integer_weight_and_its_message():
    if "orthogonal-init-crashes-on-bitsandbytes" not in {e.id for e in default_registry().active}:
        pytest.skip("peft < 0.17")
    crash = _llama("orthogonal", QuantSpec(kind="4bit"))
    outcome = run_case(crash, PROFILE)
    assert outcome.status == "known" and "orthogonal-init-crashes-on-bitsandbytes" in outcome.known
    float_storage = _llama("orthogonal", QuantSpec(kind="4bit", quant_storage="float16"))
    clean = run_case(float_storage, PROFILE)
    assert clean.status in ("agree", "known") and "orthogonal-init-crashes-on-bitsandbytes" not in clean.known
    registry = default_registry()
    other = Divergence("<error>", "raised", "no error", "RuntimeError[other]: RuntimeError: CUDA error")
    ctx = CaseContext(crash, outcome.reference, outcome.upstream)
    assert registry.explain(ctx, [other])[0] == [other]
    olora = dataclasses.replace(crash, adapter=dataclasses.replace(crash.adapter, init_lora_weights="olora"))
    assert "orthogonal-init-crashes-on-bitsandbytes" not in registry.scope(CaseContext(olora, outcome.reference))


def test_pissa_float_storage_entry_needs_a_float_storage():
    registry = load_registry(versions={"peft": "0.21.2"})
    case = _llama("pissa", QuantSpec(kind="4bit", quant_storage="float32"))
    outcome = run_case(case, PROFILE)
    assert outcome.status == "known" and "pissa-decomposes-packed-4bit-float-storage" in outcome.known
    uint8 = _llama("pissa", QuantSpec(kind="4bit"))
    assert "pissa-decomposes-packed-4bit-float-storage" not in registry.scope(CaseContext(uint8))
    assert run_case(uint8, PROFILE).status == "agree"  # both refuse it, alike
    wrong = Divergence("<error>", "error", "TypeError[pissa_quantized]", "ValueError[invalid_r]")
    assert registry.explain(CaseContext(case), [wrong])[0] == [wrong]


def test_stale_scales_entry_names_only_the_stale_norm(monkeypatch):
    stale = _llama("olora", QuantSpec(kind="8bit"), use_dora=True)
    outcome = run_case(stale, PROFILE)
    assert outcome.status == "known" and "qdora-after-olora-8bit-magnitude-from-stale-scales" in outcome.known
    # in scope, a magnitude that is neither norm stays unexplained
    from fault_kit import after_get_peft_model

    def ones(peft_model, _config):
        for name, param in peft_model.named_parameters():
            if "lora_magnitude_vector" in name:
                param.fill_(1.0)

    after_get_peft_model(monkeypatch, ones)
    faulty = run_case(stale, PROFILE)
    assert faulty.status == "diverge" and any(d.field == "numerics.init" for d in faulty.divergences), faulty.divergences


def test_expert_parameters_entry_needs_decomposing_inits_on_fused_experts_and_its_errors():
    """(Its scope reads the loaded model: the experts must be fused, as transformers 5 builds them.)"""
    from strategies.params import fused_types

    if not fused_types():
        pytest.skip("the installed transformers keeps MoE experts as Linear layers")
    entry = "init-variants-crash-on-expert-parameters"
    registry = load_registry(versions={"peft": "0.21.2", "transformers": "5.23.0"})
    assert entry in {e.id for e in registry.active}
    assert entry not in {e.id for e in load_registry(versions={"peft": "0.15.2", "transformers": "4.53.3"}).active}
    moe = Case(ModelSpec("qwen3_moe", num_layers=1), QuantSpec(),
               AdapterSpec(target_modules="all-linear", init_lora_weights="olora", task_type="CAUSAL_LM"),
               TrainingSpec(prepare_kbit=False))
    crash = Divergence("<error>", "error", "ValueError[param_wrapper_init_unsupported]", "AttributeError[other]")
    assert registry.explain(CaseContext(moe), [crash])[0] == []
    for other in (dataclasses.replace(moe, adapter=dataclasses.replace(moe.adapter, init_lora_weights=True)),
                  dataclasses.replace(moe, model=ModelSpec("llama", num_layers=1))):
        assert registry.explain(CaseContext(other), [crash])[0] == [crash]
    different = Divergence("<error>", "error", "ValueError[param_wrapper_unsupported]", "AttributeError[other]")
    assert registry.explain(CaseContext(moe), [different])[0] == [different]
