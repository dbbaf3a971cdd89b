"""Versioned corpora of recorded upstream preparations (the regression gate's input).

A corpus is a directory:

* ``corpus.json``: the manifest: format name and version, the stack it was recorded
  under, how the cases were generated, the coverage they achieve (``coverage``: per
  group of factors, the combinations required, covered, infeasible and the first few
  missing; see :func:`design_corpus`), and a SHA-256 and line count per data file;
* ``cases.jsonl``: one ``{"id", "case"}`` object a line;
* ``observations.jsonl``: one ``{"id", "status", "snapshot", "warnings", "build_error"}``
  object a line: what upstream did with the case in the recording stack.

``status`` is ``prepared`` (a snapshot), ``raised`` (an error snapshot) or ``unbuildable``
(the model or its checkpoint could not be built: the stack's transformers lacks the
type, say). ``warnings`` holds peft's and trl's own warning and log messages verbatim.

Everything read back is validated; a corrupt, truncated or foreign corpus raises
:class:`CorpusError` with a one-line message, never a traceback.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

from conformance.engine.snapshot import Snapshot
from conformance.gate.generate import (
    INVALID_SHARE, MIN_INVALID_SHARE, Generated, coverage_line, design_corpus, prepared_coverage,
)
from reference.spec import Case

__all__ = [
    "FORMAT",
    "INVALID_SHARE",
    "MIN_INVALID_SHARE",
    "VERSION",
    "Corpus",
    "CorpusError",
    "Observation",
    "Generated",
    "design_corpus",
    "generate_cases",
    "coverage_line",
    "load_corpus",
    "prepared_coverage",
    "observe",
    "record",
    "stack_versions",
]

FORMAT = "lora-conformance-corpus"
VERSION = 1
MANIFEST = "corpus.json"
CASES = "cases.jsonl"
OBSERVATIONS = "observations.jsonl"
STATUSES = ("prepared", "raised", "unbuildable")
QUANT_KINDS = ("none", "8bit", "4bit")


class CorpusError(Exception):
    """A corpus that cannot be read: missing, corrupt, foreign or from a newer harness."""


@dataclass(frozen=True)
class Observation:
    """What upstream did with one case in one stack."""

    status: str
    snapshot: Snapshot | None = None
    warnings: tuple[str, ...] = ()
    build_error: str = ""

    def to_json(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "snapshot": self.snapshot.to_json() if self.snapshot is not None else None,
            "warnings": list(self.warnings),
            "build_error": self.build_error,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "Observation":
        status = data["status"]
        if status not in STATUSES:
            raise ValueError(f"status {status!r} is not one of {', '.join(STATUSES)}")
        snap = data.get("snapshot")
        warnings = data.get("warnings", [])
        if not isinstance(warnings, list) or not all(isinstance(w, str) for w in warnings):
            raise ValueError("warnings must be a list of strings")
        if (snap is None) != (status == "unbuildable"):
            raise ValueError(f"a {status} observation {'needs' if snap is None else 'has no'} snapshot")
        return cls(status, Snapshot.from_json(snap) if snap is not None else None, tuple(warnings),
                   str(data.get("build_error", "")))


@dataclass
class Corpus:
    """A corpus read back from disk (or about to be written)."""

    manifest: dict[str, Any]
    cases: dict[str, Case] = field(default_factory=dict)
    observations: dict[str, Observation] = field(default_factory=dict)

    @property
    def stack(self) -> dict[str, str]:
        return dict(self.manifest.get("stack", {}))


def stack_versions() -> dict[str, str]:
    """The installed stack, as recorded in a corpus and printed in a report; a package
    installed from a path or VCS URL (a fork) carries its source after the version."""
    from importlib import metadata

    from reference.profiles import installed_versions

    out = {"python": platform.python_version()}
    for name, version in installed_versions().items():
        out[name] = version + _install_source(metadata, name)
    return out


def _install_source(metadata: Any, name: str) -> str:
    try:
        text = metadata.distribution(name).read_text("direct_url.json")
    except Exception:  # noqa: BLE001 - absent package or metadata: an index install
        return ""
    if not text:
        return ""
    try:
        url = json.loads(text).get("url", "")
    except ValueError:
        return ""
    return f" ({url})" if url else ""


def generate_cases(count: int, seed: int, levels: Iterable[str]) -> list[tuple[str, Case]]:
    """The cases of :func:`design_corpus` (ids name the stratum: ``peft-4bit-0007``)."""
    return design_corpus(count, seed, levels).cases


def observe(case: Case) -> Observation:
    """Prepare ``case`` with upstream in this environment."""
    from conformance.engine.runner import _upstream_side

    raw: list[str] = []
    try:
        snap = _upstream_side(case, raw)
    except Exception as exc:  # noqa: BLE001 - a model the stack cannot build is an observation
        return Observation("unbuildable", build_error=f"{type(exc).__name__}: {str(exc)[:300]}")
    return Observation("raised" if snap.error is not None else "prepared", snap, tuple(raw))


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _write_jsonl(path: Path, rows: Iterable[dict[str, Any]]) -> int:
    n = 0
    with path.open("w") as fh:
        for row in rows:
            fh.write(json.dumps(row, sort_keys=True, default=str) + "\n")
            n += 1
    return n


def record(
    directory: Path,
    count: int,
    seed: int,
    levels: Iterable[str],
    progress: Callable[[str], None] | None = None,
    strict: bool = False,
) -> Corpus:
    """Generate a corpus of ``count`` cases, prepare each with upstream, write it to ``directory``.

    ``strict``: refuse (before preparing anything) a corpus whose coverage is incomplete."""
    import hypothesis

    levels = tuple(levels)
    directory.mkdir(parents=True, exist_ok=True)
    if any(directory.iterdir()):
        raise CorpusError(f"{directory}: not empty; record into a new directory")
    generated = design_corpus(count, seed, levels)
    if progress is not None:
        progress(coverage_line(generated))
    if strict and not generated.complete:
        raise CorpusError(f"--strict: {coverage_line(generated)}")
    cases = generated.cases
    observations: dict[str, Observation] = {}
    for n, (case_id, case) in enumerate(cases, 1):
        observations[case_id] = observe(case)
        if progress is not None and (n % 25 == 0 or n == len(cases)):
            progress(f"recorded {n}/{len(cases)} cases")
    coverage = generated.to_json()
    prepared = {i for i, o in observations.items() if o.status == "prepared"}
    for name, shown in prepared_coverage(cases, prepared, levels).items():
        coverage["groups"][name].update(shown)
    if progress is not None:
        masked = sum(g.get("masked", 0) for g in coverage["groups"].values())
        progress(f"{masked} required combinations are held only by cases this stack did not prepare "
                 "(corpus.json: coverage.groups.*.masked)" if masked else
                 "every covered combination is held by a case this stack prepared")
    files = {
        CASES: _write_jsonl(directory / CASES, ({"id": i, "case": c.to_json()} for i, c in cases)),
        OBSERVATIONS: _write_jsonl(
            directory / OBSERVATIONS, ({"id": i, **o.to_json()} for i, o in observations.items())
        ),
    }
    manifest = {
        "format": FORMAT,
        "version": VERSION,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "stack": stack_versions(),
        "generator": {
            "cases": count,
            "seed": seed,
            "levels": list(levels),
            "hypothesis": hypothesis.__version__,
            "command": " ".join(["python -m conformance record", str(directory), f"--cases {count}",
                                 f"--seed {seed}", f"--level {'all' if len(levels) > 1 else levels[0]}"]),
        },
        "files": {name: {"sha256": _sha256(directory / name), "lines": lines} for name, lines in files.items()},
        "coverage": coverage,
    }
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    return Corpus(manifest, dict(cases), observations)


def _read_manifest(directory: Path) -> dict[str, Any]:
    if not directory.is_dir():
        raise CorpusError(f"{directory}: no such corpus directory")
    path = directory / MANIFEST
    if not path.is_file():
        raise CorpusError(f"{directory}: not a corpus (no {MANIFEST}); record one with `python -m conformance record`")
    try:
        manifest = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise CorpusError(f"{path}: corrupt manifest ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise CorpusError(f"{path}: a foreign file (format {found!r}, expected {FORMAT!r})")
    version = manifest.get("version")
    if not isinstance(version, int) or version < 1:
        raise CorpusError(f"{path}: bad format version {version!r}")
    if version > VERSION:
        raise CorpusError(f"{path}: format version {version} is newer than this harness reads ({VERSION}); upgrade it")
    files = manifest.get("files")
    if not isinstance(files, dict) or set(files) != {CASES, OBSERVATIONS}:
        raise CorpusError(f"{path}: the manifest must list exactly {CASES} and {OBSERVATIONS}")
    return manifest


def _read_jsonl(directory: Path, name: str, expected: dict[str, Any]) -> list[dict[str, Any]]:
    path = directory / name
    if not path.is_file():
        raise CorpusError(f"{path}: missing")
    if _sha256(path) != expected.get("sha256"):
        raise CorpusError(f"{path}: corrupt (its SHA-256 does not match the manifest's)")
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        try:
            row = json.loads(line)
        except ValueError as exc:
            raise CorpusError(f"{path}:{n}: not JSON ({exc})") from None
        if not isinstance(row, dict) or not isinstance(row.get("id"), str):
            raise CorpusError(f"{path}:{n}: expected an object with a string id")
        rows.append(row)
    if len(rows) != expected.get("lines"):
        raise CorpusError(f"{path}: {len(rows)} lines, the manifest says {expected.get('lines')}")
    return rows


def load_corpus(directory: Path) -> Corpus:
    """Read and validate the corpus in ``directory``."""
    directory = Path(directory)
    manifest = _read_manifest(directory)
    corpus = Corpus(manifest)
    for row in _read_jsonl(directory, CASES, manifest["files"][CASES]):
        if row["id"] in corpus.cases:
            raise CorpusError(f"{directory / CASES}: duplicate id {row['id']!r}")
        try:
            corpus.cases[row["id"]] = Case.from_json(row["case"])
        except (KeyError, TypeError, ValueError) as exc:
            raise CorpusError(f"{directory / CASES}: case {row['id']!r} is not a valid case ({exc})") from None
    for row in _read_jsonl(directory, OBSERVATIONS, manifest["files"][OBSERVATIONS]):
        if row["id"] not in corpus.cases:
            raise CorpusError(f"{directory / OBSERVATIONS}: observation {row['id']!r} has no case")
        try:
            corpus.observations[row["id"]] = Observation.from_json(row)
        except (KeyError, TypeError, ValueError) as exc:
            raise CorpusError(f"{directory / OBSERVATIONS}: observation {row['id']!r} is invalid ({exc})") from None
    if missing := sorted(corpus.cases.keys() - corpus.observations.keys()):
        raise CorpusError(f"{directory / OBSERVATIONS}: no observation for {len(missing)} cases, e.g. {missing[0]!r}")
    return corpus
