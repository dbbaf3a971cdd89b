#!/usr/bin/env python3
"""The per-example cost of the numerical checks (``--conformance-numerics on`` against ``off``).

Draws a fixed corpus per level and quantization kind (Hypothesis, fixed seed, the
suite's own strategy), warms the checkpoint and model caches, then times
``run_case(case, profile, numerics=on|off)`` on every case, best of two, in one
process with one torch thread.  Reports, per level and quantization kind, the mean
example time each way, the overhead in ms and as a ratio, how many examples the
checks ran on (agreeing, prepared on both sides), the mean cost of the checks on
those, and the largest error seen per tolerance class in units of the tolerance
(how close the clean stack comes to failing).

    python benchmarks/numerics_cost.py --json benchmarks/numerics_cost-current.json [--per-kind 30]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import warnings
from collections import defaultdict
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _draw(level: str, kind: str, n: int, seed_value: int) -> list:
    from strategies import cases, sample

    return sample(cases(level=level, quant_kinds=(kind,)), n, seed_value, distinct=False)


def _best(fn, repeat: int = 2) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(repeat):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return best, out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", required=True, help="where to write the results")
    parser.add_argument("--per-kind", type=int, default=30, help="cases per level and quantization kind")
    parser.add_argument("--seed", type=int, default=20240607)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    warnings.filterwarnings("ignore")
    import torch

    torch.set_num_threads(1)
    from conformance.engine.runner import run_case
    from reference import installed_versions, select_profile

    profile = select_profile()
    results: dict[str, dict] = {}
    worst: dict[str, float] = defaultdict(float)
    statuses: dict[str, int] = defaultdict(int)
    for level in ("peft", "trl"):
        for kind in ("none", "8bit", "4bit"):
            batch = _draw(level, kind, args.per_kind, args.seed)
            for case in batch:  # checkpoints on disk, pristine models cached: not part of any figure
                run_case(case, profile, numerics=False)
            off, on, checked = [], [], []
            for case in batch:
                t_off, _ = _best(lambda c=case: run_case(c, profile, numerics=False))
                t_on, outcome = _best(lambda c=case: run_case(c, profile, numerics=True))
                off.append(t_off)
                on.append(t_on)
                statuses[outcome.status] += 1
                if outcome.numerics is not None:
                    checked.append(t_on - t_off)
                    tol = outcome.numerics["tolerance"]
                    worst[tol] = max(worst[tol], outcome.numerics["max_error_in_tolerances"])
            results[f"{level}/{kind}"] = {
                "cases": len(batch),
                "numerics_ran_on": len(checked),
                "off_ms": round(1e3 * sum(off) / len(off), 2),
                "on_ms": round(1e3 * sum(on) / len(on), 2),
                "overhead_ms_per_example": round(1e3 * (sum(on) - sum(off)) / len(off), 2),
                "overhead_ratio": round(sum(on) / sum(off), 3),
                "checks_ms_per_checked_example": round(1e3 * sum(checked) / len(checked), 2) if checked else None,
            }
            print(level, kind, results[f"{level}/{kind}"], flush=True)
    every = [v for v in results.values()]
    total_off = sum(v["off_ms"] * v["cases"] for v in every)
    total_on = sum(v["on_ms"] * v["cases"] for v in every)
    n = sum(v["cases"] for v in every)
    report = {
        "stack": installed_versions(),
        "profile": profile.name,
        "machine": {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count(),
                    "load_average": os.getloadavg()},
        "seed": args.seed,
        "per_kind": args.per_kind,
        "all": {
            "cases": n,
            "off_ms": round(total_off / n, 2),
            "on_ms": round(total_on / n, 2),
            "overhead_ms_per_example": round((total_on - total_off) / n, 2),
            "overhead_ratio": round(total_on / total_off, 3),
        },
        "per_level_and_quantization": results,
        "outcomes_with_numerics": dict(statuses),
        "max_error_in_tolerances": {k: round(v, 6) for k, v in sorted(worst.items())},
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report["all"]), json.dumps(report["max_error_in_tolerances"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
