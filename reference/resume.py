"""Resuming from a saved adapter: ``PeftModel.from_pretrained(model, directory, is_trainable=...)``.

This is how a user resumes (Q)LoRA training: an adapter trained earlier is saved with
``save_pretrained``; a fresh load of the base model (quantized or not, after the k-bit step or
not) gets it back.  What loading prepares (peft 0.15.2 and 0.21.2, observed on the CPU):

* the adapter is built from the **stored** config in ``adapter_config.json`` (the targets as
  preparation resolved them, the task's head names among the modules to save), exactly as
  ``get_peft_model`` would build it, with the adapter dtype policy of ``autocast_adapter_dtype``
  (``from_pretrained``'s default is True);
* its tensors are then copied in: every LoRA factor, every modules-to-save copy, every bias the
  adapter trained, each cast to the dtype of the parameter it lands in (a bf16 saved copy loads
  exactly into the fp32 copy the k-bit step made);
* ``is_trainable=False`` (the default) is an **inference** model: the stored config says
  ``inference_mode=True``, nothing trains (``reference.prepare``'s inference rule), and the
  whole model is put in eval mode; ``is_trainable=True`` stores ``inference_mode=False`` and
  trains what ``get_peft_model`` would train, the new layers in training mode.

The save here writes what the reference itself would save (``reference.adapter_io``'s file
layout), after giving the adapter trained values (``reference.trained``): the reference never
reads a file peft wrote, and upstream loads what upstream saved.
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from reference.adapter_io import CONFIG_NAME, WEIGHTS_NAME, adapter_state_dict, checkpoint_key, read_adapter_spec
from reference.peft_model import PeftWrapper
from reference.prepare import prepare_wrapped
from reference.profiles import Profile
from reference.spec import ABSENT, AdapterSpec, TrainingSpec
from reference.trained import give_trained_copies, give_trained_values

__all__ = ["is_trainable", "load_saved", "resume", "save_prepared"]


def is_trainable(training: TrainingSpec) -> bool:
    """``from_pretrained``'s ``is_trainable`` for ``training`` (absent: False, its default)."""
    return training.is_trainable is not ABSENT and bool(training.is_trainable)


def _jsonable(value: Any) -> Any:
    if isinstance(value, (frozenset, set)):
        return sorted(value)
    if isinstance(value, tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    return value


def save_prepared(model: nn.Module, wrapper: PeftWrapper, directory: str | Path) -> Path:
    """``save_pretrained`` of a prepared model: its stored config (``inference_mode`` True, as
    peft writes it) and its adapter's tensors."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = {key: _jsonable(value) for key, value in wrapper.config.items()}
    config.update(peft_type="LORA", inference_mode=True)
    (directory / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True))
    save_file(adapter_state_dict(model), str(directory / WEIGHTS_NAME), metadata={"format": "pt"})
    return directory


def _load_tensors(model: nn.Module, directory: Path) -> None:
    """Copy the saved tensors into ``model``'s parameters (cast to each parameter's dtype), as a
    non-strict state-dict load does: a saved tensor that finds no parameter is left out (peft
    0.15 saves LoRA inside a saved classification head, which the stored config then keeps
    from getting LoRA: registry ``orphan-lora-inside-saved-module``), a parameter the file lacks
    keeps its initial value; a tensor of the wrong shape is an error."""
    from safetensors.torch import load_file

    tensors = load_file(str(directory / WEIGHTS_NAME))
    by_key = {checkpoint_key(path): p for path, p in model.named_parameters()}
    with torch.no_grad():
        for key, value in tensors.items():
            param = by_key.get(key)
            if param is None:
                continue
            if tuple(param.shape) != tuple(value.shape):
                raise ValueError(f"{directory}: {key} has shape {tuple(value.shape)}, the model {tuple(param.shape)}")
            param.data.copy_(value.to(device=param.device, dtype=param.dtype))


def load_saved(model: nn.Module, directory: str | Path, training: TrainingSpec,
               profile: Profile) -> tuple[nn.Module, PeftWrapper]:
    """``PeftModel.from_pretrained(model, directory, is_trainable=...)`` on ``model`` (after the
    k-bit step when ``training.prepare_kbit``)."""
    directory = Path(directory)
    trains = is_trainable(training)
    spec = dataclasses.replace(read_adapter_spec(directory), inference_mode=not trains)
    prepared, wrapper = prepare_wrapped(model, spec, training, profile)
    _load_tensors(prepared, directory)
    if not trains:
        prepared.eval()
    return prepared, wrapper


def resume(model: nn.Module, source: nn.Module, adapter: AdapterSpec, training: TrainingSpec, profile: Profile,
           seed: int) -> tuple[nn.Module, PeftWrapper]:
    """The whole resume flow of a ``training.load_saved`` case: ``source`` (a fresh load of the
    same model) is prepared with ``adapter`` (no k-bit step, default adapter dtypes), trained
    (seeded values, ``reference.trained``) and saved; ``model`` then loads the adapter."""
    saved_from, saved_wrapper = prepare_wrapped(source, adapter, TrainingSpec(level="peft", prepare_kbit=False),
                                                profile)
    give_trained_values(saved_from, seed)
    give_trained_copies(saved_from, seed)
    with tempfile.TemporaryDirectory(prefix="reference-adapter-") as tmp:
        save_prepared(saved_from, saved_wrapper, tmp)
        return load_saved(model, tmp, training, profile)
