"""Hypothesis strategies for LoRA / QLoRA preparation cases.

The public surface: ``cases()`` and its parts.  See :mod:`strategies.cases`.
"""

from strategies.cases import INVALID_KINDS, adapter_specs, cases, model_specs, quant_specs, training_specs
from strategies.sample import sample
from strategies.zoo import ZOO, ZooEntry, model_types

__all__ = [
    "INVALID_KINDS",
    "ZOO",
    "ZooEntry",
    "adapter_specs",
    "cases",
    "model_specs",
    "model_types",
    "quant_specs",
    "sample",
    "training_specs",
]
