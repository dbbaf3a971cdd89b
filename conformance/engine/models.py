"""Building the tiny random models of the zoo, plain or bitsandbytes-quantized.

:func:`build_model` is deterministic (same :class:`ModelSpec`, bitwise-identical
weights) and leaves the global RNG state untouched.  :func:`load_model` goes
through a checkpoint on disk for quantized loads, since bitsandbytes
quantization happens in ``from_pretrained``; checkpoints are written once per
spec under a cache directory shared by concurrent processes.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import os
import pathlib
import shutil
import tempfile
import threading
from collections import OrderedDict

import torch
import transformers
from transformers import (
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoModelForSeq2SeqLM,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    BitsAndBytesConfig,
    PretrainedConfig,
)

from reference.spec import ABSENT, ModelSpec, QuantSpec
from strategies.zoo import CAUSAL_NEEDS_IS_DECODER, ZOO, tasks_of

__all__ = [
    "AUTO_CLASSES",
    "auto_class",
    "build_model",
    "cache_dir",
    "checkpoint_path",
    "clear_model_cache",
    "load_fresh",
    "load_model",
    "pristine_model",
    "make_config",
    "quantization_config",
    "spec_key",
]

AUTO_CLASSES = {
    "CAUSAL_LM": AutoModelForCausalLM,
    "SEQ_CLS": AutoModelForSequenceClassification,
    "SEQ_2_SEQ_LM": AutoModelForSeq2SeqLM,
    "TOKEN_CLS": AutoModelForTokenClassification,
}


def auto_class(spec: ModelSpec) -> type:
    """The auto class that builds and loads ``spec``: its task's, or ``AutoModelForImageTextToText``
    for a vision-language type (whose ``CAUSAL_LM`` class it is)."""
    if ZOO[spec.model_type].image_text:
        return AutoModelForImageTextToText
    return AUTO_CLASSES[spec.task]

_DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "uint8": torch.uint8,
}

# Bump when the on-disk layout or the way weights are drawn changes.
_FORMAT = 2  # 2: constant parameters (biases, norm weights) perturbed, see _perturb_constants

# transformers 5 renamed `torch_dtype` to `dtype` (4.x only knows the old name).
_DTYPE_KW = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"


def cache_dir() -> pathlib.Path:
    """Where quantized loads find their checkpoints (``CONFORMANCE_CACHE`` overrides)."""
    path = pathlib.Path(os.environ.get("CONFORMANCE_CACHE") or pathlib.Path(tempfile.gettempdir()) / "lora-conformance-cache")
    path.mkdir(parents=True, exist_ok=True)
    return path


def _dtype(name: str) -> torch.dtype:
    try:
        return _DTYPES[name]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; known: {sorted(_DTYPES)}") from None


def make_config(spec: ModelSpec) -> PretrainedConfig:
    """The transformers config of ``spec`` (a fresh object)."""
    entry = ZOO.get(spec.model_type)
    if entry is None:
        raise ValueError(f"model type {spec.model_type!r} is not in the zoo; known: {sorted(ZOO)}")
    if spec.task not in AUTO_CLASSES:
        raise ValueError(f"unknown task {spec.task!r}; known: {sorted(AUTO_CLASSES)}")
    if spec.task not in tasks_of(spec.model_type):
        raise ValueError(
            f"model type {spec.model_type!r} does not support task {spec.task!r} with transformers "
            f"{transformers.__version__}; it supports {list(tasks_of(spec.model_type))}"
        )
    if spec.num_layers < 1:
        raise ValueError(f"num_layers must be >= 1, got {spec.num_layers}")
    if spec.hidden_size < 64 or spec.hidden_size % 64:
        raise ValueError(f"hidden_size must be a positive multiple of 64, got {spec.hidden_size}")
    config = entry.make_config(spec.num_layers, spec.hidden_size)
    if spec.num_labels is not ABSENT:
        if spec.task not in ("SEQ_CLS", "TOKEN_CLS"):
            raise ValueError(f"num_labels is for classification heads, not task {spec.task!r}")
        config.num_labels = int(spec.num_labels)
    if spec.task == "CAUSAL_LM" and spec.model_type in CAUSAL_NEEDS_IS_DECODER:
        config.is_decoder = True
    return config


def build_model(spec: ModelSpec) -> torch.nn.Module:
    """A randomly initialised model for ``spec``, in ``spec.load_dtype``, in eval mode.

    The weights depend on ``spec`` only: the RNG is seeded with ``spec.seed``
    inside a forked RNG context, so the caller's RNG state is not disturbed.
    """
    config = make_config(spec)
    auto = auto_class(spec)
    dtype = _dtype(spec.load_dtype)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        model = auto.from_config(config, **{_DTYPE_KW: dtype})
        _perturb_constants(model)
    return model.eval()


PERTURBATION = 0.05
"""The std of the seeded noise added to constant parameters."""


def _perturb_constants(model: torch.nn.Module) -> None:
    """Give every constant parameter seeded, distinct values.

    transformers initialises biases to zero and norm weights to one (or zero, for the
    ``1 + w`` norms of gemma): a preparation fault that resets a bias, copies the wrong
    tensor into a saved module or rounds a norm through another dtype would leave such
    values unchanged and pass unseen.  Noise of std :data:`PERTURBATION` around the
    constant keeps the model's function (and its numerics) well within range.
    """
    with torch.no_grad():
        for param in model.parameters():
            if param.dtype.is_floating_point and param.numel() > 1 and bool(param.min() == param.max()):
                noise = torch.randn(param.shape, dtype=torch.float32) * PERTURBATION
                param.add_(noise.to(param.dtype))


# -- quantized loads ---------------------------------------------------------------------


def quantization_config(quant: QuantSpec) -> BitsAndBytesConfig | None:
    """The ``BitsAndBytesConfig`` of ``quant``; None when nothing is quantized.

    Only the fields of the chosen kind are passed (the others keep
    transformers' defaults); ``skip_modules=None`` leaves transformers' own
    choice of unquantized modules in place.
    """
    if quant.kind == "none":
        return None
    kw: dict = {}
    if quant.skip_modules is not None:
        kw["llm_int8_skip_modules"] = list(quant.skip_modules)
    if quant.kind == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=quant.int8_threshold, **kw)
    if quant.kind == "4bit":
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=quant.quant_type,
            bnb_4bit_use_double_quant=quant.double_quant,
            bnb_4bit_compute_dtype=_dtype(quant.compute_dtype),
            bnb_4bit_quant_storage=_dtype(quant.quant_storage),
            **kw,
        )
    raise ValueError(f"unknown quantization kind {quant.kind!r}")


def spec_key(spec: ModelSpec) -> str:
    """A stable hash of ``spec``, its zoo config and the library versions."""
    payload = {
        "format": _FORMAT,
        # (a field left ABSENT is not part of the key: keys stay stable when a field is added)
        "spec": {k: v for k, v in dataclasses.asdict(spec).items() if v is not ABSENT},
        "config": make_config(spec).to_dict(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }
    text = json.dumps(payload, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:24]


_LRU_SIZE = 128
_paths: "OrderedDict[tuple[ModelSpec, str], pathlib.Path]" = OrderedDict()
_lock = threading.Lock()


def _complete(path: pathlib.Path) -> bool:
    return (path / "config.json").is_file()


def checkpoint_path(spec: ModelSpec, cache_dir: pathlib.Path) -> pathlib.Path:
    """The directory holding the saved ``build_model(spec)``, written on first use.

    Writers save to a private temporary directory and rename it into place, so
    concurrent processes sharing ``cache_dir`` never see a partial checkpoint;
    when two race, the loser's copy is discarded (both are identical).
    """
    cache_dir = pathlib.Path(cache_dir)
    lru_key = (spec, str(cache_dir.resolve()))
    with _lock:
        cached = _paths.get(lru_key)
        if cached is not None and _complete(cached):
            _paths.move_to_end(lru_key)
            return cached
    final = cache_dir / f"{spec.model_type}-{spec.task}-{spec_key(spec)}"
    if not _complete(final):
        cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = pathlib.Path(tempfile.mkdtemp(prefix=".tmp-", dir=cache_dir))
        try:
            build_model(spec).save_pretrained(tmp)
            try:
                os.replace(tmp, final)
            except OSError:
                # another process got there first (the target is a non-empty directory)
                if not _complete(final):
                    raise
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    with _lock:
        _paths[lru_key] = final
        _paths.move_to_end(lru_key)
        while len(_paths) > _LRU_SIZE:
            _paths.popitem(last=False)
    return final


_PRISTINE_SIZE = 32
_pristine: "OrderedDict[tuple, torch.nn.Module]" = OrderedDict()


def _cache_enabled() -> bool:
    return os.environ.get("CONFORMANCE_MODEL_CACHE", "1") not in ("0", "false", "no", "")


def clear_model_cache() -> None:
    """Forget the pristine models kept by :func:`load_model`."""
    with _lock:
        _pristine.clear()


def load_model(
    spec: ModelSpec, quant: QuantSpec, cache_dir: pathlib.Path, device: str = "cpu", *, via_checkpoint: bool = False
) -> torch.nn.Module:
    """A fresh, private copy of ``load_fresh(spec, quant, cache_dir, device)``.

    The first call per (spec, quant, device) loads and keeps the model pristine;
    every call returns a deep copy, so callers may prepare (mutate) it freely.
    """
    if not _cache_enabled():
        return load_fresh(spec, quant, cache_dir, device, via_checkpoint=via_checkpoint)
    return _relinked(copy.deepcopy(pristine_model(spec, quant, cache_dir, device, via_checkpoint=via_checkpoint)))


def pristine_model(spec: ModelSpec, quant: QuantSpec, cache_dir: pathlib.Path, device: str = "cpu", *,
                   via_checkpoint: bool = False) -> torch.nn.Module:
    """The loaded model itself, as :func:`load_model` copies it: never prepare or change it.

    Snapshots compare a prepared model's values with it (what preparation did to them).
    Kept in a small LRU per (spec, quant, device, cache dir); loaded afresh when the cache
    is off (``CONFORMANCE_MODEL_CACHE=0``).
    """
    if not _cache_enabled():
        return load_fresh(spec, quant, cache_dir, device, via_checkpoint=via_checkpoint)
    key = (spec, quant, device, str(pathlib.Path(cache_dir).resolve()), via_checkpoint or quant.quantized)
    with _lock:
        model = _pristine.get(key)
        if model is not None:
            _pristine.move_to_end(key)
    if model is None:
        model = load_fresh(spec, quant, cache_dir, device, via_checkpoint=via_checkpoint)
        with _lock:
            _pristine[key] = model
            while len(_pristine) > _PRISTINE_SIZE:
                _pristine.popitem(last=False)
    return model


def _relinked(model: torch.nn.Module) -> torch.nn.Module:
    """A deep copy made indistinguishable from a fresh load.

    bitsandbytes' ``Params4bit.__deepcopy__`` keeps ``weight.module`` pointing at the
    *original* ``Linear4bit`` (its state is copied by reference) and deep-copies the quant
    state apart from the module's own copy, so in a copy ``layer.weight.module is layer``
    and ``layer.quant_state is layer.weight.quant_state`` are both False: both sides would
    then share the cached original through ``weight.module``.  A fresh load has both links;
    they are restored here.
    """
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if type(weight).__name__ != "Params4bit":
            continue
        if hasattr(weight, "module"):
            weight.module = module
        if hasattr(module, "quant_state"):
            module.quant_state = weight.quant_state
    return model


def load_fresh(
    spec: ModelSpec, quant: QuantSpec, cache_dir: pathlib.Path, device: str = "cpu", *, via_checkpoint: bool = False
) -> torch.nn.Module:
    """``build_model(spec)``, quantized at load time as ``quant`` says, in eval mode, on ``device``.

    For ``quant.kind == "none"`` this is :func:`build_model` itself (moved to
    ``device``), or, ``via_checkpoint``, the same weights reloaded from the checkpoint with
    ``from_pretrained(..., dtype=spec.load_dtype)``: what a trainer given the checkpoint's
    path loads (non-persistent buffers such as GPT-J's rotary table are recomputed at load,
    in their own dtype).  A quantized model is always saved under ``cache_dir`` (once) and
    reloaded with ``from_pretrained(..., quantization_config=..., dtype=spec.load_dtype)``
    and ``device_map`` on ``device`` (bitsandbytes quantizes as weights land there).
    """
    bnb = quantization_config(quant)
    auto = auto_class(spec)
    if bnb is None:
        if via_checkpoint:
            model = auto.from_pretrained(checkpoint_path(spec, cache_dir), **{_DTYPE_KW: _dtype(spec.load_dtype)}).eval()
        else:
            model = build_model(spec)
        return model if device == "cpu" else model.to(device)
    path = checkpoint_path(spec, cache_dir)
    model = auto.from_pretrained(
        path,
        quantization_config=bnb,
        **{_DTYPE_KW: _dtype(spec.load_dtype)},
        device_map=device,
    )
    return model.eval()
