"""``init_lora_weights="loftq"`` (Li et al. 2023, "LoftQ") with ``loftq_config``.

``loftq_config = {"loftq_bits": b, "loftq_iter": n}``.  On the dense (out, in) weight ``W`` in
fp32: ``Q_1 = deq(quant(W))``; for ``i = 1 .. n``, ``B_i A_i`` is the best rank-r approximation
of ``W - Q_i`` (SVD ``U diag(S) V^T``: ``B = U_r diag(sqrt(S_r))``, ``A = diag(sqrt(S_r)) V^T_r``)
and ``Q_{i+1} = deq(quant(W - B_i A_i))``.  The factors are ``A_n``, ``B_n``, *not* divided by
the scaling (observed in peft 0.15.2 and 0.21.2: the adapted layer computes
``Q_n + scaling * B A``, which is ``W`` up to the rank-r truncation only where the scaling is 1),
and the base weight becomes ``Q_n`` in its own dtype.

Quantizers, per profile (``Profile.loftq_quantizers``):

* ``normal-float`` (peft < 0.20, 2 and 8 bits): the flattened weight in blocks of 64, each
  divided by its largest magnitude and rounded to the nearest value (the first on a tie) of
  the normal-float table of ``2^b`` values: the quantiles ``Phi^-1(p)`` at ``2^(b-1)`` evenly
  spaced ``p`` from ``0.9677083`` to ``0.5`` (the last left out) for the positive half, zero, and
  at ``2^(b-1) - 1`` such ``p`` negated for the negative half, normalised by the largest
  (computed as the spacings in fp32, the quantiles in fp64, the table in fp32).  The weight's
  size must be a multiple of 64.
* ``nf4`` (4 bits): bitsandbytes' nf4 with blocks of 64 and no double quantization;
  ``int8`` (8 bits, peft >= 0.20): bitsandbytes' row-wise LLM.int8.  Upstream computes both on
  CUDA whatever the model's device, so without CUDA they raise (``LoftQNeedsCuda``).

An Embedding or a Conv layer is not modelled (peft 0.15 ignores the config there, peft 0.21
raises a TypeError; see the README).
"""

from __future__ import annotations

import importlib.util
from typing import Any

import torch

from reference.errors import InvalidConfig, LoftQNeedsCuda, LoftQNeedsScipy

__all__ = ["BLOCK", "check_config", "loftq_factors", "normal_float_table", "quantize_dequantize"]

BLOCK = 64
"""The block size of the normal-float quantizer and of the nf4 one."""
_OFFSET = 0.9677083


def check_config(config: Any) -> None:
    """The config-time checks of ``init_lora_weights="loftq"`` (peft 0.15 - 0.21): scipy must be
    importable (peft checks for it, even 0.20+ whose quantizers no longer use it), then a
    non-empty ``loftq_config`` must be given."""
    if importlib.util.find_spec("scipy") is None:
        raise LoftQNeedsScipy("init_lora_weights='loftq' needs scipy installed (peft checks for it)")
    if not config:
        raise InvalidConfig("loftq_config_missing",
                            f"init_lora_weights='loftq' needs a loftq_config, got loftq_config={config!r}")


def normal_float_table(bits: int) -> torch.Tensor:
    """The ``2^bits`` normal-float values in [-1, 1], ascending, fp32 (module docstring)."""
    half = 2 ** (bits - 1)
    positive = torch.special.ndtri(torch.linspace(_OFFSET, 0.5, half + 1)[:-1].double())
    negative = -torch.special.ndtri(torch.linspace(_OFFSET, 0.5, half)[:-1].double())
    values = torch.cat([positive, torch.zeros(1, dtype=torch.float64), negative]).float()
    values = values.sort().values
    return values / values.max()


def _normal_float(w: torch.Tensor, bits: int) -> torch.Tensor:
    if w.numel() % BLOCK:
        raise InvalidConfig("loftq_block_size",
                            f"LoftQ's normal-float quantizer needs a weight size divisible by {BLOCK}, got {tuple(w.shape)}")
    table = normal_float_table(bits).to(w.device)
    blocks = w.reshape(-1, BLOCK)
    scale = blocks.abs().max(dim=-1).values.unsqueeze(-1)
    index = torch.argmin((blocks / scale).unsqueeze(-1).sub(table).abs(), dim=-1)
    return (table[index] * scale).reshape(w.shape)


def _on_cuda(w: torch.Tensor) -> torch.Tensor:
    if not torch.cuda.is_available():
        raise LoftQNeedsCuda("LoftQ's bitsandbytes quantizers run on CUDA (peft moves the weight there), "
                             "and CUDA is not available")
    return w.cuda()


def quantize_dequantize(w: torch.Tensor, bits: int, quantizer: str) -> torch.Tensor:
    """``deq(quant(w))`` of the fp32 (out, in) ``w`` with the named quantizer (module docstring)."""
    if quantizer == "normal-float":
        return _normal_float(w, bits)
    import bitsandbytes.functional as bnbf

    on = _on_cuda(w)
    if quantizer == "nf4":
        packed, state = bnbf.quantize_4bit(on, blocksize=BLOCK, compress_statistics=False, quant_type="nf4")
        return bnbf.dequantize_4bit(packed, state).to(w.device)
    if quantizer == "int8":
        codes, scales, _ = bnbf.int8_vectorwise_quant(on)
        return bnbf.int8_vectorwise_dequant(codes, scales).to(w.device)
    raise ValueError(f"quantizer={quantizer!r} is not normal-float, nf4 or int8")


def _rank_r(res: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    u, s, vh = torch.linalg.svd(res, full_matrices=False)
    root = torch.sqrt(s[:r])
    return u[:, :r] * root, root.unsqueeze(-1) * vh[:r]


def loftq_factors(weight: torch.Tensor, r: int, config: Any,
                  quantizers: tuple[tuple[int, str], ...]) -> tuple[torch.Tensor, ...]:
    """(A, B, dequantized base) in fp32 from the dense (out, in) ``weight``; ``config`` is the
    ``loftq_config`` mapping, ``quantizers`` the profile's (bits, quantizer) pairs."""
    config = dict(config)
    bits, steps = config.get("loftq_bits", 4), config.get("loftq_iter", 1)
    by_bits = dict(quantizers)
    if bits not in by_bits:
        raise InvalidConfig("loftq_bits", f"loftq_bits={bits!r} is not one of {sorted(by_bits)}")
    if steps <= 0:
        raise InvalidConfig("loftq_iter", f"loftq_iter={steps!r} must be at least 1")
    w = weight.detach().to(torch.float32)
    target = w
    for _ in range(steps):
        base = quantize_dequantize(target, bits, by_bits[bits])
        b, a = _rank_r(w - base, r)
        target = w - torch.mm(b, a)
    return a.contiguous(), b.contiguous(), base
