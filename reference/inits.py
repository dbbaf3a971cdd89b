"""``init_lora_weights`` beyond the default: the variants that work offline.

* ``True`` (default): A kaiming-uniform, B zero.  ``"gaussian"``: A normal with std ``1/r``,
  B zero.  ``False``: both random (the update is not zero).  (``reference.layers``.)
* ``"olora"`` (Büyükakyüz 2024, "OLoRA"): the QR decomposition ``W = Q R`` of the dense base
  weight (dequantized on bitsandbytes, in the (out, in) layout), in fp32.  ``B = Q[:, :r]``
  (orthonormal columns), ``A = R[:r]`` (upper triangular), and the base keeps the residual
  ``W - scaling * B A`` (re-quantized from fp32 on bitsandbytes), so the adapted layer still
  computes ``W`` at init.  Case-insensitive.
* ``"pissa"`` (Meng et al. 2024, "PiSSA"): the singular value decomposition
  ``W = U diag(S) V^T`` in fp32; with ``S' = S[:r] / scaling``, ``A = diag(sqrt(S')) V^T[:r]``
  and ``B = U[:, :r] diag(sqrt(S'))``, so ``scaling * B A`` is the best rank-r approximation
  of W and the base keeps the residual, rounded back to its dtype.  A quantized base is
  refused (PiSSA is meant to run before quantizing the residual).
* ``"pissa_niter_K"`` (fast PiSSA): as ``"pissa"``, with the rank-r factors of torch's randomized
  SVD ``torch.svd_lowrank(W, q=r, niter=K)`` (random draws: the two sides' values differ; their
  residuals hold alike).  Any string ``pissa...`` other than ``"pissa"`` is split at
  ``"_niter_"``: two parts make ``K = int(second)`` (Python's reading: ``" 2"``, ``"+2"`` and
  ``"-1"``, which does no power iteration, are accepted; ``""`` or ``"x"`` is a ValueError),
  any other count is a ValueError.  Both are raised by the first Linear-like layer (an
  Embedding takes its default first), after a quantized base is refused as for ``"pissa"``.
  Case-sensitive: ``"PISSA_NITER_2"`` is an unknown init.
* ``"loftq"``: ``reference.loftq``.
* ``"orthogonal"`` (peft >= 0.17): with ``Q`` a random orthogonal (r, r) matrix whose rows are
  split in two halves ``Q1``, ``Q2``, ``A = (X1 Q1)^T / 10`` and ``B = (X2 Q2) / 10`` with
  ``X1`` (in, r/2) and ``X2`` (out, r/2) standard normal: each factor has rank r/2 and
  ``B A = X2 Q2 Q1^T X1^T / 100 = 0``, since the halves of an orthogonal matrix are
  orthogonal.  The factors are made in the base weight's dtype, then follow the adapter
  dtype policy.  r must be even.

The residual arithmetic is written as the definitions read (scale B, multiply, subtract from
the fp32 weight), so that both sides' residuals agree bit for bit where their QR / SVD do.
An Embedding takes none of these: every value but False gives it the embedding default.
"""

from __future__ import annotations

import torch

from reference.errors import InvalidConfig, QuantizedInitUnsupported

__all__ = ["RESIDUAL_INITS", "check_residual_base", "init_kind", "orthogonal_factors", "pissa_niter", "residual_factors",
           "variant_family", "write_residual"]

RESIDUAL_INITS = ("olora", "pissa", "pissa_niter", "loftq")
"""The init kinds that move part of the base weight into the factors."""

_PLAIN = {True: "default", False: "none"}


def init_kind(init: object, variants: tuple[str, ...]) -> str:
    """``default``, ``none``, ``gaussian`` or one of the profile's ``variants``
    (``olora``, ``pissa``, ``pissa_niter``, ``loftq``, ``orthogonal``); anything else is an
    unknown init."""
    if init is True or init is False:
        return _PLAIN[init]
    family = variant_family(init, variants)  # (a malformed "pissa..." count raises later: pissa_niter)
    if family is not None:
        return family
    if isinstance(init, str) and init.lower() == "gaussian":
        return "gaussian"
    raise InvalidConfig("unknown_init", f"Unknown initialization init_lora_weights={init!r}")


def variant_family(init: object, variants: tuple[str, ...]) -> str | None:
    """The profile variant ``init`` names (``"pissa_niter"`` for any other ``pissa...`` string,
    well formed or not), or None."""
    if not isinstance(init, str):
        return None
    name = init.lower() if init.lower() == "olora" else init
    if name.startswith("pissa") and name != "pissa":
        name = "pissa_niter"
    return name if name in variants else None


def pissa_niter(init: str) -> int:
    """K of ``"pissa_niter_K"`` (module docstring)."""
    parts = init.split("_niter_")
    if len(parts) != 2:
        raise InvalidConfig("pissa_malformed", f"init_lora_weights should be 'pissa' or 'pissa_niter_[number of iters]', "
                                               f"got {init!r}")
    try:
        return int(parts[1])
    except ValueError:
        raise InvalidConfig("pissa_niter_not_int", f"init_lora_weights={init!r}: the count after '_niter_' is "
                                                   "not an integer") from None


def residual_factors(kind: str, weight: torch.Tensor, r: int, scaling: float,
                     niter: int | None = None) -> tuple[torch.Tensor, ...]:
    """(A, B, residual) in fp32 for ``olora`` / ``pissa`` / ``pissa_niter`` (``niter`` power
    iterations) from the dense (out, in) weight."""
    w = weight.detach().to(torch.float32)
    if kind == "olora":
        q, rr = torch.linalg.qr(w)
        b, a = q[:, :r].contiguous(), rr[:r].contiguous()
    elif kind in ("pissa", "pissa_niter"):
        if kind == "pissa":
            u, s, vh = torch.linalg.svd(w, full_matrices=False)
            u, s, vh = u[:, :r], s[:r], vh[:r]
        else:
            u, s, v = torch.svd_lowrank(w, q=r, niter=niter)
            vh = v.T
        root = torch.sqrt(s / scaling)
        a = torch.diag(root) @ vh
        b = u @ torch.diag(root)
    else:
        raise ValueError(f"{kind!r} keeps the base weight")
    return a, b, w - (scaling * b) @ a


def check_residual_base(kind: str, base: torch.nn.Module) -> None:
    """PiSSA refuses a quantized base (peft's TypeError; peft lets a 4-bit weight with a float
    storage dtype through, a registry entry)."""
    if kind in ("pissa", "pissa_niter") and type(base).__module__.startswith("bitsandbytes"):
        raise QuantizedInitUnsupported(
            "PiSSA needs a float32, float16 or bfloat16 base weight: initialize it before quantizing, "
            "then quantize the residual"
        )


def write_residual(base: torch.nn.Module, residual: torch.Tensor, fan_in_fan_out: bool) -> None:
    """Store the (out, in) fp32 residual as the base layer's weight: a bitsandbytes weight is
    re-quantized from fp32 with its own settings, a plain one rounded to its dtype (and
    transposed back for ``Conv1D``)."""
    weight = base.weight
    cls = type(weight).__name__
    if cls == "Params4bit":
        base.weight = type(weight)(residual, requires_grad=False, quant_type=weight.quant_type,
                                   quant_storage=weight.quant_storage, compress_statistics=weight.compress_statistics,
                                   blocksize=weight.blocksize, module=weight.module).to(weight.device)
    elif cls == "Int8Params":
        base.weight = type(weight)(residual, requires_grad=False,
                                   has_fp16_weights=weight.has_fp16_weights).to(weight.device)
    else:
        value = residual.T if fan_in_fan_out else residual
        weight.data = value.to(weight.dtype).contiguous()


def orthogonal_factors(in_features: int, out_features: int, r: int, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """(A, B) of the orthogonal init (module docstring), in ``dtype``."""
    if r % 2:
        raise InvalidConfig("orthogonal_odd_rank", f"the orthogonal init needs an even LoRA rank, got r={r}")
    q, _ = torch.linalg.qr(torch.randn(r, r))
    half = r // 2
    a = (torch.randn(in_features, half) @ q[:half]).T / 10.0
    b = (torch.randn(out_features, half) @ q[half:]) / 10.0
    return a.contiguous().to(dtype), b.contiguous().to(dtype)
