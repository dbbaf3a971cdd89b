"""The regression gate: record a corpus of upstream preparations under one stack
(:mod:`~conformance.gate.corpus`), replay it under another and report what changed
(:mod:`~conformance.gate.upgrade`)."""
