"""``target_parameters`` for the strategies (``reference.params``).

Under transformers 5 the zoo's MoE types (:func:`fused_types`) hold their routed experts as fused
3-D parameters and their router as a bare weight.  About one case in four there names some of
them in ``target_parameters`` (as leaf names or dotted suffixes), beside list, regex or
all-linear module targets.  The options parameter-level LoRA refuses (dropout, ``fan_in_fan_out``,
LoRA biases, DoRA, the decomposing inits) are cleared on a valid case that reaches a parameter -
explicitly, or through the MoE conversion of ``"all-linear"`` - three times in four, so that both
sides' refusals stay checked too; the invalid kind ``param_wrapper_option`` asks for one of them
on purpose.  A cell may pin parameter targets (the ``parameters`` adapter feature).
"""

from __future__ import annotations

import dataclasses
import functools

from hypothesis import strategies as st

from reference.params import FAMILY_OF
from reference.profiles import Profile
from reference.spec import ABSENT, AdapterSpec, ModelSpec
from strategies.inits import init_variant

__all__ = ["PARAMS_INVALID_KINDS", "PARAMETER_NAMES", "fused_types", "has_parameters", "with_parameters"]

PARAMS_INVALID_KINDS = ("param_wrapper_option",)
PARAMETER_NAMES = ("gate_up_proj", "down_proj", "experts.gate_up_proj", "mlp.experts.down_proj", "gate.weight",
                   "mlp.gate.weight")
"""What a case may name: each fused parameter and the router's weight, bare or with a dotted prefix."""
_TARGETS_MATCH_NOTHING = ("targets_match_nothing", "layer_filter_matches_nothing")
"""Invalid kinds that rest on module targets matching nothing: they get no parameter targets."""
_REJECTED_AFTER_PARAMETERS = ("unknown_bias", "token_index_out_of_range")
"""Invalid kinds rejected after parameter targets are wrapped: a refused option would pre-empt them."""


@functools.lru_cache(maxsize=None)
def fused_types() -> tuple[str, ...]:
    """The zoo's types whose experts the installed transformers fuses (transformers >= 5)."""
    import transformers

    from strategies.zoo import ZOO

    major = int(transformers.__version__.split(".")[0])
    return tuple(t for t in ZOO if t in FAMILY_OF) if major >= 5 else ()


def has_parameters(adapter: AdapterSpec) -> bool:
    return adapter.target_parameters not in (ABSENT, None, ())


def _reaches_parameters(adapter: AdapterSpec, model: ModelSpec, profile: Profile) -> bool:
    converted = profile.moe_conversion and adapter.target_modules == "all-linear"
    return model.model_type in fused_types() and (has_parameters(adapter) or converted)


@st.composite
def with_parameters(draw, adapter: AdapterSpec, model: ModelSpec, profile: Profile, *, pinned: bool = False,
                    invalid: str | None = None, keep_dora: bool = False, keep_init: bool = False) -> AdapterSpec:
    """``adapter`` with parameter targets drawn (always when ``pinned`` or for the invalid kind),
    and, where parameters are reached, the options they refuse cleared (see the module doc)."""
    if "target_parameters" not in profile.features or model.model_type not in fused_types():
        return adapter
    if invalid in _TARGETS_MATCH_NOTHING:
        return adapter  # a matched parameter would rescue the case (upstream then only warns)
    forced = pinned or invalid in PARAMS_INVALID_KINDS
    if adapter.target_modules in (ABSENT, None) and not forced:
        return adapter  # default targets: left to their own cells (see moe-default-targets-lost)
    if forced or draw(st.integers(0, 3), label="params_roll") == 3:
        names = draw(st.lists(st.sampled_from(PARAMETER_NAMES), min_size=1, max_size=3,
                              unique_by=lambda n: n.rpartition(".")[2] if n.endswith("proj") else "gate"),
                     label="target_parameters")
        adapter = dataclasses.replace(adapter, target_parameters=tuple(names))
        if adapter.target_modules in (ABSENT, None):
            adapter = dataclasses.replace(adapter, target_modules=draw(st.sampled_from(((), ("q_proj",)))))
    if not _reaches_parameters(adapter, model, profile):
        return adapter
    if invalid == "param_wrapper_option":
        # (not fan_in_fan_out: a Linear module target resets the shared flag before parameters are seen)
        option = draw(st.sampled_from(("lora_dropout", "lora_bias", "use_dora")))
        changes = {"lora_dropout": 0.1} if option == "lora_dropout" else {option: True}
        if option in ("lora_bias", "use_dora"):  # the config checks would reject the pair first
            changes.update({"init_lora_weights": ABSENT, "use_dora" if option == "lora_bias" else "lora_bias": ABSENT})
        return dataclasses.replace(adapter, **changes)
    if invalid is not None and invalid not in _REJECTED_AFTER_PARAMETERS:
        return adapter  # its own rule rejects it first (a config check, a module layer): leave it as built
    if invalid is None and not forced and draw(st.integers(0, 3), label="params_refusal") == 3:
        return adapter  # one valid case in four meets the refusals
    changes: dict = {}
    if adapter.lora_dropout not in (ABSENT, 0.0):
        changes["lora_dropout"] = 0.0
    if adapter.fan_in_fan_out is True:
        changes["fan_in_fan_out"] = False
    if adapter.lora_bias is True:
        changes["lora_bias"] = False
    if adapter.use_dora is True and not keep_dora:
        changes["use_dora"] = ABSENT
    if init_variant(adapter.init_lora_weights) != "default" and not keep_init:
        changes["init_lora_weights"] = ABSENT
    return dataclasses.replace(adapter, **changes) if changes else adapter
