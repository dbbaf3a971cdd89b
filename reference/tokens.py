"""Trainable token rows (``trainable_token_indices``): train a few rows of an embedding matrix.

With ``trainable_token_indices=[i, j, ...]`` the model's *input embedding* is wrapped so that
only the rows ``i, j, ...`` train (new tokens added to a tokenizer, say); the dict form
``{"embed_tokens": [i, ...], "lm_head": [k, ...]}`` names the modules (a name or a dotted suffix)
and their rows (:func:`wrap_trainable_tokens`).  As peft lays it out:

* ``<emb>.token_adapter.base_layer`` is the original module (frozen);
* ``<emb>.token_adapter.trainable_tokens_delta.<adapter>`` (k, d), trainable: despite its name it
  holds the rows' *values*, initialised to the original rows;
* ``<emb>.token_adapter.trainable_tokens_original.<adapter>`` (k, d), a buffer: the original rows;
* both follow the adapter dtype policy (``reference.rules.adapter_dtype``: fp32 over a bf16 / fp16
  embedding with ``autocast_adapter_dtype``);
* the forward looks up (or, for a Linear, multiplies by) the weight with those rows replaced by
  the trainable values, cast to the weight's dtype; a scaled embedding keeps its ``embed_scale``.

Every other module that shares the input embedding's weight (a tied ``lm_head``; t5's encoder
and decoder ``embed_tokens``) is wrapped too, sharing the trainable values and the buffer, so
that tied weights stay tied; a tied head among the modules to save is wrapped whole (its saved
module inside the token wrapper, whose forward multiplies by the active copy's weight with the
rows replaced).  A module that already got LoRA cannot take trainable tokens
(TypeError); a row index past the vocabulary is an IndexError.  Wrapping happens after the LoRA
layers and the modules to save, as upstream's order is.
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn
from torch.nn import functional as F

from reference.errors import NoTargetMatched, TokenIndexOutOfRange, TokensOnLoraLayer
from reference.rules import adapter_dtype

__all__ = ["TokenAdapter", "TokensWrapper", "is_dict_form", "token_mapping", "wrap_trainable_tokens"]


class _Buffers(nn.Module):
    """Buffers by adapter name (peft's BufferDict layout: ``trainable_tokens_original.<adapter>``)."""


class TokenAdapter(nn.Module):
    """The layer that holds the trainable rows of one embedding-like module."""

    def __init__(self, base_layer: nn.Module, tied: "TokenAdapter | None" = None) -> None:
        super().__init__()
        self.base_layer = base_layer
        self._tied = [tied] if tied is not None else []  # a list: not a submodule
        if tied is None:
            self.trainable_tokens_delta = nn.ParameterDict()
            self.trainable_tokens_original = _Buffers()
            self.token_indices: dict[str, list[int]] = {}
        else:  # the same objects: the tied modules train the very same rows
            self.trainable_tokens_delta = tied.trainable_tokens_delta
            self.trainable_tokens_original = tied.trainable_tokens_original
            self.token_indices = tied.token_indices

    @property
    def tied_adapter(self) -> "TokenAdapter | None":
        """The adapter whose rows this one shares (None for the one that holds them)."""
        return self._tied[0] if self._tied else None

    def add_adapter(self, name: str, indices: Iterable[int], autocast: bool) -> None:
        weight = self.base_layer.weight
        rows = list(indices)
        if any(not 0 <= i < weight.shape[0] for i in rows):
            raise TokenIndexOutOfRange(
                f"trainable_token_indices {rows} reach past the {weight.shape[0]} rows of the embedding")
        original = weight.detach()[rows].clone()
        dtype = adapter_dtype(weight.dtype, autocast)
        self.token_indices[name] = rows
        self.trainable_tokens_delta[name] = nn.Parameter(original.to(dtype), requires_grad=True)
        self.trainable_tokens_original.register_buffer(name, original.to(dtype))

    def merged_weight(self, names: Iterable[str]) -> torch.Tensor:
        weight = self.base_layer.weight
        for name in names:
            index = torch.tensor(self.token_indices[name], device=weight.device)
            weight = weight.index_copy(0, index, self.trainable_tokens_delta[name].to(weight))
        return weight


class TokensWrapper(nn.Module):
    """``<emb>`` after wrapping: ``token_adapter`` holds the base module and the rows."""

    def __init__(self, base: nn.Module, tied: TokenAdapter | None = None) -> None:
        super().__init__()
        self.token_adapter = TokenAdapter(base, tied)
        self.active_adapters: list[str] = []

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        base = self.token_adapter.base_layer
        weight = self.token_adapter.merged_weight(self.active_adapters)
        if isinstance(base, nn.Embedding):
            out = F.embedding(x, weight, base.padding_idx, base.max_norm, base.norm_type, base.scale_grad_by_freq,
                              base.sparse)
            scale = getattr(base, "embed_scale", None)
            if scale is not None:
                out = out * torch.as_tensor(scale, device=out.device).to(out.dtype)
            return out
        return F.linear(x, weight, getattr(base, "bias", None))

    def __getattr__(self, name: str):
        # model code reads the wrapped module's attributes (weight, embedding_dim, ...)
        try:
            return super().__getattr__(name)
        except AttributeError:
            # (a saved module inside is not this wrapper's: it is no saved module itself)
            if name in ("token_adapter", "active_adapters", "original_module", "modules_to_save"):
                raise
            adapter = self._modules.get("token_adapter")
            if adapter is None:
                raise
            return getattr(adapter.base_layer, name)


def _names_of(model: nn.Module, module: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules(remove_duplicate=False) if m is module and name]


def is_dict_form(indices: object) -> bool:
    """``trainable_token_indices`` given per module: a mapping, or (in a case) its (name, rows) pairs."""
    if isinstance(indices, dict):
        return True
    return isinstance(indices, tuple) and bool(indices) and all(isinstance(i, tuple) for i in indices)


def token_mapping(indices: object) -> dict[str, list[int]]:
    """The dict form as ``{module name: rows}``."""
    pairs = indices.items() if isinstance(indices, dict) else indices
    return {str(name): list(rows) for name, rows in pairs}


def wrap_trainable_tokens(model: nn.Module, indices: object, adapter: str, autocast: bool,
                          lora_types: tuple[type, ...]) -> None:
    """List form: wrap the input embedding and every module sharing its weight.  Dict form
    (``{name: rows}``): wrap every module whose name is a key or ends with ``.<key>`` (a key that
    names nothing is a ValueError, like a target that matches nothing), each with its own rows;
    where one is the input embedding, the modules sharing its weight that no key names share its
    rows (a tied ``lm_head`` named by a key of its own trains rows of its own: observed, peft
    0.15.2 and 0.21.2)."""
    embedding = model.get_input_embeddings()
    if not is_dict_form(indices):
        names = _names_of(model, embedding)
        _wrap(model, names, list(indices), adapter, autocast, lora_types, embedding, ())
        return
    mapping = token_mapping(indices)
    modules = [name for name, _ in model.named_modules() if name]
    chosen: dict[str, list[int]] = {}
    missing = []
    for key, rows in mapping.items():
        found = [name for name in modules if name == key or name.endswith("." + key)]
        missing += [] if found else [key]
        chosen.update({name: rows for name in found})
    if missing:
        raise NoTargetMatched(f"Target modules {set(missing)} (trainable_token_indices) not found in the base model")
    for name, rows in chosen.items():
        module = model.get_submodule(name)
        names = _names_of(model, module) if module is embedding else [name]
        _wrap(model, names, rows, adapter, autocast, lora_types, module, tuple(chosen))


def _wrap(model: nn.Module, names: list[str], rows: list[int], adapter: str, autocast: bool,
          lora_types: tuple[type, ...], module: nn.Module, named: tuple[str, ...]) -> None:
    """Wrap ``module`` (reached under ``names``) for ``rows``; if it is the input embedding, every
    other module sharing its weight (and not in ``named``) shares the rows."""
    if isinstance(module, lora_types) or (names and isinstance(model.get_submodule(names[0]), lora_types)):
        raise TokensOnLoraLayer(
            f"trainable_token_indices cannot be applied to {names[0] if names else 'the input embedding'}, "
            f"which already has LoRA ({type(module).__name__})")
    tied_names: list[str] = []
    if module is model.get_input_embeddings():
        weight = module.weight
        inside = tuple(n + "." for n, m in model.named_modules() if isinstance(m, TokensWrapper))
        tied_names = [name for name, m in model.named_modules(remove_duplicate=False)
                      if name and m is not module and getattr(m, "weight", None) is weight and name not in named
                      and not name.startswith(inside) and not isinstance(m, (TokensWrapper, TokenAdapter))]
    primary = TokensWrapper(module)
    primary.token_adapter.add_adapter(adapter, rows, autocast)
    primary.active_adapters.append(adapter)
    for name in names:
        model.set_submodule(name, primary if name == names[0] else _tied(module, primary, adapter))
    for name in dict.fromkeys(_saved_owner(model, name) for name in tied_names):
        owner = model.get_submodule(name)
        model.set_submodule(name, _tied(owner, primary, adapter))
        copies = owner.modules_to_save if _is_saved(owner) else None
        if copies is not None and adapter in copies:
            # the token layer's adapter dtype policy reaches the saved copy it now holds (peft casts
            # every adapter-named entry under a tuner layer: peft 0.15.2 and 0.21.2)
            for param in copies[adapter].parameters():
                param.data = param.data.to(adapter_dtype(param.dtype, autocast))


def _is_saved(module: nn.Module) -> bool:
    from reference.layers import SavedModule

    return isinstance(module, SavedModule)


def _saved_owner(model: nn.Module, name: str) -> str:
    """A tied module kept as a saved module's original is wrapped as the whole saved module (peft
    finds the tied head by name: ``lm_head.token_adapter.base_layer`` is then the saved module)."""
    from reference.layers import SavedModule

    parent, _, leaf = name.rpartition(".")
    if leaf == "original_module" and parent and isinstance(model.get_submodule(parent), SavedModule):
        return parent
    return name


def _tied(module: nn.Module, primary: TokensWrapper, adapter: str) -> TokensWrapper:
    wrapper = TokensWrapper(module, tied=primary.token_adapter)
    wrapper.active_adapters.append(adapter)
    return wrapper
