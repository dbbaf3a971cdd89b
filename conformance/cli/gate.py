"""``record`` and ``compare``: the two halves of the regression gate (``conformance.gate``)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from conformance.cli.validate import CliError

__all__ = ["add_parsers"]


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


def _stack(versions: dict[str, str]) -> str:
    return ", ".join(f"{k} {v}" for k, v in versions.items())


def record(args: argparse.Namespace) -> int:
    _quiet()
    from conformance.gate.corpus import CorpusError, record as record_corpus, stack_versions

    levels = ("peft", "trl") if args.level == "all" else (args.level,)
    print(f"recording {args.cases} cases (seed {args.seed}, level {args.level}) under {_stack(stack_versions())}",
          file=sys.stderr)
    try:
        corpus = record_corpus(Path(args.corpus), args.cases, args.seed, levels,
                               progress=lambda m: print(m, file=sys.stderr), strict=args.strict)
    except CorpusError as exc:
        raise CliError(str(exc)) from None
    counts: dict[str, int] = {}
    for obs in corpus.observations.values():
        counts[obs.status] = counts.get(obs.status, 0) + 1
    print(f"wrote {len(corpus.cases)} cases to {args.corpus} ({', '.join(f'{n} {k}' for k, n in sorted(counts.items()))})")
    unbuildable = sorted(i for i, o in corpus.observations.items() if o.status == "unbuildable")
    if args.strict and unbuildable:
        first = corpus.observations[unbuildable[0]].build_error
        raise CliError(f"--strict: {len(unbuildable)} cases are unbuildable under this stack (first: {unbuildable[0]}: "
                       f"{first}); record under a stack that builds them, or drop --strict")
    return 0


def compare(args: argparse.Namespace) -> int:
    from conformance.gate.corpus import CorpusError, load_corpus, observe, stack_versions
    from conformance.gate.upgrade import changes_of, markdown, report_json

    _quiet()
    try:
        corpus = load_corpus(Path(args.corpus))
    except CorpusError as exc:
        raise CliError(str(exc)) from None
    here = stack_versions()
    if args.case is not None:
        if args.case not in corpus.cases:
            raise CliError(f"--case {args.case!r} is not in {args.corpus} (ids look like {next(iter(sorted(corpus.cases)), '?')})")
        case = corpus.cases[args.case]
        changes = changes_of(args.case, corpus.observations[args.case], observe(case), case.training.level)
        print(f"case: {case.dumps()}")
        print(f"recorded under: {_stack(corpus.stack)}")
        print(f"replayed under: {_stack(here)} ({sys.executable})")
        for c in changes:
            print(f"{c.path} | {c.field} | {c.module_kind} | {c.role} | {c.before!r} -> {c.after!r}")
        print(f"{len(changes)} changes")
        return 1 if changes else 0
    if args.report is None:
        raise CliError("give --report PATH (or --case ID to replay one case)")
    print(f"recorded under: {_stack(corpus.stack)}", file=sys.stderr)
    print(f"replaying {len(corpus.cases)} cases under: {_stack(here)} ({sys.executable})", file=sys.stderr)
    replayed = {}
    for n, (case_id, case) in enumerate(sorted(corpus.cases.items()), 1):
        replayed[case_id] = observe(case)
        if n % 25 == 0 or n == len(corpus.cases):
            print(f"replayed {n}/{len(corpus.cases)} cases", file=sys.stderr)
    report = report_json(corpus, replayed, here, args.corpus)
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


def add_parsers(sub: Any, positive: Any) -> None:
    rec = sub.add_parser("record", help="record upstream's preparation of a generated corpus of cases")
    rec.add_argument("corpus", metavar="CORPUS_DIR", help="a new (or empty) directory to write the corpus to")
    rec.add_argument("--cases", type=positive, default=300,
                     help="how many cases: covering rows per level x quantization kind, then invalid cases")
    rec.add_argument("--seed", type=int, default=0, help="generation seed: the same seed gives the same cases")
    rec.add_argument("--level", choices=("peft", "trl", "all"), default="all")
    rec.add_argument("--strict", action="store_true",
                     help="exit 2 when the cases do not cover every required combination, or any is unbuildable")
    rec.set_defaults(run=record)

    cmp_ = sub.add_parser("compare", help="replay a corpus here and report every change against the recording")
    cmp_.add_argument("corpus", metavar="CORPUS_DIR", help="a corpus written by `record`")
    cmp_.add_argument("--report", metavar="REPORT.json", help="where to write the JSON upgrade report")
    cmp_.add_argument("--markdown", metavar="REPORT.md", help="also write the short markdown report")
    cmp_.add_argument("--case", metavar="ID", help="replay only this case and print its changes")
    cmp_.add_argument("--fail-on-change", action="store_true", help="exit 1 when any case changed")
    cmp_.set_defaults(run=compare)
