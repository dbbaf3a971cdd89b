"""Fixtures shared by the harness's own tests."""

from __future__ import annotations

import pathlib

import pytest


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> pathlib.Path:
    """A checkpoint cache for quantized loads, one per test module."""
    return tmp_path_factory.mktemp("checkpoints")
