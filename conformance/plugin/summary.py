"""Rendering a report: the terminal summary, and the short markdown for pull-request comments.

Both read only the report object (``conformance.plugin.report.build_report``), so a
merged report renders exactly like a single run's.
"""

from __future__ import annotations

import json
import shlex
from typing import Any

from conformance.plugin.coverage import missing_cells
from conformance.plugin.report import OUTCOMES, STALE_MIN_SCOPE

__all__ = ["CELL_COLUMNS", "markdown", "replay_command", "summary_lines"]

CELL_COLUMNS = (*OUTCOMES, "invalid")
QUANT_KINDS = ("none", "8bit", "4bit")


def replay_command(report: dict[str, Any], entry: dict[str, Any]) -> str:
    """The command that replays one example of ``report`` (as ``conformance.engine.runner.replay_command``),
    started the way the run recorded (``replay.conformance``: its interpreter, or its nox session
    with the same stack and forks); a report without it (merged, or older) says ``python``."""
    payload = json.dumps(entry["case"], sort_keys=True, separators=(",", ":"))
    start = (report.get("replay") or {}).get("conformance") or "python -m conformance"
    return f"{start} explain --profile {report['profile']} --case {shlex.quote(payload)}"


def _cell(report: dict[str, Any], model_type: str, kind: str) -> str:
    counts = report["summary"].get(model_type, {}).get(kind)
    if not counts:
        return "-"
    invalid = report.get("invalid_summary", {}).get(model_type, {}).get(kind, 0)
    return "/".join(str(counts.get(o, 0)) for o in OUTCOMES) + f"/{invalid}"


def _pct(part: int, whole: int) -> str:
    return f"{100.0 * part / whole:.1f}%" if whole else "-"


def _headline(report: dict[str, Any]) -> list[str]:
    t = report["totals"]
    shard = f", shard {report['shard']}" if report.get("shard") else ""
    run = [t[k] for k in OUTCOMES if k != "skip"]
    ran = sum(run)
    kinds = ", ".join(f"{kind} x{n}" for kind, n in report.get("unintended_rejections", {}).items())
    bugs = t.get("rejections_by_known_bugs", 0)
    return [
        f"profile {report['profile']} on {report['device']}, seed {report['seed']}{shard}: {t['examples']} examples: "
        + ", ".join(f"{t[k]} {k}" for k in OUTCOMES)
        + " (known: registry entries explain every divergence of the example; diverge: at least one is unexplained)",
        f"deliberately invalid inputs (both sides must reject them): {t['invalid']} ({_pct(t['invalid'], ran)} of the "
        f"examples run); valid cases upstream rejected anyway: {t.get('unintended_rejections', 0)} of "
        f"{t.get('valid', 0)} ({_pct(t.get('unintended_rejections', 0), t.get('valid', 0))}"
        + (f"; {bugs} of them upstream bugs the registry names, the rest "
           f"{_pct(t.get('unintended_rejections', 0) - bugs, t.get('valid', 0))}" if bugs else "")
        + ")" + (f": {kinds}" if kinds else ""),
    ] + _trainer_lines(report)


def _trainer_lines(report: dict[str, Any]) -> list[str]:
    """The trl-level examples per trainer, and their outcomes."""
    trainers = report.get("trainers") or {}
    if not trainers:
        return []
    parts = [f"{name} {sum(c.values())} ({', '.join(f'{n} {k}' for k, n in sorted(c.items()))})"
             for name, c in trainers.items()]
    return ["trl-level examples per trainer: " + "; ".join(parts)]


def _coverage_lines(report: dict[str, Any]) -> list[str]:
    blocks = report.get("coverage", {})
    if not blocks:
        return []
    lines = ["coverage (cells reached / cells that exist): " + ", ".join(
        f"{dim} {b['reached']}/{b['total']}" for dim, b in blocks.items())]
    lines += [f"  MISSING {line}" for line in missing_cells(report)]
    return lines


def _numerics_line(report: dict[str, Any]) -> str:
    """On how many of the examples it could run on the numerical checks ran, by tolerance class,
    the worst error, and the examples where they could not conclude."""
    examples = report.get("examples", [])
    checked = [e["numerics"] for e in examples if e.get("numerics")]
    # An example whose numerics divergence a registry entry explains is "known": its error
    # may exceed the tolerance, so it is reported apart from the worst passing error.
    passing = [n for n in checked if not n.get("explained_divergences")]
    paired = [e for e in examples if e.get("same_structure") and e.get("outcome") in ("agree", "known")]
    base_raised = [e for e in paired if (e.get("numerics") or {}).get("base_raised")]
    eligible = [e for e in paired if not (e.get("numerics") or {}).get("base_raised")]
    if not checked and not eligible:
        return ""
    by_class: dict[str, int] = {}
    for n in checked:
        by_class[n.get("tolerance", "?")] = by_class.get(n.get("tolerance", "?"), 0) + 1
    worst = max((n.get("max_error_in_tolerances", 0.0) for n in passing), default=0.0)
    worst_known = max((n.get("max_error_in_tolerances", 0.0) for n in checked), default=0.0)
    classes = ", ".join(f"{k} x{v}" for k, v in sorted(by_class.items()))
    known = f" (known divergences reach {worst_known:.3g})" if worst_known > max(worst, 1.0) else ""
    ran = sum(1 for e in eligible if e.get("numerics"))
    line = (f"numerics: ran on {ran} of the {len(eligible)} passing examples where both sides prepared a model of "
            f"the same structure ({_pct(ran, len(eligible))})"
            + (f" ({classes}); worst error {worst:.3g} of its tolerance{known}" if checked else ""))
    inconclusive = sum(1 for n in checked if n.get("inconclusive"))
    both_raised = sum(1 for n in checked if n.get("both_raised"))
    if inconclusive:
        line += (f"; inconclusive on {inconclusive} (non-finite in the same places on both sides: "
                 "the shared kernels overflow; see `inconclusive` in the JSON report)")
    if both_raised:
        line += (f"; on {both_raised} a forward raised the same exception on both sides, so those passes "
                 "compared nothing (see `both_raised` in the JSON report)")
    if base_raised:
        line += (f"; {len(base_raised)} more could not run at all: the loaded model's own forward raises there, "
                 "before any preparation (`base_raised`)")
    return line


def _example_label(examples: list[dict[str, Any]], index: int) -> str:
    e = examples[index] if 0 <= index < len(examples) else {}
    what = " ".join(str(e[k]) for k in ("model_type", "quantization", "level") if k in e)
    return f"#{index} {what}".strip()


def _known_lines(report: dict[str, Any]) -> list[str]:
    """Which registry entries explained divergences, in how many examples, by the examples' outcome:
    an entry also explains divergences of ``diverge`` examples, so its count and the ``known``
    total of the headline differ; saying both keeps the two lines from contradicting each other."""
    if not report["known"]:
        return []
    by_outcome = report.get("known_by_outcome", {})

    def detail(entry_id: str, n: int) -> str:
        counts = by_outcome.get(entry_id)
        if not counts:
            return f"{entry_id} in {n} examples"
        split = ", ".join(f"{counts[o]} {o}" for o in ("known", "diverge", "agree") if counts.get(o))
        return f"{entry_id} in {n} examples ({split})"

    return ["known divergences matched, by registry entry (examples where it explained a divergence; those with "
            "another, unexplained divergence count as diverge): "
            + ", ".join(detail(k, v) for k, v in report["known"].items())]


def _asked_lines(report: dict[str, Any]) -> list[str]:
    """Examples asked for and run, per test family (a test function and its parametrizations)."""
    tests = report.get("tests") or {}
    if not tests or report.get("merged_from"):  # shards ask per shard: their sums would mislead
        return []
    families: dict[str, dict[str, int]] = {}
    for test_id, t in tests.items():
        family = families.setdefault(test_id.split("::")[-1].split("[")[0], {"tests": 0, "asked": 0, "ran": 0})
        family["tests"] += 1
        family["asked"] += t.get("asked", 0)
        family["ran"] += t.get("ran", 0)
    parts = [f"{name} {f['asked']}/{f['ran']}" + (f" ({f['tests']} tests)" if f["tests"] > 1 else "")
             for name, f in families.items()]
    line = "examples asked/ran per test family: " + ", ".join(parts)
    if any(f["ran"] < f["asked"] for f in families.values()):
        line += ("; fewer ran than asked where Hypothesis ran out of new cases (a small space of cases, or repeated "
                 "draws, which it skips) or stopped at a failure to shrink it")
    if any(f["ran"] > f["asked"] for f in families.values()):
        line += "; more ran than asked where explicit @examples run besides the drawn ones"
    return [line]


def summary_lines(report: dict[str, Any], strict: list[str] | None = None) -> list[str]:
    """The terminal summary: the coverage table, divergences by field and module kind, registry, skips.

    ``strict`` is the list of strict-mode failures (None when the run is not strict).
    """
    lines = _headline(report) + _coverage_lines(report)
    header = f"{'model type':<14}" + "".join(f"{k:>20}" for k in QUANT_KINDS)
    lines += ["", header, "-" * len(header)]
    for model_type in report["summary"]:
        lines.append(f"{model_type:<14}" + "".join(f"{_cell(report, model_type, k):>20}" for k in QUANT_KINDS))
    lines.append(f"(cells: {'/'.join(CELL_COLUMNS)}; invalid inputs are also counted under their outcome)")
    groups = report.get("divergence_groups", [])
    if groups:
        lines += ["", "divergences by field and module kind (#N: the example's index in the JSON report's \"examples\"):"]
        examples = report.get("examples", [])
        for g in groups:
            shown = ", ".join(_example_label(examples, i) for i in g["examples"][:5])
            more = f", +{len(g['examples']) - 5} more" if len(g["examples"]) > 5 else ""
            n = len(g["examples"])
            lines.append(f"  {g['field']} on {g['module_kind']}: x{g['count']} in {n} example{'s' if n != 1 else ''} "
                         f"({shown}{more})")
    numerics = _numerics_line(report)
    if numerics:
        lines.append(numerics)
    lines += _known_lines(report)
    lines += _asked_lines(report)
    if report["stale_known"]:
        detail = report.get("stale_detail", {})
        lines.append(
            "stale known-divergence entries (examples in their scope, none showed the behaviour): "
            + ", ".join(f"{k} ({detail.get(k, {}).get('cases_in_scope', '?')} in scope)" for k in report["stale_known"])
        )
    unjudged = report.get("unjudged_known", {})
    if unjudged:
        lines.append(
            f"known-divergence entries not judged (fewer than {STALE_MIN_SCOPE} examples in their scope, "
            "too few to call them stale): "
            + ", ".join(f"{k} ({d.get('cases_in_scope', 0)} in scope)" for k, d in unjudged.items())
        )
    for reason, n in report["skips"].items():
        lines.append(f"skipped x{n}: {reason}")
    for test, reason in report.get("skipped_tests", {}).items():
        lines.append(f"skipped test {test}: {reason}")
    for worker, error in report.get("crashed_workers", {}).items():
        last = str(error).strip().splitlines()[-1] if error else "?"
        lines.append(f"worker {worker} CRASHED ({last}); the examples it finished are included")
    if strict is not None:
        if strict:
            lines += ["", f"STRICT MODE FAILED ({len(strict)} reason{'s' if len(strict) > 1 else ''}):"] + [f"  - {why}" for why in strict]
        else:
            lines.append("strict mode: passed (examples ran, nothing skipped, no stale entry, health checks on)")
    return lines


def _escape(value: Any, limit: int = 60) -> str:
    text = json.dumps(value, default=str) if not isinstance(value, str) else value
    text = text if len(text) <= limit else text[: limit - 1] + "…"
    return text.replace("|", "\\|").replace("\n", " ")


def markdown(report: dict[str, Any], strict: list[str] | None = None, *, max_divergences: int = 8) -> str:
    """A short markdown report for a pull-request comment."""
    t = report["totals"]
    failed = bool(t.get("diverge")) or bool(strict)
    verdict = "❌ failed" if failed else "✅ passed"
    stack = ", ".join(f"{k} {v}" for k, v in report["stack"].items())
    shard = f" · shard {report['shard']}" if report.get("shard") else ""
    out = [
        f"## LoRA conformance: {verdict}",
        "",
        f"**stack** {stack} · **profile** `{report['profile']}` · **device** {report['device']} · "
        f"**seed** {report['seed']}{shard}",
        "",
        "| examples | " + " | ".join(CELL_COLUMNS) + " | rejected |",
        "| ---: | " + " | ".join("---:" for _ in CELL_COLUMNS) + " | ---: |",
        f"| {t['examples']} | " + " | ".join(str(t.get(k, 0)) for k in CELL_COLUMNS) + f" | {t['rejected']} |",
    ]
    if strict:
        out += ["", "**Strict mode failed:**"] + [f"- {why}" for why in strict]
    groups = report.get("divergence_groups", [])
    if groups:
        out += ["", "### Divergences", "", "| field | module kind | count |", "| --- | --- | ---: |"]
        out += [f"| `{g['field']}` | {g['module_kind']} | {g['count']} |" for g in groups]
        diverging = [(i, e) for i, e in enumerate(report["examples"]) if e.get("outcome") == "diverge"]
        for i, e in diverging[:max_divergences]:
            out += [
                "",
                f"**example #{i}** (its index in the JSON report's `examples`): "
                f"{e['model_type']} {e.get('task', '')} {e['quantization']} {e['load_dtype']} {e.get('level', '')}",
                "",
                "| path | field | reference | upstream |",
                "| --- | --- | --- | --- |",
            ]
            out += [
                f"| `{_escape(d['path'])}` | `{d['field']}` | {_escape(d['reference'])} | {_escape(d['upstream'])} |"
                for d in e.get("divergences", [])[:6]
            ]
            out += ["", "```bash", replay_command(report, e), "```"]
        if len(diverging) > max_divergences:
            out.append(f"\n… and {len(diverging) - max_divergences} more diverging examples in the JSON report.")
    if report["known"]:
        out += ["", "Known divergences matched (examples where the registry entry explained a divergence): "
                + ", ".join(f"`{k}` ×{v}" for k, v in report["known"].items())]
    if report["stale_known"]:
        out += ["", "Stale registry entries (matched nothing): " + ", ".join(f"`{k}`" for k in report["stale_known"])]
    if report.get("crashed_workers"):
        out += ["", "Crashed workers: " + ", ".join(report["crashed_workers"])]
    return "\n".join(out) + "\n"
