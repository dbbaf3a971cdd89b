"""The upstream driver: the only module of the harness that imports peft and trl.

Everything upstream-specific lives here: how a case becomes upstream calls, and
how upstream's exception messages map to the reference's error kinds.  To test a
fork, install it in the environment; nothing here names a version.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import re
from typing import Any

from torch import nn

from reference.errors import builtin_class
from reference.spec import ABSENT, Case

__all__ = [
    "classify_error",
    "classify_warning",
    "config_mutations",
    "prepare_peft",
    "prepare_trl",
    "trainer_classes",
    "versions",
    "wrapper_facts",
]


def versions() -> dict[str, str]:
    """The installed stack, read from the imported modules themselves."""
    import bitsandbytes
    import peft
    import torch
    import transformers

    out = {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__}
    out["bitsandbytes"] = bitsandbytes.__version__
    try:
        import trl

        out["trl"] = trl.__version__
    except ImportError:  # trl is only needed for the trl level
        out["trl"] = "absent"
    return out


# LoraConfig fields that are bookkeeping, not the user's request: peft fills them in.
_BOOKKEEPING = frozenset({"base_model_name_or_path", "revision", "peft_version", "auto_mapping", "inference_mode"})


def config_mutations(config: Any, given: dict[str, Any]) -> tuple[str, ...]:
    """The LoraConfig fields that preparation changed on the user's own config object, compared
    in the normal form of stored configs (``conformance.engine.facts.normal_value``: None and an
    empty list are the same, and so are a list and a set of the same names)."""
    import dataclasses

    from peft import LoraConfig

    from conformance.engine.facts import normal_value

    fresh = LoraConfig(**given)
    return tuple(
        sorted(
            f.name
            for f in dataclasses.fields(fresh)
            if f.name not in _BOOKKEEPING and normal_value(getattr(fresh, f.name)) != normal_value(getattr(config, f.name, None))
        )
    )


def wrapper_facts(wrapper: Any) -> tuple[str, tuple[str, ...], dict[str, Any]]:
    """(class name, active adapters, the active adapter's stored config fields) of a PeftModel."""
    from conformance.engine.facts import ADAPTER_CONFIG_KEYS

    active = getattr(wrapper, "active_adapters", None)
    if active is None:
        active = getattr(wrapper, "active_adapter", "default")
    active = [active] if isinstance(active, str) else list(active)
    configs = getattr(wrapper, "peft_config", {})
    config = configs.get(active[0]) if active else next(iter(configs.values()), None)
    stored = {key: getattr(config, key) for key in ADAPTER_CONFIG_KEYS if hasattr(config, key)}
    return type(wrapper).__name__, tuple(active), stored


def _saved_adapter(source: nn.Module, case: Case, directory: str) -> tuple[str, ...]:
    """A trained adapter saved by upstream (``training.load_saved``): ``get_peft_model`` of the
    case's adapter on ``source`` (no k-bit step, default dtypes), the seeded values of
    ``reference.trained``, ``save_pretrained``.  Returns the config fields it mutated."""
    from peft import LoraConfig, get_peft_model

    from reference.trained import give_trained_copies, give_trained_values, trained_seed

    config = LoraConfig(**case.adapter.given())
    saved_from = get_peft_model(source, config)
    give_trained_values(saved_from.base_model.model, trained_seed(case))
    give_trained_copies(saved_from.base_model.model, trained_seed(case))
    saved_from.save_pretrained(directory)
    return config_mutations(config, case.adapter.given())


def prepare_peft(model: nn.Module, case: Case, source: nn.Module | None = None) -> tuple[nn.Module, tuple[str, ...], Any]:
    """``prepare_model_for_kbit_training`` (if asked) then ``get_peft_model``; with
    ``training.load_saved``, ``PeftModel.from_pretrained`` of an adapter trained and saved from
    ``source`` (a fresh load of the same model) instead.

    Returns the transformers model inside the PEFT wrapper (its parameter paths are
    those of the reference's prepared model), the LoraConfig fields it mutated, and the
    PeftModel itself.
    """
    from peft import LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training

    t = case.training
    directory = None
    if t.load_saved:
        import tempfile

        directory = tempfile.TemporaryDirectory(prefix="conformance-adapter-")
        mutations = _saved_adapter(source, case, directory.name)
    if t.prepare_kbit:
        kwargs: dict[str, Any] = {}
        if t.gradient_checkpointing is not ABSENT:
            kwargs["use_gradient_checkpointing"] = t.gradient_checkpointing
        if t.use_reentrant is not ABSENT:
            kwargs["gradient_checkpointing_kwargs"] = {"use_reentrant": t.use_reentrant}
        model = prepare_model_for_kbit_training(model, **kwargs)
    kwargs = {}
    if t.autocast_adapter_dtype is not ABSENT:
        kwargs["autocast_adapter_dtype"] = t.autocast_adapter_dtype
    if directory is not None:
        with directory:
            if t.is_trainable is not ABSENT:
                kwargs["is_trainable"] = t.is_trainable
            peft_model = PeftModel.from_pretrained(model, directory.name, **kwargs)
        return peft_model.base_model.model, mutations, peft_model
    config = LoraConfig(**case.adapter.given())
    peft_model = get_peft_model(model, config, **kwargs)
    if case.second_adapter is not None:
        peft_model.add_adapter("second", LoraConfig(**case.second_adapter.given()))
        if t.set_adapter is not ABSENT:
            peft_model.set_adapter(t.set_adapter)
    return peft_model.base_model.model, config_mutations(config, case.adapter.given()), peft_model


@functools.lru_cache(maxsize=1)
def memoize_accelerate_package_lookups() -> None:
    """Make accelerate remember which packages are installed.

    ``accelerate.utils.imports._is_package_available`` reads the package's metadata from disk
    on every call, and SFTTrainer's set-up asks ``is_peft_model`` (so ``is_peft_available``)
    about a dozen times: some 12 ms per trainer.  The installed packages do not change while
    the harness runs, so the answers are kept per (package, metadata name); nothing else of
    accelerate is touched.  Idempotent; an accelerate without that helper is left alone.
    """
    try:
        from accelerate.utils import imports
    except ImportError:
        return
    lookup = getattr(imports, "_is_package_available", None)
    if lookup is None or hasattr(lookup, "cache_info"):
        return
    imports._is_package_available = functools.lru_cache(maxsize=None)(lookup)


_TRAINER_CLASSES = {
    "sft": "SFT", "dpo": "DPO", "kto": "KTO", "reward": "Reward", "grpo": "GRPO", "rloo": "RLOO",
    "orpo": "ORPO", "cpo": "CPO", "bco": "BCO",
}
"""A trainer's short name -> the prefix of its trl classes (``<X>Trainer``, ``<X>Config``)."""


def trainer_classes(trainer: str) -> tuple[Any, Any]:
    """(``<X>Trainer``, ``<X>Config``) of the installed trl, from its top level, else from
    ``trl.experimental`` (where trl 0.26+ moved some trainers)."""
    import importlib

    import trl

    prefix = _TRAINER_CLASSES[trainer]
    places = [trl]
    with contextlib.suppress(ImportError):
        places.append(importlib.import_module(f"trl.experimental.{trainer}"))
    for place in places:
        found = getattr(place, f"{prefix}Trainer", None), getattr(place, f"{prefix}Config", None)
        if found[0] is not None and found[1] is not None:
            return found
    raise ImportError(f"trl {trl.__version__} has no {prefix}Trainer")


def _trainer_inputs(trainer: str) -> dict[str, Any]:
    """The dataset (and reward function) each trainer is built with (``conformance.engine.offline``)."""
    from conformance.engine import offline
    from reference.trainers import TRAINERS

    if trainer == "sft":
        return {"train_dataset": offline.dataset()}
    kind = next(r.dataset for r in TRAINERS if r.trainer == trainer)
    out: dict[str, Any] = {"train_dataset": offline.trainer_dataset(kind)}
    if kind == "prompts":
        out["reward_funcs"] = offline.reward_function
    return out


def _trainer_args(trainer: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    """``kwargs`` plus what ``trainer``'s config needs to build offline: SFT's pre-tokenized
    dataset; GRPO's / RLOO's group size (two prompts, two generations each)."""
    from conformance.engine import offline

    if trainer == "sft":
        return dict(kwargs, dataset_kwargs=dict(offline.DATASET_KWARGS))
    if trainer in ("grpo", "rloo"):
        return dict(kwargs, per_device_train_batch_size=2, num_generations=2, max_completion_length=4)
    return kwargs


def prepare_trl(model: nn.Module | str, case: Case) -> tuple[nn.Module, bool, tuple[str, ...], Any]:
    """``<Trainer>(model, args, peft_config=LoraConfig(...))``, built offline; the trainer is
    ``training.trainer`` (SFTTrainer when absent).

    ``model`` is a loaded model, or a checkpoint directory that the trainer loads with
    ``model_init_kwargs`` (dtype and quantization config).  Returns the transformers
    model inside the PEFT wrapper, the trainer's final ``args.gradient_checkpointing``,
    the LoraConfig fields preparation mutated, and the trainer's PeftModel.
    """
    import shutil
    import tempfile

    import trl
    from peft import LoraConfig

    from conformance.engine import offline
    from conformance.engine.models import quantization_config

    memoize_accelerate_package_lookups()
    t = case.training
    trainer_class, config_class = trainer_classes(t.trainer_name)
    out = tempfile.mkdtemp(prefix="conformance-trl-")
    kwargs: dict[str, Any] = dict(
        output_dir=out, report_to="none", max_steps=1, use_cpu=t.device == "cpu", bf16=t.bf16, fp16=t.fp16,
    )
    if t.gradient_checkpointing is not ABSENT:
        kwargs["gradient_checkpointing"] = t.gradient_checkpointing
    if t.use_reentrant is not ABSENT:
        kwargs["gradient_checkpointing_kwargs"] = {"use_reentrant": t.use_reentrant}
    if isinstance(model, str):
        # trl 1.x names the dtype key `dtype`; 0.x `torch_dtype`.
        dtype_key = "dtype" if int(trl.__version__.split(".")[0]) >= 1 else "torch_dtype"
        init: dict[str, Any] = {dtype_key: case.model.load_dtype}
        bnb = quantization_config(case.quant)
        if bnb is not None and t.quantization_config_in in (ABSENT, "model_init_kwargs", "both"):
            init["quantization_config"] = bnb
        kwargs["model_init_kwargs"] = init
    extra: dict[str, Any] = {}
    if t.quantization_config_in in ("trainer", "both"):  # the trainer's own argument (trl >= 1.16)
        extra["quantization_config"] = quantization_config(case.quant)
    peft_config: Any = LoraConfig(**case.adapter.given())
    user_config = peft_config
    if t.peft_model_in:
        from peft import get_peft_model

        from reference.trained import give_trained_values, trained_seed

        model = get_peft_model(model, peft_config)
        give_trained_values(model.base_model.model, trained_seed(case))  # a trained adapter is handed over
        peft_config = LoraConfig(**case.adapter.given()) if t.peft_config_too else None
    processing_class = offline.tokenizer()
    if t.chat_template is not ABSENT:  # the trainer adds the template's tokens to its tokenizer: give it a copy
        import copy

        import torch

        from reference.trained import template_seed

        kwargs["chat_template_path"] = offline.chat_template_paths()[t.chat_template]
        processing_class = copy.deepcopy(processing_class)
        torch.manual_seed(template_seed(case))  # the new embedding rows are drawn as the reference draws them
    try:
        trainer = trainer_class(
            model=model,
            args=config_class(**_trainer_args(t.trainer_name, kwargs)),
            processing_class=processing_class,
            peft_config=peft_config,
            **_trainer_inputs(t.trainer_name),
            **extra,
        )
        mutations = config_mutations(user_config, case.adapter.given())
        return trainer.model.base_model.model, bool(trainer.args.gradient_checkpointing), mutations, trainer.model
    finally:
        shutil.rmtree(out, ignore_errors=True)


# Upstream messages -> the reference's error kinds.  First match wins; the
# patterns name the distinctive part of each message, observed in peft 0.15-0.21.
_ERROR_KINDS: tuple[tuple[str, str], ...] = (
    ("invalid_r", r"`r` should be a positive integer"),
    ("merge_lora_bias_without_base_bias", r"Impossible to merge LoRA with `lora_bias=True` because the base layer has no bias"),
    # peft's bitsandbytes merge reads the base bias without checking it exists (peft #2716, #3741).
    ("merge_reads_a_missing_bias", r"'NoneType' object has no attribute 'data'"),
    ("no_default_targets", r"Please specify `target_modules`"),
    ("layers_with_regex_targets", r"`layers_to_transform` cannot be used when `target_modules` is a str"),
    ("layers_with_regex_targets", r"`layers_pattern` cannot be used when `target_modules` is a str"),
    ("layers_pattern_without_layers", r"When `layers_pattern` is specified, `layers_to_transform` must also"),
    ("unsupported_module", r"Target module .* is not supported"),
    ("dora_lora_bias", r"lora_bias=True is not supported for DoRA"),
    ("lora_bias_unsupported", r"lora_bias=True is not supported for"),
    ("lora_bias_init", r"lora_bias=True is only supported with init_lora_weights"),
    ("unknown_init", r"Unknown initialization init_lora_weights"),
    ("pissa_quantized", r"Please initialize PiSSA under float32"),
    ("orthogonal_odd_rank", r"Orthogonal initialization requires the LoRA rank to be even"),
    # "pissa_niter_K": K read with int() (a ValueError quoting the literal), other counts of "_niter_"
    ("pissa_niter_not_int", r"^invalid literal for int\(\) with base 10"),
    ("pissa_malformed", r"init_lora_weights should be 'pissa' or 'pissa_niter_\[number of iters\]'"),
    ("loftq_needs_scipy", r"The required package 'scipy' is not installed"),
    ("loftq_config_missing", r"`loftq_config` must be specified when `init_lora_weights` is 'loftq'"),
    ("loftq_bits", r"Only nf4 and int8 quantization is supported|Only support 2, 4, 8 bits quantization"),
    ("loftq_iter", r"Number of iterations must be greater than 0"),
    ("loftq_block_size", r"is not dividable by block size"),
    # peft's LoftQ moves the weight to CUDA whatever the device (peft 0.15 - 0.21)
    ("loftq_needs_cuda", r"Torch not compiled with CUDA enabled|Found no NVIDIA driver|No CUDA GPUs are available"),
    ("tokens_on_lora_layer", r"trainable_token_indices cannot be applied to modules of type"),
    ("tokens_on_saved_module", r"The embedding layer is already marked to be trained fully"),
    ("token_index_out_of_range", r"index -?\d+ is out of bounds for dimension 0 with size \d+"),
    ("invalid_dropout", r"dropout probability has to be between 0 and 1"),
    ("saved_module_quantized", r"only Tensors of floating point dtype can require gradients"),
    ("saved_module_is_lora", r"modules_to_save cannot be applied to modules of type"),
    ("trl_lm_head_lora", r"Applying a PEFT adapter to `lm_head` is not supported"),
    ("trl_peft_model_with_config", r"You passed a `PeftModel` instance together with a `peft_config`"),
    ("quantization_config_twice", r"You set `quantization_config` both as a trainer argument and in `args.model_init_kwargs`"),
    ("quantization_config_with_model", r"You passed `quantization_config` to the trainer, but your model is already"),
    # Nothing targeted: one kind per reason peft gives (peft 0.15 - 0.21 choose the message from
    # what the walk saw: nothing excluded / some modules excluded / every module excluded / no targets).
    ("targets_not_found", r"Target modules .* not found in the base model"),
    ("nothing_targeted", r"No modules were targeted for adaptation"),
    ("all_excluded", r"All modules were excluded"),
    ("no_target_modules", r"No `target_modules` passed but also no `target_parameters` found"),
    ("invalid_bias", r"Requested bias: .*, is not implemented"),
    # add_adapter: peft trains biases for one adapter at most
    ("several_adapters_with_bias", r"supports only 1 adapter with bias"),
    # transformers >= 5.18 removed what PeftModelForSeq2SeqLM saves (peft < 0.21.2).
    ("seq2seq_generation_kwargs_missing", r"_prepare_encoder_decoder_kwargs_for_generation"),
    # peft >= 0.17's parameter-level LoRA (target_parameters) rejects some options.
    ("param_wrapper_unsupported", r"lora\.ParamWrapper does not work with"),
    ("param_on_lora_module", r"Trying to wrap an `nn\.Parameter` of layer"),
    ("param_on_top_module", r"Targeting an nn\.Parameter on the top-level module"),
    ("target_parameters_str", r"`target_parameters` must be a list of strings or None"),
    # transformers 5's MoE config conversion: one half of a fused pair of projections named alone
    ("moe_fused_half", r"Cannot convert PEFT target\(s\) .* without also targeting"),
)


# Upstream warnings -> the reference's warning kinds (reference.notices.KINDS).
# Warnings not listed here (deprecations, bitsandbytes notices) are not compared.
_WARNING_KINDS: tuple[tuple[str, str], ...] = (
    ("conv1d_fan_in_fan_out", r"fan_in_fan_out is set to False but the target module is `Conv1D`"),
    ("linear_fan_in_fan_out", r"fan_in_fan_out is set to True but the target module is `torch.nn.Linear`"),
    ("exclude_unused", r"You have passed exclude_modules=.* but no modules were excluded"),
    ("rank_pattern_unused", r"rank_pattern keys did not match any targeted module"),
    ("alpha_pattern_unused", r"alpha_pattern keys did not match any targeted module"),
    ("lora_bias_without_base_bias", r"`lora_bias=True` was passed but the targeted layer of type .* has no bias"),
    ("embeddings_untied_after_merge", r"Input and output embeddings are no longer tied after merging"),
    ("target_modules_unmatched", r"target_modules=.* were set but no module was matched"),
    ("weight_tying_nothing_tied", r"You have requested `ensure_weight_tying`, but no tied modules were found"),
    ("weight_tying_nothing_asked", r"You have requested `ensure_weight_tying`, but no tied modules are added"),
    ("target_parameters_unmatched", r"target_parameters=.* were set but no parameter was matched"),
)


_OWN_WARNING_SOURCES = re.compile(r"[/\\\\](peft|trl)[/\\\\]")
_ADDRESS = re.compile(r"0x[0-9a-fA-F]+")


def own_warnings(caught: list[Any]) -> list[str]:
    """peft's and trl's own warnings among ``caught`` (``warnings.WarningMessage``), as
    ``Category: message`` with object addresses blanked, sorted and unique."""
    out = {
        f"{w.category.__name__}: {_ADDRESS.sub('0x?', str(w.message))}"
        for w in caught
        if _OWN_WARNING_SOURCES.search(str(getattr(w, "filename", "")))
    }
    return sorted(out)


class _OwnLogRecords(logging.Handler):
    def __init__(self, sink: list[str]) -> None:
        super().__init__(logging.WARNING)
        self.sink = sink

    def emit(self, record: logging.LogRecord) -> None:
        self.sink.append(f"log.{record.levelname}: {_ADDRESS.sub('0x?', record.getMessage())}")


@contextlib.contextmanager
def own_log_records(sink: list[str] | None):
    """Append peft's and trl's log records of level WARNING and above to ``sink`` while open."""
    if sink is None:
        yield
        return
    handler = _OwnLogRecords(sink)
    loggers = [logging.getLogger(name) for name in ("peft", "trl")]
    for logger in loggers:
        logger.addHandler(handler)
    try:
        yield
    finally:
        for logger in loggers:
            logger.removeHandler(handler)


def classify_warning(message: str) -> str | None:
    """The reference's kind for an upstream warning message, or None if it is not compared."""
    for kind, pattern in _WARNING_KINDS:
        if re.search(pattern, message, re.DOTALL):
            return kind
    return None


def classify_error(exc: BaseException) -> tuple[str, str]:
    """(builtin class, kind) of an upstream exception; unknown messages get kind ``other``."""
    message = str(exc)
    for kind, pattern in _ERROR_KINDS:
        if re.search(pattern, message, re.DOTALL):
            return builtin_class(exc), kind
    return builtin_class(exc), "other"
