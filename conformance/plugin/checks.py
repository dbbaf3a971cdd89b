"""Assertion helpers shared by the conformance tests (imported as ``checks``).

Every failure message has one template: what diverged (model type, task, quantization,
load dtype, level), a side-by-side table of the divergent fields, the commands that
replay exactly that case and that test, as they ran (interpreter, stack, forks,
options).  The plugin shows a conformance failure as that message alone
(:func:`failure_report`): no harness source, no Hypothesis repr of the case.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import shlex
import sys
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, Phase, event, settings
from hypothesis.control import current_build_context

from conformance.engine.diff import format_table
from conformance.engine.runner import Outcome, nox_session_prefix, replay_command, run_case
from reference import select_profile
from reference.spec import ABSENT, Case

__all__ = ["ConformanceFailure", "check_case", "configure", "current", "failure_report", "hypothesis_settings",
           "run_command", "skip_reason"]

_SETTINGS: Any = None


def configure(resolved: Any) -> None:
    """Called by the plugin's ``pytest_configure``: the settings tests read at import."""
    global _SETTINGS
    _SETTINGS = resolved


def current() -> Any:
    """The run's resolved ``--conformance-*`` settings."""
    if _SETTINGS is None:
        raise RuntimeError(
            "the conformance plugin is not active: install the project (pip install -e .) "
            "or run pytest with -p conformance.plugin"
        )
    return _SETTINGS


SUPPRESSED = (HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much)
"""Health checks the conformance tests switch off (slow model loads, large cases), except under
``--conformance-strict``."""


def hypothesis_settings(max_examples: int | None = None, *, test_id: str | None = None) -> settings:
    """max_examples from ``--conformance-examples`` (or as given); no deadline, no database (a
    seed replays a run), never derandomized (Hypothesis loads its ``ci`` profile wherever a ``CI``
    variable is set, and that profile's ``derandomize=True`` would draw from each test's source
    digest instead of ``--hypothesis-seed``: CI would run other cases than the seed it prints),
    and no explain phase (its report points at harness lines, not at
    upstream's), no reproduce_failure blob (a cell test's inner function cannot take the
    decorator; the seed and the explain command replay a failure).  A test that builds its
    settings at run time passes its ``test_id``: under ``--conformance-strict`` the health
    checks stay on there, and the run reports it; its ``max_examples`` is recorded with the
    test's examples (``asked``), so the summary can say when Hypothesis ran fewer."""
    conf = _SETTINGS
    strict = test_id is not None and conf is not None and conf.strict
    if strict:
        conf.lifted_suppressions[test_id] = sorted(h.name for h in SUPPRESSED)
    if test_id is not None:
        _ASKED[test_id] = max_examples or current().examples
    return settings(
        max_examples=max_examples or current().examples,
        phases=[Phase.explicit, Phase.generate, Phase.target, Phase.shrink],
        deadline=None,
        database=None,
        derandomize=False,
        suppress_health_check=() if strict else list(SUPPRESSED),
        print_blob=False,
    )


_ASKED: dict[str, int] = {}
"""max_examples of the tests that build their settings at run time (cell tests), by test id;
the free tests ask for ``--conformance-examples``."""


def skip_reason(case: Case) -> str | None:
    """Why this environment cannot run ``case``, if it cannot."""
    if case.quant.quantized and importlib.util.find_spec("bitsandbytes") is None:
        return "bitsandbytes is not installed: quantized cases cannot be loaded"
    return None


def _events(case: Case) -> None:
    a = case.adapter
    targets = a.target_modules
    kind = (
        "default" if targets in (ABSENT, None)
        else "all-linear" if targets == "all-linear"
        else "regex" if isinstance(targets, str)
        else "list"
    )
    event(f"quant={case.quant.kind}")
    event(f"load_dtype={case.model.load_dtype}")
    event(f"targets={kind}")
    event(f"r={a.r}")
    event(f"bias={a.bias}")
    event(f"invalid={case.invalid}")


class ConformanceFailure(AssertionError):
    """An unexpected result of one example: a divergence, or an invalid input both sides accepted.
    Its message is the whole report of the failure (:func:`_message`)."""


def run_command(conf: Any, test_id: str | None = None) -> str:
    """The command that replays the run (every option that shaped it), or with ``test_id`` one
    test of it (``-k``): the nox session it ran under, with the same stack and forks, or else the
    interpreter running now on the same test file."""
    from conformance.plugin import replay_options

    options = replay_options(conf)
    if test_id is not None:
        options += ["-k", test_id.split("::")[-1]]
    words = " ".join(shlex.quote(o) for o in options)
    prefix = nox_session_prefix("conformance-on")
    if prefix is not None:
        return f"{prefix} {words}"
    root = Path(getattr(conf, "rootdir", None) or Path.cwd())
    # the test's file, or the suite: the repository's conformance/ folder (else the rootdir)
    path = root / test_id.split("::")[0] if test_id is not None else (
        root / "conformance" if (root / "conformance").is_dir() else root)
    target = os.path.relpath(path) if path.resolve().is_relative_to(Path.cwd().resolve()) else str(path)
    return f"{shlex.quote(sys.executable)} -m pytest {shlex.quote(target)} {words}"


def _message(outcome: Outcome, conf: Any, test_id: str | None = None) -> str:
    case = outcome.case
    lines = [f"{outcome.status}: {case.model.model_type} {case.model.task} {case.quant.kind} {case.model.load_dtype} "
             f"({case.training.level} level" + (", an invalid input" if case.invalid else "") + ")"]
    if outcome.divergences:
        lines += ["", format_table(outcome.divergences)]
    elif case.invalid:
        lines.append("this case is an invalid input, but neither side rejected it")
    for side, snap in (("reference", outcome.reference), ("upstream", outcome.upstream)):
        if snap is not None and snap.error is not None:
            lines.append(f"{side} raised {snap.error.cls}[{snap.error.kind}]: {snap.error.message[:300]}")
    if outcome.known:
        lines.append(f"(known divergences also matched: {', '.join(outcome.known)}; explain shows which)")
    lines += ["", "replay this case (prints both sides and the registry's part):",
              f"  {replay_command(case, select_profile(conf.profile_name))}"]
    if test_id is not None:
        lines += ["replay this test (same seed and options):", f"  {run_command(conf, test_id)}",
                  "replay this run: the same command without -k"]
    else:
        lines.append(f"replay this run: {run_command(conf)}")
    return "\n".join(lines)


def _failures(exc: BaseException) -> list[ConformanceFailure] | None:
    """The conformance failures ``exc`` is made of (one, or a group Hypothesis raised for distinct
    failures), or None when anything else is in it (a crash of the harness keeps its traceback)."""
    if isinstance(exc, ConformanceFailure):
        return [exc]
    inner_exceptions = getattr(exc, "exceptions", None)  # an ExceptionGroup
    if isinstance(inner_exceptions, (tuple, list)):
        found: list[ConformanceFailure] = []
        for inner in inner_exceptions:
            more = _failures(inner)
            if more is None:
                return None
            found += more
        return found
    return None


@dataclasses.dataclass
class _Crash:
    """What pytest's one-line summary reads (``reprcrash.message``)."""

    path: str
    lineno: int
    message: str


class FailureReport:
    """A conformance failure as pytest shows it: the messages only (pytest's ``longrepr``)."""

    def __init__(self, text: str, headline: str, path: str) -> None:
        self.text = text
        self.reprcrash = _Crash(path, 0, headline)

    def toterminal(self, tw: Any) -> None:
        for line in self.text.splitlines():
            tw.line(line)

    def __str__(self) -> str:
        return self.text


def failure_report(exc: BaseException, path: str) -> FailureReport | None:
    """The report of a test that failed with conformance failures only, or None (keep pytest's own)."""
    failures = _failures(exc)
    if not failures:
        return None
    texts = [str(f.args[0]) if f.args else str(f) for f in failures]
    headline = texts[0].splitlines()[0]
    if len(texts) > 1:
        headline = f"{len(texts)} distinct failures, the first: {headline}"
        texts = [f"Hypothesis found {len(texts)} distinct failures:"] + [
            f"--- failure {i} of {len(failures)} ---\n{t}" for i, t in enumerate(texts, 1)]
    return FailureReport("\n".join(texts), headline, path)


def check_case(case: Case, conf: Any, test_id: str) -> Outcome:
    """Run one differential example, record it, and fail on an unexpected result."""
    __tracebackhide__ = True  # a failure is the message; the lines of this helper say nothing about it
    case = dataclasses.replace(case, training=dataclasses.replace(case.training, device=conf.device))
    _events(case)
    final = bool(getattr(current_build_context(), "is_final", False))
    reason = skip_reason(case)
    if reason is not None:
        outcome = Outcome(case, "skip", reason=reason)
        conf.recorder.record(test_id, _entry(outcome, test_id, conf), failed=False, final=final)
        return outcome
    outcome = run_case(case, select_profile(conf.profile_name))
    both_rejected = (
        outcome.reference is not None
        and outcome.upstream is not None
        and outcome.reference.error is not None
        and outcome.upstream.error is not None
    )
    failed = outcome.status == "diverge" or (case.invalid and outcome.status == "agree" and not both_rejected)
    conf.recorder.record(test_id, _entry(outcome, test_id, conf), failed=failed, final=final)
    if failed:
        raise ConformanceFailure(_message(outcome, conf, test_id))
    return outcome


def _entry(outcome: Outcome, test_id: str, conf: Any) -> dict[str, Any]:
    """The report's entry for one example: the outcome, the test that ran it and how many that test asked for."""
    return {**outcome.to_json(), "test": test_id, "asked": _ASKED.get(test_id, conf.examples)}
