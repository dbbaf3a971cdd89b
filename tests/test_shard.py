"""``--conformance-shard K/N``: a deterministic, disjoint, covering partition of model type x quantization."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

from conformance.plugin.shard import QUANT_ORDER, Shard, parse_shard, partition, shard_seed

TYPES = tuple(f"type{i}" for i in range(38))


@pytest.mark.parametrize("n", [1, 2, 3, 4, 7, 38])
def test_shards_are_disjoint_and_cover_every_pair(n):
    shards = partition(TYPES, n)
    assert len(shards) == n
    union = set().union(*shards)
    assert union == {(t, q) for t in TYPES for q in QUANT_ORDER}
    assert sum(len(s) for s in shards) == len(union)  # disjoint
    sizes = [len(s) for s in shards]
    assert max(sizes) - min(sizes) <= len(QUANT_ORDER)
    for q in QUANT_ORDER:  # every shard has work of every kind while n <= the number of types
        assert all(any(kind == q for _, kind in s) for s in shards)


def test_the_partition_depends_only_on_names_and_count():
    assert partition(TYPES, 4) == partition(tuple(reversed(TYPES)), 4)
    # a fresh interpreter (another hash salt) deals the same way
    code = "from conformance.plugin.shard import partition; print(sorted(map(sorted, partition([f'type{i}' for i in range(38)], 4))))"
    env = {"PYTHONHASHSEED": "12345"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True).stdout
    assert out.strip() == str(sorted(map(sorted, partition(TYPES, 4))))


def test_shard_model_types_follow_the_partition():
    shard = Shard(2, 4)
    mine = partition(TYPES, 4)[1]
    for q in QUANT_ORDER:
        types = shard.model_types(q, TYPES)
        assert types and all((t, q) in mine for t in types)
        assert all(shard.holds(t, q, TYPES) == (t in types) for t in TYPES)


def test_parse_and_seed():
    assert parse_shard("3/4") == Shard(3, 4) and str(Shard(3, 4)) == "3/4"
    for bad in ("0/4", "5/4", "x", "1/", "2"):
        with pytest.raises(argparse.ArgumentTypeError, match=r"--conformance-shard=.* must be K/N"):
            parse_shard(bad)
    assert shard_seed(10, None) == 10
    assert len({shard_seed(10, Shard(k, 4)) for k in range(1, 5)}) == 4
