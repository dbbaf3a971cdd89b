"""``python -m conformance``: replay and inspect cases from the command line.

Subcommands:

* ``explain --case JSON`` prepares one case on both sides and prints the diff
  (the command every divergence message prints; :mod:`conformance.cli.explain`);
* ``cases --sample N`` prints generated cases as JSON lines;
* ``profiles`` lists the reference profiles and the one the installed stack selects;
* ``merge REPORT... --out PATH`` combines shard reports into one report and summary;
* ``record CORPUS_DIR`` records upstream's preparation of a deterministic corpus of cases;
* ``compare CORPUS_DIR --report R.json`` replays it here and writes the upgrade report
  (both in :mod:`conformance.cli.gate`).

Exit status: 2 for bad input, always as one line on stderr naming the argument (and the
field) and what it takes; 1 when a divergence is found: ``explain`` finds an unexpected
divergence, ``merge`` a diverging example (or, with ``--strict``, any strict-mode
failure), ``compare --fail-on-change`` (or ``compare --case``) a change; 0 otherwise.
"""

from __future__ import annotations

import argparse
import sys
from typing import NoReturn, Sequence

from conformance.cli.validate import CliError

__all__ = ["CliError", "main"]

PROG = "python -m conformance"


class _Parser(argparse.ArgumentParser):
    """Errors are one line (no usage block): what was wrong and what is allowed, exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive integer")
    return value


def _cases(args: argparse.Namespace) -> int:
    from hypothesis import HealthCheck, given, seed, settings

    from strategies import cases

    out: list[str] = []

    @seed(args.seed)
    @settings(max_examples=args.sample, database=None, deadline=None, suppress_health_check=list(HealthCheck))
    @given(cases(level=args.level))
    def collect(case) -> None:
        out.append(case.dumps())

    collect()
    print("\n".join(out[: args.sample]))
    return 0


def _profiles(args: argparse.Namespace) -> int:
    from reference.profiles import PROFILES, installed_versions, select_profile
    from reference.selection import selection_notes

    versions = installed_versions()
    chosen = select_profile(None, versions)
    print(f"installed: {', '.join(f'{k} {v}' for k, v in versions.items())}")
    for name, profile in PROFILES.items():
        mark = "*" if name == chosen.name else " "
        print(f"{mark} {name:<10} peft {profile.peft:<14} {profile.description}")
    from reference.trl import TRL_FLOWS, select_trl_flow

    flow = select_trl_flow()
    print("trl flows:")
    for name, f in TRL_FLOWS.items():
        print(f"{'*' if name == flow.name else ' '} {name:<12} trl {f.trl:<14} shape {f.shape}")
    for note in selection_notes(versions):
        print(f"WARNING: {note}")
    return 0


def _merge(args: argparse.Namespace) -> int:
    from pathlib import Path

    from conformance.plugin.merge import MergeError, load_reports, merge_reports
    from conformance.plugin.report import strict_failures, write_report
    from conformance.plugin.summary import markdown, summary_lines

    try:
        report = merge_reports(load_reports([Path(p) for p in args.reports]))
    except MergeError as exc:
        raise CliError(str(exc)) from None
    failures = strict_failures(report)
    strict = failures if args.strict else None
    if args.strict:
        report["strict"] = True
        report["strict_failures"] = failures
    write_report(Path(args.out), report)
    if args.markdown:
        Path(args.markdown).parent.mkdir(parents=True, exist_ok=True)
        Path(args.markdown).write_text(markdown(report, strict))
    print("\n".join(summary_lines(report, strict)))
    print(f"merged {len(args.reports)} reports into {args.out}")
    return 1 if report["totals"]["diverge"] or (args.strict and failures) else 0


def _parser() -> argparse.ArgumentParser:
    from conformance.cli import explain, gate

    parser = _Parser(prog=PROG, description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    explain.add_parser(sub, _positive)

    cases = sub.add_parser("cases", help="print generated cases, one JSON object a line")
    cases.add_argument("--sample", type=_positive, default=10, help="how many cases")
    cases.add_argument("--seed", type=int, default=0, help="Hypothesis seed")
    cases.add_argument("--level", choices=("peft", "trl"), default="peft")
    cases.set_defaults(run=_cases)

    profiles = sub.add_parser("profiles", help="list the profiles and the one the installed stack selects")
    profiles.set_defaults(run=_profiles)

    gate.add_parsers(sub, _positive)

    merge = sub.add_parser("merge", help="combine the JSON reports of shards into one report and summary")
    merge.add_argument("reports", nargs="+", metavar="REPORT", help="JSON reports written by --conformance-report")
    merge.add_argument("--out", required=True, metavar="PATH", help="where to write the merged JSON report")
    merge.add_argument("--markdown", metavar="PATH", help="also write the short markdown report")
    merge.add_argument("--strict", action="store_true",
                       help="fail on skips, stale entries, crashed workers, missing shards or an empty result")
    merge.set_defaults(run=_merge)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from conformance.plugin import quiet_upstream_noise

    quiet_upstream_noise()  # the known harmless upstream messages only, before anything imports bitsandbytes
    args = _parser().parse_args(argv)
    try:
        return int(args.run(args))
    except CliError as exc:
        print(f"{PROG} {args.command}: error: {exc}", file=sys.stderr)
        return 2
