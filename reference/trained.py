"""The values of an adapter a user trained: what a PeftModel handed to a trainer holds.

A case that passes an already-built PeftModel to the trainer (``training.peft_model_in``)
stands for a user resuming from a trained adapter, so its LoRA factors are not at their
initial values: B is not zero.  Both sides give the passed-in adapter the same values, a
pure function of the case and each parameter's path, so that what the trainer does with
them (trl 0.22 - 0.26 merge them into the base weights) yields the same numbers on both
sides and can be compared exactly.
"""

from __future__ import annotations

import hashlib

import torch
from torch import nn

from reference.spec import Case

__all__ = ["TRAINED_STD", "give_trained_copies", "give_trained_values", "template_seed", "trained_seed"]

TRAINED_STD = 0.05
"""The std of the trained factors' values: a visible update, small beside the base weights."""


def trained_seed(case: Case) -> int:
    """The seed of a case's trained adapter (the case alone decides it)."""
    return int.from_bytes(hashlib.sha256((case.dumps() + "|trained").encode()).digest()[:8], "little")


def template_seed(case: Case) -> int:
    """The seed of the embedding rows a cloned chat template adds (``reference.chat_template``):
    both sides draw them under it."""
    return trained_seed(case) % (2**31)


def give_trained_values(model: nn.Module, seed: int) -> None:
    """Fill every LoRA factor of ``model`` (PEFT's layout: ``lora_A`` / ``lora_B`` modules,
    ``lora_embedding_A`` / ``_B`` parameters, LoRA biases) with seeded normal values."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if not any(part in name for part in (".lora_A.", ".lora_B.", ".lora_embedding_A.", ".lora_embedding_B.")):
                continue
            g = torch.Generator(device="cpu")
            g.manual_seed(seed ^ int.from_bytes(hashlib.sha256(name.encode()).digest()[:7], "little"))
            values = torch.randn(param.shape, generator=g, dtype=torch.float32) * TRAINED_STD
            param.data.copy_(values.to(device=param.device, dtype=param.dtype))


_FACTORS = (".lora_A.", ".lora_B.", ".lora_embedding_A.", ".lora_embedding_B.")


def give_trained_copies(model: nn.Module, seed: int) -> None:
    """Move every other trainable floating-point parameter of ``model`` (modules-to-save
    copies, biases a bias mode trains) by seeded normal steps of :data:`TRAINED_STD`: what
    training changed besides the factors, so that a saved adapter holds values its loader must
    take (resuming, ``reference.resume``)."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if not param.requires_grad or not param.dtype.is_floating_point or any(p in name for p in _FACTORS):
                continue
            g = torch.Generator(device="cpu")
            g.manual_seed(seed ^ int.from_bytes(hashlib.sha256(("step|" + name).encode()).digest()[:7], "little"))
            step = torch.randn(param.shape, generator=g, dtype=torch.float32) * TRAINED_STD
            param.data.add_(step.to(device=param.device, dtype=param.dtype))
