"""Which LoRA layer wraps which base module: an ordered list, first match wins.

bitsandbytes is optional: its classes are looked up lazily and a missing package
simply means its dispatchers never match.
"""

from __future__ import annotations

from typing import Callable

from torch import nn

from reference.errors import UnsupportedModule
from reference.layers import LoraEmbedding, LoraLinear
from reference.notices import warn

__all__ = ["DISPATCH_ORDER", "SUPPORTED_KINDS", "wrap"]


def _bnb_class(name: str) -> type | None:
    try:
        import bitsandbytes as bnb
    except ImportError:  # bitsandbytes is optional
        return None
    return getattr(bnb.nn, name, None)


def _is_bnb(module: nn.Module, name: str) -> bool:
    cls = _bnb_class(name)
    return cls is not None and isinstance(module, cls)


def _bnb_8bit(module: nn.Module, fan_in_fan_out: bool) -> nn.Module | None:
    if not _is_bnb(module, "Linear8bitLt"):
        return None
    return LoraLinear(module, module.in_features, module.out_features, fan_in_fan_out=False)


def _bnb_4bit(module: nn.Module, fan_in_fan_out: bool) -> nn.Module | None:
    if not _is_bnb(module, "Linear4bit"):
        return None
    return LoraLinear(module, module.in_features, module.out_features, fan_in_fan_out=False)


def _embedding(module: nn.Module, fan_in_fan_out: bool) -> nn.Module | None:
    if not isinstance(module, nn.Embedding):
        return None
    layer = LoraEmbedding(module)
    layer.fan_in_fan_out = fan_in_fan_out
    return layer


def _linear(module: nn.Module, fan_in_fan_out: bool) -> nn.Module | None:
    if not isinstance(module, nn.Linear):
        return None
    if fan_in_fan_out:
        warn("linear_fan_in_fan_out", "fan_in_fan_out=True but the target is an nn.Linear: setting it to False")
    return LoraLinear(module, module.in_features, module.out_features, fan_in_fan_out=False)


def _conv1d(module: nn.Module, fan_in_fan_out: bool) -> nn.Module | None:
    if not (type(module).__name__ == "Conv1D" and type(module).__module__.startswith("transformers")):
        return None
    if not fan_in_fan_out:
        warn("conv1d_fan_in_fan_out", "fan_in_fan_out=False but the target is a Conv1D: setting it to True")
    in_features, out_features = module.weight.shape
    return LoraLinear(module, int(in_features), int(out_features), fan_in_fan_out=True)


Dispatcher = Callable[[nn.Module, bool], "nn.Module | None"]

# Quantized backends first: a bnb Linear is also an nn.Linear.
DISPATCH_ORDER: tuple[tuple[str, Dispatcher], ...] = (
    ("bnb8bit", _bnb_8bit),
    ("bnb4bit", _bnb_4bit),
    ("embedding", _embedding),
    ("linear", _linear),
    ("conv1d", _conv1d),
)
SUPPORTED_KINDS = tuple(kind for kind, _ in DISPATCH_ORDER)


def wrap(name: str, module: nn.Module, fan_in_fan_out: bool, embedding_keeps_flag: bool = True) -> tuple[nn.Module, bool]:
    """The LoRA layer for ``module`` and the ``fan_in_fan_out`` flag the next module sees.

    Upstream keeps one flag for the whole model and rewrites it as it goes (peft
    0.21: a Linear sets it False, a Conv1D True, in ``named_modules`` order), and
    layers that do not use it (Embedding, bitsandbytes) record whatever it is at
    their turn.  The reference threads the flag the same way, so each layer's
    recorded value is reproducible.  Raises :class:`UnsupportedModule` when no
    layer fits.
    """
    for kind, dispatch in DISPATCH_ORDER:
        layer = dispatch(module, fan_in_fan_out)
        if layer is not None:
            if kind == "embedding" and not embedding_keeps_flag:
                layer.fan_in_fan_out = False  # peft 0.15: the Embedding layer ignores the flag
            # bitsandbytes layers never transpose and leave the shared flag alone.
            passes = kind in ("bnb8bit", "bnb4bit", "embedding")
            return layer, fan_in_fan_out if passes else bool(layer.fan_in_fan_out)
    raise UnsupportedModule(
        f"Target module {name!r} ({type(module).__name__}) is not supported; "
        f"LoRA wraps: {', '.join(SUPPORTED_KINDS)}"
    )
