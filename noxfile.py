"""Sessions: the conformance suite, the harness's own tests, and lint.

Every session installs the project with the pinned stack of ``constraints/<stack>.txt``;
extra arguments after ``--`` pass through to the tool (pytest or ruff).
"""

from __future__ import annotations

from pathlib import Path

import nox

ROOT = Path(__file__).parent
DEFAULT_STACK = "current"
STACKS = sorted(p.stem for p in (ROOT / "constraints").glob("*.txt"))

nox.options.sessions = ["tests", "lint"]
nox.options.reuse_existing_virtualenvs = True


def constraints(stack: str) -> str:
    path = ROOT / "constraints" / f"{stack}.txt"
    if not path.is_file():
        raise SystemExit(f"stack={stack!r} has no constraints file; known stacks: {', '.join(STACKS)}")
    return str(path)


def install(session: nox.Session, stack: str = DEFAULT_STACK) -> None:
    """The project, its upstream extras and test tools, pinned by the stack's constraints."""
    # torch first, alone: with the pin satisfied, nothing later pulls a CUDA build.
    c = constraints(stack)
    session.install("-c", c, "torch")
    session.install("-c", c, "-e", ".[upstream,test]")


@nox.session
@nox.parametrize("stack", STACKS)
def conformance(session: nox.Session, stack: str) -> None:
    """Run the conformance suite against one pinned stack (pytest args after --)."""
    install(session, stack)
    env = {"OMP_NUM_THREADS": "1", "CONFORMANCE_CACHE": str(ROOT / ".cache" / stack)}
    session.run("python", "-m", "pytest", "conformance", *session.posargs, env=env)


@nox.session
def tests(session: nox.Session) -> None:
    """Run the harness's own tests (pytest args after --)."""
    install(session)
    session.run("python", "-m", "pytest", "tests", *(session.posargs or ["-q"]))


@nox.session
@nox.parametrize("stack", STACKS)
def faults(session: nox.Session, stack: str) -> None:
    """Run the stack-dependent harness tests (trl faults, known-divergence reproductions) on one stack."""
    install(session, stack)
    env = {"CONFORMANCE_CACHE": str(ROOT / ".cache" / stack)}
    session.run("python", "-m", "pytest", "tests/test_faults_trl.py", "tests/test_known_upstream.py",
                *(session.posargs or ["-q", "-rs"]), env=env)


@nox.session
def lint(session: nox.Session) -> None:
    """ruff over the project."""
    session.install("ruff")
    session.run("ruff", "check", *(session.posargs or ["reference", "conformance", "strategies", "tests", "noxfile.py"]))
