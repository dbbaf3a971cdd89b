"""The known-divergence registry: upstream behaviour the reference deliberately does not copy.

Entries live in one file, ``known_divergences.toml`` beside this module.  Each names a
version range, the case features that cause the behaviour (``when``: case fields and
``feature.*`` of ``conformance.engine.features``), and the divergences it explains:
``match`` rows of full-match regexes on the path, the field and (optionally) the two
values.  Path and field regexes may hold ``{set_feature}`` placeholders, which expand to
exactly the module paths the feature computes, so an entry excuses the modules its
cause reaches and nothing else.

Parameter counts (``trainable_params``, ``total_params``) are never matched by an entry:
a count divergence is explained only when it equals what the explained parameter
divergences add up to, so a count cannot hide a parameter no entry explains.

A case whose every divergence is explained is ``known``.  An entry active for the
installed versions is *in scope* of a case when its ``when`` holds; the runner records
the scopes, and an entry with cases in scope that explained nothing in a run is stale.
"""

from __future__ import annotations

import math
import re
import tomllib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Mapping

from packaging.specifiers import SpecifierSet
from packaging.version import Version

from conformance.engine.diff import MODEL, Divergence
from conformance.engine.features import CASE_ONLY, FEATURES, SET_FEATURES, CaseContext
from conformance.engine.snapshot import Snapshot
from reference.profiles import installed_versions
from reference.spec import Case

__all__ = ["COUNTS_EXPLAINED", "COUNT_FIELDS", "Entry", "Match", "Registry", "default_registry", "load_registry"]

REGISTRY_PATH = Path(__file__).with_name("known_divergences.toml")
COUNT_FIELDS = ("trainable_params", "total_params")
"""Derived fields: explained by consistency with the explained parameter divergences, never by an entry."""
COUNTS_EXPLAINED = "(parameter counts: the sum of the explained parameter divergences)"
"""What :meth:`Registry.explained_by` names as the explanation of a count divergence."""


@dataclass(frozen=True)
class Match:
    """One divergence shape an entry explains: full-match regexes; values match ``str()``, None is anything."""

    path: str
    field: str
    reference: str | None = None
    upstream: str | None = None

    def explains(self, d: Divergence, ctx: CaseContext) -> bool:
        return bool(
            re.fullmatch(ctx.expand(self.path), d.path)
            and re.fullmatch(ctx.expand(self.field), d.field)
            and (self.reference is None or re.fullmatch(self.reference, str(d.reference)))
            and (self.upstream is None or re.fullmatch(self.upstream, str(d.upstream)))
        )


@dataclass(frozen=True)
class Entry:
    """One known upstream divergence."""

    id: str
    explanation: str
    link: str
    versions: tuple[tuple[str, str], ...]
    """(package, PEP 440 specifier) pairs that must all hold."""
    when: tuple[tuple[str, tuple[Any, ...]], ...]
    """(case field or ``feature.<name>``, allowed values) pairs, case fields first."""
    matches: tuple[Match, ...]
    summary: str = ""
    """One line for the README's table."""

    def applies_to(self, versions: Mapping[str, str]) -> bool:
        for package, spec in self.versions:
            version = versions.get(package, "absent")
            if version == "absent" or Version(version.split("+")[0]) not in SpecifierSet(spec):
                return False
        return True

    def holds_for(self, case: Case | CaseContext) -> bool:
        ctx = case if isinstance(case, CaseContext) else CaseContext(case)
        return all(ctx.value(key) in allowed for key, allowed in self.when)

    def explains(self, d: Divergence, ctx: CaseContext | None = None) -> bool:
        return any(m.explains(d, ctx or _NO_CONTEXT) for m in self.matches)


class _NoContext(CaseContext):
    """For matching without a case: placeholders expand to nothing."""

    def __init__(self) -> None:  # noqa: D107 - nothing to compute
        self._cache = {}

    def paths(self, name: str) -> frozenset[str]:
        return frozenset()


_NO_CONTEXT = _NoContext()


def _numels(snap: Snapshot | None) -> dict[str, tuple[int, bool]]:
    return {p.path: (math.prod(p.shape), p.requires_grad) for p in snap.params} if snap is not None else {}


def _count_delta(explained: list[Divergence], reference: Snapshot | None, upstream: Snapshot | None) -> tuple[int, int]:
    """(trainable, total) parameter counts that the explained parameter divergences account for, upstream minus reference."""
    ref, up = _numels(reference), _numels(upstream)
    trainable = total = 0
    for d in explained:
        r, u = ref.get(d.path), up.get(d.path)
        if d.field == "param.present":
            if u is not None and r is None:
                total, trainable = total + u[0], trainable + u[0] * u[1]
            elif r is not None and u is None:
                total, trainable = total - r[0], trainable - r[0] * r[1]
        elif d.field == "requires_grad" and r is not None and u is not None:
            trainable += u[0] * u[1] - r[0] * r[1]
        elif d.field == "shape" and r is not None and u is not None:
            total, trainable = total + u[0] - r[0], trainable + u[0] * u[1] - r[0] * r[1]
    return trainable, total


class Registry:
    """The entries that apply to one installed stack."""

    def __init__(self, entries: list[Entry], versions: Mapping[str, str]) -> None:
        self.entries = entries
        self.active = [e for e in entries if e.applies_to(versions)]

    def scope(self, ctx: CaseContext) -> list[str]:
        """Ids of the active entries whose ``when`` holds for the case."""
        return [e.id for e in self.active if e.holds_for(ctx)]

    def explain(self, case: Case | CaseContext, found: list[Divergence], *, reference: Snapshot | None = None,
                upstream: Snapshot | None = None) -> tuple[list[Divergence], list[str]]:
        """Split ``found`` into (unexplained divergences, ids of the entries that explained some)."""
        ctx = case if isinstance(case, CaseContext) else CaseContext(case, reference, upstream)
        candidates = [e for e in self.active if e.holds_for(ctx)]
        unexplained, used, explained_by = [], [], {}
        counts = [d for d in found if d.path == MODEL and d.field in COUNT_FIELDS]
        for d in found:
            if d in counts:
                continue
            entry = next((e for e in candidates if e.explains(d, ctx)), None)
            if entry is None:
                unexplained.append(d)
                continue
            explained_by[d] = entry.id
            if entry.id not in used:
                used.append(entry.id)
        if counts:
            trainable, total = _count_delta(list(explained_by), ctx.reference or reference, ctx.upstream or upstream)
            expected = {"trainable_params": trainable, "total_params": total}
            for d in counts:
                delta = int(d.upstream) - int(d.reference)
                if not explained_by or delta != expected[d.field]:
                    unexplained.append(d)
        return unexplained, used

    def explained_by(self, case: Case | CaseContext, found: list[Divergence], *, reference: Snapshot | None = None,
                     upstream: Snapshot | None = None) -> list[tuple[Divergence, str]]:
        """The divergences of ``found`` that :meth:`explain` explains, each with what explained it:
        the id of the entry (the first whose ``when`` holds and whose match rows take it, as in
        :meth:`explain`), or :data:`COUNTS_EXPLAINED` for a parameter count that equals what the
        explained parameter divergences add up to.  For ``explain --case`` to show which entry
        excused what."""
        ctx = case if isinstance(case, CaseContext) else CaseContext(case, reference, upstream)
        unexplained, _ = self.explain(ctx, found, reference=reference, upstream=upstream)
        candidates = [e for e in self.active if e.holds_for(ctx)]
        out = []
        for d in found:
            if d in unexplained:
                continue
            if d.path == MODEL and d.field in COUNT_FIELDS:
                out.append((d, COUNTS_EXPLAINED))
            else:
                out.append((d, next(e.id for e in candidates if e.explains(d, ctx))))
        return out

    def stale(self, hit_ids: set[str]) -> list[Entry]:
        """Active entries that explained nothing in a run."""
        return [e for e in self.active if e.id not in hit_ids]


def _norm(value: Any) -> Any:
    return tuple(_norm(v) for v in value) if isinstance(value, (list, tuple)) else value


def _check_names(entry_id: str, patterns: list[str], source: Path) -> None:
    for pattern in patterns:
        for name in re.findall(r"\{(\w+)\}", pattern):
            if name not in SET_FEATURES:
                raise ValueError(f"{source}: entry {entry_id!r} names an unknown set feature {{{name}}}; "
                                 f"known: {', '.join(sorted(SET_FEATURES))}")


def _entry(raw: dict[str, Any], source: Path) -> Entry:
    missing = {"id", "explanation", "link", "match"} - raw.keys()
    if missing:
        raise ValueError(f"{source}: entry {raw.get('id', '?')!r} lacks {sorted(missing)}")
    matches = []
    for m in raw["match"]:
        unknown = set(m) - {"path", "field", "reference", "upstream"}
        if unknown or "path" not in m or "field" not in m:
            raise ValueError(f"{source}: entry {raw['id']!r}: a match row needs path and field "
                             f"(and optionally reference, upstream); got {sorted(m)}")
        if re.fullmatch(m["field"], "trainable_params") or re.fullmatch(m["field"], "total_params"):
            raise ValueError(f"{source}: entry {raw['id']!r} matches a parameter count; counts are explained "
                             "by the parameter divergences they add up to, never directly")
        _check_names(raw["id"], [m["path"], m["field"]], source)
        matches.append(Match(m["path"], m["field"], m.get("reference"), m.get("upstream")))
    when = []
    for key, value in raw.get("when", {}).items():
        if key.startswith("feature.") and key.removeprefix("feature.") not in FEATURES:
            raise ValueError(f"{source}: entry {raw['id']!r} names an unknown feature {key!r}; "
                             f"known: {', '.join(sorted(FEATURES))}")
        when.append((key, tuple(_norm(v) for v in (value if isinstance(value, list) else [value]))))
    # cheap case fields first, then features of the case alone, then those that load the model
    when.sort(key=lambda kv: (kv[0].startswith("feature."), kv[0].removeprefix("feature.") not in CASE_ONLY, kv[0]))
    return Entry(
        id=raw["id"],
        explanation=raw["explanation"].strip(),
        link=raw["link"],
        summary=raw.get("summary", ""),
        versions=tuple(sorted(raw.get("versions", {}).items())),
        when=tuple(when),
        matches=tuple(matches),
    )


def load_registry(path: Path = REGISTRY_PATH, versions: Mapping[str, str] | None = None) -> Registry:
    """Parse and validate a registry file."""
    with open(path, "rb") as fh:
        data = tomllib.load(fh)
    entries = [_entry(raw, path) for raw in data.get("divergence", [])]
    ids = [e.id for e in entries]
    if len(ids) != len(set(ids)):
        raise ValueError(f"{path}: duplicate ids in {ids}")
    return Registry(entries, versions if versions is not None else installed_versions())


@lru_cache(maxsize=1)
def default_registry() -> Registry:
    return load_registry()


def markdown_table(registry: Registry) -> str:
    """The README's table of every entry: id, the versions it applies to, and its one-line
    summary.  Regenerate with ``python -m conformance.engine.known``."""
    rows = ["| id | applies to | what |", "| --- | --- | --- |"]
    for e in registry.entries:
        versions = ", ".join(f"{package} {spec}" for package, spec in e.versions) or "all"
        rows.append(f"| `{e.id}` | {versions} | {e.summary.replace('|', '/')} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(markdown_table(load_registry(versions={})))
