"""Installed versions, read from package metadata (peft and trl are never imported).

The bottom of the reference's import graph: profiles, trl flows and the selection notes
all read versions through here.
"""

from __future__ import annotations

from importlib import metadata

__all__ = ["installed_versions", "release"]


def installed_versions() -> dict[str, str]:
    """Versions of the stack packages, from metadata; missing ones are ``"absent"``."""
    out = {}
    for name in ("torch", "transformers", "bitsandbytes", "peft", "trl", "accelerate"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "absent"
    return out


def release(version: str) -> tuple[int, ...]:
    """The release numbers of ``version``: ``"0.21.2+fork"`` and ``"0.26.0.dev0"`` give
    ``(0, 21, 2)`` and ``(0, 26, 0)``; a pre-release or local build counts as its release."""
    parts = []
    for piece in version.split("+")[0].split("."):
        digits = "".join(ch for ch in piece if ch.isdigit())
        if not digits:
            break
        parts.append(int(digits))
        if not piece.isdigit():
            break
    return tuple(parts)
