"""k-bit preparation: what ``prepare_model_for_kbit_training`` is specified to do."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = ["enable_gradient_checkpointing", "is_kbit", "prepare_for_kbit_training", "prepare_for_kbit_training_norms_only"]

_HALF = (torch.float16, torch.bfloat16)


def is_kbit(model: nn.Module) -> bool:
    return bool(getattr(model, "is_loaded_in_8bit", False) or getattr(model, "is_loaded_in_4bit", False))


def enable_gradient_checkpointing(model: nn.Module, kwargs: dict[str, Any] | None) -> None:
    """Turn on checkpointing; with reentrant checkpointing (the default) the inputs
    of the first checkpointed block must require grad, so the input embeddings'
    outputs are made to."""
    kwargs = dict(kwargs or {})
    if kwargs.get("use_reentrant", True):
        model.enable_input_require_grads()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def prepare_for_kbit_training(
    model: nn.Module, use_gradient_checkpointing: bool = True, gradient_checkpointing_kwargs: dict | None = None
) -> nn.Module:
    """Freeze every parameter, upcast fp16/bf16 parameters that are not 4-bit-packed
    to fp32, and for a quantized model enable gradient checkpointing."""
    for param in model.parameters():
        param.requires_grad = False
    for param in model.parameters():
        if param.dtype in _HALF and type(param).__name__ != "Params4bit":
            param.data = param.data.to(torch.float32)
    if is_kbit(model) and use_gradient_checkpointing:
        enable_gradient_checkpointing(model, gradient_checkpointing_kwargs)
    return model


def prepare_for_kbit_training_norms_only(
    model: nn.Module, use_gradient_checkpointing: bool = True, gradient_checkpointing_kwargs: dict | None = None
) -> nn.Module:
    """trl 0.25's own k-bit step (trl PR #4335, used by SFTTrainer in 0.25.x only): freeze every
    parameter, upcast to fp32 only the fp16/bf16 parameters whose name contains "norm" (any
    letter case; embeddings, heads, biases and unquantized linears keep their dtype), and for a
    quantized model with checkpointing make the input embeddings' outputs require grad
    *whatever* ``use_reentrant`` says, then turn checkpointing on with the given kwargs.
    Observed on trl 0.25.1 (bart / llama 8-bit and falcon 4-bit, fp16 load)."""
    for name, param in model.named_parameters():
        param.requires_grad = False
        if param.dtype in _HALF and "norm" in name.lower():
            param.data = param.data.to(torch.float32)
    if is_kbit(model) and use_gradient_checkpointing:
        model.enable_input_require_grads()
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=dict(gradient_checkpointing_kwargs or {}))
    return model
