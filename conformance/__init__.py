"""The harness, one folder per role:

* ``engine/``: the upstream driver (the only importer of peft and trl), models, snapshots,
  diffs, the known-divergence registry and the differential step;
* ``numerics/``: the numerical checks (init properties, forward, loss, gradients);
* ``gate/``: the regression gate's corpora and upgrade reports;
* ``plugin/``: the pytest plugin (options, recording, the JSON report, the summary, shards);
* ``cli/``: ``python -m conformance``;
* ``test_conformance.py``: the conformance suite itself (``python -m pytest conformance``).
"""
