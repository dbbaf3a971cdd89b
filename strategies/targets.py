"""Target modules: the four kinds of ``target_modules``, near-miss names and regexes.

A case's *target kind* is one of :data:`TARGET_KINDS`, read from its
``target_modules`` by :func:`target_kind`; it is a coverage dimension (every model
type is checked with every kind in every run) and the strategies can be asked for
one kind.  Near misses look like targets but must not match; valid cases carry them
only beside names that do match, so that a near miss never empties the targets.
"""

from __future__ import annotations

import re
from typing import Any

from hypothesis import strategies as st

from reference.spec import ABSENT
from strategies.zoo import ZooEntry

__all__ = ["TARGET_KINDS", "layer_one_exclude", "matching_regexes", "near_miss_regexes", "near_misses", "target_kind"]

TARGET_KINDS = ("default", "list", "regex", "all-linear")
"""``default``: ``target_modules`` absent or None (the type's default table); ``list``: names
matched exactly or as a dotted suffix; ``regex``: a string matched against the whole
module name; ``all-linear``: every Linear / Conv1D but the output head."""


def target_kind(targets: Any) -> str:
    """The kind of a ``target_modules`` value (an ``AdapterSpec`` field or its JSON)."""
    if targets is ABSENT or targets is None:
        return "default"
    if isinstance(targets, str):
        return "all-linear" if targets.lower() == "all-linear" else "regex"
    return "list"


def near_misses(names: tuple[str, ...]) -> list[str]:
    """Names that look like targets but must not match: partial, non-dotted suffix, prefixed, upper case."""
    out = []
    for name in names:
        if len(name) > 2:
            out.append(name[:-1])  # "q_pro": a partial name is no suffix match
        out.append("x" + name)  # "xq_proj": ends like a real name, no dot boundary
        if "_" in name:
            out.append(name[name.index("_"):])  # "_proj": a suffix of the name, not a dotted one
        out.append(name.upper())
    return out


def _alternation(names: tuple[str, ...]) -> str:
    return "|".join(re.escape(n) for n in names)


def matching_regexes(entry: ZooEntry, names: tuple[str, ...]) -> list[str]:
    """Regexes that match modules named ``names`` (in every layer, or in layer 0 only)."""
    alt = _alternation(names)
    return [
        rf".*\.({alt})",  # matches
        rf".*\.{entry.layer_container}\.0\..*\.({alt})",  # matches layer 0 only
        rf".*\.({alt})$|nothing",  # matches, through an alternation
    ]


def layer_one_exclude(entry: ZooEntry) -> str:
    """An ``exclude_modules`` regex for every module of layer 1 of the layer container (and
    nothing else: t5's ``block.0.layer.1.DenseReluDense`` stays, it is in layer 0)."""
    return rf".*\.{re.escape(entry.layer_container)}\.1\..*"


def near_miss_regexes(names: tuple[str, ...]) -> list[str]:
    """Regexes that almost match ``names`` but match no module: the whole name must match."""
    alt = _alternation(names)
    return [
        rf"({alt})",  # a full match needs the whole path
        rf".*({alt})\.",  # trailing dot
    ]


@st.composite
def near_miss_targets(draw, entry: ZooEntry, *, regex: bool) -> Any:
    """``target_modules`` that match nothing: a near-miss regex, or a list of near-miss names."""
    if regex:
        chosen = tuple(draw(st.lists(st.sampled_from(entry.linear_names), min_size=1, max_size=3, unique=True)))
        return draw(st.sampled_from(near_miss_regexes(chosen)))
    return tuple(draw(st.lists(st.sampled_from(near_misses(entry.linear_names)), min_size=1, max_size=3, unique=True)))
