"""The differential engine: one case prepared by the reference and by upstream, compared.

* :mod:`~conformance.engine.upstream`: the upstream driver, the only module that imports peft and trl;
* :mod:`~conformance.engine.models` and :mod:`~conformance.engine.offline`: the tiny models, checkpoints,
  tokenizer and dataset every case is built from;
* :mod:`~conformance.engine.snapshot` and :mod:`~conformance.engine.diff`: canonical snapshots and their differences;
* :mod:`~conformance.engine.known`: the known-divergence registry (``known_divergences.toml`` beside it);
* :mod:`~conformance.engine.runner`: ``run_case``, the differential step.
"""
