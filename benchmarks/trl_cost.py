#!/usr/bin/env python3
"""The cost of a trl-level differential example against a peft-level one.

Draws the same number of cases per quantization kind for each level (fixed seed),
warms the caches on a few, then times ``run_case`` per example in one process.
Issue 3's target: a trl-level example costs at most 3x a peft-level example.

    python benchmarks/trl_cost.py --json benchmarks/trl_cost.json [--per-kind 30]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
import warnings


def _draw(level: str, per_kind: int, seed_value: int) -> list:
    from strategies import cases, sample

    out: list = []
    for kind in ("none", "8bit", "4bit"):
        out += sample(cases(level=level, quant_kinds=(kind,)), per_kind, seed_value, distinct=False)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", required=True, help="where to write the results")
    parser.add_argument("--per-kind", type=int, default=30, help="cases per quantization kind and level")
    parser.add_argument("--seed", type=int, default=5)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    warnings.filterwarnings("ignore")
    import torch

    torch.set_num_threads(1)
    from conformance.engine.runner import run_case
    from reference import installed_versions, select_profile

    profile = select_profile()
    ms: dict[str, float] = {}
    for level in ("peft", "trl"):
        batch = _draw(level, args.per_kind, args.seed)
        for case in batch[:5]:
            run_case(case, profile)
        start = time.perf_counter()
        for case in batch:
            run_case(case, profile)
        ms[level] = (time.perf_counter() - start) / len(batch) * 1000
    result = {
        "machine": f"{platform.platform()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
        "stack": installed_versions(),
        "profile": profile.name,
        "examples_per_level": 3 * args.per_kind,
        "peft_ms_per_example": round(ms["peft"], 2),
        "trl_ms_per_example": round(ms["trl"], 2),
        "trl_over_peft": round(ms["trl"] / ms["peft"], 2),
        "target_trl_over_peft": 3.0,
    }
    with open(args.json, "w") as fh:
        json.dump(result, fh, indent=1)
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
