"""Start-up of a suite run: the xdist controller, the order of the long tests, the garbage collector.

Measured on the suite at ``--conformance-examples 150`` (1657 examples; 251 cell tests of 2-3
examples each, then six free tests of 150 examples each, 13-25 s apiece on 2 vCPUs):

* the controller of ``-n N`` runs no test, yet imported the whole harness before spawning the
  workers, which delayed every worker by those seconds; :func:`controller` tells the plugin
  where it is, so it imports only what the controller needs, and :func:`preload` imports the
  rest of what the end of the run needs while the workers run, not after them;
* xdist's ``load`` scheduler hands out the collection in order, so the six long free tests,
  collected last, ran last, and one worker finished alone on the last of them.
  :func:`spread_long_tests` puts them where the scheduler's first batches start, the same
  number on every worker, so the short cell tests fill the end of the run instead;
* each full collection of the cyclic garbage collector walked every object of torch,
  transformers, peft and trl (0.2-0.5 s, 26 times in a 200 s run).  :class:`GarbageCollection`
  moves what the imports built into the permanent generation (``gc.freeze``) and runs a full
  collection at most every 100 collections of the middle generation instead of every 10.
"""

from __future__ import annotations

import gc
import sys
from typing import Any

import pytest

__all__ = ["DIST", "MAX_CHUNK", "GarbageCollection", "controller", "preload", "scheduling", "spread_long_tests"]

DIST = "conformance_dist"
MAX_CHUNK = "conformance_maxschedchunk"
"""``workerinput`` keys: the controller's ``--dist`` and ``--maxschedchunk``, which a worker's own
options do not hold."""


def scheduling(config: pytest.Config) -> dict[str, Any]:
    """What the controller tells each worker about its scheduler (see :func:`spread_long_tests`)."""
    return {DIST: getattr(config.option, "dist", "no"), MAX_CHUNK: config.getoption("maxschedchunk", None)}


def controller(config: pytest.Config) -> bool:
    """Whether this process is an xdist controller, which hands every test to its workers (xdist's
    own condition: ``--dist`` other than ``no``, which ``-n N`` sets, and no ``--collect-only``)."""
    return (getattr(config, "workerinput", None) is None and config.pluginmanager.hasplugin("xdist")
            and getattr(config.option, "dist", "no") != "no" and not config.getoption("collectonly", False))


def preload() -> None:
    """Import what the controller needs at the end of the run (the report, the summary, the replay
    commands): called once the workers have started their tests, when the controller only waits."""
    import conformance.engine.runner  # noqa: F401 - the replay commands of the report
    import conformance.plugin.checks  # noqa: F401
    import conformance.plugin.report  # noqa: F401
    import conformance.plugin.summary  # noqa: F401


def _long(item: pytest.Item) -> bool:
    """A test Hypothesis drives itself (the free tests, ``--conformance-examples`` examples each);
    a cell test runs its few examples through an inner ``@given``."""
    return hasattr(getattr(item, "obj", None), "hypothesis")


def _first_batch(n_items: int, n_workers: int, max_chunk: int | None) -> int:
    """How many consecutive tests xdist's ``load`` scheduler first sends each worker
    (``LoadScheduling.schedule``, pytest-xdist 3.x): a quarter of a worker's share, at least 2."""
    per_worker = n_items // n_workers
    return max(2, min(per_worker // 4, max_chunk if max_chunk is not None else n_items))


def spread_long_tests(config: pytest.Config, items: list[pytest.Item]) -> None:
    """On an xdist worker of a ``load`` run, reorder ``items`` (the same way on every worker, as
    xdist requires) so that the long tests open the first batch of each worker, as many on each.

    Nothing changes under any other distribution, on one worker, or when the long tests do not
    fit in the first batches; test outcomes never depend on the order."""
    workerinput: Any = getattr(config, "workerinput", None)
    if workerinput is None or workerinput.get(DIST) != "load":  # a worker's own --dist is "no"
        return
    workers = int(workerinput.get("workercount", 1))
    long = [item for item in items if _long(item)]
    if workers < 2 or not long or len(items) < 2 * workers:
        return
    batch = _first_batch(len(items), workers, workerinput.get(MAX_CHUNK))
    if -(-len(long) // workers) > batch:
        return
    slots = {(j % workers) * batch + j // workers: item for j, item in enumerate(long)}
    rest = iter(item for item in items if not _long(item))
    items[:] = [slots[i] if i in slots else next(rest) for i in range(len(items))]


class GarbageCollection:
    """Registered where tests run (one process, or each xdist worker): the garbage collector's
    full collections skip the objects the imports built.

    After collection, and again after any test that imported another 100 modules or more
    (peft with the first example, trl with the first trl-level one: the harness imports them
    lazily), everything alive is collected once and frozen (``gc.freeze``), and a full
    collection then waits for 100 middle-generation collections rather than 10.  Objects are
    still freed by their reference counts; a frozen cycle that dies later (a model the cache
    held at a freeze) waits for the end of the session, when everything is unfrozen and the
    thresholds restored.  Freezing only where imports grew keeps that to the first minutes."""

    STEP = 100
    """New modules that call for another freeze."""
    FULL_EVERY = 100
    """Middle-generation collections between two full collections (CPython's default is 10)."""

    def __init__(self) -> None:
        self.saved = gc.get_threshold()
        self.frozen_at: int | None = None

    def _freeze(self) -> None:
        gc.collect()
        gc.freeze()
        self.frozen_at = len(sys.modules)

    @pytest.hookimpl(trylast=True)
    def pytest_collection_finish(self, session: pytest.Session) -> None:
        young, middle, _ = self.saved
        gc.set_threshold(young, middle, self.FULL_EVERY)
        self._freeze()

    @pytest.hookimpl
    def pytest_runtest_logfinish(self, nodeid: str, location: Any) -> None:
        if self.frozen_at is not None and len(sys.modules) - self.frozen_at >= self.STEP:
            self._freeze()

    @pytest.hookimpl
    def pytest_unconfigure(self, config: pytest.Config) -> None:
        if self.frozen_at is not None:
            gc.unfreeze()
            gc.set_threshold(*self.saved)
            self.frozen_at = None
