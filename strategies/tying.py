"""``ensure_weight_tying`` for the strategies (``reference.tying``).

About one peft-level case in six asks for weight tying (where the profile has it), and half of
those also name the input embedding where the option acts: ``embed_tokens`` among the modules to
save, or among list targets (then the tied head's LoRA is the embedding's).  Models without a tied
module exercise the warnings.  Left out: encoder-decoders (their tied embeddings sit inside the
encoder and decoder; not modelled yet), trainable token rows, DoRA beside tied targets, a LoRA bias
on an embedding, a decomposing init beside tied targets (registry
``weight-tying-broken-by-decomposing-inits``), a passed-in PeftModel.  A cell may pin it (the ``tying`` adapter feature), on
decoder types whose config ties the input and output embeddings (:func:`tied_types`).
"""

from __future__ import annotations

import dataclasses
import functools

from hypothesis import strategies as st

from reference.profiles import Profile
from reference.spec import ABSENT, AdapterSpec, ModelSpec
from strategies.zoo import ZOO

__all__ = ["ENCODER_DECODERS", "tied_types", "wants_tying", "with_tying"]

ENCODER_DECODERS = ("t5", "mt5", "bart")


@functools.lru_cache(maxsize=None)
def tied_types() -> tuple[str, ...]:
    """Zoo types (not encoder-decoders) whose config ties embeddings and whose input embedding is
    ``embed_tokens``: where tying acts."""
    return tuple(t for t, e in ZOO.items() if t not in ENCODER_DECODERS and "embed_tokens" in e.embedding_names
                 and getattr(e.make_config(1, 64), "tie_word_embeddings", False))


def wants_tying(adapter: AdapterSpec) -> bool:
    return adapter.ensure_weight_tying is True


@st.composite
def with_tying(draw, adapter: AdapterSpec, model: ModelSpec, profile: Profile, *, level: str,
               pinned: bool = False, invalid: str | None = None) -> AdapterSpec:
    if "ensure_weight_tying" not in profile.features or level != "peft" or model.model_type in ENCODER_DECODERS:
        return adapter
    if adapter.trainable_token_indices not in (ABSENT, None, ()):
        if not pinned:
            return adapter
        adapter = dataclasses.replace(adapter, trainable_token_indices=ABSENT)  # a tying cell: tying, not token rows
    if not pinned and draw(st.integers(0, 5), label="tying_roll") != 5:
        return adapter
    changes: dict = {"ensure_weight_tying": True}
    entry = ZOO[model.model_type]
    how = draw(st.sampled_from(("as_given", "save_embedding", "target_embedding")), label="tying_how")
    saved = adapter.modules_to_save if isinstance(adapter.modules_to_save, tuple) else ()
    targets = adapter.target_modules
    if invalid is None and "embed_tokens" in entry.embedding_names:
        if how == "save_embedding" and not (isinstance(targets, tuple) and "embed_tokens" in targets):
            changes["modules_to_save"] = tuple(dict.fromkeys((*saved, "embed_tokens")))
        elif how == "target_embedding" and isinstance(targets, tuple) and not any(
                n in ("embed_tokens", "lm_head") for n in saved):
            changes["target_modules"] = tuple(dict.fromkeys((*targets, "embed_tokens")))
            changes["use_dora"] = ABSENT if adapter.use_dora is True else adapter.use_dora
            changes["lora_bias"] = ABSENT if adapter.lora_bias is True else adapter.lora_bias
    final = dataclasses.replace(adapter, **changes)
    if isinstance(final.target_modules, tuple) and "embed_tokens" in final.target_modules:
        if final.init_lora_weights not in (ABSENT, True, False, "gaussian"):
            final = dataclasses.replace(final, init_lora_weights=ABSENT)  # a decomposing init voids the tie (registry)
        if final.use_dora is True and invalid != "dora_with_lora_bias":
            final = dataclasses.replace(final, use_dora=ABSENT)  # DoRA on tied factors: not modelled
    return final
