"""``ensure_weight_tying`` (peft >= 0.18): keep tied layers tied once adapters are added.

A model whose config does not say ``tie_word_embeddings=False`` may share its input embedding's
weight with other modules (a tied ``lm_head``).  When a config asks for weight tying:

* with no such module, nothing is tied and a warning says so;
* when an embedding is among the modules to save (an entry whose last segment is
  ``embed_tokens`` or ``lm_head``), the input embedding is saved (its name added) and the entries
  naming a tied module are dropped; each tied module is then wrapped as a module to save whose
  trained copy is a bias-free Linear holding *the embedding copy's* weight, so one trained matrix
  serves both;
* otherwise, when the targets name an embedding (a list entry ending in one of those names, or a
  regex matching one of them as a whole), LoRA goes on the input embedding (its name added to a
  list; a regex alternated with it) and entries naming a tied module are dropped; each tied module
  gets a LoRA layer whose factors *are* the embedding's, transposed: ``lora_A = B_emb^T`` and
  ``lora_B = A_emb^T`` (one storage).  The tied layer is built after the others and initialised
  as a Linear's factors, which writes its A's init (He-uniform) into the embedding's B; that is
  the observed initialisation, and it keeps the update zero (A_emb stays zero);
* otherwise a warning says that nothing tied was asked for.

Both adapters keep sharing their storage whatever the model's dtype (the purpose of the option).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from reference.config import LoraSettings
from reference.notices import warn

__all__ = ["EMBEDDING_NAMES", "TyingPlan", "plan_tying", "tie_factors", "tied_saved_copy", "tied_with_input_embedding"]

EMBEDDING_NAMES = ("embed_tokens", "lm_head")
"""The module names that count as an embedding for the option (the last segment of an entry)."""


def tied_with_input_embedding(model: nn.Module) -> list[str]:
    """The modules other than the input embedding whose weight *is* its weight, unless the config
    says ``tie_word_embeddings=False``."""
    config = getattr(model, "config", None)
    if config is not None and getattr(config, "tie_word_embeddings", None) is False:
        return []
    get = getattr(model, "get_input_embeddings", None)
    emb = get() if get is not None else None
    weight = getattr(emb, "weight", None)
    if weight is None:
        return []
    return [name for name, m in model.named_modules()
            if name and m is not emb and getattr(m, "weight", None) is weight]


def _input_embedding_name(model: nn.Module) -> str:
    emb = model.get_input_embeddings()
    return next(name for name, m in model.named_modules() if m is emb)


def _drop_tied(entries: list[str], tied: list[str]) -> list[str]:
    """Each tied key removes the first entry naming it (the entry a whole run of its segments)."""
    out = list(entries)
    for key in tied:
        for entry in out:
            if re.match(rf"(^|.*\.){entry}($|\..*)", key):
                out.remove(entry)
                break
    return out


@dataclass(frozen=True)
class TyingPlan:
    settings: LoraSettings
    """The settings with modules_to_save / target_modules rewritten."""
    saved: tuple[str, ...] = ()
    """Tied modules that become modules to save sharing the embedding copy's weight."""
    targets: tuple[str, ...] = ()
    """Tied modules whose LoRA factors are the input embedding's."""


def plan_tying(model: nn.Module, settings: LoraSettings) -> TyingPlan:
    if not settings.ensure_weight_tying:
        return TyingPlan(settings)
    tied = tied_with_input_embedding(model)
    if not tied:
        warn("weight_tying_nothing_tied", "ensure_weight_tying=True, but no module is tied to the input embedding")
        return TyingPlan(settings)
    saved = list(settings.modules_to_save or ())
    targets: Any = settings.target_modules
    emb = _input_embedding_name(model)
    if any(m.split(".")[-1] in EMBEDDING_NAMES for m in saved):
        saved = _drop_tied(saved + ([emb] if emb not in saved else []), tied)
        return TyingPlan(replace(settings, modules_to_save=tuple(saved)), saved=tuple(tied))
    if isinstance(targets, str) and targets != "all-linear":
        named = any(re.fullmatch(targets, n) for n in EMBEDDING_NAMES)
    else:
        named = not isinstance(targets, str) and any(t.split(".")[-1] in EMBEDDING_NAMES for t in targets or ())
    if not named:
        warn("weight_tying_nothing_asked",
             "ensure_weight_tying=True, but neither modules_to_save nor target_modules name a tied module")
        return TyingPlan(settings)
    if isinstance(targets, str):
        targets = rf"(?:{targets}|^{re.escape(emb)}$)"
    else:
        targets = frozenset(_drop_tied(sorted(set(targets) | {emb}), tied))
    return TyingPlan(replace(settings, target_modules=targets), targets=tuple(tied))


def tie_factors(layer: nn.Module, embedding_layer: nn.Module, adapter: str) -> None:
    """Make ``layer``'s (a Linear LoRA layer) factors the embedding layer's, transposed: one
    storage, two parameters."""
    a_emb = embedding_layer.lora_embedding_A[adapter]
    b_emb = embedding_layer.lora_embedding_B[adapter]
    layer.lora_A[adapter].weight = nn.Parameter(b_emb.detach().t(), requires_grad=b_emb.requires_grad)
    layer.lora_B[adapter].weight = nn.Parameter(a_emb.detach().t(), requires_grad=a_emb.requires_grad)


def tied_saved_copy(embedding_copy: nn.Module) -> nn.Module:
    """The trained copy of a tied module to save: a bias-free Linear holding the embedding copy's weight."""
    weight = embedding_copy.weight
    with torch.device("meta"):
        linear = nn.Linear(weight.shape[0], weight.shape[1], bias=False)
    linear.weight = weight
    return linear
