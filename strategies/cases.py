"""Hypothesis strategies for preparation cases.

``cases()`` composes :func:`model_specs`, :func:`quant_specs`,
:func:`adapter_specs` and :func:`training_specs`.  Every ``LoraConfig`` field is
sometimes :data:`~reference.spec.ABSENT`, so upstream defaults are exercised.
Target names include near misses (partial names, non-dotted suffixes, regexes
that almost match) and, at a controlled rate, deliberately invalid inputs
(``Case.invalid``), which both sides must reject.

Everything shrinks towards the simplest case: the first model type, fp32, no
quantization, absent fields.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

from hypothesis import strategies as st
from hypothesis.strategies import SearchStrategy

from reference.profiles import Profile, select_profile
from reference.spec import ABSENT, AdapterSpec, Case, ModelSpec, QuantSpec, TrainingSpec
from strategies.validation import check_kinds, check_rate
from strategies.zoo import ZOO, ZooEntry, tasks_of
from strategies.zoo import model_types as zoo_types

__all__ = ["INVALID_KINDS", "adapter_specs", "cases", "model_specs", "quant_specs", "training_specs"]

DTYPES = ("float32", "float16", "bfloat16")
QUANT_KINDS = ("none", "8bit", "4bit")
HEADS = ("lm_head", "score", "classifier")
CLASSIFIER_HEADS = ("score", "classifier", "classification_head")

# The invalid inputs the strategies build on purpose; both sides must reject each.
INVALID_KINDS = (
    "r_not_positive",
    "targets_match_nothing",
    "layers_with_regex_targets",
    "layers_pattern_without_layers",
    "unknown_bias",
    "lora_bias_on_embedding",
    "container_target",
    "no_default_targets",
)


def _absent_or(strategy: SearchStrategy[Any]) -> SearchStrategy[Any]:
    """The field left out (shrinks to this), or a drawn value."""
    return st.one_of(st.just(ABSENT), strategy)


@st.composite
def model_specs(draw, *, model_types: tuple[str, ...] | None = None, task: str | None = None) -> ModelSpec:
    """A tiny model: a zoo type, one of its tasks, 1-3 layers, 64 or 128 wide, a load dtype.

    Shrinks towards the first zoo type, its first task, 1 layer, width 64, fp32.
    """
    types = tuple(t for t in (model_types or zoo_types()) if task is None or task in tasks_of(t))
    model_type = draw(st.sampled_from(types), label="model_type")
    task = task or draw(st.sampled_from(tasks_of(model_type)), label="task")
    return ModelSpec(
        model_type=model_type,
        task=task,
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


def _near_misses(names: tuple[str, ...]) -> list[str]:
    """Names that look like targets but must not match: partial, non-dotted suffix, prefixed."""
    out = []
    for name in names:
        if len(name) > 2:
            out.append(name[:-1])  # "q_pro": a partial name is no suffix match
        out.append("x" + name)  # "xq_proj": ends like a real name, no dot boundary
        if "_" in name:
            out.append(name[name.index("_"):])  # "_proj": a suffix of the name, not a dotted one
        out.append(name.upper())
    return out


def _regexes(entry: ZooEntry, names: tuple[str, ...]) -> list[str]:
    alt = "|".join(re.escape(n) for n in names)
    return [
        rf".*\.({alt})",  # matches
        rf".*\.{entry.layer_container}\.0\..*\.({alt})",  # matches layer 0 only
        rf".*\.({alt})$|nothing",  # matches, through an alternation
        rf"({alt})",  # near miss: a full match needs the whole path
        rf".*({alt})\.",  # near miss: trailing dot
    ]


@st.composite
def _targets(draw, entry: ZooEntry, invalid: str | None) -> tuple[Any, tuple[str, ...]]:
    """(target_modules, the leaf names it is meant to reach)."""
    linears = entry.linear_names
    if invalid == "targets_match_nothing":
        return tuple(draw(st.lists(st.sampled_from(_near_misses(linears)), min_size=1, max_size=3, unique=True))), ()
    if invalid == "container_target":
        return (entry.layer_container,), ()
    if invalid == "no_default_targets":
        return draw(st.sampled_from((ABSENT, None))), ()
    kind = draw(st.sampled_from(("list", "default", "list", "regex", "all-linear")), label="targets_kind")
    if kind == "default":
        return draw(st.sampled_from((ABSENT, None))), ()
    if kind == "all-linear":
        return "all-linear", linears
    chosen = tuple(draw(st.lists(st.sampled_from(linears), min_size=1, max_size=4, unique=True)))
    if kind == "regex":
        # Near misses (the last two) come up about one time in five.
        regexes = _regexes(entry, chosen)
        return draw(st.sampled_from(regexes[:3] * 4 + regexes[3:]), label="regex"), chosen
    extra = []
    if entry.embedding_names and draw(st.integers(0, 4)) == 0:
        extra.append(entry.embedding_names[0])
    if draw(st.booleans()):
        extra.extend(draw(st.lists(st.sampled_from(_near_misses(chosen)), max_size=2, unique=True)))
    return chosen + tuple(extra), chosen


@st.composite
def adapter_specs(
    draw, model: ModelSpec, *, invalid: str | None = None, profile: Profile | None = None
) -> AdapterSpec:
    """A LoRA spec for ``model``; ``invalid`` names one of :data:`INVALID_KINDS` to build."""
    entry = ZOO[model.model_type]
    profile = profile or select_profile()
    has_defaults = model.model_type in profile.default_targets
    targets, reached = draw(_targets(entry, invalid))
    if targets in (ABSENT, None) and not has_defaults and invalid is None:
        targets, reached = "all-linear", entry.linear_names
    if invalid == "no_default_targets" and has_defaults:
        targets, reached = (entry.layer_container,), ()  # fall back to another invalid input
    names = reached or entry.linear_names
    str_targets = isinstance(targets, str)  # a regex or "all-linear": no layer filter allowed

    layers = _absent_or(
        st.one_of(st.integers(0, model.num_layers - 1), st.lists(st.integers(0, model.num_layers), min_size=1, max_size=3, unique=True).map(tuple))
    )
    no_layers = str_targets or invalid == "container_target"  # a container has no layer index
    layers_to_transform = ABSENT if no_layers else draw(layers, label="layers_to_transform")
    layers_pattern = ABSENT
    if layers_to_transform is not ABSENT:
        layers_pattern = draw(_absent_or(st.sampled_from((entry.layer_container, (entry.layer_container,), "blocks"))))
    if invalid == "layers_with_regex_targets":
        targets = rf".*\.({'|'.join(names)})"
        layers_to_transform = 0
    if invalid == "layers_pattern_without_layers":
        layers_to_transform, layers_pattern = ABSENT, entry.layer_container

    r = draw(_absent_or(st.sampled_from((1, 2, 4, 8, 16))), label="r")
    if invalid == "r_not_positive":
        r = draw(st.sampled_from((0, -1, -8)))
    pattern_keys = st.sampled_from(names)
    return AdapterSpec(
        r=r,
        lora_alpha=draw(_absent_or(st.sampled_from((1, 8, 16, 32))), label="lora_alpha"),
        lora_dropout=draw(_absent_or(st.sampled_from((0.0, 0.05, 0.1)))),
        target_modules=targets,
        exclude_modules=draw(
            _absent_or(st.one_of(st.just(None), st.lists(pattern_keys, max_size=1).map(tuple), st.just(r".*\.1\..*")))
        ),
        layers_to_transform=layers_to_transform,
        layers_pattern=layers_pattern,
        # An r <= 0 case must stay invalid: no rank_pattern may rescue the targeted modules.
        rank_pattern=ABSENT if invalid == "r_not_positive" else draw(_absent_or(st.tuples(st.tuples(pattern_keys, st.sampled_from((2, 4, 32)))))),
        alpha_pattern=draw(_absent_or(st.tuples(st.tuples(pattern_keys, st.sampled_from((2, 64)))))),
        modules_to_save=draw(_absent_or(st.one_of(st.just(None), st.lists(st.sampled_from(HEADS), min_size=1, max_size=2, unique=True).map(tuple)))),
        bias="bogus" if invalid == "unknown_bias" else draw(_absent_or(st.sampled_from(("none", "all", "lora_only"))), label="bias"),
        lora_bias=True if invalid == "lora_bias_on_embedding" else draw(_absent_or(st.booleans())),
        use_rslora=draw(_absent_or(st.booleans()), label="use_rslora"),
        init_lora_weights=draw(_absent_or(st.sampled_from((True, False, "gaussian"))), label="init"),
        fan_in_fan_out=draw(_absent_or(st.booleans())),
        task_type=draw(st.sampled_from((model.task, model.task, ABSENT))),
    )


def training_specs(level: str, quant: QuantSpec) -> SearchStrategy[TrainingSpec]:
    """peft level: the k-bit step (always for quantized models), checkpointing, autocast.
    trl level: bf16 / fp16 / neither, checkpointing with and without use_reentrant, the
    model passed as an object or as a checkpoint path."""
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
        ).map(lambda t: dataclasses.replace(t, model_from_path=False) if t.peft_model_in else t).map(lambda t: t if not t.bf16 else dataclasses.replace(t, fp16=False)).flatmap(
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


@st.composite
def cases(
    draw,
    *,
    level: str = "peft",
    invalid_rate: float = 0.25,
    model_types: tuple[str, ...] | None = None,
    quant_kinds: tuple[str, ...] = QUANT_KINDS,
    profile: Profile | None = None,
) -> Case:
    """A whole case; about ``invalid_rate`` of them are deliberately invalid."""
    check_rate("invalid_rate", invalid_rate)
    check_kinds("level", (level,), ("peft", "trl"))
    check_kinds("quant_kinds", quant_kinds, QUANT_KINDS)
    # SFTTrainer trains causal language models only.
    model = draw(model_specs(model_types=model_types, task="CAUSAL_LM" if level == "trl" else None))
    quant = draw(quant_specs(quant_kinds), label="quant")
    if quant.quantized and model.task in ("SEQ_CLS", "TOKEN_CLS") and draw(st.booleans(), label="skip_heads"):
        # transformers 5 quantizes heads that have a bias; the documented way to keep a
        # classification head trainable is to leave it out of quantization.
        quant = dataclasses.replace(quant, skip_modules=CLASSIFIER_HEADS)
    invalid = None
    # A 20-slot wheel with the invalid slots last: Hypothesis favours low indices, and a
    # failing valid case must not shrink into an invalid one.
    slots = round(invalid_rate * 20)
    if draw(st.sampled_from((False,) * (20 - slots) + (True,) * slots), label="invalid_roll"):
        invalid = draw(st.sampled_from(INVALID_KINDS), label="invalid_kind")
        if invalid == "lora_bias_on_embedding" and not ZOO[model.model_type].embedding_names:
            invalid = "unknown_bias"
    adapter = draw(adapter_specs(model, invalid=invalid, profile=profile))
    if invalid == "lora_bias_on_embedding":
        adapter = _replace(adapter, target_modules=(ZOO[model.model_type].embedding_names[0],), layers_to_transform=ABSENT, layers_pattern=ABSENT)
    training = draw(training_specs(level, quant))
    return Case(model=model, quant=quant, adapter=adapter, training=training, invalid=invalid is not None)


def _replace(spec: AdapterSpec, **changes: Any) -> AdapterSpec:
    return dataclasses.replace(spec, **changes)
