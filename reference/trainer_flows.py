"""The trl level's entry (:func:`prepare_trl_level`: the trainer's ``quantization_config`` and
``chat_template_path``, then SFTTrainer's flow or another trainer's shape) and the preparation of
the trl trainers other than SFTTrainer, one function per shape.

Which trainer takes which shape, and its other rules, is the table of :mod:`reference.trainers`;
the steps the shapes share (the k-bit step, input grads, the bf16 casts, the head-LoRA check)
are :mod:`reference.trl`'s, written once.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import torch
from torch import nn

from reference.adapter_io import spec_of_stored
from reference.chat_template import TemplateSource, clone_chat_template, with_added_tokens
from reference.adapters import adapters_of, add_adapter
from reference.errors import InvalidConfig
from reference.kbit import is_kbit, prepare_for_kbit_training
from reference.merge import merge_and_unload
from reference.peft_model import PeftWrapper
from reference.prepare import ADAPTER, prepare_wrapped
from reference.profiles import Profile
from reference.spec import ABSENT, AdapterSpec, TrainingSpec
from reference.trainers import TrainerRules, trainer_rules
from reference.trained import give_trained_values
from reference.trl import (
    TRL_FLOWS, TrlFlow, TrlResult, _cast_for_bf16, _current_after_peft, _finish, _helper_checkpointing,
    _installed_trl, _prepare_trl, _reject_head_lora, prepare_trl,
)

__all__ = ["REF", "disable_dropout", "prepare_trainer", "prepare_trl_level", "rules_for"]

REF = "ref"
"""The name the DPO family gives the frozen copy of a passed-in adapter."""


@dataclasses.dataclass(frozen=True)
class _Step:
    """What a shape needs: the case and the trainer's settings resolved."""

    adapter: AdapterSpec
    training: TrainingSpec
    profile: Profile
    rules: TrainerRules
    gc: bool
    kwargs: dict
    trained_seed: int | None


def _peft_step(training: TrainingSpec) -> TrainingSpec:
    """``get_peft_model`` with peft's defaults (the trainer passes no ``autocast_adapter_dtype``)."""
    return dataclasses.replace(training, prepare_kbit=False, autocast_adapter_dtype=ABSENT)


def _passed_in(model: nn.Module, s: _Step) -> PeftWrapper:
    """The PeftModel the user built (``get_peft_model`` with defaults) and trained, handed over."""
    _, wrapper = prepare_wrapped(model, s.adapter, _peft_step(s.training), s.profile)
    if s.trained_seed is not None:
        give_trained_values(model, s.trained_seed)
    return wrapper


def _family(model: nn.Module, s: _Step):
    wrapper = _passed_in(model, s) if s.training.peft_model_in else None
    if wrapper is not None and not s.training.peft_config_too:
        if s.gc:
            model.enable_input_require_grads()
        return model, wrapper
    if wrapper is not None:
        merge_and_unload(model, s.profile)
    if is_kbit(model):
        prepare_for_kbit_training(model, use_gradient_checkpointing=s.gc, gradient_checkpointing_kwargs=s.kwargs)
    elif s.gc:
        model.enable_input_require_grads()
    _, wrapper = prepare_wrapped(model, s.adapter, _peft_step(s.training), s.profile)
    if s.training.bf16 and getattr(model, "is_loaded_in_4bit", False):
        _cast_for_bf16(model)
    return model, wrapper


def _reward_classic(model: nn.Module, s: _Step):
    if s.training.peft_model_in:  # kept as it is, a peft_config passed too is dropped
        return model, _passed_in(model, s)
    if is_kbit(model):
        prepare_for_kbit_training(model, use_gradient_checkpointing=s.gc, gradient_checkpointing_kwargs=s.kwargs)
    _, wrapper = prepare_wrapped(model, s.adapter, _peft_step(s.training), s.profile)
    return model, wrapper


def _grpo_classic(model: nn.Module, s: _Step):
    if s.training.peft_model_in:
        wrapper = _passed_in(model, s)
    else:
        _, wrapper = prepare_wrapped(model, s.adapter, _peft_step(s.training), s.profile)
    if s.training.model_from_path:  # the trainer loads it with use_cache=False with checkpointing, else None
        model.config.use_cache = False if s.gc else None
    if s.gc:
        model.config.use_cache = False
        _helper_checkpointing(model, s.kwargs)
    return model, wrapper


def _ref_adapter(model: nn.Module, wrapper: PeftWrapper, profile: Profile) -> PeftWrapper:
    """``add_adapter("ref", peft_config["default"])``, then every ``.default.`` parameter's
    values copied into its ``.ref.`` twin: a frozen, inactive copy of the passed-in adapter."""
    adapters = adapters_of(wrapper, ADAPTER)
    add_adapter(model, adapters, REF, spec_of_stored(wrapper.config), profile)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, param in params.items():
            if ".default." in name:
                twin = params.get(name.replace(".default.", f".{REF}."))
                if twin is None:
                    raise AttributeError(f"{name.replace('.default.', f'.{REF}.')} is not a parameter")
                twin.copy_(param)
    return adapters.facts()


def _inline(model: nn.Module, s: _Step):
    quantized = is_kbit(model)
    if s.training.peft_model_in:
        wrapper = _passed_in(model, s)
        if s.training.peft_config_too:
            if s.rules.peft_model_with_config == "reject":
                raise InvalidConfig("trl_peft_model_with_config", "a PeftModel together with a peft_config is rejected")
            merge_and_unload(model, s.profile)
            _, wrapper = prepare_wrapped(model, s.adapter, _peft_step(s.training), s.profile)
        elif s.rules.ref_adapter:
            wrapper = _ref_adapter(model, wrapper, s.profile)
    else:
        _, wrapper = prepare_wrapped(model, s.adapter, _peft_step(s.training), s.profile)
    _current_after_peft(model, s.gc, quantized, s.rules, wrapper)
    if s.rules.rejects_head_lora:
        _reject_head_lora(model)
    return model, wrapper


def _helper(model: nn.Module, s: _Step):
    """trl's module-level ``prepare_peft_model``, as SFTTrainer 0.25 calls it (``reference.trl``)."""
    training = dataclasses.replace(s.training, trainer=ABSENT, gradient_checkpointing=s.gc)
    result = _prepare_trl(model, s.adapter, training, s.profile, TRL_FLOWS["helper-0.25"], s.trained_seed)
    return result.model, result.wrapper, result.trainer_gradient_checkpointing


_SHAPES: dict[str, Callable] = {
    "family": _family,
    "reward_classic": _reward_classic,
    "grpo_classic": _grpo_classic,
    "inline": _inline,
    "helper": _helper,
}


def disable_dropout(model: nn.Module) -> None:
    """``disable_dropout_in_model``: every ``nn.Dropout`` gets ``p=0`` (LoRA's dropout included)."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0


def prepare_trainer(model: nn.Module, adapter: AdapterSpec, training: TrainingSpec, profile: Profile,
                    rules: TrainerRules, *, pad_token_id: int | None, trained_seed: int | None):
    """``<Trainer>(model, args, peft_config=..., processing_class=tokenizer, ...)`` of a trainer
    other than SFTTrainer, at construction (a ``reference.trl.TrlResult``)."""

    gc = training.gradient_checkpointing
    gc = rules.gradient_checkpointing_default if gc is ABSENT else bool(gc)
    kwargs = {} if training.use_reentrant is ABSENT else {"use_reentrant": training.use_reentrant}
    step = _Step(adapter, training, profile, rules, gc, kwargs, trained_seed)
    model, wrapper, *turned = _SHAPES[rules.preparation](model, step)
    gc = turned[0] if turned else gc  # the helper turns the trainer's checkpointing off after its k-bit step
    if rules.disables_dropout:
        disable_dropout(model)
    if rules.mirrors_pad_token and pad_token_id is not None:
        config = model.config
        (config.get_text_config() if hasattr(config, "get_text_config") else config).pad_token_id = pad_token_id
    return _finish(model, gc, wrapper)


def rules_for(trainer: str, version: str | None = None) -> TrainerRules:
    """The ``reference.trainers`` row of ``trainer`` for trl ``version`` (default: the installed
    one); an error where none was checked."""
    version = version or _installed_trl() or "1.16"
    rules = trainer_rules(trainer, version)
    if rules is None:
        raise ValueError(f"trainer={trainer!r} has no checked rules for trl {version} (reference.trainers)")
    return rules


def prepare_trl_level(model: nn.Module, adapter: AdapterSpec, training: TrainingSpec, profile: Profile,
                      flow: TrlFlow, *, pad_token_id: int | None = None, trained_seed: int | None = None,
                      template: TemplateSource | None = None, template_seed: int = 0) -> TrlResult:
    """A trl-level case's preparation: SFTTrainer's by its trl ``flow`` (``reference.trl``), any
    other trainer's (``training.trainer``) by its row of ``reference.trainers`` for the installed trl.
    A chat template to clone (``training.chat_template``, described by ``template``) is cloned first,
    its new rows drawn under ``template_seed``.

    A bitsandbytes config given to the trainer (``training.quantization_config_in``) is merged into
    the path load's ``model_init_kwargs``, so the model loads as it would from there; given in both
    places it is an error; beside a model object it is ignored, as every trainer documents."""
    if training.quantization_config_in == "both" and training.model_from_path:
        raise InvalidConfig("quantization_config_twice",
                            "quantization_config set both as a trainer argument and in args.model_init_kwargs")
    rules = flow if training.trainer_name == "sft" else rules_for(training.trainer_name)
    if training.chat_template == "tokenizer" and template is not None and rules.clones_chat_template:
        added = clone_chat_template(model, template, template_seed, rules.template_eos_on_text_config)  # (a bare template changes nothing)
        if rules.template_tokens_trainable:
            adapter = with_added_tokens(model, adapter, added)
    if training.trainer_name == "sft":
        return prepare_trl(model, adapter, training, profile, flow, pad_token_id=pad_token_id, trained_seed=trained_seed)
    return prepare_trainer(model, adapter, training, profile, rules_for(training.trainer_name),
                           pad_token_id=pad_token_id, trained_seed=trained_seed)
