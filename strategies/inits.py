"""``init_lora_weights`` for the strategies: the plain values and the profile's variants.

The variants (``reference.inits``: ``olora``, ``pissa``, ``pissa_niter``, ``loftq``,
``orthogonal``) are drawn where the profile models them, under the constraints that keep a
valid case valid:

* ``lora_bias=True`` takes only ``True`` / ``False`` (upstream's config rejects the rest);
* ``orthogonal`` needs an even rank: an odd ``r`` becomes 2 (``rank_pattern`` values are even);
* ``pissa`` / ``pissa_niter_K`` refuse a quantized base, and ``loftq`` is drawn on an unquantized
  one only: on a quantized case they are left out;
* ``pissa_niter_K`` draws K in 0 .. 4 (shrinking to 0); ``loftq`` comes with a ``loftq_config``
  (:func:`loftq_configs`);
* a passed-in PeftModel (trl level) carries no variant: ``reference.trained`` writes trained
  values over a default-initialised adapter only.

Four invalid kinds use them: ``pissa_on_quantized``, ``orthogonal_odd_rank``,
``pissa_niter_malformed`` (``"pissa_niter_"``, ``"pissa_niter_x"``, ``"pissa_foo"``) and
``loftq_without_config``.  A cell may pin a variant (:data:`strategies.coverage.INIT_FEATURES`).
An invalid case built for any other rule takes a plain init (:func:`keeps_pinned_init`).
"""

from __future__ import annotations

from typing import Any

import torch
from hypothesis import strategies as st
from hypothesis.strategies import SearchStrategy

from reference.profiles import Profile
from reference.spec import ABSENT

__all__ = ["INIT_INVALID_KINDS", "PLAIN_INITS", "UNQUANTIZED_ONLY", "init_values", "init_variant", "invalid_init",
           "loftq_configs", "loftq_modelled", "masks_invalid",
           "variant_value"]

PLAIN_INITS = (True, False, "gaussian")
INIT_INVALID_KINDS = ("pissa_on_quantized", "orthogonal_odd_rank", "pissa_niter_malformed", "loftq_without_config")
"""The invalid kinds built from an init variant (``strategies.cases.INVALID_KINDS``)."""
_NEEDS = {"pissa_on_quantized": "pissa", "orthogonal_odd_rank": "orthogonal", "pissa_niter_malformed": "pissa_niter",
          "loftq_without_config": "loftq"}
UNQUANTIZED_ONLY = ("pissa", "pissa_niter", "loftq")
"""The variants drawn on unquantized cases only (PiSSA refuses a quantized base; LoftQ quantizes
the float weight itself)."""
_MALFORMED_PISSA = ("pissa_niter_", "pissa_niter_x", "pissa_foo", "pissa_niter_2_niter_3")


def variant_value(variant: Any) -> SearchStrategy[Any]:
    """The ``init_lora_weights`` value of a variant name: ``pissa_niter`` draws
    ``"pissa_niter_K"`` with K in 0 .. 4 (shrinking to 0), the others are their own value."""
    if variant == "pissa_niter":
        return st.integers(0, 4).map(lambda k: f"pissa_niter_{k}")
    return st.just(variant)


def init_values(profile: Profile) -> SearchStrategy[Any]:
    """``init_lora_weights`` left out, a plain value or one of the profile's variants."""
    return st.one_of(st.just(ABSENT), st.sampled_from(PLAIN_INITS + profile.init_variants).flatmap(variant_value))


def invalid_init(kind: str) -> SearchStrategy[str]:
    """The ``init_lora_weights`` of the init-built invalid ``kind``."""
    if kind == "pissa_niter_malformed":
        return st.sampled_from(_MALFORMED_PISSA)
    return st.just(_NEEDS[kind])


def loftq_configs(init: Any, profile: Profile, invalid: str | None) -> SearchStrategy[Any]:
    """``loftq_config`` for ``init``: with ``"loftq"``, ``loftq_bits`` among the bit counts the
    profile's quantizers run here (peft < 0.20's normal-float on any device, bitsandbytes' on
    CUDA only; where none can, peft >= 0.20 on a CPU, all of them: both sides raise alike) and
    ``loftq_iter`` 1 or 2, as (key, value) pairs; left out otherwise (and for
    ``loftq_without_config``)."""
    if init != "loftq" or invalid == "loftq_without_config":
        return st.just(ABSENT)
    bits = [b for b, q in profile.loftq_quantizers if q == "normal-float" or torch.cuda.is_available()]
    bits = bits or [b for b, _ in profile.loftq_quantizers]
    return st.tuples(st.sampled_from(bits), st.integers(1, 2)).map(
        lambda t: (("loftq_bits", t[0]), ("loftq_iter", t[1])))


def init_variant(value: Any) -> str:
    """The coverage feature of an ``init_lora_weights`` value (JSON or spec): the variant's
    name (``pissa_niter`` for any ``"pissa..."`` string but ``"pissa"``), or ``default`` for the
    plain values and a left-out field."""
    if isinstance(value, str) and value.lower() in ("olora", "pissa", "orthogonal"):
        return value.lower()
    if isinstance(value, str) and value.startswith("pissa"):
        return "pissa_niter"
    if value == "loftq":
        return "loftq"
    return "default"


def invalid_kind_possible(kind: str, profile: Profile, quantized: bool | None, pinned: str | None) -> bool:
    """Whether an init-built invalid ``kind`` can be drawn: the profile has its variant,
    ``pissa_on_quantized`` needs a quantized case, the new variants' kinds an unquantized one, and
    a pinned init must be that variant."""
    variant = _NEEDS[kind]
    if variant not in profile.init_variants or (pinned is not None and pinned != variant):
        return False
    if kind == "pissa_on_quantized":
        return quantized is True
    return quantized is False if variant in UNQUANTIZED_ONLY else True


def keeps_pinned_init(kind: str, variant: str | None = None) -> bool:
    """Whether an invalid kind leaves a pinned init ``variant`` alone: only the kinds built from
    that variant do.  A variant's own upstream crashes (OLoRA on a Conv1D with DoRA, orthogonal
    on bitsandbytes, LoftQ without scipy or CUDA: registry entries and ``strategies.inits``) come
    during injection, before the refusals checked after it (an unknown ``bias``), so an invalid
    case built for another rule takes a plain init."""
    return variant is not None and _NEEDS.get(kind) == variant


def masks_invalid(init: Any, invalid: str | None) -> bool:
    """Whether a drawn ``init`` would come with the refusal ``invalid`` is built for, when that
    refusal is not built from it (:func:`keeps_pinned_init`): such a draw is replaced by the
    default init."""
    variant = init_variant(init)
    return invalid is not None and variant != "default" and not keeps_pinned_init(invalid, variant)


LOFTQ_UNMODELLED_TYPES = ("gpt2",)
"""The zoo's types with transformers ``Conv1D`` layers (weight stored (in, out)): upstream's LoftQ
decomposes them in that layout (peft 0.15 - 0.21), which the reference does not model."""


def loftq_modelled(model_type: str, embedding_names: tuple[str, ...], target_modules: Any) -> bool:
    """Whether a LoftQ case on ``model_type`` with ``target_modules`` stays where the reference
    models LoftQ: Linear layers only.  Upstream's LoftQ on an Embedding differs per era (peft 0.15
    ignores ``loftq_config`` there and quantizes 4-bit nf4 on CUDA, peft 0.21 raises a TypeError),
    and on a Conv1D it decomposes the stored layout; neither is modelled, so the strategies keep
    LoftQ off them (README: "not modelled")."""
    if model_type in LOFTQ_UNMODELLED_TYPES:
        return False
    if target_modules in (ABSENT, None, "all-linear"):
        return True
    text = target_modules if isinstance(target_modules, str) else " ".join(map(str, target_modules))
    return not any(name in text for name in embedding_names)
