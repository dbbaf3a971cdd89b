"""The reference preparer: a plain function of (model, adapter spec, training spec, profile)."""

from __future__ import annotations

import dataclasses
import warnings

import torch

from torch import nn

from reference.config import LoraSettings, resolve
from reference.dispatch import wrap
from reference.errors import InvalidBias, InvalidConfig, NoTargetMatched, SavedModuleIsLora
from reference.inits import variant_family
from reference.kbit import is_kbit, prepare_for_kbit_training
from reference.layers import AdapterParams, LoraEmbedding, LoraLinear, SavedModule
from reference.params import convert_moe_targets, inject_parameters
from reference.peft_model import PeftWrapper, condensed_targets, stored_config, wrapper_of
from reference.notices import warn
from reference.profiles import Profile
from reference.spec import ABSENT, AdapterSpec, TrainingSpec
from reference.targets import effective_targets, iter_targets, pattern_value, warn_unused
from reference.tokens import is_dict_form, token_mapping, wrap_trainable_tokens
from reference.tying import TyingPlan, plan_tying, tie_factors, tied_saved_copy

__all__ = ["ADAPTER", "TASK_HEADS", "prepare", "prepare_wrapped"]

ADAPTER = "default"

# Task types whose PEFT model trains the classification head in full.
TASK_HEADS: dict[str, tuple[str, ...]] = {
    "SEQ_CLS": ("classifier", "score"),
    "TOKEN_CLS": ("classifier", "score"),
}


def _saved_names(settings: LoraSettings, profile: Profile, *, guarded: bool) -> tuple[str, ...]:
    """The user's modules_to_save plus the task's head names; with ``guarded``, only the
    names known when targets are resolved (the profile says for which task types)."""
    task = settings.task_type or ""
    heads = TASK_HEADS.get(task, ()) if (not guarded or task in profile.guarded_task_heads) else ()
    return tuple(settings.modules_to_save or ()) + heads


def _wrap_saved(model: nn.Module, names: tuple[str, ...], lora_ok: bool, trains: bool = True) -> None:
    """Wrap every module whose name ends with an entry (a plain string suffix, as
    upstream does: ``"head"`` wraps ``lm_head``).  Entries that match nothing are ignored.
    ``trains`` False (inference mode): the copies stay frozen, so a quantized one is no error."""
    if not names:
        return
    for key, module in list(model.named_modules()):
        if not key or not any(key.endswith(name) for name in names):
            continue
        if not lora_ok and isinstance(module, (LoraLinear, LoraEmbedding)):
            raise SavedModuleIsLora(f"modules_to_save entry reaches {key!r}, which already has LoRA")
        model.set_submodule(key, SavedModule(module, ADAPTER, trains=trains))


def is_bias_for_all(name: str, substring: bool) -> bool:
    """A parameter ``bias="all"`` trains: one named ``bias`` or, where ``substring`` (peft < 0.21,
    profile rule ``bias_all_substring``), any name containing "bias" (t5's
    ``relative_attention_bias.weight`` too)."""
    return ("bias" in name) if substring else (name == "bias" or name.endswith(".bias"))


def _mark_trainable(model: nn.Module, bias: str, substring: bool) -> None:
    if bias not in ("none", "all", "lora_only"):
        raise InvalidBias(f"bias={bias!r} is not one of 'none', 'all', 'lora_only'")
    for name, param in model.named_parameters():
        param.requires_grad = "lora_" in name
    if bias == "all":
        for name, param in model.named_parameters():
            if is_bias_for_all(name, substring):
                param.requires_grad = True
    elif bias == "lora_only":
        for module in model.modules():
            if isinstance(module, LoraLinear):
                base_bias = getattr(module.base_layer, "bias", None)
                if base_bias is not None:
                    base_bias.requires_grad = True


def _refuse_tokens_on_saved_names(model: nn.Module, settings: LoraSettings) -> None:
    """A module given trainable rows by a name that ``modules_to_save`` also lists, verbatim (a dict
    key; for the list form the input embedding's full dotted name) is refused: it would train in
    full and by rows at once (ValueError, peft 0.15.2 and 0.21.2)."""
    indices = settings.trainable_token_indices
    if is_dict_form(indices):
        keys = list(token_mapping(indices))
    else:
        embedding = model.get_input_embeddings()
        keys = [next((n for n, m in model.named_modules() if m is embedding), "embed_tokens")]
    for key in keys:
        if key in tuple(settings.modules_to_save or ()):
            raise InvalidConfig("tokens_on_saved_module",
                                f"{key!r} is both in modules_to_save and a key of trainable_token_indices: "
                                "train it in full or by rows, not both")


def _arrange_input_grads_for_checkpointing(model: nn.Module) -> None:
    """A PEFT model built around a model that already checkpoints (and is not quantized) makes
    its input embeddings' outputs require grad, on the embedding as it is *after* LoRA was
    injected: a LoRA-wrapped embedding gets its own hook (PeftModel.__init__, peft 0.15 - 0.21;
    the quantized case is the k-bit step's business)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # transformers 5 deprecates the property's name
        checkpointing = getattr(model, "is_gradient_checkpointing", True)
    if not checkpointing or is_kbit(model) or getattr(model, "is_quantized", False):
        return
    if hasattr(model, "enable_input_require_grads"):
        model.enable_input_require_grads()
    elif hasattr(model, "get_input_embeddings"):  # a model that is no transformers model

        def make_inputs_require_grad(module, inputs, output):
            output.requires_grad_(True)

        model.get_input_embeddings().register_forward_hook(make_inputs_require_grad)


def _freeze_for_inference(model: nn.Module) -> None:
    """``inference_mode=True``: a model prepared for inference trains nothing - no LoRA factor, no
    DoRA magnitude, no saved copy, no bias (peft's own deviations are registry entries)."""
    for param in model.parameters():
        param.requires_grad = False


def _type_of(model: nn.Module) -> str | None:
    return getattr(getattr(model, "config", None), "model_type", None)


def _inject_modules(model: nn.Module, settings: LoraSettings, profile: Profile, saved_guard: tuple[str, ...],
                    resolved: object, params_of, fifo: list[bool], deferred: list,
                    tied: tuple[str, ...] = ()) -> NoTargetMatched | None:
    """Wrap the module targets; ``fifo`` holds the shared fan_in_fan_out flag, updated in place.
    Returns the "nothing matched" rejection instead of raising it when parameters are targeted
    too (they may still match), else raises it; None when some module matched."""
    if settings.target_parameters and not resolved:
        return NoTargetMatched("no module targets", "no_target_modules")
    try:
        for target in iter_targets(model, settings, profile, saved_guard, targets=resolved, deferred=deferred):
            if target.name in tied:
                continue  # built after the others, tied to the input embedding's adapter (_tie_targets)
            layer, fifo[0] = wrap(target.name, target.module, fifo[0], profile.embedding_keeps_fan_in_fan_out)
            layer.add_adapter(ADAPTER, params_of(target.r, target.alpha, False))
            model.set_submodule(target.name, layer)
    except NoTargetMatched as exc:
        if not settings.target_parameters:
            raise
        return exc
    return None


def _tie_targets(model: nn.Module, tying: TyingPlan, settings: LoraSettings, profile: Profile, params_of,
                 fan_in_fan_out: bool) -> bool:
    """LoRA on each tied module, its factors the input embedding's (``reference.tying``); returns the
    shared fan_in_fan_out flag."""
    for key in tying.targets:
        if variant_family(settings.init_lora_weights, profile.init_variants) is not None:
            raise InvalidConfig("weight_tying_init_variant",
                                f"init_lora_weights={settings.init_lora_weights!r} builds {key!r}'s factors from its own "
                                "weight: they cannot also be the input embedding's (ensure_weight_tying)")
        embedding = model.get_input_embeddings()
        if not hasattr(embedding, "lora_embedding_A"):
            raise InvalidConfig("weight_tying_without_embedding_lora",
                                f"ensure_weight_tying ties {key!r} to the input embedding's LoRA, which it has not")
        layer, fan_in_fan_out = wrap(key, model.get_submodule(key), fan_in_fan_out, profile.embedding_keeps_fan_in_fan_out)
        layer.add_adapter(ADAPTER, params_of(pattern_value(key, settings.rank_pattern, settings.r),
                                             pattern_value(key, settings.alpha_pattern, settings.lora_alpha), False))
        with torch.no_grad():  # the tied layer's A init lands in the embedding's B (one storage)
            embedding.lora_embedding_B[ADAPTER].copy_(layer.lora_A[ADAPTER].weight.t())
        tie_factors(layer, embedding, ADAPTER)
        model.set_submodule(key, layer)
    return fan_in_fan_out


def prepare(model: nn.Module, adapter: AdapterSpec, training: TrainingSpec, profile: Profile) -> nn.Module:
    """Prepare ``model`` in place for LoRA training and return it.

    The steps follow upstream's order: config checks, optional k-bit preparation,
    target resolution, layer dispatch and creation, trainability, and finally the
    modules-to-save wrappers.
    """
    return prepare_wrapped(model, adapter, training, profile)[0]


def prepare_wrapped(
    model: nn.Module, adapter: AdapterSpec, training: TrainingSpec, profile: Profile
) -> tuple[nn.Module, PeftWrapper]:
    """:func:`prepare`, and what the PEFT wrapper around the result holds (its class, active
    adapters and stored adapter config: ``reference.peft_model``)."""
    settings = resolve(adapter, profile)
    if training.prepare_kbit:
        use_gc = training.gradient_checkpointing
        prepare_for_kbit_training(
            model,
            use_gradient_checkpointing=profile.gradient_checkpointing_default if use_gc is ABSENT else use_gc,
            gradient_checkpointing_kwargs=None
            if training.use_reentrant is ABSENT
            else {"use_reentrant": training.use_reentrant},
        )
    autocast = training.autocast_adapter_dtype
    autocast = profile.autocast_adapter_dtype_default if autocast is ABSENT else bool(autocast)
    tying = plan_tying(model, settings)
    settings = tying.settings

    fan_in_fan_out = settings.fan_in_fan_out
    if settings.target_modules is None and settings.target_parameters and _type_of(model) not in profile.default_targets:
        resolved = frozenset()  # parameters alone: no module targets needed
    else:
        resolved = effective_targets(model, settings, profile)
    stored_targets = condensed_targets(resolved, (name for name, _ in model.named_modules()))
    conversion = None
    if profile.moe_conversion:
        conversion = convert_moe_targets(
            model, resolved, settings.r, settings.lora_alpha, settings.rank_pattern, settings.alpha_pattern,
            resolved if settings.target_modules == "all-linear" else None)
    if conversion is not None:
        resolved, stored_targets = conversion.modules, conversion.stored_modules
        settings = dataclasses.replace(
            settings, rank_pattern=conversion.rank_pattern, alpha_pattern=conversion.alpha_pattern,
            target_parameters=frozenset((settings.target_parameters or frozenset()) | conversion.parameters))
    saved_guard = _saved_names(settings, profile, guarded=True)

    def params_of(r: int, alpha: float, fifo: bool) -> AdapterParams:
        return AdapterParams(
            r=r,
            alpha=alpha,
            dropout=settings.lora_dropout,
            use_rslora=settings.use_rslora,
            use_dora=settings.use_dora,
            dora_update_rounded_first=profile.dora_bnb_update_rounded_first,
            dora_norm_update_in_input_dtype=profile.dora_norm_update_in_input_dtype,
            init=settings.init_lora_weights,
            lora_bias=settings.lora_bias,
            autocast=autocast,
            follow_4bit_compute=profile.adapter_dtype_follows_4bit_compute,
            warn_no_base_bias=profile.warns_lora_bias_without_base_bias,
            init_variants=profile.init_variants,
            fan_in_fan_out=fifo,
            loftq_config=settings.loftq_config,
            loftq_quantizers=profile.loftq_quantizers,
        )

    shared_flag, deferred = [fan_in_fan_out], []
    try:
        unmatched = _inject_modules(model, settings, profile, saved_guard, resolved, params_of, shared_flag, deferred,
                                    tying.targets)
    except NoTargetMatched as exc:
        if exc.kind == "targets_not_found" and settings.target_modules == frozenset() and \
                "target_parameters" in profile.features:
            # peft >= 0.17 reads an empty list, where nothing was excluded, as "no module targets"
            raise NoTargetMatched("No target_modules passed but also no target_parameters found",
                                  "no_target_modules") from None
        raise
    fan_in_fan_out = shared_flag[0]
    wrapped: list[str] = []
    if settings.target_parameters:
        wrapped = inject_parameters(
            model, settings.target_parameters,
            lambda key: params_of(pattern_value(key, settings.rank_pattern, settings.r),
                                  pattern_value(key, settings.alpha_pattern, settings.lora_alpha), fan_in_fan_out),
            (LoraLinear, LoraEmbedding))
        if unmatched is not None and not wrapped:
            raise unmatched
        if unmatched is not None and resolved:
            warn("target_modules_unmatched", f"target_modules={settings.target_modules!r} were set but no module "
                                             "was matched")
        elif not wrapped:
            warn("target_parameters_unmatched", f"target_parameters={sorted(settings.target_parameters)} were set "
                                                "but no parameter was matched")
    elif unmatched is not None:
        raise unmatched
    fan_in_fan_out = _tie_targets(model, tying, settings, profile, params_of, fan_in_fan_out)
    for args in deferred:
        warn_unused(*args[:3], args[3] + wrapped + list(tying.targets))
    if not deferred and wrapped:  # parameters alone: no module walk counted excludes
        warn_unused(settings, profile, None, wrapped)
    _mark_trainable(model, settings.bias, profile.bias_all_substring)
    _wrap_saved(model, _saved_names(settings, profile, guarded=False), profile.saved_module_may_be_lora,
                trains=not settings.inference_mode)
    for key in tying.saved:  # tied modules to save: their trained copy holds the embedding copy's weight
        embedding_copy = model.get_input_embeddings().modules_to_save[ADAPTER]
        model.set_submodule(key, SavedModule(model.get_submodule(key), ADAPTER, trains=not settings.inference_mode,
                                             trained_copy=tied_saved_copy(embedding_copy)))
    if settings.trainable_token_indices:
        _refuse_tokens_on_saved_names(model, settings)
        wrap_trainable_tokens(model, settings.trainable_token_indices, ADAPTER, autocast, (LoraLinear, LoraEmbedding))
    # (after every wrapper: peft arranges it once the tuner, its saved modules and token rows are in place)
    _arrange_input_grads_for_checkpointing(model)
    if settings.inference_mode:
        _freeze_for_inference(model)
    return model, wrapper_of(settings, stored_config(settings, stored_targets, fan_in_fan_out), ADAPTER)

