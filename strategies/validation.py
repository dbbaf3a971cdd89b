"""Argument validation for the strategies: checked before anything is drawn."""

from __future__ import annotations

from typing import Iterable

from hypothesis.errors import InvalidArgument

__all__ = ["check_kinds", "check_rate"]


def check_rate(name: str, value: float) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0.0 <= value <= 1.0:
        raise InvalidArgument(f"{name}={value!r} must be a number between 0 and 1")


def check_kinds(name: str, value: Iterable[str], allowed: tuple[str, ...]) -> None:
    value = tuple(value)
    bad = [v for v in value if v not in allowed]
    if not value or bad:
        raise InvalidArgument(f"{name}={value!r} must be a non-empty subset of {allowed!r}")
