"""Sessions: the conformance suite, the regression gate, the harness's own tests, and lint.

A *stack* is a file ``constraints/<stack>.txt`` that pins torch, transformers, peft, trl,
bitsandbytes and the rest.  Every stack gets one virtualenv, ``.nox/stack-<stack>``,
shared by the sessions that run on it (``tests`` runs on ``current``), so a stack is
installed once.  Extra arguments after ``--`` pass through to the tool (pytest, the
gate's record/compare, or ruff), except these, which the sessions take themselves:

* ``--peft-spec SPEC`` / ``--trl-spec SPEC``: run against a fork: SPEC is anything pip
  installs (a local path, ``git+https://...@branch``, a wheel).  The fork is installed
  over the stack's pin, in a virtualenv of its own (named after a hash of the specs),
  so the stack's own virtualenv never holds it.

    nox -s "conformance(stack='current')" -- --peft-spec ../my-peft --conformance-examples 100
    nox -s gate -- seed current
    nox -s gate -- current current --peft-spec ../my-peft
    nox -s cli -- current --peft-spec ../my-peft explain --case '{...}'

Runs of the suite and of the CLI get ``CONFORMANCE_STACK``, ``CONFORMANCE_FORKS`` and
``CONFORMANCE_NOXW`` (:func:`replay_env`): the replay commands they print then name this
session form with the same stack and forks, which is the only way to reach the same peft.
"""

from __future__ import annotations

import hashlib
import os
import shlex
import shutil
import sys
from pathlib import Path

import nox

ROOT = Path(__file__).parent
DEFAULT_STACK = "current"
STACKS = sorted(p.stem for p in (ROOT / "constraints").glob("*.txt"))
"""Every stack: the two of DESIGN.md plus release stacks for the gate (``peft-0.19.0``...)."""
PINNED = ["current", "seed"]
"""DESIGN.md's stacks: the parameters of the ``conformance`` and ``faults`` sessions."""
FORK_OPTIONS = {"--peft-spec": "peft", "--trl-spec": "trl"}

nox.options.sessions = ["tests", "lint"]
nox.options.reuse_existing_virtualenvs = True


def constraints(stack: str) -> str:
    path = ROOT / "constraints" / f"{stack}.txt"
    if not path.is_file():
        raise SystemExit(f"stack={stack!r} has no constraints file; known stacks: {', '.join(STACKS)}")
    return str(path)


def split_forks(args: list[str]) -> tuple[dict[str, str], list[str]]:
    """Take ``--peft-spec X`` / ``--trl-spec X`` (or ``--peft-spec=X``) out of ``args``."""
    forks: dict[str, str] = {}
    rest: list[str] = []
    it = iter(args)
    for arg in it:
        option, eq, value = arg.partition("=")
        if option in FORK_OPTIONS:
            if not eq:
                value = next(it, "")
            if not value:
                raise SystemExit(f"{option} needs a pip requirement: a path, a VCS URL or a wheel")
            forks[FORK_OPTIONS[option]] = value
        else:
            rest.append(arg)
    return forks, rest


def _bin(venv: Path, name: str) -> str:
    return str(venv / ("Scripts" if os.name == "nt" else "bin") / name)


def stack_python(session: nox.Session, stack: str, forks: dict[str, str] | None = None) -> str:
    """The python of ``stack``'s virtualenv, created or brought up to date: torch first,
    alone (with the pin satisfied, nothing later pulls a CUDA build), then the project
    with its upstream extras pinned by the constraints, then any fork over its pin."""
    c = constraints(stack)
    forks = forks or {}
    name = stack
    if forks:
        digest = hashlib.sha256(repr(sorted(forks.items())).encode()).hexdigest()[:10]
        name = f"{stack}-fork-{digest}"
    venv = ROOT / ".nox" / f"stack-{name}"
    python = _bin(venv, "python")
    if not Path(python).exists():
        session.run(sys.executable, "-m", "venv", str(venv), external=True)
    pip = (python, "-m", "pip", "install", "-q", "--disable-pip-version-check")
    session.run(*pip, "-c", c, "torch", external=True, silent=True)
    session.run(*pip, "-c", c, "-e", f"{ROOT}[upstream,test]", external=True, silent=True)
    for package, spec in sorted(forks.items()):
        session.log(f"installing the {package} fork {spec} over the {stack} pin")
        # Not under the constraints (a fork's version rarely equals the pin), no deps (the
        # stack keeps its pinned companions), and always reinstalled (a path's code changes).
        session.run(*pip, "--no-deps", "--force-reinstall", spec, external=True, silent=True)
    return python


def stack_env(stack: str) -> dict[str, str]:
    return {"OMP_NUM_THREADS": "1", "CONFORMANCE_CACHE": str(ROOT / ".cache" / stack),
            "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1", "TOKENIZERS_PARALLELISM": "false"}


def replay_env(stack: str, forks: dict[str, str]) -> dict[str, str]:
    """What a run reads to print replay commands that work as printed
    (``conformance.engine.runner.nox_session_prefix``): this stack, the fork options verbatim
    (noxw.py always runs from this folder, so a relative path means the same, and the same specs
    reuse the same fork virtualenv), and where noxw.py is."""
    options = {package: option for option, package in FORK_OPTIONS.items()}
    words = [w for package, spec in sorted(forks.items()) for w in (options[package], spec)]
    return {"CONFORMANCE_STACK": stack, "CONFORMANCE_FORKS": shlex.join(words), "CONFORMANCE_NOXW": str(ROOT / "noxw.py")}


@nox.session(venv_backend="none")
@nox.parametrize("stack", PINNED)
def conformance(session: nox.Session, stack: str) -> None:
    """Run the conformance suite against one stack (pytest args after --; --peft-spec/--trl-spec for forks)."""
    forks, args = split_forks(list(session.posargs))
    python = stack_python(session, stack, forks)
    session.run(python, "-m", "pytest", "conformance", *args, env=stack_env(stack) | replay_env(stack, forks),
                external=True)


@nox.session(venv_backend="none", name="conformance-on")
def conformance_on(session: nox.Session) -> None:
    """Run the conformance suite on any stack, a release stack included: nox -s conformance-on -- STACK [pytest args]."""
    forks, args = split_forks(list(session.posargs))
    if not args or args[0].startswith("-"):
        session.error(f"usage: nox -s conformance-on -- STACK [pytest args]; stacks: {', '.join(STACKS)}")
    stack, args = args[0], args[1:]
    python = stack_python(session, stack, forks)
    session.run(python, "-m", "pytest", "conformance", *args, env=stack_env(stack) | replay_env(stack, forks),
                external=True)


@nox.session(venv_backend="none")
def cli(session: nox.Session) -> None:
    """Run python -m conformance on any stack or fork: nox -s cli -- STACK [--peft-spec X] COMMAND [args] (replays use it)."""
    forks, args = split_forks(list(session.posargs))
    if not args or args[0].startswith("-"):
        session.error(f"usage: nox -s cli -- STACK [--peft-spec X] [--trl-spec X] COMMAND [args], e.g. "
                      f"nox -s cli -- current explain --model-type gpt2; stacks: {', '.join(STACKS)}")
    stack, args = args[0], args[1:]
    python = stack_python(session, stack, forks)
    session.run(python, "-m", "conformance", *args, env=stack_env(stack) | replay_env(stack, forks), external=True)


@nox.session(venv_backend="none")
def tests(session: nox.Session) -> None:
    """Run the harness's own tests on the current stack (pytest args after --; default: quiet, on
    both cores with pytest-xdist, about half the serial time on the 2-vCPU CI machine)."""
    python = stack_python(session, DEFAULT_STACK)
    session.run(python, "-m", "pytest", "tests", *(session.posargs or ["-q", "-n", "2"]),
                env=stack_env(DEFAULT_STACK), external=True)


@nox.session(venv_backend="none")
@nox.parametrize("stack", PINNED)
def faults(session: nox.Session, stack: str) -> None:
    """Run the stack-dependent harness tests (trl faults, known-divergence reproductions, DoRA, inference mode, init
    variants (pissa_niter_K and LoftQ too), trainable tokens, parameter targets, weight tying, resumed adapters, several adapters, the trl
    trainers, vision-language models) on one stack."""
    python = stack_python(session, stack)
    session.run(python, "-m", "pytest", "tests/test_faults_trl.py", "tests/test_known_upstream.py", "tests/test_known_narrow.py",
                "tests/test_dora.py", "tests/test_inference_mode.py", "tests/test_inits.py", "tests/test_tokens.py",
                "tests/test_inits_fast_svd_loftq.py", "tests/test_params.py", "tests/test_tying.py", "tests/test_resume.py",
                "tests/test_tokens_dict.py", "tests/test_adapters.py", "tests/test_trainers.py", "tests/test_chat_template.py", "tests/test_vision.py",
                *(session.posargs or ["-q", "-rs"]), env=stack_env(stack), external=True)


GATE_USAGE = ("usage: nox -s gate -- FROM TO [--cases N] [--seed S] [--level peft|trl|all] [--fail-on-change] "
              "[--strict] [--peft-spec X] [--trl-spec X]")
_GATE_VALUES = {"--cases": "positive", "--seed": "integer", "--level": ("peft", "trl", "all")}


def gate_options(args: list[str]) -> tuple[str, str, list[str], list[str]]:
    """(FROM, TO, record options, compare options) of the gate's arguments, every one checked
    before anything is installed, recorded or deleted; a bad one exits with one line."""
    stacks = [a for a in args[:2] if not a.startswith("-")]
    if len(stacks) != 2:
        raise SystemExit(GATE_USAGE)
    for stack in stacks:
        constraints(stack)
    record, compare = [], []
    rest = iter(args[2:])
    for arg in rest:
        option, eq, value = arg.partition("=")
        if option in ("--fail-on-change",):
            compare.append(option)
        elif option == "--strict":
            record.append(option)
        elif option in _GATE_VALUES:
            value = value if eq else next(rest, "")
            kind = _GATE_VALUES[option]
            ok = (value in kind) if isinstance(kind, tuple) else value.lstrip("-").isdigit() and (
                kind == "integer" or int(value) >= 1)
            if not ok:
                allowed = (f"one of {', '.join(kind)}" if isinstance(kind, tuple)
                           else "an integer" if kind == "integer" else f"a {kind} integer")
                raise SystemExit(f"gate: {option}={value!r} is not {allowed}; {GATE_USAGE}")
            record += [option, value]
        else:
            raise SystemExit(f"gate: unknown option {arg!r}; {GATE_USAGE}")
    return stacks[0], stacks[1], record, compare


@nox.session(venv_backend="none")
def gate(session: nox.Session) -> None:
    """What changed between two stacks: record a corpus under the first, compare under the second.

    nox -s gate -- FROM TO [--cases N] [--seed S] [--level peft|trl|all] [--fail-on-change] [--strict]
                           [--peft-spec X] [--trl-spec X]

    Fork specs apply to the TO side; --fail-on-change makes any change fail the session; --strict
    fails a corpus that does not reach every combination it must cover (or holds unbuildable
    cases).  Every argument is checked before anything runs.  The corpus is recorded into a
    temporary folder that replaces reports/gate/FROM-to-TO/corpus only when recording succeeded,
    and the reports (report.json, report.md) are replaced only by a finished comparison, so an
    interrupted or failed run loses nothing.
    """
    forks, args = split_forks(list(session.posargs))
    before, after, record_opts, compare_opts = gate_options(args)
    label = f"{before}-to-{after}" + ("-fork" if forks else "")
    out = ROOT / "reports" / "gate" / label
    out.mkdir(parents=True, exist_ok=True)
    corpus, staged = out / "corpus", out / "corpus.recording"
    shutil.rmtree(staged, ignore_errors=True)  # a leftover of an interrupted run, never the last good corpus
    python = stack_python(session, before)
    session.run(python, "-m", "conformance", "record", str(staged), *record_opts, env=stack_env(before), external=True)
    shutil.rmtree(corpus, ignore_errors=True)
    staged.rename(corpus)
    python = stack_python(session, after, forks)
    report, md = out / "report.json", out / "report.md"
    pending_report, pending_md = out / "report.json.pending", out / "report.md.pending"
    try:
        session.run(python, "-m", "conformance", "compare", str(corpus.relative_to(ROOT)), "--report", str(pending_report),
                    "--markdown", str(pending_md), *compare_opts, env=stack_env(after), external=True)
    finally:
        # --fail-on-change fails the session after writing both files: they are the run's result
        if pending_report.exists() and pending_md.exists():
            pending_report.replace(report)
            pending_md.replace(md)
    session.log(f"gate {before} -> {after}: report {report}, markdown {md}")


@nox.session
def lint(session: nox.Session) -> None:
    """ruff over the project."""
    session.install("ruff")
    session.run("ruff", "check", *(session.posargs or ["reference", "conformance", "strategies", "tests", "noxfile.py"]))
