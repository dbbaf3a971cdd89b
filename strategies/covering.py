"""Covering arrays: few rows that hold every t-way combination of levels, constraints allowed.

A random draw meets a combination of three rare values (a peft-level 4-bit case with
``autocast_adapter_dtype=False``, a half-precision compute dtype and uint8 storage, say)
only by luck; a covering array meets each by construction.  :func:`covering_array`
builds one greedily, AETG-style: each new row starts from a missing combination (of the
factor subset with the most missing) and fills the other factors one at a time, the most
loaded first, with the level that covers the most combinations still missing; of a few
such candidate rows the best is kept.  A last pass drops each late row whose own
combinations fit into other rows (in factors there that hold nothing only they hold),
about a tenth fewer rows on the gate's designs.  :func:`coverage` measures what given
rows (read off real cases, say) cover, and names what they miss.

* *factors*: name -> the tuple of its levels (any hashable values; ``True`` and ``1`` are
  different levels).
* *groups*: :class:`Group` objects, each a set of factors and a strength ``t``: every
  combination of levels of every ``t`` of its factors must appear in some row.  Groups
  may overlap and have different strengths (mixed-strength arrays).
* *valid*: an optional constraint, called with **partial** rows (a dict holding some of
  the factors).  It must return False only when the factors present already break a
  rule (write each rule as "when both are present and ..."), so that a combination is
  *feasible* exactly when some complete row that ``valid`` accepts contains it.
  Infeasible combinations are computed (:func:`requirements`) and left out of what must
  be covered, never silently missed.

Everything is deterministic for a given seed (``random.Random``).  The search is plain
backtracking, meant for the small designs of a test corpus (tens of factors, a handful
of levels each).
"""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass
from typing import Any, Callable, Hashable, Iterable, Mapping, Sequence

__all__ = ["Group", "GroupCoverage", "coverage", "covering_array", "requirements"]

Factors = Mapping[str, Sequence[Hashable]]
Constraint = Callable[[Mapping[str, Any]], bool]
Combination = tuple[tuple[int, ...], tuple[int, ...]]
"""Internally: (factor indices, level indices), both sorted by factor index."""


@dataclass(frozen=True)
class Group:
    """Factors whose every ``strength``-way combination of levels must be covered."""

    name: str
    factors: tuple[str, ...]
    strength: int


@dataclass(frozen=True)
class GroupCoverage:
    """How much of one group a set of rows covers."""

    group: str
    strength: int
    required: int
    """Feasible combinations: those some valid row can hold."""
    covered: int
    infeasible: int
    """Combinations no valid row can hold (not required)."""
    missing: tuple[dict[str, Any], ...]
    """The feasible combinations no row holds, as factor -> level dicts."""

    @property
    def complete(self) -> bool:
        return self.covered == self.required


class _Design:
    """Factors, groups and constraint, checked once and indexed by position."""

    def __init__(self, factors: Factors, groups: Iterable[Group], valid: Constraint | None):
        self.names = tuple(factors)
        self.levels = tuple(tuple(factors[n]) for n in self.names)
        self.groups = tuple(groups)
        self.valid = valid
        for name, levels in zip(self.names, self.levels, strict=True):
            if not levels:
                raise ValueError(f"factor {name!r} has no levels; give it at least one")
            if len({_key(v) for v in levels}) != len(levels):
                raise ValueError(f"factor {name!r} repeats a level: {levels!r}")
        index = {n: i for i, n in enumerate(self.names)}
        self.group_subsets: list[tuple[tuple[int, ...], ...]] = []
        for g in self.groups:
            unknown = [f for f in g.factors if f not in index]
            if unknown:
                raise ValueError(f"group {g.name!r} names unknown factors {unknown!r}; known: {list(self.names)!r}")
            if len(set(g.factors)) != len(g.factors):
                raise ValueError(f"group {g.name!r} repeats a factor: {g.factors!r}")
            if not 1 <= g.strength <= len(g.factors):
                raise ValueError(f"group {g.name!r}: strength={g.strength!r} must be between 1 and its "
                                 f"{len(g.factors)} factors")
            members = sorted(index[f] for f in g.factors)
            self.group_subsets.append(tuple(itertools.combinations(members, g.strength)))
        self.all_subsets = sorted({s for subsets in self.group_subsets for s in subsets})
        self.subsets_of: dict[int, list[tuple[int, ...]]] = {
            f: [s for s in self.all_subsets if f in s] for f in range(len(self.names))}
        self._sets = {s: frozenset(s) for s in self.all_subsets}
        self._touching: dict[tuple[int, ...], list[tuple[int, ...]]] = {}
        self._feasible: dict[Combination, bool] = {}

    def row_of(self, assigned: Mapping[int, int]) -> dict[str, Any]:
        return {self.names[f]: self.levels[f][lv] for f, lv in assigned.items()}

    def accepts(self, assigned: Mapping[int, int]) -> bool:
        return self.valid is None or bool(self.valid(self.row_of(assigned)))

    def complete(self, assigned: dict[int, int], order: Sequence[int] | None = None) -> dict[int, int] | None:
        """A complete valid row extending ``assigned`` (backtracking), or None."""
        if self.valid is None:
            return {f: assigned.get(f, 0) for f in range(len(self.names))}
        named = self.row_of(assigned)
        if not self.valid(named):
            return None
        todo = [f for f in (range(len(self.names)) if order is None else order) if f not in assigned]
        return self._extend(dict(assigned), named, todo, 0)

    def _extend(self, row: dict[int, int], named: dict[str, Any], todo: list[int], at: int) -> dict[int, int] | None:
        if at == len(todo):
            return dict(row)
        f = todo[at]
        name = self.names[f]
        for lv, value in enumerate(self.levels[f]):
            row[f], named[name] = lv, value
            if self.valid(named) and (found := self._extend(row, named, todo, at + 1)) is not None:
                return found
        del row[f], named[name]
        return None

    def feasible(self, combo: Combination) -> bool:
        if combo not in self._feasible:
            witness = self.complete(dict(zip(*combo, strict=True)))
            self._feasible[combo] = witness is not None
            if witness is not None:  # every combination the witness holds is feasible too
                self._feasible.update(dict.fromkeys(self.held(witness), True))
        return self._feasible[combo]

    def combinations(self, group: int) -> Iterable[Combination]:
        for subset in self.group_subsets[group]:
            for levels in itertools.product(*(range(len(self.levels[f])) for f in subset)):
                yield subset, levels

    def held(self, row: Mapping[int, int], touching: Sequence[int] | None = None) -> list[Combination]:
        """The combinations (of any group) ``row`` holds; only those with a factor in
        ``touching`` when given."""
        if touching is None:
            subsets = self.all_subsets
        else:
            key = tuple(touching)
            if key not in self._touching:
                self._touching[key] = sorted({s for f in key for s in self.subsets_of[f]})
            subsets = self._touching[key]
        if len(row) == len(self.names):  # a complete row holds every subset's combination
            return [(subset, tuple([row[f] for f in subset])) for subset in subsets]
        return [(subset, tuple([row[f] for f in subset])) for subset in subsets if self._sets[subset] <= row.keys()]

    def label(self, combo: Combination) -> dict[str, Any]:
        subset, levels = combo
        return {self.names[f]: self.levels[f][lv] for f, lv in zip(subset, levels, strict=True)}


def _key(value: Any) -> tuple[type, Any]:
    """Levels compare by type as well as value: ``True`` is not the level ``1``."""
    return (type(value), value)


def requirements(factors: Factors, groups: Iterable[Group], *, valid: Constraint | None = None
                 ) -> dict[str, tuple[list[dict[str, Any]], list[dict[str, Any]]]]:
    """Per group: (the feasible combinations, which must be covered; the infeasible ones)."""
    design = _Design(factors, groups, valid)
    out = {}
    for gi, g in enumerate(design.groups):
        feasible, infeasible = [], []
        for combo in design.combinations(gi):
            (feasible if design.feasible(combo) else infeasible).append(design.label(combo))
        out[g.name] = (feasible, infeasible)
    return out


def covering_array(factors: Factors, groups: Iterable[Group], *, valid: Constraint | None = None,
                   seed: int = 0, candidates: int = 4) -> list[dict[str, Any]]:
    """Rows (factor -> level dicts, every factor set) that ``valid`` accepts and that together
    hold every feasible combination of every group.  Deterministic for a given ``seed``.

    ``candidates`` rows are built for each row kept; more rarely gives fewer rows, and
    costs time in proportion."""
    if candidates < 1:
        raise ValueError(f"candidates={candidates!r} must be at least 1")
    design = _Design(factors, groups, valid)
    rng = random.Random(seed)
    required: set[Combination] = set()
    for gi in range(len(design.groups)):
        required.update(c for c in design.combinations(gi) if design.feasible(c))
    uncovered = set(required)
    rows: list[dict[int, int]] = []
    while uncovered:
        pool = _hardest(uncovered)
        best: tuple[int, dict[int, int]] | None = None
        for _ in range(candidates):
            row = _candidate(design, rng.choice(pool), uncovered, rng)
            score = sum(1 for c in design.held(row) if c in uncovered)
            if best is None or score > best[0]:
                best = (score, row)
        assert best is not None and best[0] > 0  # the start combination is feasible, so always covered
        rows.append(best[1])
        uncovered.difference_update(design.held(best[1]))
    return [design.row_of(dict(sorted(r.items()))) for r in _relocated(rows, design, required)]


def _hardest(uncovered: set[Combination]) -> list[Combination]:
    """The missing combinations of the factor subsets with the most missing: a row started
    there, the subsets with many levels do not end up needing rows of their own."""
    left: dict[tuple[int, ...], int] = {}
    for subset, _ in uncovered:
        left[subset] = left.get(subset, 0) + 1
    most = max(left.values())
    return sorted(c for c in uncovered if left[c[0]] == most)


def _candidate(design: _Design, start: Combination, uncovered: set[Combination], rng: random.Random
               ) -> dict[int, int]:
    """One row holding ``start``; each other factor takes the level, among those ``valid``
    accepts, that covers the most missing combinations (ties: random).  Factors in the most
    missing combinations go first (IPOG's order), so that they get the choice."""
    row = dict(zip(*start, strict=True))
    order = [f for f in range(len(design.names)) if f not in row]
    rng.shuffle(order)
    load = dict.fromkeys(order, 0)
    for subset, _ in uncovered:
        for f in subset:
            if f in load:
                load[f] += 1
    order.sort(key=lambda f: -load[f])
    for pos, f in enumerate(order):
        choices = list(range(len(design.levels[f])))
        rng.shuffle(choices)
        scored = []
        for lv in choices:
            row[f] = lv
            if design.accepts(row):
                gain = sum(1 for c in design.held(row, (f,)) if c in uncovered)
                scored.append((gain, lv))
        del row[f]
        # Highest gain first, skipping a level with which the row cannot be completed.
        for _, lv in sorted(scored, key=lambda s: -s[0]):
            row[f] = lv
            if design.complete(row, order[pos + 1:]) is not None:
                break
            del row[f]
        else:  # only when ``valid`` rejects too late: any completion of the start will do
            done = design.complete(dict(zip(*start, strict=True)))
            assert done is not None
            return done
    return row


def _relocated(rows: list[dict[int, int]], design: _Design, required: set[Combination]) -> list[dict[int, int]]:
    """Drop each row (last first: the greedy's late rows hold the leftovers) whose combinations
    no other row holds can all be moved into other rows, by changing factors there that
    hold nothing only they hold.  One pass takes a greedy array most of the way to a
    local minimum (about a tenth fewer rows on the gate's designs)."""
    held = [{c for c in design.held(r) if c in required} for r in rows]
    count: dict[Combination, int] = {}
    for h in held:
        for c in h:
            count[c] = count.get(c, 0) + 1
    alive = [True] * len(rows)
    for r in reversed(range(len(rows))):
        for c in held[r]:
            count[c] -= 1
        undo: list[tuple[int, dict[int, int], set[Combination]]] = []
        for c in sorted(held[r]):
            if count[c] == 0 and not _move(c, r, rows, held, count, alive, design, required, undo):
                break
        else:
            alive[r] = False
            continue
        for s, old_row, old_held in reversed(undo):  # a combination found no home: keep the row
            for x in held[s] - old_held:
                count[x] -= 1
            for x in old_held - held[s]:
                count[x] += 1
            rows[s], held[s] = old_row, old_held
        for c in held[r]:
            count[c] += 1
    return [row for row, keep in zip(rows, alive, strict=True) if keep]


def _move(combo: Combination, r: int, rows: list[dict[int, int]], held: list[set[Combination]],
          count: dict[Combination, int], alive: list[bool], design: _Design, required: set[Combination],
          undo: list[tuple[int, dict[int, int], set[Combination]]]) -> bool:
    """Put ``combo`` into a live row other than ``r`` without losing a combination only that
    row holds; record the change in ``undo``."""
    changed = combo[0]
    for s, row in enumerate(rows):
        if s == r or not alive[s]:
            continue
        new = {**row, **dict(zip(*combo, strict=True))}
        if not design.accepts(new):
            continue
        touched = {c for c in design.held(row, changed) if c in required}
        gained = {c for c in design.held(new, changed) if c in required}
        lost = touched - gained
        if any(count[c] < 2 for c in lost):
            continue
        undo.append((s, row, held[s]))
        for c in lost:
            count[c] -= 1
        for c in gained - touched:
            count[c] = count.get(c, 0) + 1
        rows[s], held[s] = new, (held[s] - lost) | gained
        return True
    return False


def coverage(rows: Iterable[Mapping[str, Any]], factors: Factors, groups: Iterable[Group], *,
             valid: Constraint | None = None) -> dict[str, GroupCoverage]:
    """Per group, how many of its feasible combinations ``rows`` hold, and which are missing.

    A row may leave factors out (they hold no combination) and may hold levels that are not
    among the factor's (ignored), so the rows can be read off real cases."""
    design = _Design(factors, groups, valid)
    lookup = [{_key(v): i for i, v in enumerate(levels)} for levels in design.levels]
    held: set[Combination] = set()
    for row in rows:
        indexed = {}
        for f, name in enumerate(design.names):
            if name in row and (lv := lookup[f].get(_key(row[name]))) is not None:
                indexed[f] = lv
        held.update(design.held(indexed))
    out = {}
    for gi, g in enumerate(design.groups):
        feasible, infeasible, missing = 0, 0, []
        for combo in design.combinations(gi):
            if not design.feasible(combo):
                infeasible += 1
                continue
            feasible += 1
            if combo not in held:
                missing.append(design.label(combo))
        out[g.name] = GroupCoverage(g.name, g.strength, feasible, feasible - len(missing), infeasible, tuple(missing))
    return out
