"""A second adapter for the strategies (``add_adapter`` / ``set_adapter``: ``reference.adapters``).

About one valid peft-level case in eight adds a second adapter, named ``"second"``, after
``get_peft_model``: list targets drawn from the type's linear names (they may meet the first
adapter's targets, so some layers hold both), its own r / alpha / dropout / rsLoRA, sometimes
``lm_head`` to save (causal types that have one), ``bias`` left at ``"none"`` (peft trains biases
for one adapter at most); then ``set_adapter`` absent, ``"default"`` or ``"second"``.  A cell may
pin it (the ``adapters`` adapter feature).  Both adapters stay plain LoRA: DoRA, the decomposing
inits, trainable tokens, weight tying, parameter targets and inference mode are cleared from the
first adapter of such a case, and so is its bias mode (how peft re-marks biases when an adapter
is added changed between releases: not modelled yet), and fused-expert types (whose v4 names become parameter targets)
draw none.
"""

from __future__ import annotations

import dataclasses

from hypothesis import strategies as st

from reference.spec import ABSENT, AdapterSpec, ModelSpec, TrainingSpec
from strategies.zoo import ZOO

__all__ = ["with_second_adapter"]

_CLEARED = ("use_dora", "trainable_token_indices", "ensure_weight_tying", "target_parameters", "inference_mode", "bias",
            "lora_bias")


@st.composite
def with_second_adapter(draw, model: ModelSpec, adapter: AdapterSpec, training: TrainingSpec, *, pinned: bool = False,
                        allowed: bool = True) -> tuple[AdapterSpec, TrainingSpec, AdapterSpec | None]:
    """(first adapter, training, second adapter or None)."""
    from strategies.params import fused_types
    from strategies.tokens import dict_form_types

    if training.level != "peft" or training.load_saved or model.model_type in fused_types():
        return adapter, training, None
    if not (pinned or (allowed and draw(st.integers(0, 7), label="second_roll") == 7)):
        return adapter, training, None
    entry = ZOO[model.model_type]
    names = draw(st.lists(st.sampled_from(entry.linear_names), min_size=1, max_size=3, unique=True),
                 label="second_targets")
    saves_head = model.task == "CAUSAL_LM" and model.model_type in dict_form_types()
    second = AdapterSpec(
        r=draw(st.sampled_from((2, 4, 8)), label="second_r"),
        lora_alpha=draw(st.sampled_from((ABSENT, 4, 16)), label="second_alpha"),
        lora_dropout=draw(st.sampled_from((ABSENT, 0.0, 0.1)), label="second_dropout"),
        use_rslora=draw(st.sampled_from((ABSENT, True)), label="second_rslora"),
        target_modules=tuple(names),
        modules_to_save=draw(st.sampled_from((ABSENT, ("lm_head",))), label="second_saved") if saves_head else ABSENT,
    )
    training = dataclasses.replace(training, set_adapter=draw(st.sampled_from((ABSENT, "default", "second")),
                                                              label="set_adapter"))
    changes = {name: ABSENT for name in _CLEARED if getattr(adapter, name) is not ABSENT}
    if adapter.init_lora_weights not in (ABSENT, True, False, "gaussian"):
        changes["init_lora_weights"] = ABSENT
    return (dataclasses.replace(adapter, **changes) if changes else adapter), training, second
