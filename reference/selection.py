"""The run header's notes on how the reference was chosen: above both the peft profiles
(:mod:`reference.profiles`) and the trl flows (:mod:`reference.trl`), so neither imports the other's notes."""

from __future__ import annotations

from typing import Mapping

from reference.profiles import peft_selection_note
from reference.trl import trl_selection_note
from reference.versions import installed_versions

__all__ = ["selection_notes"]


def selection_notes(versions: Mapping[str, str] | None = None) -> list[str]:
    """Loud notes for the run header: every installed upstream package whose version is
    outside the known profiles (peft) or trl flows (trl), so the newest (or oldest) one is
    used as a guess.  Empty when everything is covered.  ``versions`` defaults to the
    installed ones (package metadata; peft and trl are never imported)."""
    versions = dict(versions or installed_versions())
    notes = []
    peft = versions.get("peft", "absent")
    if peft != "absent":
        note = peft_selection_note(peft)
        if note:
            notes.append(note)
    trl = versions.get("trl", "absent")
    if trl != "absent":
        note = trl_selection_note(trl)
        if note:
            notes.append(note)
    return notes
