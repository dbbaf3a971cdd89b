"""Upgrade reports: every observable difference between a recorded corpus and a replay.

``compare(corpus, replayed)`` diffs each case's recorded observation against the new
one and groups the differences by (field, module kind, parameter role):

* a *field* is a snapshot field (``dtype``, ``requires_grad``, ``adapter[default].scaling``,
  ``<model>.gradient_checkpointing``...), or one of the status changes ``<build>.builds``,
  ``<error>.raised`` / ``<error>.kind``, ``<warning>.added`` / ``<warning>.removed``;
* the *level* is the case's preparation level (``peft`` or ``trl``): the same field
  often changes for different reasons at the two levels;
* the *trainer* is, at the trl level, the trl trainer that prepared the case (``sft``, ``dpo``,
  ``reward``...; ``-`` at the peft level): each trainer carries its own copy of the preparation
  code, so a release changes them one by one, and the report groups and counts per trainer;
* the *module kind* is the LoRA layer's base kind (``linear``, ``conv1d``, ``bnb4bit``...)
  of the module the difference is in, or ``-``;
* the *parameter role* says what the parameter is to training: ``base weight``,
  ``lora_A``, ``lora_B``, ``norm``, ``embedding``, ``head``... (:func:`param_role`).

Each group keeps its count, the distinct before/after values, and the smallest case
that shows it, with the command that replays that case.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterable

from conformance.gate.corpus import Corpus, Observation
from conformance.engine.diff import ERROR, MODEL, Divergence, diff
from conformance.engine.snapshot import Snapshot

__all__ = ["Change", "compare", "markdown", "param_role", "report_json"]

NO_KIND = "-"
_ROLES: tuple[tuple[str, str], ...] = (
    # Order matters: the first pattern that matches the parameter's path wins.
    (r"(^|\.)lora_(embedding_)?A(\.|$)", "lora_A"),
    (r"(^|\.)lora_(embedding_)?B(\.|$)", "lora_B"),
    (r"(^|\.)lora_magnitude_vector(\.|$)", "lora magnitude"),
    (r"(^|\.)modules_to_save\.", "saved copy"),
    (r"(^|\.)original_module\.", "saved original"),
    (r"(norm|ln_\w+|layernorm|ln)(\.|$)", "norm"),
    (r"(embed|wte|wpe|word_embeddings|position_embeddings|shared)\w*\.weight$", "embedding"),
    (r"(^|\.)(lm_head|score|classifier|qa_outputs|pre_classifier|head)(\.|$)", "head"),
    (r"base_layer\.weight$", "base weight"),
    (r"base_layer\.bias$", "base bias"),
    (r"\.bias$", "other bias"),
    (r"\.weight$", "other weight"),
)


# A LoRA module's adapter facts repeat its lora_A / lora_B parameters' dtype and shape.
_DUPLICATE_FIELD = re.compile(r"^adapter\[[^\]]*\]\.[ab]_(dtype|shape)$")


def param_role(path: str) -> str:
    """What the parameter at ``path`` is to LoRA training (path heuristics, documented above)."""
    lowered = path.lower()
    for pattern, role in _ROLES:
        if re.search(pattern, path if role.startswith("lora") else lowered):
            return role
    return "other"


@dataclass(frozen=True)
class Change:
    """One observable difference of one case."""

    case_id: str
    level: str
    path: str
    field: str
    module_kind: str
    role: str
    before: Any
    after: Any
    trainer: str = "-"


@dataclass
class _Group:
    count: int = 0
    cases: set[str] = field(default_factory=set)
    values: Counter = field(default_factory=Counter)
    smallest: tuple[Any, ...] | None = None


def _module_kind(path: str, *snapshots: Snapshot | None) -> str:
    """The kind of the LoRA module at ``path`` or containing it (longest prefix)."""
    best, kind = -1, NO_KIND
    for snap in snapshots:
        for module in snap.lora if snap is not None else ():
            if (path == module.path or path.startswith(module.path + ".")) and len(module.path) > best:
                best, kind = len(module.path), module.kind
    return kind


def _role(d: Divergence, kind: str) -> str:
    if d.path in (MODEL, ERROR):
        return "model"
    if d.field.startswith("param.") or d.field in ("shape", "dtype", "requires_grad", "cls", "quant"):
        return param_role(d.path)
    if d.field.startswith("saved.") or d.field == "adapters":
        return "saved module"
    if d.field.startswith("lora.") or d.field.startswith("adapter[") or kind != NO_KIND:
        return "lora module"
    return "other"


def _field(d: Divergence) -> str:
    if d.path in (MODEL, ERROR):
        return f"{d.path}.{d.field}"
    return d.field


def changes_of(case_id: str, before: Observation, after: Observation, level: str = "peft") -> list[Change]:
    """Every difference between two observations of one case (at preparation ``level``)."""
    if before.status == "unbuildable" or after.status == "unbuildable":
        if before.status == after.status:
            return []
        describe = {"unbuildable": "no", "prepared": "yes", "raised": "yes"}
        b = describe[before.status] + (f" ({before.build_error})" if before.build_error else "")
        a = describe[after.status] + (f" ({after.build_error})" if after.build_error else "")
        return [Change(case_id, level, "<build>", "<build>.builds", NO_KIND, "model", b, a)]
    out = []
    for d in diff(before.snapshot, after.snapshot):
        if _DUPLICATE_FIELD.search(d.field):
            continue  # the lora_A / lora_B parameters' own rows carry it
        kind = _module_kind(d.path, before.snapshot, after.snapshot)
        out.append(Change(case_id, level, d.path, _field(d), kind, _role(d, kind), d.reference, d.upstream))
    b_err, a_err = before.snapshot.error, after.snapshot.error
    if b_err is not None and a_err is not None and b_err.kind == a_err.kind == "other" and b_err.message != a_err.message:
        out.append(Change(case_id, level, ERROR, "<error>.message", NO_KIND, "model", b_err.message[:200], a_err.message[:200]))
    for message in sorted(set(after.warnings) - set(before.warnings)):
        out.append(Change(case_id, level, "<warning>", "<warning>.added", NO_KIND, "model", None, message))
    for message in sorted(set(before.warnings) - set(after.warnings)):
        out.append(Change(case_id, level, "<warning>", "<warning>.removed", NO_KIND, "model", message, None))
    return out


def trainer_of(case: Any) -> str:
    """The trl trainer of a case (``-`` at the peft level)."""
    return case.training.trainer_name if case.training.level == "trl" else "-"


def compare(corpus: Corpus, replayed: dict[str, Observation]) -> list[Change]:
    """All changes between ``corpus``'s observations and ``replayed`` (same ids)."""
    import dataclasses

    out: list[Change] = []
    for case_id in sorted(corpus.cases):
        case = corpus.cases[case_id]
        trainer = trainer_of(case)
        out.extend(dataclasses.replace(c, trainer=trainer) for c in
                   changes_of(case_id, corpus.observations[case_id], replayed[case_id], case.training.level))
    return out


def _by_trainer(corpus: Corpus, changes: list[Change]) -> dict[str, dict[str, int]]:
    """Per trainer (trl level; ``-`` for the peft level): the corpus's cases and how many changed."""
    changed = {c.case_id for c in changes}
    out: dict[str, dict[str, int]] = {}
    for case_id, case in corpus.cases.items():
        row = out.setdefault(trainer_of(case), {"cases": 0, "changed": 0})
        row["cases"] += 1
        row["changed"] += case_id in changed
    return dict(sorted(out.items()))


def _plain(value: Any) -> Any:
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return repr(value)


def _case_size(corpus: Corpus, case_id: str) -> tuple[int, int, str]:
    """Smaller is simpler: fewer given fields, then shorter JSON, then the id."""
    text = corpus.cases[case_id].dumps()
    return (text.count(":"), len(text), case_id)


def _statuses(observations: Iterable[Observation]) -> dict[str, int]:
    return dict(sorted(Counter(o.status for o in observations).items()))


def report_json(corpus: Corpus, replayed: dict[str, Observation], to_stack: dict[str, str],
                corpus_path: str, max_values: int = 5) -> dict[str, Any]:
    """The upgrade report: stacks, totals and the grouped changes (largest groups first)."""
    changes = compare(corpus, replayed)
    groups: dict[tuple[str, str, str, str, str], _Group] = {}
    for c in changes:
        g = groups.setdefault((c.level, c.trainer, c.field, c.module_kind, c.role), _Group())
        g.count += 1
        g.cases.add(c.case_id)
        g.values[(repr(c.before), repr(c.after))] += 1
        size = _case_size(corpus, c.case_id)
        if g.smallest is None or size < g.smallest[0]:
            g.smallest = (size, c)
    from_stack = corpus.stack
    rows = []
    for (level, trainer, field_name, kind, role), g in sorted(groups.items(), key=lambda kv: (-len(kv[1].cases), kv[0])):
        c: Change = g.smallest[1]
        values = [{"before": b, "after": a, "count": n} for (b, a), n in g.values.most_common(max_values)]
        rows.append({
            "level": level,
            "trainer": trainer,
            "field": field_name,
            "module_kind": kind,
            "role": role,
            "count": g.count,
            "cases": len(g.cases),
            "case_ids": sorted(g.cases),
            "values": values,
            "more_values": max(0, len(g.values) - max_values),
            "smallest": {
                "id": c.case_id,
                "path": c.path,
                "before": _plain(c.before),
                "after": _plain(c.after),
                "case": corpus.cases[c.case_id].to_json(),
                "replay": f"python -m conformance compare {corpus_path} --case {c.case_id}",
            },
        })
    changed = {c.case_id for c in changes}
    return {
        "format": "lora-conformance-upgrade-report",
        "version": 1,
        "from_stack": from_stack,
        "to_stack": to_stack,
        "stack_changes": {k: [from_stack.get(k), to_stack.get(k)]
                          for k in sorted(from_stack.keys() | to_stack.keys()) if from_stack.get(k) != to_stack.get(k)},
        "corpus": {"path": corpus_path, **corpus.manifest.get("generator", {})},
        "totals": {
            "cases": len(corpus.cases),
            "changed": len(changed),
            "unchanged": len(corpus.cases) - len(changed),
            "changes": len(changes),
            "groups": len(rows),
            "before": _statuses(corpus.observations.values()),
            "after": _statuses(replayed.values()),
        },
        "by_trainer": _by_trainer(corpus, changes),
        "changes": rows,
    }


def _cell(value: Any, width: int = 70) -> str:
    text = str(value).replace("|", "\\|").replace("\n", " ")
    return text if len(text) <= width else text[: width - 1] + "…"


def _code(value: Any, width: int = 50) -> str:
    """``value`` as a markdown code span that survives a table cell: a value holding backticks (a
    warning quoting `tie_word_embeddings`) gets a longer fence, since a backslash cannot escape
    a backtick inside a code span; ``|`` is escaped, which GitHub tables allow inside spans."""
    text = _cell(value, width)
    if "`" not in text:
        return f"`{text}`"
    fence = "`" * (max(len(run) for run in re.findall(r"`+", text)) + 1)
    return f"{fence} {text} {fence}"


STATUS_FIELDS = ("<build>.", "<error>.")
"""Fields of a status change (a case that no longer builds, raises now, no longer raises, raises
something else): listed first, whatever the size of the dtype groups."""

ROLE_NOTES = {
    "base weight": "the frozen weight inside a LoRA layer",
    "base bias": "the bias inside a LoRA layer",
    "saved copy": "the trainable copy of a `modules_to_save` module",
    "saved original": "the frozen original kept beside that copy",
    "other weight": "a weight of a module LoRA did not wrap and no other role names (an untargeted linear, say)",
    "other bias": "a bias of such a module",
    "other": "a parameter path none of the role patterns matches",
    "model": "a fact of the whole model or of the preparation's outcome (counts, checkpointing, error, warnings)",
    "lora module": "a fact of a LoRA layer (its r, alpha, scaling, features...)",
    "saved module": "a fact of a `modules_to_save` wrapper",
}


def markdown(report: dict[str, Any], max_rows: int = 30) -> str:
    """A short markdown rendering of ``report``, sized for a pull-request comment: one table, status
    changes first, then the largest groups, with footnotes for what a row cannot say."""
    t = report["totals"]
    lines = ["## LoRA preparation: upgrade report", ""]
    if report["stack_changes"]:
        lines += ["| package | before | after |", "| --- | --- | --- |"]
        lines += [f"| {k} | {_cell(b)} | {_cell(a)} |" for k, (b, a) in report["stack_changes"].items()]
    else:
        lines.append("Same stack on both sides.")
    lines += [
        "",
        f"**{t['changed']} of {t['cases']} cases changed** ({t['changes']} differences in {t['groups']} groups). "
        f"Before: {_counts(t['before'])}; after: {_counts(t['after'])}.",
        "",
    ]
    if not report["changes"]:
        lines.append("No observable change in how these cases are prepared.")
        return "\n".join(lines) + "\n"
    trainers = {k: v for k, v in report.get("by_trainer", {}).items() if k != "-"}
    if len(trainers) > 1 or set(trainers) - {"sft"}:
        lines += ["Per trl trainer (each carries its own copy of the preparation code):", "",
                  "| trainer | cases | changed |", "| --- | ---: | ---: |"]
        lines += [f"| {k} | {v['cases']} | {v['changed']} |" for k, v in trainers.items()]
        lines.append("")
    # status changes first, then by trainer, each trainer's largest groups first (stable: sizes kept)
    rows = sorted(report["changes"], key=lambda r: (not r["field"].startswith(STATUS_FIELDS), r.get("trainer", "-")))
    lines += ["| level | trainer | field | module kind | role | model type | cases | before → after (most common) | "
              "smallest case |",
              "| --- | --- | --- | --- | --- | --- | ---: | --- | --- |"]
    any_more = False
    for row in rows[:max_rows]:
        top = row["values"][0]
        more = len(row["values"]) - 1 + row["more_values"]
        any_more = any_more or bool(more)
        change = f"{_code(top['before'])} → {_code(top['after'])}" + (f" (+{more} more)" if more else "")
        model_type = ((row["smallest"].get("case") or {}).get("model") or {}).get("model_type", "?")
        lines.append(f"| {row['level']} | {row.get('trainer', '-')} | {_code(row['field'], 70)} | {row['module_kind']} | "
                     f"{row['role']} | {model_type} | "
                     f"{row['cases']} | {change} | `{row['smallest']['id']}` |")
    if len(rows) > max_rows:
        lines.append(f"\n… and {len(rows) - max_rows} smaller groups in the JSON report.")
    first = rows[0]["smallest"]
    lines += ["", f"Replay a case: `{first['replay']}`", ""]
    notes = ["*model type*: that of the smallest case; the group's other cases are listed in the JSON report "
             "(`case_ids`)."]
    if any_more:
        notes.append("*(+N more)*: the group holds N more distinct before → after pairs; the JSON report lists the "
                     "most common (`values`) and counts the rest (`more_values`).")
    roles = [r for r in dict.fromkeys(row["role"] for row in rows[:max_rows]) if r in ROLE_NOTES]
    if roles:
        notes.append("*role* (read from the parameter's path): "
                     + "; ".join(f"{role}: {ROLE_NOTES[role]}" for role in roles) + ".")
    lines += [f"- {note}" for note in notes]
    return "\n".join(lines) + "\n"


def _counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{n} {status}" for status, n in counts.items()) or "none"
