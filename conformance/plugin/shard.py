"""``--conformance-shard K/N``: a deterministic partition of the work over model type x quantization.

Every (model type, quantization kind) pair belongs to exactly one of ``N``
shards, so ``N`` runners together cover what one run would.  Within each
quantization kind the model types are ordered by a stable hash (SHA-256, not
Python's salted ``hash``) and dealt round-robin, the deal rotated per kind: each
shard gets ``floor`` or ``ceil(types / N)`` types of every kind (never none while
``N`` is at most the number of types), and the shards' totals differ by at most
one per kind.  The partition depends only on the zoo's type names and ``N``,
never on the process, the machine or the seed.

Each shard draws with its own seed, :func:`shard_seed`, so that shards explore
independently; ``--hypothesis-seed S --conformance-shard K/N`` replays shard K.
"""

from __future__ import annotations

import argparse
import hashlib
from dataclasses import dataclass
from functools import lru_cache
from typing import Iterable

__all__ = ["Shard", "parse_shard", "partition", "shard_seed"]

QUANT_ORDER = ("none", "8bit", "4bit")


@dataclass(frozen=True)
class Shard:
    """Shard ``index`` (1-based) of ``count``."""

    index: int
    count: int

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"

    def model_types(self, quant_kind: str, all_types: Iterable[str]) -> tuple[str, ...]:
        """The model types this shard checks under ``quant_kind``, in the order given."""
        all_types = tuple(all_types)
        mine = partition(all_types, self.count)[self.index - 1]
        return tuple(t for t in all_types if (t, quant_kind) in mine)

    def holds(self, model_type: str, quant_kind: str, all_types: Iterable[str]) -> bool:
        return (model_type, quant_kind) in partition(all_types, self.count)[self.index - 1]


def parse_shard(value: str) -> Shard:
    """``"K/N"`` with ``1 <= K <= N``; the ``type=`` of ``--conformance-shard``."""
    k, sep, n = value.partition("/")
    try:
        shard = Shard(int(k), int(n)) if sep else None
    except ValueError:
        shard = None
    if shard is None or not 1 <= shard.index <= shard.count:
        raise argparse.ArgumentTypeError(f"--conformance-shard={value!r} must be K/N with 1 <= K <= N, e.g. 2/4")
    return shard


def _stable(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big")


def partition(all_types: Iterable[str], count: int, quant_kinds: tuple[str, ...] = QUANT_ORDER) -> list[frozenset]:
    """``count`` disjoint sets of ``(model_type, quant_kind)`` pairs whose union is every pair."""
    return _partition(frozenset(all_types), count, tuple(quant_kinds))


@lru_cache(maxsize=32)
def _partition(all_types: frozenset, count: int, quant_kinds: tuple[str, ...]) -> list[frozenset]:
    types = sorted(all_types, key=lambda t: (_stable(t), t))
    shards: list[set] = [set() for _ in range(count)]
    for q, kind in enumerate(quant_kinds):
        for i, model_type in enumerate(types):
            # rotate by the number of types already dealt, so remainders spread over the shards
            shards[(i + q * len(types)) % count].add((model_type, kind))
    return [frozenset(s) for s in shards]


def shard_seed(seed: int, shard: Shard | None) -> int:
    """The Hypothesis seed shard ``K`` draws with: ``seed + K`` (mod 2**32); ``seed`` unsharded."""
    return seed if shard is None else (seed + shard.index) % 2**32
