"""The gate session never loses a good corpus or report, and refuses bad arguments before it starts.

``noxfile.py`` imports ``nox``, which the stack virtualenvs do not hold: the noxfile is
loaded here with a stub ``nox`` module, and ``gate()`` is driven with a fake session whose
``run`` starts the real ``python -m conformance record/compare`` processes (in this
interpreter, standing for both stacks' virtualenvs), or kills one midway, as a Ctrl-C, an
out-of-memory kill or a crashed runner would.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest

from conformance.gate.corpus import load_corpus
from fault_kit import REPO


class CommandFailed(Exception):
    """What nox raises when a command of ``session.run`` fails."""


@pytest.fixture
def noxfile(monkeypatch, tmp_path):
    """noxfile.py loaded with a stub nox, rooted in ``tmp_path`` (which holds its constraints files)."""
    stub = types.ModuleType("nox")
    stub.options = types.SimpleNamespace(sessions=[], reuse_existing_virtualenvs=False)
    stub.Session = object
    stub.session = lambda *args, **kwargs: args[0] if args and callable(args[0]) else (lambda fn: fn)
    stub.parametrize = lambda *args, **kwargs: (lambda fn: fn)
    monkeypatch.setitem(sys.modules, "nox", stub)
    spec = importlib.util.spec_from_file_location("noxfile_under_test", REPO / "noxfile.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    (tmp_path / "constraints").mkdir()
    for stack in ("current", "seed"):
        shutil.copy(REPO / "constraints" / f"{stack}.txt", tmp_path / "constraints")
    monkeypatch.setattr(module, "ROOT", tmp_path)
    # Both stacks' virtualenvs are this interpreter: nothing is installed.
    monkeypatch.setattr(module, "stack_python", lambda session, stack, forks=None: sys.executable)
    return module


class FakeSession:
    """``session.run`` calls ``runner(args, env)``; everything else as nox does it."""

    def __init__(self, posargs: list[str], runner=None) -> None:
        self.posargs = posargs
        self.runner = runner
        self.runs: list[tuple[str, ...]] = []

    def run(self, *args: str, env: dict[str, str] | None = None, external: bool = False, silent: bool = False):
        self.runs.append(args)
        if self.runner is None:
            raise AssertionError(f"nothing should run, but {args} did")
        return self.runner(args, env or {})

    def log(self, message: str) -> None:
        pass

    def error(self, message: str) -> None:
        raise SystemExit(message)


def _real(root: Path, cache: Path, kill: str | None = None):
    """A runner that starts the real command in ``root`` (as nox does, from the noxfile's folder);
    with ``kill`` (``record`` or ``compare``), that command is killed once it has started working."""

    def runner(args: tuple[str, ...], env: dict[str, str]):
        env = {**os.environ, **env, "CONFORMANCE_CACHE": str(cache)}
        command = args[3]  # python -m conformance COMMAND ...
        if command != kill:
            proc = subprocess.run(args, env=env, cwd=root, capture_output=True, text=True, timeout=600)
            if proc.returncode:
                raise CommandFailed(f"{args} exited {proc.returncode}: {proc.stderr[-2000:]}")
            return proc.stdout
        proc = subprocess.Popen(args, env=env, cwd=root, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        # record: its second line is the covering-array line, printed when it starts preparing cases;
        # compare: its second line says it starts replaying
        lines = [proc.stderr.readline(), proc.stderr.readline()]
        proc.kill()
        proc.wait()
        assert proc.returncode == -9, f"{command} ended before it could be killed: {lines}"
        raise CommandFailed(f"{args} was killed midway")

    return runner


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_killed_record_or_compare_keeps_the_last_corpus_and_report(noxfile, tmp_path, cache):
    out = tmp_path / "reports" / "gate" / "current-to-current"
    first = FakeSession(["current", "current", "--cases", "6", "--seed", "1", "--level", "peft"], _real(tmp_path, cache))
    noxfile.gate(first)
    assert [run[3] for run in first.runs] == ["record", "compare"]
    corpus, reports = _files(out / "corpus"), {n: (out / n).read_bytes() for n in ("report.json", "report.md")}
    assert load_corpus(out / "corpus").cases and b'"changed": 0' in reports["report.json"]

    # A second gate with other cases, whose recording is killed midway: the last good corpus and reports stay.
    killed = FakeSession(["current", "current", "--cases", "40", "--seed", "2", "--level", "peft"],
                         _real(tmp_path, cache, kill="record"))
    with pytest.raises(CommandFailed, match="killed midway"):
        noxfile.gate(killed)
    assert [run[3] for run in killed.runs] == ["record"]  # nothing ran after the failure
    assert _files(out / "corpus") == corpus and load_corpus(out / "corpus").cases
    assert {n: (out / n).read_bytes() for n in ("report.json", "report.md")} == reports
    assert (out / "corpus.recording").is_dir()  # the interrupted recording, apart; the next run removes it

    # A third whose recording finishes but whose comparison is killed: the reports stay those of the
    # last finished comparison (the new corpus is kept: it was recorded in full).
    compare_killed = FakeSession(["current", "current", "--cases", "6", "--seed", "3", "--level", "peft"],
                                 _real(tmp_path, cache, kill="compare"))
    with pytest.raises(CommandFailed, match="killed midway"):
        noxfile.gate(compare_killed)
    assert [run[3] for run in compare_killed.runs] == ["record", "compare"]
    assert not (out / "corpus.recording").exists() and load_corpus(out / "corpus").cases
    assert {n: (out / n).read_bytes() for n in ("report.json", "report.md")} == reports
    assert not list(out.glob("*.pending"))


@pytest.mark.parametrize("args, message", [
    (["current", "current", "--cases", "0"], "gate: --cases='0' is not a positive integer; usage: nox -s gate -- FROM TO"),
    (["current", "current", "--cases=many"], "gate: --cases='many' is not a positive integer"),
    (["current", "current", "--level", "sft"], "gate: --level='sft' is not one of peft, trl, all"),
    (["current", "current", "--seed"], "gate: --seed='' is not an integer; usage:"),
    (["nightly", "current"], "stack='nightly' has no constraints file; known stacks: "),
    (["current", "nightly"], "stack='nightly' has no constraints file"),
    (["current", "current", "--bogus"], "gate: unknown option '--bogus'; usage: nox -s gate -- FROM TO"),
    (["current"], "usage: nox -s gate -- FROM TO"),
    ([], "usage: nox -s gate -- FROM TO"),
    (["current", "current", "--peft-spec"], "--peft-spec needs a pip requirement"),
])
def test_bad_gate_arguments_are_one_line_and_touch_nothing(noxfile, tmp_path, args, message):
    before = _files(tmp_path)
    with pytest.raises(SystemExit) as exc:
        noxfile.gate(FakeSession(args))  # a FakeSession without a runner fails on any run
    text = str(exc.value.code)
    assert message in text and len(text.splitlines()) == 1, text
    assert _files(tmp_path) == before and not (tmp_path / "reports").exists()


def test_the_usage_names_every_gate_option(noxfile):
    for option in ("--cases", "--seed", "--level", "--fail-on-change", "--strict", "--peft-spec", "--trl-spec"):
        assert option in noxfile.GATE_USAGE
    assert noxfile.gate_options(["seed", "current", "--cases=5", "--seed", "-1", "--level", "trl", "--fail-on-change",
                                 "--strict"]) == ("seed", "current", ["--cases", "5", "--seed", "-1", "--level", "trl",
                                                                      "--strict"], ["--fail-on-change"])


def test_runs_under_nox_export_what_replays_need(noxfile, tmp_path):
    env = noxfile.replay_env("current", {"peft": "../my peft", "trl": "git+https://x/trl@b"})
    assert env == {"CONFORMANCE_STACK": "current", "CONFORMANCE_FORKS": "--peft-spec '../my peft' --trl-spec git+https://x/trl@b",
                   "CONFORMANCE_NOXW": str(tmp_path / "noxw.py")}
    from conformance.engine.runner import nox_session_prefix

    assert nox_session_prefix("cli", env) == (f"python3 {tmp_path / 'noxw.py'} -s cli -- current "
                                              "--peft-spec '../my peft' --trl-spec git+https://x/trl@b")
    assert nox_session_prefix("cli", {}) is None
