#!/usr/bin/env python3
"""Record every outcome of a fixed corpus, to show that a speed change changed no behaviour.

Draws a fixed corpus per level and quantization kind (the suite's strategy, a fixed seed),
runs ``run_case`` on each case with the numerical checks on, and writes one JSON line per
case: the case, the status, both snapshots in full, the divergences, the known entries that
explained some, the registry scope and the numerical facts (error messages left out:
snapshots never compare them, and a set in one prints in hash-seed order).  ``--check FILE`` compares a new
recording with an old one and lists the cases whose lines differ.

    python benchmarks/outcomes.py --out /tmp/before.jsonl [--per-kind 50]
    python benchmarks/outcomes.py --out /tmp/after.jsonl --check /tmp/before.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def corpus(per_kind: int, seed_value: int) -> list:
    """``per_kind`` cases per level and quantization kind, the same for a given seed."""
    from strategies import cases, sample

    return [case for level in ("peft", "trl") for kind in ("none", "8bit", "4bit")
            for case in sample(cases(level=level, quant_kinds=(kind,)), per_kind, seed_value, distinct=False)]


def record(case, profile) -> dict:
    from conformance.engine.runner import run_case

    outcome = run_case(case, profile, numerics=True)
    line = outcome.to_json()
    for side, snap in (("reference_snapshot", outcome.reference), ("upstream_snapshot", outcome.upstream)):
        line[side] = snap.to_json() if snap is not None else None
        if snap is not None and snap.error is not None:  # not compared (a set's order varies with the hash seed)
            line[side]["error"].pop("message")
    line["known"] = list(outcome.known)
    return line


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="where to write the JSON lines")
    parser.add_argument("--per-kind", type=int, default=50, help="cases per level and quantization kind")
    parser.add_argument("--seed", type=int, default=4242)
    parser.add_argument("--check", metavar="FILE", help="an earlier recording to compare with")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    warnings.filterwarnings("ignore")
    import torch

    torch.set_num_threads(1)
    from reference import select_profile

    profile = select_profile()
    lines = [json.dumps(record(case, profile), sort_keys=True, default=str) for case in corpus(args.per_kind, args.seed)]
    Path(args.out).write_text("\n".join(lines) + "\n")
    print(f"{len(lines)} outcomes written to {args.out}")
    if args.check:
        old = Path(args.check).read_text().splitlines()
        differ = [i for i, (a, b) in enumerate(zip(old, lines, strict=False)) if a != b]
        if len(old) != len(lines) or differ:
            print(f"{len(differ)} of {len(lines)} outcomes differ (lines {differ[:20]}); "
                  f"{len(old)} lines before, {len(lines)} now")
            return 1
        print(f"all {len(lines)} outcomes identical to {args.check}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
