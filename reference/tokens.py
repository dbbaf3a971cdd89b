"""Trainable token rows (``trainable_token_indices``): train a few rows of an embedding matrix.

With ``trainable_token_indices=[i, j, ...]`` the model's *input embedding* is wrapped so that
only the rows ``i, j, ...`` train (new tokens added to a tokenizer, say), as peft lays it out:

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
that tied weights stay tied.  A module that already got LoRA cannot take trainable tokens
(TypeError); a row index past the vocabulary is an IndexError.  Wrapping happens after the LoRA
layers and the modules to save, as upstream's order is.
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn
from torch.nn import functional as F

from reference.errors import TokenIndexOutOfRange, TokensOnLoraLayer
from reference.rules import adapter_dtype

__all__ = ["TokenAdapter", "TokensWrapper", "wrap_trainable_tokens"]


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
            if name in ("token_adapter", "active_adapters"):
                raise
            adapter = self._modules.get("token_adapter")
            if adapter is None:
                raise
            return getattr(adapter.base_layer, name)


def _names_of(model: nn.Module, module: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules(remove_duplicate=False) if m is module and name]


def wrap_trainable_tokens(model: nn.Module, indices: Iterable[int], adapter: str, autocast: bool,
                          lora_types: tuple[type, ...]) -> None:
    """Wrap the input embedding and every module sharing its weight (list-form
    ``trainable_token_indices``)."""
    embedding = model.get_input_embeddings()
    names = _names_of(model, embedding)
    if isinstance(embedding, lora_types) or (names and isinstance(model.get_submodule(names[0]), lora_types)):
        raise TokensOnLoraLayer(
            f"trainable_token_indices cannot be applied to {names[0] if names else 'the input embedding'}, "
            f"which already has LoRA ({type(embedding).__name__})")
    weight = embedding.weight
    tied_names = [name for name, m in model.named_modules(remove_duplicate=False)
                  if name and m is not embedding and getattr(m, "weight", None) is weight
                  and not isinstance(m, (TokensWrapper, TokenAdapter))]
    primary = TokensWrapper(embedding)
    primary.token_adapter.add_adapter(adapter, indices, autocast)
    primary.active_adapters.append(adapter)
    for name in names:
        model.set_submodule(name, primary if name == names[0] else _tied(embedding, primary, adapter))
    for name in tied_names:
        model.set_submodule(name, _tied(model.get_submodule(name), primary, adapter))


def _tied(module: nn.Module, primary: TokensWrapper, adapter: str) -> TokensWrapper:
    wrapper = TokensWrapper(module, tied=primary.token_adapter)
    wrapper.active_adapters.append(adapter)
    return wrapper
