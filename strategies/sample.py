"""Seeded draws: the same examples of a strategy for the same seed, outside a test.

Corpora for the regression gate, the fault-injection tests and the benchmarks all need a
fixed list of cases rather than a property test; this is the one place that drives
Hypothesis for that.  The draw depends only on the strategy, the seed and the
Hypothesis version.
"""

from __future__ import annotations

from typing import Any, TypeVar

from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis.strategies import SearchStrategy

__all__ = ["sample"]

T = TypeVar("T")


def sample(strategy: SearchStrategy[T], count: int, seed_value: int, *, budget: int | None = None,
           distinct: bool = True) -> list[T]:
    """The first ``count`` examples (distinct ones when ``distinct``) of at most ``budget``
    generated (default ``count``), in generation order."""
    out: list[Any] = []
    seen: set[Any] = set()

    @seed(seed_value)
    @settings(max_examples=budget or count, database=None, deadline=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(strategy)
    def collect(example: Any) -> None:
        if len(out) >= count or (distinct and example in seen):
            return
        seen.add(example)
        out.append(example)

    collect()
    return out
