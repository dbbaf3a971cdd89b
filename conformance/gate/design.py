"""The gate corpus's design: which combinations a corpus must hold, and cases that hold them.

An upstream change may show only where three settings meet: peft PR #2893 (0.19.0) makes
new LoRA factors on a bnb 4-bit layer follow its compute dtype, visible only at the peft
level with ``autocast_adapter_dtype=False``, a half-precision compute dtype and uint8
storage.  A random corpus meets such a cell by luck, so the corpus is built from covering
arrays (:mod:`strategies.covering`), one per *stratum* (level x quantization kind), over
the factors that exist there:

* ``quantization x training``, 3-way: the quantization sub-settings of the kind (4-bit:
  quant type, double quant, compute dtype, storage; 8-bit: threshold), the load dtype and
  the training settings of the level (peft: the k-bit step, checkpointing, use_reentrant,
  autocast; trl: bf16 / fp16 / neither, checkpointing, use_reentrant, model from a path,
  a PeftModel passed in, with or without a config);
* ``adapter``, 2-way: the ``LoraConfig`` fields, at abstract levels (absent / given...;
  list targets with and without an embedding among them);
* trl level, ``trainer x training``, 2-way: the trl trainer (each one the installed trl is
  generated with) against the trl training settings.

Combinations a valid case cannot hold (``lora_bias`` with the gaussian init, a layer filter
with string targets...) are excluded by a constraint, computed, and reported as infeasible.

Each row becomes one valid case: Hypothesis draws a case of the row's cell
(``strategies.cases``), then the row's values are pinned on it, each only the way the
strategies themselves could have drawn it, so that a valid case stays valid.
:func:`features` reads the same factors back off any case, which is how the achieved
coverage is measured on the cases themselves, not on the rows.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from hypothesis import strategies as st
from hypothesis.strategies import SearchStrategy

from reference.profiles import Profile
from reference.spec import ABSENT, Case
from strategies.covering import Group
from strategies.targets import layer_one_exclude

__all__ = ["ADAPTER_FACTORS", "EMBEDDING", "Stratum", "compatible_model_types", "features", "jsonable", "row_case", "strata"]

QUANT_KINDS = ("none", "8bit", "4bit")
DTYPES = ("float32", "float16", "bfloat16")
GIVEN, ABSENT_LABEL = "given", "absent"
# Abstract levels of the adapter fields whose values are open-ended.
_OPEN = ("absent", "given")


@dataclass(frozen=True)
class Stratum:
    """One level x quantization kind, its factors, coverage groups and constraint."""

    level: str
    kind: str
    factors: Mapping[str, tuple[Any, ...]]
    groups: tuple[Group, ...]
    valid: Callable[[Mapping[str, Any]], bool]

    @property
    def name(self) -> str:
        return f"{self.level}-{self.kind}"


def _quant_training_factors(level: str, kind: str) -> dict[str, tuple[Any, ...]]:
    out: dict[str, tuple[Any, ...]] = {}
    if kind == "4bit":
        out["quant.quant_type"] = ("nf4", "fp4")
        out["quant.double_quant"] = (False, True)
        out["quant.compute_dtype"] = DTYPES
        out["quant.quant_storage"] = ("uint8", "bfloat16", "float16", "float32")
    elif kind == "8bit":
        out["quant.int8_threshold"] = (6.0, 0.0)
    out["model.load_dtype"] = DTYPES
    tri = (ABSENT, True, False)
    if level == "peft":
        if kind == "none":  # quantized models always take the k-bit step (strategies.training_specs)
            out["training.prepare_kbit"] = (True, False)
        out["training.gradient_checkpointing"] = tri
        out["training.use_reentrant"] = tri
        out["training.autocast_adapter_dtype"] = tri
    else:
        out["training.precision"] = ("neither", "bf16", "fp16")
        out["training.gradient_checkpointing"] = tri
        out["training.use_reentrant"] = tri
        out["training.model_from_path"] = (False, True)
        out["training.peft_model"] = ("no", "peft_model", "peft_model+config")
        out["training.trainer"] = _trainers()
    return out


def _trainers() -> tuple[str, ...]:
    """The trl trainers the installed trl is generated with (``strategies.trainers``)."""
    from strategies.trainers import installed_trainers

    return installed_trainers()


_TRAINER_TRAINING = ("training.trainer", "training.precision", "training.gradient_checkpointing",
                     "training.model_from_path", "training.peft_model")
"""The trl factors each trainer meets pairwise: a trainer's own copy of the preparation code reads
them (its bf16 cast, its checkpointing, its loading of a path, its handling of a PeftModel)."""


ADAPTER_FACTORS: dict[str, tuple[Any, ...]] = {
    "adapter.target_kind": ("list", "list+embedding", "default", "regex", "all-linear"),
    "adapter.r": _OPEN,
    "adapter.lora_alpha": _OPEN,
    "adapter.lora_dropout": ("absent", "zero", "positive"),
    "adapter.bias": (ABSENT, "none", "all", "lora_only"),
    "adapter.lora_bias": (ABSENT, True, False),
    "adapter.use_rslora": (ABSENT, True, False),
    "adapter.init_lora_weights": (ABSENT, True, False, "gaussian"),
    "adapter.fan_in_fan_out": (ABSENT, True, False),
    "adapter.modules_to_save": ("absent", "none", "given"),
    "adapter.exclude_modules": ("absent", "none", "names", "regex"),
    "adapter.layers_to_transform": ("absent", "int", "list"),
    "adapter.rank_pattern": _OPEN,
    "adapter.alpha_pattern": _OPEN,
    "adapter.task_type": _OPEN,
}
"""The adapter fields at abstract levels; the strategies draw the concrete values.  The
target kinds are :data:`strategies.targets.TARGET_KINDS`, with list targets split by whether
they name an embedding (embedding LoRA layers have rules of their own: peft 0.19 keeps
their ``fan_in_fan_out``, issue #2944's tied-weights warning)."""
EMBEDDING = "list+embedding"


def _valid(level: str, rejects_peft_model_with_config: bool) -> Callable[[Mapping[str, Any]], bool]:
    """The rules a *valid* case obeys (strategies.cases), over partial rows."""
    from strategies.trainers import pair_rule, rules_of

    trainers = _trainers() if level == "trl" else ()
    pair_rules = {t: pair_rule(t) for t in trainers}
    no_paths = {t for t in trainers if (r := rules_of(t)) is not None and not r.loads_paths}

    def valid(row: Mapping[str, Any]) -> bool:
        get = row.get
        # LoRA biases need the zero init of B (invalid kind lora_bias_with_gaussian_init).
        if get("adapter.lora_bias") is True and get("adapter.init_lora_weights") == "gaussian":
            return False
        # A layer filter needs name targets (invalid kind layers_with_regex_targets).
        if get("adapter.layers_to_transform", "absent") != "absent" and \
                get("adapter.target_kind") in ("regex", "all-linear"):
            return False
        # Not a validity rule: an embedding sits outside the layers, so a layer filter would
        # leave it without LoRA and nothing about embedding layers would show.
        if get("adapter.target_kind") == EMBEDDING and get("adapter.layers_to_transform", "absent") != "absent":
            return False
        # The strategies never put an embedding among targets with lora_bias (invalid kind
        # lora_bias_on_embedding).
        if get("adapter.target_kind") == EMBEDDING and get("adapter.lora_bias") is True:
            return False
        # The layer-1 exclude could leave a layer filter nothing (strategies._excludes).
        if get("adapter.exclude_modules") == "regex" and get("adapter.layers_to_transform", "absent") != "absent":
            return False
        if level == "trl":
            trainer = get("training.trainer", "sft")
            # A trainer's own rules: what it does with a PeftModel and a config, whether it loads a path.
            if get("training.peft_model") == "peft_model+config" and pair_rules.get(trainer) in ("reject", "none"):
                return False
            if get("training.model_from_path") is True and trainer in no_paths:
                return False
            # A PeftModel is passed as an object, never as a checkpoint path.
            if get("training.peft_model", "no") != "no" and get("training.model_from_path") is True:
                return False
            # trl >= 0.27 rejects a PeftModel with a peft_config: only an invalid case has it.
            if rejects_peft_model_with_config and trainer == "sft" and get("training.peft_model") == "peft_model+config":
                return False
        return True

    return valid


def strata(levels: tuple[str, ...]) -> list[Stratum]:
    """The strata of ``levels``, in a fixed order, for the installed trl (whether it
    rejects a PeftModel passed with a config decides what a valid trl case can be)."""
    from reference.trl import select_trl_flow

    rejects = select_trl_flow().peft_model_with_config == "reject"
    out = []
    for level in levels:
        valid = _valid(level, rejects)
        for kind in QUANT_KINDS:
            qt = _quant_training_factors(level, kind)
            factors = {**qt, **ADAPTER_FACTORS}
            three_way = tuple(k for k in qt if k != "training.trainer")
            groups = (
                Group(f"{level}-{kind}: quantization x training", three_way, min(3, len(three_way))),
                Group(f"{level}-{kind}: adapter", tuple(ADAPTER_FACTORS), 2),
            ) + ((Group(f"{level}-{kind}: trainer x training", _TRAINER_TRAINING, 2),) if level == "trl" else ())
            out.append(Stratum(level, kind, factors, groups, valid))
    return out


def compatible_model_types(level: str, row: Mapping[str, Any], profile: Profile) -> tuple[str, ...]:
    """The zoo types a valid case of ``row`` can use: a trl trainer trains its task's models
    (causal LMs; RewardTrainer sequence classifiers), and default targets need a type that has
    them (without, only an invalid case remains)."""
    from strategies.trainers import trainer_task
    from strategies.zoo import model_types

    types = model_types(trainer_task(row.get("training.trainer", "sft"))) if level == "trl" else model_types()
    if row.get("adapter.target_kind") == "default":
        types = tuple(t for t in types if t in profile.default_targets)
    return types


def jsonable(value: Any) -> Any:
    """A level as JSON: ``ABSENT`` is ``"absent"``."""
    return ABSENT_LABEL if value is ABSENT else value


# -- reading the factors off a case ---------------------------------------------------------

def _open(value: Any) -> str:
    return ABSENT_LABEL if value is ABSENT else GIVEN


def _exclude_level(value: Any) -> str:
    if value is ABSENT:
        return "absent"
    if value is None or value == ():
        return "none"
    return "regex" if isinstance(value, str) else "names"


def _ltt_level(value: Any) -> str:
    if value is ABSENT:
        return "absent"
    return "list" if isinstance(value, tuple) else "int"


def _target_level(case: Case) -> str:
    from strategies.targets import target_kind
    from strategies.zoo import ZOO

    kind = target_kind(case.adapter.target_modules)
    if kind == "list" and set(case.adapter.target_modules) & set(ZOO[case.model.model_type].embedding_names):
        return EMBEDDING
    return kind


def features(case: Case) -> dict[str, Any]:
    """Every factor of the case's stratum, read off the case (levels as in the factors)."""
    q, t, a = case.quant, case.training, case.adapter
    out: dict[str, Any] = {}
    for name in _quant_training_factors(t.level, q.kind):
        section, field = name.split(".", 1)
        if name == "training.precision":
            out[name] = "bf16" if t.bf16 else "fp16" if t.fp16 else "neither"
        elif name == "training.peft_model":
            out[name] = "no" if not t.peft_model_in else "peft_model+config" if t.peft_config_too else "peft_model"
        elif name == "training.trainer":
            out[name] = t.trainer_name
        else:
            out[name] = getattr({"quant": q, "model": case.model, "training": t}[section], field)
    out.update({
        "adapter.target_kind": _target_level(case),
        "adapter.r": _open(a.r),
        "adapter.lora_alpha": _open(a.lora_alpha),
        "adapter.lora_dropout": "absent" if a.lora_dropout is ABSENT else "zero" if a.lora_dropout == 0 else "positive",
        "adapter.bias": a.bias,
        "adapter.lora_bias": a.lora_bias,
        "adapter.use_rslora": a.use_rslora,
        "adapter.init_lora_weights": a.init_lora_weights,
        "adapter.fan_in_fan_out": a.fan_in_fan_out,
        "adapter.modules_to_save": "absent" if a.modules_to_save is ABSENT else
        "none" if a.modules_to_save is None else "given",
        "adapter.exclude_modules": _exclude_level(a.exclude_modules),
        "adapter.layers_to_transform": _ltt_level(a.layers_to_transform),
        "adapter.rank_pattern": _open(a.rank_pattern),
        "adapter.alpha_pattern": _open(a.alpha_pattern),
        "adapter.task_type": _open(a.task_type),
    })
    return out


# -- pinning a row on a drawn case --------------------------------------------------------

def row_case(stratum: Stratum, row: Mapping[str, Any], model_type: str, profile: Profile) -> SearchStrategy[Case]:
    """A valid case of ``stratum`` on ``model_type`` whose factors are ``row``'s."""
    from strategies import cases

    kind = "list" if row["adapter.target_kind"] == EMBEDDING else row["adapter.target_kind"]
    drawn = cases(level=stratum.level, model_types=(model_type,), quant_kinds=(stratum.kind,),
                  target_kinds=(kind,), invalid_rate=0.0, profile=profile,
                  trainer=row.get("training.trainer") if stratum.level == "trl" else None)
    return drawn.flatmap(lambda case: _pinned(case, row, profile))


@st.composite
def _pinned(draw, case: Case, row: Mapping[str, Any], profile: Profile) -> Case:
    if case.invalid:  # cannot happen with invalid_rate=0 and a compatible type; never pin one
        raise ValueError(f"drew an invalid case for a covering row: {case.dumps()}")
    quant = dataclasses.replace(case.quant, **{k.split(".", 1)[1]: v for k, v in row.items() if k.startswith("quant.")})
    model = dataclasses.replace(case.model, load_dtype=row["model.load_dtype"])
    t = case.training
    if t.level == "peft":
        training = dataclasses.replace(
            t, prepare_kbit=row.get("training.prepare_kbit", True),
            gradient_checkpointing=row["training.gradient_checkpointing"],
            use_reentrant=row["training.use_reentrant"],
            autocast_adapter_dtype=row["training.autocast_adapter_dtype"])
    else:
        precision, peft_model = row["training.precision"], row["training.peft_model"]
        training = dataclasses.replace(
            t, bf16=precision == "bf16", fp16=precision == "fp16",
            gradient_checkpointing=row["training.gradient_checkpointing"],
            use_reentrant=row["training.use_reentrant"], model_from_path=row["training.model_from_path"],
            peft_model_in=peft_model != "no",
            peft_config_too=peft_model == "peft_model+config" if peft_model != "no" else t.peft_config_too)
    adapter = draw(_pinned_adapter(case, row, profile))
    return dataclasses.replace(case, model=model, quant=quant, training=training, adapter=adapter)


def _regex_names(regex: str, linears: tuple[str, ...]) -> tuple[str, ...]:
    """The names in a strategies regex's alternation (``.*\\.(q_proj|v_proj)``...)."""
    import re

    tokens = set(re.split(r"[()|]", regex))
    return tuple(n for n in linears if re.escape(n) in tokens)


def _reached(case: Case, targets: Any, profile: Profile) -> tuple[str, ...]:
    """The leaf linear names ``targets`` reach, as the strategies count them."""
    from strategies.cases import _reached_names
    from strategies.targets import target_kind
    from strategies.zoo import ZOO

    entry = ZOO[case.model.model_type]
    kind = target_kind(targets)
    if kind in ("default", "all-linear"):
        return _reached_names(entry, case.model, kind, profile)
    if kind == "regex":
        return _regex_names(targets, entry.linear_names)
    return tuple(n for n in targets if n in entry.linear_names)


def _draw_if(draw, current: Any, level: str, read: Callable[[Any], str], make: Callable[[], SearchStrategy[Any]]) -> Any:
    """Keep the drawn value when it already has the row's level, else draw one that has."""
    return current if read(current) == level else draw(make())


@st.composite
def _pinned_adapter(draw, case: Case, row: Mapping[str, Any], profile: Profile):
    """The adapter with the row's levels; each value is one the strategies could have drawn
    for this case (strategies.cases.adapter_specs), so the case stays valid."""
    from strategies.cases import HEADS
    from strategies.zoo import ZOO

    entry, a, n_layers = ZOO[case.model.model_type], case.adapter, case.model.num_layers
    lora_bias = row["adapter.lora_bias"]
    targets = a.target_modules
    if isinstance(targets, tuple):
        # Beside the linear names it chose, the strategy sometimes adds the first embedding
        # (never with lora_bias): add it, or take it out, as the row says.
        targets = tuple(t for t in targets if t not in entry.embedding_names)
        if row["adapter.target_kind"] == EMBEDDING:
            targets += (entry.embedding_names[0],)
    reached = _reached(case, targets, profile)
    names = reached or entry.linear_names
    given = {k.split(".", 1)[1]: v for k, v in row.items() if k.startswith("adapter.")}

    ltt, pattern = a.layers_to_transform, a.layers_pattern
    if _ltt_level(ltt) != given["layers_to_transform"]:
        in_range = st.integers(0, n_layers - 1)
        if given["layers_to_transform"] == "absent":
            ltt, pattern = ABSENT, ABSENT
        elif given["layers_to_transform"] == "int":
            ltt = draw(in_range)
        else:
            ltt = draw(st.tuples(in_range, st.lists(st.integers(0, n_layers), max_size=2)).map(
                lambda t: tuple(dict.fromkeys((t[0], *t[1])))))
        if ltt is not ABSENT and a.layers_to_transform is ABSENT:
            pattern = draw(st.sampled_from((ABSENT, entry.layer_container, (entry.layer_container,))))

    exclude = a.exclude_modules
    level = given["exclude_modules"]
    if _exclude_level(exclude) != level:
        if level in ("absent", "none"):
            exclude = ABSENT if level == "absent" else None
        elif level == "regex":
            exclude = layer_one_exclude(entry)  # the strategies' regex exclude
        else:  # one name that leaves a reached name targeted
            spare = tuple(n for n in entry.linear_names if n not in reached or len(reached) > 1)
            exclude = (draw(st.sampled_from(spare)),) if spare else None

    def keys_to(values: tuple[int, ...]) -> SearchStrategy[Any]:
        return st.tuples(st.tuples(st.sampled_from(names), st.sampled_from(values)))

    init = given["init_lora_weights"]
    return dataclasses.replace(
        a,
        target_modules=targets,
        r=_draw_if(draw, a.r, given["r"], _open, lambda: st.sampled_from((1, 2, 4, 8, 16))) if given["r"] == GIVEN
        else ABSENT,
        lora_alpha=_draw_if(draw, a.lora_alpha, given["lora_alpha"], _open, lambda: st.sampled_from((1, 8, 16, 32)))
        if given["lora_alpha"] == GIVEN else ABSENT,
        lora_dropout={"absent": ABSENT, "zero": 0.0}.get(given["lora_dropout"]) if given["lora_dropout"] != "positive"
        else (a.lora_dropout if a.lora_dropout not in (ABSENT, 0.0) else draw(st.sampled_from((0.05, 0.1)))),
        bias=given["bias"],
        lora_bias=lora_bias,
        use_rslora=given["use_rslora"],
        init_lora_weights=init,
        fan_in_fan_out=given["fan_in_fan_out"],
        modules_to_save={"absent": ABSENT, "none": None}.get(given["modules_to_save"]) if given["modules_to_save"] != GIVEN
        else (a.modules_to_save if isinstance(a.modules_to_save, tuple) else
              tuple(draw(st.lists(st.sampled_from(HEADS), min_size=1, max_size=2, unique=True)))),
        exclude_modules=exclude,
        layers_to_transform=ltt,
        layers_pattern=pattern,
        rank_pattern=_draw_if(draw, a.rank_pattern, given["rank_pattern"], _open, lambda: keys_to((2, 4, 32)))
        if given["rank_pattern"] == GIVEN else ABSENT,
        alpha_pattern=_draw_if(draw, a.alpha_pattern, given["alpha_pattern"], _open, lambda: keys_to((2, 64)))
        if given["alpha_pattern"] == GIVEN else ABSENT,
        task_type=case.model.task if given["task_type"] == GIVEN else ABSENT,
    )
