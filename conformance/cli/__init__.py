"""``python -m conformance``: replay and inspect cases from the command line.

Subcommands:

* ``explain --case JSON`` prepares one case on both sides and prints the diff
  (the command every divergence message prints);
* ``cases --sample N`` prints generated cases as JSON lines;
* ``profiles`` lists the reference profiles and the one the installed stack selects;
* ``merge REPORT... --out PATH`` combines shard reports into one report and summary;
* ``record CORPUS_DIR`` records upstream's preparation of a deterministic corpus of cases;
* ``compare CORPUS_DIR --report R.json`` replays it here and writes the upgrade report.

Errors are one line naming the bad argument; the exit status is 2 for bad input,
1 when ``explain`` finds an unexpected divergence, ``merge`` finds a divergence
(or, with ``--strict``, any strict-mode failure), or ``compare --fail-on-change`` (or
``compare --case``) finds a change; 0 otherwise.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Sequence

__all__ = ["main"]


def _case_arg(text: str):
    from reference.spec import Case

    try:
        if text.startswith("@"):
            with open(text[1:]) as fh:
                text = fh.read()
        return Case.from_json(json.loads(text))
    except (OSError, ValueError, TypeError) as exc:
        raise argparse.ArgumentTypeError(f"--case: not a valid case ({exc})") from None


def _profile_arg(text: str) -> str:
    from reference.profiles import PROFILES

    if text not in PROFILES:
        raise argparse.ArgumentTypeError(f"--profile={text!r} is not one of {', '.join(PROFILES)}")
    return text


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive integer")
    return value


def _set_arg(text: str) -> tuple[str, str, object]:
    """``SECTION.FIELD=VALUE`` with a JSON value (a bare word is taken as a string)."""
    target, sep, raw = text.partition("=")
    section, dot, name = target.partition(".")
    if not sep or not dot or section not in ("model", "quant", "adapter", "training"):
        raise argparse.ArgumentTypeError(
            f"--set {text!r}: expected SECTION.FIELD=VALUE with SECTION one of model, quant, adapter, training"
        )
    try:
        value = json.loads(raw)
    except ValueError:
        value = raw
    return section, name, value


def _case_from_flags(args: argparse.Namespace):
    """The case that ``--model-type``/``--task``/``--quant`` and ``--set`` describe."""
    from reference.spec import Case
    from strategies.zoo import ZOO, tasks_of

    if args.model_type not in ZOO:
        raise SystemExit(f"python -m conformance explain: error: --model-type={args.model_type!r} is not one of {', '.join(ZOO)}")
    if args.task not in tasks_of(args.model_type):
        raise SystemExit(
            f"python -m conformance explain: error: --task={args.task!r} is not one of "
            f"{', '.join(tasks_of(args.model_type))} for {args.model_type}"
        )
    data: dict = {"model": {"model_type": args.model_type, "task": args.task}, "quant": {"kind": args.quant}}
    for section, name, value in args.set or ():
        data.setdefault(section, {})[name] = value
    try:
        return Case.from_json(data)
    except (TypeError, ValueError) as exc:
        raise SystemExit(f"python -m conformance explain: error: --set: not a valid case ({exc})") from None


def _explain(args: argparse.Namespace) -> int:
    from conformance.engine.diff import format_table
    from conformance.engine.runner import run_case
    from reference import select_profile

    if args.case is None:
        if args.model_type is None:
            raise SystemExit("python -m conformance explain: error: give --case JSON, or --model-type (with --set ...)")
        args.case = _case_from_flags(args)

    profile = select_profile(args.profile)
    outcome = run_case(args.case, profile)
    print(f"profile: {profile.name}")
    print(f"case: {args.case.dumps()}")
    print(f"outcome: {outcome.status}" + (f" (known: {', '.join(outcome.known)})" if outcome.known else ""))
    for side, snap in (("reference", outcome.reference), ("upstream", outcome.upstream)):
        if snap is None:
            continue
        if snap.error is not None:
            print(f"{side}: raised {snap.error.cls}[{snap.error.kind}]: {snap.error.message[:400]}")
        else:
            m = snap.model
            print(
                f"{side}: {len(snap.params)} params, {len(snap.lora)} LoRA modules, {len(snap.saved)} saved; "
                f"trainable {m.trainable_params}/{m.total_params}, checkpointing={m.gradient_checkpointing}, "
                f"input grads={m.input_grads}"
            )
    if outcome.divergences:
        print()
        print(format_table(outcome.divergences, limit=args.limit))
    if args.json:
        payload = {
            "outcome": outcome.to_json(),
            "reference": outcome.reference.to_json() if outcome.reference else None,
            "upstream": outcome.upstream.to_json() if outcome.upstream else None,
        }
        with open(args.json, "w") as fh:
            json.dump(payload, fh, indent=1, default=str)
    return 1 if outcome.status == "diverge" else 0


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
        print(f"merge: {exc}", file=sys.stderr)
        return 2
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


def _quiet() -> None:
    """Record and compare print only their own progress: no progress bars or stray warnings
    (upstream's own warnings are captured per case all the same)."""
    import os
    import warnings

    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    warnings.filterwarnings("ignore")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    except ImportError:
        pass


def _record(args: argparse.Namespace) -> int:
    from pathlib import Path

    _quiet()
    from conformance.gate.corpus import CorpusError, record, stack_versions

    levels = ("peft", "trl") if args.level == "all" else (args.level,)
    print(f"recording {args.cases} cases (seed {args.seed}, level {args.level}) under "
          f"{', '.join(f'{k} {v}' for k, v in stack_versions().items())}", file=sys.stderr)
    try:
        corpus = record(Path(args.corpus), args.cases, args.seed, levels, progress=lambda m: print(m, file=sys.stderr),
                        strict=args.strict)
    except CorpusError as exc:
        print(f"record: {exc}", file=sys.stderr)
        return 2
    counts: dict[str, int] = {}
    for obs in corpus.observations.values():
        counts[obs.status] = counts.get(obs.status, 0) + 1
    print(f"wrote {len(corpus.cases)} cases to {args.corpus} ({', '.join(f'{n} {k}' for k, n in sorted(counts.items()))})")
    unbuildable = sorted(i for i, o in corpus.observations.items() if o.status == "unbuildable")
    if args.strict and unbuildable:
        first = corpus.observations[unbuildable[0]].build_error
        print(f"record: --strict: {len(unbuildable)} cases are unbuildable under this stack (first: {unbuildable[0]}: "
              f"{first}); record under a stack that builds them, or drop --strict", file=sys.stderr)
        return 2
    return 0


def _compare(args: argparse.Namespace) -> int:
    from pathlib import Path

    from conformance.gate.corpus import CorpusError, load_corpus, observe, stack_versions
    from conformance.gate.upgrade import changes_of, markdown, report_json

    _quiet()
    try:
        corpus = load_corpus(Path(args.corpus))
    except CorpusError as exc:
        print(f"compare: {exc}", file=sys.stderr)
        return 2
    if args.case is not None:
        if args.case not in corpus.cases:
            print(f"compare: --case {args.case!r} is not in {args.corpus}", file=sys.stderr)
            return 2
        case = corpus.cases[args.case]
        changes = changes_of(args.case, corpus.observations[args.case], observe(case), case.training.level)
        print(f"case: {corpus.cases[args.case].dumps()}")
        print(f"recorded under: {', '.join(f'{k} {v}' for k, v in corpus.stack.items())}")
        print(f"replayed under: {', '.join(f'{k} {v}' for k, v in stack_versions().items())}")
        for c in changes:
            print(f"{c.path} | {c.field} | {c.module_kind} | {c.role} | {c.before!r} -> {c.after!r}")
        print(f"{len(changes)} changes")
        return 1 if changes else 0
    if args.report is None:
        print("compare: give --report PATH (or --case ID to replay one case)", file=sys.stderr)
        return 2
    replayed = {}
    for n, (case_id, case) in enumerate(sorted(corpus.cases.items()), 1):
        replayed[case_id] = observe(case)
        if n % 25 == 0 or n == len(corpus.cases):
            print(f"replayed {n}/{len(corpus.cases)} cases", file=sys.stderr)
    report = report_json(corpus, replayed, stack_versions(), args.corpus)
    Path(args.report).parent.mkdir(parents=True, exist_ok=True)
    Path(args.report).write_text(json.dumps(report, indent=1, default=str) + "\n")
    text = markdown(report)
    if args.markdown:
        Path(args.markdown).parent.mkdir(parents=True, exist_ok=True)
        Path(args.markdown).write_text(text)
    t = report["totals"]
    print(f"{t['changed']} of {t['cases']} cases changed, {t['groups']} groups; report: {args.report}"
          + (f", markdown: {args.markdown}" if args.markdown else ""))
    return 1 if args.fail_on_change and t["changed"] else 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m conformance", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    explain = sub.add_parser("explain", help="prepare one case on both sides and print the diff")
    explain.add_argument("--case", type=_case_arg, default=None, help="the case as JSON, or @FILE")
    explain.add_argument("--model-type", default=None, help="instead of --case: a zoo model type, e.g. llama")
    explain.add_argument("--task", default="CAUSAL_LM", help="with --model-type: CAUSAL_LM, SEQ_CLS, SEQ_2_SEQ_LM, TOKEN_CLS")
    explain.add_argument("--quant", default="none", choices=("none", "8bit", "4bit"), help="with --model-type")
    explain.add_argument(
        "--set", action="append", type=_set_arg, metavar="SECTION.FIELD=JSON",
        help='with --model-type: any case field, e.g. --set adapter.r=8 --set adapter.target_modules=\'["q_proj"]\'',
    )
    explain.add_argument("--profile", type=_profile_arg, default=None, help="force a reference profile")
    explain.add_argument("--limit", type=_positive, default=60, help="rows of the diff table to print")
    explain.add_argument("--json", metavar="PATH", help="also write both snapshots and the outcome to PATH")
    explain.set_defaults(run=_explain)

    cases = sub.add_parser("cases", help="print generated cases, one JSON object a line")
    cases.add_argument("--sample", type=_positive, default=10, help="how many cases")
    cases.add_argument("--seed", type=int, default=0, help="Hypothesis seed")
    cases.add_argument("--level", choices=("peft", "trl"), default="peft")
    cases.set_defaults(run=_cases)

    profiles = sub.add_parser("profiles", help="list the profiles and the one the installed stack selects")
    profiles.set_defaults(run=_profiles)

    rec = sub.add_parser("record", help="record upstream's preparation of a generated corpus of cases")
    rec.add_argument("corpus", metavar="CORPUS_DIR", help="a new (or empty) directory to write the corpus to")
    rec.add_argument("--cases", type=_positive, default=300,
                     help="how many cases: covering rows per level x quantization kind, then invalid cases")
    rec.add_argument("--seed", type=int, default=0, help="generation seed: the same seed gives the same cases")
    rec.add_argument("--level", choices=("peft", "trl", "all"), default="all")
    rec.add_argument("--strict", action="store_true",
                     help="exit 2 when the cases do not cover every required combination, or any is unbuildable")
    rec.set_defaults(run=_record)

    cmp_ = sub.add_parser("compare", help="replay a corpus here and report every change against the recording")
    cmp_.add_argument("corpus", metavar="CORPUS_DIR", help="a corpus written by `record`")
    cmp_.add_argument("--report", metavar="REPORT.json", help="where to write the JSON upgrade report")
    cmp_.add_argument("--markdown", metavar="REPORT.md", help="also write the short markdown report")
    cmp_.add_argument("--case", metavar="ID", help="replay only this case and print its changes")
    cmp_.add_argument("--fail-on-change", action="store_true", help="exit 1 when any case changed")
    cmp_.set_defaults(run=_compare)

    merge = sub.add_parser("merge", help="combine the JSON reports of shards into one report and summary")
    merge.add_argument("reports", nargs="+", metavar="REPORT", help="JSON reports written by --conformance-report")
    merge.add_argument("--out", required=True, metavar="PATH", help="where to write the merged JSON report")
    merge.add_argument("--markdown", metavar="PATH", help="also write the short markdown report")
    merge.add_argument("--strict", action="store_true",
                       help="fail on skips, stale entries, crashed workers, missing shards or an empty result")
    merge.set_defaults(run=_merge)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    return int(args.run(args))

