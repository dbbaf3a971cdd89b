"""Resuming from a saved adapter for the strategies (``training.load_saved``, ``reference.resume``).

About one valid peft-level case in eight resumes: the adapter is trained and saved first, and the
case's model (after the k-bit step when asked: always for a quantized model) loads it with
``PeftModel.from_pretrained``, ``is_trainable`` absent (its default, False), True or False.  A
cell may pin it (the ``resume`` adapter feature).  The saved adapter is plain LoRA: DoRA, the
decomposing inits, trainable token rows, weight tying, parameter targets and inference mode are
cleared from a resumed case (the reference's loader does not read them yet), and invalid cases
do not resume (their rejection comes from the same ``get_peft_model`` call either way).
"""

from __future__ import annotations

import dataclasses

from hypothesis import strategies as st

from reference.spec import ABSENT, AdapterSpec, TrainingSpec

__all__ = ["resumes", "with_resume"]

_CLEARED = ("use_dora", "trainable_token_indices", "ensure_weight_tying", "target_parameters", "inference_mode")


def resumes(training: TrainingSpec) -> bool:
    return bool(training.load_saved)


@st.composite
def with_resume(draw, training: TrainingSpec, adapter: AdapterSpec, *, pinned: bool = False,
                allowed: bool = True) -> tuple[TrainingSpec, AdapterSpec]:
    """(training, adapter) resuming from a saved adapter when ``pinned``, else one time in eight
    where ``allowed`` (a peft-level valid case that pins no other feature)."""
    if training.level != "peft" or not (pinned or (allowed and draw(st.integers(0, 7), label="resume_roll") == 7)):
        return training, adapter
    trainable = draw(st.sampled_from((ABSENT, True, False, True)), label="is_trainable")
    training = dataclasses.replace(training, load_saved=True, is_trainable=trainable)
    changes = {name: ABSENT for name in _CLEARED if getattr(adapter, name) is not ABSENT}
    if adapter.init_lora_weights not in (ABSENT, True, False, "gaussian"):
        changes["init_lora_weights"] = ABSENT
    return training, dataclasses.replace(adapter, **changes) if changes else adapter
