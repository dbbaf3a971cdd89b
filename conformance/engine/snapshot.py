"""Canonical snapshots of prepared models.

A :class:`Snapshot` is an immutable, JSON-serialisable description of what a
preparation produced.  The same function, :func:`snapshot_of`, reads both the
reference's model and upstream's: both use PEFT's public module layout
(``base_layer``, ``lora_A``/``lora_B`` ModuleDicts, ``lora_embedding_A``/``_B``,
``original_module``/``modules_to_save``), so the snapshot duck-types on it and
never imports peft.
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass
from typing import Any, Iterable

import torch
from torch import nn

from conformance.engine.facts import (
    checkpointing_kwargs,
    config_writes,
    hooks_of,
    loaded_state,
    pristine_path,
    value_relation,
)

__all__ = [
    "AdapterFacts",
    "BufferFacts",
    "ErrorFacts",
    "LoraModuleFacts",
    "ModelFacts",
    "ParamFacts",
    "PeftFacts",
    "SavedModuleFacts",
    "TokenWrapperFacts",
    "Snapshot",
    "error_snapshot",
    "snapshot_of",
]


@dataclass(frozen=True)
class ParamFacts:
    """One parameter of the prepared model."""

    path: str
    shape: tuple[int, ...]
    dtype: str
    requires_grad: bool
    cls: str
    """``plain``, ``Params4bit`` or ``Int8Params``."""
    quant: tuple[tuple[str, Any], ...] = ()
    """4-bit quant state: quant type, blocksize, original dtype, nested (double quant)."""
    value: str = ""
    """What preparation did to the value, against the loaded model (``conformance.engine.facts``):
    ``equal``, ``changed: ...`` or ``new`` (empty when no loaded model was given)."""


@dataclass(frozen=True)
class BufferFacts:
    """One buffer of the prepared model (rotary frequencies, position ids...)."""

    path: str
    shape: tuple[int, ...]
    dtype: str
    value: str = ""
    """As :attr:`ParamFacts.value`."""


@dataclass(frozen=True)
class AdapterFacts:
    """One adapter of one LoRA-wrapped module."""

    r: int
    alpha: float
    scaling: float
    dropout: str
    """``identity`` or ``dropout(p)``."""
    lora_bias: bool
    a_shape: tuple[int, ...]
    a_dtype: str
    b_shape: tuple[int, ...]
    b_dtype: str
    init: str
    """Which factors are zero at init: ``A=nonzero,B=zero`` and so on."""


@dataclass(frozen=True)
class LoraModuleFacts:
    """One LoRA-wrapped module."""

    path: str
    kind: str
    """linear, conv1d, embedding, bnb4bit, bnb8bit, or the base class name."""
    in_features: int
    out_features: int
    fan_in_fan_out: bool
    base: tuple[tuple[str, Any], ...]
    """Facts of a quantized base: compute dtype, quant type, compress statistics..."""
    adapters: tuple[tuple[str, AdapterFacts], ...]


@dataclass(frozen=True)
class SavedModuleFacts:
    """One modules-to-save wrapper: a trainable copy beside the frozen original."""

    path: str
    adapters: tuple[str, ...]


@dataclass(frozen=True)
class TokenWrapperFacts:
    """One module wrapped for trainable token rows (``trainable_token_indices``)."""

    path: str
    base_kind: str
    """``embedding``, ``linear``, ``saved module`` (a modules-to-save wrapper) or the wrapped
    module's class name."""
    tied: bool
    """It shares another wrapper's trainable rows (a tied output embedding, an aliased embedding)."""
    indices: tuple[tuple[str, tuple[int, ...]], ...]
    """(adapter, row indices) of each adapter."""


@dataclass(frozen=True)
class ModelFacts:
    """Model-level facts of the prepared transformers model."""

    gradient_checkpointing: bool
    input_grads: bool | str
    """Input embeddings produce outputs that require grad (``error: <class>`` if they fail)."""
    loaded_in_4bit: bool
    loaded_in_8bit: bool
    trainable_params: int
    total_params: int
    trainer_gradient_checkpointing: bool | None = None
    """trl level: the trainer's final ``args.gradient_checkpointing`` (None at the peft level)."""
    gradient_checkpointing_kwargs: tuple[tuple[str, str], ...] | None = None
    """The kwargs of the installed checkpoint function (``use_reentrant``...), None when off."""
    hooks: tuple[tuple[str, str, str], ...] = ()
    """Every module hook: (path, kind, function name)."""
    config_writes: tuple[tuple[str, str], ...] = ()
    """``model.config`` keys preparation changed (``use_cache``, ``output_router_logits``...), with their new values."""
    shared_storage: tuple[str, ...] = ()
    """Groups of parameter paths (``a = b``) whose tensors start at the same storage address: one
    Parameter reached under two names (tied embeddings), or tied adapters sharing factors."""
    model_training: bool | None = None
    """The prepared model's own ``training`` flag (a loaded model is in eval mode)."""
    lora_training: bool | str | None = None
    """The LoRA layers' ``training`` flags: True (all), False (none), ``mixed``; None without
    LoRA layers.  New layers train; ``from_pretrained(is_trainable=False)`` puts all in eval."""


@dataclass(frozen=True)
class PeftFacts:
    """What the PEFT wrapper around the prepared model holds."""

    wrapper: str
    """The wrapper's class: ``PeftModelForCausalLM``... (``PeftModel`` without a task type)."""
    active_adapters: tuple[str, ...]
    adapter_config: tuple[tuple[str, Any], ...]
    """The stored ``LoraConfig`` of the adapter, normalised (``conformance.engine.facts.normalise_config``):
    what ``save_pretrained`` writes to ``adapter_config.json``."""


@dataclass(frozen=True)
class ErrorFacts:
    """A preparation that raised."""

    cls: str
    """The nearest builtin exception class (``ValueError``, ``TypeError``...)."""
    kind: str
    """A stable name for the reason, so two sides' messages can be compared."""
    message: str = dataclasses.field(default="", compare=False)


@dataclass(frozen=True)
class Snapshot:
    """What one side's preparation of one case produced."""

    params: tuple[ParamFacts, ...] = ()
    lora: tuple[LoraModuleFacts, ...] = ()
    saved: tuple[SavedModuleFacts, ...] = ()
    tokens: tuple[TokenWrapperFacts, ...] = ()
    buffers: tuple[BufferFacts, ...] = ()
    model: ModelFacts | None = None
    peft: PeftFacts | None = None
    error: ErrorFacts | None = None
    warnings: tuple[str, ...] = ()
    """Kinds of the warnings the preparation emitted (sorted, unique), e.g. ``conv1d_fan_in_fan_out``."""
    config_mutations: tuple[str, ...] = ()
    """Fields of the user's adapter config that preparation changed in place (the
    reference's specs are immutable: always empty there)."""

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "Snapshot":
        def tup(x: Any) -> Any:
            return tuple(tup(v) for v in x) if isinstance(x, list) else x

        def adapters(items: list) -> tuple:
            return tuple((name, AdapterFacts(**{k: tup(v) for k, v in facts.items()})) for name, facts in items)

        return cls(
            params=tuple(ParamFacts(**{k: tup(v) for k, v in p.items()}) for p in data.get("params", ())),
            lora=tuple(
                LoraModuleFacts(**{k: (adapters(v) if k == "adapters" else tup(v)) for k, v in m.items()})
                for m in data.get("lora", ())
            ),
            saved=tuple(SavedModuleFacts(**{k: tup(v) for k, v in s.items()}) for s in data.get("saved", ())),
            tokens=tuple(TokenWrapperFacts(**{k: tup(v) for k, v in t.items()}) for t in data.get("tokens", ())),
            buffers=tuple(BufferFacts(**{k: tup(v) for k, v in b.items()}) for b in data.get("buffers", ())),
            model=ModelFacts(**{k: tup(v) for k, v in data["model"].items()}) if data.get("model") else None,
            peft=PeftFacts(**{k: tup(v) for k, v in data["peft"].items()}) if data.get("peft") else None,
            error=ErrorFacts(**data["error"]) if data.get("error") else None,
            warnings=tuple(data.get("warnings", ())),
            config_mutations=tuple(data.get("config_mutations", ())),
        )


def _dtype(value: Any) -> str:
    return str(value).removeprefix("torch.") if value is not None else "none"


def _param_facts(path: str, param: nn.Parameter, value: str = "") -> ParamFacts:
    cls = type(param).__name__
    quant: tuple[tuple[str, Any], ...] = ()
    if cls == "Params4bit":
        state = getattr(param, "quant_state", None)
        if state is not None:
            quant = (
                ("quant_type", state.quant_type),
                ("blocksize", int(state.blocksize)),
                ("dtype", _dtype(state.dtype)),
                ("nested", bool(getattr(state, "nested", False))),
            )
    elif cls not in ("Int8Params",):
        cls = "plain"
    return ParamFacts(path, tuple(param.shape), _dtype(param.dtype), bool(param.requires_grad), cls, quant, value)


def _base_kind(base: nn.Module, fan_in_fan_out: bool) -> str:
    name = type(base).__name__
    module = type(base).__module__
    if module.startswith("bitsandbytes"):
        return {"Linear4bit": "bnb4bit", "Linear8bitLt": "bnb8bit"}.get(name, f"bnb:{name}")
    if isinstance(base, nn.Embedding):
        return "embedding"
    if name == "Conv1D" and module.startswith("transformers"):
        return "conv1d"
    if isinstance(base, nn.Linear):
        return "linear"
    return name


def _base_facts(base: nn.Module) -> tuple[tuple[str, Any], ...]:
    kind = type(base).__name__
    if kind == "Linear4bit":
        w = base.weight
        return (
            ("compute_dtype", _dtype(getattr(base, "compute_dtype", None))),
            ("quant_type", getattr(w, "quant_type", None)),
            ("compress_statistics", bool(getattr(w, "compress_statistics", False))),
            ("quant_storage", _dtype(getattr(w, "quant_storage", None))),
        )
    if kind == "Linear8bitLt":
        state = base.state
        return (
            ("threshold", float(state.threshold)),
            ("has_fp16_weights", bool(state.has_fp16_weights)),
        )
    return ()


def _features(base: nn.Module) -> tuple[int, int]:
    if isinstance(base, nn.Embedding):
        return base.num_embeddings, base.embedding_dim
    if type(base).__name__ == "Conv1D":
        w = base.weight
        return int(w.shape[0]), int(w.shape[1])
    return int(getattr(base, "in_features", -1)), int(getattr(base, "out_features", -1))


def _param_host(module: nn.Module) -> nn.Module:
    """The module that owns the parameter a (possibly nested) parameter-level LoRA layer wraps."""
    host = module.base_layer
    while getattr(host, "parameter_name", None) is not None and hasattr(host, "base_layer"):
        host = host.base_layer
    return host


def _param_features(module: nn.Module) -> tuple[int, int]:
    return int(getattr(module, "in_features", -1)), int(getattr(module, "out_features", -1))


def _host_facts(module: nn.Module) -> tuple[tuple[str, Any], ...]:
    host = _param_host(module)
    param = getattr(host, module.parameter_name, None)
    return (
        ("host", type(host).__name__),
        ("num_experts", int(getattr(module, "num_experts", 1))),
        ("shape", tuple(param.shape) if param is not None else ()),
        ("dtype", _dtype(param.dtype) if param is not None else "none"),
    )


def _zero(t: torch.Tensor) -> str:
    return "zero" if not bool(t.detach().float().abs().sum()) else "nonzero"


def _dropout(module: nn.Module) -> str:
    if isinstance(module, nn.Identity):
        return "identity"
    if isinstance(module, nn.Dropout):
        return f"dropout({module.p:g})"
    return type(module).__name__


def _adapter_names(module: nn.Module) -> list[str]:
    names = set(getattr(module, "lora_A", {}).keys()) | set(getattr(module, "lora_embedding_A", {}).keys())
    return sorted(names)


def _adapter_facts(module: nn.Module, name: str) -> AdapterFacts:
    if name in getattr(module, "lora_embedding_A", {}):
        a = module.lora_embedding_A[name]
        b = module.lora_embedding_B[name]
        bias = False
    else:
        a = module.lora_A[name].weight
        lora_b = module.lora_B[name]
        b = lora_b.weight
        bias = getattr(lora_b, "bias", None) is not None
    return AdapterFacts(
        r=int(module.r[name]),
        alpha=float(module.lora_alpha[name]),
        scaling=float(module.scaling[name]),
        dropout=_dropout(module.lora_dropout[name]),
        lora_bias=bias,
        a_shape=tuple(a.shape),
        a_dtype=_dtype(a.dtype),
        b_shape=tuple(b.shape),
        b_dtype=_dtype(b.dtype),
        init=f"A={_zero(a)},B={_zero(b)}",
    )


def _is_lora_layer(module: nn.Module) -> bool:
    return hasattr(module, "base_layer") and (hasattr(module, "lora_A") or hasattr(module, "lora_embedding_A"))


def _is_token_wrapper(module: nn.Module) -> bool:
    adapter = module._modules.get("token_adapter")
    return adapter is not None and hasattr(adapter, "trainable_tokens_delta")


def _token_facts(path: str, wrapper: nn.Module) -> TokenWrapperFacts:
    adapter = wrapper.token_adapter
    base = adapter.base_layer
    kind = ("embedding" if isinstance(base, nn.Embedding) else "linear" if isinstance(base, nn.Linear)
            else "saved module" if _is_saved_wrapper(base) else type(base).__name__)
    indices = tuple((name, tuple(int(i) for i in rows)) for name, rows in sorted(adapter.token_indices.items()))
    return TokenWrapperFacts(path, kind, getattr(adapter, "tied_adapter", None) is not None, indices)


def _is_saved_wrapper(module: nn.Module) -> bool:
    return hasattr(module, "original_module") and isinstance(getattr(module, "modules_to_save", None), nn.ModuleDict)


def _input_grads(model: nn.Module) -> bool | str:
    """Whether the input embeddings' output requires grad (``error: ...`` if the forward fails,
    which then shows up as a divergence rather than crashing the harness)."""
    get = getattr(model, "get_input_embeddings", None)
    emb = get() if get is not None else None
    if emb is None:
        return False
    weight = next((p for p in emb.parameters()), None)
    device = weight.device if weight is not None else "cpu"
    try:
        with torch.enable_grad():
            out = emb(torch.tensor([[1, 2]], device=device))
    except Exception as exc:  # noqa: BLE001 - a broken embedding is a fact to compare
        return f"error: {type(exc).__name__}"
    return bool(out.requires_grad)


def _model_facts(
    model: nn.Module, params: Iterable[ParamFacts], numels: dict[str, int], trainer_gc: bool | None,
    pristine: nn.Module | None,
) -> ModelFacts:
    return ModelFacts(
        gradient_checkpointing=bool(_quiet_getattr(model, "is_gradient_checkpointing")),
        input_grads=_input_grads(model),
        loaded_in_4bit=bool(getattr(model, "is_loaded_in_4bit", False)),
        loaded_in_8bit=bool(getattr(model, "is_loaded_in_8bit", False)),
        trainable_params=sum(numels[p.path] for p in params if p.requires_grad),
        total_params=sum(numels.values()),
        trainer_gradient_checkpointing=trainer_gc,
        gradient_checkpointing_kwargs=checkpointing_kwargs(model),
        hooks=hooks_of(model),
        config_writes=config_writes(model, pristine),
        shared_storage=_shared_storage(model),
        model_training=bool(model.training),
        lora_training=_lora_training(model),
    )


def _lora_training(model: nn.Module) -> bool | str | None:
    flags = {bool(m.training) for m in model.modules() if _is_lora_layer(m)}
    return None if not flags else (flags.pop() if len(flags) == 1 else "mixed")


def _shared_storage(model: nn.Module) -> tuple[str, ...]:
    groups: dict[tuple[str, int], list[str]] = {}
    for path, param in model.named_parameters(remove_duplicate=False):
        if param.numel() and param.device.type != "meta":
            groups.setdefault((str(param.device), param.data_ptr()), []).append(path)
    return tuple(sorted(" = ".join(sorted(paths)) for paths in groups.values() if len(paths) > 1))


def _quiet_getattr(obj: Any, name: str) -> Any:
    """``getattr`` without the deprecation warning transformers 5 attaches to some properties."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return getattr(obj, name, False)


def snapshot_of(
    model: nn.Module,
    warning_kinds: Iterable[str] = (),
    trainer_gradient_checkpointing: bool | None = None,
    *,
    pristine: nn.Module | None = None,
    peft: PeftFacts | None = None,
    fingerprint_new: bool = False,
) -> Snapshot:
    """Describe a prepared transformers model (the model *inside* any PEFT wrapper),
    with the kinds of the warnings its preparation emitted and, at the trl level, the
    trainer's final gradient checkpointing setting.

    ``pristine`` is the loaded model preparation started from: parameter and buffer
    values are then recorded against it, and so are ``model.config`` writes.  ``peft``
    holds the facts of the PEFT wrapper (read by the caller, which has it).  ``fingerprint_new``
    records the values of new parameters too (LoRA factors loaded from a saved adapter: both
    sides must hold the same numbers), not only that they are new."""
    loaded = loaded_state(pristine) if pristine is not None else None
    originals = loaded.params if loaded is not None else None
    params = []
    numels: dict[str, int] = {}
    for path, param in model.named_parameters(remove_duplicate=True):
        value = "" if originals is None else value_relation(param, originals.get(pristine_path(path)),
                                                             fingerprint_new=fingerprint_new)
        params.append(_param_facts(path, param, value))
        numels[path] = param.numel()
    buffers = []
    if loaded is not None:
        for path, buf in model.named_buffers():
            buffers.append(BufferFacts(path, tuple(buf.shape), _dtype(buf.dtype),
                                       value_relation(buf, loaded.buffers.get(pristine_path(path)))))
        buffers.sort(key=lambda b: b.path)
    lora = []
    saved = []
    for path, module in model.named_modules():
        if _is_lora_layer(module):
            base = module.base_layer
            fifo = bool(getattr(module, "fan_in_fan_out", False))
            parameter = getattr(module, "parameter_name", None)
            if parameter is not None:  # parameter-level LoRA: described by the parameter it wraps
                kind, (in_f, out_f), base_facts = f"parameter:{parameter}", _param_features(module), _host_facts(module)
            else:
                kind, (in_f, out_f), base_facts = _base_kind(base, fifo), _features(base), _base_facts(base)
            lora.append(
                LoraModuleFacts(
                    path=path,
                    kind=kind,
                    in_features=in_f,
                    out_features=out_f,
                    fan_in_fan_out=fifo,
                    base=base_facts,
                    adapters=tuple((n, _adapter_facts(module, n)) for n in _adapter_names(module)),
                )
            )
        elif _is_saved_wrapper(module):
            saved.append(SavedModuleFacts(path, tuple(sorted(module.modules_to_save.keys()))))
    params.sort(key=lambda p: p.path)
    tokens = [_token_facts(path, module) for path, module in model.named_modules(remove_duplicate=False)
              if _is_token_wrapper(module)]
    return Snapshot(
        params=tuple(params),
        lora=tuple(lora),
        saved=tuple(saved),
        tokens=tuple(sorted(tokens, key=lambda t: t.path)),
        buffers=tuple(buffers),
        model=_model_facts(model, params, numels, trainer_gradient_checkpointing, pristine),
        peft=peft,
        warnings=tuple(sorted(set(warning_kinds))),
    )


def error_snapshot(cls: str, kind: str, message: str = "") -> Snapshot:
    """The snapshot of a preparation that raised."""
    return Snapshot(error=ErrorFacts(cls=cls, kind=kind, message=message))
