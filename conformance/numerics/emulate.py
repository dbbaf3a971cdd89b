"""Upstream defects the forward comparison can name exactly.

When the two sides' forwards differ, the reference is rerun with one known upstream defect
applied to it; if its runs (logits, loss, every gradient, eval and training) then match
upstream's within the tolerance, the forward divergences are replaced by a single
``numerics.<defect>`` divergence, which a registry entry may explain.  This is precise: any
other fault, alone or beside the defect, leaves the runs apart and the divergences stay.

* ``tied_head_bias_dropped``: a trainable-token wrapper around a Linear (a tied output layer)
  computes its output without the layer's bias (peft's TrainableTokensLayer calls
  ``F.linear(x, W)``);
* ``token_embed_scale_dropped``: a trainable-token wrapper around a scaled embedding (gemma's
  ``*ScaledWordEmbedding``, bart with ``scale_embedding``) looks up the rows without the
  embedding's ``embed_scale`` (peft < 0.18);
* ``new_adapter_copy_active``: a module saved by an adapter that is not active runs that
  adapter's copy instead of the original (peft < 0.18 activates the copy ``add_adapter`` makes);
* ``tied_embedding_wrappers_bypassed``: the other embeddings that share the input embedding's
  weight (t5's ``encoder.embed_tokens`` and ``decoder.embed_tokens`` beside ``shared``) keep the
  original module, so their lookups ignore the trainable rows.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["DEFECTS", "Defect", "scales"]


def _token_wrappers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if hasattr(m, "token_adapter") and hasattr(m.token_adapter, "merged_weight")]


def _biased_heads(model: nn.Module) -> list[nn.Module]:
    return [w for w in _token_wrappers(model)
            if isinstance(w.token_adapter.base_layer, nn.Linear) and w.token_adapter.base_layer.bias is not None]


def _scaled_embeddings(model: nn.Module) -> list[nn.Module]:
    """Token-wrapped embeddings whose ``embed_scale`` changes the lookup (bart's is 1.0 unless its
    config scales: dropping it changes nothing, so it names no defect)."""
    return [w for w in _token_wrappers(model)
            if isinstance(w.token_adapter.base_layer, nn.Embedding)
            and scales(getattr(w.token_adapter.base_layer, "embed_scale", None))]


def scales(scale: object) -> bool:
    """An ``embed_scale`` that changes the lookup (None or 1 does not)."""
    if scale is None:
        return False
    return not bool(torch.all(torch.as_tensor(scale, dtype=torch.float32) == 1.0))


def _without_scale(wrapper: nn.Module) -> Callable:
    def forward(x, *args, **kwargs):
        base = wrapper.token_adapter.base_layer
        weight = wrapper.token_adapter.merged_weight(wrapper.active_adapters)
        return F.embedding(x, weight, base.padding_idx, base.max_norm, base.norm_type, base.scale_grad_by_freq,
                           base.sparse)
    return forward


def _tied_embeddings(model: nn.Module) -> list[nn.Module]:
    """Tied wrappers around an Embedding (not the output layer): other embeddings sharing the
    input embedding's weight."""
    return [w for w in _token_wrappers(model) if w.token_adapter.tied_adapter is not None
            and isinstance(w.token_adapter.base_layer, nn.Embedding)]


@contextlib.contextmanager
def _forward_replaced(modules: list[nn.Module], make: Callable[[nn.Module], Callable]) -> Iterator[None]:
    for m in modules:
        m.forward = make(m)
    try:
        yield
    finally:
        for m in modules:
            del m.forward


def _without_bias(wrapper: nn.Module) -> Callable:
    def forward(x, *args, **kwargs):
        return F.linear(x, wrapper.token_adapter.merged_weight(wrapper.active_adapters))
    return forward


def _bypassed(wrapper: nn.Module) -> Callable:
    def forward(x, *args, **kwargs):
        return wrapper.token_adapter.base_layer(x, *args, **kwargs)
    return forward


def _inactive_copies(model: nn.Module) -> list[nn.Module]:
    """The reference's saved modules that run their original because the active adapter has no
    copy there (a module another adapter saved: ``reference.adapters``)."""
    from reference.layers import SavedModule

    return [m for m in model.modules() if isinstance(m, SavedModule) and m.active_adapter is None
            and len(m.modules_to_save)]


def _copy_run(wrapper: nn.Module) -> Callable:
    def forward(*args, **kwargs):
        return next(iter(wrapper.modules_to_save.values()))(*args, **kwargs)
    return forward


@dataclass(frozen=True)
class Defect:
    name: str
    reference: str
    """What the reference does instead (the divergence's reference value)."""
    upstream: str
    modules: Callable[[nn.Module], list[nn.Module]]
    make: Callable[[nn.Module], Callable]

    def applies(self, reference: nn.Module) -> bool:
        return bool(self.modules(reference))

    def applied(self, reference: nn.Module):
        return _forward_replaced(self.modules(reference), self.make)


DEFECTS = (
    Defect("new_adapter_copy_active", "a saved module runs its original while the active adapter has no copy there",
           "upstream's forward is the reference's with the other adapter's copy running", _inactive_copies, _copy_run),
    Defect("tied_head_bias_dropped", "a tied output layer wrapped for trainable tokens adds its bias",
           "upstream's forward is the reference's with that bias dropped", _biased_heads, _without_bias),
    Defect("token_embed_scale_dropped", "a scaled embedding wrapped for trainable tokens keeps its embed_scale",
           "upstream's forward is the reference's with that scale dropped", _scaled_embeddings, _without_scale),
    Defect("tied_embedding_wrappers_bypassed",
           "every embedding sharing the input embedding's weight looks up the trainable rows",
           "upstream's forward is the reference's with those embeddings left unwrapped", _tied_embeddings, _bypassed),
)
