"""Unit tests of the numerical checks (conformance.numerics and its helpers)."""

from __future__ import annotations

import dataclasses
import math
import os

import pytest
import torch
from torch import nn

from conformance import numerics
from conformance.engine.models import load_model
from conformance.numerics import TOLERANCES, tolerance_for
from conformance.engine.runner import same_structure
from conformance.engine.snapshot import ErrorFacts, ModelFacts, ParamFacts, Snapshot
from conformance.numerics.init import init_problems, mean_square_bounds_normal, mean_square_bounds_uniform
from conformance.numerics.run import bypassed, case_seed, lora_layers, make_inputs, run_model
from conformance.engine.runner import cache_dir, run_case
from reference import prepare, select_profile
from reference.spec import AdapterSpec, Case, ModelSpec, QuantSpec, TrainingSpec

pytest_plugins = ["pytester"]

PROFILE = select_profile()
NO_KBIT = TrainingSpec(prepare_kbit=False)


def _case(**adapter) -> Case:
    spec = dict(r=4, target_modules=("q_proj", "v_proj"))
    spec.update(adapter)
    return Case(ModelSpec("llama", "CAUSAL_LM", num_layers=2), adapter=AdapterSpec(**spec), training=NO_KBIT)


def _prepared(case: Case) -> nn.Module:
    return prepare(load_model(case.model, case.quant, cache_dir()), case.adapter, case.training, PROFILE)


# -- statistical bounds --------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [8, 64, 1024, 65536])
def test_normal_bounds_hold_for_correct_draws_and_reject_a_doubled_std(n):
    g = torch.Generator().manual_seed(n)
    lo, hi = mean_square_bounds_normal(n, 0.25)
    for _ in range(200):  # 200 independent draws: a correct init never leaves the bounds
        ms = float((torch.randn(n, generator=g, dtype=torch.float64) * 0.25).pow(2).mean())
        assert lo <= ms <= hi
    if n >= 1024:
        assert float((torch.randn(n, generator=g, dtype=torch.float64) * 0.5).pow(2).mean()) > hi


@pytest.mark.parametrize("n", [64, 4096])
def test_uniform_bounds_hold_for_correct_draws(n):
    g = torch.Generator().manual_seed(n)
    b = 1 / math.sqrt(64)
    lo, hi = mean_square_bounds_uniform(n, b)
    for _ in range(200):
        ms = float(((torch.rand(n, generator=g, dtype=torch.float64) * 2 - 1) * b).pow(2).mean())
        assert lo <= ms <= hi
    assert lo < b**2 / 3 < hi


# -- init properties ------------------------------------------------------------------------------------


@pytest.mark.parametrize("init", [True, "gaussian", False])
def test_reference_init_satisfies_the_properties(init):
    case = _case(init_lora_weights=init, target_modules=("q_proj", "v_proj", "embed_tokens"))
    assert init_problems(_prepared(case), init) == {}


def test_lora_bias_must_be_zero_at_init():
    model = _prepared(_case(lora_bias=True))
    assert init_problems(model, True) == {}
    path, layer = lora_layers(model)[0]
    with torch.no_grad():
        layer.lora_B["default"].bias.fill_(0.01)
    assert "bias is not zero" in " ".join(init_problems(model, True)[path])


def test_broken_inits_are_named():
    model = _prepared(_case())
    path, layer = lora_layers(model)[0]
    with torch.no_grad():
        layer.lora_A["default"].weight.mul_(3)
    assert "kaiming-uniform bound" in " ".join(init_problems(model, True)[path])
    model = _prepared(_case(init_lora_weights=False))
    path, layer = lora_layers(model)[0]
    with torch.no_grad():
        layer.lora_B["default"].weight.zero_()
    assert "B is all zero" in " ".join(init_problems(model, False)[path])


# -- tolerances ------------------------------------------------------------------------------------------


def test_tolerance_follows_the_loosest_precision():
    assert tolerance_for(nn.Linear(2, 2)).name == "fp32"
    assert tolerance_for(nn.Linear(2, 2).to(torch.bfloat16)).name == "bf16"
    assert tolerance_for(nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2).half())).name == "fp16"
    assert set(TOLERANCES) == {"fp32", "fp16", "bf16", "int8"}
    assert TOLERANCES["fp32"].rtol < TOLERANCES["fp16"].rtol <= TOLERANCES["bf16"].rtol
    for tol in TOLERANCES.values():
        assert len(tol.why.split()) >= 10


@pytest.mark.parametrize("quant, expected", [
    (QuantSpec(kind="8bit"), "int8"),
    (QuantSpec(kind="4bit", compute_dtype="bfloat16"), "bf16"),
    (QuantSpec(kind="4bit", compute_dtype="float32"), "fp32"),
])
def test_tolerance_of_quantized_models(quant, expected):
    model = load_model(ModelSpec("llama", num_layers=1), quant, cache_dir())
    assert tolerance_for(model).name == expected


# -- determinism and mechanics -----------------------------------------------------------------------------


def test_seed_and_runs_leave_the_global_rng_alone():
    case = _case(lora_dropout=0.1)
    assert case_seed(case) == case_seed(Case.loads(case.dumps())) != case_seed(case, "x")
    model = _prepared(case)
    inputs = make_inputs(case, model, case_seed(case))
    state = torch.get_rng_state()
    modes = [m.training for m in model.modules()]
    a = run_model(model, inputs, train=True, seed=7)
    b = run_model(model, inputs, train=True, seed=7)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(a.logits, b.logits) and torch.equal(a.loss, b.loss)
    c = run_model(model, inputs, train=True, seed=8)
    b_grad = next(k for k in a.grads if "lora_B" in k)  # B is zero at init: the masks show in B's gradient
    assert not torch.equal(a.grads[b_grad], c.grads[b_grad])  # dropout is really active in training mode
    assert [m.training for m in model.modules()] == modes  # modes restored


def test_bypassed_restores_the_lora_layers():
    model = _prepared(_case())
    before = [m for _, m in lora_layers(model)]
    with bypassed(model):
        assert lora_layers(model) == []
    assert [m for _, m in lora_layers(model)] == before


def test_same_structure_pairs_every_tensor():
    a = Snapshot(params=(ParamFacts("w", (2, 2), "float32", True, "plain"),), model=_MODEL)
    assert same_structure(a, a)
    assert same_structure(a, Snapshot(params=(ParamFacts("w", (2, 2), "bfloat16", False, "plain"),), model=_MODEL))
    assert not same_structure(a, Snapshot(params=(ParamFacts("w", (2, 3), "float32", True, "plain"),), model=_MODEL))
    assert not same_structure(a, Snapshot(params=(ParamFacts("v", (2, 2), "float32", True, "plain"),), model=_MODEL))
    assert not same_structure(a, Snapshot(error=ErrorFacts("ValueError", "x")))


_MODEL = ModelFacts(False, False, False, False, 4, 4)


# -- in the differential step ------------------------------------------------------------------------------


def test_run_case_records_numerics_and_respects_the_switch(monkeypatch):
    case = _case(lora_alpha=16, lora_dropout=0.05)
    on = run_case(case, PROFILE, numerics=True)
    assert on.status == "agree" and on.numerics["tolerance"] == "fp32"
    assert on.to_json()["numerics"]["max_error_in_tolerances"] <= 1
    assert run_case(case, PROFILE, numerics=False).numerics is None
    monkeypatch.setattr(numerics, "_ENABLED", None)
    monkeypatch.setenv("CONFORMANCE_NUMERICS", "off")
    assert not numerics.enabled()
    numerics.configure(True)
    assert numerics.enabled()


def test_a_numeric_divergence_fails_like_a_structural_one(monkeypatch):
    """A corrupted upstream value becomes an unexpected divergence with a numerics field."""
    import conformance.engine.runner as runner

    original = runner._upstream_prepared

    def corrupted(case, raw=None):
        snap, model = original(case, raw)
        for m in model.modules():  # scale every base q_proj weight: the snapshot cannot see it
            if hasattr(m, "base_layer") and hasattr(m, "lora_A"):
                with torch.no_grad():
                    m.base_layer.weight.mul_(1.5)
        return snap, model

    monkeypatch.setattr(runner, "_upstream_prepared", corrupted)
    outcome = run_case(_case(), PROFILE, numerics=True)
    assert outcome.status == "diverge"
    assert {d.field for d in outcome.divergences} >= {"numerics.logits", "numerics.loss"}
    assert all(d.field.startswith("numerics.") for d in outcome.divergences)
    assert "numerics." in str(outcome.to_json()["divergences"])


def test_plugin_option_is_validated(pytester):
    pytester.makepyfile("def test_nothing():\n    pass\n")
    args = ["-p", "conformance.plugin"] if os.environ.get("PYTEST_DISABLE_PLUGIN_AUTOLOAD") else []
    bad = pytester.runpytest_subprocess(*args, "--conformance-numerics=maybe")
    assert bad.ret == pytest.ExitCode.USAGE_ERROR
    assert "--conformance-numerics='maybe' is not one of on, off" in bad.stderr.str()
    off = pytester.runpytest_subprocess(*args, "--conformance-numerics=off")
    assert off.ret == pytest.ExitCode.OK and "numerics=off" in off.stdout.str()


def test_nan_never_passes():
    result = numerics.NumericsResult(tolerance="fp32")
    t = torch.tensor([1.0, float("nan")])
    numerics._compare("<model>", "numerics.logits", t, torch.tensor([1.0, 2.0]), TOLERANCES["fp32"], result)
    assert [d.reference for d in result.divergences] == ["non-finite: 1 nan, 0 inf"]
    # The same NaN on both sides is not a pass either: inconclusive (counted, fails strict mode).
    same = numerics.NumericsResult(tolerance="fp32")
    numerics._compare("<model>", "numerics.logits", t, t.clone(), TOLERANCES["fp32"], same)
    assert same.inconclusive and not same.divergences


def test_dataclass_of_result_serialises():
    result = numerics.NumericsResult(tolerance="bf16", max_rel_error=0.5, note="x")
    assert result.to_json() == {"tolerance": "bf16", "max_error_in_tolerances": 0.5, "note": "x"}
    assert dataclasses.is_dataclass(result)


def test_non_finite_values_never_pass_but_a_shared_overflow_is_inconclusive():
    from conformance.numerics import TOLERANCES, NumericsResult, _compare

    tol = TOLERANCES["fp32"]
    nan = float("nan")
    ref = torch.tensor([1.0, nan, 3.0])
    cases = {
        "one side": (ref, torch.tensor([1.0, 2.0, 3.0])),
        "other places": (ref, torch.tensor([nan, 2.0, 3.0])),
        "other infinity": (torch.tensor([float("inf"), 2.0]), torch.tensor([float("-inf"), 2.0])),
        "finite part differs": (ref, torch.tensor([1.0, nan, 4.0])),
    }
    for why, (r, u) in cases.items():
        result = NumericsResult()
        _compare("p", "numerics.grad", r, u, tol, result)
        assert result.divergences, why
    same = NumericsResult()
    _compare("p", "numerics.grad", ref, ref.clone(), tol, same)
    assert not same.divergences
    assert same.inconclusive == ["p numerics.grad: non-finite: 1 nan, 0 inf on both sides"]
    assert same.to_json()["inconclusive"] == same.inconclusive


def test_inconclusive_numerics_are_counted_and_fail_strict_mode():
    from conformance.plugin.report import strict_failures
    from conformance.plugin.summary import _numerics_line

    examples = [{"outcome": "agree", "numerics": {"tolerance": "int8", "max_error_in_tolerances": 0.0,
                                                  "inconclusive": ["p numerics.grad: ..."]}}]
    report = {"totals": {"examples": 1, "diverge": 0}, "examples": examples, "skips": {}}
    assert "inconclusive on 1" in _numerics_line(report)
    assert any("inconclusive numerics" in why for why in strict_failures(report, judge_stale=False))


# -- speed without change (issue 16) -------------------------------------------------------------------------


def test_seeding_one_device_draws_the_masks_torch_manual_seed_draws():
    """run_model seeds the generator of the model's device alone (``_seed``): the dropout masks
    are those ``torch.manual_seed`` gives, so both sides still share one stream."""
    from conformance.numerics.run import _seed

    drop = nn.Dropout(0.5).train()
    x = torch.ones(64, 64)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(123)
        expected = drop(x)
        _seed(123, torch.device("cpu"))
        assert torch.equal(drop(x), expected)


def test_the_upstream_only_yardstick_runs_the_passes_of_one_side(monkeypatch):
    """``one_side_passes`` (the benchmarks' yardstick) runs exactly the forwards and backwards
    ``check_numerics`` runs on each side: same train/backward/seed sequence, init output included."""
    import conformance.numerics as numerics_module
    from conformance.numerics.run import run_model as real_run_model

    calls: list[tuple[int, bool, bool, int]] = []

    def recording(model, inputs, *, train, seed, backward=True, autocast=None):
        calls.append((id(model), train, backward, seed))
        return real_run_model(model, inputs, train=train, seed=seed, backward=backward, autocast=autocast)

    monkeypatch.setattr(numerics_module, "run_model", recording)
    for case in (_case(lora_dropout=0.1), _case(init_lora_weights="gaussian")):
        calls.clear()
        reference, upstream = _prepared(case), _prepared(case)
        numerics_module.check_numerics(case, PROFILE, reference, upstream)
        per_side = [c[1:] for c in calls if c[0] == id(upstream)]
        assert per_side == [c[1:] for c in calls if c[0] == id(reference)]
        calls.clear()
        alone = _prepared(case)
        numerics_module.one_side_passes(case, PROFILE, alone)
        assert [c[1:] for c in calls] == per_side, case.adapter


# -- what this device cannot run ------------------------------------------------------------------------------


def test_cpu_autocast_refusing_float16_is_a_device_limit_and_nothing_else():
    """A float16 model trained with bf16 runs under the CPU's bf16 autocast, whose promote ops refuse
    float16: counted as not run (``base_raised``), never as agreement; any other exception, precision
    or load dtype stays a both-raised failure."""
    from conformance.numerics import CPU_AUTOCAST_HALF, NumericsResult, _device_limits

    trl_bf16 = Case(ModelSpec("mixtral", num_layers=1, load_dtype="float16"), adapter=AdapterSpec(target_modules=("k_proj",)),
                    training=TrainingSpec(level="trl", prepare_kbit=False, bf16=True))
    raised = f"eval forward: RuntimeError: {CPU_AUTOCAST_HALF}"

    def after(case: Case, autocast, *both: str) -> NumericsResult:
        result = NumericsResult(both_raised=list(both))
        _device_limits(case, autocast, result)
        return result

    moved = after(trl_bf16, torch.bfloat16, raised, "train_" + raised)
    assert moved.both_raised == [] and moved.base_raised.startswith("the CPU's bf16 autocast") and raised in moved.base_raised
    assert after(trl_bf16, torch.bfloat16, raised, "train_forward: RuntimeError: other").both_raised != []
    fp32_load = dataclasses.replace(trl_bf16, model=ModelSpec("mixtral", num_layers=1))
    assert after(fp32_load, torch.bfloat16, raised).both_raised == [raised]
    on_gpu = dataclasses.replace(trl_bf16, training=dataclasses.replace(trl_bf16.training, device="cuda"))
    assert after(on_gpu, torch.bfloat16, raised).both_raised == [raised]
    peft_level = dataclasses.replace(trl_bf16, training=TrainingSpec(prepare_kbit=False))
    assert after(peft_level, None, raised).both_raised == [raised]


def test_a_float16_moe_trained_with_bf16_on_the_cpu_is_counted_as_not_run():
    """The case seed 31337 found (150 examples, current stack): trl switches mixtral's router aux loss
    on, whose torch.cat of float16 router logits the CPU's bf16 autocast refuses, on both sides."""
    case = Case(ModelSpec("mixtral", num_layers=1, load_dtype="float16"),
                adapter=AdapterSpec(r=4, target_modules=("k_proj",), task_type="CAUSAL_LM"),
                training=TrainingSpec(level="trl", prepare_kbit=False, bf16=True))
    outcome = run_case(case, select_profile(), numerics=True)
    if outcome.numerics is None or not outcome.numerics.get("base_raised"):
        pytest.skip(f"this stack runs it: {outcome.numerics}")  # trl without the aux-loss switch (seed stack)
    assert "both_raised" not in outcome.numerics
    assert outcome.numerics["base_raised"].startswith("the CPU's bf16 autocast"), outcome.numerics
