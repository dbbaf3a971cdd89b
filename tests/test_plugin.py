"""The pytest plugin and the CLI, driven as a user would (pytester, subprocesses)."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from conformance.plugin.report import Recorder
from fault_kit import SCALING_FAULT_CONFTEST
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
        (["--conformance-profile", "nope"], "--conformance-profile='nope' is not one of seed, peft-0.16, peft-0.17, peft-0.18, peft-0.19, peft-0.20, current"),
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
ONLY = "(llama and not mllama) or level"
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
    assert "conformance: profile=current" in out
    assert ("seed=3 (replay: --hypothesis-seed=3 --conformance-examples=4 --conformance-level=all "
            "--conformance-quant=none --conformance-device=cpu --conformance-numerics=on)") in out
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


def test_a_seed_replays_the_same_run(suite, tmp_path, monkeypatch):
    monkeypatch.delenv("CI", raising=False)
    _, first = _run(suite, tmp_path, 11)
    # the replay runs where a CI variable is set: Hypothesis then loads its `ci` profile, whose
    # derandomize=True would draw from the tests' source digests and ignore --hypothesis-seed
    monkeypatch.setenv("CI", "true")
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
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1
    assert "argument --case: not valid JSON" in result.stderr


def test_cli_explain_replays_a_case_and_exits_by_outcome():
    case = '{"model":{"model_type":"gpt2"},"adapter":{"target_modules":["c_attn"],"r":4}}'
    result = _cli("explain", "--case", case)
    assert result.returncode == 0, result.stdout + result.stderr
    # gpt2's Conv1D flips the user's fan_in_fan_out: the known config-mutation divergence
    assert "outcome: known (known: loraconfig-mutated-in-place)" in result.stdout and "LoRA modules" in result.stdout
    # the stack it ran on (versions and install sources, as the run header), and which entry explained what
    assert result.stdout.startswith("stack: torch ") and "peft 0.21.2" in result.stdout.splitlines()[0]
    assert f"interpreter: python {sys.version.split()[0]} ({sys.executable})" in result.stdout
    explained = result.stdout.split("explained by the known-divergence registry")[1]
    assert "loraconfig-mutated-in-place: get_peft_model" in explained
    assert "<model>  config_mutations.fan_in_fan_out  False      True" in explained


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
    assert report["coverage"]["peft: model_type x target_kind"]["total"] == len({(c.model_type, c.target_kind)
                                                                                 for c in peft_none})
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
    assert bad.returncode == 2 and "--model-type='nope' is not one of" in bad.stderr.strip().splitlines()[-1]


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




def test_a_failure_shows_the_table_and_the_replays_and_the_replay_reproduces_it(suite):
    """Measured on `-k llama` with this fault: 751 lines for 7 failures before (40 lines of harness
    source, Hypothesis's repr of the case and its blob each), 171 after."""
    suite.makeconftest(SCALING_FAULT_CONFTEST)
    args = ["--conformance-examples", "4", "--hypothesis-seed", "4", "-p", "no:warnings", "-k", "llama-none and not mllama"]
    result = suite.runpytest_subprocess(*args)
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    out = result.stdout.str()
    failures = out.split("= FAILURES =")[1].split("LoRA conformance summary")[0]
    sections = [s for s in failures.split("\n_") if "replay this case" in s]
    assert len(sections) == 3  # llama's unquantized cells: two at the peft level, one at the trl level
    for section in sections:
        body = section.splitlines()[1:]
        assert body[0].startswith("diverge: llama ") and body[0].endswith(" level)")
        assert body[2].split() == ["path", "field", "reference", "upstream"] and "adapter[default].scaling" in section
        assert "replay this case" in section and f"{sys.executable} -m conformance explain --profile current" in section
        assert "replay this test (same seed and options):" in section and "replay this run: the same command" in section
        assert len([line for line in body if line.strip()]) < 25, section
    for noise in ("def check_case", "Failing test case", "reproduce_failure", "checks.py:", "These lines were always"):
        assert noise not in out
    # the test's replay command, run as printed (here, where the fault is planted), fails the same way
    line = next(x for x in out.splitlines() if " -m pytest " in x and "-k " in x)
    first = next(s for s in sections if line.strip() in s)
    replay = subprocess.run(shlex.split(line.strip()), cwd=suite.path, capture_output=True, text=True, timeout=600)
    assert replay.returncode == 1 and "1 failed" in replay.stdout, replay.stdout[-2000:]
    table = first.split("replay this case")[0].strip().splitlines()[1:]
    assert all(row in replay.stdout for row in table), replay.stdout[-3000:]


def test_replay_commands_name_the_interpreter_or_the_nox_session(monkeypatch, tmp_path):
    from types import SimpleNamespace

    from conformance.engine.runner import replay_command
    from conformance.plugin import checks
    from reference import select_profile
    from reference.spec import Case

    conf = SimpleNamespace(seed=5, examples=7, level="peft", quant_kinds=("none", "4bit"), device="cpu", numerics=False,
                           profile_forced=True, profile_name="seed", shard="2/4", strict=True, rootdir=tmp_path)
    for name in ("CONFORMANCE_STACK", "CONFORMANCE_FORKS", "CONFORMANCE_NOXW"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)
    options = ("--hypothesis-seed=5 --conformance-examples=7 --conformance-level=peft --conformance-quant=none,4bit "
               "--conformance-device=cpu --conformance-numerics=off --conformance-profile=seed --conformance-shard=2/4 "
               "--conformance-strict")
    test_id = "conformance/test_conformance.py::test_peft_cell[llama-none-default-CAUSAL_LM]"
    assert checks.run_command(conf, test_id) == (f"{sys.executable} -m pytest conformance/test_conformance.py {options} "
                                                 "-k 'test_peft_cell[llama-none-default-CAUSAL_LM]'")
    case = Case.from_json({"model": {"model_type": "gpt2"}})
    assert replay_command(case, select_profile("current")).startswith(f"{sys.executable} -m conformance explain --profile current --case '")
    # under a nox session (noxfile.replay_env), the session form with the same stack and forks
    monkeypatch.setenv("CONFORMANCE_STACK", "current")
    monkeypatch.setenv("CONFORMANCE_FORKS", "--peft-spec ../my-peft")
    monkeypatch.setenv("CONFORMANCE_NOXW", "/repo/noxw.py")
    assert checks.run_command(conf) == f"python3 /repo/noxw.py -s conformance-on -- current --peft-spec ../my-peft {options}"
    assert replay_command(case, select_profile("current")).startswith(
        "python3 /repo/noxw.py -s cli -- current --peft-spec ../my-peft explain --profile current --case '")


NOISY_TEST = """
import logging
import warnings


def test_noise():
    logging.getLogger("bitsandbytes.backends.cpu.ops").warning(
        "Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please make sure you already "
        "`pip install kernels` and the kernels >= 0.11.1", "No module named 'kernels'")
    logging.getLogger("bitsandbytes.cextension").warning(
        "The 8-bit optimizer is not available on your device, only available on CUDA for now.")
    warnings.warn("`is_gradient_checkpointing` is deprecated and will be removed in v6. Use "
                  "`is_activation_checkpointing` instead.", FutureWarning)
    logging.getLogger("bitsandbytes.backends.cpu.ops").warning("another bitsandbytes message stays")
    logging.getLogger("mine").warning("my own log message stays")
    warnings.warn("my own warning stays", UserWarning)
    warnings.warn("my own deprecation stays", FutureWarning)
    assert False, "show the captured logs"
"""


def test_only_the_known_upstream_noise_is_filtered(pytester):
    pytester.makepyfile(test_noisy=NOISY_TEST)
    result = pytester.runpytest_subprocess()
    shown = result.stdout.str().split("Captured log call")[1]  # the captured logs and the warnings summary
    for kept in ("another bitsandbytes message stays", "my own log message stays", "my own warning stays",
                 "my own deprecation stays"):
        assert kept in shown, shown
    for noise in ("kernels-community", "8-bit optimizer", "is_gradient_checkpointing"):
        assert noise not in shown, shown
