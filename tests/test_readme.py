"""The README says what the code does: its known-divergence table is the registry's."""

from __future__ import annotations

import re
from pathlib import Path

from conformance.engine.known import REGISTRY_PATH, load_registry, markdown_table

README = Path(__file__).resolve().parents[1] / "README.md"


def test_the_known_divergence_table_is_the_registry():
    text = README.read_text()
    found = re.search(r"<!-- known-divergences:start -->\n(.*?)\n<!-- known-divergences:end -->", text, re.S)
    assert found, "README.md lacks the known-divergences table markers"
    expected = markdown_table(load_registry(REGISTRY_PATH, versions={}))
    assert found.group(1) == expected, (
        "README.md's known-divergence table differs from the registry; regenerate it with "
        "`python -m conformance.engine.known` and paste it between the markers")


def test_every_entry_has_a_summary():
    for entry in load_registry(REGISTRY_PATH, versions={}).entries:
        assert 20 <= len(entry.summary) <= 200, entry.id
