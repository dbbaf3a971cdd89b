"""``init_lora_weights="pissa_niter_K"`` and ``"loftq"``: the reference's rules, the numerical
checks that hold each side to them (each planted fault is found), and a fault planted into
upstream's ``pissa_init`` that the conformance run catches."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from torch import nn

from conformance.engine.upstream import classify_error
from conformance.numerics.init import init_problems
from fault_kit import PROFILE, assert_caught
from reference import PROFILES
from reference.errors import InvalidConfig, LoftQNeedsScipy, QuantizedInitUnsupported, builtin_class
from reference.inits import init_kind, pissa_niter
from reference.layers import AdapterParams, LoraLinear
from reference.loftq import check_config, loftq_factors, normal_float_table
from reference.spec import AdapterSpec, Case, ModelSpec, QuantSpec, TrainingSpec

VARIANTS = ("olora", "pissa", "pissa_niter", "loftq")
NORMAL_FLOAT = ((2, "normal-float"), (4, "nf4"), (8, "normal-float"))
HAS_SCIPY = importlib.util.find_spec("scipy") is not None


def _params(init: object, r: int = 4, alpha: float = 8, loftq=()) -> AdapterParams:
    return AdapterParams(r=r, alpha=alpha, dropout=0.0, use_rslora=False, init=init, lora_bias=False, autocast=True,
                         init_variants=VARIANTS, loftq_config=loftq, loftq_quantizers=NORMAL_FLOAT)


def _layer(init: object, fan_in_fan_out: bool = False, loftq=(), out: int = 32, inp: int = 64):
    torch.manual_seed(0)
    base = nn.Linear(inp, out)
    if fan_in_fan_out:
        base.weight = nn.Parameter(base.weight.detach().T.contiguous())
    original = base.weight.detach().clone()
    layer = LoraLinear(base, inp, out, fan_in_fan_out)
    layer.add_adapter("default", _params(init, loftq=loftq))
    return layer, original


# -- pissa_niter_K ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("init, expected", [
    ("pissa_niter_4", 4), ("pissa_niter_0", 0), ("pissa_niter_ 2", 2), ("pissa_niter_+2", 2), ("pissa_niter_-1", -1),
    ("pissa_x_niter_3", 3),
    # observed in peft 0.15.2 and 0.21.2: int() of the part after "_niter_", or a ValueError
    ("pissa_niter_", "pissa_niter_not_int"), ("pissa_niter_x", "pissa_niter_not_int"),
    ("pissa_foo", "pissa_malformed"), ("pissa_niter_2_niter_3", "pissa_malformed"),
])
def test_pissa_niter_reads_its_count_as_peft_does(init, expected):
    assert init_kind(init, VARIANTS) == "pissa_niter"  # the family: the count is read by the layer
    if isinstance(expected, int):
        assert pissa_niter(init) == expected
    else:
        with pytest.raises(InvalidConfig) as raised:
            pissa_niter(init)
        assert raised.value.kind == expected


def test_pissa_niter_is_case_sensitive_and_the_messages_classify_alike():
    for init in ("PISSA_NITER_2", "Pissa_niter_2"):
        with pytest.raises(InvalidConfig) as raised:
            init_kind(init, VARIANTS)
        assert raised.value.kind == "unknown_init"
    assert classify_error(ValueError("invalid literal for int() with base 10: 'x'")) == ("ValueError", "pissa_niter_not_int")
    assert classify_error(ValueError(
        "init_lora_weights should be 'pissa' or 'pissa_niter_[number of iters]', got pissa_foo instead.")) == (
        "ValueError", "pissa_malformed")


@pytest.mark.parametrize("fan_in_fan_out", [False, True])
@pytest.mark.parametrize("niter", [0, 2])
def test_pissa_niter_keeps_the_residual_with_approximate_singular_values(fan_in_fan_out, niter):
    layer, original = _layer(f"pissa_niter_{niter}", fan_in_fan_out)
    a, b = layer.lora_A["default"].weight.double(), layer.lora_B["default"].weight.double()
    s = layer.scaling["default"]
    assert a.shape == (4, 64) and b.shape == (32, 4)
    torch.testing.assert_close(a @ a.T, b.T @ b, atol=1e-6, rtol=0)
    w = original.double().T if fan_in_fan_out else original.double()
    held = layer.base_layer.weight.detach().double()
    held = held.T if fan_in_fan_out else held
    torch.testing.assert_close(held + s * b @ a, w, atol=1e-6, rtol=0)
    top = torch.linalg.svdvals(w)[:4]
    assert bool((torch.diagonal(a @ a.T) * s <= top + 1e-6).all())


def test_pissa_niter_refuses_a_quantized_base_before_reading_its_count():
    bnb = pytest.importorskip("bitsandbytes")
    base = bnb.nn.Linear8bitLt(64, 32, has_fp16_weights=False)
    layer = LoraLinear(base, 64, 32, False)
    with pytest.raises(QuantizedInitUnsupported):  # peft checks the dtype first: "pissa_niter_x" too
        layer.add_adapter("default", _params("pissa_niter_x"))


# -- loftq -----------------------------------------------------------------------------------------------

def test_normal_float_tables_are_peft_015s():
    # values of peft 0.15.2's NFQuantizer(num_bits=b).norm_lookup_table (scipy's norm.ppf), read once
    for bits, first, middle, second_last in ((2, [-1.0, 0.0, 0.33791524171829224], 0.33791524171829224,
                                              0.33791524171829224),
                                             (4, [-1.0, -0.6961928009986877, -0.5250730514526367], 0.07958029955625534,
                                              0.7229568362236023),
                                             (8, [-1.0, -0.9736548066139221, -0.9494339823722839], 0.004955929704010487,
                                              0.9738519191741943)):
        table = normal_float_table(bits)
        assert len(table) == 2**bits and float(table[-1]) == 1.0
        assert [float(x) for x in table[:3]] == first
        assert float(table[len(table) // 2]) == middle and float(table[-2]) == second_last


def test_loftq_config_checks_run_as_peft_orders_them(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "scipy" else object())
    with pytest.raises(LoftQNeedsScipy):  # before the missing config, as peft 0.15 - 0.21 check
        check_config(None)
    monkeypatch.undo()
    if HAS_SCIPY:
        with pytest.raises(InvalidConfig) as raised:
            check_config({})
        assert raised.value.kind == "loftq_config_missing"
    assert classify_error(ImportError("The required package 'scipy' is not installed. Please install it to continue.")) \
        == ("ImportError", "loftq_needs_scipy")


@pytest.mark.parametrize("bits, steps", [(2, 1), (8, 1), (2, 3)])
def test_loftq_quantizes_the_base_and_fits_the_error_without_the_scaling(bits, steps):
    config = (("loftq_bits", bits), ("loftq_iter", steps))
    layer, original = _layer("loftq", loftq=config)
    a, b = layer.lora_A["default"].weight.detach(), layer.lora_B["default"].weight.detach()
    held = layer.base_layer.weight.detach()
    blocks = held.flatten().reshape(-1, 64)
    assert max(len(torch.unique(x)) for x in blocks) <= 2**bits
    error = original - held
    u, s, vh = torch.linalg.svd(error, full_matrices=False)
    torch.testing.assert_close(b @ a, (u[:, :4] * s[:4]) @ vh[:4], atol=1e-5, rtol=0)  # not divided by the scaling
    again = loftq_factors(original, 4, dict(config), NORMAL_FLOAT)
    assert torch.equal(again[2], held) and torch.equal(again[0], a)  # deterministic


def test_loftq_refuses_bits_and_iterations_the_era_has_not():
    for config, kind in (((("loftq_bits", 3), ("loftq_iter", 1)), "loftq_bits"),
                         ((("loftq_bits", 2), ("loftq_iter", 0)), "loftq_iter")):
        with pytest.raises(InvalidConfig) as raised:
            _layer("loftq", loftq=config)
        assert raised.value.kind == kind
    with pytest.raises(InvalidConfig) as raised:
        loftq_factors(torch.randn(3, 5), 2, {"loftq_bits": 2, "loftq_iter": 1}, NORMAL_FLOAT)
    assert raised.value.kind == "loftq_block_size"
    assert dict(PROFILES["current"].loftq_quantizers) == {4: "nf4", 8: "int8"}
    assert dict(PROFILES["seed"].loftq_quantizers) == dict(NORMAL_FLOAT)


def test_loftq_bitsandbytes_quantizers_need_cuda_as_upstream_does():
    if torch.cuda.is_available():
        pytest.skip("CUDA is available")
    with pytest.raises(Exception) as raised:
        loftq_factors(torch.randn(32, 64), 2, {"loftq_bits": 4, "loftq_iter": 1}, NORMAL_FLOAT)
    assert getattr(raised.value, "kind", None) == "loftq_needs_cuda"
    try:
        torch.zeros(1).cuda()
    except Exception as exc:  # torch's own error, which upstream raises: the same builtin class and kind
        assert classify_error(exc) == (builtin_class(raised.value), "loftq_needs_cuda")


# -- the numerical checks find each planted fault -------------------------------------------------------

class _Net(nn.Module):
    def __init__(self, layer: nn.Module):
        super().__init__()
        self.proj = layer


def _problems(init: object, corrupt=None, loftq=(), fan_in_fan_out: bool = False, out: int = 32) -> list[str]:
    layer, original = _layer(init, fan_in_fan_out, loftq=loftq, out=out)
    loaded = nn.Linear(64, out)
    loaded.weight = nn.Parameter(original.clone())
    if corrupt is not None:
        with torch.no_grad():
            corrupt(layer)
    bits = dict(loftq).get("loftq_bits")
    return init_problems(_Net(layer), init, _Net(loaded), loftq_bits=bits).get("proj", [])


LOFTQ = (("loftq_bits", 2), ("loftq_iter", 1))


def _swap(m):
    """LoftQ's L and R given to the wrong factors (transposed to fit a square weight): B A = (L R)^T."""
    a, b = m.lora_A["default"].weight, m.lora_B["default"].weight
    a_new, b_new = b.detach().T.clone(), a.detach().T.clone()
    a.copy_(a_new)
    b.copy_(b_new)


def _unscaled_pissa(m):
    """pissa_niter with the scaling left out of the singular values (the residual kept consistent)."""
    s = m.scaling["default"]
    a, b = m.lora_A["default"].weight, m.lora_B["default"].weight
    m.base_layer.weight.add_(s * b @ a)
    a.mul_(s ** 0.5)
    b.mul_(s ** 0.5)
    m.base_layer.weight.sub_(s * b @ a)


@pytest.mark.parametrize("init, loftq", [("pissa_niter_0", ()), ("pissa_niter_3", ()), ("loftq", LOFTQ),
                                         ("loftq", (("loftq_bits", 8), ("loftq_iter", 2)))])
def test_clean_inits_have_no_problems(init, loftq):
    assert _problems(init, loftq=loftq) == []
    assert _problems(init, loftq=loftq, fan_in_fan_out=True) == []


@pytest.mark.parametrize("init, corrupt, found", [
    # the residual not subtracted: the base keeps W
    ("pissa_niter_2", lambda m: m.base_layer.weight.add_(m.scaling["default"] * m.lora_B["default"].weight
                                                         @ m.lora_A["default"].weight), "not the loaded weight"),
    ("pissa_niter_2", _unscaled_pissa, "exceed the top singular values"),
    ("pissa_niter_2", lambda m: m.lora_A["default"].weight.mul_(2.0), "A A^T != B^T B"),
    # LoftQ: the factors swapped (A <- B^T, B <- A^T of a square-ish fit), the base not quantized, scaled by 1/scaling
    ("loftq", _swap, "truncation error"),
    ("loftq", lambda m: m.base_layer.weight.add_(m.lora_B["default"].weight @ m.lora_A["default"].weight),
     "distinct values"),
    ("loftq", lambda m: (m.lora_A["default"].weight.div_(m.scaling["default"] ** 0.5),
                         m.lora_B["default"].weight.div_(m.scaling["default"] ** 0.5)), "truncation error"),
    ("loftq", lambda m: m.lora_B["default"].weight.mul_(1.5), "A A^T != B^T B"),
])
def test_each_broken_property_is_found(init, corrupt, found):
    problems = _problems(init, corrupt, loftq=LOFTQ if init == "loftq" else (), out=64 if corrupt is _swap else 32)
    assert any(found in p for p in problems), problems


def test_a_wrong_niter_is_not_seen_by_the_properties():
    """Any K gives factors with the same properties: a wrong K (or a different draw) is not a
    divergence the checks can see; the count's parsing is compared through the error kinds."""
    assert _problems("pissa_niter_0") == [] and _problems("pissa_niter_4") == []


# -- faults planted into upstream -------------------------------------------------------------------------

def _llama(init: str, quant: QuantSpec = QuantSpec(), **adapter) -> Case:
    return Case(ModelSpec("llama", num_layers=2), quant,
                AdapterSpec(r=4, target_modules=("q_proj", "v_proj"), init_lora_weights=init, task_type="CAUSAL_LM",
                            **adapter),
                TrainingSpec(prepare_kbit=quant.quantized))


NITER = [_llama("pissa_niter_2"), _llama("pissa_niter_0", lora_alpha=32, use_rslora=True)]


def test_clean_pissa_niter_and_loftq_cases_agree():
    from conformance.engine.runner import run_case

    for case in (*NITER, _llama("pissa_niter_x"), _llama("pissa_niter_1", QuantSpec(kind="8bit")),
                 _llama("loftq", loftq_config=LOFTQ), _llama("loftq")):
        outcome = run_case(case, PROFILE)
        assert outcome.status in ("agree", "known"), (case.dumps(), outcome.divergences)
        assert set(outcome.known) <= {"loraconfig-mutated-in-place"}, outcome.known


def _wrap_pissa(monkeypatch, after) -> None:
    from peft.tuners.lora.layer import LoraLayer

    original = LoraLayer.pissa_init

    def faulty(self, adapter_name, init_lora_weights):
        out = original(self, adapter_name, init_lora_weights)
        with torch.no_grad():
            after(self, adapter_name)
        return out

    monkeypatch.setattr(LoraLayer, "pissa_init", faulty)


def test_catches_pissa_niter_without_the_residual(monkeypatch):
    """The base keeps W (the residual's value is not compared for a drawn SVD: the init check
    sees W + s*B@A != W on upstream's side)."""
    def restore(layer, name):
        base = layer.get_base_layer()
        base.weight.add_(layer.scaling[name] * layer.lora_B[name].weight @ layer.lora_A[name].weight)

    _wrap_pissa(monkeypatch, restore)
    assert_caught([NITER[0]], {"numerics.init"})


def test_catches_pissa_niter_with_the_scaling_left_in(monkeypatch):
    def rescale(layer, name):
        _unscaled_pissa(_Proxy(layer, name))

    _wrap_pissa(monkeypatch, rescale)
    assert_caught(NITER, {"numerics.init"})


class _Proxy:
    """An upstream LoRA layer seen through the reference's attribute names for adapter ``name``."""

    def __init__(self, layer, name):
        self.scaling = {"default": layer.scaling[name]}
        self.lora_A = {"default": layer.lora_A[name]}
        self.lora_B = {"default": layer.lora_B[name]}
        self.base_layer = layer.get_base_layer()


def test_strategies_keep_loftq_where_the_reference_models_it():
    """LoftQ is drawn on Linear targets only: never on a Conv1D type (gpt2) nor beside LoRA on an
    embedding (``strategies.inits.loftq_modelled``), but a config-time refusal still is."""
    from strategies import cases, sample
    from strategies.inits import init_variant, loftq_modelled

    current = PROFILES["current"]
    drawn = sample(cases(model_types=("gpt2", "llama"), quant_kinds=("none",), profile=current, init="loftq"), 60, 5)
    loftq = [c for c in drawn if init_variant(c.adapter.init_lora_weights) == "loftq"]
    assert any(c.model.model_type == "llama" for c in loftq)
    for c in loftq:
        if c.invalid:
            continue
        assert c.model.model_type != "gpt2", c
        assert loftq_modelled(c.model.model_type, ("embed_tokens",), c.adapter.target_modules), c
    assert not loftq_modelled("llama", ("embed_tokens",), ("q_proj", "embed_tokens"))
    assert not loftq_modelled("llama", ("embed_tokens",), r".*\.(embed_tokens|q_proj)")
    assert loftq_modelled("llama", ("embed_tokens",), "all-linear") and not loftq_modelled("gpt2", ("wte",), "all-linear")
