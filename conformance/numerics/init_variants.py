"""Init properties of the ``init_lora_weights`` variants (``reference.inits``), per side.

Each property is a statement about the factors, the base weight and the loaded weight that
any correct implementation satisfies, whatever its arithmetic order or random draws:

* ``olora``: B has orthonormal columns (``B^T B = I``), A is upper triangular (exact zeros
  below the diagonal: R of a QR), and the base holds the residual: ``W_res + scaling * B A``
  equals the loaded ``W``.
* ``pissa``: ``A A^T`` and ``B^T B`` are the same diagonal matrix ``diag(S[:r]) / scaling``,
  ``S`` the singular values of the loaded ``W`` (largest first), and the base holds the residual.
* ``pissa_niter`` (a randomized SVD): ``A A^T`` and ``B^T B`` are the same diagonal matrix, its
  entries times the scaling at most the top singular values of the loaded ``W`` (they are the
  singular values of ``W``'s projection onto the sketched subspace: interlacing; how close they
  come depends on the draw and on K, so no lower bound), and the base holds the residual.
* ``loftq``: with ``E = W - W_base`` (the loaded weight minus the new, quantized base), ``A A^T``
  and ``B^T B`` are the same diagonal matrix and ``B A`` is a best rank-r approximation of ``E``:
  ``||E - B A||_F`` equals the norm of ``E``'s singular values past the r-th (Eckart-Young),
  *not* divided by the scaling (``reference.loftq``); and every block of 64 consecutive values of
  the (out, in) base weight holds at most ``2^loftq_bits`` distinct values.
* ``orthogonal``: ``B A = 0``; ``||A||_F^2 = ||X||_F^2 / 100`` for a standard normal ``X`` of
  ``numel(A) / 2`` entries (the orthogonal half-basis keeps the norm), so ``200 * ms(A)`` is
  the mean square of ``numel(A) / 2`` standard normal draws: chi-square bounds as for the
  default init (``conformance.numerics.init``); the same for B.

Rounding allowances: ``8`` rounding units of the least precise dtype involved (the base
weight's, the factors'); a residual re-quantized on bitsandbytes is compared in the Frobenius
norm with the quantization's own error (4-bit: 20 % of ``||W||``, 8-bit: 3 %), which a
residual left unsubtracted (``scaling * ||B A|| / ||W||``) exceeds except for tiny ranks and
scalings, where the forward comparison between the sides remains the check.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from conformance.engine.facts import pristine_path
from reference.dora import dense_weight

__all__ = ["variant_problems"]

_EPS = {torch.float32: 2.0**-23, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7, torch.float64: 2.0**-52}
_QUANT_RESIDUAL = {"Linear4bit": 0.2, "Linear8bitLt": 0.03}


def _eps(*dtypes: torch.dtype) -> float:
    return max(_EPS.get(d, 2.0**-7) for d in dtypes)


def _dense(module: nn.Module) -> torch.Tensor:
    """The (out, in) dense base weight of a LoRA layer, float64."""
    w = dense_weight(module.base_layer).double()
    return w.T if getattr(module, "fan_in_fan_out", False) else w


def _loaded_dense(loaded: nn.Module | None, path: str, fan_in_fan_out: bool) -> torch.Tensor | None:
    if loaded is None:
        return None
    try:
        base = loaded.get_submodule(pristine_path(path + ".x").removesuffix(".x"))
    except AttributeError:
        return None
    w = dense_weight(base).double()
    return w.T if fan_in_fan_out else w


def _residual(module: nn.Module, path: str, a: torch.Tensor, b: torch.Tensor, scaling: float,
              loaded: nn.Module | None, eps: float) -> list[str]:
    original = _loaded_dense(loaded, path, getattr(module, "fan_in_fan_out", False))
    if original is None:
        return []
    held = _dense(module)
    if held.shape != original.shape:
        return [f"base weight is {tuple(held.shape)}, the loaded one {tuple(original.shape)}"]
    update = scaling * (b @ a)
    err = held + update - original
    quantized = _QUANT_RESIDUAL.get(type(module.base_layer).__name__)
    if quantized is not None:
        # both the loaded weight and the re-quantized residual carry a quantization error that
        # scales with their own norms
        rel = float(err.norm() / (original.norm() + held.norm()).clamp_min(1e-30))
        if rel > quantized:
            return [f"base weight + scaling*B@A is not the loaded weight: relative error {rel:.3g} > {quantized}"]
        return []
    bound = 8.0 * eps * float(original.abs().max() + update.abs().max())
    worst = float(err.abs().max())
    if worst > bound:
        return [f"base weight + scaling*B@A is not the loaded weight: max error {worst:.3g} > {bound:.3g}"]
    return []


def _olora(a: torch.Tensor, b: torch.Tensor, eps: float) -> list[str]:
    out = []
    gram = b.T @ b
    worst = float((gram - torch.eye(gram.shape[0], dtype=gram.dtype)).abs().max())
    if worst > 8.0 * eps * max(1, b.shape[0]) ** 0.5:
        out.append(f"olora: B's columns are not orthonormal (max |B^T B - I| {worst:.3g})")
    below = torch.tril(a, diagonal=-1)
    if bool((below != 0).any()):
        out.append(f"olora: A is not upper triangular (max |A| below the diagonal {float(below.abs().max()):.3g})")
    return out


def _pissa(module: nn.Module, path: str, a: torch.Tensor, b: torch.Tensor, scaling: float,
           loaded: nn.Module | None, eps: float) -> list[str]:
    out = []
    aat, btb = a @ a.T, b.T @ b
    scale = float(aat.abs().max().clamp_min(1e-30))
    if float((aat - btb).abs().max()) > 8.0 * eps * scale * a.shape[1] ** 0.5:
        out.append(f"pissa: A A^T != B^T B (max difference {float((aat - btb).abs().max()):.3g})")
    off = aat - torch.diag(torch.diagonal(aat))
    if float(off.abs().max()) > 8.0 * eps * scale * a.shape[1] ** 0.5:
        out.append(f"pissa: A's rows are not orthogonal (max |off-diagonal of A A^T| {float(off.abs().max()):.3g})")
    original = _loaded_dense(loaded, path, getattr(module, "fan_in_fan_out", False))
    if original is not None:
        top = torch.linalg.svdvals(original)[: a.shape[0]]
        got = torch.diagonal(aat) * scaling
        if got.shape != top.shape or float((got - top).abs().max()) > 8.0 * eps * float(top.max()) * a.shape[1] ** 0.5:
            out.append(f"pissa: scaling * diag(A A^T) {[round(float(x), 4) for x in got[:4]]} are not the top singular "
                       f"values of W {[round(float(x), 4) for x in top[:4]]}")
    return out


def _diagonal_gram(kind: str, a: torch.Tensor, b: torch.Tensor, eps: float) -> tuple[list[str], torch.Tensor]:
    """A A^T == B^T B, diagonal (problems, A A^T)."""
    out = []
    aat, btb = a @ a.T, b.T @ b
    scale = float(aat.abs().max().clamp_min(1e-30))
    allowed = 8.0 * eps * scale * a.shape[1] ** 0.5
    if float((aat - btb).abs().max()) > allowed:
        out.append(f"{kind}: A A^T != B^T B (max difference {float((aat - btb).abs().max()):.3g})")
    off = aat - torch.diag(torch.diagonal(aat))
    if float(off.abs().max()) > allowed:
        out.append(f"{kind}: A's rows are not orthogonal (max |off-diagonal of A A^T| {float(off.abs().max()):.3g})")
    return out, aat


def _pissa_niter(module: nn.Module, path: str, a: torch.Tensor, b: torch.Tensor, scaling: float,
                 loaded: nn.Module | None, eps: float) -> list[str]:
    out, aat = _diagonal_gram("pissa_niter", a, b, eps)
    original = _loaded_dense(loaded, path, getattr(module, "fan_in_fan_out", False))
    if original is not None:
        top = torch.linalg.svdvals(original)[: a.shape[0]]
        got = torch.diagonal(aat) * scaling
        slack = 8.0 * eps * float(top.max()) * a.shape[1] ** 0.5
        if got.shape != top.shape or bool((got > top + slack).any()):
            out.append(f"pissa_niter: scaling * diag(A A^T) {[round(float(x), 4) for x in got[:4]]} exceed the top "
                       f"singular values of W {[round(float(x), 4) for x in top[:4]]}")
    return out


def _loftq(module: nn.Module, path: str, a: torch.Tensor, b: torch.Tensor, loaded: nn.Module | None,
           eps: float, bits: int | None) -> list[str]:
    out, _ = _diagonal_gram("loftq", a, b, eps)
    held = _dense(module)
    flat = held.flatten()
    if bits is not None and flat.numel() % 64 == 0:
        distinct = max(len(torch.unique(block)) for block in flat.reshape(-1, 64))
        if distinct > 2**bits:
            out.append(f"loftq: a block of 64 base weight values holds {distinct} distinct values > 2^{bits}")
    original = _loaded_dense(loaded, path, getattr(module, "fan_in_fan_out", False))
    if original is None or original.shape != held.shape:
        return out
    error = original - held
    tail = float(torch.linalg.svdvals(error)[a.shape[0]:].norm())
    got = float((error - b @ a).norm())
    # the factors were computed from W - Q in fp32; the base holds Q rounded to its dtype
    slack = 2.0 * eps * float(held.norm()) + 8.0 * 2.0**-23 * float(error.norm()) * a.shape[1] ** 0.5
    if abs(got - tail) > slack:
        out.append(f"loftq: ||W - W_base - B A|| {got:.4g} is not the rank-{a.shape[0]} truncation error {tail:.4g} "
                   f"of W - W_base")
    return out


def _orthogonal(a: torch.Tensor, b: torch.Tensor, eps: float, bounds: Any) -> list[str]:
    out = []
    product = b @ a
    # the factors' rounding, and the orthogonality of Q's halves (a fp32 QR: ~r units)
    allowed = 64.0 * (eps + a.shape[0] * 2.0**-23) * (b.abs() @ a.abs())
    if bool((product.abs() > allowed).any()):
        out.append(f"orthogonal: B @ A is not zero (max {float(product.abs().max()):.3g})")
    for label, t in (("A", a), ("B", b)):
        n = max(1, t.numel() // 2)
        lo, hi = bounds(n, 1.0, eps)
        ms = 200.0 * float(t.pow(2).mean())
        if not lo <= ms <= hi:
            out.append(f"orthogonal: 200 * mean square of {label} {ms:.4g} outside [{lo:.4g}, {hi:.4g}] (n={n})")
    return out


def variant_problems(module: nn.Module, path: str, name: str, kind: str, loaded: nn.Module | None,
                     bounds: Any, loftq_bits: int | None = None) -> list[str]:
    """The broken properties of adapter ``name`` of LoRA layer ``module`` (at ``path``) for the
    init ``kind`` (``olora``, ``pissa``, ``pissa_niter``, ``loftq``, ``orthogonal``); ``loaded`` is
    the loaded model (for the residual), ``bounds`` the normal mean-square bounds
    (``mean_square_bounds_normal``), ``loftq_bits`` the case's ``loftq_bits``."""
    a_param, b_param = module.lora_A[name].weight, module.lora_B[name].weight
    a, b = a_param.detach().double(), b_param.detach().double()
    # new factors pass through a floating base weight's dtype (bf16, a 4-bit float storage) or a
    # 4-bit layer's compute dtype (peft >= 0.19) before the adapter dtype policy: rounded to it
    held = module.base_layer.weight.dtype
    compute = getattr(module.base_layer, "compute_dtype", None)
    eps = _eps(a_param.dtype, held if held.is_floating_point else torch.float32,
               compute if isinstance(compute, torch.dtype) else torch.float32)
    scaling = float(module.scaling[name])
    if kind == "orthogonal":
        return _orthogonal(a, b, eps, bounds)
    if a.shape[1] != _dense(module).shape[1] or b.shape[0] != _dense(module).shape[0]:
        return [f"{kind}: factors {tuple(a.shape)} / {tuple(b.shape)} do not fit the (out, in) weight "
                f"{tuple(_dense(module).shape)}"]
    if kind == "loftq":
        return _loftq(module, path, a, b, loaded, eps, loftq_bits)
    if kind == "pissa_niter":
        out = _pissa_niter(module, path, a, b, scaling, loaded, eps)
    else:
        out = _olora(a, b, eps) if kind == "olora" else _pissa(module, path, a, b, scaling, loaded, eps)
    return out + _residual(module, path, a, b, scaling, loaded, eps)
