"""Facts of a prepared model beyond shapes and flags: values, buffers, checkpointing kwargs,
hooks, config writes, and the adapter config the PEFT wrapper stores.

Values are read *relative to the loaded model* (the pristine model both sides were copied
from, ``conformance.engine.models.pristine_model``): a parameter or buffer is ``equal``
when it holds the loaded value at its path (rounded to its own dtype, so an exact upcast
or a bf16 cast is ``equal``), ``changed: ...`` when preparation changed it (with a
fingerprint, so that two different changes differ), or ``new`` when the loaded model has
no counterpart (LoRA factors: their values are the numerical checks' business).  Paths
map through PEFT's wrappers: ``x.base_layer.weight``, ``x.original_module.weight``,
``x.token_adapter.base_layer.weight`` and ``x.modules_to_save.<adapter>.weight`` all read
``x.weight`` of the loaded model, so a
saved copy is checked against its original.  Reading relative values keeps the facts
stack-independent (the regression gate compares them across transformers versions,
whose random inits differ).
"""

from __future__ import annotations

import hashlib
import re
import weakref
from dataclasses import dataclass
from typing import Any, Iterable

import torch
from torch import nn

__all__ = [
    "ADAPTER_CONFIG_KEYS",
    "checkpointing_kwargs",
    "config_writes",
    "hooks_of",
    "loaded_state",
    "normal_value",
    "normalise_config",
    "pristine_path",
    "value_relation",
]

_WRAPPER_SEGMENT = re.compile(r"\.(base_layer|original_module|token_adapter|modules_to_save\.[^.]+)(?=\.)")


def pristine_path(path: str) -> str:
    """The loaded model's path of a prepared model's tensor (PEFT's wrapper segments removed)."""
    previous = None
    while previous != path:
        previous, path = path, _WRAPPER_SEGMENT.sub("", path, count=1)
    return path


def _raw(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().reshape(-1).view(torch.uint8) if t.numel() else t.detach()


def _fingerprint(t: torch.Tensor) -> str:
    data = t.detach()
    digest = hashlib.sha256(_raw(data).cpu().numpy().tobytes()).hexdigest()[:10]
    if data.dtype.is_floating_point and data.numel():
        d = data.double()
        return f"mean {float(d.mean()):.4g} max|x| {float(d.abs().max()):.4g} sha {digest}"
    return f"sha {digest}"


def value_relation(tensor: torch.Tensor, original: torch.Tensor | None, *, fingerprint_new: bool = False) -> str:
    """``equal``, ``changed: <fingerprint> (loaded: <fingerprint>)`` or ``new`` (see the module docstring);
    with ``fingerprint_new``, a new tensor is ``new: <fingerprint>`` (values both sides must agree on,
    such as the factors of an adapter loaded from a file).

    Packed bitsandbytes tensors (4-bit, int8, whatever their storage dtype) compare their
    stored bytes and their quantization state; floating ones compare bits after rounding
    the loaded value to the tensor's own dtype (so an unchanged NaN is ``equal``)."""
    if original is None or tuple(original.shape) != tuple(tensor.shape):
        return f"new: {_fingerprint(tensor)}" if fingerprint_new else "new"
    if _packed(tensor) or _packed(original) or not (tensor.dtype.is_floating_point and original.dtype.is_floating_point):
        same = tensor.dtype == original.dtype and torch.equal(_raw(tensor), _raw(original).to(tensor.device))
        same = same and _same_quant_state(tensor, original)
    else:
        rounded = original.detach().to(device=tensor.device, dtype=tensor.dtype)
        # Bitwise: a NaN held unchanged is equal, and -0.0 is not 0.0.
        same = torch.equal(_raw(tensor), _raw(rounded))
    if same:
        return "equal"
    return f"changed: {_fingerprint(tensor)} (loaded: {_fingerprint(original)})"


def _packed(t: torch.Tensor) -> bool:
    """A bitsandbytes tensor whose storage is packed, whatever its dtype: a 4-bit weight kept in
    a float ``quant_storage`` (bf16, fp16, fp32) is bytes, not floats, and may read as NaN."""
    return getattr(t, "quant_state", None) is not None or type(t).__name__ in ("Params4bit", "Int8Params")


def _same_quant_state(a: torch.Tensor, b: torch.Tensor) -> bool:
    qa, qb = getattr(a, "quant_state", None), getattr(b, "quant_state", None)
    if (qa is None) != (qb is None):
        return False
    if qa is not None:
        da, db = qa.as_dict(packed=True), qb.as_dict(packed=True)
        if da.keys() != db.keys() or not all(torch.equal(da[k].cpu(), db[k].cpu()) for k in da):
            return False
    sa, sb = getattr(a, "SCB", None), getattr(b, "SCB", None)
    if (sa is None) != (sb is None):
        return False
    return sa is None or torch.equal(sa.cpu(), sb.cpu())


def checkpointing_kwargs(model: nn.Module) -> tuple[tuple[str, str], ...] | None:
    """The kwargs of the checkpoint function transformers installed on the checkpointed
    blocks (``use_reentrant``...), or None when no module checkpoints.  transformers sets
    ``_gradient_checkpointing_func = partial(checkpoint, **kwargs)`` on every module with a
    ``gradient_checkpointing`` flag (4.35+)."""
    for module in model.modules():
        if getattr(module, "gradient_checkpointing", False) is True:
            func = getattr(module, "_gradient_checkpointing_func", None)
            keywords = getattr(func, "keywords", None)
            if keywords is None:
                return (("<function>", getattr(func, "__name__", type(func).__name__)),)
            return tuple(sorted((str(k), repr(v)) for k, v in keywords.items()))
    return None


def _hook_name(hook: Any) -> str:
    inner = getattr(hook, "func", hook)  # functools.partial
    return getattr(inner, "__qualname__", None) or getattr(inner, "__name__", None) or type(inner).__name__


def hooks_of(model: nn.Module) -> tuple[tuple[str, str, str], ...]:
    """Every forward / pre-forward / backward hook on the model's modules: (path, kind, function),
    each once.  A hook registered twice (``enable_input_require_grads`` called again by trl, by
    transformers 5's ``gradient_checkpointing_enable`` and by peft) acts once more on the same
    tensor to the same effect; which hooks exist is the fact, not how often they were added."""
    out = []
    for path, module in model.named_modules():
        for kind, hooks in (("forward", module._forward_hooks), ("forward_pre", module._forward_pre_hooks),
                            ("backward", module._backward_hooks), ("backward_pre", module._backward_pre_hooks)):
            out.extend((path, kind, _hook_name(h)) for h in hooks.values())
    return tuple(sorted(set(out)))


# Keys that say where a config came from, not what preparation did to it: a trainer that
# loads a checkpoint itself records its path, the architectures the checkpoint names and the
# dtype it loaded in (the parameters' dtypes are compared directly).
_CONFIG_PROVENANCE = frozenset({"_name_or_path", "transformers_version", "_commit_hash", "name_or_path",
                                "architectures", "torch_dtype", "dtype"})


def _config_dict(config: Any) -> dict[str, Any]:
    to_dict = getattr(config, "to_dict", None)
    return to_dict() if to_dict is not None else {}


def config_writes(model: nn.Module, pristine: nn.Module | None) -> tuple[tuple[str, str], ...]:
    """The ``model.config`` keys whose values differ from the loaded model's, as (key, repr(value))."""
    if pristine is None:
        return ()
    now, before = _config_dict(getattr(model, "config", None)), loaded_state(pristine).config
    out = []
    for key in sorted(now.keys() | before.keys()):
        if key in _CONFIG_PROVENANCE:
            continue
        if key not in before or key not in now or now[key] != before[key]:
            out.append((key, repr(now.get(key, "<absent>"))))
    return tuple(out)


ADAPTER_CONFIG_KEYS = (
    "r", "lora_alpha", "lora_dropout", "target_modules", "exclude_modules", "layers_to_transform",
    "layers_pattern", "rank_pattern", "alpha_pattern", "modules_to_save", "bias", "lora_bias", "use_rslora",
    "use_dora", "init_lora_weights", "fan_in_fan_out", "task_type", "inference_mode", "target_parameters",
    "trainable_token_indices", "ensure_weight_tying",
)
"""The ``LoraConfig`` fields compared as stored on the PEFT model (what ``save_pretrained`` writes
to ``adapter_config.json``), where preparation resolves or rewrites some of them."""
OPTIONAL_CONFIG_KEYS = frozenset({"target_parameters", "ensure_weight_tying"})
"""Fields some supported peft releases lack (``target_parameters``: peft >= 0.17): compared only
when both sides have them."""


def normal_value(value: Any) -> Any:
    """One spelling per stored value: collections become sorted tuples (a set, a list and a
    tuple of the same names are the same config), mappings sorted pairs, empty ones None,
    enums their value."""
    value = getattr(value, "value", value) if type(value).__name__ == "TaskType" else value
    if isinstance(value, dict):
        return tuple(sorted((str(k), normal_value(v)) for k, v in value.items())) or None
    if isinstance(value, (list, tuple, set, frozenset)):
        items = [normal_value(v) for v in value]
        return tuple(sorted(set(items), key=repr)) or None
    return value


def normalise_config(config: dict[str, Any]) -> tuple[tuple[str, Any], ...]:
    """The compared fields of a stored adapter config, normalised; fields the config lacks are left out."""
    return tuple((key, normal_value(config[key])) for key in ADAPTER_CONFIG_KEYS if key in config)


def tensors_by_path(model: nn.Module, *, buffers: bool = False) -> dict[str, torch.Tensor]:
    items: Iterable[tuple[str, torch.Tensor]] = model.named_buffers() if buffers else model.named_parameters()
    return dict(items)


@dataclass(frozen=True)
class LoadedState:
    """What the facts read of a loaded model: its parameters and buffers by path, and its config."""

    params: dict[str, torch.Tensor]
    buffers: dict[str, torch.Tensor]
    config: dict[str, Any]


_LOADED: weakref.WeakKeyDictionary[nn.Module, LoadedState] = weakref.WeakKeyDictionary()


def loaded_state(pristine: nn.Module) -> LoadedState:
    """:class:`LoadedState` of ``pristine``, read once per model object: a loaded model is never
    changed (``conformance.engine.models.pristine_model``), and both sides' snapshots of every
    case that starts from it compare with it (``config.to_dict()`` alone is a deep copy)."""
    state = _LOADED.get(pristine)
    if state is None:
        state = LoadedState(tensors_by_path(pristine), tensors_by_path(pristine, buffers=True),
                            _config_dict(getattr(pristine, "config", None)))
        _LOADED[pristine] = state
    return state
