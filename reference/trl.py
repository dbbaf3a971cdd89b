"""The trl level: how ``SFTTrainer`` prepares a model for LoRA, per trl era.

Two flows, selected by the installed trl version (read from metadata; trl is never
imported) or forced by name:

* ``classic`` (trl 0.15 - 0.21, ``_prepare_peft_model``): a quantized model that is
  not "sharded" goes through the k-bit step with the trainer's checkpointing
  settings; a 4-bit model whose first ``Params4bit`` lives on the CPU or the meta
  device counts as sharded (so every CPU 4-bit run takes that branch) and gets
  ``autocast_adapter_dtype=False``; otherwise checkpointing only arranges input
  grads (reentrant); with ``bf16`` a non-sharded 4-bit model gets norms in fp32 and
  embeddings / head in bf16.
* ``current`` (trl >= 0.26, pinned 1.16): plain ``get_peft_model``; with
  checkpointing, input grads whatever ``use_reentrant`` says; every trainable
  parameter of a quantized model cast to bf16 (DoRA magnitudes excepted, trl 1.15+);
  the Trainer writes ``use_cache=False``; LoRA on the output head is rejected.

Observed rules: ``docs/spec/trl-notes.md``.
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
from dataclasses import dataclass
from importlib import metadata

import torch
import transformers
from packaging.specifiers import SpecifierSet
from packaging.version import Version
from torch import nn

from reference.errors import InvalidConfig
from reference.kbit import is_kbit, prepare_for_kbit_training, prepare_for_kbit_training_norms_only
from reference.merge import merge_and_unload
from reference.trained import give_trained_values
from reference.peft_model import PeftWrapper
from reference.prepare import prepare_wrapped
from reference.profiles import Profile
from reference.versions import release
from reference.spec import ABSENT, AdapterSpec, TrainingSpec

__all__ = ["TRL_FLOWS", "TrlFlow", "TrlResult", "prepare_trl", "select_trl_flow", "trl_selection_note"]


@dataclass(frozen=True)
class TrlFlow:
    """One trl era's SFTTrainer preparation."""

    name: str
    trl: str
    """The trl versions it covers, as a PEP 440 specifier."""
    gradient_checkpointing_default: bool
    """``SFTConfig.gradient_checkpointing`` when not given."""
    classic: bool
    """The ``_prepare_peft_model`` shape (trl 0.15 - 0.21)."""
    shape: str = "inline"
    """``classic`` (trainer method ``_prepare_peft_model``), ``helper`` (the module-level
    ``prepare_peft_model``: k-bit step, checkpointing turned on at construction, bf16 module
    cast) or ``inline`` (plain ``get_peft_model`` and a bf16 cast of a quantized model's
    trainables, in the trainer's ``__init__``)."""
    peft_model_with_config: str = "reject"
    """A PeftModel passed together with a ``peft_config``: ``ignore`` (the config is
    dropped), ``merge`` (``merge_and_unload``, then a fresh adapter) or ``reject``."""
    kbit_step_turns_off_trainer_gc: bool = False
    """After the k-bit step, ``args.gradient_checkpointing`` is set to False on the
    trainer's own args (before: on a copy)."""
    rejects_head_lora: bool = True
    """LoRA on the output head is an error."""
    bf16_cast_skips_dora_magnitude: bool = True
    """The bf16 cast of a quantized model's trainables leaves DoRA magnitudes in fp32."""
    syncs_router_aux_loss: bool = True
    """The trainer writes the MoE router's auxiliary loss switch into the model config
    (``output_router_logits`` on whenever the coefficient is non-zero)."""
    mirrors_pad_token: bool = True
    """The trainer writes its tokenizer's pad token id into the model's (text) config."""
    takes_quantization_config: bool = False
    """The trainer has a ``quantization_config`` argument (trl PR #6157; observed on 1.16)."""
    clones_chat_template: bool = False
    """``chat_template_path`` is checked (observed on 0.19.1 and 1.16.0): a tokenizer path is cloned
    (``reference.chat_template``)."""
    template_tokens_trainable: bool = True
    """The tokens a cloned template added are made trainable (1.16; 0.19 leaves them untrained)."""
    template_eos_on_text_config: bool = True
    """A cloned template's end-of-sequence id is written to the text config (1.16), else to the
    top-level config (0.19): the same object but for a vision-language model's composite config."""
    loads_image_text_paths: bool = True
    """A checkpoint path loads with the class its config names (``config.architectures``), so a
    vision-language checkpoint loads as itself (trl PR #3862, Aug 2025).  Before, with
    ``AutoModelForCausalLM`` (trl#3099; observed on 0.19.1): llava / qwen2_vl raise, mllama loads
    the text-only ``MllamaForCausalLM`` without its vision tower.  Such path loads are not
    generated (the harness's reference loads a checkpoint as the zoo's class)."""
    kbit_step: str = "peft"
    """Which k-bit step the classic / helper shapes run: ``peft`` (peft's
    ``prepare_model_for_kbit_training``: every fp16/bf16 parameter that is not 4-bit-packed
    to fp32, input grads only with reentrant checkpointing) or ``norms`` (trl 0.25's own
    copy: only parameters named like a norm to fp32, input grads whenever checkpointing is
    on).  Unused by the inline shape, which has no k-bit step."""


# Each era is the previous one with the rules that changed; a change is written once, here.
_CLASSIC = TrlFlow(
    "classic", ">=0.15,<0.22", gradient_checkpointing_default=False, classic=True, shape="classic",
    peft_model_with_config="ignore", rejects_head_lora=False, bf16_cast_skips_dora_magnitude=False,
    syncs_router_aux_loss=False, mirrors_pad_token=False,
    # observed on 0.19.1 (earlier classic releases not checked): a chat template is cloned (tokens
    # added, embeddings resized), but the added rows are left untrained (no trainable tokens, no saved lm_head)
    clones_chat_template=True, template_tokens_trainable=False, loads_image_text_paths=False,
    template_eos_on_text_config=False,
)
# trl 0.22.0: _prepare_peft_model became the module-level helper trl.models.utils.prepare_peft_model:
# SFTConfig.gradient_checkpointing defaults to True; with checkpointing and no k-bit step the model's
# gradient_checkpointing_enable() runs at construction; a PeftModel + peft_config is merged and
# unloaded, then gets the new adapter.
_HELPER = dataclasses.replace(
    _CLASSIC, name="helper", trl=">=0.22,<0.23", gradient_checkpointing_default=True, classic=False,
    shape="helper", peft_model_with_config="merge", clones_chat_template=False,  # (chat templates not checked there)
    loads_image_text_paths=True, template_eos_on_text_config=True,
)
# trl 0.23.0, PR #3981 (fixes #3980): `args.gradient_checkpointing = False` instead of
# `dataclasses.replace(args, ...)`, so the trainer's args lose checkpointing after the k-bit step.
_HELPER_023 = dataclasses.replace(_HELPER, name="helper-0.23", trl=">=0.23,<0.25", kbit_step_turns_off_trainer_gc=True)
# trl 0.25.0, PR #4335 ("Added custom prepare_model_for_kbit_training to save VRAM"): prepare_peft_model
# calls trl's own k-bit step, which upcasts only norm parameters (by name) and arranges input grads
# whatever use_reentrant says; embeddings, heads, biases and unquantized linears keep the load dtype
# (observed on trl 0.25.1: bart / llama 8-bit fp16 keep fp16 embeddings, falcon 4-bit its FalconLinears).
_HELPER_025 = dataclasses.replace(_HELPER_023, name="helper-0.25", trl=">=0.25,<0.26", kbit_step="norms")
# trl 0.26.0, PR #4577 ("Clean up model preparation"): prepare_peft_model dropped from SFTTrainer; no k-bit
# step, no checkpointing at construction, input grads whenever checkpointing is on, and every trainable
# parameter of a quantized model cast to bf16 (QLoRA paper; peft issue #2889).
_INLINE = dataclasses.replace(
    _HELPER_025, name="inline", trl=">=0.26,<0.27", shape="inline", kbit_step_turns_off_trainer_gc=False,
)
# trl 0.27.0, PR #4713: a PeftModel together with a peft_config is rejected (was merged and unloaded).
_INLINE_027 = dataclasses.replace(_INLINE, name="inline-0.27", trl=">=0.27,<1.7", peft_model_with_config="reject")
# trl 1.7.0: SFTTrainer keeps an MoE config's router aux loss in sync with `router_aux_loss_coef`
# (SFTConfig's, else the config's own): `output_router_logits` is turned on when the coefficient is
# non-zero, so the training loss includes the load-balancing term (read from the 1.7.0 - 1.16.0
# wheels, absent from 1.6.0; observed on 1.16.0 as a loss difference on mixtral / qwen*_moe).
_INLINE_17 = dataclasses.replace(_INLINE_027, name="inline-1.7", trl=">=1.7,<1.14", syncs_router_aux_loss=True)
# trl 1.14.0: without a data collator, SFTTrainer mirrors the tokenizer's pad token onto the model
# ("the model must agree with the tokenizer on the pad token from construction"): the text config's
# pad_token_id (and the generation config's) become the tokenizer's (read from the 1.14.0 and 1.15.0
# wheels, absent from 1.13.0; found by the harness on 1.16.0 as a model.config write).
_INLINE_114 = dataclasses.replace(_INLINE_17, name="inline-1.14", trl=">=1.14,<1.15", mirrors_pad_token=True)
# trl 1.15.0: LoRA on the output head is rejected (the loss reads lm_head.weight directly), and the QLoRA
# bf16 cast skips DoRA's lora_magnitude_vector (trl issue #7268).
# trl PR #6157 (June 2026; observed on 1.16.0): a `quantization_config` trainer argument, merged into the
# model_init_kwargs of a path load (both places: ValueError), documented as ignored beside a model object.
_CURRENT = dataclasses.replace(
    _INLINE_114, name="current", trl=">=1.15", rejects_head_lora=True, bf16_cast_skips_dora_magnitude=True,
    takes_quantization_config=True, clones_chat_template=True, template_tokens_trainable=True,
)

TRL_FLOWS: dict[str, TrlFlow] = {
    f.name: f for f in (_CLASSIC, _HELPER, _HELPER_023, _HELPER_025, _INLINE, _INLINE_027, _INLINE_17, _INLINE_114, _CURRENT)
}
_NEWEST_FLOW = "current"
_NEWEST_KNOWN_TRL = (1, 16)
"""The newest trl release whose flow was checked; a newer one selects the newest flow, with a warning."""
_OLDEST_TRL = (0, 15)


@functools.lru_cache(maxsize=1)
def _installed_trl() -> str | None:
    """The installed trl version, read once per process (select_trl_flow runs per example)."""
    try:
        return metadata.version("trl")
    except metadata.PackageNotFoundError:
        return None


def trl_selection_note(version: str | None) -> str | None:
    """Why the flow for trl ``version`` is a guess (newer than the newest known flow, or older
    than the oldest), or None when a flow covers it."""
    if version is None:
        return None
    found = release(version)
    if found and found[:2] > _NEWEST_KNOWN_TRL:
        return (
            f"trl {version} is newer than the newest known trl flow "
            f"({_NEWEST_FLOW!r}, trl <= {'.'.join(map(str, _NEWEST_KNOWN_TRL))}); using it anyway"
        )
    if found and found[:2] < _OLDEST_TRL:
        return f"trl {version} is older than the oldest known trl flow ('classic', trl >= 0.15); using it anyway"
    return None


def _flow_for(version: str) -> TrlFlow:
    v = Version(version)
    if v.is_prerelease or v.is_devrelease:
        v = Version(v.base_version)  # a 0.26.0.dev0 build already has 0.26's code
    for flow in TRL_FLOWS.values():
        if SpecifierSet(flow.trl).contains(v, prereleases=True):
            return flow
    return TRL_FLOWS["classic"] if v < Version("0.15") else TRL_FLOWS[_NEWEST_FLOW]


def select_trl_flow(name: str | None = None, version: str | None = None) -> TrlFlow:
    """The flow named ``name``, or the one the (installed) trl version selects.

    A version newer than the newest known flow selects it with a warning (see
    :func:`trl_selection_note`)."""
    if name is not None:
        if name not in TRL_FLOWS:
            raise ValueError(f"trl flow={name!r} is not one of {', '.join(TRL_FLOWS)}")
        return TRL_FLOWS[name]
    if version is None:
        version = _installed_trl()
        if version is None:
            return TRL_FLOWS[_NEWEST_FLOW]
        return _installed_flow(version)
    note = trl_selection_note(version)
    if note:
        warnings.warn(note, stacklevel=2)
    return _flow_for(version)


@functools.lru_cache(maxsize=4)
def _installed_flow(version: str) -> TrlFlow:
    """The installed trl's flow; its warning, if any, is issued once per process."""
    note = trl_selection_note(version)
    if note:
        warnings.warn(note, stacklevel=3)
    return _flow_for(version)


@dataclass(frozen=True)
class TrlResult:
    """The prepared model and the trainer-level facts the snapshot records."""

    model: nn.Module
    trainer_gradient_checkpointing: bool
    wrapper: PeftWrapper
    """The PEFT wrapper the trainer holds (``trainer.model``)."""


def _sharded_4bit(model: nn.Module) -> bool:
    """classic trl: a 4-bit model is "sharded" when its first Params4bit is on cpu/meta."""
    if not getattr(model, "is_loaded_in_4bit", False):
        return False
    import bitsandbytes as bnb  # a 4-bit model implies bitsandbytes

    for param in model.parameters():
        if isinstance(param, bnb.nn.Params4bit):
            return param.data.device.type in ("cpu", "meta")
    return False


def _cast_for_bf16(model: nn.Module) -> None:
    """classic trl's bf16 step for 4-bit models: norms to fp32, fp32 embeddings and head to bf16."""
    for name, module in model.named_modules():
        if "norm" in name or isinstance(module, nn.LayerNorm):
            module.to(torch.float32)
        elif any(part in name for part in ("lm_head", "embed_tokens", "wte", "wpe")):
            weight = getattr(module, "weight", None)
            if weight is not None and weight.dtype == torch.float32:
                module.to(torch.bfloat16)


def _reject_head_lora(model: nn.Module) -> None:
    get = getattr(model, "get_output_embeddings", None)
    head = get() if get is not None else None
    if head is not None and hasattr(head, "lora_A"):
        raise InvalidConfig("trl_lm_head_lora", "a LoRA adapter on the output head is never trained by SFTTrainer")


def _trainer_writes_use_cache() -> bool:
    """transformers 5's Trainer writes ``args.use_cache`` (default False) into the model's config
    at the end of ``__init__``, whatever trl does; transformers 4 leaves it alone."""
    return int(transformers.__version__.split(".")[0]) >= 5


def _finish(model: nn.Module, trainer_gc: bool, wrapper: PeftWrapper) -> TrlResult:
    if _trainer_writes_use_cache() and getattr(model, "config", None) is not None:
        model.config.use_cache = False
    return TrlResult(model, trainer_gc, wrapper)


def _helper_checkpointing(model: nn.Module, kwargs: dict) -> None:
    """helper trl without a k-bit step: checkpointing on at construction (no kwargs passed on),
    and input grads unless ``use_reentrant`` is False."""
    model.gradient_checkpointing_enable()
    if kwargs.get("use_reentrant", True):
        model.enable_input_require_grads()


def _peft_model_in(model: nn.Module, adapter: AdapterSpec, training: TrainingSpec, profile: Profile,
                   flow: TrlFlow, gc: bool, trained_seed: int | None) -> TrlResult:
    """The trainer gets a model that ``get_peft_model`` already prepared.

    classic: returned as it is (a peft_config passed too is silently ignored; no input
    grads at construction).  helper / inline up to trl 0.26: with a peft_config too, the
    adapter is merged and unloaded and the base model prepared afresh; from trl 0.27 that
    pair is an error.  Without one: helper turns checkpointing on (no k-bit step for a
    PeftModel) and casts 4-bit modules for bf16; inline arranges input grads and casts a
    quantized model's trainables to bf16.  (trl 0.20 - 0.23.0 froze the adapter in the
    k-bit step: a known divergence, not a flow rule.)
    """
    quantized = is_kbit(model)
    # The PeftModel is built first (its own errors come first), then handed to the trainer.
    _, wrapper = prepare_wrapped(
        model, adapter, dataclasses.replace(training, prepare_kbit=False, autocast_adapter_dtype=ABSENT), profile)
    if trained_seed is not None:
        give_trained_values(model, trained_seed)  # the adapter a user trained and now hands over
    if flow.classic:
        return _finish(model, gc, wrapper)
    if training.peft_config_too:
        if flow.peft_model_with_config == "reject":
            raise InvalidConfig("trl_peft_model_with_config", "a PeftModel together with a peft_config is rejected")
        if flow.peft_model_with_config == "merge":
            merge_and_unload(model, profile)
            return prepare_trl(model, adapter, dataclasses.replace(training, peft_model_in=False), profile, flow)
        return _finish(model, gc, wrapper)
    if flow.shape == "helper":
        kwargs = {} if training.use_reentrant is ABSENT else {"use_reentrant": training.use_reentrant}
        if gc:
            _helper_checkpointing(model, kwargs)
        if training.bf16 and getattr(model, "is_loaded_in_4bit", False) and not _sharded_4bit(model):
            _cast_for_bf16(model)
        return _finish(model, gc, wrapper)
    return _current_after_peft(model, gc, quantized, flow, wrapper)


def _current_after_peft(model: nn.Module, gc: bool, quantized: bool, flow: TrlFlow, wrapper: PeftWrapper) -> TrlResult:
    """inline trl, once the model is a PEFT model: input grads with checkpointing, the bf16
    cast of a quantized model's trainables (not DoRA magnitudes, trl 1.15+)."""
    if gc:
        model.enable_input_require_grads()
    if quantized:
        for name, param in model.named_parameters():
            if not param.requires_grad:
                continue
            if flow.bf16_cast_skips_dora_magnitude and "lora_magnitude_vector" in name:
                continue
            param.data = param.data.to(torch.bfloat16)
    return _finish(model, gc, wrapper)


def _sync_router_aux_loss(model: nn.Module) -> None:
    """trl >= 1.7: an MoE config with a ``router_aux_loss_coef`` gets ``output_router_logits``
    on when the coefficient is non-zero (the harness never sets SFTConfig's, so the config's
    own coefficient decides), off otherwise."""
    text_config = _text_config(model)
    if text_config is not None and hasattr(text_config, "router_aux_loss_coef"):
        text_config.output_router_logits = (
            hasattr(text_config, "output_router_logits") and text_config.router_aux_loss_coef != 0.0
        )


def prepare_trl(
    model: nn.Module, adapter: AdapterSpec, training: TrainingSpec, profile: Profile, flow: TrlFlow,
    *, pad_token_id: int | None = None, trained_seed: int | None = None,
) -> TrlResult:
    """Prepare ``model`` as ``SFTTrainer(model, args, peft_config=..., processing_class=tokenizer)``
    does at construction; ``pad_token_id`` is the tokenizer's, and ``trained_seed`` gives a
    passed-in PeftModel's adapter its trained values (``reference.trained``).  (The other trainers:
    ``reference.trainer_flows``.)"""
    result = _prepare_trl(model, adapter, training, profile, flow, trained_seed)
    if flow.syncs_router_aux_loss:
        _sync_router_aux_loss(result.model)
    if flow.mirrors_pad_token and pad_token_id is not None:
        _text_config(result.model).pad_token_id = pad_token_id
    return result


def _text_config(model: nn.Module):
    config = getattr(model, "config", None)
    get_text = getattr(config, "get_text_config", None)
    return get_text() if get_text is not None else config


def _prepare_trl(
    model: nn.Module, adapter: AdapterSpec, training: TrainingSpec, profile: Profile, flow: TrlFlow,
    trained_seed: int | None = None,
) -> TrlResult:
    gc = training.gradient_checkpointing
    gc = flow.gradient_checkpointing_default if gc is ABSENT else bool(gc)
    if training.peft_model_in:
        return _peft_model_in(model, adapter, training, profile, flow, gc, trained_seed)
    kwargs = {} if training.use_reentrant is ABSENT else {"use_reentrant": training.use_reentrant}
    peft_step = dataclasses.replace(training, prepare_kbit=False, autocast_adapter_dtype=ABSENT)
    if flow.shape in ("classic", "helper"):
        quantized, sharded = is_kbit(model), _sharded_4bit(model)
        trainer_gc = gc
        if quantized and not sharded:
            kbit_step = prepare_for_kbit_training_norms_only if flow.kbit_step == "norms" else prepare_for_kbit_training
            kbit_step(model, use_gradient_checkpointing=gc, gradient_checkpointing_kwargs=kwargs)
            if flow.kbit_step_turns_off_trainer_gc:
                trainer_gc = False
        elif gc and flow.shape == "helper":
            _helper_checkpointing(model, kwargs)
        elif gc and kwargs.get("use_reentrant", True):
            model.enable_input_require_grads()
        if sharded:
            peft_step = dataclasses.replace(peft_step, autocast_adapter_dtype=False)
        _, wrapper = prepare_wrapped(model, adapter, peft_step, profile)
        if training.bf16 and getattr(model, "is_loaded_in_4bit", False) and not sharded:
            _cast_for_bf16(model)
        if flow.rejects_head_lora:
            _reject_head_lora(model)
        return _finish(model, trainer_gc, wrapper)
    quantized = is_kbit(model)
    _, wrapper = prepare_wrapped(model, adapter, peft_step, profile)
    if flow.rejects_head_lora:
        _reject_head_lora(model)
    return _current_after_peft(model, gc, quantized, flow, wrapper)
