"""The warnings the reference emits, each with a stable ``kind``.

Upstream warns about inputs it silently corrects or ignores; the harness compares
the *set* of warning kinds of both sides, so these are part of the specified
behaviour, not decoration.
"""

from __future__ import annotations

import warnings

__all__ = ["KINDS", "PreparationWarning", "warn"]

KINDS = {
    "conv1d_fan_in_fan_out": "fan_in_fan_out=False on a Conv1D target: it is set to True",
    "linear_fan_in_fan_out": "fan_in_fan_out=True on an nn.Linear target: it is set to False",
    "exclude_unused": "exclude_modules excluded nothing",
    "rank_pattern_unused": "a rank_pattern key matched no targeted module",
    "alpha_pattern_unused": "an alpha_pattern key matched no targeted module",
    "lora_bias_without_base_bias": "lora_bias=True on a layer without a bias: merging is impossible",
    "embeddings_untied_after_merge": "a merge left the output embedding apart from the input one: the config says untied",
    "weight_tying_nothing_tied": "ensure_weight_tying=True, but no module is tied to the input embedding",
    "weight_tying_nothing_asked": "ensure_weight_tying=True, but neither modules_to_save nor the targets name an embedding",
    "target_modules_unmatched": "target_modules matched no module, but target_parameters matched parameters",
    "target_parameters_unmatched": "target_parameters matched no parameter, but target_modules matched modules",
}


class PreparationWarning(UserWarning):
    """A warning of the reference; ``kind`` is one of :data:`KINDS`."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


def warn(kind: str, message: str, stacklevel: int = 3) -> None:
    assert kind in KINDS, kind
    warnings.warn(PreparationWarning(kind, message), stacklevel=stacklevel)
