"""The pytest plugin: ``--conformance-*`` options, header, example recording, report, summary.

Registered through the ``pytest11`` entry point (and ``-p conformance.plugin``).
Settings are resolved once in ``pytest_configure``; later hooks only read them.

Under pytest-xdist the controller chooses a run directory and a seed and hands
both to the workers (``workerinput``); each worker streams its finished examples
to a JSONL file there (``conformance.plugin.stream``), and the controller merges the
files at the end, so a crashed worker loses nothing it finished.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from conformance.plugin import startup
from conformance.plugin.shard import Shard, parse_shard, shard_seed
from conformance.plugin.stream import ExampleStream, read_streams, stream_files

if TYPE_CHECKING:  # report, summary and checks import the zoo and the engine: only where used (startup)
    from conformance.plugin.report import Recorder

__all__ = ["Settings", "cell_examples_for", "quiet_upstream_noise", "replay_options", "settings_of"]

EXAMPLES = "--conformance-examples"
LEVEL = "--conformance-level"
DEVICE = "--conformance-device"
REPORT = "--conformance-report"
PROFILE = "--conformance-profile"
QUANT = "--conformance-quant"
STRICT = "--conformance-strict"
MARKDOWN = "--conformance-markdown"
SHARD = "--conformance-shard"
NUMERICS = "--conformance-numerics"

LEVELS = ("peft", "trl", "all")
QUANT_KINDS = ("none", "8bit", "4bit")
DEVICES = ("auto", "cpu", "cuda")
SWITCH = ("on", "off")
_KEY = pytest.StashKey["Settings"]()


@dataclass
class Settings:
    """The resolved ``--conformance-*`` options of one run."""

    examples: int
    """``--conformance-examples``: Hypothesis's max_examples of each free test."""
    cell_examples: int
    """Examples of each cell test: ``max(2, ceil(examples / 50))`` (the first is the cell's simplest case)."""
    level: str
    device: str
    """``cpu`` or ``cuda``: ``auto`` is resolved here."""
    report: Path | None
    profile_name: str
    profile_forced: bool
    quant_kinds: tuple[str, ...]
    """Which quantization kinds to check (``--conformance-quant``)."""
    seed: int
    """The run's seed: ``--hypothesis-seed``, or drawn.  A shard draws with ``shard_seed(seed, shard)``."""
    stack: dict[str, str]
    strict: bool = False
    """``--conformance-strict``: skips, stale entries, health-check suppressions and an empty run fail."""
    markdown: Path | None = None
    shard: Shard | None = None
    numerics: bool = True
    """``--conformance-numerics``: run the numerical checks on every agreeing example."""
    recorder: Recorder | None = None
    """The examples this process ran (an xdist controller makes it when needed: :func:`_recorder`)."""
    stream_dir: Path | None = None
    """The xdist run directory of the workers' example streams (controller and workers)."""
    crashed: dict[str, str] = field(default_factory=dict)
    skipped_tests: dict[str, str] = field(default_factory=dict)
    lifted_suppressions: dict[str, list[str]] = field(default_factory=dict)
    report_data: dict[str, Any] | None = None
    strict_reasons: list[str] | None = None
    rootdir: Path | None = None
    """pytest's rootdir: test ids are relative to it (the replay commands name the test file)."""

    def __repr__(self) -> str:  # shown in Hypothesis's falsifying example: keep it short
        return f"Settings(profile={self.profile_name!r}, level={self.level!r}, device={self.device!r}, seed={self.seed})"

    def wants(self, level: str) -> bool:
        return self.level in (level, "all")

    def shard_model_types(self, quant_kind: str) -> tuple[str, ...] | None:
        """The model types the tests of ``quant_kind`` draw from: None (all) unless ``--conformance-shard``."""
        if self.shard is None:
            return None
        from strategies.zoo import model_types

        return self.shard.model_types(quant_kind, model_types())

    def in_shard(self, model_type: str, quant_kind: str) -> bool:
        if self.shard is None:
            return True
        from strategies.zoo import model_types

        return self.shard.holds(model_type, quant_kind, model_types())


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


UPSTREAM_NOISE_LOGS = {
    # logger -> the start of a message it logs on every run, harmlessly: bitsandbytes >= 0.49 tries
    # an optional CPU kernel package (`kernels`) and falls back; bitsandbytes 0.47 (seed stack) says
    # at import that its 8-bit optimizers need CUDA, which preparation never uses.
    "bitsandbytes.backends.cpu.ops": "Failed to load CPU gemm_4bit_forward from kernels-community",
    "bitsandbytes.cextension": "The 8-bit optimizer is not available",
}
UPSTREAM_NOISE_WARNINGS = (
    # transformers 5 deprecates the property that peft and trl still read on every preparation.
    ("`is_gradient_checkpointing` is deprecated", FutureWarning),
)


class _UpstreamNoise(logging.Filter):
    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


def quiet_upstream_noise(config: pytest.Config | None = None) -> None:
    """Drop the known harmless upstream messages above, and only those, from the harness's own runs
    (pytest and the CLI): a user's own warnings and logs, and upstream's others, stay visible."""
    for name, prefix in UPSTREAM_NOISE_LOGS.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _UpstreamNoise) for f in logger.filters):
            logger.addFilter(_UpstreamNoise(prefix))
    import re
    import warnings

    for message, category in UPSTREAM_NOISE_WARNINGS:
        warnings.filterwarnings("ignore", message=re.escape(message), category=category)
        if config is not None:  # pytest resets the filters for each test from its ini lines
            config.addinivalue_line("filterwarnings", f"ignore:{re.escape(message)}:{category.__name__}")


def replay_options(s: Settings) -> list[str]:
    """Every option that shaped the run, resolved: what replays it (the header, and the replay
    commands of failures, ``conformance.plugin.checks.run_command``)."""
    options = [f"--hypothesis-seed={s.seed}", f"{EXAMPLES}={s.examples}", f"{LEVEL}={s.level}",
               f"{QUANT}={','.join(s.quant_kinds)}", f"{DEVICE}={s.device}", f"{NUMERICS}={'on' if s.numerics else 'off'}"]
    if s.profile_forced:
        options.append(f"{PROFILE}={s.profile_name}")
    if s.shard:
        options.append(f"{SHARD}={s.shard}")
    if s.strict:
        options.append(STRICT)
    return options


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
    group.addoption(STRICT, action="store_true", default=False,
                    help="gating mode: skips, stale known-divergence entries, health-check suppressions, "
                    "crashed workers and an empty run fail the session")
    group.addoption(MARKDOWN, default=None, metavar="PATH", help="write a short markdown report (for PR comments)")
    group.addoption(NUMERICS, type=_choice(NUMERICS, SWITCH), default="on",
                    help="numerical checks (init properties, forward, loss, gradients, training mode) "
                    "on every agreeing example: on (default) or off")
    group.addoption(SHARD, type=parse_shard, default=None, metavar="K/N",
                    help="check only shard K of N of model type x quantization (seed derived per shard)")


def _resolve_device(requested: str) -> str:
    import torch

    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        raise pytest.UsageError(f"{DEVICE}=cuda was asked for, but torch.cuda.is_available() is False")
    return requested


def _seeds(config: pytest.Config, shard: Shard | None) -> int:
    """The run's seed; forces Hypothesis's to it (or to the shard's) so the run replays.

    Without ``--hypothesis-seed`` one is drawn, before Hypothesis's own plugin
    reads the option.  xdist workers re-parse the command line, so they take the
    controller's seed from ``workerinput`` instead of drawing their own.
    """
    workerinput = getattr(config, "workerinput", None)
    seed = config.getoption("hypothesis_seed", default=None)
    if workerinput is not None and "conformance_seed" in workerinput:
        seed = workerinput["conformance_seed"]
    elif seed is None and hasattr(config.option, "hypothesis_seed"):
        seed = random.SystemRandom().randrange(2**32)
    if seed is None:
        return 0
    if hasattr(config.option, "hypothesis_seed"):
        config.option.hypothesis_seed = shard_seed(int(seed), shard)
    return int(seed)


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config: pytest.Config) -> None:
    from reference.profiles import installed_versions, select_profile

    quiet_upstream_noise(config)
    forced = config.getoption(PROFILE)
    stack = installed_versions()
    quant = config.getoption(QUANT)
    if quant is not None and stack["bitsandbytes"] == "absent" and set(quant) - {"none"}:
        raise pytest.UsageError(f"{QUANT}={','.join(quant)} asks for quantized cases, but bitsandbytes is not installed")
    shard = config.getoption(SHARD)
    examples = config.getoption(EXAMPLES) or int(os.environ.get("CONFORMANCE_EXAMPLES", 60))
    settings = Settings(
        examples=examples,
        cell_examples=cell_examples_for(examples),
        level=config.getoption(LEVEL),
        device=_resolve_device(config.getoption(DEVICE)),
        report=Path(config.getoption(REPORT)) if config.getoption(REPORT) else None,
        profile_name=select_profile(forced, stack).name,
        profile_forced=forced is not None,
        quant_kinds=quant or QUANT_KINDS,
        seed=_seeds(config, shard),
        stack=stack,
        strict=config.getoption(STRICT),
        markdown=Path(config.getoption(MARKDOWN)) if config.getoption(MARKDOWN) else None,
        shard=shard,
        numerics=config.getoption(NUMERICS) == "on",
        rootdir=config.rootpath,
    )
    workerinput = getattr(config, "workerinput", None)
    controller = startup.controller(config)
    if not controller:
        _recorder(settings)
    if workerinput is not None and workerinput.get("conformance_stream_dir"):
        settings.stream_dir = Path(workerinput["conformance_stream_dir"])
        settings.recorder.stream = ExampleStream(settings.stream_dir, workerinput.get("workerid", "worker"))
    config.stash[_KEY] = settings
    if workerinput is None:
        config.pluginmanager.register(_SkipCollector(settings), "conformance-skips")
    if not controller:  # where tests run
        config.pluginmanager.register(startup.GarbageCollection(), "conformance-gc")
        from conformance.plugin import checks

        checks.configure(settings)
        from conformance import numerics

        numerics.configure(settings.numerics)
    if config.pluginmanager.hasplugin("xdist"):
        config.pluginmanager.register(_XdistHooks(controller), "conformance-xdist")


def _recorder(s: Settings) -> Recorder:
    if s.recorder is None:
        from conformance.plugin.report import Recorder

        s.recorder = Recorder()
    return s.recorder


def cell_examples_for(examples: int) -> int:
    """Examples per cell test for ``--conformance-examples=examples``: two at the default
    (the cell's simplest case and one drawn), more as the budget grows."""
    return max(2, -(-examples // 50))


def settings_of(config: pytest.Config) -> Settings:
    return config.stash[_KEY]


def pytest_report_header(config: pytest.Config) -> list[str]:
    from conformance.gate.corpus import stack_versions
    from reference.profiles import PROFILES
    from reference.selection import selection_notes

    s = settings_of(config)
    # Versions with their install source: a fork installed from a path or URL says so.
    stack = ", ".join(f"{k} {v}" for k, v in stack_versions().items() if k != "python")
    notes = [] if s.profile_forced else selection_notes(s.stack)
    forced = " (forced)" if s.profile_forced else ""
    shard = f" shard={s.shard} (draws with seed {shard_seed(s.seed, s.shard)})" if s.shard else ""
    replay = " ".join(replay_options(s))
    return [
        f"conformance: profile={s.profile_name}{forced} level={s.level} device={s.device} "
        f"quant={','.join(s.quant_kinds)} examples={s.examples} numerics={'on' if s.numerics else 'off'} "
        f"seed={s.seed}{shard}" + (" strict" if s.strict else "") + f" (replay: {replay})",
        f"conformance stack: {stack}",
        f"conformance features: {', '.join(PROFILES[s.profile_name].features) or 'none'}; init_lora_weights "
        f"{', '.join(('True', 'False', 'gaussian') + PROFILES[s.profile_name].init_variants)} "
        f"(the LoraConfig features beyond the base fields that profile {s.profile_name} draws)",
        *(f"conformance WARNING: {note}" for note in notes),
    ]


@pytest.fixture(scope="session")
def conformance_settings(request: pytest.FixtureRequest) -> Settings:
    """The resolved options, for the conformance tests."""
    return settings_of(request.config)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Any:
    """A test that failed with conformance failures shows their messages alone (the diff table and
    the replay commands), not harness source and Hypothesis's repr of the case; any other failure
    keeps pytest's traceback.  An explicit ``--tb`` other than the default keeps pytest's report."""
    report = yield
    if report.failed and call.excinfo is not None and item.config.getoption("tbstyle", "auto") == "auto":
        from conformance.plugin.checks import failure_report

        short = failure_report(call.excinfo.value, str(item.path))
        if short is not None:
            report.longrepr = short
    return report


def _cell_wanted(s: Settings, item: pytest.Item) -> bool:
    """Whether a cell test's cell is in the run that the options ask for (level, quantization, shard)."""
    cell = getattr(getattr(item, "callspec", None), "params", {}).get("cell")
    if cell is None or not hasattr(cell, "quantization"):
        return True
    return s.wants(cell.level) and cell.quantization in s.quant_kinds and s.in_shard(cell.model_type, cell.quantization)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Cell tests whose cell the options exclude (``--conformance-level``, ``--conformance-quant``,
    ``--conformance-shard``) are deselected, not skipped: they are not part of this run.
    On an xdist worker the long free tests are spread over the workers' first batches
    (``startup.spread_long_tests``).

    Under ``--conformance-strict``, health checks a test suppresses are switched back on.
    Hypothesis reads a test's settings from ``_hypothesis_internal_use_settings``
    when the test runs (hypothesis 6.x ``core.py``); replacing them with a child
    that suppresses nothing turns every suppressed health check into a failure.
    (Cell tests build their settings at run time: ``checks.hypothesis_settings`` lifts them there.)
    """
    s = settings_of(config)
    dropped = [item for item in items if not _cell_wanted(s, item)]
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = [item for item in items if _cell_wanted(s, item)]
    startup.spread_long_tests(config, items)
    if not s.strict:
        return
    from hypothesis import settings as hypothesis_settings

    for item in items:
        fn = getattr(item, "obj", None)
        current = getattr(fn, "_hypothesis_internal_use_settings", None)
        if current is None or not current.suppress_health_check:
            continue
        s.lifted_suppressions[item.nodeid] = sorted(h.name for h in current.suppress_health_check)
        fn._hypothesis_internal_use_settings = hypothesis_settings(current, suppress_health_check=())


class _SkipCollector:
    """Registered on the controller: skipped tests that no ``--conformance-*`` option asked for."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    @pytest.hookimpl
    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        if not report.skipped or hasattr(report, "wasxfail"):
            return
        longrepr = report.longrepr
        reason = longrepr[2] if isinstance(longrepr, tuple) and len(longrepr) == 3 else str(longrepr)
        reason = reason.removeprefix("Skipped: ")
        if "--conformance-" not in reason:  # excluded on purpose by an option: not a gap
            self.settings.skipped_tests[report.nodeid] = reason


def _run_facts(s: Settings, entries: list[dict[str, Any]]) -> dict[str, Any]:
    from conformance.engine.runner import conformance_command
    from conformance.plugin.checks import run_command

    facts: dict[str, Any] = {"strict": s.strict, "shard": str(s.shard) if s.shard else None,
                             "replay": {"conformance": conformance_command(), "run": run_command(s)}}
    if s.shard is not None:
        facts["hypothesis_seed"] = shard_seed(s.seed, s.shard)
        # explicit @examples run in every shard; a suite that ignores the shard puts most examples outside it
        facts["outside_shard"] = sum(not s.in_shard(e["model_type"], e["quantization"]) for e in entries)
    if s.skipped_tests:
        facts["skipped_tests"] = dict(s.skipped_tests)
    if s.crashed:
        facts["crashed_workers"] = dict(s.crashed)
    if s.lifted_suppressions:
        facts["health_checks_enforced"] = dict(s.lifted_suppressions)
    return facts


def pytest_sessionfinish(session: pytest.Session) -> None:
    from conformance.plugin.report import build_report, strict_failures, write_report
    from conformance.plugin.summary import markdown

    s = settings_of(session.config)
    recorder = _recorder(s)
    recorder.flush()
    workeroutput = getattr(session.config, "workeroutput", None)
    if workeroutput is not None:  # an xdist worker: its examples are in its stream file
        if recorder.stream is not None:
            recorder.stream.close()
        else:
            workeroutput["conformance_examples"] = json.dumps(recorder.entries)
        workeroutput["conformance_lifted"] = json.dumps(s.lifted_suppressions)
        return
    entries = recorder.entries
    if s.stream_dir is not None:  # the controller: every worker's stream, finished or crashed
        entries = entries + read_streams(stream_files(s.stream_dir))
    s.report_data = build_report(s, entries, run=_run_facts(s, entries))
    if s.strict:
        s.strict_reasons = strict_failures(s.report_data, judge_stale=s.shard is None)
        s.report_data["strict_failures"] = s.strict_reasons
        if s.strict_reasons and session.exitstatus in (pytest.ExitCode.OK, pytest.ExitCode.NO_TESTS_COLLECTED):
            session.exitstatus = pytest.ExitCode.TESTS_FAILED
    if s.report is not None:
        write_report(s.report, s.report_data)
    if s.markdown is not None:
        s.markdown.parent.mkdir(parents=True, exist_ok=True)
        s.markdown.write_text(markdown(s.report_data, s.strict_reasons))
    if s.stream_dir is not None and not s.crashed:
        shutil.rmtree(s.stream_dir, ignore_errors=True)


def pytest_terminal_summary(terminalreporter, config: pytest.Config) -> None:
    from conformance.plugin.summary import summary_lines

    s = settings_of(config)
    report = s.report_data
    if report is None or (not report["examples"] and not _recorder(s).touched and not s.strict):
        return
    terminalreporter.section("LoRA conformance summary")
    for line in summary_lines(report, s.strict_reasons if s.strict else None):
        terminalreporter.write_line(line)
    if s.lifted_suppressions:
        terminalreporter.write_line(f"strict: health checks re-enabled for {len(s.lifted_suppressions)} tests")
    for path in (s.report, s.markdown):
        if path is not None:
            terminalreporter.write_line(f"report written to {path}")
    if s.stream_dir is not None and s.crashed:
        terminalreporter.write_line(f"worker example streams kept in {s.stream_dir}")


class _XdistHooks:
    """Registered only when pytest-xdist is active: stream directory, seed, crashes, the workers' examples."""

    def __init__(self, controller: bool) -> None:
        self.waiting_to_preload = controller

    @pytest.hookimpl
    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        if self.waiting_to_preload:  # the controller, once the workers run tests
            self.waiting_to_preload = False
            startup.preload()

    @pytest.hookimpl
    def pytest_configure_node(self, node: Any) -> None:
        s = settings_of(node.config)
        if s.stream_dir is None:
            base = s.report.parent if s.report is not None else None
            if base is not None:
                base.mkdir(parents=True, exist_ok=True)
            s.stream_dir = Path(tempfile.mkdtemp(prefix="conformance-run-", dir=base))
        node.workerinput["conformance_stream_dir"] = str(s.stream_dir)
        node.workerinput["conformance_seed"] = s.seed
        node.workerinput.update(startup.scheduling(node.config))

    @pytest.hookimpl
    def pytest_testnodedown(self, node: Any, error: Any) -> None:
        s = settings_of(node.config)
        if error is not None:
            s.crashed[node.gateway.id] = str(error)
        output = getattr(node, "workeroutput", {}) or {}
        if output.get("conformance_examples"):  # a worker without a stream (not configured by us)
            _recorder(s).extend(json.loads(output["conformance_examples"]))
        if output.get("conformance_lifted"):
            s.lifted_suppressions.update(json.loads(output["conformance_lifted"]))
