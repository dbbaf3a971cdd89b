"""DoRA (``use_dora``): the reference's rules, faults planted into upstream that the checks catch,
and the narrowness of the QDoRA 8-bit entry.

The reference tests need no peft; the fault tests wrap upstream's ``get_peft_model`` or its DoRA
layer and must see the example diverge in the field the fault changes.
"""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch
from torch import nn

from conformance.engine.diff import Divergence
from conformance.engine.features import CaseContext
from conformance.engine.known import default_registry, load_registry
from conformance.engine.runner import run_case
from fault_kit import PROFILE, REPO, after_get_peft_model, assert_caught
from reference import errors, select_profile
from reference.config import resolve
from reference.layers import AdapterParams, LoraEmbedding, LoraLinear
from reference.merge import merge_and_unload
from reference.spec import AdapterSpec, Case, ModelSpec, QuantSpec, TrainingSpec

pytest_plugins = ["pytester"]

QKVO = ("q_proj", "k_proj", "v_proj", "o_proj")

FROZEN_MAGNITUDE_CONFTEST = '''
"""Injects a fault into upstream peft at import: DoRA magnitudes end up frozen (after peft marks
what trains; a magnitude frozen at creation is marked trainable again)."""
from peft.tuners.lora.model import LoraModel

_original = LoraModel._mark_only_adapters_as_trainable


def _faulty(self, model):
    _original(self, model)
    for name, param in model.named_parameters():
        if "lora_magnitude_vector" in name:
            param.requires_grad_(False)


LoraModel._mark_only_adapters_as_trainable = _faulty
'''


def _dora(r: int = 4, dropout: float = 0.0, init: object = True, dtype: torch.dtype = torch.float32) -> AdapterParams:
    return AdapterParams(r=r, alpha=8, dropout=dropout, use_rslora=False, init=init, lora_bias=False,
                         autocast=dtype == torch.float32, use_dora=True)


def _linear(dtype: torch.dtype = torch.float32, fan_in_fan_out: bool = False, **kw) -> LoraLinear:
    torch.manual_seed(0)
    base = nn.Linear(16, 8, bias=True).to(dtype)
    layer = LoraLinear(base, 16, 8, fan_in_fan_out)
    layer.add_adapter("default", _dora(dtype=dtype, **kw))
    return layer


# -- the reference --------------------------------------------------------------------------------


def test_magnitude_starts_at_the_row_norms_and_trains():
    layer = _linear(init=False)  # B is not zero: the norm includes the update
    w = layer.base_layer.weight.detach().double()
    a, b = layer.lora_A["default"].weight.double(), layer.lora_B["default"].weight.double()
    m = layer.lora_magnitude_vector["default"].weight
    assert m.shape == (8,) and m.requires_grad and m.dtype == torch.float32
    expected = torch.linalg.norm(w + layer.scaling["default"] * b @ a, dim=1)
    torch.testing.assert_close(m.detach().double(), expected, rtol=1e-6, atol=0)


def test_forward_is_the_magnitude_times_the_normalised_weight():
    """Without dropout: ``(m / ||V||) V x + bias`` with ``V = W + scaling B A``; with default init the
    layer's output is the base layer's (m = ||W||)."""
    layer = _linear(init=False)
    with torch.no_grad():
        layer.lora_magnitude_vector["default"].weight.mul_(torch.linspace(0.5, 1.5, 8))
    x = torch.randn(3, 16)
    base = layer.base_layer
    v = base.weight + layer.scaling["default"] * layer.lora_B["default"].weight @ layer.lora_A["default"].weight
    m = layer.lora_magnitude_vector["default"].weight
    expected = x @ ((m / torch.linalg.norm(v, dim=1))[:, None] * v).T + base.bias
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-6)
    fresh = _linear()
    torch.testing.assert_close(fresh(x), fresh.base_layer(x), rtol=1e-6, atol=1e-6)


def test_norm_is_a_constant_for_the_gradient():
    """The paper's section 4.3: the magnitude gets the gradient of ``m / n`` with n detached."""
    layer = _linear(init=False)
    x = torch.randn(3, 16)
    layer(x).sum().backward()
    base = layer.base_layer
    v = (base.weight + layer.scaling["default"] * layer.lora_B["default"].weight @ layer.lora_A["default"].weight).detach()
    n = torch.linalg.norm(v, dim=1)
    expected = ((x @ v.T) / n).sum(0)
    torch.testing.assert_close(layer.lora_magnitude_vector["default"].weight.grad, expected, rtol=1e-5, atol=1e-6)


def test_conv1d_layout_takes_norms_per_output_feature():
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    base = Conv1D(8, 16)  # weight (in=16, out=8)
    layer = LoraLinear(base, 16, 8, fan_in_fan_out=True)
    layer.add_adapter("default", _dora())
    m = layer.lora_magnitude_vector["default"].weight
    torch.testing.assert_close(m.detach(), torch.linalg.norm(base.weight.detach().T, dim=1), rtol=1e-6, atol=0)


def test_embedding_magnitude_is_per_embedding_dimension_over_the_vocabulary():
    torch.manual_seed(0)
    base = nn.Embedding(32, 8)
    layer = LoraEmbedding(base)
    layer.add_adapter("default", _dora(init=False))
    a, b = layer.lora_embedding_A["default"].double(), layer.lora_embedding_B["default"].double()
    m = layer.lora_magnitude_vector["default"].weight
    assert m.shape == (8,)
    expected = torch.linalg.norm(base.weight.double() + layer.scaling["default"] * (b @ a).T, dim=0)
    torch.testing.assert_close(m.detach().double(), expected, rtol=1e-6, atol=0)
    ids = torch.tensor([[1, 2, 3]])
    v = base.weight + layer.scaling["default"] * (layer.lora_embedding_B["default"] @ layer.lora_embedding_A["default"]).T
    expected_out = nn.functional.embedding(ids, v) * (m / torch.linalg.norm(v, dim=0))
    torch.testing.assert_close(layer(ids), expected_out, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("weight, factors, magnitude", [
    (torch.float32, torch.bfloat16, torch.float32),  # an fp32 4-bit model with bf16 storage, autocast off
    (torch.bfloat16, torch.bfloat16, torch.bfloat16),
    (torch.bfloat16, torch.float16, torch.float32),  # bf16 + fp16 promote to fp32
    (torch.float16, torch.float32, torch.float32),
])
def test_magnitude_dtype_is_the_promotion_of_weight_and_factors(weight, factors, magnitude):
    from reference import dora

    assert dora.magnitude_dtype(nn.Linear(4, 4).to(weight), factors) == magnitude


def test_dora_with_lora_bias_is_rejected_after_the_init_check():
    with pytest.raises(errors.InvalidConfig) as caught:
        resolve(AdapterSpec(use_dora=True, lora_bias=True), select_profile("current"))
    assert caught.value.kind == "dora_lora_bias"
    with pytest.raises(errors.InvalidConfig) as caught:
        resolve(AdapterSpec(use_dora=True, lora_bias=True, init_lora_weights="gaussian"), select_profile("current"))
    assert caught.value.kind == "lora_bias_init"


def test_merge_folds_the_magnitude_in():
    """A merged DoRA layer computes what the unmerged one did."""

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = _linear(init=False)

        def forward(self, x):
            return self.proj(x)

    net = Net()
    with torch.no_grad():
        net.proj.lora_magnitude_vector["default"].weight.mul_(1.3)
    x = torch.randn(3, 16)
    before = net(x).detach()
    merge_and_unload(net)
    assert isinstance(net.proj, nn.Linear)
    torch.testing.assert_close(net(x), before, rtol=1e-5, atol=1e-6)


# -- faults planted into upstream --------------------------------------------------------------------


def _llama(quant: QuantSpec, **adapter) -> Case:
    return Case(ModelSpec("llama", num_layers=2), quant,
                AdapterSpec(r=4, target_modules=QKVO, use_dora=True, task_type="CAUSAL_LM", **adapter),
                TrainingSpec(prepare_kbit=quant.quantized))


DORA_CASES = [
    _llama(QuantSpec()),
    _llama(QuantSpec(kind="4bit", compute_dtype="bfloat16")),
    _llama(QuantSpec(), lora_dropout=0.1, init_lora_weights=False),
    Case(ModelSpec("gpt2", num_layers=1), QuantSpec(), AdapterSpec(r=4, target_modules=("c_attn",), use_dora=True),
         TrainingSpec(prepare_kbit=False)),
]


def _after_get_peft_model(monkeypatch, corrupt) -> None:
    after_get_peft_model(monkeypatch, lambda peft_model, _config: corrupt(peft_model))


def _magnitudes(peft_model):
    return [p for n, p in peft_model.named_parameters() if "lora_magnitude_vector" in n]


def test_clean_dora_cases_agree():
    for case in DORA_CASES:
        outcome = run_case(case, PROFILE)
        assert outcome.status in ("agree", "known"), (case.dumps(), outcome.divergences)
        assert set(outcome.known) <= {"loraconfig-mutated-in-place"}, outcome.known


def test_catches_a_frozen_magnitude(monkeypatch):
    _after_get_peft_model(monkeypatch, lambda pm: [p.requires_grad_(False) for p in _magnitudes(pm)])
    assert_caught(DORA_CASES, {"requires_grad"}, path=r".*lora_magnitude_vector\.default\.weight")


def test_catches_a_magnitude_initialised_to_ones(monkeypatch):
    def ones(pm):
        with torch.no_grad():
            for p in _magnitudes(pm):
                p.fill_(1.0)

    _after_get_peft_model(monkeypatch, ones)
    assert_caught(DORA_CASES, {"numerics.init"})


def test_catches_a_magnitude_initialised_without_the_update(monkeypatch):
    """With init_lora_weights=False, B is not zero: the norm must include scaling B A."""
    def without_update(pm):
        with torch.no_grad():
            for module in pm.modules():
                if hasattr(module, "lora_magnitude_vector") and "default" in module.lora_magnitude_vector:
                    w = module.get_base_layer().weight
                    module.lora_magnitude_vector["default"].weight.copy_(torch.linalg.norm(w.float(), dim=1))

    _after_get_peft_model(monkeypatch, without_update)
    assert_caught([DORA_CASES[2]], {"numerics.init"})


def test_catches_a_forward_with_a_wrong_norm(monkeypatch):
    """Numbers only: structure and initial magnitudes agree, the forward's norms are 25 % too large."""
    from peft.tuners.lora import dora

    in_forward = []
    forward, norm = dora.DoraLinearLayer.forward, dora.DoraLinearLayer.get_weight_norm

    def faulty_forward(self, *args, **kwargs):
        in_forward.append(True)
        try:
            return forward(self, *args, **kwargs)
        finally:
            in_forward.pop()

    def faulty_norm(self, *args, **kwargs):
        out = norm(self, *args, **kwargs)
        return out * 1.25 if in_forward else out

    monkeypatch.setattr(dora.DoraLinearLayer, "forward", faulty_forward)
    monkeypatch.setattr(dora.DoraLinearLayer, "get_weight_norm", faulty_norm)
    assert_caught(DORA_CASES, {"numerics.logits", "numerics.train_logits", "numerics.grad", "numerics.train_grad",
                               "numerics.init_output"})
    # where the init output is not checked (init_lora_weights=False), the forward passes catch it
    assert_caught([DORA_CASES[2]], {"numerics.logits", "numerics.train_logits"})


# -- the QDoRA 8-bit entry is narrow ---------------------------------------------------------------

QDORA_ID = "qdora-8bit-cpu-weight-loses-int8-scales"
QDORA_8BIT = _llama(QuantSpec(kind="8bit"))


def test_qdora_entry_needs_dora_on_8bit_on_the_cpu_and_its_message():
    registry = load_registry(versions={"peft": "0.21.2", "bitsandbytes": "0.50.2"})
    assert QDORA_ID in {e.id for e in registry.active}
    assert QDORA_ID not in {e.id for e in load_registry(versions={"peft": "0.15.2", "bitsandbytes": "0.47.0"}).active}
    lost = Divergence("<model>", "numerics.train_forward", "ok", "AttributeError: 'NoneType' object has no attribute 'unsqueeze'")

    def left(case: Case, d: Divergence = lost) -> list:
        return registry.explain(CaseContext(case), [d])[0]

    assert left(QDORA_8BIT) == []
    assert left(dataclasses.replace(QDORA_8BIT, adapter=dataclasses.replace(QDORA_8BIT.adapter, use_dora=False))) == [lost]
    assert left(dataclasses.replace(QDORA_8BIT, quant=QuantSpec(kind="4bit"))) == [lost]
    assert left(dataclasses.replace(QDORA_8BIT, training=dataclasses.replace(QDORA_8BIT.training, device="cuda"))) == [lost]
    other = Divergence("<model>", "numerics.train_forward", "ok", "RuntimeError: CUDA error")
    assert left(QDORA_8BIT, other) == [other]
    logits = Divergence("<model>", "numerics.logits", "max|ref| 1", "max|up-ref| 1 > tol 1e-4 (fp32)")
    assert left(QDORA_8BIT, logits) == [logits]


def test_qdora_entry_does_not_excuse_a_wrong_magnitude(monkeypatch):
    """In scope, the magnitude's init is still checked (before any forward): a fault there fails."""
    if QDORA_ID not in {e.id for e in default_registry().active}:
        pytest.skip(f"{QDORA_ID} does not apply to the installed stack")

    def ones(pm):
        with torch.no_grad():
            for p in _magnitudes(pm):
                p.fill_(1.0)

    _after_get_peft_model(monkeypatch, ones)
    outcome = run_case(QDORA_8BIT, PROFILE)
    assert outcome.status == "diverge" and any(d.field == "numerics.init" for d in outcome.divergences), \
        (outcome.status, outcome.divergences)


# -- the real suite ------------------------------------------------------------------------------------


def _run_dora_cells(pytester: pytest.Pytester, conftest: str | None) -> pytest.RunResult:
    pytester.makepyfile(test_conformance=(REPO / "conformance" / "test_conformance.py").read_text())
    if conftest is not None:
        pytester.makeconftest(conftest)
    args = ["-p", "no:cacheprovider", "-q", "--conformance-examples", "5", "--hypothesis-seed", "3", "-k", "dora"]
    if os.environ.get("PYTEST_DISABLE_PLUGIN_AUTOLOAD"):
        args = ["-p", "conformance.plugin", "-p", "_hypothesis_pytestplugin", *args]
    return pytester.runpytest_subprocess(*args, timeout=600)


def test_the_dora_cells_fail_on_a_frozen_magnitude_and_pass_clean(pytester):
    """The DoRA cells exist in every run (coverage by construction): with upstream's magnitudes
    created frozen they fail, with a replay command; on the same seed without the fault they pass."""
    from strategies.coverage import cells

    faulty = _run_dora_cells(pytester, FROZEN_MAGNITUDE_CONFTEST)
    out = faulty.stdout.str()
    assert faulty.ret == pytest.ExitCode.TESTS_FAILED, out[-3000:]
    assert "lora_magnitude_vector" in out and "requires_grad" in out and "replay this case" in out, out[-3000:]
    (pytester.path / "conftest.py").unlink()
    clean = _run_dora_cells(pytester, None)
    assert clean.ret == pytest.ExitCode.OK, clean.stdout.str()[-3000:]
    pinned = [c for level in ("peft", "trl") for c in cells(level) if c.adapter_feature == "dora"]
    clean.assert_outcomes(passed=len(pinned), deselected=None)


AUTOCAST_DORA = Case(
    ModelSpec("olmo", "CAUSAL_LM", num_layers=3),
    adapter=AdapterSpec(target_modules="all-linear", use_dora=True, use_rslora=True, init_lora_weights=False,
                        task_type="CAUSAL_LM"),
    training=TrainingSpec(level="trl", bf16=True, prepare_kbit=False),
)
"""Found by the seed-3 suite run at 150 examples: a bf16-autocast DoRA gradient 1.2 tolerances
off, because the reference rounded the scaled ``B @ A`` of the weight norm to bf16 where peft
>= 0.19 scales it in the input's dtype (``Profile.dora_norm_update_in_input_dtype``)."""


def _layer_pair(update_in_dtype: bool):
    import copy

    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(64, 64, bias=False))
    up = get_peft_model(copy.deepcopy(base), LoraConfig(r=8, lora_alpha=8, target_modules=["0"], use_dora=True,
                                                         use_rslora=True, init_lora_weights=False))
    ul = up.base_model.model[0]
    rl = LoraLinear(copy.deepcopy(base[0]), 64, 64, False)
    rl.add_adapter("default", AdapterParams(r=8, alpha=8, dropout=0.0, use_rslora=True, init=False, lora_bias=False,
                                            autocast=True, use_dora=True, dora_norm_update_in_input_dtype=update_in_dtype))
    with torch.no_grad():
        for part in ("lora_A", "lora_B", "lora_magnitude_vector"):
            getattr(rl, part)["default"].weight.copy_(getattr(ul, part)["default"].weight)
    return ul, rl


def _autocast_grads(layer, x):
    layer.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    (y.float() ** 2).sum().backward()
    return y.detach(), layer.lora_B["default"].weight.grad.clone()


def test_dora_under_bf16_autocast_is_bit_exact_with_the_installed_peft():
    rule = PROFILE.dora_norm_update_in_input_dtype
    x = torch.randn(4, 64)
    ul, rl = _layer_pair(rule)
    (uy, ug), (ry, rg) = _autocast_grads(ul, x), _autocast_grads(rl, x)
    assert torch.equal(uy, ry) and torch.equal(ug, rg)
    # the nearest fault: the other era's rounding of the scaled update
    _, wrong = _layer_pair(not rule)
    wy, wg = _autocast_grads(wrong, x)
    assert not (torch.equal(uy, wy) and torch.equal(ug, wg))
    outcome = run_case(AUTOCAST_DORA, PROFILE)
    assert outcome.status in ("agree", "known") and outcome.numerics["max_error_in_tolerances"] == 0.0, \
        (outcome.divergences, outcome.numerics)
