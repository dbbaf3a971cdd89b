"""Building a gate corpus's cases from covering arrays, and the coverage they achieve.

:func:`design_corpus` builds one covering array per level x quantization kind
(:mod:`conformance.gate.design`), turns every row into a valid case drawn by Hypothesis,
spreads the model types, and adds deliberately invalid cases; the coverage reported is
measured on the cases themselves.  :func:`prepared_coverage` says, after recording, which
required combinations only cases the stack rejected hold.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

from reference.spec import Case

__all__ = [
    "INVALID_SHARE",
    "MIN_INVALID_SHARE",
    "Generated",
    "coverage_line",
    "design_corpus",
    "prepared_coverage",
]

INVALID_SHARE = 0.25
"""The share of deliberately invalid cases (the strategies' default ``invalid_rate``)..."""
MIN_INVALID_SHARE = 0.10
"""...down to which the covering rows may squeeze it: the rows come first."""
MISSING_SHOWN = 5


@dataclass(frozen=True)
class Generated:
    """A generated corpus: its cases and the coverage they achieve (:mod:`conformance.gate.design`)."""

    cases: list[tuple[str, Case]]
    rows: dict[str, int]
    """Covering rows per stratum (level-kind)."""
    rows_recorded: int
    """Rows that became cases (all of them unless ``count`` is too small)."""
    valid_cases: int
    """Cases built from rows (beyond the last row, the arrays start again)."""
    coverage: dict[str, dict[str, Any]]
    """Per group: strength, required, covered, infeasible, the first missing combinations."""

    @property
    def rows_total(self) -> int:
        return sum(self.rows.values())

    @property
    def complete(self) -> bool:
        return all(g["covered"] == g["required"] for g in self.coverage.values())

    def cases_needed(self) -> int:
        """The smallest ``count`` whose valid share holds every covering row."""
        count = self.rows_total
        while _split(count, self.rows_total)[0] < self.rows_total:
            count += 1
        return count

    def to_json(self) -> dict[str, Any]:
        return {
            "complete": self.complete,
            "rows": dict(self.rows),
            "rows_total": self.rows_total,
            "rows_recorded": self.rows_recorded,
            "valid_cases": self.valid_cases,
            "invalid_cases": len(self.cases) - self.valid_cases,
            "cases_needed": self.cases_needed(),
            "groups": self.coverage,
        }


def _split(count: int, rows: int) -> tuple[int, int]:
    """(valid, invalid) case counts: a quarter invalid, less (down to a tenth) when the
    covering rows need the room."""
    valid = max(count - round(count * INVALID_SHARE), min(rows, count - round(count * MIN_INVALID_SHARE)))
    return valid, count - valid


def _interleaved(arrays: list[list[dict[str, Any]]], count: int) -> list[tuple[int, dict[str, Any]]]:
    """``count`` (stratum, row) picks taking one row of each stratum in turn, so that a
    short corpus spreads over the strata; beyond the last row, the arrays start again."""
    picks: list[tuple[int, dict[str, Any]]] = []
    cursor = [0] * len(arrays)
    while len(picks) < count and any(arrays):
        progressed = False
        for i, rows in enumerate(arrays):
            if len(picks) < count and cursor[i] < len(rows):
                picks.append((i, rows[cursor[i]]))
                cursor[i] += 1
                progressed = True
        if not progressed:
            cursor = [0] * len(arrays)
    return picks


class _TypeSpread:
    """Model types spread evenly: each case takes the least used type it can use (per
    level); among those, one that has not met the case's target kind yet; ties broken in a
    seeded order."""

    def __init__(self, seed: int):
        import random

        from strategies.zoo import model_types

        order = list(model_types())
        random.Random(seed).shuffle(order)
        self.rank = {t: i for i, t in enumerate(order)}
        self.used: dict[tuple[str, str], int] = {}
        self.met: dict[tuple[str, str, str], int] = {}

    def take(self, level: str, types: tuple[str, ...], target_kind: str = "") -> str:
        chosen = min(types, key=lambda t: (self.used.get((level, t), 0), self.met.get((level, t, target_kind), 0),
                                           self.rank[t]))
        self.used[(level, chosen)] = self.used.get((level, chosen), 0) + 1
        self.met[(level, chosen, target_kind)] = self.met.get((level, chosen, target_kind), 0) + 1
        return chosen


def _draw(strategy: Any, seed: int, seen: set[str]) -> Case:
    """One case of ``strategy``, distinct from ``seen``.  Hypothesis's first example is
    always the simplest one, so the second (a seeded random draw) is taken."""
    from strategies import sample

    for attempt in range(8):
        drawn = sample(strategy, 2, seed + attempt * 7919)
        if drawn and drawn[-1].dumps() not in seen:
            seen.add(drawn[-1].dumps())
            return drawn[-1]
    from conformance.gate.corpus import CorpusError

    raise CorpusError(f"could not draw a new case for seed {seed}; try another --seed")


def design_corpus(count: int, seed: int, levels: Iterable[str]) -> Generated:
    """``count`` distinct cases built from covering arrays, one per level x quantization kind
    (:mod:`conformance.gate.design`): every valid case is a covering row drawn by Hypothesis
    with the row's values pinned; the rest are deliberately invalid.  Deterministic for the
    same seed, Hypothesis version and stack (its reference profile and trl flow decide which
    cases are valid).  Ids name the stratum:
    ``peft-4bit-0007``."""
    from conformance.gate import design
    from reference.profiles import select_profile
    from strategies import cases as case_strategy
    from strategies.covering import covering_array

    levels = tuple(levels)
    profile = select_profile()
    strata = design.strata(levels)
    arrays = [covering_array(s.factors, s.groups, valid=s.valid, seed=seed * 1009 + i) for i, s in enumerate(strata)]
    n_valid, n_invalid = _split(count, sum(len(a) for a in arrays))
    picks = _interleaved(arrays, n_valid)
    spread = _TypeSpread(seed)
    seen: set[str] = set()
    by_stratum: list[list[Case]] = [[] for _ in strata]
    for n, (i, row) in enumerate(picks):
        s = strata[i]
        model_type = spread.take(s.level, design.compatible_model_types(s.level, row, profile),
                                 row["adapter.target_kind"])
        by_stratum[i].append(_draw(design.row_case(s, row, model_type, profile), seed * 100_003 + n, seen))
    invalid: list[list[Case]] = [[] for _ in strata]
    for n in range(n_invalid):
        i = n % len(strata)
        s = strata[i]
        model_type = spread.take(s.level, design.compatible_model_types(s.level, {}, profile))
        strategy = case_strategy(level=s.level, model_types=(model_type,), quant_kinds=(s.kind,), invalid_rate=1.0,
                                 profile=profile)
        invalid[i].append(_draw(strategy, seed * 100_003 + 50_000 + n, seen))
    out: list[tuple[str, Case]] = []
    for i, s in enumerate(strata):
        out.extend((f"{s.name}-{n:04d}", case) for n, case in enumerate(by_stratum[i] + invalid[i]))
    rows = {s.name: len(a) for s, a in zip(strata, arrays, strict=True)}
    return Generated(out, rows, min(len(picks), sum(rows.values())), len(picks),
                  _coverage(strata, by_stratum, out, levels, profile))


def _coverage(strata: list[Any], valid_cases: list[list[Case]], all_cases: list[tuple[str, Case]],
              levels: tuple[str, ...], profile: Any) -> dict[str, dict[str, Any]]:
    """The coverage the cases achieve, read off the cases themselves."""
    from conformance.gate import design
    from strategies.covering import coverage

    out: dict[str, dict[str, Any]] = {}
    for s, found in zip(strata, valid_cases, strict=True):
        measured = coverage([design.features(c) for c in found], s.factors, s.groups, valid=s.valid)
        for g in s.groups:
            m = measured[g.name]
            out[g.name] = {
                "strength": g.strength, "factors": list(g.factors), "required": m.required, "covered": m.covered,
                "infeasible": m.infeasible,
                "missing": [{k: design.jsonable(v) for k, v in combo.items()} for combo in m.missing[:MISSING_SHOWN]],
            }
    for level in levels:
        types = design.compatible_model_types(level, {}, profile)
        counts = {t: 0 for t in types}
        for _, case in all_cases:
            if case.training.level == level and case.model.model_type in counts:
                counts[case.model.model_type] += 1
        missing = [t for t in types if not counts[t]]
        kinds = design.ADAPTER_FACTORS["adapter.target_kind"]
        cells = {(t, k) for t in types for k in kinds if t in design.compatible_model_types(
            level, {"adapter.target_kind": k}, profile)}
        met = {(c.model.model_type, design.features(c)["adapter.target_kind"]) for stratum in valid_cases
               for c in stratum if c.training.level == level}
        out[f"{level}: model types"] = {
            "strength": 1, "factors": ["model.model_type"], "required": len(types), "covered": len(types) - len(missing),
            "infeasible": 0, "missing": [{"model.model_type": t} for t in missing[:MISSING_SHOWN]],
            "cases_per_type": [min(counts.values()), max(counts.values())],
            # Not required (there are more cells than rows at the default size), spread by the choice of type.
            "type_x_target_kind_reached": [len(met & cells), len(cells)],
        }
    return out


def prepared_coverage(cases: list[tuple[str, Case]], prepared: set[str], levels: Iterable[str]
                      ) -> dict[str, dict[str, Any]]:
    """Per combination group, what the *prepared* valid cases hold in the recording stack: a
    combination held only by cases that upstream rejected (a known bug of that version, say)
    shows no preparation difference there; those are its ``masked`` combinations."""
    from conformance.gate import design
    from strategies.covering import coverage

    strata = design.strata(tuple(levels))
    valid: dict[str, list[tuple[str, Case]]] = {s.name: [] for s in strata}
    for case_id, case in cases:
        if not case.invalid:
            valid.setdefault(case_id.rsplit("-", 1)[0], []).append((case_id, case))
    out: dict[str, dict[str, Any]] = {}
    for s in strata:
        rows = {i: design.features(c) for i, c in valid[s.name]}
        held = coverage(rows.values(), s.factors, s.groups, valid=s.valid)
        shown = coverage([r for i, r in rows.items() if i in prepared], s.factors, s.groups, valid=s.valid)
        for g in s.groups:
            never = {repr(m) for m in held[g.name].missing}
            masked = [m for m in shown[g.name].missing if repr(m) not in never]
            out[g.name] = {"prepared_covered": shown[g.name].covered, "masked": len(masked),
                           "masked_first": [{k: design.jsonable(v) for k, v in m.items()} for m in masked[:MISSING_SHOWN]]}
    return out


def coverage_line(generated: Generated) -> str:
    """One line: the covering rows per stratum and whether the cases hold every combination."""
    sizes = ", ".join(f"{name} {n}" for name, n in generated.rows.items())
    head = (f"covering arrays: {sizes} = {generated.rows_total} rows; {len(generated.cases)} cases "
            f"({generated.valid_cases} valid from {generated.rows_recorded} rows, "
            f"{len(generated.cases) - generated.valid_cases} invalid)")
    if generated.complete:
        return head + "; coverage complete"
    short = [f"{name} {g['covered']}/{g['required']}" for name, g in generated.coverage.items()
             if g["covered"] < g["required"]]
    return (head + f"; coverage PARTIAL ({'; '.join(short[:3])}{'; ...' if len(short) > 3 else ''}): "
            f"--cases {generated.cases_needed()} or more covers every combination")
