"""The benchmark measures a fixed corpus: the same cases on every run, both levels, every figure the
issue asks for."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

_PATH = Path(__file__).parents[1] / "benchmarks" / "run.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_run", _PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_corpus_is_fixed_and_mixes_levels_and_quantization_kinds(bench):
    first, second = bench.corpus(12), bench.corpus(12)
    assert [c.dumps() for c in first] == [c.dumps() for c in second]
    assert [c.training.level for c in first[:4]] == ["peft", "trl", "peft", "trl"]
    assert len({c.quant.kind for c in bench.corpus(30)}) == 3


def test_upstream_only_prepares_and_snapshots_one_case(bench, monkeypatch, tmp_path):
    import conformance.numerics

    monkeypatch.setenv("CONFORMANCE_CACHE", str(tmp_path))
    case = next(c for c in bench.corpus(12) if c.quant.kind == "none" and not c.invalid)
    passes = []
    monkeypatch.setattr(conformance.numerics, "one_side_passes", lambda *args: passes.append(args))
    snap = bench.upstream_only(case)
    assert snap.error is not None or snap.params
    assert passes == []
    assert bench.upstream_only(case, True) == snap  # the yardstick's passes change no snapshot
    assert len(passes) == (snap.error is None)


def test_the_figures_of_a_tiny_corpus(bench, monkeypatch, tmp_path):
    from reference import select_profile

    monkeypatch.setenv("CONFORMANCE_CACHE", str(tmp_path))
    cases = [c for c in bench.corpus(12) if c.quant.kind == "none"][:2]
    figures = bench.measure_corpus(cases, select_profile())
    every = figures["all"]
    for key in ("overhead_ratio", "examples_per_second", "overhead_ratio_structural", "examples_per_second_structural",
                "numerics_share", "numerics_ran_on"):
        assert key in every, key
    assert every["cases"] == 2 and 0 <= every["numerics_share"] <= 1
    assert set(figures["per_level"]) == {c.training.level for c in cases}
    assert set(figures["per_quantization"]) == {"none"}
