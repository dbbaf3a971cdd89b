"""Hypothesis strategies for whole cases and their parts.

``cases()`` composes a model spec, a quantization, an adapter spec and a training
spec.  Every optional ``LoraConfig`` field is sometimes left out (so upstream's
defaults are tested), and a controlled share of cases is deliberately invalid.

Valid cases are built so that both sides should *prepare* them: the targets survive
the excludes and the layer filter, ``lora_bias`` meets a compatible init and no
embedding, a quantized classification head is (nearly always) kept out of
quantization.  Each way of being rejected is one of :data:`INVALID_KINDS`, drawn on
purpose, alone (the rest of an invalid case is valid), so that an invalid case
tests one rejection rule and a valid one tests a prepared model.

A caller may pin the *cell* of a case (``model_types``, ``quant_kinds``,
``target_kinds``, ``tasks``); the conformance suite does, so that every model type
meets every quantization and target kind in every run (``strategies.coverage``),
while Hypothesis explores the rest of the case.  Everything shrinks towards the
first zoo type, full precision, list targets, a valid case and absent fields.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from hypothesis import strategies as st
from hypothesis.strategies import SearchStrategy

from reference.profiles import Profile, select_profile
from reference.spec import ABSENT, AdapterSpec, Case, ModelSpec, QuantSpec, TrainingSpec
from strategies.targets import TARGET_KINDS, layer_one_exclude, matching_regexes, near_miss_targets, near_misses
from strategies.params import PARAMS_INVALID_KINDS, fused_types, has_parameters, with_parameters
from strategies.tokens import TOKENS_INVALID_KINDS, has_tokens, with_tokens
from strategies.tying import with_tying
from strategies.resume import with_resume
from strategies.adapters import with_second_adapter
from strategies.trainers import (
    pair_rule, takes_quantization_config, trainer_task, trainer_training, trainers, with_chat_template,
    with_quantization_config, with_trainer,
)
from strategies.inits import (INIT_INVALID_KINDS, UNQUANTIZED_ONLY, init_values, init_variant, invalid_init,
                              invalid_kind_possible, keeps_pinned_init, loftq_configs, loftq_modelled,
                              masks_invalid, variant_value)
from strategies.validation import check_kinds, check_rate
from strategies.zoo import TASKS, ZOO, ZooEntry, tasks_of
from strategies.zoo import model_types as zoo_types

__all__ = [
    "INVALID_KINDS",
    "adapter_specs",
    "cases",
    "compatible_invalid_kinds",
    "model_specs",
    "quant_specs",
    "training_specs",
]

DTYPES = ("float32", "float16", "bfloat16")
QUANT_KINDS = ("none", "8bit", "4bit")
HEADS = ("lm_head", "score", "classifier")
CLASSIFIER_HEADS = ("score", "classifier", "classification_head")
OUT_OF_RANGE_LAYER = 7
"""A layer index no zoo model has (at most 3 blocks; t5's sublayers go to 2)."""

# The invalid inputs the strategies build on purpose; both sides must reject each.
INVALID_KINDS = (
    "r_not_positive",
    "targets_match_nothing",
    "layers_with_regex_targets",
    "layers_pattern_without_layers",
    "layer_filter_matches_nothing",
    "unknown_bias",
    "lora_bias_on_embedding",
    "lora_bias_with_gaussian_init",
    "container_target",
    "no_default_targets",
    "peft_model_with_config",
    "quantization_config_twice",
    "dora_with_lora_bias",
    *INIT_INVALID_KINDS,
    *TOKENS_INVALID_KINDS,
    *PARAMS_INVALID_KINDS,
)
# Which target kinds each invalid kind is built with (so that a pinned cell stays that cell).
_INVALID_TARGET_KINDS = {
    "r_not_positive": TARGET_KINDS,
    "targets_match_nothing": ("list", "regex"),
    "layers_with_regex_targets": ("regex", "all-linear"),
    "layers_pattern_without_layers": ("list", "default"),
    "layer_filter_matches_nothing": ("list", "default"),
    "unknown_bias": TARGET_KINDS,
    "lora_bias_on_embedding": ("list",),
    "lora_bias_with_gaussian_init": TARGET_KINDS,
    "container_target": ("list",),
    "no_default_targets": ("default",),
    "peft_model_with_config": TARGET_KINDS,
    "quantization_config_twice": TARGET_KINDS,
    "dora_with_lora_bias": TARGET_KINDS,
    # (targets that reach a quantized / Linear layer: a list may reach an embedding alone)
    "pissa_on_quantized": ("all-linear", "default"),
    "orthogonal_odd_rank": ("all-linear", "default"),
    "pissa_niter_malformed": ("all-linear", "default"),
    "loftq_without_config": ("all-linear", "default"),
    "token_index_out_of_range": TARGET_KINDS,
    "param_wrapper_option": ("list", "regex", "all-linear"),
}
# Invalid kinds built with lora_bias=True: with DoRA pinned, the DoRA check would reject them first.
_NEED_LORA_BIAS_ALONE = ("lora_bias_on_embedding",)


def _absent_or(strategy: SearchStrategy[Any]) -> SearchStrategy[Any]:
    """The field left out (shrinks to this), or a drawn value."""
    return st.one_of(st.just(ABSENT), strategy)


def _rejects_peft_model_with_config(trainer: str = "sft") -> bool:
    return pair_rule(trainer) == "reject"


def compatible_invalid_kinds(model: ModelSpec, level: str, target_kind: str, profile: Profile,
                             dora: bool | None = None, *, quantized: bool | None = None,
                             init: str | None = None, tokens: bool = False, parameters: bool = False,
                             trainer: str = "sft") -> tuple[str, ...]:
    """The invalid kinds that can be built for this model, level and target kind, alone
    (``dora`` True: with ``use_dora`` pinned on; ``quantized``: the case's quantization, None
    unknown; ``init``: a pinned init variant)."""
    entry = ZOO[model.model_type]
    has_defaults = model.model_type in profile.default_targets
    if target_kind == "default" and not has_defaults:
        return ("no_default_targets",)  # every other rule is pre-empted by the missing defaults
    out = []
    for kind, kinds in _INVALID_TARGET_KINDS.items():
        if target_kind not in kinds:
            continue
        if kind == "no_default_targets":
            continue  # only for types without defaults (above)
        if kind == "lora_bias_on_embedding" and not entry.embedding_names:
            continue
        if kind == "peft_model_with_config" and (level != "trl" or not _rejects_peft_model_with_config(trainer)):
            continue
        if kind == "quantization_config_twice" and (level != "trl" or quantized is not True
                                                    or not takes_quantization_config(trainer)):
            continue
        if kind == "peft_model_with_config" and dora:
            continue  # DoRA is not drawn on a passed-in PeftModel (cases())
        if kind == "dora_with_lora_bias" and "use_dora" not in profile.features:
            continue
        if kind in _NEED_LORA_BIAS_ALONE and dora:
            continue
        if kind in INIT_INVALID_KINDS and not invalid_kind_possible(kind, profile, quantized, init):
            continue
        if init is not None and not keeps_pinned_init(kind, init):
            continue
        if kind in TOKENS_INVALID_KINDS and "trainable_token_indices" not in profile.features:
            continue
        if kind in PARAMS_INVALID_KINDS and (model.model_type not in fused_types() or dora or init is not None
                                             or "target_parameters" not in profile.features):
            continue
        if parameters and kind == "peft_model_with_config":
            continue  # a parameters cell has no passed-in PeftModel
        if tokens and kind in ("peft_model_with_config", "dora_with_lora_bias"):
            continue  # a tokens cell has no passed-in PeftModel and no DoRA
        out.append(kind)
    return tuple(out)


@st.composite
def model_specs(draw, *, model_types: tuple[str, ...] | None = None, task: str | None = None,
                tasks: tuple[str, ...] | None = None) -> ModelSpec:
    """A tiny model: a zoo type, one of its tasks, 1-3 layers, 64 or 128 wide, a load dtype.

    ``task`` pins the task; ``tasks`` restricts it (types with none of them are left out).
    Shrinks towards the first zoo type, its first task, 1 layer, width 64, fp32.
    """
    allowed = (task,) if task is not None else tasks
    types = tuple(t for t in (model_types or zoo_types()) if allowed is None or set(allowed) & set(tasks_of(t)))
    model_type = draw(st.sampled_from(types), label="model_type")
    own = tuple(t for t in tasks_of(model_type) if allowed is None or t in allowed)
    return ModelSpec(
        model_type=model_type,
        task=draw(st.sampled_from(own), label="task"),
        num_layers=draw(st.integers(1, 3), label="num_layers"),
        hidden_size=draw(st.sampled_from((64, 128)), label="hidden_size"),
        load_dtype=draw(st.sampled_from(DTYPES), label="load_dtype"),
    )


def quant_specs(kinds: tuple[str, ...] = QUANT_KINDS) -> SearchStrategy[QuantSpec]:
    """No quantization, 8-bit (threshold), or 4-bit (nf4/fp4, double quant, compute dtype, storage)."""
    check_kinds("kinds", kinds, QUANT_KINDS)
    options = []
    if "none" in kinds:
        options.append(st.just(QuantSpec()))
    if "8bit" in kinds:
        options.append(st.builds(QuantSpec, kind=st.just("8bit"), int8_threshold=st.sampled_from((6.0, 0.0))))
    if "4bit" in kinds:
        options.append(
            st.builds(
                QuantSpec,
                kind=st.just("4bit"),
                quant_type=st.sampled_from(("nf4", "fp4")),
                double_quant=st.booleans(),
                compute_dtype=st.sampled_from(DTYPES),
                quant_storage=st.sampled_from(("uint8", "uint8", "bfloat16", "float16", "float32")),
            )
        )
    return st.one_of(options)


def _reached_names(entry: ZooEntry, model: ModelSpec, kind: str, profile: Profile) -> tuple[str, ...]:
    """The leaf names default or all-linear targets reach (for excludes and patterns)."""
    if kind == "default":
        default = profile.default_targets.get(model.model_type, ())
        names = tuple(n for n in (default if not isinstance(default, str) else ()) if n in entry.linear_names)
        return names or entry.linear_names
    return entry.linear_names


@st.composite
def _valid_targets(draw, entry: ZooEntry, kind: str, allow_embedding: bool) -> tuple[Any, tuple[str, ...]]:
    """(target_modules, the leaf names they reach) of a target kind other than ``default``."""
    linears = entry.linear_names
    if kind == "all-linear":
        return "all-linear", linears
    chosen = tuple(draw(st.lists(st.sampled_from(linears), min_size=1, max_size=4, unique=True)))
    if kind == "regex":
        return draw(st.sampled_from(matching_regexes(entry, chosen)), label="regex"), chosen
    extra = []
    if allow_embedding and entry.embedding_names and draw(st.integers(0, 4), label="add_embedding") == 4:
        extra.append(entry.embedding_names[0])
    if draw(st.booleans()):  # near misses beside real names: they must simply match nothing
        extra.extend(draw(st.lists(st.sampled_from(near_misses(chosen)), max_size=2, unique=True)))
    return chosen + tuple(extra), chosen


@st.composite
def _excludes(draw, reached: tuple[str, ...], entry: ZooEntry, layer_filter: bool) -> Any:
    """``exclude_modules`` that leave at least one reached name: one name (a reached one only
    when another is reached too), None, or, without a layer filter (which could keep layer 1
    alone), every module of layer 1."""
    spare = tuple(n for n in entry.linear_names if n not in reached or len(reached) > 1)
    options = [st.just(None)]
    if spare:
        options.append(st.lists(st.sampled_from(spare), max_size=1).map(tuple))
    if not layer_filter:
        options.append(st.just(layer_one_exclude(entry)))
    return draw(_absent_or(st.one_of(options)))


@st.composite
def _targets(draw, entry: ZooEntry, model: ModelSpec, kind: str, invalid: str | None, profile: Profile,
             allow_embedding: bool) -> tuple[Any, tuple[str, ...]]:
    """(target_modules of ``kind``, the leaf names they reach); built to match nothing for the
    invalid kinds that are about targets."""
    if kind == "default":
        return draw(st.sampled_from((ABSENT, None))), _reached_names(entry, model, kind, profile)
    if invalid == "targets_match_nothing":
        return draw(near_miss_targets(entry, regex=kind == "regex")), ()
    if invalid == "container_target":
        return (entry.layer_container,), ()
    if invalid == "lora_bias_on_embedding":
        return (entry.embedding_names[0],), ()
    return draw(_valid_targets(entry, kind, allow_embedding=allow_embedding))


@st.composite
def adapter_specs(
    draw, model: ModelSpec, *, invalid: str | None = None, profile: Profile | None = None,
    target_kind: str | None = None, dora: bool | None = None, init: str | None = None,
) -> AdapterSpec:
    """A LoRA spec for ``model``: valid, or built to be rejected as ``invalid`` (one of
    :data:`INVALID_KINDS`, with nothing else wrong).  ``target_kind`` pins the kind of
    ``target_modules`` (one of ``strategies.targets.TARGET_KINDS``); an invalid kind that
    cannot be built with it takes a kind it can be built with.  ``dora`` pins ``use_dora``
    (None: drawn where the profile models it); ``init`` pins ``init_lora_weights`` to a variant
    (``strategies.inits``)."""
    pinned_init = init
    entry = ZOO[model.model_type]
    profile = profile or select_profile()
    has_defaults = model.model_type in profile.default_targets
    kind = target_kind or draw(st.sampled_from(("list", "default", "list", "regex", "all-linear")), label="targets_kind")
    if invalid is not None and kind not in _INVALID_TARGET_KINDS[invalid]:
        kind = draw(st.sampled_from(_INVALID_TARGET_KINDS[invalid]))
    if kind == "default" and not has_defaults and invalid not in (None, "no_default_targets"):
        kind = "list"
    if kind == "default" and not has_defaults and invalid is None:
        kind = "all-linear"  # only invalid cases (no_default_targets) go without targets on such a type
    lora_bias = draw(_absent_or(st.booleans()))
    if pinned_init is not None or invalid in INIT_INVALID_KINDS:
        lora_bias = draw(st.sampled_from((ABSENT, False)))  # the init check would reject the case first
    targets, reached = draw(_targets(entry, model, kind, invalid, profile, allow_embedding=lora_bias is not True))
    names = reached or entry.linear_names

    # -- layer filter: only with name targets; a valid filter keeps a layer that exists
    layers_to_transform = layers_pattern = ABSENT
    if not isinstance(targets, str) and invalid not in ("container_target", "lora_bias_on_embedding"):
        in_range = st.integers(0, model.num_layers - 1)
        layers_to_transform = draw(_absent_or(st.one_of(
            in_range,
            st.tuples(in_range, st.lists(st.integers(0, model.num_layers), max_size=2)).map(
                lambda t: tuple(dict.fromkeys((t[0], *t[1])))),
        )), label="layers_to_transform")
        if layers_to_transform is not ABSENT:
            layers_pattern = draw(_absent_or(st.sampled_from((entry.layer_container, (entry.layer_container,)))))
    if invalid == "layer_filter_matches_nothing":
        if draw(st.booleans()):
            layers_to_transform, layers_pattern = OUT_OF_RANGE_LAYER, draw(_absent_or(st.just(entry.layer_container)))
        else:
            layers_to_transform, layers_pattern = 0, "blocks"  # a module list no zoo model has
    elif invalid == "layers_with_regex_targets":
        layers_to_transform, layers_pattern = 0, ABSENT
    elif invalid == "layers_pattern_without_layers":
        layers_to_transform, layers_pattern = ABSENT, entry.layer_container

    r = draw(_absent_or(st.sampled_from((1, 2, 4, 8, 16))), label="r")
    if invalid == "r_not_positive":
        r = draw(st.sampled_from((0, -1, -8)))
    init = draw(init_values(profile) if pinned_init is None else variant_value(pinned_init), label="init")
    if masks_invalid(init, invalid):
        init = ABSENT
    if invalid in ("lora_bias_on_embedding", "lora_bias_with_gaussian_init"):
        lora_bias = True
    if invalid == "lora_bias_with_gaussian_init":
        init = "gaussian"
    elif invalid == "pissa_on_quantized":
        init = "pissa"
    elif invalid in ("pissa_niter_malformed", "loftq_without_config"):
        init = draw(invalid_init(invalid))
    elif invalid == "orthogonal_odd_rank":
        init, r = "orthogonal", draw(st.sampled_from((1, 3)))
    elif lora_bias is True and init not in (ABSENT, True, False):
        init = draw(st.sampled_from((ABSENT, True, False)))  # LoRA biases need the zero init of B
    if init == "orthogonal" and isinstance(r, int) and r > 0 and r % 2 and invalid != "orthogonal_odd_rank":
        r = 2  # the orthogonal init needs an even rank
    if dora is None:
        use_dora = draw(_absent_or(st.booleans()), label="use_dora") if "use_dora" in profile.features else ABSENT
    else:
        use_dora = bool(dora)
    if invalid == "dora_with_lora_bias":
        use_dora, lora_bias = True, True
        if init == "gaussian":
            init = draw(st.sampled_from((ABSENT, True, False)))  # the init check would reject it first
    elif use_dora is True and lora_bias is True:
        if invalid in _NEED_LORA_BIAS_ALONE:
            use_dora = ABSENT  # the DoRA check would reject the case first (never pinned: compatible_invalid_kinds)
        elif invalid != "lora_bias_with_gaussian_init":  # (the init check rejects that one first)
            lora_bias = draw(st.sampled_from((ABSENT, False)))  # DoRA takes no LoRA bias
    pattern_keys = st.sampled_from(names)
    excludes = ABSENT if invalid == "container_target" else draw(
        _excludes(reached or names, entry, layers_to_transform is not ABSENT))
    return AdapterSpec(
        r=r,
        lora_alpha=draw(_absent_or(st.sampled_from((1, 8, 16, 32))), label="lora_alpha"),
        lora_dropout=draw(_absent_or(st.sampled_from((0.0, 0.05, 0.1)))),
        target_modules=targets,
        exclude_modules=excludes,
        layers_to_transform=layers_to_transform,
        layers_pattern=layers_pattern,
        # An r <= 0 case must stay invalid: no rank_pattern may rescue the targeted modules (nor
        # an even rank every odd-rank orthogonal layer).
        rank_pattern=ABSENT if invalid in ("r_not_positive", "orthogonal_odd_rank") else draw(
            _absent_or(st.tuples(st.tuples(pattern_keys, st.sampled_from((2, 4, 32)))))),
        alpha_pattern=draw(_absent_or(st.tuples(st.tuples(pattern_keys, st.sampled_from((2, 64)))))),
        modules_to_save=draw(_absent_or(st.one_of(
            st.just(None), st.lists(st.sampled_from(HEADS), min_size=1, max_size=2, unique=True).map(tuple)))),
        bias="bogus" if invalid == "unknown_bias" else draw(
            _absent_or(st.sampled_from(("none", "all", "lora_only"))), label="bias"),
        lora_bias=lora_bias,
        use_rslora=draw(_absent_or(st.booleans()), label="use_rslora"),
        use_dora=use_dora,
        init_lora_weights=init,
        loftq_config=draw(loftq_configs(init, profile, invalid)),
        fan_in_fan_out=draw(_absent_or(st.booleans())),
        task_type=draw(st.sampled_from((model.task, model.task, ABSENT))),
        # a sixth of the cases prepare for inference (nothing trains); only where the profile models it
        inference_mode=draw(_absent_or(st.sampled_from((False, False, True))), label="inference_mode")
        if "inference_mode" in profile.features else ABSENT,
    )


def training_specs(level: str, quant: QuantSpec, *, peft_model_with_config: bool | None = None
                   ) -> SearchStrategy[TrainingSpec]:
    """peft level: the k-bit step (always for quantized models), checkpointing, autocast.
    trl level: bf16 / fp16 / neither, checkpointing with and without use_reentrant, the
    model passed as an object or as a checkpoint path, or as a PeftModel (with or without a
    ``peft_config`` too).  ``peft_model_with_config`` True forces a PeftModel with a
    config, False forbids the pair (None: drawn)."""
    if level == "trl":
        return st.builds(
            TrainingSpec,
            level=st.just("trl"),
            prepare_kbit=st.just(False),
            gradient_checkpointing=_absent_or(st.booleans()),
            use_reentrant=_absent_or(st.booleans()),
            bf16=st.booleans(),
            model_from_path=st.booleans(),
            peft_model_in=st.sampled_from((False, False, False, True)),
            peft_config_too=st.booleans(),
        ).map(lambda t: _trl_shape(t, peft_model_with_config)).flatmap(
            lambda t: st.just(t) if t.bf16 else st.sampled_from((t, dataclasses.replace(t, fp16=True)))
        )
    return st.builds(
        TrainingSpec,
        level=st.just(level),
        prepare_kbit=st.just(True) if quant.quantized else st.booleans(),
        gradient_checkpointing=_absent_or(st.booleans()),
        use_reentrant=_absent_or(st.booleans()),
        autocast_adapter_dtype=_absent_or(st.booleans()),
    )


def _trl_shape(t: TrainingSpec, peft_model_with_config: bool | None) -> TrainingSpec:
    if peft_model_with_config is True:
        t = dataclasses.replace(t, peft_model_in=True, peft_config_too=True)
    elif peft_model_with_config is False and t.peft_model_in:
        t = dataclasses.replace(t, peft_config_too=False)
    if t.peft_model_in:
        t = dataclasses.replace(t, model_from_path=False)
    return dataclasses.replace(t, fp16=False)


@st.composite
def cases(
    draw,
    *,
    level: str = "peft",
    invalid_rate: float = 0.22,
    model_types: tuple[str, ...] | None = None,
    quant_kinds: tuple[str, ...] = QUANT_KINDS,
    target_kinds: tuple[str, ...] | None = None,
    tasks: tuple[str, ...] | None = None,
    profile: Profile | None = None,
    dora: bool | None = None,
    init: str | None = None,
    tokens: bool = False,
    parameters: bool = False,
    tying: bool = False,
    resume: bool = False,
    adapters: bool = False,
    trainer: str | None = None,
    template: bool = False,
) -> Case:
    """A whole case; about ``invalid_rate`` of them deliberately invalid (one rule broken).

    ``model_types``, ``quant_kinds``, ``target_kinds`` and ``tasks`` restrict the cell the
    case is drawn in; ``dora`` True pins ``use_dora`` (a DoRA cell), ``init`` an
    ``init_lora_weights`` variant (an init cell: ``strategies.inits``), ``tokens`` True trainable
    token rows (a tokens cell: ``strategies.tokens``), ``parameters`` True parameter targets on a
    fused-expert type (a parameters cell: ``strategies.params``), ``tying`` True
    ``ensure_weight_tying`` (a tying cell: ``strategies.tying``), ``resume`` True a resumed
    adapter (a resume cell: ``strategies.resume``), ``adapters`` True a second adapter (an
    adapters cell: ``strategies.adapters``); ``trainer`` pins the trl-level trainer (a trainer
    cell: ``strategies.trainers``; drawn otherwise); ``template`` True a ``chat_template_path`` (a
    template cell).  ``inference_mode`` is
    drawn at the peft level only (a trainer is given a config to train).  A passed-in PeftModel
    carries no DoRA adapter (the trained values of ``reference.trained`` leave magnitudes at
    their initial norms, and a merge of them is not modelled bit for bit): such a draw drops
    ``use_dora``, or, pinned, the passed-in model.  A ``default`` target kind on a type without default targets can
    only be invalid (``no_default_targets``), whatever ``invalid_rate`` says.
    """
    check_rate("invalid_rate", invalid_rate)
    check_kinds("level", (level,), ("peft", "trl"))
    check_kinds("quant_kinds", quant_kinds, QUANT_KINDS)
    if target_kinds is not None:
        check_kinds("target_kinds", target_kinds, TARGET_KINDS)
    if tasks is not None:
        check_kinds("tasks", tasks, TASKS)
    profile = profile or select_profile()
    # A trainer trains one kind of model: SFTTrainer and most others causal LMs, RewardTrainer a
    # one-label sequence classifier.
    trainer_name = draw(trainers(trainer, model_types), label="trainer") if level == "trl" else "sft"
    model = draw(model_specs(model_types=model_types, tasks=(trainer_task(trainer_name),) if level == "trl" else tasks))
    model = with_trainer(model, trainer_name)
    quant = draw(quant_specs(quant_kinds), label="quant")
    if quant.quantized and model.task in ("SEQ_CLS", "TOKEN_CLS") and draw(st.integers(0, 9), label="keep_heads") != 9:
        # transformers quantizes some classification heads (which ones depends on its version);
        # the documented way to keep one trainable is to leave it out of quantization.  One case
        # in ten keeps transformers' own choice, so that the quantized-head rule is checked too.
        quant = dataclasses.replace(quant, skip_modules=CLASSIFIER_HEADS)
    keep = ZOO[model.model_type].keep_unquantized
    if quant.quantized and keep:  # (the output head stays unquantized, as transformers' own choice keeps it)
        quant = dataclasses.replace(quant, skip_modules=tuple(dict.fromkeys((*(quant.skip_modules or ("lm_head",)), *keep))))
    kind = draw(st.sampled_from(target_kinds), label="target_kind") if target_kinds else None
    invalid = None
    # A 40-slot wheel with the invalid slots last: Hypothesis favours low indices, and a
    # failing valid case must not shrink into an invalid one.
    slots = round(invalid_rate * 40)
    forced = kind == "default" and model.model_type not in profile.default_targets
    if forced or draw(st.sampled_from((False,) * (40 - slots) + (True,) * slots), label="invalid_roll"):
        if kind is not None:
            possible = compatible_invalid_kinds(model, level, kind, profile, dora, quantized=quant.quantized, init=init,
                                                tokens=tokens, parameters=parameters, trainer=trainer_name)
        else:
            possible = tuple(dict.fromkeys(
                k for tk in TARGET_KINDS
                for k in compatible_invalid_kinds(model, level, tk, profile, dora, quantized=quant.quantized, init=init,
                                                  tokens=tokens, parameters=parameters, trainer=trainer_name)))
        # (a cell may allow none: an OLoRA or orthogonal init cell builds no invalid case, strategies.inits)
        invalid = draw(st.sampled_from(possible), label="invalid_kind") if possible else None
    adapter = draw(adapter_specs(model, invalid=invalid, profile=profile, target_kind=kind, dora=dora, init=init))
    if invalid == "dora_with_lora_bias" and adapter.init_lora_weights not in (ABSENT, True, False) and init is None:
        adapter = dataclasses.replace(adapter, init_lora_weights=ABSENT)  # lora_bias would refuse the init first
    adapter = draw(with_tokens(adapter, ZOO[model.model_type], profile, pinned=tokens, invalid=invalid,
                               model_type=model.model_type, level=level, task=model.task))
    adapter = draw(with_parameters(adapter, model, profile, pinned=parameters, invalid=invalid, keep_dora=dora is True,
                                   keep_init=init is not None))
    adapter = draw(with_tying(adapter, model, profile, level=level, pinned=tying, invalid=invalid))
    if quant.quantized and init_variant(adapter.init_lora_weights) in UNQUANTIZED_ONLY and invalid != "pissa_on_quantized" \
            or init_variant(adapter.init_lora_weights) == "loftq" and invalid != "loftq_without_config" and not loftq_modelled(
                model.model_type, ZOO[model.model_type].embedding_names, adapter.target_modules):
        adapter = dataclasses.replace(adapter, init_lora_weights=ABSENT, loftq_config=ABSENT)  # strategies.inits
    pair = None if level != "trl" else (True if invalid == "peft_model_with_config" else
                                        False if pair_rule(trainer_name) in ("reject", "none") else None)
    training = trainer_training(draw(training_specs(level, quant, peft_model_with_config=pair)), trainer_name,
                                ZOO[model.model_type].image_text)
    if level == "trl":
        training = draw(with_quantization_config(training, trainer_name, quant.quantized,
                                                 twice=invalid == "quantization_config_twice"))
        if invalid is None and not tokens:
            training, adapter = draw(with_chat_template(training, adapter, trainer_name,
                                                        ZOO[model.model_type].embedding_names, pinned=template))
    if level == "trl" and adapter.inference_mode is not ABSENT:
        adapter = dataclasses.replace(adapter, inference_mode=ABSENT)  # a trainer trains: peft level only
    if training.peft_model_in and init_variant(adapter.init_lora_weights) != "default":
        if init is not None or invalid in INIT_INVALID_KINDS:
            training = dataclasses.replace(training, peft_model_in=False, peft_config_too=False)
        else:
            adapter = dataclasses.replace(adapter, init_lora_weights=ABSENT)
    if training.peft_model_in and has_tokens(adapter):
        if tokens or invalid in TOKENS_INVALID_KINDS:
            training = dataclasses.replace(training, peft_model_in=False, peft_config_too=False)
        else:
            adapter = dataclasses.replace(adapter, trainable_token_indices=ABSENT)
    if training.peft_model_in and has_parameters(adapter):
        if (parameters or invalid in PARAMS_INVALID_KINDS) and invalid != "peft_model_with_config":
            training = dataclasses.replace(training, peft_model_in=False, peft_config_too=False)
        else:
            adapter = dataclasses.replace(adapter, target_parameters=ABSENT)
    if training.peft_model_in and adapter.use_dora is True:
        if dora or invalid == "dora_with_lora_bias":
            training = dataclasses.replace(training, peft_model_in=False, peft_config_too=False)
        else:
            adapter = dataclasses.replace(adapter, use_dora=ABSENT)
    free = invalid is None and not (dora or init or tokens or parameters or tying)
    training, adapter = draw(with_resume(training, adapter, pinned=resume and invalid is None, allowed=free))
    adapter, training, second = draw(with_second_adapter(model, adapter, training, pinned=adapters and invalid is None,
                                                         allowed=free and not resume))
    return Case(model=model, quant=quant, adapter=adapter, training=training, invalid=invalid is not None,
                second_adapter=second)
