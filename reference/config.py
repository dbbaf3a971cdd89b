"""Resolve an :class:`AdapterSpec` against a profile's defaults, and validate it.

This is the reference's counterpart of building a ``LoraConfig``: absent fields
take the profile's defaults, and the checks that upstream performs when the
config is constructed run here, before any module is touched.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from reference import loftq
from reference.errors import InvalidConfig, InvalidConfigType
from reference.profiles import Profile
from reference.spec import ABSENT, AdapterSpec

__all__ = ["LoraSettings", "resolve"]


@dataclass(frozen=True)
class LoraSettings:
    """An adapter spec with every field filled in and checked."""

    r: int
    lora_alpha: float
    lora_dropout: float
    target_modules: Any
    """None (the type's defaults), a regex string, ``"all-linear"`` or a frozenset of names."""
    exclude_modules: Any
    layers_to_transform: tuple[int, ...] | None
    layers_pattern: tuple[str, ...] | None
    rank_pattern: tuple[tuple[str, int], ...]
    alpha_pattern: tuple[tuple[str, float], ...]
    modules_to_save: tuple[str, ...] | None
    bias: str
    lora_bias: bool
    use_rslora: bool
    use_dora: bool
    init_lora_weights: Any
    fan_in_fan_out: bool
    task_type: str | None
    inference_mode: bool = False
    trainable_token_indices: tuple | None = None
    """List form: the rows, a tuple of ints; dict form: (module name, rows) pairs (``reference.tokens``)."""
    target_parameters: frozenset[str] | None = None
    ensure_weight_tying: bool = False
    given_layers: Any = None
    """``layers_to_transform`` as given (an int stays an int): what the stored config holds."""
    given_layers_pattern: Any = None
    """``layers_pattern`` as given."""
    loftq_config: tuple[tuple[str, int], ...] = ()
    """``loftq_config`` as (key, value) pairs, with ``init_lora_weights="loftq"`` only (peft empties
    it otherwise, with a warning)."""


def _names(value: Any) -> Any:
    """Lists become frozensets (order does not matter upstream); strings stay regexes.

    ``"all-linear"`` is recognised in any letter case, and only as a string.
    """
    if value is None:
        return value
    if isinstance(value, str):
        return "all-linear" if value.lower() == "all-linear" else value
    return frozenset(value)


def _token_indices(value: Any) -> tuple | None:
    if not value:
        return None
    if isinstance(value, dict):
        return tuple((str(k), tuple(v)) for k, v in value.items())
    return tuple(value)


def resolve(spec: AdapterSpec, profile: Profile) -> LoraSettings:
    """Fill defaults from ``profile`` and run the config-time checks."""
    d = profile.lora_defaults

    def get(name: str, default: Any = None) -> Any:
        value = getattr(spec, name)
        return d.get(name, default) if value is ABSENT else value

    # `r` is checked when each layer is created (reference.layers), not here:
    # upstream accepts r <= 0 in its config and fails on the first targeted module.
    r = get("r")
    target_modules = _names(get("target_modules"))
    layers = get("layers_to_transform")
    pattern = get("layers_pattern")
    # Checked when upstream's config object is built (peft >= 0.14), before any module is seen.
    if isinstance(target_modules, str) and layers is not None:
        raise InvalidConfig(
            "layers_with_regex_targets",
            f"layers_to_transform={layers!r} cannot be used when target_modules is a str ({target_modules!r})",
        )
    if isinstance(target_modules, str) and pattern is not None:
        raise InvalidConfig(
            "layers_with_regex_targets",
            f"layers_pattern={pattern!r} cannot be used when target_modules is a str ({target_modules!r})",
        )
    if pattern and layers is None:
        raise InvalidConfig(
            "layers_pattern_without_layers",
            f"layers_pattern={pattern!r} needs layers_to_transform; pass both or neither",
        )
    init = get("init_lora_weights")
    loftq_config = get("loftq_config")
    if init == "loftq" and "loftq" in profile.init_variants:  # between the layer checks and lora_bias's, as upstream
        loftq.check_config(loftq_config)
    if get("lora_bias") and init not in (True, False):
        raise InvalidConfig(
            "lora_bias_init",
            f"lora_bias=True needs init_lora_weights True or False, got init_lora_weights={init!r}",
        )
    # after the init check, as upstream's config checks run (peft 0.15 - 0.21)
    if get("lora_bias") and get("use_dora"):
        raise InvalidConfig("dora_lora_bias", "lora_bias=True cannot be combined with use_dora=True (DoRA)")
    params = get("target_parameters")
    if isinstance(params, str):
        raise InvalidConfigType("target_parameters_str", "`target_parameters` must be a list of strings or None.")
    return LoraSettings(
        r=r,
        lora_alpha=get("lora_alpha"),
        lora_dropout=get("lora_dropout"),
        target_modules=target_modules,
        exclude_modules=_names(get("exclude_modules")),
        # An empty list means "no layer filter", like None.
        layers_to_transform=(layers,) if isinstance(layers, int) else (tuple(layers) or None if layers is not None else None),
        # "" and [] mean "no pattern", like None.
        layers_pattern=(pattern,) if isinstance(pattern, str) and pattern else (tuple(pattern) if pattern and not isinstance(pattern, str) else None),
        rank_pattern=tuple(dict(get("rank_pattern") or ()).items()),
        alpha_pattern=tuple(dict(get("alpha_pattern") or ()).items()),
        modules_to_save=tuple(get("modules_to_save")) if get("modules_to_save") is not None else None,
        bias=get("bias"),
        lora_bias=bool(get("lora_bias")),
        use_rslora=bool(get("use_rslora")),
        use_dora=bool(get("use_dora")),
        init_lora_weights=init,
        fan_in_fan_out=bool(get("fan_in_fan_out")),
        task_type=get("task_type"),
        inference_mode=bool(get("inference_mode")),
        trainable_token_indices=_token_indices(get("trainable_token_indices")),
        target_parameters=frozenset(params) if params else None,
        ensure_weight_tying=bool(get("ensure_weight_tying", False)),
        given_layers=layers,
        given_layers_pattern=pattern,
        loftq_config=tuple(dict(loftq_config or ()).items()) if init == "loftq" else (),
    )
