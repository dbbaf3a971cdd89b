"""The pytest plugin: ``--conformance-*`` options, header, example recording, report, summary.

Registered through the ``pytest11`` entry point (and ``-p conformance.plugin``).
Settings are resolved once in ``pytest_configure``; later hooks only read them.
"""

from __future__ import annotations

import argparse
import json
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from conformance.report import Recorder, build_report, summary_lines, write_report

__all__ = ["Settings", "settings_of"]

EXAMPLES = "--conformance-examples"
LEVEL = "--conformance-level"
DEVICE = "--conformance-device"
REPORT = "--conformance-report"
PROFILE = "--conformance-profile"
QUANT = "--conformance-quant"

LEVELS = ("peft", "trl", "all")
QUANT_KINDS = ("none", "8bit", "4bit")
DEVICES = ("auto", "cpu", "cuda")
_KEY = pytest.StashKey["Settings"]()


@dataclass
class Settings:
    """The resolved ``--conformance-*`` options of one run."""

    examples: int
    level: str
    device: str
    """``cpu`` or ``cuda``: ``auto`` is resolved here."""
    report: Path | None
    profile_name: str
    profile_forced: bool
    quant_kinds: tuple[str, ...]
    """Which quantization kinds to check (``--conformance-quant``)."""
    seed: int
    stack: dict[str, str]
    recorder: Recorder = field(default_factory=Recorder)

    def __repr__(self) -> str:  # shown in Hypothesis's falsifying example: keep it short
        return f"Settings(profile={self.profile_name!r}, level={self.level!r}, device={self.device!r}, seed={self.seed})"

    def wants(self, level: str) -> bool:
        return self.level in (level, "all")


def _examples(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"{EXAMPLES}={value!r} must be a positive integer")
    return n


def _choice(option: str, allowed: tuple[str, ...]):
    def check(value: str) -> str:
        if value not in allowed:
            raise argparse.ArgumentTypeError(f"{option}={value!r} is not one of {', '.join(allowed)}")
        return value

    return check


def _quant(value: str) -> tuple[str, ...]:
    kinds = tuple(k.strip() for k in value.split(",") if k.strip())
    bad = [k for k in kinds if k not in QUANT_KINDS]
    if not kinds or bad:
        raise argparse.ArgumentTypeError(
            f"{QUANT}={value!r}: expected a comma-separated subset of {', '.join(QUANT_KINDS)}"
        )
    return kinds


def _profile(value: str) -> str:
    from reference.profiles import PROFILES

    if value not in PROFILES:
        raise argparse.ArgumentTypeError(f"{PROFILE}={value!r} is not one of {', '.join(PROFILES)}")
    return value


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("conformance", "LoRA/QLoRA preparation conformance")
    group.addoption(EXAMPLES, type=_examples, default=None, metavar="N",
                    help="Hypothesis max_examples for each conformance test (default: 60)")
    group.addoption(LEVEL, type=_choice(LEVEL, LEVELS), default="all",
                    help="which preparation level to check: peft, trl or all (default)")
    group.addoption(DEVICE, type=_choice(DEVICE, DEVICES), default="auto",
                    help="where models are placed: auto (cuda if available), cpu, cuda")
    group.addoption(REPORT, default=None, metavar="PATH", help="write the JSON report to PATH")
    group.addoption(PROFILE, type=_profile, default=None, metavar="NAME",
                    help="force a reference profile instead of the one the installed versions select")
    group.addoption(QUANT, type=_quant, default=None, metavar="KINDS",
                    help="comma-separated quantization kinds to check: none,8bit,4bit (default: all); "
                    "asking for 8bit or 4bit explicitly makes a missing bitsandbytes an error")


def _resolve_device(requested: str) -> str:
    import torch

    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        raise pytest.UsageError(f"{DEVICE}=cuda was asked for, but torch.cuda.is_available() is False")
    return requested


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config: pytest.Config) -> None:
    from reference.profiles import installed_versions, select_profile

    # A run is replayable: without --hypothesis-seed we draw one and force it,
    # before Hypothesis's own plugin reads the option.
    seed = config.getoption("hypothesis_seed", default=None)
    if seed is None and hasattr(config.option, "hypothesis_seed"):
        seed = random.SystemRandom().randrange(2**32)
        config.option.hypothesis_seed = seed
    forced = config.getoption(PROFILE)
    stack = installed_versions()
    quant = config.getoption(QUANT)
    if quant is not None and stack["bitsandbytes"] == "absent" and set(quant) - {"none"}:
        raise pytest.UsageError(f"{QUANT}={','.join(quant)} asks for quantized cases, but bitsandbytes is not installed")
    config.stash[_KEY] = Settings(
        examples=config.getoption(EXAMPLES) or int(os.environ.get("CONFORMANCE_EXAMPLES", 60)),
        level=config.getoption(LEVEL),
        device=_resolve_device(config.getoption(DEVICE)),
        report=Path(config.getoption(REPORT)) if config.getoption(REPORT) else None,
        profile_name=select_profile(forced, stack).name,
        profile_forced=forced is not None,
        quant_kinds=quant or QUANT_KINDS,
        seed=int(seed) if seed is not None else 0,
        stack=stack,
    )
    from conformance import checks

    checks.configure(config.stash[_KEY])
    if config.pluginmanager.hasplugin("xdist"):
        config.pluginmanager.register(_XdistHooks(), "conformance-xdist")


def settings_of(config: pytest.Config) -> Settings:
    return config.stash[_KEY]


def pytest_report_header(config: pytest.Config) -> list[str]:
    s = settings_of(config)
    stack = ", ".join(f"{k} {v}" for k, v in s.stack.items())
    forced = " (forced)" if s.profile_forced else ""
    return [
        f"conformance: profile={s.profile_name}{forced} level={s.level} device={s.device} "
        f"quant={','.join(s.quant_kinds)} examples={s.examples} seed={s.seed} (replay: --hypothesis-seed={s.seed})",
        f"conformance stack: {stack}",
    ]


@pytest.fixture(scope="session")
def conformance_settings(request: pytest.FixtureRequest) -> Settings:
    """The resolved options, for the conformance tests."""
    return settings_of(request.config)


def pytest_sessionfinish(session: pytest.Session) -> None:
    s = settings_of(session.config)
    s.recorder.flush()
    workeroutput = getattr(session.config, "workeroutput", None)
    if workeroutput is not None:  # an xdist worker: hand the examples to the controller
        workeroutput["conformance_examples"] = json.dumps(s.recorder.entries)
        return
    if s.report is not None:
        write_report(s.report, build_report(s, s.recorder.entries))


def pytest_terminal_summary(terminalreporter, config: pytest.Config) -> None:
    s = settings_of(config)
    s.recorder.flush()
    if not s.recorder.entries and not s.recorder.touched:
        return
    terminalreporter.section("LoRA conformance summary")
    for line in summary_lines(build_report(s, s.recorder.entries)):
        terminalreporter.write_line(line)
    if s.report is not None:
        terminalreporter.write_line(f"report written to {s.report}")


class _XdistHooks:
    """Registered only when pytest-xdist is active: collect the workers' examples."""

    @pytest.hookimpl
    def pytest_testnodedown(self, node: Any, error: Any) -> None:
        config = node.config
        data = getattr(node, "workeroutput", {}).get("conformance_examples")
        if data:
            settings_of(config).recorder.extend(json.loads(data))
