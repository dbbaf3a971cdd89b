"""The single home of the small numeric rules: scaling and the adapter dtype policy."""

from __future__ import annotations

import math

import torch

__all__ = ["adapter_dtype", "scaling"]

_HALF = (torch.float16, torch.bfloat16)


def scaling(alpha: float, r: int, use_rslora: bool) -> float:
    """LoRA's output scale: ``alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA.

    rsLoRA (Kalajdzievski 2023) keeps the update's magnitude stable as r grows.
    """
    return alpha / math.sqrt(r) if use_rslora else alpha / r


def adapter_dtype(base_weight_dtype: torch.dtype, autocast: bool) -> torch.dtype:
    """The dtype of freshly created LoRA factors next to a base weight.

    Factors are created in fp32, then follow the base weight's dtype when that is
    a floating dtype (a 4-bit weight with a float *quant storage* counts: its
    storage dtype is float).  With ``autocast_adapter_dtype`` (peft >= 0.12) fp16
    and bf16 factors are then promoted back to fp32 for stable training.
    """
    dtype = base_weight_dtype if base_weight_dtype.is_floating_point else torch.float32
    if autocast and dtype in _HALF:
        dtype = torch.float32
    return dtype
