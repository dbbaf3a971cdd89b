"""The trl trainer of a trl-level case (``training.trainer``, ``reference.trainers``).

Every trainer with a checked row for the installed trl is generated (``available_trainers``);
SFTTrainer is drawn half the time, the others share the rest, and a trainer cell pins one.  A
trainer decides the model's task (RewardTrainer trains a one-label sequence classifier, the
others causal LMs) and whether a PeftModel may come with a ``peft_config`` too.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from hypothesis import strategies as st

from reference.spec import ABSENT, AdapterSpec, ModelSpec, TrainingSpec
from reference.trainers import TrainerRules, available_trainers, trainer_rules

__all__ = ["clones_chat_template", "installed_trainers", "pair_rule", "rules_of", "takes_quantization_config", "trainer_of", "trainer_task",
           "trainer_training", "trainers", "with_chat_template", "with_quantization_config", "with_trainer"]


def _installed_trl() -> str | None:
    from reference.trl import _installed_trl as installed

    return installed()


def installed_trainers() -> tuple[str, ...]:
    """The trainers the installed trl is generated with (SFT first)."""
    return available_trainers(_installed_trl())


def rules_of(trainer: str) -> TrainerRules | None:
    """The installed trl's row of ``trainer`` (None for SFT, whose rules are the trl flow's)."""
    if trainer == "sft":
        return None
    version = _installed_trl()
    return trainer_rules(trainer, version) if version else None


def _rule(trainer: str, name: str):
    """The installed trl's rule ``name`` for ``trainer``: its row's (``reference.trainers``), or for
    SFTTrainer its trl flow's (``reference.trl``), where both carry the rule under one name."""
    rules = rules_of(trainer)
    if rules is not None:
        return getattr(rules, name)
    if trainer != "sft":
        return None  # no checked row: the trainer is not generated
    from reference.trl import select_trl_flow

    return getattr(select_trl_flow(), name)


def takes_quantization_config(trainer: str) -> bool:
    """Whether the installed trl's ``trainer`` has a ``quantization_config`` argument."""
    return bool(_rule(trainer, "takes_quantization_config"))


@st.composite
def with_quantization_config(draw, training: TrainingSpec, trainer: str, quantized: bool, *,
                             twice: bool = False) -> TrainingSpec:
    """``training`` with where a quantized case's bitsandbytes config goes: a third of the cases whose
    trainer has the argument pass it to the trainer (beside a model object too, where it is
    documented as ignored); ``twice`` (the invalid kind ``quantization_config_twice``) puts it in
    both places, on a path load."""
    if twice:
        return dataclasses.replace(training, quantization_config_in="both", model_from_path=True,
                                   peft_model_in=False, peft_config_too=False)
    if not (quantized and takes_quantization_config(trainer)):
        return training
    if draw(st.integers(0, 2), label="quantization_config_roll") != 2:
        return training
    return dataclasses.replace(training, quantization_config_in="trainer")


def clones_chat_template(trainer: str) -> bool:
    """Whether the installed trl's ``trainer`` clones a ``chat_template_path`` (as the reference models)."""
    return bool(_rule(trainer, "clones_chat_template"))


@st.composite
def with_chat_template(draw, training: TrainingSpec, adapter: AdapterSpec, trainer: str, embedding_names: tuple[str, ...],
                       *, pinned: bool = False) -> tuple[TrainingSpec, AdapterSpec]:
    """(training, adapter) with a ``chat_template_path``: always when ``pinned``, else one valid case
    in six whose trainer clones templates (a tokenizer to clone two times in three, a bare
    ``.jinja`` file otherwise).  Cloning adds token rows the trainer makes trainable itself, so the
    adapter's own rows and LoRA on the embedding are cleared; a passed-in PeftModel is not combined."""
    if training.peft_model_in or not clones_chat_template(trainer):
        return training, adapter
    if not pinned and draw(st.integers(0, 5), label="chat_template_roll") != 5:
        return training, adapter
    kind = draw(st.sampled_from(("tokenizer", "tokenizer", "jinja")), label="chat_template")
    training = dataclasses.replace(training, chat_template=kind)
    changes: dict = {}
    if kind == "tokenizer":
        if adapter.trainable_token_indices is not ABSENT:
            changes["trainable_token_indices"] = ABSENT
        targets = adapter.target_modules
        if isinstance(targets, tuple) and any(t in embedding_names for t in targets):
            kept = tuple(t for t in targets if t not in embedding_names)
            if not kept:  # LoRA on the embedding alone: this case keeps it, without a template
                return dataclasses.replace(training, chat_template=ABSENT), adapter
            changes["target_modules"] = kept
    return training, dataclasses.replace(adapter, **changes) if changes else adapter


def trainer_task(trainer: str) -> str:
    rules = rules_of(trainer)
    return rules.task if rules is not None else "CAUSAL_LM"


def pair_rule(trainer: str) -> str:
    """What ``trainer`` does with a PeftModel and a ``peft_config`` together: ``merge``,
    ``ignore``, ``reject`` or ``none`` (not generated)."""
    return _rule(trainer, "peft_model_with_config")


def trainers(pinned: str | None = None, model_types: tuple[str, ...] | None = None) -> st.SearchStrategy[str]:
    """A trainer name: ``pinned``, else SFT half the time (shrinks to it), else another one whose
    model task one of ``model_types`` (default: the zoo's) has."""
    if pinned is not None:
        return st.just(pinned)
    from strategies.zoo import model_types as zoo_types
    from strategies.zoo import tasks_of

    types = model_types or zoo_types()
    names = installed_trainers()
    others = tuple(n for n in names if n != "sft" and any(trainer_task(n) in tasks_of(t) for t in types))
    return st.sampled_from(("sft",) * max(1, len(others)) + others)


def with_trainer(model: ModelSpec, trainer: str) -> ModelSpec:
    """``model`` as ``trainer`` needs it: a reward model has one label."""
    if trainer_task(trainer) == "SEQ_CLS" and trainer == "reward":
        return dataclasses.replace(model, num_labels=1)
    return model


def trainer_training(training: TrainingSpec, trainer: str, image_text: bool = False) -> TrainingSpec:
    """``training`` for ``trainer`` (the field is left out for SFT, its default); a vision-language
    model (``image_text``) is passed as an object where the trainer loads paths as causal LMs."""
    if image_text and not _rule(trainer, "loads_image_text_paths"):
        training = dataclasses.replace(training, model_from_path=False)
    if trainer == "sft":
        return training
    rules = rules_of(trainer)
    if rules is not None and not rules.loads_paths:
        training = dataclasses.replace(training, model_from_path=False)
    return dataclasses.replace(training, trainer=trainer)


def trainer_of(case: Any) -> str:
    """The trainer of a case in its JSON form (``sft`` when not given)."""
    training = case.get("training", {})
    return training.get("trainer", "sft") if training.get("level") == "trl" else "-"

