"""Throughput and overhead of the differential harness, measured on one corpus in one process.

    python benchmarks/run.py [--quick] [--json PATH] [--no-xdist]

For each case of a fixed corpus (Hypothesis, fixed seed, the default peft-level
mix of quantization kinds), timed with the same loader state:

* (a) upstream only: ``load_model`` + ``conformance.engine.upstream.prepare_peft`` + ``snapshot_of``;
* (b) the full differential example: ``conformance.engine.runner.run_case`` (both
  preparations, both snapshots, the diff and the known-divergence registry).

It writes ``overhead_ratio`` (sum of b / sum of a, both with the pristine-model
cache warm), ``examples_per_second`` (b, single process, the model cache
cleared first, as a suite run meets new cases), the same with the cache off
(the "before" figures), per-quantization figures, the cost per example at 1, 4
and 16 layers (hidden size 64) with a linear fit against the number of wrapped
modules, and the wall time of the suite under ``pytest -n 1`` and ``-n 2``.
"""

from __future__ import annotations

import argparse
import dataclasses
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
    """``n`` generated peft-level cases (every quantization kind), the same for a given seed."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import seed as hseed

    from strategies import cases

    out: list = []

    @hseed(seed)
    @settings(max_examples=n, database=None, deadline=None, suppress_health_check=list(HealthCheck))
    @given(cases(level="peft"))
    def collect(case) -> None:
        out.append(case)

    collect()
    return out[:n]


def upstream_only(case) -> Any:
    """(a): what one upstream preparation costs inside the harness."""
    from conformance.engine import upstream
    from conformance.engine.models import load_model
    from conformance.engine.runner import cache_dir
    from conformance.engine.snapshot import error_snapshot, snapshot_of

    model = load_model(case.model, case.quant, cache_dir(), device=case.training.device)
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        try:
            prepared, _, _ = upstream.prepare_peft(model, case)
        except Exception as exc:  # noqa: BLE001 - a rejection is an outcome, as in the runner
            cls, kind = upstream.classify_error(exc)
            return error_snapshot(cls, kind, str(exc))
    return snapshot_of(prepared, [])


def _timed(fn, *args) -> tuple[float, Any]:
    start = time.perf_counter()
    out = fn(*args)
    return time.perf_counter() - start, out


def measure_corpus(cases: list, profile) -> dict[str, Any]:
    from conformance.engine.models import clear_model_cache
    from conformance.engine.runner import run_case

    for case in cases:  # write the quantized checkpoints to disk once; not part of any figure
        run_case(case, profile)
    clear_model_cache()
    cold = [_timed(run_case, c, profile)[0] for c in cases]  # as a suite run meets the cases
    warm_a, warm_b, kinds = [], [], []
    for case in cases:
        warm_a.append(min(_timed(upstream_only, case)[0] for _ in range(2)))
        warm_b.append(min(_timed(run_case, case, profile)[0] for _ in range(2)))
        kinds.append(case.quant.kind)
    os.environ["CONFORMANCE_MODEL_CACHE"] = "0"
    try:
        fresh_a = [_timed(upstream_only, c)[0] for c in cases]
        fresh_b = [_timed(run_case, c, profile)[0] for c in cases]
    finally:
        del os.environ["CONFORMANCE_MODEL_CACHE"]
    per_quant: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for kind, a, b, c, fa, fb in zip(kinds, warm_a, warm_b, cold, fresh_a, fresh_b, strict=True):
        for name, value in (("a", a), ("b", b), ("cold", c), ("fresh_a", fa), ("fresh_b", fb)):
            per_quant[kind][name].append(value)

    def figures(d: dict[str, list[float]]) -> dict[str, Any]:
        return {
            "cases": len(d["b"]),
            "upstream_only_ms": round(1e3 * sum(d["a"]) / len(d["a"]), 2),
            "differential_ms": round(1e3 * sum(d["b"]) / len(d["b"]), 2),
            "overhead_ratio": round(sum(d["b"]) / sum(d["a"]), 3),
            "examples_per_second": round(len(d["cold"]) / sum(d["cold"]), 2),
            "examples_per_second_uncached": round(len(d["fresh_b"]) / sum(d["fresh_b"]), 2),
            "overhead_ratio_uncached": round(sum(d["fresh_b"]) / sum(d["fresh_a"]), 3),
        }

    every = {"a": warm_a, "b": warm_b, "cold": cold, "fresh_a": fresh_a, "fresh_b": fresh_b}
    return {"all": figures(every), "per_quantization": {k: figures(v) for k, v in sorted(per_quant.items())}}


def measure_layers(cases: list, profile, layers=(1, 4, 16)) -> dict[str, Any]:
    """Cost per example when the same cases are built with 1, 4 and 16 layers."""
    from conformance.engine.runner import run_case

    rows = []
    for n in layers:
        total, modules = 0.0, 0
        for case in cases:
            c = dataclasses.replace(case, model=dataclasses.replace(case.model, num_layers=n))
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


def measure_xdist(examples: int, workers=(1, 2)) -> dict[str, Any]:
    """Wall time of ``pytest conformance`` with a fixed seed and example count, per worker count."""
    out = {}
    for n in workers:
        cmd = [sys.executable, "-m", "pytest", "conformance", "-q", "-p", "no:warnings", "-p", "no:cacheprovider",
               "-n", str(n), "--conformance-examples", str(examples), "--hypothesis-seed", "3"]
        start = time.perf_counter()
        done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        wall = time.perf_counter() - start
        tail = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else ""
        session = float(tail.rsplit(" in ", 1)[1].split("s")[0]) if " in " in tail else wall
        out[f"n{n}"] = {"wall_s": round(wall, 2), "pytest_session_s": session, "examples": 3 * examples,
                        "returncode": done.returncode, "examples_per_second": round(3 * examples / wall, 2)}
    if "n1" in out and "n2" in out:
        out["speedup_n2"] = round(out["n1"]["wall_s"] / out["n2"]["wall_s"], 2)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="benchmarks/run.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a small corpus (about a minute)")
    parser.add_argument("--json", metavar="PATH", default=str(ROOT / "benchmarks" / "results.json"))
    parser.add_argument("--no-xdist", action="store_true", help="skip the pytest -n 1 / -n 2 runs")
    args = parser.parse_args(argv)

    import torch

    from reference import select_profile
    from reference.profiles import installed_versions

    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    profile = select_profile(None, installed_versions())
    n_cases, n_layer_cases, xdist_examples = (30, 4, 10) if args.quick else (120, 12, 40)
    cases = corpus(n_cases)
    started = time.perf_counter()
    corpus_figures = measure_corpus(cases, profile)
    layer_cases = [c for c in cases if c.quant.kind == "none" and not c.invalid][:n_layer_cases]
    results = {
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version(),
                    "load_average": os.getloadavg()[0], "torch_threads": torch.get_num_threads()},
        "stack": installed_versions(),
        "profile": profile.name,
        "quick": args.quick,
        "corpus": {"cases": len(cases), "seed": SEED, "invalid": sum(c.invalid for c in cases)},
        "overhead_ratio": corpus_figures["all"]["overhead_ratio"],
        "examples_per_second": corpus_figures["all"]["examples_per_second"],
        **corpus_figures,
        "layers": measure_layers(layer_cases, profile),
    }
    if not args.no_xdist:
        results["xdist"] = measure_xdist(xdist_examples)
    results["seconds"] = round(time.perf_counter() - started, 1)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(results, indent=1) + "\n")
    print(json.dumps({k: results[k] for k in ("overhead_ratio", "examples_per_second")}, indent=None))
    print(f"written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
