"""``trainable_token_indices`` for the strategies (``reference.tokens``).

About one case in six trains a few rows of the input embedding (list form, indices below 64 of
the zoo's 256-entry vocabulary); a third of those at the peft level, on causal types with an
``lm_head`` (not encoder-decoders), take the dict form instead: ``{<embedding>: rows}``,
``{"lm_head": rows}`` or both, each with rows of its own (``lm_head`` then leaves the targets).  A valid case keeps them apart from what would reject or nest
them: no LoRA on an embedding (TypeError upstream) and no passed-in PeftModel (``reference.trained`` writes LoRA values only).  A cell may pin them (the
``tokens`` adapter feature); the invalid kind ``token_index_out_of_range`` asks for a row past
the vocabulary.  A saved ``lm_head`` stays beside the rows: on a tied model peft then wraps the saved
module itself for the rows (``reference.tokens``; registry ``tokens-around-a-saved-tied-head-cannot-run``).
"""

from __future__ import annotations

import dataclasses
import functools

from hypothesis import strategies as st

from reference.profiles import Profile
from reference.spec import ABSENT, AdapterSpec
from strategies.zoo import ZooEntry

__all__ = ["TOKENS_INVALID_KINDS", "has_tokens", "with_tokens"]

TOKENS_INVALID_KINDS = ("token_index_out_of_range",)
VOCAB_ROWS = 64
"""Indices are drawn below this (every zoo vocabulary has 256 rows)."""


@functools.lru_cache(maxsize=None)
def dict_form_types() -> tuple[str, ...]:
    """Causal types whose model has an ``lm_head`` beside its input embedding and no encoder-decoder
    aliasing: where the dict form may name the embedding, the head, or both."""
    from strategies.tying import ENCODER_DECODERS
    from strategies.zoo import model_types

    return tuple(t for t in model_types("CAUSAL_LM") if t not in ENCODER_DECODERS and t not in _NO_LM_HEAD)


_NO_LM_HEAD = ("bert", "electra")
"""Causal zoo types whose head is not called ``lm_head`` (``cls.predictions``, ``generator_lm_head``)."""


def has_tokens(adapter: AdapterSpec) -> bool:
    return adapter.trainable_token_indices not in (ABSENT, None, ())


@st.composite
def with_tokens(draw, adapter: AdapterSpec, entry: ZooEntry, profile: Profile, *, pinned: bool = False,
                invalid: str | None = None, model_type: str = "", level: str = "peft",
                task: str = "CAUSAL_LM") -> AdapterSpec:
    """``adapter`` with trainable token rows drawn (always when ``pinned`` or for the invalid
    kind), the fields that would reject or nest them adjusted (pinned) or the rows left out."""
    if "trainable_token_indices" not in profile.features:
        return adapter
    forced = pinned or invalid in TOKENS_INVALID_KINDS
    if not forced and draw(st.integers(0, 5), label="tokens_roll") != 5:
        return adapter
    if invalid == "token_index_out_of_range":
        rows = (draw(st.sampled_from((256, 300))),)
    else:
        rows = tuple(draw(st.lists(st.integers(0, VOCAB_ROWS - 1), min_size=1, max_size=3, unique=True),
                          label="token_indices"))
    targets = adapter.target_modules
    on_embedding = isinstance(targets, tuple) and any(t in entry.embedding_names for t in targets)
    if on_embedding and not forced:
        return adapter
    changes: dict = {"trainable_token_indices": rows}
    if level == "peft" and task == "CAUSAL_LM" and model_type in dict_form_types() and draw(st.integers(0, 2), label="tokens_form") == 2:
        keys = draw(st.sampled_from(((entry.embedding_names[0],), ("lm_head",), (entry.embedding_names[0], "lm_head"))),
                    label="token_modules")
        pairs = [(keys[0], rows)]
        if len(keys) == 2:
            pairs.append((keys[1], tuple(draw(st.lists(st.integers(0, VOCAB_ROWS - 1), min_size=1, max_size=3,
                                                       unique=True), label="head_token_indices"))))
        changes["trainable_token_indices"] = tuple(pairs)
        if "lm_head" in keys and isinstance(targets, tuple) and "lm_head" in targets:
            targets = tuple(t for t in targets if t != "lm_head")
            changes["target_modules"] = targets
        saved = adapter.modules_to_save
        if isinstance(saved, tuple) and any(k in saved for k in keys):  # rows and full training at once: refused
            changes["modules_to_save"] = tuple(n for n in saved if n not in keys) or None
    if on_embedding:
        changes["target_modules"] = tuple(t for t in targets if t not in entry.embedding_names)
    if pinned and adapter.use_dora is True:
        changes["use_dora"] = ABSENT  # a tokens cell is not a DoRA cell
    return dataclasses.replace(adapter, **changes)
