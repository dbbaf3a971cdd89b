"""Throughput and overhead of the differential harness, measured on one corpus in one process.

    python benchmarks/run.py [--quick] [--json PATH] [--no-xdist]

For each case of a fixed corpus (the suite's strategy, a fixed seed, half peft level and half
trl level, each with its default mix of quantization kinds), timed with the same loader state:

* (a) upstream only: what the differential example does on the upstream side, alone:
  ``load_model`` + upstream preparation + ``snapshot_of`` (``conformance.engine.runner``'s
  upstream half), and, where the differential example ran the numerical checks, the same
  forward and backward passes on the upstream model
  (``conformance.numerics.one_side_passes``);
* (b) the full differential example: ``conformance.engine.runner.run_case`` (both
  preparations, both snapshots, the diff, the registry, and the numerical checks).

Both are timed in the default mode (numerics on) and with the numerical checks off ((a)
without passes, (b) with ``numerics=False``).  It writes ``overhead_ratio`` (sum of b / sum
of a, default mode, the pristine-model cache warm), ``examples_per_second`` (b in the
default mode, one process, the model cache cleared first, as a suite run meets new cases),
``examples_per_second_upstream_only`` (a, met the same way: the ceiling that upstream's own half
sets, which no differential run can pass),
``overhead_ratio_structural`` and ``examples_per_second_structural`` (the same, numerics
off), the share of examples the numerical checks ran on, figures per quantization kind and
per level, the cost per example at 1, 4 and 16 layers (hidden size 64) with a linear fit
against the number of wrapped modules, and the wall time of the suite under ``pytest -n 0``
and ``-n 2``.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import subprocess
import sys
import time
import warnings
from collections import defaultdict
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SEED = 20240607


def corpus(n: int, seed: int = SEED) -> list:
    """``n`` generated cases, alternately peft level and trl level (each level's default mix of
    quantization kinds), the same for a given seed."""
    from strategies import cases, sample

    half = (n + 1) // 2
    def level_cases(level: str) -> list:
        # distinct cases: Hypothesis repeats some draws, so a larger corpus may need more draws than
        # cases.  The budget changes what Hypothesis draws first, so the smallest that suffices is used.
        for budget in (half, 2 * half, 4 * half):
            out = sample(cases(level=level), half, seed, budget=budget)
            if len(out) == half:
                return out
        raise RuntimeError(f"the corpus strategy gave {len(out)} distinct {level} cases, not {half}")

    peft, trl = level_cases("peft"), level_cases("trl")
    return [c for pair in zip(peft, trl, strict=True) for c in pair][:n]


def upstream_only(case, passes: bool = False, profile=None) -> Any:
    """(a): the upstream half of a differential example, alone: load, prepare, snapshot (as the
    runner takes it, values against the loaded model) and, with ``passes``, the forward and
    backward passes the numerical checks run on each side.  Returns the snapshot."""
    from conformance.engine.runner import _upstream_prepared
    from conformance.numerics import one_side_passes

    snap, model = _upstream_prepared(case)
    if passes and model is not None:
        if profile is None:
            from reference import select_profile

            profile = select_profile()
        one_side_passes(case, profile, model)
    return snap


def _timed(fn, *args, **kwargs) -> tuple[float, Any]:
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return time.perf_counter() - start, out


def _best(fn, *args, **kwargs) -> float:
    return min(_timed(fn, *args, **kwargs)[0] for _ in range(2))


def measure_corpus(cases: list, profile) -> dict[str, Any]:
    from conformance.engine.models import clear_model_cache
    from conformance.engine.runner import run_case

    # write the quantized checkpoints to disk once, and learn where the numerics run; not timed
    checked = [run_case(case, profile, numerics=True).numerics is not None for case in cases]
    clear_model_cache()
    cold = [_timed(run_case, c, profile, numerics=True)[0] for c in cases]  # as a suite run meets the cases
    clear_model_cache()
    cold_off = [_timed(run_case, c, profile, numerics=False)[0] for c in cases]
    clear_model_cache()  # the ceiling: upstream's half alone, met cold as the suite meets it
    cold_a = [_timed(upstream_only, c, ran, profile)[0] for c, ran in zip(cases, checked, strict=True)]
    rows = []
    for case, ran in zip(cases, checked, strict=True):
        rows.append({
            "quantization": case.quant.kind, "level": case.training.level, "checked": ran,
            "a": _best(upstream_only, case, ran, profile), "b": _best(run_case, case, profile, numerics=True),
            "a_off": _best(upstream_only, case, False), "b_off": _best(run_case, case, profile, numerics=False),
        })
    for row, c, c_off, c_a in zip(rows, cold, cold_off, cold_a, strict=True):
        row["cold"], row["cold_off"], row["cold_a"] = c, c_off, c_a

    def figures(group: list[dict[str, Any]]) -> dict[str, Any]:
        def total(key: str) -> float:
            return sum(r[key] for r in group)

        n = len(group)
        return {
            "cases": n,
            "numerics_ran_on": sum(r["checked"] for r in group),
            "numerics_share": round(sum(r["checked"] for r in group) / n, 3),
            "upstream_only_ms": round(1e3 * total("a") / n, 2),
            "differential_ms": round(1e3 * total("b") / n, 2),
            "overhead_ratio": round(total("b") / total("a"), 3),
            "examples_per_second": round(n / total("cold"), 2),
            "examples_per_second_upstream_only": round(n / total("cold_a"), 2),
            "upstream_only_structural_ms": round(1e3 * total("a_off") / n, 2),
            "differential_structural_ms": round(1e3 * total("b_off") / n, 2),
            "overhead_ratio_structural": round(total("b_off") / total("a_off"), 3),
            "examples_per_second_structural": round(n / total("cold_off"), 2),
        }

    def grouped(key: str) -> dict[str, Any]:
        groups: dict[str, list] = defaultdict(list)
        for r in rows:
            groups[r[key]].append(r)
        return {k: figures(v) for k, v in sorted(groups.items())}

    return {"all": figures(rows), "per_quantization": grouped("quantization"), "per_level": grouped("level")}


def measure_layers(cases: list, profile, layers=(1, 4, 16)) -> dict[str, Any]:
    """Cost per example when the same cases are built with 1, 4 and 16 layers."""
    from conformance.engine.runner import run_case

    rows = []
    for n in layers:
        total, modules = 0.0, 0
        for case in cases:
            c = dataclasses.replace(case, model=dataclasses.replace(case.model, num_layers=n, hidden_size=64))
            run_case(c, profile)  # checkpoint + pristine model
            seconds, outcome = min((_timed(run_case, c, profile) for _ in range(2)), key=lambda t: t[0])
            total += seconds
            modules += len(outcome.upstream.lora) if outcome.upstream is not None else 0
        rows.append({"num_layers": n, "ms_per_example": round(1e3 * total / len(cases), 2),
                     "wrapped_modules_per_example": round(modules / len(cases), 2)})
    xs = [r["wrapped_modules_per_example"] for r in rows]
    ys = [r["ms_per_example"] for r in rows]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    sxx = sum((x - mx) ** 2 for x in xs) or 1.0
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx
    intercept = my - slope * mx
    ss_res = sum((y - (intercept + slope * x)) ** 2 for x, y in zip(xs, ys, strict=True))
    ss_tot = sum((y - my) ** 2 for y in ys) or 1.0
    return {"hidden_size": 64, "rows": rows, "ms_per_wrapped_module": round(slope, 3),
            "fixed_ms": round(intercept, 2), "r_squared": round(1 - ss_res / ss_tot, 4)}


def measure_xdist(examples: int, workers=(0, 2), seed: int = 3) -> dict[str, Any]:
    """Wall time of ``pytest conformance`` (both levels, numerics on) with a fixed seed and
    example count, per worker count; the examples executed are counted from the JSON report."""
    import tempfile

    out: dict[str, Any] = {"conformance_examples": examples, "hypothesis_seed": seed}
    for n in workers:
        with tempfile.TemporaryDirectory() as tmp:
            report = Path(tmp) / "report.json"
            cmd = [sys.executable, "-m", "pytest", "conformance", "-q", "-p", "no:warnings", "-p", "no:cacheprovider",
                   "-n", str(n), "--conformance-examples", str(examples), "--hypothesis-seed", str(seed),
                   "--conformance-report", str(report)]
            start = time.perf_counter()
            done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                                  env={**os.environ, "OMP_NUM_THREADS": "1"})
            wall = time.perf_counter() - start
            executed = len(json.loads(report.read_text())["examples"]) if report.is_file() else 0
        tail = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else ""
        session = float(tail.rsplit(" in ", 1)[1].split("s")[0]) if " in " in tail else wall
        out[f"n{n}"] = {"wall_s": round(wall, 2), "pytest_session_s": session, "examples": executed,
                        "returncode": done.returncode, "examples_per_second": round(executed / wall, 2)}
    if "n0" in out and "n2" in out:
        out["speedup_n2"] = round(out["n0"]["wall_s"] / out["n2"]["wall_s"], 2)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="benchmarks/run.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a small corpus and short suite runs (a few minutes)")
    parser.add_argument("--json", metavar="PATH", default=str(ROOT / "benchmarks" / "results.json"))
    parser.add_argument("--no-xdist", action="store_true", help="skip the pytest -n 0 / -n 2 suite runs")
    parser.add_argument("--xdist-examples", type=int, default=None, metavar="N",
                        help="--conformance-examples of the suite runs (default 150; 10 with --quick)")
    args = parser.parse_args(argv)

    import torch

    from reference import select_profile
    from reference.profiles import installed_versions

    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    profile = select_profile(None, installed_versions())
    n_cases, n_layer_cases = (40, 4) if args.quick else (160, 12)
    xdist_examples = args.xdist_examples or (10 if args.quick else 150)
    load_before = os.getloadavg()
    cases = corpus(n_cases)
    started = time.perf_counter()
    corpus_figures = measure_corpus(cases, profile)
    layer_cases = [c for c in cases if c.quant.kind == "none" and not c.invalid and c.training.level == "peft"]
    every = corpus_figures["all"]
    results = {
        "date": datetime.date.today().isoformat(),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version(),
                    "load_average_before": [round(x, 2) for x in load_before], "torch_threads": torch.get_num_threads()},
        "stack": installed_versions(),
        "profile": profile.name,
        "quick": args.quick,
        "corpus": {"cases": len(cases), "seed": SEED, "invalid": sum(c.invalid for c in cases),
                   "levels": {lv: sum(c.training.level == lv for c in cases) for lv in ("peft", "trl")}},
        "overhead_ratio": every["overhead_ratio"],
        "examples_per_second": every["examples_per_second"],
        "examples_per_second_upstream_only": every["examples_per_second_upstream_only"],
        "overhead_ratio_structural": every["overhead_ratio_structural"],
        "examples_per_second_structural": every["examples_per_second_structural"],
        "numerics_share": every["numerics_share"],
        **corpus_figures,
        "layers": measure_layers(layer_cases[:n_layer_cases], profile),
    }
    if not args.no_xdist:
        results["xdist"] = measure_xdist(xdist_examples)
    results["machine"]["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    results["seconds"] = round(time.perf_counter() - started, 1)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(results, indent=1) + "\n")
    keys = ("overhead_ratio", "examples_per_second", "examples_per_second_upstream_only", "overhead_ratio_structural",
            "numerics_share")
    print(json.dumps({k: results[k] for k in keys}, indent=None))
    print(f"written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
