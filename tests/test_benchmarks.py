"""The benchmark measures a fixed corpus: the same cases on every run."""

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


def test_the_corpus_is_fixed_and_mixes_quantization_kinds(bench):
    first, second = bench.corpus(12), bench.corpus(12)
    assert [c.dumps() for c in first] == [c.dumps() for c in second]
    assert len({c.quant.kind for c in bench.corpus(30)}) == 3


def test_upstream_only_prepares_and_snapshots_one_case(bench, monkeypatch, tmp_path):
    monkeypatch.setenv("CONFORMANCE_CACHE", str(tmp_path))
    case = next(c for c in bench.corpus(12) if c.quant.kind == "none")
    snap = bench.upstream_only(case)
    assert snap.error is not None or snap.params
