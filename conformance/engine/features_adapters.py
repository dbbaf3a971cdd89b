"""Registry features of resumed adapters (``training.load_saved``), of several adapters
(``second_adapter``, ``training.set_adapter``), and of token rows around saved modules and cloned
chat templates: what the known-divergence entries about them key on.  Registered into ``conformance.engine.features``' tables."""

from __future__ import annotations

from typing import Any, Callable

from conformance.engine.features import CaseContext, _task_heads
from reference.spec import ABSENT

__all__ = ["ADAPTER_CASE_ONLY", "ADAPTER_FEATURES", "ADAPTER_SET_FEATURES"]


def _second_adapter_saves_anew(ctx: CaseContext) -> bool:
    """The second adapter saves a module the first does not (so ``add_adapter`` wraps it anew),
    and the case does not switch to the second adapter afterwards."""
    second = ctx.case.second_adapter
    if second is None or ctx.case.training.set_adapter is not ABSENT:
        return False
    first, named = _saved_by_each(ctx)
    return any(n not in first for n in named)


def _saved_by_each(ctx: CaseContext) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The module names the first and the second adapter save (a classification PEFT model
    saves its head for both)."""
    def names(spec) -> tuple[str, ...]:
        return tuple(spec.modules_to_save or ()) if spec.modules_to_save is not ABSENT else ()

    return names(ctx.case.adapter) + _task_heads(ctx), names(ctx.case.second_adapter) + _task_heads(ctx)


def _first_saves_alone(ctx: CaseContext) -> bool:
    """A second adapter is added without a switch, and the first saves a module it does not."""
    if ctx.case.second_adapter is None or ctx.case.training.set_adapter is not ABSENT:
        return False
    first, second = _saved_by_each(ctx)
    return any(n not in second for n in first)


def _switch_leaves_a_saved_module_bare(ctx: CaseContext) -> bool:
    """``set_adapter`` switches to an adapter that has no copy in some saved module."""
    if ctx.case.second_adapter is None or ctx.case.training.set_adapter is ABSENT:
        return False
    first, second = _saved_by_each(ctx)
    mine, other = (first, second) if ctx.case.training.set_adapter == "default" else (second, first)
    return any(n not in mine for n in other)


def _inference_model(ctx: CaseContext) -> bool:
    """The case prepares a model for inference: ``inference_mode=True``, or a resumed adapter
    loaded without ``is_trainable`` (``from_pretrained`` stores ``inference_mode=not is_trainable``)."""
    t = ctx.case.training
    if t.load_saved:
        return t.is_trainable is not True
    return ctx.case.adapter.inference_mode is True


def _tied_to_saved_originals(ctx: CaseContext) -> frozenset[str]:
    """Parameters that share their storage with a saved module's original (a tied input embedding
    beside a saved ``lm_head``): where a flag set on the original shows (the reference's snapshot)."""
    snap = ctx.reference
    if snap is None or snap.model is None:
        return frozenset()
    out: set[str] = set()
    for group in snap.model.shared_storage:
        paths = group.split(" = ")
        if any(".original_module." in p for p in paths):
            out |= {p for p in paths if ".original_module." not in p}
    return frozenset(out)


def _tokens_around_a_saved_module(ctx: CaseContext) -> bool:
    """The reference wraps a saved module for trainable token rows: a tied ``lm_head`` saved beside
    trainable tokens (given, or added by a cloned chat template)."""
    snap = ctx.reference
    return snap is not None and any(t.base_kind == "saved module" for t in snap.tokens)


def _tied_head_inside_a_saved_module(ctx: CaseContext) -> bool:
    """Trainable token rows on the input embedding while a module to save *contains* a module tied to
    that embedding (roberta's ``lm_head`` holds the tied ``lm_head.decoder``, bert's ``cls`` its
    ``cls.predictions.decoder``)."""
    adapter = ctx.case.adapter
    if adapter.trainable_token_indices in (ABSENT, None) or adapter.modules_to_save in (ABSENT, None):
        return False
    weight = getattr(ctx.model.get_input_embeddings(), "weight", None)
    tied = [n for n, m in ctx.model.named_modules(remove_duplicate=False)
            if n and getattr(m, "weight", None) is weight and m is not ctx.model.get_input_embeddings()]
    saved = [n for n, _ in ctx.model.named_modules() if n and any(n == s or n.endswith("." + s) for s in adapter.modules_to_save)]
    return any(t.startswith(s + ".") for t in tied for s in saved)


def _template_rows_off_embed_tokens(ctx: CaseContext) -> bool:
    """A cloned chat template's rows go to an input embedding not named ``embed_tokens``."""
    if ctx.case.training.level != "trl" or ctx.case.training.chat_template != "tokenizer":
        return False
    embedding = ctx.model.get_input_embeddings()
    name = next((n for n, m in ctx.model.named_modules() if m is embedding), "")
    return name.rsplit(".", 1)[-1] != "embed_tokens"


def _head_tied_by_config_only(ctx: CaseContext) -> bool:
    """Trainable token rows on a model whose top-level config says ``tie_word_embeddings=True`` while
    its output embedding does not share the input embedding's weight (transformers 4's composite
    vision-language configs default the flag to True; the text config says False)."""
    if ctx.case.adapter.trainable_token_indices in (ABSENT, None):
        return False
    model = ctx.model
    if not getattr(model.config, "tie_word_embeddings", False) or not getattr(model, "_tied_weights_keys", None):
        return False
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    weight = getattr(model.get_input_embeddings(), "weight", None)
    return head is not None and weight is not None and getattr(head, "weight", None) is not weight


ADAPTER_FEATURES: dict[str, Callable[[CaseContext], Any]] = {
    "inference_model": _inference_model,
    "second_adapter_saves_anew": _second_adapter_saves_anew,
    "switch_leaves_a_saved_module_bare": _switch_leaves_a_saved_module_bare,
    "first_saves_alone": _first_saves_alone,
    "tokens_around_a_saved_module": _tokens_around_a_saved_module,
    "tied_head_inside_a_saved_module": _tied_head_inside_a_saved_module,
    "template_rows_off_embed_tokens": _template_rows_off_embed_tokens,
    "head_tied_by_config_only": _head_tied_by_config_only,
}
"""Scalar features for ``when``."""

ADAPTER_CASE_ONLY = frozenset(ADAPTER_FEATURES) - {"tokens_around_a_saved_module", "template_rows_off_embed_tokens",
                                                   "tied_head_inside_a_saved_module", "head_tied_by_config_only"}

ADAPTER_SET_FEATURES: dict[str, Callable[[CaseContext], frozenset[str]]] = {
    "tied_to_saved_originals": _tied_to_saved_originals,
}
"""Set features for ``{placeholders}``."""
