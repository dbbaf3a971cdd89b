"""Initialisation properties of freshly created adapters, checked per side and per adapter.

The checks are statements about distributions, not about particular random
numbers, so they hold whatever order the two sides draw from the RNG in:

* ``init_lora_weights=True`` (the default): B is exactly zero; A is not all zero and
  every entry lies within the kaiming-uniform bound ``1/sqrt(fan_in)``
  (``kaiming_uniform_(a=sqrt(5))``); A's mean square is that of ``U(-b, b)``.
* ``"gaussian"``: B is exactly zero; A's standard deviation is ``1/r``.
* ``False``: B is not zero.
* ``lora_bias``: with ``init_lora_weights=True``, B's bias is exactly zero.
* embeddings (``init_lora_weights`` not False): A is exactly zero and B is standard
  normal; with ``False``, B is not zero.
* DoRA (``use_dora``): the magnitude equals the norms of ``W + scaling * B A`` per output
  feature (rows of the dense (out, in) weight; for an embedding, columns of (vocab, dim) over
  the vocabulary), computed here in float64 from the side's own factors, within 8 rounding
  units of the least precise dtype involved (dense weight, 4-bit compute dtype, factors,
  magnitude): upstream computes it in the factors' or compute dtype.

Statistical bounds are exact tail bounds with a failure probability of at most
``exp(-TAIL)`` (about 4e-18) per check, for any sample size: a correct init
cannot make them flake.  For the mean square ``m2`` of ``n`` draws of ``N(0, s^2)``,
``n m2 / s^2`` is chi-square with ``n`` degrees of freedom and Laurent & Massart
(2000, Lemma 1) give ``P(X - n >= 2 sqrt(n x) + 2x) <= e^-x`` and
``P(n - X >= 2 sqrt(n x)) <= e^-x``.  For ``U(-b, b)`` draws, Hoeffding's inequality
on the squares (each in ``[0, b^2]``) gives ``|m2 - b^2/3| <= b^2 sqrt(x / (2n))``.
Small samples give wide bounds; every A of one side with the same ``r`` is also
pooled into one sample, which gives the test its power on tiny layers.
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Any

import torch
from torch import nn

from conformance.numerics.init_variants import variant_problems
from conformance.numerics.run import adapter_names, lora_layers
from reference.dora import dense_weight
from reference.errors import PreparationError
from reference.inits import init_kind

__all__ = ["TAIL", "init_problems", "mean_square_bounds_normal", "mean_square_bounds_uniform"]

TAIL = 40.0
"""``x`` of the tail bounds: each check fails a correct init with probability <= e^-40."""

_EPS = {torch.float32: 2.0**-23, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7, torch.float64: 2.0**-52}


def _rounding(t: torch.Tensor) -> float:
    """Relative rounding of a value stored in ``t``'s dtype (after a cast from fp32)."""
    return _EPS.get(t.dtype, 2.0**-7)


def mean_square_bounds_normal(n: int, sigma: float, rounding: float = 0.0) -> tuple[float, float]:
    """Bounds on the mean square of ``n`` draws of ``N(0, sigma^2)`` (chi-square tails)."""
    root = 2.0 * math.sqrt(TAIL / n)
    lo = sigma**2 * max(0.0, 1.0 - root) * (1.0 - rounding) ** 2
    hi = sigma**2 * (1.0 + root + 2.0 * TAIL / n) * (1.0 + rounding) ** 2
    return lo, hi


def mean_square_bounds_uniform(n: int, bound: float, rounding: float = 0.0) -> tuple[float, float]:
    """Bounds on the mean square of ``n`` draws of ``U(-bound, bound)`` (Hoeffding)."""
    slack = bound**2 * math.sqrt(TAIL / (2.0 * n))
    lo = max(0.0, bound**2 / 3.0 - slack) * (1.0 - rounding) ** 2
    hi = (bound**2 / 3.0 + slack) * (1.0 + rounding) ** 2
    return lo, hi


def _ms(t: torch.Tensor) -> float:
    return float(t.detach().double().pow(2).mean())


def _max(t: torch.Tensor) -> float:
    return float(t.detach().double().abs().max()) if t.numel() else 0.0


def _zero(t: torch.Tensor) -> bool:
    return bool((t.detach() == 0).all())


def _check_ms(label: str, ms: float, bounds: tuple[float, float], n: int) -> str | None:
    lo, hi = bounds
    if lo <= ms <= hi:
        return None
    return f"{label} std {math.sqrt(ms):.4g} outside [{math.sqrt(lo):.4g}, {math.sqrt(hi):.4g}] (n={n})"


def _linear_problems(module: nn.Module, name: str, init: Any, pooled: dict) -> list[str]:
    a, b = module.lora_A[name].weight, module.lora_B[name].weight
    bias = getattr(module.lora_B[name], "bias", None)
    r = int(module.r[name])
    out: list[str] = []
    if init is False:
        if _zero(b):
            out.append("init_lora_weights=False: B is all zero")
        return out
    if not _zero(b):
        out.append(f"B is not zero (max |B| {_max(b):.3g})")
    if bias is not None and not _zero(bias):
        out.append(f"lora_bias: B's bias is not zero (max {_max(bias):.3g})")
    if _zero(a):
        out.append("A is all zero")
        return out
    n = a.numel()
    if init == "gaussian":
        sigma = 1.0 / r
        problem = _check_ms("gaussian A", _ms(a), mean_square_bounds_normal(n, sigma, _rounding(a)), n)
        pooled["gaussian", sigma, a.dtype].append(a.detach().double().flatten())
    else:
        bound = 1.0 / math.sqrt(a.shape[1])
        if _max(a) > bound * (1.0 + _rounding(a)):
            out.append(f"A exceeds the kaiming-uniform bound: max |A| {_max(a):.4g} > 1/sqrt(fan_in) = {bound:.4g}")
        problem = _check_ms("kaiming A", _ms(a), mean_square_bounds_uniform(n, bound, _rounding(a)), n)
        pooled["uniform", bound, a.dtype].append(a.detach().double().flatten())
    if problem:
        out.append(problem)
    return out


def _embedding_problems(module: nn.Module, name: str, init: Any, pooled: dict,
                        linear_as: list[torch.Tensor] = ()) -> list[str]:
    """``linear_as``: the Linear layers' A factors; an embedding B equal to one of them transposed
    is the factor of a tied layer (``ensure_weight_tying``), initialised as that A (checked there)."""
    a, b = module.lora_embedding_A[name], module.lora_embedding_B[name]
    if init is False:
        return ["init_lora_weights=False: embedding B is all zero"] if _zero(b) else []
    out = [] if _zero(a) else [f"embedding A is not zero (max |A| {_max(a):.3g})"]
    if any(x.shape == b.t().shape and torch.equal(x.detach(), b.detach().t().to(x.dtype)) for x in linear_as):
        return out
    problem = _check_ms("embedding B", _ms(b), mean_square_bounds_normal(b.numel(), 1.0, _rounding(b)), b.numel())
    pooled["gaussian", 1.0, b.dtype].append(b.detach().double().flatten())
    return out + ([problem] if problem else [])


def _magnitude_problems(module: nn.Module, name: str) -> list[str]:
    """The DoRA magnitude against the norms it should start from (any ``init_lora_weights``)."""
    magnitudes = getattr(module, "lora_magnitude_vector", None)
    if magnitudes is None or name not in magnitudes:
        return []
    m = magnitudes[name].weight.detach()
    base = module.base_layer
    dense = dense_weight(base)
    dtypes = [dense.dtype, m.dtype]
    if base.weight.dtype.is_floating_point:  # factors pass through it (a 4-bit float storage, bf16) first
        dtypes.append(base.weight.dtype)
    if name in getattr(module, "lora_embedding_A", {}):
        a, b = module.lora_embedding_A[name].detach(), module.lora_embedding_B[name].detach()
        total = dense.double() + (b.double() @ a.double()).T * float(module.scaling[name])
        expected = torch.linalg.norm(total, dim=0)
    else:
        a, b = module.lora_A[name].weight.detach(), module.lora_B[name].weight.detach()
        w = dense.double().T if getattr(module, "fan_in_fan_out", False) else dense.double()
        expected = torch.linalg.norm(w + (b.double() @ a.double()) * float(module.scaling[name]), dim=1)
        compute = getattr(base, "compute_dtype", None)
        if compute is not None:
            dtypes.append(compute)
    dtypes.append(a.dtype)
    if tuple(m.shape) != tuple(expected.shape):
        return [f"DoRA magnitude has shape {tuple(m.shape)}, the norms per output feature {tuple(expected.shape)}"]
    rounding = max(_EPS.get(d, 2.0**-7) for d in dtypes)
    err = float((m.double() - expected).abs().max()) if m.numel() else 0.0
    bound = 8.0 * rounding * float(expected.abs().max() if expected.numel() else 0.0)
    if err > bound:
        if _stale_scales_norm(module, name, m, rounding):
            return ["DoRA magnitude is the norm of W + scaling*B@A under the layer state's stale int8 scales "
                    "(state.SCB), not under the weight's own"]
        return [f"DoRA magnitude is not the norm of W + scaling*B@A: max error {err:.3g} > {bound:.3g}"]
    return []


def _token_problems(model: nn.Module) -> dict[str, list[str]]:
    """Trainable token rows (``trainable_token_indices``): each adapter's trainable values and
    its saved originals equal the embedding's rows at its indices, exactly (rounded to their
    own dtype); a tied module shares them, so each set is checked once, where it first appears."""
    out: dict[str, list[str]] = {}
    seen: set[int] = set()
    for path, module in model.named_modules():
        deltas = getattr(module, "trainable_tokens_delta", None)
        indices = getattr(module, "token_indices", None)
        if deltas is None or indices is None or id(deltas) in seen:
            continue
        seen.add(id(deltas))
        weight = module.base_layer.weight.detach()
        originals = module.trainable_tokens_original
        for name, delta in deltas.items():
            rows = weight[list(indices[name])]
            problems = []
            if tuple(delta.shape) != tuple(rows.shape):
                problems.append(f"trainable tokens have shape {tuple(delta.shape)}, the rows {tuple(rows.shape)}")
            elif not torch.equal(delta.detach(), rows.to(delta.dtype)):
                problems.append(f"trainable tokens are not the embedding's rows {list(indices[name])} "
                                f"(max difference {_max(delta.detach().double() - rows.double()):.3g})")
            original = getattr(originals, name, None)
            if original is None or tuple(original.shape) != tuple(rows.shape) or not torch.equal(
                    original, rows.to(original.dtype)):
                problems.append("the saved original rows are not the embedding's rows")
            out.setdefault(path, []).extend(f"[{name}] {p}" for p in problems)
    return {k: v for k, v in out.items() if v}


def _stale_scales_norm(module: nn.Module, name: str, m: torch.Tensor, rounding: float) -> bool:
    """An 8-bit layer whose weight was re-quantized (new scales on the weight) while its state
    still holds the old ones: is the magnitude the norm under the *state's* scales?"""
    base = module.base_layer
    state = getattr(getattr(base, "state", None), "SCB", None)
    own = getattr(base.weight, "SCB", None)
    if type(base).__name__ != "Linear8bitLt" or state is None or own is None or torch.equal(state, own):
        return False
    import bitsandbytes as bnb

    dense = bnb.functional.int8_vectorwise_dequant(base.weight.data, state.to(base.weight.data.device)).double()
    a, b = module.lora_A[name].weight.detach().double(), module.lora_B[name].weight.detach().double()
    stale = torch.linalg.norm(dense + (b @ a) * float(module.scaling[name]), dim=1)
    if stale.shape != m.shape or not stale.numel():
        return False
    return float((m.double() - stale).abs().max()) <= 8.0 * rounding * float(stale.abs().max())


VARIANTS = ("olora", "pissa", "pissa_niter", "loftq", "orthogonal")
"""The init variants with their own properties (``conformance.numerics.init_variants``)."""


def variant_of(init: Any) -> str | None:
    """The init variant ``init`` names (``olora``, ``pissa``, ``pissa_niter``, ``loftq``,
    ``orthogonal``), or None."""
    try:
        kind = init_kind(init, VARIANTS)
    except PreparationError:
        return None
    return kind if kind in VARIANTS else None


def init_problems(model: nn.Module, init: Any, loaded: nn.Module | None = None,
                  per_adapter: dict[str, Any] | None = None, loftq_bits: int | None = None) -> dict[str, list[str]]:
    """Init properties that ``model``'s adapters break, by module path (``<pooled>`` for
    the pooled statistics); empty when every property holds.  ``init`` is the resolved
    ``init_lora_weights`` of the case; ``loaded``, the loaded model before preparation, lets
    the variants that rewrite the base weight be checked against it.  ``per_adapter`` gives
    another adapter's own ``init_lora_weights`` (a second adapter: ``reference.adapters``);
    ``loftq_bits`` the case's ``loftq_config["loftq_bits"]``."""
    out: dict[str, list[str]] = {}
    pooled: dict[tuple, list[torch.Tensor]] = defaultdict(list)
    variant = variant_of(init)
    linear_as = [m.lora_A[n].weight for _, m in lora_layers(model) for n in adapter_names(m)
                 if n in getattr(m, "lora_A", {})]
    for path, module in lora_layers(model):
        problems: list[str] = []
        for name in adapter_names(module):
            own = (per_adapter or {}).get(name, init)
            own_variant = variant if own is init else variant_of(own)
            if name in getattr(module, "lora_embedding_A", {}):
                found = _embedding_problems(module, name, own, pooled, linear_as)
            elif own_variant is not None:
                found = variant_problems(module, path, name, own_variant, loaded, mean_square_bounds_normal,
                                         loftq_bits)
            else:
                found = _linear_problems(module, name, own, pooled)
            found += _magnitude_problems(module, name)
            problems += [f"[{name}] {p}" for p in found]
        if problems:
            out[path] = problems
    for path, problems in _token_problems(model).items():
        out.setdefault(path, []).extend(problems)
    pooled_problems = []
    for (family, scale, dtype), parts in pooled.items():
        if len(parts) < 2:
            continue
        values = torch.cat(parts)
        n, ms = values.numel(), float(values.pow(2).mean())
        rounding = _EPS.get(dtype, 2.0**-7)
        bounds = (
            mean_square_bounds_normal(n, scale, rounding)
            if family == "gaussian"
            else mean_square_bounds_uniform(n, scale, rounding)
        )
        problem = _check_ms(f"pooled {family}({scale:.4g})", ms, bounds, n)
        if problem:
            pooled_problems.append(problem)
    if pooled_problems:
        out["<pooled>"] = pooled_problems
    return out
