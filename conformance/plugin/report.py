"""The JSON report of the contract, and the strict-mode judgement of it (rendering: ``conformance.plugin.summary``)."""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any, Iterable

from conformance.plugin.coverage import coverage_block, expected_for, missing_cells
from conformance.plugin.stream import ExampleStream

__all__ = ["OUTCOMES", "Recorder", "build_report", "strict_failures", "write_report"]

OUTCOMES = ("agree", "diverge", "known", "skip")


class Recorder:
    """Collects one entry per executed example, leaving out Hypothesis's shrink replays.

    Hypothesis runs a test during generation, then, after a failure, many times
    while shrinking, and finally once more on the minimal example (``is_final``).
    Only generation-phase examples and that final replay count.
    """

    def __init__(self, stream: ExampleStream | None = None) -> None:
        self.entries: list[dict[str, Any]] = []
        self.touched = False
        self.stream = stream
        """Under xdist, each worker also streams its examples to disk (see ``conformance.plugin.stream``)."""
        self._first_failure: dict[str, dict[str, Any]] = {}
        self._shrinking: set[str] = set()

    def record(self, test_id: str, entry: dict[str, Any], *, failed: bool, final: bool) -> None:
        self.touched = True
        if final:
            self._first_failure.pop(test_id, None)
            self._shrinking.discard(test_id)
            self.entries.append(entry)
            self._write(test_id, entry, final=True)
        elif test_id in self._shrinking:
            return
        elif failed:
            self._shrinking.add(test_id)
            self._first_failure[test_id] = entry
            self._write(test_id, entry, provisional=True)
        else:
            self.entries.append(entry)
            self._write(test_id, entry)

    def _write(self, test_id: str, entry: dict[str, Any], **flags: bool) -> None:
        if self.stream is not None:
            self.stream.write(test_id, entry, **flags)

    def flush(self) -> None:
        """A failure whose final replay never came (an explicit example) still counts."""
        self.entries.extend(self._first_failure.values())
        self._first_failure.clear()
        self._shrinking.clear()

    def extend(self, entries: Iterable[dict[str, Any]]) -> None:
        self.touched = True
        self.entries.extend(entries)


def _module_kind(d: dict[str, Any]) -> str:
    """The kind of module a divergence is on: ``module_kind`` when the runner records it, else from the path."""
    if d.get("module_kind"):
        return str(d["module_kind"])
    path = d["path"]
    if path.startswith("<"):
        return path  # <model>, <error>, <warnings>
    if d["field"].startswith(("adapter[", "lora.")) or ".lora_" in path:
        return "lora module"
    if d["field"].startswith("saved."):
        return "modules_to_save"
    return "parameter"


STALE_MIN_SCOPE = 5
"""An entry is judged stale only when at least this many examples were in its scope: a smaller
run says too little about whether the behaviour still happens."""


def _stale(registry: Any, hits: Counter, entries: list[dict[str, Any]]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Active entries that explained nothing: (stale ones, with at least :data:`STALE_MIN_SCOPE`
    examples in scope; not judged ones, with fewer), each with its in-scope count and link."""
    in_scope: Counter = Counter(i for e in entries for i in e.get("registry_scope", ()))
    stale, unjudged = {}, {}
    for entry in registry.stale(set(hits)):
        detail = {"cases_in_scope": in_scope[entry.id], "link": entry.link}
        (stale if in_scope[entry.id] >= STALE_MIN_SCOPE else unjudged)[entry.id] = detail
    return stale, unjudged


def build_report(
    settings: Any, entries: list[dict[str, Any]], *, registry: Any = None, run: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The report object: stack, profile, device, examples, the summary counts and the run's facts.

    ``registry`` is the known-divergence registry to judge staleness by (the one of
    the installed stack by default); ``run`` adds run facts (shard, crashed workers,
    skipped tests, health-check suppressions) verbatim.
    """
    if registry is None:
        from conformance.engine.known import default_registry

        registry = default_registry()
    summary: dict[str, dict[str, dict[str, int]]] = defaultdict(lambda: defaultdict(Counter))
    invalid: dict[str, Counter] = defaultdict(Counter)
    totals: Counter = Counter()
    hits: Counter = Counter()
    skips: Counter = Counter()
    fields: Counter = Counter()
    unintended: Counter = Counter()
    by_outcome: dict[str, Counter] = defaultdict(Counter)
    tests: dict[str, dict[str, int]] = {}
    groups: dict[tuple[str, str], dict[str, Any]] = {}
    trainers: dict[str, Counter] = defaultdict(Counter)
    for index, e in enumerate(entries):
        if e.get("level") == "trl":
            trainers[e.get("trainer", "sft")][e["outcome"]] += 1
        if e.get("test"):
            test = tests.setdefault(e["test"], {"asked": int(e.get("asked") or 0), "ran": 0})
            test["ran"] += 1
        summary[e["model_type"]][e["quantization"]][e["outcome"]] += 1
        invalid[e["model_type"]][e["quantization"]] += bool(e.get("invalid"))
        totals[e["outcome"]] += 1
        totals["invalid"] += bool(e.get("invalid"))
        totals["rejected"] += bool(e.get("rejected"))
        if e["outcome"] != "skip" and not e.get("invalid"):
            totals["valid"] += 1
            if e.get("rejected"):
                totals["unintended_rejections"] += 1
                unintended[e.get("upstream_error", "?")] += 1
                # the sides' results differ (the reference prepared, or refused otherwise) and a
                # registry entry explains it: an upstream bug, not a case the strategies drew badly
                totals["rejections_by_known_bugs"] += (e["outcome"] == "known"
                                                       and e.get("reference_error") != e.get("upstream_error"))
        hits.update(e.get("known", ()))
        for entry_id in e.get("known", ()):
            by_outcome[entry_id][e["outcome"]] += 1
        if e["outcome"] == "skip":
            skips[e.get("reason", "?")] += 1
        for d in e.get("divergences", ()):
            fields[d["field"]] += 1
            key = (d["field"], _module_kind(d))
            group = groups.setdefault(key, {"field": key[0], "module_kind": key[1], "count": 0, "examples": []})
            group["count"] += 1
            if index not in group["examples"]:
                group["examples"].append(index)
    stale, unjudged = _stale(registry, hits, entries) if entries else ({}, {})
    quant_kinds = tuple(getattr(settings, "quant_kinds", ("none", "8bit", "4bit")))
    shard = getattr(settings, "shard", None)
    keep = None if shard is None else (lambda cell: settings.in_shard(cell.model_type, cell.quantization))
    report = {
        "stack": settings.stack,
        "profile": settings.profile_name,
        "device": settings.device,
        "seed": settings.seed,
        "level": settings.level,
        "quant_kinds": list(quant_kinds),
        "examples": entries,
        "summary": {m: {q: dict(c) for q, c in qs.items()} for m, qs in sorted(summary.items())},
        "invalid_summary": {m: dict(c) for m, c in sorted(invalid.items())},
        "totals": {"examples": len(entries),
                   **{k: totals[k] for k in (*OUTCOMES, "invalid", "rejected", "valid", "unintended_rejections",
                                              "rejections_by_known_bugs")}},
        "trainers": {t: dict(c) for t, c in sorted(trainers.items())},
        "unintended_rejections": dict(unintended.most_common()),
        "known": dict(hits),
        "known_by_outcome": {k: dict(c) for k, c in by_outcome.items()},
        "tests": tests,
        "stale_known": list(stale),
        "stale_detail": stale,
        "unjudged_known": unjudged,
        "skips": dict(skips),
        "divergent_fields": dict(fields.most_common()),
        "divergence_groups": sorted(groups.values(), key=lambda g: (-g["count"], g["field"], g["module_kind"])),
        "coverage": coverage_block(entries, expected_for(settings.level, quant_kinds, keep)),
    }
    report.update(run or {})
    return report


def write_report(path: Path, report: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(report, indent=1, sort_keys=False, default=str))
    tmp.replace(path)


REPLAYS_SHOWN = 3
"""Examples a strict-mode reason lists with their replay command."""


def _replays(report: dict[str, Any], examples: list[dict[str, Any]], key: str) -> str:
    """The first examples behind a strict-mode reason: their test, what the numerics recorded, and
    the command that replays each (``explain`` prints the numerics)."""
    from conformance.plugin.summary import replay_command  # summary imports this module

    lines = []
    for e in examples[:REPLAYS_SHOWN]:
        what = (e.get("numerics") or {}).get(key)
        what = what[0] if isinstance(what, list) and what else what
        replay = replay_command(report, e) if "case" in e and "profile" in report else "(no case recorded)"
        lines.append(f"\n      {e.get('test', '?')}: {str(what)[:200]}\n      replay: {replay}")
    more = len(examples) - REPLAYS_SHOWN
    return "".join(lines) + (f"\n      ... and {more} more (see the JSON report)" if more > 0 else "")


def strict_failures(report: dict[str, Any], *, judge_stale: bool = True) -> list[str]:
    """Why a gating (``--conformance-strict``) run fails even though no test did; empty when it passes.

    A gate must never pass by checking nothing: an empty run, skipped examples or
    tests, stale registry entries, suppressed health checks, crashed workers and
    examples outside the requested shard are all failures.  Unexplained
    divergences are listed too (they fail their test already, but a merged
    report has no test to fail).
    """
    t = report["totals"]
    out: list[str] = []
    if t["examples"] == 0:
        out.append("empty run: no example was executed (check -k, --conformance-quant and --conformance-level)")
    if t.get("diverge"):
        out.append(f"{t['diverge']} examples diverge from the reference")
    for reason, n in report.get("skips", {}).items():
        out.append(f"{n} examples skipped: {reason}")
    out.extend(f"coverage gap: {line}" for line in missing_cells(report))
    inconclusive = [e for e in report.get("examples", []) if (e.get("numerics") or {}).get("inconclusive")]
    if inconclusive:
        out.append(f"{len(inconclusive)} examples with inconclusive numerics (non-finite in the same places on both sides)"
                   + _replays(report, inconclusive, "inconclusive"))
    both_raised = [e for e in report.get("examples", []) if (e.get("numerics") or {}).get("both_raised")]
    if both_raised:
        out.append(f"{len(both_raised)} examples whose forward raised the same exception on both sides (numerics "
                   "compared nothing there; a registry entry may name it as an upstream behaviour)"
                   + _replays(report, both_raised, "both_raised"))
    for test, reason in report.get("skipped_tests", {}).items():
        out.append(f"test skipped: {test}: {reason}")
    if judge_stale:
        for entry_id, detail in report.get("stale_detail", {}).items():
            out.append(f"stale known-divergence entry {entry_id}: {detail.get('cases_in_scope', 0)} examples "
                       "in its scope, none showed the excused behaviour")
    for test, checks in report.get("health_checks_suppressed", {}).items():
        out.append(f"health checks suppressed by {test}: {', '.join(checks)}")
    for worker, error in report.get("crashed_workers", {}).items():
        last = str(error).strip().splitlines()[-1] if str(error).strip() else "?"
        out.append(f"worker {worker} crashed: {last}")
    # explicit @examples run in every shard; a suite that ignores the shard puts most examples outside it
    if report.get("outside_shard", 0) > max(2, t["examples"] // 10):
        out.append(
            f"{report['outside_shard']} examples fall outside shard {report.get('shard')}: "
            "the suite does not draw from the shard's model types"
        )
    for shard in report.get("missing_shards", ()):
        out.append(f"shard {shard} has no report")
    return out
