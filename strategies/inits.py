"""``init_lora_weights`` for the strategies: the plain values and the profile's variants.

The variants (``reference.inits``: ``olora``, ``pissa``, ``orthogonal``) are drawn where the
profile models them, under the constraints that keep a valid case valid:

* ``lora_bias=True`` takes only ``True`` / ``False`` (upstream's config rejects the rest);
* ``orthogonal`` needs an even rank: an odd ``r`` becomes 2 (``rank_pattern`` values are even);
* ``pissa`` refuses a quantized base: on a quantized case it is left out;
* a passed-in PeftModel (trl level) carries no variant: ``reference.trained`` writes trained
  values over a default-initialised adapter only.

Two invalid kinds use them: ``pissa_on_quantized`` and ``orthogonal_odd_rank``.  A cell may pin
a variant (:data:`strategies.coverage.INIT_FEATURES`).
"""

from __future__ import annotations

from typing import Any

from hypothesis import strategies as st
from hypothesis.strategies import SearchStrategy

from reference.profiles import Profile
from reference.spec import ABSENT

__all__ = ["INIT_INVALID_KINDS", "PLAIN_INITS", "init_values", "init_variant"]

PLAIN_INITS = (True, False, "gaussian")
INIT_INVALID_KINDS = ("pissa_on_quantized", "orthogonal_odd_rank")
"""The invalid kinds built from an init variant (``strategies.cases.INVALID_KINDS``)."""
_NEEDS = {"pissa_on_quantized": "pissa", "orthogonal_odd_rank": "orthogonal"}


def init_values(profile: Profile) -> SearchStrategy[Any]:
    """``init_lora_weights`` left out, a plain value or one of the profile's variants."""
    return st.one_of(st.just(ABSENT), st.sampled_from(PLAIN_INITS + profile.init_variants))


def init_variant(value: Any) -> str:
    """The coverage feature of an ``init_lora_weights`` value (JSON or spec): the variant's
    name, or ``default`` for the plain values and a left-out field."""
    if isinstance(value, str) and value.lower() in ("olora", "pissa", "orthogonal"):
        return value.lower()
    return "default"


def invalid_kind_possible(kind: str, profile: Profile, quantized: bool | None, pinned: str | None) -> bool:
    """Whether an init-built invalid ``kind`` can be drawn: the profile has its variant,
    ``pissa_on_quantized`` needs a quantized case, and a pinned init must be that variant."""
    variant = _NEEDS[kind]
    if variant not in profile.init_variants or (pinned is not None and pinned != variant):
        return False
    return quantized is True if kind == "pissa_on_quantized" else True


def keeps_pinned_init(kind: str) -> bool:
    """Whether an invalid kind leaves a pinned init variant alone (the kinds that need
    ``lora_bias=True`` or a gaussian init would be rejected by the init check first)."""
    return kind not in ("lora_bias_on_embedding", "lora_bias_with_gaussian_init", "dora_with_lora_bias",
                        "peft_model_with_config")
