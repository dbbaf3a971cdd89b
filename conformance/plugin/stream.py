"""Crash-safe example streams: each xdist worker appends its finished examples to a JSONL file.

A worker that dies (a segfault in a native kernel, the OOM killer) cannot hand
its examples to the controller at session end, so every worker also writes
them, one line each and flushed, to ``<run dir>/<worker id>-<pid>.jsonl`` as
they finish.  The controller chooses the run directory, passes it to the
workers through ``workerinput``, and at the end reads every file, whether its
worker finished or not.

Lines are ``{"test": id, "entry": {...}}``.  A failing example that Hypothesis
is about to shrink is written as ``"provisional": true``; the minimal example
that ends the shrink is written with ``"final": true`` and replaces it.  A
provisional line without its final one (the worker died while shrinking)
still counts, as it would in-process (``Recorder.flush``).  A torn last line
(the worker died mid-write) is ignored.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable, TextIO

__all__ = ["ExampleStream", "read_stream", "read_streams", "stream_files"]


class ExampleStream:
    """An append-only JSONL file of one worker's examples."""

    def __init__(self, directory: Path, worker: str) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.path = directory / f"{worker}-{os.getpid()}.jsonl"
        self._fh: TextIO | None = open(self.path, "a", encoding="utf-8")

    def write(self, test_id: str, entry: dict[str, Any], *, provisional: bool = False, final: bool = False) -> None:
        if self._fh is None:
            return
        line: dict[str, Any] = {"test": test_id, "entry": entry}
        if provisional:
            line["provisional"] = True
        if final:
            line["final"] = True
        self._fh.write(json.dumps(line, default=str) + "\n")
        self._fh.flush()  # the line reaches the OS now: a killed process does not lose it

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None


def stream_files(directory: Path) -> list[Path]:
    return sorted(Path(directory).glob("*.jsonl"))


def read_stream(path: Path) -> list[dict[str, Any]]:
    """The examples of one stream file, in order, provisional ones replaced by their final replay."""
    entries: list[dict[str, Any] | None] = []
    pending: dict[str, int] = {}
    for raw in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            line = json.loads(raw)
            test, entry = line["test"], line["entry"]
        except (ValueError, KeyError, TypeError):
            continue  # a torn line: the worker died while writing it
        if line.get("final") and test in pending:
            entries[pending.pop(test)] = None
        if line.get("provisional"):
            pending[test] = len(entries)
        entries.append(entry)
    return [e for e in entries if e is not None]


def read_streams(paths: Iterable[Path]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for path in paths:
        out.extend(read_stream(path))
    return out
