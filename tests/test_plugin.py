"""The pytest plugin and the CLI, driven as a user would (pytester, subprocesses)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conformance.plugin.report import Recorder
from strategies.coverage import cells

pytest_plugins = ["pytester"]

SUITE = Path(__file__).parents[1] / "conformance" / "test_conformance.py"


@pytest.fixture
def suite(pytester: pytest.Pytester) -> pytest.Pytester:
    pytester.makepyfile(test_conformance=SUITE.read_text())
    return pytester


@pytest.mark.parametrize(
    "args, message",
    [
        (["--conformance-level", "x"], "--conformance-level='x' is not one of peft, trl, all"),
        (["--conformance-device", "tpu"], "--conformance-device='tpu' is not one of auto, cpu, cuda"),
        (["--conformance-examples", "0"], "--conformance-examples='0' must be a positive integer"),
        (["--conformance-profile", "nope"], "--conformance-profile='nope' is not one of seed, peft-0.16, peft-0.18, peft-0.19, peft-0.20, current"),
        (["--conformance-quant", "2bit"], "--conformance-quant='2bit': expected a comma-separated subset of none, 8bit, 4bit"),
    ],
)
def test_bad_option_values_give_one_line_naming_the_option(suite, args, message):
    result = suite.runpytest_subprocess(*args)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert message in result.stderr.str()


def test_cuda_without_cuda_is_an_error(suite):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    result = suite.runpytest_subprocess("--conformance-device", "cuda")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert "--conformance-device=cuda was asked for" in result.stderr.str()


# The runs below keep to llama's cells and the free tests (the whole suite is the real suite's business).
ONLY = "llama or level"
LLAMA_NONE_CELLS = [c for level in ("peft", "trl") for c in cells(level, quant_kinds=("none",)) if c.model_type == "llama"]
assert len(LLAMA_NONE_CELLS) == 5  # a restricted run still gives llama all four target kinds at the peft level


def _run(suite: pytest.Pytester, tmp_path: Path, seed: int, *extra: str) -> tuple[pytest.RunResult, dict]:
    report = tmp_path / f"report-{seed}.json"
    result = suite.runpytest_subprocess(
        "--conformance-examples", "4", "--conformance-quant", "none", "--hypothesis-seed", str(seed),
        "--conformance-report", str(report), "-p", "no:warnings", "-k", ONLY, *extra,
    )
    return result, json.loads(report.read_text())


def test_a_run_writes_the_report_header_and_summary(suite, tmp_path):
    result, report = _run(suite, tmp_path, 3)
    # llama's unquantized cells, and the unquantized free tests of both levels; the other free tests
    # are skipped by --conformance-quant (the excluded cells are deselected)
    result.assert_outcomes(passed=len(LLAMA_NONE_CELLS) + 2, skipped=4, deselected=None)
    out = result.stdout.str()
    assert "conformance: profile=current" in out and "seed=3 (replay: --hypothesis-seed=3)" in out
    assert "conformance stack: torch" in out and "peft 0.21.2" in out
    assert "LoRA conformance summary" in out and "(cells: agree/diverge/known/skip/invalid;" in out
    assert {"stack", "profile", "device", "examples", "summary"} <= report.keys()
    assert report["profile"] == "current" and report["device"] == "cpu"
    assert len(report["examples"]) == 2 * len(LLAMA_NONE_CELLS) + 8  # 2 per cell, 4 per free test
    for entry in report["examples"]:
        assert {"model_type", "quantization", "load_dtype", "level", "invalid", "outcome"} <= entry.keys()
        assert entry["quantization"] == "none" and entry["outcome"] in ("agree", "known")
    counted = sum(n for per_q in report["summary"].values() for c in per_q.values() for n in c.values())
    assert counted == len(report["examples"])


def test_a_seed_replays_the_same_run(suite, tmp_path):
    _, first = _run(suite, tmp_path, 11)
    _, second = _run(suite, tmp_path, 11)  # the report file is rewritten; `first` is already read
    assert [e["case"] for e in first["examples"]] == [e["case"] for e in second["examples"]]


def test_without_a_seed_one_is_drawn_and_printed(suite):
    result = suite.runpytest_subprocess("--conformance-examples", "1", "--conformance-quant", "none", "-p", "no:warnings",
                                        "-k", ONLY)
    line = next(text for text in result.stdout.lines if text.startswith("conformance: profile="))
    seed = line.split(" seed=")[1].split()[0]
    assert seed.isdigit() and f"--hypothesis-seed={seed}" in line


def test_the_recorder_keeps_generation_and_the_final_replay_only():
    rec = Recorder()
    rec.record("t", {"n": 1}, failed=False, final=False)
    rec.record("t", {"n": 2}, failed=True, final=False)  # first failure: shrinking starts
    rec.record("t", {"n": 3}, failed=True, final=False)  # a shrink replay
    rec.record("t", {"n": 4}, failed=False, final=False)  # a shrink replay that passed
    rec.record("t", {"n": 5}, failed=True, final=True)  # the minimal example, reported
    rec.record("u", {"n": 6}, failed=True, final=False)  # an explicit example that failed: no final replay
    rec.flush()
    assert [e["n"] for e in rec.entries] == [1, 5, 6]


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "conformance", *args], capture_output=True, text=True, timeout=300)


def test_cli_errors_are_one_line_naming_the_argument():
    result = _cli("explain", "--case", "{not json")
    assert result.returncode == 2
    assert "--case: not a valid case" in result.stderr.strip().splitlines()[-1]


def test_cli_explain_replays_a_case_and_exits_by_outcome():
    case = '{"model":{"model_type":"gpt2"},"adapter":{"target_modules":["c_attn"],"r":4}}'
    result = _cli("explain", "--case", case)
    assert result.returncode == 0, result.stdout + result.stderr
    # gpt2's Conv1D flips the user's fan_in_fan_out: the known config-mutation divergence
    assert "outcome: known (known: loraconfig-mutated-in-place)" in result.stdout and "LoRA modules" in result.stdout


def test_cli_cases_and_profiles():
    cases = _cli("cases", "--sample", "3", "--seed", "1")
    assert cases.returncode == 0 and len(cases.stdout.strip().splitlines()) == 3
    for line in cases.stdout.splitlines():
        assert "model_type" in json.loads(line)["model"]
    profiles = _cli("profiles")
    assert profiles.returncode == 0 and "* current" in profiles.stdout


def test_strict_fails_an_empty_run_with_a_clear_reason(suite):
    result = suite.runpytest_subprocess("--conformance-strict", "-k", "nothing_matches_this", "-p", "no:warnings")
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    out = result.stdout.str()
    assert "STRICT MODE FAILED" in out and "empty run: no example was executed" in out


def test_strict_fails_a_run_with_unreached_cells_and_writes_the_markdown(suite, tmp_path):
    md = tmp_path / "run.md"
    result, report = _run(suite, tmp_path, 5, "--conformance-strict", "--conformance-markdown", str(md))
    assert result.ret == pytest.ExitCode.TESTS_FAILED  # the tests passed; strict mode fails the session
    # the quant-excluded tests were skipped on purpose (not a failure); -k left the other cells out (a gap)
    result.assert_outcomes(passed=len(LLAMA_NONE_CELLS) + 2, skipped=4, deselected=None)
    out = result.stdout.str()
    assert "STRICT MODE FAILED" in out and "coverage gap: peft: model_type x quantization: " in out
    assert "MISSING peft: model_type x target_kind" in out
    assert "test skipped" not in out
    assert report["strict"] is True and any("coverage gap" in why for why in report["strict_failures"])
    peft_none = cells("peft", quant_kinds=("none",))
    assert report["coverage"]["peft: model_type x quantization"]["total"] == len({c.model_type for c in peft_none})
    assert report["coverage"]["peft: model_type x target_kind"]["total"] == len(peft_none)
    assert md.read_text().startswith("## LoRA conformance: ❌ failed") and "Strict mode failed" in md.read_text()


def test_a_shard_draws_only_its_model_types_and_replays(suite, tmp_path):
    result, report = _run(suite, tmp_path, 5, "--conformance-shard", "2/4")
    assert "shard=2/4" in result.stdout.str() and "--conformance-shard=2/4" in result.stdout.str()
    assert report["shard"] == "2/4" and report["hypothesis_seed"] == 7


CRASHING_WORKER = """
import os, signal
from conformance.plugin import checks

_check = checks.check_case
_done = []

def check_case(case, conf, test_id):
    outcome = _check(case, conf, test_id)
    _done.append(outcome)
    if os.environ.get("PYTEST_XDIST_WORKER") == "gw1" and len(_done) == 2:
        os.kill(os.getpid(), signal.SIGKILL)  # the worker dies after finishing two examples
    return outcome

checks.check_case = check_case
"""


def test_a_crashed_worker_keeps_its_examples_and_is_named(suite, tmp_path):
    pytest.importorskip("xdist")
    suite.makeconftest(CRASHING_WORKER)
    report_path = tmp_path / "crash" / "report.json"
    result = suite.runpytest_subprocess(
        "-n", "2", "--conformance-examples", "3", "--hypothesis-seed", "2", "--conformance-strict",
        "--conformance-report", str(report_path), "-p", "no:warnings", "-k", ONLY,
    )
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    out = result.stdout.str()
    assert "worker gw1 CRASHED" in out and "worker gw1 crashed" in out
    report = json.loads(report_path.read_text())
    assert "gw1" in report["crashed_workers"]
    # the examples gw1 finished before it died are in the report, beside gw0's
    assert report["totals"]["examples"] >= 2


def test_cli_explain_builds_a_case_from_flags():
    result = _cli("explain", "--model-type", "gpt2", "--set", "adapter.r=4", "--set", 'adapter.target_modules=["c_attn"]')
    assert result.returncode == 0, result.stdout + result.stderr
    assert '"r":4' in result.stdout and "outcome: known" in result.stdout
    bad = _cli("explain", "--model-type", "nope")
    assert bad.returncode != 0 and "--model-type='nope' is not one of" in bad.stderr.strip().splitlines()[-1]


def test_versions_newer_than_every_profile_are_announced_in_the_header(suite):
    suite.makeconftest(
        "import reference.profiles as profiles\n"
        "_installed = profiles.installed_versions\n"
        "profiles.installed_versions = lambda: {**_installed(), 'peft': '0.99.0', 'trl': '9.0.0'}\n"
    )
    result = suite.runpytest_subprocess("--collect-only", "-p", "no:warnings")
    warnings = [line for line in result.stdout.lines if line.startswith("conformance WARNING: ")]
    assert len(warnings) == 2, result.stdout.str()
    assert "peft 0.99.0 is newer than the newest known profile" in warnings[0]
    assert "trl 9.0.0" in warnings[1]
