"""DoRA: weight-decomposed low-rank adaptation (Liu et al. 2024, "DoRA"), as peft lays it out
(and :func:`dense_weight`, the dequantized weight, which ``reference.merge`` folds updates into).

With ``use_dora=True`` each adapted module gets, beside ``lora_A`` / ``lora_B``, a trainable
magnitude ``lora_magnitude_vector.<adapter>.weight``:

* a Linear-like layer (``nn.Linear``, transformers ``Conv1D``, bitsandbytes 4/8-bit) holds one
  entry per *output* feature, initialised to the row norms of ``W + scaling * B @ A``, with ``W``
  the dense (dequantized; for ``Conv1D`` transposed) base weight in the (out, in) layout;
* an Embedding holds one entry per *embedding dimension*: the norms, over the vocabulary, of
  ``W + scaling * (B @ A)^T``, ``W`` being (vocab, dim).

The magnitude is created after the factors are placed, in the promotion of the dense weight's
dtype and the factors' (:func:`magnitude_dtype`), from the dense weight and the placed factors
(the numerical checks compare it with the norm it should be, per side, within that dtype's
rounding).

The forward (observed in peft 0.15 - 0.21, as the paper writes it, the norm a constant for the
gradient: section 4.3): with ``x_d`` the dropped-out input, ``n`` the current norms of
``W + scaling * B @ A`` (detached) and ``m`` the magnitude, a Linear-like layer outputs

    base(x) + (m / n - 1) * (W x_d) + (m / n) * scaling * B A x_d

which, without dropout, is ``(m / n) * (W + scaling * B A) x + bias``: the paper's
``m * V / ||V||``.  An Embedding outputs ``(m / n) * (base(x) + update)``, ``update`` being
the plain LoRA embedding update.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["Magnitude", "dense_weight", "embedding_norm", "linear_norm", "linear_update", "magnitude_dtype", "merged_delta"]


class Magnitude(nn.Module):
    """Holds one adapter's magnitude as ``weight``, as peft's checkpoints name it."""

    def __init__(self, values: torch.Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(values)


def dense_weight(base: nn.Module) -> torch.Tensor:
    """The base layer's weight as a dense floating tensor in its stored layout: bitsandbytes
    4-bit weights dequantized, 8-bit ones scaled back by their row-wise scales."""
    kind = type(base).__name__ if type(base).__module__.startswith("bitsandbytes") else "plain"
    weight = base.weight
    if kind == "Linear4bit":
        import bitsandbytes as bnb

        return bnb.functional.dequantize_4bit(weight.data, weight.quant_state)
    if kind == "Linear8bitLt":
        import bitsandbytes as bnb

        # a weight quantized since the last forward (OLoRA's re-quantized residual) still carries
        # its own scales, newer than the layer state's: the forward moves them there first
        scales = weight.SCB if getattr(weight, "SCB", None) is not None else base.state.SCB
        return bnb.functional.int8_vectorwise_dequant(weight.data, scales.to(weight.data.device))
    return weight.data if weight.dtype.is_floating_point else weight.data.float()


def _out_in(base: nn.Module, fan_in_fan_out: bool) -> torch.Tensor:
    dense = dense_weight(base)
    return dense.T if fan_in_fan_out else dense


def magnitude_dtype(base: nn.Module, factors: torch.dtype) -> torch.dtype:
    """The magnitude's dtype, and the one its initial norms are computed in: the promotion of the
    dense weight's (a 4-bit weight dequantizes to its load dtype) and the factors' (peft adds the
    two; observed on peft 0.15.2, 0.18.1, 0.19.0 and 0.21.2: fp32 beside bf16 factors on an fp32
    4-bit model with bf16 storage, fp32 for fp16 factors on a bf16 model)."""
    return torch.promote_types(dense_weight(base).dtype, factors)


def linear_norm(base: nn.Module, fan_in_fan_out: bool, a: torch.Tensor, b: torch.Tensor,
                scaling: float, dtype: torch.dtype, update_in_dtype: bool = True) -> torch.Tensor:
    """Row norms of ``W + scaling * B @ A`` (shape (out,)), computed in ``dtype``.  Under
    autocast ``B @ A`` comes out in the autocast dtype: ``update_in_dtype`` casts it back to
    ``dtype`` before the scaling (peft >= 0.19), else the scaled product is rounded there."""
    work = dtype
    w = _out_in(base, fan_in_fan_out).to(work)
    delta = b.to(work) @ a.to(work)
    delta = (delta.to(work) if update_in_dtype else delta) * scaling
    return torch.linalg.norm(w + delta, dim=1)


def embedding_norm(weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scaling: float,
                   dtype: torch.dtype) -> torch.Tensor:
    """Norms over the vocabulary of ``W + scaling * (B @ A)^T`` (shape (dim,)), computed in
    ``dtype``; A is (r, vocab), B (dim, r), W (vocab, dim)."""
    work = dtype
    delta = (b.to(work) @ a.to(work)).T * scaling
    return torch.linalg.norm(weight.to(work) + delta, dim=0)


def linear_update(base: nn.Module, fan_in_fan_out: bool, lora_a: nn.Linear, lora_b: nn.Linear,
                  scaling: float, magnitude: torch.Tensor, dropped: torch.Tensor,
                  base_result: torch.Tensor | None, update_in_dtype: bool = True) -> torch.Tensor:
    """What DoRA adds to ``base(x)`` for a Linear-like layer, given the dropped-out input
    (already in the factors' dtype).

    ``base_result`` is the base layer's own output without its bias, reused where dropout
    changes nothing (no dropout, or eval mode: so a bitsandbytes layer's rounding in its
    compute dtype carries over); None recomputes ``W x_d`` from the dense weight in the
    factors' dtype.  ``update_in_dtype``: :func:`linear_norm`."""
    dtype = lora_a.weight.dtype
    with torch.no_grad():
        norm = linear_norm(base, fan_in_fan_out, lora_a.weight, lora_b.weight, scaling, dtype, update_in_dtype)
    scale = magnitude / norm
    if base_result is None:
        base_result = F.linear(dropped, _out_in(base, fan_in_fan_out).to(dtype))
    # the magnitude's scale first, then the LoRA scaling: under bf16 autocast the product is then
    # rounded once, in the scale's (fp32) dtype, as peft's order has it
    return (scale - 1) * base_result + scale * lora_b(lora_a(dropped)) * scaling


def merged_delta(magnitude: torch.Tensor, dense: torch.Tensor, delta: torch.Tensor, per_column: bool) -> torch.Tensor:
    """What merging a DoRA adapter adds to the dense weight: ``(m / n) * (W + delta) - W``,
    ``n`` the norms per output feature (per row of (out, in); per column where the weight is
    laid out (in, out) or is an embedding's (vocab, dim))."""
    total = dense.to(delta.dtype) + delta
    norm = torch.linalg.norm(total.float(), dim=0 if per_column else 1)
    scale = (magnitude.detach().float() / norm).to(delta.dtype)
    scale = scale[None, :] if per_column else scale[:, None]
    return scale * total - dense.to(delta.dtype)
