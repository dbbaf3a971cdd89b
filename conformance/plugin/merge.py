"""Merging the JSON reports of several runs (the shards of one CI matrix) into one report.

The merged report has the same shape as one run's and is rebuilt from the
examples (``build_report``), so its summary, divergence groups and stale
entries are judged over all shards together: an entry is stale only if no
shard matched it.  Reports must come from one stack and profile.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Sequence

from conformance.plugin.report import build_report

__all__ = ["MergeError", "load_reports", "merge_reports"]


class MergeError(ValueError):
    """The reports cannot be merged (unreadable, or from different stacks or profiles); the message says which."""


def load_reports(paths: Sequence[Path]) -> list[tuple[str, dict[str, Any]]]:
    out = []
    for path in paths:
        try:
            report = json.loads(Path(path).read_text())
        except (OSError, ValueError) as exc:
            raise MergeError(f"{path}: not a readable JSON report ({exc})") from None
        missing = {"stack", "profile", "device", "examples"} - set(report)
        if missing:
            raise MergeError(f"{path}: not a conformance report (lacks {', '.join(sorted(missing))})")
        out.append((str(path), report))
    return out


def _same(reports: list[tuple[str, dict[str, Any]]], key: str) -> Any:
    first_name, first = reports[0]
    for name, report in reports[1:]:
        if report.get(key) != first.get(key):
            raise MergeError(
                f"{name} and {first_name} differ in {key} ({report.get(key)!r} vs {first.get(key)!r}): "
                "merge the reports of one stack and profile at a time"
            )
    return first.get(key)


def _shards(reports: list[tuple[str, dict[str, Any]]]) -> dict[str, Any]:
    seen = [r.get("shard") for _, r in reports if r.get("shard")]
    if not seen:
        return {"shard": None}
    counts = {int(s.split("/")[1]) for s in seen}
    if len(counts) != 1:
        raise MergeError(f"the reports come from different shardings: {', '.join(sorted(set(seen)))}")
    n = counts.pop()
    have = {int(s.split("/")[0]) for s in seen}
    return {"shard": None, "shards": sorted(set(seen)), "missing_shards": [f"{k}/{n}" for k in range(1, n + 1) if k not in have]}


def merge_reports(reports: list[tuple[str, dict[str, Any]]]) -> dict[str, Any]:
    """One report from ``(name, report)`` pairs; entries repeated across reports (explicit examples) count once."""
    from conformance.engine.known import load_registry

    if not reports:
        raise MergeError("no reports to merge")
    stack = _same(reports, "stack")
    profile = _same(reports, "profile")
    level = _same(reports, "level")
    quant_kinds = _same(reports, "quant_kinds") or ["none", "8bit", "4bit"]
    seen: set[str] = set()
    entries: list[dict[str, Any]] = []
    facts: dict[str, Any] = {"merged_from": [name for name, _ in reports], "strict": any(r.get("strict") for _, r in reports)}
    crashed: dict[str, str] = {}
    skipped: dict[str, str] = {}
    for name, report in reports:
        mine = set()
        for entry in report["examples"]:
            key = json.dumps(entry, sort_keys=True, default=str)
            if key in seen:
                continue
            mine.add(key)
            entries.append(entry)
        seen |= mine
        crashed.update({f"{name}:{w}": e for w, e in report.get("crashed_workers", {}).items()})
        skipped.update({f"{name}:{t}": why for t, why in report.get("skipped_tests", {}).items()})
    facts.update(_shards(reports))
    if crashed:
        facts["crashed_workers"] = crashed
    if skipped:
        facts["skipped_tests"] = skipped
    devices = sorted({r["device"] for _, r in reports})
    seeds = sorted({r.get("seed") for _, r in reports}, key=str)
    meta = SimpleNamespace(
        stack=stack, profile_name=profile, device=",".join(devices), seed=seeds[0] if len(seeds) == 1 else seeds, level=level,
        quant_kinds=tuple(quant_kinds),
    )
    return build_report(meta, entries, registry=load_registry(versions=stack), run=facts)
