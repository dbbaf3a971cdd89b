"""Fault injection for the numerical checks: faults that change numbers, never structure.

Each ``test_catches_*`` test monkeypatches one fault into upstream peft that leaves
every snapshot field as it was (same modules, shapes, dtypes, flags, scaling
attribute, zero/non-zero pattern of B), runs the differential step over the cases
that can expose it, and asserts that the case diverges on a ``numerics.*`` field
named by the test, and on no structural field.  With ``--conformance-numerics
off`` the same faults pass unseen: :func:`test_real_suite_needs_numerics_for_a_numbers_only_fault`
shows it end to end on the real suite.

Forward faults re-implement peft's LoRA forward (``base(x) + B(A(dropout(x))) * s``,
cast back to the base output's dtype) with one thing changed; init faults wrap
``LoraLayer.update_layer`` and corrupt the values it drew.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from typing import Callable, Iterable

import pytest
import torch
from torch.nn import functional as F

from conformance.engine.runner import Outcome, run_case
from fault_kit import GPT2, PROFILE, QLORA, QLORA_8BIT, REPO, _llama, candidates, wrap_update_layer
from reference.spec import ABSENT, AdapterSpec, Case

pytest_plugins = ["pytester"]

# -- scenarios that make sure each fault has a case that reaches it ----------------------------------

QV = ("q_proj", "v_proj")
LLAMA_SCALED = _llama(AdapterSpec(r=4, lora_alpha=16, target_modules=QV))
LLAMA_DROPOUT = _llama(AdapterSpec(r=4, lora_alpha=8, lora_dropout=0.1, target_modules=QV))
LLAMA_GAUSSIAN = _llama(AdapterSpec(r=8, init_lora_weights="gaussian", target_modules=QV))
LLAMA_LORA_BIAS = _llama(AdapterSpec(r=4, lora_bias=True, target_modules=QV))
# gpt2's attn.c_proj is a square Conv1D: a transposed update keeps its shape.
GPT2_C_PROJ = dataclasses.replace(GPT2, adapter=AdapterSpec(r=4, lora_alpha=16, target_modules=("c_proj",)))
QLORA_SCALED = dataclasses.replace(QLORA, adapter=dataclasses.replace(QLORA.adapter, lora_alpha=32))
QLORA_8BIT_SCALED = dataclasses.replace(QLORA_8BIT, adapter=dataclasses.replace(QLORA_8BIT.adapter, lora_alpha=32))
NUMERIC_SCENARIOS = (LLAMA_SCALED, LLAMA_DROPOUT, LLAMA_GAUSSIAN, LLAMA_LORA_BIAS, GPT2_C_PROJ, QLORA_SCALED,
                     QLORA_8BIT_SCALED)


def _get(value, default):
    return default if value is ABSENT or value is None else value


def _scale_not_one(case: Case) -> bool:
    a = case.adapter
    return (_get(a.lora_alpha, 8) != _get(a.r, 8) or a.use_rslora is True) and not a.rank_pattern


def _structural(outcome: Outcome) -> list[str]:
    return [f"{d.path}:{d.field}" for d in outcome.divergences if not d.field.startswith("numerics.")]


def assert_caught_numerically(cases: Iterable[Case], fields: set[str], *, budget_s: float = 90.0) -> Outcome:
    """Run ``cases`` until one diverges on a field of ``fields``; every divergence seen
    on the way must be numerical (the fault is invisible to the snapshots)."""
    started, tried = time.monotonic(), 0
    for case in cases:
        tried += 1
        outcome = run_case(case, PROFILE, numerics=True)
        if outcome.status != "diverge":
            continue
        assert not _structural(outcome), f"a structural field saw the fault: {_structural(outcome)}\n{case.dumps()}"
        hits = [d for d in outcome.divergences if d.field in fields]
        if hits:
            d = hits[0]
            print(f"caught by case #{tried}: {d.path} {d.field}: {d.reference!r} / {d.upstream!r}\n  {case.dumps()}")
            silent = run_case(case, PROFILE, numerics=False)
            assert silent.status != "diverge", "with numerics off the fault should be invisible"
            return outcome
        if time.monotonic() - started > budget_s:
            break
    pytest.fail(f"the fault was not caught in {sorted(fields)} after {tried} case(s)")


# -- re-implemented LoRA forwards ---------------------------------------------------------------------

Update = Callable[[torch.nn.Module, str, torch.Tensor], torch.Tensor]


def _lora_forward(update: Update) -> Callable:
    """peft's LoRA forward with the per-adapter update computed by ``update(layer, adapter, x)``."""

    def forward(self, x, *args, **kwargs):
        result = self.base_layer(x, *args, **kwargs)
        dtype = result.dtype
        for name in self.active_adapters:
            if name not in self.lora_A.keys():
                continue
            h = x.to(self.lora_A[name].weight.dtype)
            result = result + update(self, name, h).to(dtype)
        return result.to(dtype)

    return forward


def _correct(self, name, h):
    return self.lora_B[name](self.lora_A[name](self.lora_dropout[name](h))) * self.scaling[name]


def patch_linear_forward(monkeypatch: pytest.MonkeyPatch, update: Update) -> None:
    from peft.tuners.lora import layer

    monkeypatch.setattr(layer.Linear, "forward", _lora_forward(update))


def patch_bnb_forward(monkeypatch: pytest.MonkeyPatch, update: Update) -> None:
    from peft.tuners.lora import bnb

    for cls in ("Linear8bitLt", "Linear4bit"):
        if hasattr(bnb, cls):
            monkeypatch.setattr(getattr(bnb, cls), "forward", _lora_forward(update))


# -- forward faults ------------------------------------------------------------------------------------


def test_catches_scaling_applied_twice(monkeypatch):
    """Fault: the LoRA update is multiplied by the scaling twice (s^2), while ``layer.scaling`` is right."""
    patch_linear_forward(monkeypatch, lambda self, n, h: _correct(self, n, h) * self.scaling[n])
    assert_caught_numerically(candidates(lambda c: c.quant.kind == "none" and _scale_not_one(c), LLAMA_SCALED),
                              {"numerics.logits", "numerics.loss", "numerics.grad"})


def test_catches_fan_in_fan_out_transposed_in_forward(monkeypatch):
    """Fault: on a Conv1D (fan_in_fan_out) base, the update is ``x (B A)`` instead of ``x (B A)^T``
    (shape-preserving on square layers)."""

    def transposed(self, n, h):
        if not self.fan_in_fan_out or self.in_features != self.out_features:
            return _correct(self, n, h)
        delta = self.lora_B[n].weight @ self.lora_A[n].weight
        return self.lora_dropout[n](h) @ delta * self.scaling[n]

    patch_linear_forward(monkeypatch, transposed)
    assert_caught_numerically(candidates(lambda c: c.model.model_type == "gpt2" and c.quant.kind == "none",
                                         GPT2_C_PROJ), {"numerics.logits", "numerics.grad"})


def test_catches_dropout_on_output(monkeypatch):
    """Fault: lora_dropout applied to the update's output instead of its input (eval mode hides it)."""
    patch_linear_forward(
        monkeypatch,
        lambda self, n, h: self.lora_dropout[n](self.lora_B[n](self.lora_A[n](h))) * self.scaling[n],
    )
    outcome = assert_caught_numerically(
        candidates(lambda c: c.quant.kind == "none" and _get(c.adapter.lora_dropout, 0.0) > 0, LLAMA_DROPOUT),
        {"numerics.train_logits", "numerics.train_loss", "numerics.train_grad"},
    )
    assert not [d for d in outcome.divergences if d.field in ("numerics.logits", "numerics.loss")]


def test_catches_gradient_blocked_through_a(monkeypatch):
    """Fault: A enters the forward detached: same outputs, no gradient for lora_A."""

    def detached(self, n, h):
        a, b = self.lora_A[n], self.lora_B[n]
        return F.linear(F.linear(self.lora_dropout[n](h), a.weight.detach()), b.weight, b.bias) * self.scaling[n]

    patch_linear_forward(monkeypatch, detached)
    outcome = assert_caught_numerically(candidates(lambda c: c.quant.kind == "none", LLAMA_SCALED),
                                        {"numerics.grad"})
    assert not [d for d in outcome.divergences if d.field in ("numerics.logits", "numerics.loss")]


def test_catches_quantized_forward_dropping_scaling(monkeypatch):
    """Fault: the bitsandbytes 8-bit and 4-bit LoRA layers add ``B A x`` without the scaling."""
    patch_bnb_forward(monkeypatch, lambda self, n, h: self.lora_B[n](self.lora_A[n](self.lora_dropout[n](h))))
    assert_caught_numerically(
        candidates(lambda c: c.quant.kind in ("8bit", "4bit") and _scale_not_one(c), QLORA_SCALED, QLORA_8BIT_SCALED),
        {"numerics.logits", "numerics.loss", "numerics.grad"},
    )


# -- init faults ---------------------------------------------------------------------------------------


def _init(case: Case):
    return _get(case.adapter.init_lora_weights, True)


def _init_arg(args: dict):
    """``init_lora_weights`` of an ``update_layer`` call: an argument in peft 0.15, a config field later."""
    if "init_lora_weights" in args:
        return args["init_lora_weights"]
    return getattr(args.get("config"), "init_lora_weights", None)


def test_catches_kaiming_bound_broken(monkeypatch):
    """Fault: with init_lora_weights=True, A is drawn from N(0, 1/fan_in) instead of kaiming-uniform
    (same shape, still non-zero: the snapshot cannot tell)."""

    def normal(layer, args):
        name = args["adapter_name"]
        if _init_arg(args) is True and name in layer.lora_A:
            a = layer.lora_A[name].weight
            with torch.no_grad():
                a.normal_(0.0, 1.0 / math.sqrt(a.shape[1]))

    wrap_update_layer(monkeypatch, after=normal)
    assert_caught_numerically(candidates(lambda c: _init(c) is True, LLAMA_SCALED), {"numerics.init"})


def test_catches_gaussian_std_wrong(monkeypatch):
    """Fault: init_lora_weights="gaussian" draws A with std 1/sqrt(r) instead of 1/r."""

    def wide(layer, args):
        name = args["adapter_name"]
        if _init_arg(args) == "gaussian" and name in layer.lora_A:
            with torch.no_grad():
                layer.lora_A[name].weight.normal_(0.0, 1.0 / math.sqrt(args["r"]))

    wrap_update_layer(monkeypatch, after=wide)
    assert_caught_numerically(
        candidates(lambda c: _init(c) == "gaussian" and _get(c.adapter.r, 8) >= 4, LLAMA_GAUSSIAN), {"numerics.init"}
    )


def test_catches_lora_bias_not_zero_at_init(monkeypatch):
    """Fault: with lora_bias=True, B's bias starts at small random values instead of zero."""

    def biased(layer, args):
        name = args["adapter_name"]
        bias = getattr(layer.lora_B[name], "bias", None) if name in layer.lora_B else None
        if bias is not None and _init_arg(args) is True:
            with torch.no_grad():
                bias.normal_(0.0, 0.01)

    wrap_update_layer(monkeypatch, after=biased)
    outcome = assert_caught_numerically(
        candidates(lambda c: c.adapter.lora_bias is True and _init(c) is True, LLAMA_LORA_BIAS), {"numerics.init"}
    )
    assert any(d.field == "numerics.init_output" for d in outcome.divergences)


# -- without a fault -------------------------------------------------------------------------------------


def test_numeric_scenarios_agree_without_a_fault():
    """No fault: every scenario above agrees, numerics included."""
    for case in NUMERIC_SCENARIOS:
        outcome = run_case(case, PROFILE, numerics=True)
        # gpt2's Conv1D rewrites fan_in_fan_out in the user's config: a known, bookkeeping-only divergence
        assert outcome.status in ("agree", "known") and not outcome.divergences, (case.dumps(), outcome.divergences)
        assert set(outcome.known) <= {"loraconfig-mutated-in-place"}
        assert outcome.numerics is not None, case.dumps()


# -- the real suite, end to end ----------------------------------------------------------------------

SCALING_TWICE_CONFTEST = '''
"""Injects a numbers-only fault into upstream peft at import: the LoRA update scaled twice."""
from peft.tuners.lora import layer


def _forward(self, x, *args, **kwargs):
    result = self.base_layer(x, *args, **kwargs)
    dtype = result.dtype
    for name in self.active_adapters:
        if name not in self.lora_A.keys():
            continue
        h = x.to(self.lora_A[name].weight.dtype)
        s = self.scaling[name]
        result = result + (self.lora_B[name](self.lora_A[name](self.lora_dropout[name](h))) * s * s).to(dtype)
    return result.to(dtype)


layer.Linear.forward = _forward
'''


def _run_suite(pytester: pytest.Pytester, numerics: str) -> pytest.RunResult:
    pytester.makepyfile(test_conformance=(REPO / "conformance" / "test_conformance.py").read_text())
    args = ["-p", "no:cacheprovider", "-q", "-x", "--conformance-examples", "25", "--hypothesis-seed", "3",
            "--conformance-level", "peft", "--conformance-quant", "none", "--conformance-numerics", numerics,
            "-k", "llama or gpt2 or level"]  # a few cells and the free test: the whole suite is CI's business
    if os.environ.get("PYTEST_DISABLE_PLUGIN_AUTOLOAD"):
        args = ["-p", "conformance.plugin", "-p", "_hypothesis_pytestplugin", *args]
    return pytester.runpytest_subprocess(*args, timeout=600)


def test_real_suite_needs_numerics_for_a_numbers_only_fault(pytester):
    """End to end: with the LoRA update scaled twice, the real suite passes with
    ``--conformance-numerics off`` (no snapshot field shows it) and fails with it on,
    naming a numerics field and the replay command; without the fault it passes."""
    pytester.makeconftest(SCALING_TWICE_CONFTEST)
    blind = _run_suite(pytester, "off")
    assert blind.ret == pytest.ExitCode.OK, blind.stdout.str()[-3000:]
    caught = _run_suite(pytester, "on")
    output = caught.stdout.str()
    assert caught.ret == pytest.ExitCode.TESTS_FAILED, output[-3000:]
    assert "numerics." in output and "replay this case" in output, output[-3000:]
    (pytester.path / "conftest.py").unlink()
    clean = _run_suite(pytester, "on")
    assert clean.ret == pytest.ExitCode.OK, clean.stdout.str()[-3000:]
