"""Saving and loading adapters in PEFT's on-disk format, without peft.

A PEFT LoRA adapter directory holds two files:

* ``adapter_config.json``: the LoraConfig's fields, with ``"peft_type": "LORA"``;
* ``adapter_model.safetensors``: the adapter's tensors, keyed
  ``base_model.model.<parameter path>`` with the adapter name dropped:
  ``<module>.lora_A.weight`` / ``lora_B.weight`` (and ``lora_B.bias`` with
  ``lora_bias``), ``<module>.lora_embedding_A`` / ``_B`` for embeddings,
  ``<module>.weight`` for a modules-to-save copy (``modules_to_save.<name>``
  dropped), and trainable biases under their own paths (observed with peft 0.15
  and 0.21; peft also writes an embedding's base weight when an embedding is a
  target, which a loader may take or leave since it equals the base model's).

The reference writes the config it was asked for, every field filled with its
profile's default (``reference.config.resolve``), so that loading it re-resolves
the same targets; it reads a config by taking the fields it models and preparing
a fresh base model with them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from reference.config import LoraSettings, resolve
from reference.prepare import ADAPTER, prepare
from reference.profiles import Profile
from reference.spec import AdapterSpec, TrainingSpec

__all__ = [
    "CONFIG_NAME",
    "PREFIX",
    "WEIGHTS_NAME",
    "adapter_config",
    "adapter_state_dict",
    "checkpoint_key",
    "load_adapter",
    "read_adapter_spec",
    "save_adapter",
    "spec_of_stored",
]

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."
"""PeftModel -> LoraModel -> the transformers model: the path prefix of every saved key."""


def _jsonable(value: Any) -> Any:
    if isinstance(value, frozenset):
        return sorted(value)
    if isinstance(value, tuple):
        return [_jsonable(v) for v in value]
    return value


def adapter_config(settings: LoraSettings, base_model_name_or_path: str | None = None) -> dict[str, Any]:
    """The ``adapter_config.json`` object of resolved ``settings``."""
    return {
        "peft_type": "LORA",
        "task_type": settings.task_type,
        "base_model_name_or_path": base_model_name_or_path,
        "inference_mode": True,
        "r": settings.r,
        "lora_alpha": settings.lora_alpha,
        "lora_dropout": settings.lora_dropout,
        "target_modules": _jsonable(settings.target_modules),
        "exclude_modules": _jsonable(settings.exclude_modules),
        "layers_to_transform": _jsonable(settings.layers_to_transform),
        "layers_pattern": _jsonable(settings.layers_pattern),
        "rank_pattern": dict(settings.rank_pattern),
        "alpha_pattern": dict(settings.alpha_pattern),
        "modules_to_save": _jsonable(settings.modules_to_save),
        "bias": settings.bias,
        "lora_bias": settings.lora_bias,
        "use_rslora": settings.use_rslora,
        "init_lora_weights": settings.init_lora_weights,
        "fan_in_fan_out": settings.fan_in_fan_out,
    }


def checkpoint_key(path: str, adapter: str = ADAPTER) -> str:
    """The saved key of the parameter at ``path`` (a path in the prepared model)."""
    parts = path.split(".")
    out = []
    for i, part in enumerate(parts):
        if part == adapter and i > 0 and parts[i - 1] in ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B"):
            continue
        if part == "modules_to_save" and i + 1 < len(parts) and parts[i + 1] == adapter:
            continue
        if part == adapter and i > 0 and parts[i - 1] == "modules_to_save":
            continue
        out.append(part)
    return PREFIX + ".".join(out)


def _is_adapter_param(path: str, param: nn.Parameter) -> bool:
    return ".lora_" in path or path.startswith("lora_") or ".modules_to_save." in path or param.requires_grad


def adapter_state_dict(model: nn.Module, adapter: str = ADAPTER) -> dict[str, torch.Tensor]:
    """The tensors PEFT saves for ``model``'s adapter: LoRA factors, modules-to-save copies,
    trainable biases; keyed as in ``adapter_model.safetensors``."""
    return {
        checkpoint_key(path, adapter): param.detach().to("cpu").contiguous().clone()
        for path, param in model.named_parameters()
        if _is_adapter_param(path, param) and param.dtype.is_floating_point
    }


def save_adapter(model: nn.Module, directory: str | Path, adapter: AdapterSpec, profile: Profile, *,
                 base_model_name_or_path: str | None = None) -> Path:
    """Write ``model``'s adapter (prepared from ``adapter`` under ``profile``) to ``directory``."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = adapter_config(resolve(adapter, profile), base_model_name_or_path)
    (directory / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True))
    save_file(adapter_state_dict(model), str(directory / WEIGHTS_NAME), metadata={"format": "pt"})
    return directory


# The LoraConfig fields the reference models (reference.spec.AdapterSpec); others are ignored.
_PAIRS = ("rank_pattern", "alpha_pattern")


def read_adapter_spec(directory: str | Path) -> AdapterSpec:
    """The :class:`AdapterSpec` of a saved ``adapter_config.json`` (fields the reference
    does not model are left out; a non-LoRA adapter is an error)."""
    data = json.loads((Path(directory) / CONFIG_NAME).read_text())
    if data.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{directory}: peft_type={data.get('peft_type')!r}; only LORA adapters can be read")
    if data.get("use_dora"):
        raise ValueError(f"{directory}: use_dora=True; the reference does not load saved DoRA adapters yet")
    return spec_of_stored(data)


def spec_of_stored(data: Mapping[str, Any]) -> AdapterSpec:
    """The :class:`AdapterSpec` of a stored config (``adapter_config.json``'s fields, or a PEFT
    wrapper's ``config``): what ``LoraConfig(**stored)`` asks for."""
    import dataclasses

    fields: dict[str, Any] = {}
    for f in dataclasses.fields(AdapterSpec):
        # `inference_mode` is what save_pretrained writes (always True), not the adapter's shape:
        # whoever loads the adapter decides whether it trains
        if f.name not in data or f.name == "inference_mode":
            continue
        value = data[f.name]
        if f.name in _PAIRS:
            value = tuple((value or {}).items())
        elif isinstance(value, (list, set, frozenset)):
            value = tuple(sorted(value)) if isinstance(value, (set, frozenset)) else tuple(value)
        fields[f.name] = value
    return AdapterSpec(**fields)


def load_adapter(model: nn.Module, directory: str | Path, profile: Profile) -> nn.Module:
    """Prepare ``model`` (a fresh base model) with the adapter saved in ``directory`` and
    load its tensors; returns the prepared model.

    Every saved tensor must find its parameter (a base weight of the model that PEFT
    saved alongside, such as a targeted embedding's, is loaded too); an adapter
    parameter the file lacks is an error.
    """
    from safetensors.torch import load_file

    spec = read_adapter_spec(directory)
    prepared = prepare(model, spec, TrainingSpec(level="peft", prepare_kbit=False), profile)
    tensors = load_file(str(Path(directory) / WEIGHTS_NAME))
    # Base weights (saved beside a targeted embedding) keep their plain path as key.
    by_key = {checkpoint_key(path): (path, p) for path, p in prepared.named_parameters()}
    unknown = sorted(set(tensors) - set(by_key))
    if unknown:
        raise ValueError(f"{directory}: {len(unknown)} saved tensors match no parameter, e.g. {unknown[:3]}")
    wanted = {checkpoint_key(path) for path, p in prepared.named_parameters() if ".lora_" in path}
    missing = sorted(wanted - set(tensors))
    if missing:
        raise ValueError(f"{directory}: the adapter lacks {len(missing)} LoRA tensors, e.g. {missing[:3]}")
    with torch.no_grad():
        for key, value in tensors.items():
            _, param = by_key[key]
            if tuple(param.shape) != tuple(value.shape):
                raise ValueError(f"{directory}: {key} has shape {tuple(value.shape)}, the model {tuple(param.shape)}")
            param.data.copy_(value.to(device=param.device, dtype=param.dtype))
    return prepared
