"""The known-divergence registry: upstream behaviour the reference deliberately does not copy.

Entries live in one file, ``known_divergences.toml`` beside this module.  Each
names a version range, a predicate on the case, and the divergence it explains
(path and field as full-match regexes, optionally the exact values).  A case
whose every divergence is explained is reported as ``known``; an entry that
applies to the installed versions but explained nothing in a run is *stale* and
is reported too.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Mapping

from packaging.specifiers import SpecifierSet
from packaging.version import Version

from conformance.engine.diff import Divergence
from reference.profiles import installed_versions
from reference.spec import Case

__all__ = ["Entry", "Registry", "default_registry", "load_registry"]

REGISTRY_PATH = Path(__file__).with_name("known_divergences.toml")
_MISSING = object()


@dataclass(frozen=True)
class Entry:
    """One known upstream divergence."""

    id: str
    explanation: str
    link: str
    versions: tuple[tuple[str, str], ...]
    """(package, PEP 440 specifier) pairs that must all hold."""
    when: tuple[tuple[str, tuple[Any, ...]], ...]
    """(dotted case field, allowed values) pairs, e.g. ``("quant.kind", ("4bit",))``.

    A field left out of the case reads as ``"<absent>"``, a JSON null as ``"<none>"``."""
    matches: tuple[tuple[str, str, Any, Any], ...]
    """(path, field, reference value, upstream value) full-match regexes; the values
    are matched against ``str()`` and may be ``_MISSING`` (anything).  A divergence
    matching any one of them is explained."""

    def applies_to(self, versions: Mapping[str, str]) -> bool:
        for package, spec in self.versions:
            version = versions.get(package, "absent")
            if version == "absent" or Version(version.split("+")[0]) not in SpecifierSet(spec):
                return False
        return True

    def holds_for(self, case: Case) -> bool:
        data = case.to_json()
        for dotted, allowed in self.when:
            value: Any = data
            for part in dotted.split("."):
                value = value.get(part, _MISSING) if isinstance(value, dict) else _MISSING
            if value is _MISSING:
                value = "<absent>"
            elif value is None:
                value = "<none>"
            if (value if not isinstance(value, list) else tuple(value)) not in allowed:
                return False
        return True

    def explains(self, d: Divergence) -> bool:
        return any(
            re.fullmatch(path, d.path)
            and re.fullmatch(field, d.field)
            and (ref is _MISSING or re.fullmatch(ref, str(d.reference)))
            and (up is _MISSING or re.fullmatch(up, str(d.upstream)))
            for path, field, ref, up in self.matches
        )


def _norm(value: Any) -> Any:
    return tuple(_norm(v) for v in value) if isinstance(value, (list, tuple)) else value


class Registry:
    """The entries that apply to one installed stack."""

    def __init__(self, entries: list[Entry], versions: Mapping[str, str]) -> None:
        self.entries = entries
        self.active = [e for e in entries if e.applies_to(versions)]

    def explain(self, case: Case, found: list[Divergence]) -> tuple[list[Divergence], list[str]]:
        """Split ``found`` into (unexplained divergences, ids of entries that explained some)."""
        candidates = [e for e in self.active if e.holds_for(case)]
        unexplained, used = [], []
        for d in found:
            entry = next((e for e in candidates if e.explains(d)), None)
            if entry is None:
                unexplained.append(d)
            elif entry.id not in used:
                used.append(entry.id)
        return unexplained, used

    def stale(self, hit_ids: set[str]) -> list[Entry]:
        """Active entries that explained nothing in a run."""
        return [e for e in self.active if e.id not in hit_ids]


def _entry(raw: dict[str, Any], source: Path) -> Entry:
    missing = {"id", "explanation", "link"} - raw.keys()
    pairs = [
        (m.get("path", ".*"), m.get("field", ".*"), m.get("reference", _MISSING), m.get("upstream", _MISSING))
        for m in raw.get("match", [])
    ]
    if "path" in raw or "field" in raw:
        pairs.append(
            (raw.get("path", ".*"), raw.get("field", ".*"), raw.get("reference", _MISSING), raw.get("upstream", _MISSING))
        )
    if not pairs:
        missing.add("path/field or match")
    if missing:
        raise ValueError(f"{source}: entry {raw.get('id', '?')!r} lacks {sorted(missing)}")
    when = tuple(
        (key, tuple(_norm(v) for v in (value if isinstance(value, list) else [value])))
        for key, value in sorted(raw.get("when", {}).items())
    )
    return Entry(
        id=raw["id"],
        explanation=raw["explanation"].strip(),
        link=raw["link"],
        versions=tuple(sorted(raw.get("versions", {}).items())),
        when=when,
        matches=tuple(pairs),
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
