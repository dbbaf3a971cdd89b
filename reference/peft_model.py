"""What the PEFT wrapper around a prepared model holds: its class, its active adapters,
and the adapter config it stores (what ``save_pretrained`` writes to ``adapter_config.json``).

Preparation resolves some config fields and stores the resolved value (peft 0.15 - 0.21,
observed): ``target_modules`` None becomes the type's default names, ``"all-linear"`` the
full names of the modules it reached; a classification task appends its head names
(``classifier``, ``score``) to ``modules_to_save``; ``fan_in_fan_out`` ends as the last
Linear / Conv1D target left the shared flag (``reference.dispatch.wrap``);
``inference_mode`` is False for training.  Every other field is stored as given, or as
``LoraConfig``'s default.

A long list of targets (:data:`CONDENSE_FROM` names or more: ``"all-linear"``'s full names on
any real model) is stored condensed, as the fewest dotted suffixes that still tell the
targets from every other module (peft >= 0.14, an optimisation of target matching, observed
on 0.15.2 and 0.21.2): see :func:`condensed_targets`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Mapping

from reference.config import LoraSettings

__all__ = ["CONDENSE_FROM", "TASK_WRAPPERS", "PeftWrapper", "condensed_targets", "stored_config"]

CONDENSE_FROM = 20
"""From this many target names on, the stored list is condensed."""

TASK_WRAPPERS = {
    "CAUSAL_LM": "PeftModelForCausalLM",
    "SEQ_CLS": "PeftModelForSequenceClassification",
    "SEQ_2_SEQ_LM": "PeftModelForSeq2SeqLM",
    "TOKEN_CLS": "PeftModelForTokenClassification",
}
"""The wrapper class of each task type; no task type gives a plain ``PeftModel``."""

CLASSIFIER_NAMES = ("classifier", "score")
"""The head names a classification PEFT model appends to ``modules_to_save``."""


@dataclass(frozen=True)
class PeftWrapper:
    """The facts of the PEFT wrapper around a prepared model."""

    wrapper: str
    active_adapters: tuple[str, ...]
    config: Mapping[str, Any]
    """The stored config's fields (``conformance.engine.facts.ADAPTER_CONFIG_KEYS``), raw."""


def stored_config(settings: LoraSettings, resolved_targets: Any, fan_in_fan_out: bool, *,
                  task_heads: bool = True) -> dict[str, Any]:
    """The adapter config a PEFT model stores after preparing with ``settings``.

    ``resolved_targets`` is what target resolution used, in its stored form
    (:func:`condensed_targets`); ``fan_in_fan_out`` the shared flag after the last wrapped
    module.  With ``task_heads`` False (and the given targets and flag), this is the config
    as given, before preparation resolved anything."""
    saved = list(settings.modules_to_save or ())
    if task_heads and settings.task_type in ("SEQ_CLS", "TOKEN_CLS"):
        saved += CLASSIFIER_NAMES
    return {
        "r": settings.r,
        "lora_alpha": settings.lora_alpha,
        "lora_dropout": settings.lora_dropout,
        "target_modules": resolved_targets,
        "exclude_modules": settings.exclude_modules,
        "layers_to_transform": settings.given_layers,
        "layers_pattern": settings.given_layers_pattern,
        "rank_pattern": dict(settings.rank_pattern),
        "alpha_pattern": dict(settings.alpha_pattern),
        "modules_to_save": saved or None,
        "bias": settings.bias,
        "lora_bias": settings.lora_bias,
        "use_rslora": settings.use_rslora,
        "use_dora": settings.use_dora,
        "init_lora_weights": settings.init_lora_weights,
        "fan_in_fan_out": fan_in_fan_out,
        "task_type": settings.task_type,
        "inference_mode": settings.inference_mode,
        "trainable_token_indices": _stored_tokens(settings.trainable_token_indices),
        "target_parameters": sorted(settings.target_parameters) if settings.target_parameters else None,
    }


def _stored_tokens(indices: Any) -> Any:
    """The list form as a list, the dict form as ``{name: rows}``."""
    if not indices:
        return None
    if all(isinstance(i, tuple) for i in indices):
        return {name: list(rows) for name, rows in indices}
    return list(indices)


def _suffixes(name: str) -> list[str]:
    """The dotted suffixes of ``name``, shortest first: ``a.b.c`` gives ``c``, ``b.c``, ``a.b.c``."""
    parts = name.split(".")
    return [".".join(parts[i:]) for i in range(len(parts) - 1, -1, -1)]


def condensed_targets(targets: Any, module_names: Iterable[str]) -> Any:
    """The stored form of resolved ``targets`` on a model with ``module_names``.

    A list of :data:`CONDENSE_FROM` or more names becomes a set of suffixes, chosen greedily:
    taking the targets in the order of their suffix lists (shortest suffix first, compared
    as lists), each target not yet covered by a chosen suffix gets its shortest suffix that
    is neither chosen already nor a suffix of any module that is no target.  The result is
    kept only when it is shorter than the list.  A regex or a short list is stored as it is.
    """
    if isinstance(targets, str) or targets is None or len(targets) < CONDENSE_FROM:
        return targets
    targets = set(targets)
    ends = tuple("." + t for t in targets)
    others = {s for name in module_names if name not in targets and not name.endswith(ends) for s in _suffixes(name)}
    chosen: set[str] = set()
    for name, suffixes in sorted(((n, _suffixes(n)) for n in targets), key=lambda item: item[1]):
        if any(name.endswith("." + c) for c in chosen):
            continue
        for suffix in suffixes:
            if suffix not in chosen and suffix not in others:
                chosen.add(suffix)
                break
    if not chosen or len(chosen) >= len(targets):
        return frozenset(targets)
    return frozenset(chosen)


def wrapper_of(settings: LoraSettings, config: dict[str, Any], adapter: str) -> PeftWrapper:
    return PeftWrapper(TASK_WRAPPERS.get(settings.task_type or "", "PeftModel"), (adapter,), config)
