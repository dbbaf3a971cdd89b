"""``explain``: prepare one case on both sides and print what each did and how they differ.

The case comes from ``--case JSON`` (or ``@FILE``), or from ``--model-type``/``--task``/
``--quant`` and ``--set SECTION.FIELD=VALUE`` flags; either way every field is checked
first (:mod:`conformance.cli.validate`).  The output starts with the stack (each
package's version and install source) and the interpreter, because a replay on another
stack (a fork's virtualenv versus the stack's own) is the usual reason a divergence
"disappears".  For a ``known`` outcome it shows which registry entry explained which
divergence.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from typing import Any

from conformance.cli.validate import CliError, case_from_json

__all__ = ["add_parser", "stack_line"]


def stack_line() -> str:
    """The installed stack as the run header prints it: versions, and the install source of a fork."""
    from conformance.gate.corpus import stack_versions

    return ", ".join(f"{k} {v}" for k, v in stack_versions().items() if k != "python")


def interpreter_line() -> str:
    return f"python {platform.python_version()} ({sys.executable})"


def _case_arg(text: str) -> Any:
    if text.startswith("@"):
        try:
            with open(text[1:]) as fh:
                text = fh.read()
        except OSError as exc:
            raise argparse.ArgumentTypeError(f"cannot read the case file {text[1:]!r}: {exc.strerror}") from None
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not valid JSON ({exc}); give a case object, e.g. "
                                         '\'{"model":{"model_type":"gpt2"},"adapter":{"r":4}}\'') from None
    try:
        return case_from_json(data, "--case")
    except CliError as exc:
        raise argparse.ArgumentTypeError(str(exc).removeprefix("--case: ")) from None


def _set_arg(text: str) -> tuple[str, str, object]:
    """``SECTION.FIELD=VALUE``: VALUE is JSON; a bare word (``bias=all``) is taken as a string, which
    the field check then refuses where the field takes no string (``r=four``)."""
    target, sep, raw = text.partition("=")
    section, dot, name = target.partition(".")
    if not sep or not dot or section not in ("model", "quant", "adapter", "training"):
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected SECTION.FIELD=VALUE with SECTION one of model, quant, adapter, training"
        )
    try:
        value = json.loads(raw)
    except ValueError:
        value = raw
    return section, name, value


def _case_from_flags(args: argparse.Namespace) -> Any:
    """The case that ``--model-type``/``--task``/``--quant`` and ``--set`` describe."""
    data: dict = {"model": {"model_type": args.model_type, "task": args.task}, "quant": {"kind": args.quant}}
    for section, name, value in args.set or ():
        data.setdefault(section, {})[name] = value
    # Name the flag the user typed: --model-type / --task for those two, --set for the rest.
    try:
        return case_from_json(data, "--set")
    except CliError as exc:
        message = str(exc)
        for flag, field in (("--model-type", "model.model_type"), ("--task", "model.task")):
            if f"--set: {field}=" in message and not any(s[:2] == tuple(field.split(".")) for s in args.set or ()):
                message = message.replace(f"--set: {field}=", f"{flag}=")
        raise CliError(message) from None


def _explained(case: Any, outcome: Any, profile: Any) -> list[str]:
    """Which registry entry explained which divergence (the ``known`` part of the outcome)."""
    if not outcome.known:
        return []
    from conformance.engine.diff import diff, format_table
    from conformance.engine.features import CaseContext
    from conformance.engine.known import default_registry

    registry = default_registry()
    entries = {e.id: e for e in registry.entries}
    found = diff(outcome.reference, outcome.upstream) if outcome.reference and outcome.upstream else []
    ctx = CaseContext(case, outcome.reference, outcome.upstream, profile)
    by_entry: dict[str, list] = {}
    for d, why in registry.explained_by(ctx, found):
        by_entry.setdefault(why, []).append(d)
    lines = ["", "explained by the known-divergence registry (conformance/engine/known_divergences.toml):"]
    for entry_id in [*outcome.known, *(k for k in by_entry if k not in outcome.known)]:
        entry = entries.get(entry_id)
        if entry is not None:  # its one-line summary (the README's table), else the explanation's start
            first = getattr(entry, "summary", "") or entry.explanation.split("\n\n")[0].replace("\n", " ")
            lines.append(f"  {entry_id}: {first[:300]}{'...' if len(first) > 300 else ''} ({entry.link})")
        else:
            lines.append(f"  {entry_id}")
        if by_entry.get(entry_id):
            lines += ["    " + row for row in format_table(by_entry[entry_id]).splitlines()]
        elif entry is not None:
            lines.append("    (explained divergences of the numerical checks, which run after the snapshots)")
    return lines


def _numerics_lines(facts: dict[str, Any] | None) -> list[str]:
    """What the numerical checks found (``conformance.numerics.NumericsResult.to_json``), or why none ran."""
    if not facts:
        return ["numerics: not run (the sides differ structurally, one side raised, or numerics are off)"]
    line = f"numerics: tolerance {facts.get('tolerance')}, worst error {facts.get('max_error_in_tolerances')} of it"
    out = [line + (f"; {facts['note']}" if facts.get("note") else "")]
    out += [f"  a forward raised on both sides (unexplained; fails --conformance-strict): {r}"
            for r in facts.get("both_raised", ())]
    out += [f"  a forward raised on both sides, explained by {k}" for k in facts.get("both_raised_known", ())]
    if facts.get("base_raised"):
        out.append(f"  the loaded model's own forward raises: {facts['base_raised']}")
    return out


def explain(args: argparse.Namespace) -> int:
    from conformance.engine.diff import format_table
    from conformance.engine.runner import run_case
    from reference import select_profile

    if args.case is None:
        if args.model_type is None:
            raise CliError("give --case JSON (or @FILE), or --model-type TYPE (with --set SECTION.FIELD=VALUE)")
        args.case = _case_from_flags(args)
    profile = select_profile(args.profile)
    outcome = run_case(args.case, profile)
    print(f"stack: {stack_line()}")
    print(f"interpreter: {interpreter_line()}")
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
    for line in _numerics_lines(getattr(outcome, "numerics", None)):
        print(line)
    if outcome.divergences:
        print()
        print("unexplained divergences (the outcome is diverge):")
        print(format_table(outcome.divergences, limit=args.limit))
    for line in _explained(args.case, outcome, profile):
        print(line)
    if args.json:
        payload = {
            "outcome": outcome.to_json(),
            "reference": outcome.reference.to_json() if outcome.reference else None,
            "upstream": outcome.upstream.to_json() if outcome.upstream else None,
        }
        try:
            with open(args.json, "w") as fh:
                json.dump(payload, fh, indent=1, default=str)
        except OSError as exc:
            raise CliError(f"--json {args.json!r}: cannot write it ({exc.strerror})") from None
    return 1 if outcome.status == "diverge" else 0


def add_parser(sub: Any, positive: Any) -> None:
    from reference.profiles import PROFILES

    def profile_arg(text: str) -> str:
        if text not in PROFILES:
            raise argparse.ArgumentTypeError(f"{text!r} is not one of {', '.join(PROFILES)}")
        return text

    explain_ = sub.add_parser("explain", help="prepare one case on both sides and print the diff")
    explain_.add_argument("--case", type=_case_arg, default=None, help="the case as JSON, or @FILE")
    explain_.add_argument("--model-type", default=None, help="instead of --case: a zoo model type, e.g. llama")
    explain_.add_argument("--task", default="CAUSAL_LM", help="with --model-type: CAUSAL_LM, SEQ_CLS, SEQ_2_SEQ_LM, TOKEN_CLS")
    explain_.add_argument("--quant", default="none", choices=("none", "8bit", "4bit"), help="with --model-type")
    explain_.add_argument(
        "--set", action="append", type=_set_arg, metavar="SECTION.FIELD=JSON",
        help='with --model-type: any case field, e.g. --set adapter.r=8 --set adapter.target_modules=\'["q_proj"]\'',
    )
    explain_.add_argument("--profile", type=profile_arg, default=None, help="force a reference profile")
    explain_.add_argument("--limit", type=positive, default=60, help="rows of the diff table to print")
    explain_.add_argument("--json", metavar="PATH", help="also write both snapshots and the outcome to PATH")
    explain_.set_defaults(run=explain)
