"""Numerical conformance: same init distribution, same forward, same gradients.

Structural agreement does not show a scaling applied twice, a transposed path, a
dropout in the wrong place or a non-zero bias at init.  For every example whose
snapshots agree, :func:`check_numerics` takes the two prepared models and

1. checks the initialisation properties of every adapter on each side
   (``numerics.init``, :mod:`conformance.numerics.init`) and, for
   ``init_lora_weights=True``, that each prepared model's output equals its own
   output with every LoRA layer bypassed, exactly (``numerics.init_output``);
2. gives upstream's adapters fresh non-zero values (B included) and copies every
   trainable parameter into the reference by path (:mod:`conformance.numerics.run`);
3. runs both on the same random inputs in eval mode (dropout off) and compares the
   logits, the loss and the gradient of every trainable parameter
   (``numerics.logits``, ``numerics.loss``, ``numerics.grad``);
4. runs both in training mode (dropout on) with the global RNG forked and seeded
   identically on both sides, and compares the same things
   (``numerics.train_logits``, ``numerics.train_loss``, ``numerics.train_grad``).
   Both sides draw the dropout masks from the same RNG stream in the same order (one
   mask per LoRA layer per forward, on its input, in execution order, and the base
   model's own dropouts in between), so the outputs must match to tolerance; a
   dropout on the output instead of the input, a different ``p``, a missing
   ``1/(1-p)`` or an extra draw changes them.

A forward or backward that raises on one side only is ``numerics.forward`` /
``numerics.train_forward``.  NaN and inf never pass (``non-finite`` in the value).

Runs are switched with ``--conformance-numerics on|off`` (default on), which the
plugin passes to :func:`configure`; ``CONFORMANCE_NUMERICS=off`` does the same
outside pytest.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from conformance.engine.diff import Divergence
from conformance.numerics.emulate import DEFECTS
from conformance.numerics.init import init_problems, variant_of
from conformance.numerics.run import (
    Run, assign_shared_values, bypassed, case_seed, lora_layers, make_inputs, run_model, trainer_autocast,
)
from reference.config import resolve
from reference.inits import RESIDUAL_INITS
from reference.profiles import Profile
from reference.spec import Case

__all__ = [
    "TOLERANCES",
    "NumericsResult",
    "Tolerance",
    "check_numerics",
    "configure",
    "enabled",
    "one_side_passes",
    "tolerance_for",
]

MODEL = "<model>"


@dataclass(frozen=True)
class Tolerance:
    """How far upstream's tensor may be from the reference's: ``max|u - r| <= rtol * max|r| + atol``.

    The bound is norm-wise per tensor (the largest error against the largest
    value), not per element: elementwise relative bounds are meaningless for values
    that cancel to near zero, which low-precision logits and gradients do.
    """

    name: str
    rtol: float
    atol: float
    why: str


TOLERANCES: dict[str, Tolerance] = {
    t.name: t
    for t in (
        Tolerance(
            "fp32", 1e-4, 1e-6,
            "every weight and activation in fp32: the two sides differ only in the order of a few "
            "additions (where the LoRA update is added and cast), a few ulps; both pinned stacks are "
            "bit-identical in fp32 (docs/spec/numerics.md), while a change in scaling, a transposition "
            "or a bf16 round-trip of an input is 1e-3 or more",
        ),
        Tolerance(
            "fp16", 1e-2, 1e-4,
            "fp16 weights, activations or compute dtype: one rounding of fp16 is 5e-4 relative, and "
            "where the sides add and cast the LoRA update in a different order the ulps compound over "
            "the layers and the loss; LoRA updates are sized to move the logits by far more",
        ),
        Tolerance(
            "bf16", 3e-2, 1e-3,
            "bf16 weights, activations or compute dtype: one rounding is 4e-3 relative (8 bits of "
            "mantissa), compounded as for fp16",
        ),
        Tolerance(
            "int8", 5e-2, 1e-3,
            "bitsandbytes LLM.int8 on both sides (the same kernel and the same int8 weights), but the "
            "kernel quantizes each activation row to int8: an ulp of difference in its input can move a "
            "value across a rounding boundary, one step of 1/127 of the row's maximum",
        ),
    )
}
_ORDER = ("fp32", "fp16", "bf16", "int8")
_CLASS = {torch.float16: "fp16", torch.bfloat16: "bf16"}

_ENABLED: bool | None = None


def configure(on: bool) -> None:
    """Switch the numerical checks on or off for this process (the plugin's ``--conformance-numerics``)."""
    global _ENABLED
    _ENABLED = bool(on)


def enabled() -> bool:
    """Whether :func:`conformance.engine.runner.run_case` runs the numerical checks by default."""
    if _ENABLED is not None:
        return _ENABLED
    return os.environ.get("CONFORMANCE_NUMERICS", "on").lower() not in ("off", "0", "false", "no")


def tolerance_for(model: nn.Module, autocast: torch.dtype | None = None) -> Tolerance:
    """The loosest tolerance any precision in ``model`` (or the mixed precision it runs under)
    calls for.

    Precisions: each floating parameter dtype, each 4-bit layer's compute dtype (4-bit
    weights are dequantized to it; the same kernel and the same packed weights on both
    sides add no error of their own), int8 for LLM.int8 layers, and the autocast dtype.
    """
    found = {"fp32"} | ({_CLASS[autocast]} if autocast in _CLASS else set())
    for param in model.parameters():
        if param.dtype in _CLASS:
            found.add(_CLASS[param.dtype])
        elif type(param).__name__ == "Int8Params":
            found.add("int8")
    for module in model.modules():
        compute = getattr(module, "compute_dtype", None)
        if type(module).__name__ == "Linear4bit" and compute in _CLASS:
            found.add(_CLASS[compute])
    return TOLERANCES[max(found, key=_ORDER.index)]


@dataclass
class NumericsResult:
    """The numerical checks of one agreeing example."""

    divergences: list[Divergence] = field(default_factory=list)
    tolerance: str = ""
    max_rel_error: float = 0.0
    """The largest ``max|u - r| / (rtol * max|r| + atol)`` seen, in units of the tolerance."""
    note: str = ""
    """Why part of the checks did not run (both sides raised the same way)."""
    both_raised: list[str] = field(default_factory=list)
    """Forwards that raised the same exception class on both sides, while the loaded model's own
    forward runs: preparation made a model that cannot compute, on both sides alike.  Never a
    pass: counted in the summary and a strict-mode failure, unless a registry entry explains it
    (``numerics.both_raised``)."""
    base_raised: str = ""
    """The loaded model's own forward raises as well (a model that cannot run in this dtype on
    this device, before any preparation): the numerical checks do not apply to the example."""
    inconclusive: list[str] = field(default_factory=list)
    """Tensors non-finite in exactly the same places on both sides: the shared kernels
    overflow on their own (e.g. an fp16 8-bit backward), so those entries say nothing
    about the reference.  Never a pass: counted in the summary, and a strict-mode failure."""

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"tolerance": self.tolerance, "max_error_in_tolerances": round(self.max_rel_error, 6)}
        if self.note:
            out["note"] = self.note
        if self.both_raised:
            out["both_raised"] = self.both_raised
        if self.base_raised:
            out["base_raised"] = self.base_raised
        if self.inconclusive:
            out["inconclusive"] = self.inconclusive[:5] + ([f"... {len(self.inconclusive) - 5} more"]
                                                           if len(self.inconclusive) > 5 else [])
        return out


def _nonfinite(t: torch.Tensor) -> str:
    nan, inf = int(torch.isnan(t).sum()), int(torch.isinf(t).sum())
    return f"non-finite: {nan} nan, {inf} inf" if nan or inf else "finite"


def _same_nonfinite(r: torch.Tensor, u: torch.Tensor) -> bool:
    """NaN in the same places and the same infinities in the same places."""
    if not torch.equal(torch.isnan(r), torch.isnan(u)) or not torch.equal(torch.isinf(r), torch.isinf(u)):
        return False
    return torch.equal(r[torch.isinf(r)], u[torch.isinf(u)])


def _compare(path: str, name: str, r: torch.Tensor | None, u: torch.Tensor | None, tol: Tolerance,
             result: NumericsResult) -> None:
    if r is None and u is None:
        return
    if r is None or u is None:
        result.divergences.append(Divergence(path, name, "none" if r is None else "present", "none" if u is None else "present"))
        return
    if r.shape != u.shape:
        result.divergences.append(Divergence(path, name, f"shape {tuple(r.shape)}", f"shape {tuple(u.shape)}"))
        return
    rd, ud = r.detach().double().cpu(), u.detach().double().cpu()
    finite = torch.isfinite(rd)
    if not (finite.all() and torch.isfinite(ud).all()):
        if not _same_nonfinite(rd, ud):
            result.divergences.append(Divergence(path, name, _nonfinite(rd), _nonfinite(ud)))
            return
        # The same overflow on both sides: inconclusive there; the finite entries are still compared.
        result.inconclusive.append(f"{path} {name}: {_nonfinite(ud)} on both sides")
        rd, ud = rd[finite], ud[finite]
    scale = float(rd.abs().max()) if rd.numel() else 0.0
    err = float((ud - rd).abs().max()) if rd.numel() else 0.0
    bound = tol.rtol * scale + tol.atol
    result.max_rel_error = max(result.max_rel_error, err / bound)
    if err > bound:
        result.divergences.append(
            Divergence(path, name, f"max|ref| {scale:.4g}", f"max|up-ref| {err:.3g} > tol {bound:.3g} ({tol.name})")
        )


def _error_class(text: str | None) -> str | None:
    """``ValueError`` of ``raised: ValueError: ...`` or ``ValueError: ...``; None for no error."""
    if not text or text in ("ok", "exact"):
        return None
    text = text.removeprefix("raised: ")
    return text.split(":", 1)[0] if ":" in text else None


def _compare_runs(prefix: str, ref: Run, up: Run, tol: Tolerance, result: NumericsResult) -> None:
    if ref.error or up.error:
        if _error_class(ref.error) == _error_class(up.error):
            result.note = f"{prefix}forward raised on both sides: {up.error}"
            result.both_raised.append(f"{prefix or 'eval '}forward: {up.error}")
        else:
            result.divergences.append(Divergence(MODEL, f"numerics.{prefix}forward", ref.error or "ok", up.error or "ok"))
        return
    _compare(MODEL, f"numerics.{prefix}logits", ref.logits, up.logits, tol, result)
    _compare(MODEL, f"numerics.{prefix}loss", ref.loss, up.loss, tol, result)
    for path in sorted(ref.grads.keys() | up.grads.keys()):
        _compare(path, f"numerics.{prefix}grad", ref.grads.get(path), up.grads.get(path), tol, result)


def _init_output(model: nn.Module, inputs: dict[str, torch.Tensor], seed: int, autocast: torch.dtype | None,
                 rounding: Tolerance | None = None) -> str:
    """``exact`` when the prepared model's eval output equals its output without LoRA layers;
    with ``rounding`` (DoRA: ``m / ||W||`` is 1 only up to the rounding of the norms, which
    upstream computes in the factors' dtype), when it is within that tolerance of it."""
    prepared = run_model(model, inputs, train=False, seed=seed, backward=False, autocast=autocast)
    with bypassed(model):
        base = run_model(model, inputs, train=False, seed=seed, backward=False, autocast=autocast)
    if prepared.error or base.error:
        return f"raised: {prepared.error or base.error}"
    if prepared.logits is None or base.logits is None:
        return "exact"
    if not torch.isfinite(prepared.logits).all():
        return _nonfinite(prepared.logits)
    if torch.equal(prepared.logits, base.logits):
        return "exact"
    if rounding is not None and prepared.logits.shape == base.logits.shape:
        p, b = prepared.logits.double(), base.logits.double()
        if float((p - b).abs().max()) <= rounding.rtol * float(b.abs().max()) + rounding.atol:
            return "exact"
    return f"differs from the base output by {float((prepared.logits.double() - base.logits.double()).abs().max()):.3g}"


def _has_dora(model: nn.Module) -> bool:
    return any(len(getattr(m, "lora_magnitude_vector", ())) for _, m in lora_layers(model))


def _checks_init_output(case: Case, init: Any) -> bool:
    """Whether the init output is checked: for ``init_lora_weights=True``, except on a passed-in
    PeftModel or a resumed adapter (``training.load_saved``), which carry a trained adapter
    (reference.trained): their output is no init output.
    (``"orthogonal"``'s ``B A`` is zero only up to the factors' rounding, which the scaling
    magnifies - up to alpha / sqrt(r) with rsLoRA - and trl may cast them to bf16: its property is
    checked per layer, against that rounding, in ``conformance.numerics.init_variants``.)"""
    return init is True and not case.training.peft_model_in and not case.training.load_saved


def check_numerics(case: Case, profile: Profile, reference: nn.Module, upstream: nn.Module,
                   loaded: Callable[[], nn.Module] | None = None) -> NumericsResult:
    """The numerical checks of one example whose two preparations agree structurally.

    ``reference`` and ``upstream`` are the prepared transformers models (upstream's
    unwrapped from its PeftModel); both are modified (adapter values, grads).  Call it
    only after both snapshots are taken.  At the trl level the forwards run under the
    trainer's mixed precision (``bf16`` / ``fp16``).  ``loaded`` makes a private copy of the
    model before preparation: when both sides' forwards raise alike, its own forward tells a
    model that cannot run at all from one that preparation broke.
    """
    autocast = trainer_autocast(case)
    result = NumericsResult(tolerance=tolerance_for(reference, autocast).name)
    tol = TOLERANCES[result.tolerance]
    settings = resolve(case.adapter, profile)
    init = settings.init_lora_weights
    # the variants that rewrite the base weight are checked against the loaded one
    before = loaded() if loaded is not None and variant_of(init) in RESIDUAL_INITS else None
    per_adapter = None
    if case.second_adapter is not None:  # the second adapter's own init (reference.adapters)
        from reference.adapters import SECOND

        per_adapter = {SECOND: resolve(case.second_adapter, profile).init_lora_weights}
    bits = dict(settings.loftq_config).get("loftq_bits")
    ref_init = init_problems(reference, init, before, per_adapter, bits)
    up_init = init_problems(upstream, init, before, per_adapter, bits)
    for path in sorted(ref_init.keys() | up_init.keys()):
        if ref_init.get(path) == up_init.get(path):
            continue  # the same property broken alike on both sides (a passed-in trained adapter): not a divergence
        result.divergences.append(
            Divergence(path, "numerics.init", "; ".join(ref_init.get(path, ["ok"])), "; ".join(up_init.get(path, ["ok"])))
        )
    seed = case_seed(case)
    inputs = make_inputs(case, upstream, seed)
    ref_inputs = {k: v.to(next(reference.parameters()).device) for k, v in inputs.items()}
    if _checks_init_output(case, init):
        rounding = tol if _has_dora(upstream) or _has_dora(reference) else None
        r = _init_output(reference, ref_inputs, seed, autocast, rounding)
        u = _init_output(upstream, inputs, seed, autocast, rounding)
        if _error_class(r) is not None and _error_class(r) == _error_class(u):
            result.note = f"init forward {u} on both sides"
            result.both_raised.append(f"init forward: {u}")
        elif r != "exact" or u != "exact":
            result.divergences.append(Divergence(MODEL, "numerics.init_output", r, u))
    if variant_of(init) == "pissa_niter":
        _share_drawn_residuals(upstream, reference)
    missing = assign_shared_values(upstream, reference, seed)
    if missing:  # structures agreed, so this is a harness bug: say so rather than compare garbage
        result.divergences.append(Divergence(MODEL, "numerics.layout", "missing: " + ", ".join(missing[:5]), "present"))
        return result
    up_runs = {}
    one_sided: set[str] = set()
    for prefix, train in (("", False), ("train_", True)):
        run_seed = case_seed(case, prefix or "eval")
        ref_run = run_model(reference, ref_inputs, train=train, seed=run_seed, autocast=autocast)
        up_runs[prefix] = run_model(upstream, inputs, train=train, seed=run_seed, autocast=autocast)
        _compare_runs(prefix, ref_run, up_runs[prefix], tol, result)
        one_sided |= set(ref_run.grads) ^ set(up_runs[prefix].grads)
    _name_a_defect(case, reference, ref_inputs, up_runs, autocast, tol, result, one_sided)
    if result.both_raised and loaded is not None:
        base = run_model(loaded(), inputs, train=False, seed=seed, backward=False, autocast=autocast)
        if base.error is not None:
            result.base_raised, result.both_raised, result.note = base.error, [], f"the loaded model raises: {base.error}"
    _device_limits(case, autocast, result)
    return result


def _share_drawn_residuals(upstream: nn.Module, reference: nn.Module) -> None:
    """``pissa_niter_K``'s residual comes from a randomized SVD whose draws differ between the
    sides (each side's residual was held to its own factors above): the reference takes
    upstream's base weights of the LoRA layers, so that the forwards compare the layers."""
    ref_layers = dict(lora_layers(reference))
    with torch.no_grad():
        for path, module in lora_layers(upstream):
            twin = ref_layers.get(path)
            if twin is not None and twin.base_layer.weight.shape == module.base_layer.weight.shape:
                twin.base_layer.weight.data.copy_(module.base_layer.weight.data.to(twin.base_layer.weight.device))


_FORWARD_FIELDS = re.compile(r"numerics\.(train_)?(logits|loss|grad)")


def _name_a_defect(case: Case, reference: nn.Module, inputs: dict[str, torch.Tensor], up_runs: dict[str, Any],
                   autocast: torch.dtype | None, tol: Tolerance, result: NumericsResult,
                   one_sided_grads: set[str] = frozenset()) -> None:
    """Where the forwards differ, try each known upstream defect on the reference
    (``conformance.numerics.emulate``): if the reference's runs with it match upstream's, the
    forward divergences become one divergence that names it.  A gradient of a parameter that
    trains on one side only is a trainability difference, which the snapshot's requires_grad
    field reports and the registry judges on its own: it is neither compared nor replaced."""
    if not any(_replaced(d, one_sided_grads) for d in result.divergences):
        return  # (only parameters that train on one side differ: no defect of the forward to name)
    for defect in DEFECTS:
        if not defect.applies(reference):
            continue
        trial = NumericsResult(tolerance=result.tolerance)
        one_sided: set[str] = set()
        with defect.applied(reference):
            for prefix, train in (("", False), ("train_", True)):
                run = run_model(reference, inputs, train=train, seed=case_seed(case, prefix or "eval"), autocast=autocast)
                _compare_runs(prefix, run, up_runs[prefix], tol, trial)
                one_sided |= set(run.grads) ^ set(up_runs[prefix].grads)

        if not [d for d in trial.divergences if _replaced(d, one_sided)]:
            result.divergences = [d for d in result.divergences if not _replaced(d, one_sided)]
            result.divergences.append(Divergence(MODEL, f"numerics.{defect.name}", defect.reference, defect.upstream))
            return


def _replaced(d: Divergence, one_sided: set[str]) -> bool:
    """A forward divergence a named defect stands for (not a one-sided parameter's gradient)."""
    return bool(_FORWARD_FIELDS.fullmatch(d.field)) and d.path not in one_sided


CPU_AUTOCAST_HALF = "Unexpected floating ScalarType in at::autocast::prioritize"
"""What torch's CPU autocast raises when a float16 tensor reaches one of its promote ops
(``torch.cat``, ``torch.stack``...): CPU autocast knows float32 and bfloat16 only there, CUDA
autocast knows float16 too."""


def _device_limits(case: Case, autocast: torch.dtype | None, result: NumericsResult) -> None:
    """Forwards that raised alike on both sides only because this device cannot run what the
    trainer would run on a GPU: they are moved to ``base_raised`` (counted as examples the checks
    could not run, not as agreement), each rule narrowed to its device, precision and message.

    * fp16 training runs under fp16 autocast, which needs a GPU: on the CPU the prepared model's
      mixed dtypes cannot be run as the trainer would (``trainer_autocast`` gives none).
    * A model held in float16 trained with bf16 runs under the CPU's bf16 autocast, whose promote
      ops refuse float16 (:data:`CPU_AUTOCAST_HALF`); a MoE model reaches one once trl switches the
      router aux loss on (``torch.cat`` of the router logits), which the loaded model never computes.
    """
    if not result.both_raised or case.training.level != "trl" or case.training.device != "cpu":
        return
    if case.training.fp16 and autocast is None:
        why = "fp16 mixed precision needs a GPU: "
    elif (autocast is not None and case.model.load_dtype == "float16"
          and all(CPU_AUTOCAST_HALF in raised for raised in result.both_raised)):
        why = "the CPU's bf16 autocast cannot run float16 tensors through its promote ops (a GPU can): "
    else:
        return
    result.base_raised = why + result.both_raised[0]
    result.both_raised = []


def one_side_passes(case: Case, profile: Profile, model: nn.Module) -> None:
    """The forwards and backwards :func:`check_numerics` runs on each side, run on ``model``
    alone: the init-output forwards (prepared and bypassed, where :func:`_checks_init_output`),
    then the eval and the training pass, each with its backward.  The benchmarks' upstream-only
    yardstick (``benchmarks/run.py``): what one preparation's passes cost, with no second side,
    no value sharing and no comparison."""
    autocast = trainer_autocast(case)
    seed = case_seed(case)
    inputs = make_inputs(case, model, seed)
    if _checks_init_output(case, resolve(case.adapter, profile).init_lora_weights):
        _init_output(model, inputs, seed, autocast)
    for prefix, train in (("", False), ("train_", True)):
        run_model(model, inputs, train=train, seed=case_seed(case, prefix or "eval"), autocast=autocast)
