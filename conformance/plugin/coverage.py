"""The ``coverage`` block of a report: which cells of each coverage dimension a run reached.

The cells a run must reach follow from its options (``--conformance-level``,
``--conformance-quant``, ``--conformance-shard``) through ``strategies.coverage``; the
cells it reached are read off the examples it executed (free tests included).  Skipped
examples reach nothing.  A merged report recomputes both over all shards together.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

from strategies.coverage import Cell, dimension_cells, expected_cells

__all__ = ["coverage_block", "expected_for", "missing_cells"]

_SHOWN_MISSING = 20


def expected_for(level: str, quant_kinds: Iterable[str], keep: Callable[[Cell], bool] | None = None
                 ) -> dict[str, list[tuple[str, ...]]]:
    """The cells a run of ``--conformance-level=level`` over ``quant_kinds`` must reach."""
    levels = ("peft", "trl") if level == "all" else (level,)
    return expected_cells(levels, quant_kinds=quant_kinds, keep=keep)


def coverage_block(entries: Iterable[dict[str, Any]], expected: dict[str, list[tuple[str, ...]]]) -> dict[str, Any]:
    """Per dimension: ``reached`` and ``total`` cell counts and the first ``missing`` cells."""
    reached: dict[str, set[tuple[str, ...]]] = {dim: set() for dim in expected}
    for e in entries:
        if e.get("outcome") == "skip" or "case" not in e:
            continue
        for dim, cell in dimension_cells(e["case"]).items():
            if dim in reached:
                reached[dim].add(cell)
    out = {}
    for dim, cells in expected.items():
        wanted = {tuple(c) for c in cells}
        missing = sorted(wanted - reached[dim])
        out[dim] = {"reached": len(wanted) - len(missing), "total": len(wanted),
                    "missing": [list(m) for m in missing[:_SHOWN_MISSING]], "missing_count": len(missing)}
    return out


def missing_cells(report: dict[str, Any]) -> list[str]:
    """One line per dimension with unreached cells (for strict mode and the summary)."""
    out = []
    for dim, block in report.get("coverage", {}).items():
        if block["missing_count"]:
            shown = ", ".join("/".join(m) for m in block["missing"][:5])
            more = f" (+{block['missing_count'] - 5} more)" if block["missing_count"] > 5 else ""
            out.append(f"{dim}: {block['reached']}/{block['total']} cells reached; missing {shown}{more}")
    return out
