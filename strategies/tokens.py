"""``trainable_token_indices`` for the strategies (``reference.tokens``).

About one case in six trains a few rows of the input embedding (list form, indices below 64 of
the zoo's 256-entry vocabulary).  A valid case keeps them apart from what would reject or nest
them: no LoRA on an embedding (TypeError upstream), no ``lm_head`` among the modules to save (on
a tied model the saved copy would nest inside the token wrapper: not modelled yet), and no
passed-in PeftModel (``reference.trained`` writes LoRA values only).  A cell may pin them (the
``tokens`` adapter feature); the invalid kind ``token_index_out_of_range`` asks for a row past
the vocabulary.
"""

from __future__ import annotations

import dataclasses

from hypothesis import strategies as st

from reference.profiles import Profile
from reference.spec import ABSENT, AdapterSpec
from strategies.zoo import ZooEntry

__all__ = ["TOKENS_INVALID_KINDS", "has_tokens", "with_tokens"]

TOKENS_INVALID_KINDS = ("token_index_out_of_range",)
VOCAB_ROWS = 64
"""Indices are drawn below this (every zoo vocabulary has 256 rows)."""


def has_tokens(adapter: AdapterSpec) -> bool:
    return adapter.trainable_token_indices not in (ABSENT, None, ())


@st.composite
def with_tokens(draw, adapter: AdapterSpec, entry: ZooEntry, profile: Profile, *, pinned: bool = False,
                invalid: str | None = None) -> AdapterSpec:
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
    targets, saved = adapter.target_modules, adapter.modules_to_save
    on_embedding = isinstance(targets, tuple) and any(t in entry.embedding_names for t in targets)
    saves_head = isinstance(saved, tuple) and "lm_head" in saved
    if (on_embedding or saves_head) and not forced:
        return adapter
    changes: dict = {"trainable_token_indices": rows}
    if on_embedding:
        changes["target_modules"] = tuple(t for t in targets if t not in entry.embedding_names)
    if saves_head:
        changes["modules_to_save"] = tuple(n for n in saved if n != "lm_head") or None
    if pinned and adapter.use_dora is True:
        changes["use_dora"] = ABSENT  # a tokens cell is not a DoRA cell
    return dataclasses.replace(adapter, **changes)
