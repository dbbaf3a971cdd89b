"""Start-up and distribution under pytest-xdist (conformance.plugin.startup)."""

from __future__ import annotations

import subprocess
import sys
from types import SimpleNamespace

from conformance.plugin import startup


class _Item:
    def __init__(self, name: str, long: bool) -> None:
        self.nodeid = name
        self.obj = SimpleNamespace(hypothesis=object()) if long else SimpleNamespace()


def _suite(cells: int = 251, free: int = 6) -> list[_Item]:
    """The suite's shape: the cell tests, then the free tests Hypothesis drives itself."""
    return [_Item(f"cell{i}", False) for i in range(cells)] + [_Item(f"free{i}", True) for i in range(free)]


def _worker(count: int = 2, dist: str = "load", max_chunk: int | None = None) -> SimpleNamespace:
    return SimpleNamespace(workerinput={"workercount": count, startup.DIST: dist, startup.MAX_CHUNK: max_chunk})


def test_long_tests_open_the_first_batch_of_every_worker():
    items = _suite()
    startup.spread_long_tests(_worker(), items)
    # xdist's load scheduler first sends each of 2 workers 257 // 2 // 4 = 32 consecutive tests
    assert [i for i, item in enumerate(items) if item.nodeid.startswith("free")] == [0, 1, 2, 32, 33, 34]
    assert sorted(item.nodeid for item in items) == sorted(item.nodeid for item in _suite())
    again = _suite()
    startup.spread_long_tests(_worker(), again)
    assert [item.nodeid for item in again] == [item.nodeid for item in items]  # every worker collects alike


def test_the_first_batch_follows_the_scheduler():
    assert startup._first_batch(257, 2, None) == 32
    assert startup._first_batch(257, 4, None) == 16
    assert startup._first_batch(257, 2, 5) == 5
    assert startup._first_batch(10, 4, None) == 2
    items = _suite()
    startup.spread_long_tests(_worker(count=4), items)
    assert [i for i, item in enumerate(items) if item.nodeid.startswith("free")] == [0, 1, 16, 17, 32, 48]


def test_order_is_left_alone_elsewhere():
    for config in (SimpleNamespace(), _worker(count=1), _worker(dist="worksteal"), _worker(max_chunk=2)):
        items = _suite()
        startup.spread_long_tests(config, items)
        assert [item.nodeid for item in items] == [item.nodeid for item in _suite()], config
    few = _suite(cells=1, free=1)
    startup.spread_long_tests(_worker(), few)
    assert [item.nodeid for item in few] == ["cell0", "free0"]


def test_the_plugin_imports_neither_strategies_nor_the_engine():
    """An xdist controller imports the plugin before it spawns its workers: seconds saved on every
    worker when the plugin leaves the zoo (transformers' config classes) and the engine alone."""
    code = ("import sys, conformance.plugin; "
            "heavy = [m for m in ('strategies', 'torch', 'transformers', 'conformance.engine.runner') if m in sys.modules]; "
            "print(heavy); sys.exit(1 if heavy else 0)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
