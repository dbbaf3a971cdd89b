"""The trl level: how ``SFTTrainer`` prepares a model for LoRA, per trl era.

Two flows, selected by the installed trl version (read from metadata; trl is never
imported) or forced by name:

* ``classic`` (trl 0.15 - 0.21, ``_prepare_peft_model``): a quantized model that is
  not "sharded" goes through the k-bit step with the trainer's checkpointing
  settings; a 4-bit model whose first ``Params4bit`` lives on the CPU or the meta
  device counts as sharded (so every CPU 4-bit run takes that branch) and gets
  ``autocast_adapter_dtype=False``; otherwise checkpointing only arranges input
  grads (reentrant); with ``bf16`` a non-sharded 4-bit model gets norms in fp32 and
  embeddings / head in bf16.
* ``current`` (trl >= 0.26, pinned 1.16): plain ``get_peft_model``; with
  checkpointing, input grads whatever ``use_reentrant`` says; every trainable
  parameter of a quantized model cast to bf16 (DoRA magnitudes excepted, trl 1.15+);
  the Trainer writes ``use_cache=False``; LoRA on the output head is rejected.

Observed rules: ``docs/spec/trl-notes.md``.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from importlib import metadata

import torch
from torch import nn

from reference.errors import InvalidConfig
from reference.kbit import is_kbit, prepare_for_kbit_training
from reference.prepare import prepare
from reference.profiles import Profile
from reference.spec import ABSENT, AdapterSpec, TrainingSpec

__all__ = ["TRL_FLOWS", "TrlFlow", "TrlResult", "prepare_trl", "select_trl_flow"]


@dataclass(frozen=True)
class TrlFlow:
    """One trl era's SFTTrainer preparation."""

    name: str
    trl: str
    """The trl versions it covers, as a PEP 440 specifier."""
    gradient_checkpointing_default: bool
    """``SFTConfig.gradient_checkpointing`` when not given."""
    classic: bool
    """The ``_prepare_peft_model`` shape (trl 0.15 - 0.21)."""


TRL_FLOWS: dict[str, TrlFlow] = {
    f.name: f
    for f in (
        TrlFlow("classic", ">=0.15,<0.22", gradient_checkpointing_default=False, classic=True),
        TrlFlow("current", ">=0.26", gradient_checkpointing_default=True, classic=False),
    )
}


@functools.lru_cache(maxsize=1)
def _installed_trl() -> str | None:
    """The installed trl version, read once per process (select_trl_flow runs per example)."""
    try:
        return metadata.version("trl")
    except metadata.PackageNotFoundError:
        return None


def select_trl_flow(name: str | None = None, version: str | None = None) -> TrlFlow:
    """The flow named ``name``, or the one the (installed) trl version selects."""
    if name is not None:
        if name not in TRL_FLOWS:
            raise ValueError(f"trl flow={name!r} is not one of {', '.join(TRL_FLOWS)}")
        return TRL_FLOWS[name]
    if version is None:
        version = _installed_trl()
        if version is None:
            return TRL_FLOWS["current"]
    major_minor = tuple(int(p) for p in version.split(".")[:2] if p.isdigit())
    return TRL_FLOWS["classic"] if major_minor < (0, 22) else TRL_FLOWS["current"]


@dataclass(frozen=True)
class TrlResult:
    """The prepared model and the trainer-level facts the snapshot records."""

    model: nn.Module
    trainer_gradient_checkpointing: bool


def _sharded_4bit(model: nn.Module) -> bool:
    """classic trl: a 4-bit model is "sharded" when its first Params4bit is on cpu/meta."""
    if not getattr(model, "is_loaded_in_4bit", False):
        return False
    import bitsandbytes as bnb  # a 4-bit model implies bitsandbytes

    for param in model.parameters():
        if isinstance(param, bnb.nn.Params4bit):
            return param.data.device.type in ("cpu", "meta")
    return False


def _cast_for_bf16(model: nn.Module) -> None:
    """classic trl's bf16 step for 4-bit models: norms to fp32, fp32 embeddings and head to bf16."""
    for name, module in model.named_modules():
        if "norm" in name or isinstance(module, nn.LayerNorm):
            module.to(torch.float32)
        elif any(part in name for part in ("lm_head", "embed_tokens", "wte", "wpe")):
            weight = getattr(module, "weight", None)
            if weight is not None and weight.dtype == torch.float32:
                module.to(torch.bfloat16)


def _reject_head_lora(model: nn.Module) -> None:
    get = getattr(model, "get_output_embeddings", None)
    head = get() if get is not None else None
    if head is not None and hasattr(head, "lora_A"):
        raise InvalidConfig("trl_lm_head_lora", "a LoRA adapter on the output head is never trained by SFTTrainer")


def _peft_model_in(model: nn.Module, adapter: AdapterSpec, training: TrainingSpec, profile: Profile,
                   flow: TrlFlow, gc: bool) -> TrlResult:
    """The trainer gets a model that ``get_peft_model`` already prepared.

    classic: returned as it is (a peft_config passed too is silently ignored; no input
    grads at construction).  current: a peft_config passed too is an error; otherwise
    input grads with checkpointing and the bf16 cast of a quantized model's trainables.
    (trl 0.20 - 0.23 froze the adapter here: a known divergence, not a flow rule.)
    """
    quantized = is_kbit(model)
    # The PeftModel is built first (its own errors come first), then handed to the trainer.
    prepare(model, adapter, dataclasses.replace(training, prepare_kbit=False, autocast_adapter_dtype=ABSENT), profile)
    if not flow.classic and training.peft_config_too:
        raise InvalidConfig("trl_peft_model_with_config", "a PeftModel together with a peft_config is rejected")
    if flow.classic:
        return TrlResult(model, gc)
    return _current_after_peft(model, gc, quantized)


def _current_after_peft(model: nn.Module, gc: bool, quantized: bool) -> TrlResult:
    """current trl, once the model is a PEFT model: input grads with checkpointing, the
    bf16 cast of a quantized model's trainables (not DoRA magnitudes), use_cache off."""
    if gc:
        model.enable_input_require_grads()
    if quantized:
        for name, param in model.named_parameters():
            if param.requires_grad and "lora_magnitude_vector" not in name:
                param.data = param.data.to(torch.bfloat16)
    model.config.use_cache = False
    return TrlResult(model, gc)


def prepare_trl(
    model: nn.Module, adapter: AdapterSpec, training: TrainingSpec, profile: Profile, flow: TrlFlow
) -> TrlResult:
    """Prepare ``model`` as ``SFTTrainer(model, args, peft_config=...)`` does at construction."""
    gc = training.gradient_checkpointing
    gc = flow.gradient_checkpointing_default if gc is ABSENT else bool(gc)
    if training.peft_model_in:
        return _peft_model_in(model, adapter, training, profile, flow, gc)
    kwargs = {} if training.use_reentrant is ABSENT else {"use_reentrant": training.use_reentrant}
    peft_step = dataclasses.replace(training, prepare_kbit=False, autocast_adapter_dtype=ABSENT)
    if flow.classic:
        quantized, sharded = is_kbit(model), _sharded_4bit(model)
        if quantized and not sharded:
            prepare_for_kbit_training(model, use_gradient_checkpointing=gc, gradient_checkpointing_kwargs=kwargs)
        elif gc and kwargs.get("use_reentrant", True):
            model.enable_input_require_grads()
        if sharded:
            peft_step = dataclasses.replace(peft_step, autocast_adapter_dtype=False)
        prepare(model, adapter, peft_step, profile)
        if training.bf16 and getattr(model, "is_loaded_in_4bit", False) and not sharded:
            _cast_for_bf16(model)
        return TrlResult(model, gc)
    quantized = is_kbit(model)
    prepare(model, adapter, peft_step, profile)
    _reject_head_lora(model)
    return _current_after_peft(model, gc, quantized)
