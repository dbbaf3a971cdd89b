"""Assertion helpers shared by the conformance tests (imported as ``checks``).

Every failure message has one template: the case, a side-by-side table of the
divergent fields, and the command that replays exactly that case.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from typing import Any

from hypothesis import HealthCheck, Phase, event, settings
from hypothesis.control import current_build_context

from conformance.engine.diff import format_table
from conformance.engine.runner import Outcome, replay_command, run_case
from reference import select_profile
from reference.spec import ABSENT, Case

__all__ = ["check_case", "configure", "current", "hypothesis_settings", "skip_reason"]

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
    seed replays a run), and no explain phase (its report points at harness lines, not at
    upstream's).  A test that builds its settings at run time passes its ``test_id``: under
    ``--conformance-strict`` the health checks stay on there, and the run reports it."""
    conf = _SETTINGS
    strict = test_id is not None and conf is not None and conf.strict
    if strict:
        conf.lifted_suppressions[test_id] = sorted(h.name for h in SUPPRESSED)
    return settings(
        max_examples=max_examples or current().examples,
        phases=[Phase.explicit, Phase.generate, Phase.target, Phase.shrink],
        deadline=None,
        database=None,
        suppress_health_check=() if strict else list(SUPPRESSED),
        print_blob=True,
    )


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


def _message(outcome: Outcome, conf: Any) -> str:
    case = outcome.case
    lines = [
        f"{outcome.status}: {case.model.model_type} {case.model.task} {case.quant.kind} {case.model.load_dtype}",
        f"case: {case.dumps()}",
    ]
    if outcome.divergences:
        lines += ["", format_table(outcome.divergences)]
    elif case.invalid:
        lines.append("this case is an invalid input, but neither side rejected it")
    for side, snap in (("reference", outcome.reference), ("upstream", outcome.upstream)):
        if snap is not None and snap.error is not None:
            lines.append(f"{side} raised {snap.error.cls}[{snap.error.kind}]: {snap.error.message[:300]}")
    lines += [
        "",
        "replay this case:",
        f"  {replay_command(case, select_profile(conf.profile_name))}",
        f"replay this run: --hypothesis-seed={conf.seed}"
        + (f" --conformance-shard={conf.shard}" if getattr(conf, "shard", None) else ""),
    ]
    return "\n".join(lines)


def check_case(case: Case, conf: Any, test_id: str) -> Outcome:
    """Run one differential example, record it, and fail on an unexpected result."""
    case = dataclasses.replace(case, training=dataclasses.replace(case.training, device=conf.device))
    _events(case)
    final = bool(getattr(current_build_context(), "is_final", False))
    reason = skip_reason(case)
    if reason is not None:
        outcome = Outcome(case, "skip", reason=reason)
        conf.recorder.record(test_id, outcome.to_json(), failed=False, final=final)
        return outcome
    outcome = run_case(case, select_profile(conf.profile_name))
    both_rejected = (
        outcome.reference is not None
        and outcome.upstream is not None
        and outcome.reference.error is not None
        and outcome.upstream.error is not None
    )
    failed = outcome.status == "diverge" or (case.invalid and outcome.status == "agree" and not both_rejected)
    conf.recorder.record(test_id, outcome.to_json(), failed=failed, final=final)
    if failed:
        raise AssertionError(_message(outcome, conf))
    return outcome
