"""The JSON report of the contract, and the terminal summary built from it."""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any, Iterable

__all__ = ["OUTCOMES", "Recorder", "build_report", "summary_lines", "write_report"]

OUTCOMES = ("agree", "diverge", "known", "skip")


class Recorder:
    """Collects one entry per executed example, leaving out Hypothesis's shrink replays.

    Hypothesis runs a test during generation, then, after a failure, many times
    while shrinking, and finally once more on the minimal example (``is_final``).
    Only generation-phase examples and that final replay count.
    """

    def __init__(self) -> None:
        self.entries: list[dict[str, Any]] = []
        self.touched = False
        self._first_failure: dict[str, dict[str, Any]] = {}
        self._shrinking: set[str] = set()

    def record(self, test_id: str, entry: dict[str, Any], *, failed: bool, final: bool) -> None:
        self.touched = True
        if final:
            self._first_failure.pop(test_id, None)
            self._shrinking.discard(test_id)
            self.entries.append(entry)
        elif test_id in self._shrinking:
            return
        elif failed:
            self._shrinking.add(test_id)
            self._first_failure[test_id] = entry
        else:
            self.entries.append(entry)

    def flush(self) -> None:
        """A failure whose final replay never came (an explicit example) still counts."""
        self.entries.extend(self._first_failure.values())
        self._first_failure.clear()
        self._shrinking.clear()

    def extend(self, entries: Iterable[dict[str, Any]]) -> None:
        self.touched = True
        self.entries.extend(entries)


def build_report(settings: Any, entries: list[dict[str, Any]]) -> dict[str, Any]:
    """The report object: stack, profile, device, examples and the summary counts."""
    from conformance.known import default_registry

    summary: dict[str, dict[str, dict[str, int]]] = defaultdict(lambda: defaultdict(Counter))
    totals: Counter = Counter()
    hits: Counter = Counter()
    skips: Counter = Counter()
    fields: Counter = Counter()
    for e in entries:
        summary[e["model_type"]][e["quantization"]][e["outcome"]] += 1
        totals[e["outcome"]] += 1
        totals["invalid"] += bool(e.get("invalid"))
        totals["rejected"] += bool(e.get("rejected"))
        hits.update(e.get("known", ()))
        if e["outcome"] == "skip":
            skips[e.get("reason", "?")] += 1
        for d in e.get("divergences", ()):
            fields[d["field"]] += 1
    stale = [entry.id for entry in default_registry().stale(set(hits))] if entries else []
    return {
        "stack": settings.stack,
        "profile": settings.profile_name,
        "device": settings.device,
        "seed": settings.seed,
        "level": settings.level,
        "examples": entries,
        "summary": {m: {q: dict(c) for q, c in qs.items()} for m, qs in sorted(summary.items())},
        "totals": {"examples": len(entries), **{k: totals[k] for k in (*OUTCOMES, "invalid", "rejected")}},
        "known": dict(hits),
        "stale_known": stale,
        "skips": dict(skips),
        "divergent_fields": dict(fields.most_common()),
    }


def write_report(path: Path, report: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(report, indent=1, sort_keys=False, default=str))
    tmp.replace(path)


def summary_lines(report: dict[str, Any]) -> list[str]:
    """The terminal summary: a model type x quantization table of outcomes, then totals."""
    t = report["totals"]
    lines = [
        f"profile {report['profile']} on {report['device']}, seed {report['seed']}: {t['examples']} examples: "
        + ", ".join(f"{t[k]} {k}" for k in OUTCOMES)
        + f"; {t['invalid']} invalid inputs, {t['rejected']} rejected by upstream",
    ]
    kinds = ("none", "8bit", "4bit")
    header = f"{'model type':<14}" + "".join(f"{k:>22}" for k in kinds)
    lines += ["", header, "-" * len(header)]
    for model_type, per_quant in report["summary"].items():
        cells = []
        for k in kinds:
            c = per_quant.get(k, {})
            cells.append("/".join(str(c.get(o, 0)) for o in OUTCOMES) if c else "-")
        lines.append(f"{model_type:<14}" + "".join(f"{cell:>22}" for cell in cells))
    lines.append(f"(cells: {'/'.join(OUTCOMES)})")
    if report["divergent_fields"]:
        lines.append("divergent fields: " + ", ".join(f"{k} x{v}" for k, v in report["divergent_fields"].items()))
    if report["known"]:
        lines.append("known divergences matched: " + ", ".join(f"{k} x{v}" for k, v in report["known"].items()))
    if report["stale_known"]:
        lines.append("stale known-divergence entries (matched nothing): " + ", ".join(report["stale_known"]))
    for reason, n in report["skips"].items():
        lines.append(f"skipped x{n}: {reason}")
    return lines
