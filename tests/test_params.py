"""Parameter-level LoRA (``target_parameters``) and the MoE target conversion of transformers 5.

The reference's rules on their own (layout, nesting, the per-expert update, refusals, the
conversion), agreement with upstream on hand-picked cases, and held-out faults planted into
upstream peft that the harness must catch: scaling, trainability, the forward, the k-bit upcast
of the fused experts, the doubled rank of the fused projections.
"""

from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch
from torch import nn

from conformance.engine.runner import run_case
from fault_kit import PROFILE, after_get_peft_model, assert_caught, wrap_kbit_step
from test_known_narrow import MIXTRAL_ALL_LINEAR, _active, _double_scaling, _fails, _in_scope, _modules, _out_of_scope
from reference import errors
from reference.layers import AdapterParams
from reference.params import LoraParam, convert_moe_targets
from reference.spec import AdapterSpec, Case, ModelSpec, QuantSpec, TrainingSpec
from strategies.params import fused_types

NO_KBIT = TrainingSpec(prepare_kbit=False)


def _params(r: int = 2, alpha: float = 4.0, **kw) -> AdapterParams:
    base = dict(r=r, alpha=alpha, dropout=0.0, use_rslora=False, init=True, lora_bias=False, autocast=True,
                init_variants=("olora", "pissa", "orthogonal"))
    base.update(kw)
    return AdapterParams(**base)


class _Experts(nn.Module):
    """A stand-in fused-experts module: (experts, out, in) weights applied per expert."""

    def __init__(self, experts: int = 3, out: int = 5, inp: int = 4, transposed: bool = False) -> None:
        super().__init__()
        self.is_transposed = transposed
        shape = (experts, inp, out) if transposed else (experts, out, inp)
        self.up = nn.Parameter(torch.randn(shape))
        self.down = nn.Parameter(torch.randn(shape))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (experts, batch, in) -> (experts, batch, out)
        w = self.up if self.is_transposed else self.up.transpose(-2, -1)
        return x @ w


# -- the reference's rules -----------------------------------------------------------------------


@pytest.mark.parametrize("transposed", [False, True])
def test_factors_stack_the_experts_and_the_update_is_per_expert(transposed):
    torch.manual_seed(0)
    host = _Experts(transposed=transposed)
    layer = LoraParam(host, "up")
    layer.add_adapter("default", _params(r=2, alpha=4.0, init=False))
    e, r = 3, 2
    assert (layer.in_features, layer.out_features, layer.num_experts) == (4, 5, 3)
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    assert a.shape == (r * e, 4) and b.shape == (5, r * e)
    delta = layer.delta("default")
    for k in range(e):
        a_k = a[k * r:(k + 1) * r]  # rows of expert k
        b_k = b[:, k::e]  # columns k, k + e, ...: peft's checkpoint layout
        expected = 2.0 * (b_k @ a_k)
        torch.testing.assert_close(delta[k], expected.T if transposed else expected)
    x = torch.randn(e, 7, 4)
    w = host.up + delta
    torch.testing.assert_close(layer(x), x @ (w if transposed else w.transpose(-2, -1)))
    assert isinstance(host._parameters["up"], nn.Parameter)  # restored after the forward


def test_default_init_leaves_the_forward_unchanged_and_trains_the_factors():
    host = _Experts()
    layer = LoraParam(host, "up")
    layer.add_adapter("default", _params())
    assert not layer.lora_B["default"].weight.any()
    x = torch.randn(3, 2, 4)
    torch.testing.assert_close(layer(x), host(x))


def test_a_second_parameter_nests_around_the_first():
    host = _Experts()
    inner = LoraParam(host, "up")
    inner.add_adapter("default", _params())
    outer = LoraParam(inner, "down")
    outer.add_adapter("default", _params())
    assert outer.host() is host and outer.param() is host.down
    names = {n for n, _ in outer.named_parameters()}
    assert {"base_layer.base_layer.up", "base_layer.base_layer.down", "lora_A.default.weight",
            "base_layer.lora_A.default.weight"} <= names


@pytest.mark.parametrize("option", [dict(dropout=0.1), dict(fan_in_fan_out=True), dict(lora_bias=True),
                                    dict(use_dora=True)])
def test_parameter_lora_refuses_what_it_cannot_do(option):
    layer = LoraParam(_Experts(), "up")
    with pytest.raises(errors.InvalidConfig) as info:
        layer.add_adapter("default", _params(**option))
    assert info.value.kind == "param_wrapper_unsupported"


def test_decomposing_inits_are_refused_on_parameters():
    layer = LoraParam(_Experts(), "up")
    with pytest.raises(errors.InvalidConfig) as info:
        layer.add_adapter("default", _params(init="olora"))
    assert info.value.kind == "param_wrapper_init_unsupported"


needs_fused = pytest.mark.skipif(not fused_types() or "target_parameters" not in PROFILE.features,
                                 reason="the installed stack has no fused experts or no target_parameters")


def _loaded(model_type: str) -> nn.Module:
    from conformance.engine.models import build_model

    return build_model(ModelSpec(model_type, "CAUSAL_LM", num_layers=1))


@needs_fused
def test_all_linear_reaches_experts_and_router_with_doubled_fused_rank():
    model = _loaded("qwen3_moe")
    linear = frozenset(n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n != "lm_head")
    out = convert_moe_targets(model, linear, 8, 16, (), (), linear)
    assert out.parameters == {"gate_up_proj", "down_proj", "gate.weight"}
    assert out.modules == linear and out.stored_modules == {"q_proj", "k_proj", "v_proj", "o_proj"}
    assert dict(out.rank_pattern) == {r".*\.gate_up_proj": 16} and dict(out.alpha_pattern) == {r".*\.gate_up_proj": 32}


@needs_fused
def test_v4_expert_names_convert_and_one_half_alone_is_refused():
    model = _loaded("mixtral")
    out = convert_moe_targets(model, frozenset({"q_proj", "w1", "w3"}), 4, 4, (("q_proj", 2),), (), None)
    assert out.modules == {"q_proj"} and out.parameters == {"gate_up_proj"}
    assert dict(out.rank_pattern) == {"q_proj": 2, r".*\.gate_up_proj": 8}
    with pytest.raises(errors.InvalidConfig) as info:
        convert_moe_targets(model, frozenset({"w1"}), 4, 4, (), (), None)
    assert info.value.kind == "moe_fused_half"
    assert convert_moe_targets(model, frozenset({"q_proj"}), 4, 4, (), (), None) is None


@needs_fused
def test_a_regex_naming_v4_experts_converts():
    model = _loaded("olmoe")
    out = convert_moe_targets(model, r".*\.(q_proj|gate_proj|up_proj)", 4, 4, (), (), None)
    assert out.parameters == {"gate_up_proj"} and all(n.endswith("q_proj") for n in out.modules)


# -- agreement with upstream and held-out faults --------------------------------------------------


def _case(model_type: str, adapter: AdapterSpec, quant: QuantSpec = QuantSpec(), dtype: str = "float32",
          training: TrainingSpec = NO_KBIT) -> Case:
    return Case(ModelSpec(model_type, "CAUSAL_LM", num_layers=1, load_dtype=dtype), quant, adapter, training)


PARAM_CASES = [
    _case("qwen3_moe", AdapterSpec(r=4, lora_alpha=8, target_modules=("q_proj",),
                                   target_parameters=("gate_up_proj", "down_proj", "gate.weight"))),
    _case("mixtral", AdapterSpec(r=2, lora_alpha=16, target_modules="all-linear"), dtype="bfloat16"),
    _case("olmoe", AdapterSpec(r=2, target_modules=("q_proj",), target_parameters=("experts.down_proj",),
                               use_rslora=True),
          QuantSpec(kind="4bit", compute_dtype="bfloat16"), dtype="bfloat16", training=TrainingSpec(prepare_kbit=True)),
    _case("qwen3_moe", AdapterSpec(r=2, target_modules=(), target_parameters=("mlp.gate.weight", "down_proj"),
                                   init_lora_weights=False), dtype="float16"),
]
ALLOWED = {"loraconfig-mutated-in-place", "pattern-unused-warning-ignores-parameter-targets"}


@needs_fused
def test_clean_parameter_cases_agree_with_numerics():
    for case in PARAM_CASES:
        outcome = run_case(case, PROFILE)
        assert outcome.status in ("agree", "known"), (case.dumps(), outcome.divergences)
        assert set(outcome.known) <= ALLOWED, outcome.known
        assert outcome.numerics is not None, case.dumps()  # the forward and gradients were compared


def _wrappers(peft_model):
    return [m for m in peft_model.modules() if type(m).__name__ == "ParamWrapper"]


@needs_fused
def test_catches_doubled_scaling_on_expert_parameters(monkeypatch):
    def double(pm, config):
        for m in _wrappers(pm):
            m.scaling["default"] *= 2

    after_get_peft_model(monkeypatch, double)
    assert_caught(PARAM_CASES, {"adapter[default].scaling"}, path=r".*mlp\.(experts|gate)(\.base_layer)?")


@needs_fused
def test_catches_frozen_expert_factors(monkeypatch):
    after_get_peft_model(monkeypatch, lambda pm, config: [m.lora_A["default"].weight.requires_grad_(False)
                                                          for m in _wrappers(pm)])
    assert_caught(PARAM_CASES, {"requires_grad"}, path=r".*mlp\.(experts|gate).*lora_A\.default\.weight")


@needs_fused
def test_catches_a_forward_that_skips_the_expert_update(monkeypatch):
    """Numbers only: every fact agrees, the experts compute without their LoRA update."""
    import contextlib

    from peft.tuners.lora.layer import ParamWrapper

    monkeypatch.setattr(ParamWrapper, "_activate_lora", lambda self, adapters: contextlib.nullcontext())
    assert_caught(PARAM_CASES, {"numerics.logits", "numerics.train_logits", "numerics.grad", "numerics.train_grad"})


@needs_fused
def test_catches_experts_paired_with_the_wrong_factor_blocks(monkeypatch):
    """Numbers only: each expert gets another expert's rank-r block of the factors."""
    from peft.tuners.lora.layer import ParamWrapper

    original = ParamWrapper.get_delta_factors

    def rolled(self, adapter_name):
        lhs, rhs, scaling = original(self, adapter_name)
        return lhs, torch.roll(rhs, 1, dims=0), scaling

    monkeypatch.setattr(ParamWrapper, "get_delta_factors", rolled)
    assert_caught(PARAM_CASES, {"numerics.logits", "numerics.train_logits", "numerics.grad", "numerics.train_grad"})


@needs_fused
def test_catches_fused_experts_left_in_half_precision_by_the_kbit_step(monkeypatch):
    def back_to_bf16(model, state):
        for p in model.parameters():
            if p.dim() == 3 and p.dtype == torch.float32:
                p.data = p.data.to(torch.bfloat16)

    wrap_kbit_step(monkeypatch, back_to_bf16)
    assert_caught([PARAM_CASES[2]], {"dtype"}, path=r".*mlp\.experts\..*(gate_up_proj|down_proj)")


@needs_fused
def test_catches_a_conversion_that_does_not_double_the_fused_rank(monkeypatch):
    import peft.utils.transformers_weight_conversion as conversion

    original = conversion._convert_peft_config_moe

    def single_rank(peft_config, model):
        original(peft_config, model)
        for name in ("rank_pattern", "alpha_pattern"):
            pattern = getattr(peft_config, name) or {}
            for key in [k for k in pattern if "gate_up_proj" in k]:
                del pattern[key]

    monkeypatch.setattr(conversion, "_convert_peft_config_moe", single_rank)
    case = dataclasses.replace(PARAM_CASES[1], model=dataclasses.replace(PARAM_CASES[1].model, load_dtype="float32"))
    assert_caught([case], {"adapter[default].r", "adapter[default].alpha"})


# -- narrowness of the entries about parameter targets -------------------------------------------


def test_pattern_entry_catches_a_trainable_half_precision_router(monkeypatch):
    """all-linear on mixtral reaches the router as a parameter target: a fault on it still fails."""
    _active("pattern-unused-warning-ignores-parameter-targets")
    _in_scope("pattern-unused-warning-ignores-parameter-targets", MIXTRAL_ALL_LINEAR)

    def router_fp16(peft_model, config):
        for _, gate in _modules(peft_model, "mlp.gate"):
            base = gate.base_layer
            base.weight.data = base.weight.data.to(torch.float16)
            base.weight.requires_grad = True

    after_get_peft_model(monkeypatch, router_fp16)
    _fails(MIXTRAL_ALL_LINEAR, "requires_grad", path="model.layers.0.mlp.gate.base_layer.weight")


def test_pattern_entry_catches_doubled_scaling_on_the_experts(monkeypatch):
    _active("pattern-unused-warning-ignores-parameter-targets")
    _double_scaling(monkeypatch, "mlp.experts")
    _fails(MIXTRAL_ALL_LINEAR, "adapter[default].scaling", path="model.layers.0.mlp.experts")


def test_pattern_entry_catches_a_fault_on_the_attention(monkeypatch):
    _active("pattern-unused-warning-ignores-parameter-targets")
    _double_scaling(monkeypatch, "self_attn.q_proj")
    _fails(MIXTRAL_ALL_LINEAR, "adapter[default].scaling", path="model.layers.0.self_attn.q_proj")


def test_pattern_entry_excuses_no_warning_about_a_key_on_modules_only(monkeypatch):
    """A rank_pattern key that reaches a targeted module only: an "unused" warning about it is a fault."""
    _active("pattern-unused-warning-ignores-parameter-targets")
    case = Case(ModelSpec("qwen3_moe", "CAUSAL_LM", num_layers=1),
                adapter=AdapterSpec(target_modules=("q_proj",), target_parameters=("down_proj",),
                                    rank_pattern=(("q_proj", 2),)), training=NO_KBIT)
    _in_scope("pattern-unused-warning-ignores-parameter-targets", case)

    def spurious(peft_model, config):
        warnings.warn("The following rank_pattern keys did not match any targeted module and were ignored: "
                      "['q_proj'].", RuntimeWarning, stacklevel=2)

    after_get_peft_model(monkeypatch, spurious)
    _fails(case, "warnings.rank_pattern_unused")


QWEN2_MOE_ALL_LINEAR = Case(ModelSpec("qwen2_moe", "CAUSAL_LM", num_layers=1),
                            adapter=AdapterSpec(target_modules="all-linear", task_type="CAUSAL_LM"), training=NO_KBIT)


def test_qwen2_moe_entry_catches_a_fault_on_the_shared_expert(monkeypatch):
    _active("moe-conversion-skips-qwen2-moe")
    _in_scope("moe-conversion-skips-qwen2-moe", QWEN2_MOE_ALL_LINEAR)
    _double_scaling(monkeypatch, "shared_expert.down_proj")
    _fails(QWEN2_MOE_ALL_LINEAR, "adapter[default].scaling", path="model.layers.0.mlp.shared_expert.down_proj")


def test_qwen2_moe_entry_catches_doubled_scaling_on_named_experts(monkeypatch):
    """Parameters the user names get LoRA on both sides: their scaling stays compared."""
    _active("moe-conversion-skips-qwen2-moe")
    case = dataclasses.replace(QWEN2_MOE_ALL_LINEAR, adapter=dataclasses.replace(
        QWEN2_MOE_ALL_LINEAR.adapter, target_parameters=("gate_up_proj",)))
    _in_scope("moe-conversion-skips-qwen2-moe", case)
    _double_scaling(monkeypatch, "mlp.experts")
    _fails(case, "adapter[default].scaling")


def test_qwen2_moe_rslora_entry_excuses_only_the_experts_scaling(monkeypatch):
    """With rsLoRA the experts' scaling is excused (the reference's doubled rank and alpha), a
    wrong scaling elsewhere in the same case still fails."""
    _active("moe-conversion-skips-qwen2-moe-rslora-scaling")
    case = dataclasses.replace(QWEN2_MOE_ALL_LINEAR, adapter=dataclasses.replace(
        QWEN2_MOE_ALL_LINEAR.adapter, target_parameters=("gate_up_proj",), use_rslora=True))
    _in_scope("moe-conversion-skips-qwen2-moe-rslora-scaling", case)
    _double_scaling(monkeypatch, "shared_expert.down_proj")
    _fails(case, "adapter[default].scaling", path="model.layers.0.mlp.shared_expert.down_proj")


def test_qwen2_moe_entry_needs_the_conversion(monkeypatch):
    """A list of attention names converts nothing: LoRA on the router there is a fault."""
    _active("moe-conversion-skips-qwen2-moe")
    case = dataclasses.replace(QWEN2_MOE_ALL_LINEAR, adapter=AdapterSpec(target_modules=("q_proj",),
                                                                         task_type="CAUSAL_LM"))
    _out_of_scope("moe-conversion-skips-qwen2-moe", case)
    import peft

    original = peft.get_peft_model

    def with_router(model, config, *args, **kwargs):
        config.target_parameters = ["mlp.gate.weight"]
        return original(model, config, *args, **kwargs)

    monkeypatch.setattr(peft, "get_peft_model", with_router)
    _fails(case, "lora.present", path="model.layers.0.mlp.gate")
