"""Strategy quality: cases() reaches what the conformance run needs, at useful rates.

Reachability uses Hypothesis's ``find`` with generation only (no shrinking: we
want to know an example exists, not the smallest one) and a fixed seed, so the
suite is deterministic.
"""

from __future__ import annotations

import importlib
import re

import pytest
from hypothesis import HealthCheck, Phase, find, given, settings
from hypothesis import strategies as st
from hypothesis.errors import InvalidArgument

from reference import ABSENT, PROFILES, Case
from strategies import INVALID_KINDS, ZOO, adapter_specs, cases, model_specs, quant_specs
from strategies.params import fused_types
from strategies.trainers import installed_trainers, pair_rule, takes_quantization_config

CURRENT = PROFILES["current"]
# `strategies.cases` the attribute is the function; the module is reached by name.
cases_module = importlib.import_module("strategies.cases")
NO_DEFAULTS = tuple(t for t in ZOO if t not in CURRENT.default_targets)
FLOAT_STORAGE = ("float16", "bfloat16", "float32")
CONV1D_TYPES = ("gpt2", "gpt_bigcode")
OPTIONAL_ADAPTER_FIELDS = (
    "r", "lora_alpha", "lora_dropout", "exclude_modules", "rank_pattern", "alpha_pattern", "modules_to_save",
    "bias", "lora_bias", "use_rslora", "init_lora_weights", "fan_in_fan_out",
)
OPTIONAL_TRAINING_FIELDS = ("gradient_checkpointing", "use_reentrant", "autocast_adapter_dtype")


def find_any(strategy, condition, max_examples: int = 3000):
    """Some example satisfying ``condition`` (raises NoSuchExample if none in ``max_examples``)."""
    return find(
        strategy,
        condition,
        settings=settings(
            database=None,
            derandomize=True,
            phases=[Phase.generate],
            max_examples=max_examples,
            suppress_health_check=list(HealthCheck),
        ),
    )


def draw_many(strategy, n: int) -> list:
    out: list = []

    @settings(max_examples=n, database=None, derandomize=True, phases=[Phase.generate], deadline=None,
              suppress_health_check=list(HealthCheck))
    @given(strategy)
    def collect(value):
        out.append(value)

    collect()
    return out


@pytest.fixture(scope="module")
def sample() -> list[Case]:
    drawn = draw_many(cases(profile=CURRENT), 800)
    assert len(drawn) >= 650
    return drawn


# -- classifying a drawn case ---------------------------------------------------------------------------


def _variants(name: str) -> set[str]:
    """Near misses of one name: partial ("q_pro"), prefixed ("xq_proj"), a non-dotted
    suffix ("_proj") and another letter case ("Q_PROJ")."""
    out = {"x" + name, name.upper()}
    if len(name) > 2:
        out.add(name[:-1])
    if "_" in name:
        out.add(name[name.index("_"):])
    return out


def near_miss(name: str, entry) -> bool:
    """A name that looks like one of the entry's Linear names but is none of them."""
    if name in entry.linear_names or name in entry.embedding_names:
        return False
    return any(name in _variants(n) for n in entry.linear_names)


def invalid_kind(case: Case) -> str | None:
    """Which of INVALID_KINDS an invalid case was built as (None for a valid case)."""
    if not case.invalid:
        return None
    a, entry = case.adapter, ZOO[case.model.model_type]
    targets = a.target_modules
    if a.bias == "bogus":
        return "unknown_bias"
    if isinstance(a.r, int) and a.r is not ABSENT and a.r <= 0:
        return "r_not_positive"
    if case.training.peft_model_in and case.training.peft_config_too \
            and pair_rule(case.training.trainer if case.training.trainer is not ABSENT else "sft") == "reject":
        return "peft_model_with_config"  # (only where the trainer rejects the pair: trl 0.19 merges it)
    if case.training.quantization_config_in == "both":
        return "quantization_config_twice"
    if isinstance(targets, str) and a.layers_to_transform not in (ABSENT, None):
        return "layers_with_regex_targets"
    if a.layers_to_transform is ABSENT and a.layers_pattern not in (ABSENT, None):
        return "layers_pattern_without_layers"
    if a.layers_to_transform == 7 or a.layers_pattern == "blocks":
        return "layer_filter_matches_nothing"
    if a.lora_bias is True and targets == entry.embedding_names[:1]:
        return "lora_bias_on_embedding"
    if a.lora_bias is True and a.init_lora_weights == "gaussian":
        return "lora_bias_with_gaussian_init"
    if a.lora_bias is True and a.use_dora is True:
        return "dora_with_lora_bias"
    if a.init_lora_weights == "pissa" and case.quant.quantized:
        return "pissa_on_quantized"
    if a.init_lora_weights == "orthogonal" and isinstance(a.r, int) and a.r % 2:
        return "orthogonal_odd_rank"
    if isinstance(a.init_lora_weights, str) and a.init_lora_weights.startswith("pissa_") and not re.fullmatch(
            r"pissa_niter_\d+", a.init_lora_weights):
        return "pissa_niter_malformed"
    if a.init_lora_weights == "loftq" and a.loftq_config is ABSENT:
        return "loftq_without_config"
    if a.trainable_token_indices not in (ABSENT, None) and any(i >= 256 for i in _token_rows(a.trainable_token_indices)):
        return "token_index_out_of_range"
    if targets == (entry.layer_container,):  # (rejected before any parameter option is seen)
        return "container_target"
    reaches_parameters = a.target_parameters not in (ABSENT, None, ()) or (
        targets == "all-linear" and case.model.model_type in fused_types())
    if reaches_parameters and (a.lora_dropout not in (ABSENT, 0.0) or a.lora_bias is True or a.use_dora is True):
        return "param_wrapper_option"
    if targets in (ABSENT, None) and case.model.model_type not in CURRENT.default_targets:
        return "no_default_targets"
    if targets == (entry.layer_container,):
        return "container_target"
    if isinstance(targets, tuple) and targets and all(near_miss(t, entry) for t in targets):
        return "targets_match_nothing"
    if isinstance(targets, str) and targets != "all-linear" and (targets.startswith("(") or targets.endswith(r")\.")):
        return "targets_match_nothing"
    return "unclassified"


def str_targets(case: Case) -> bool:
    return isinstance(case.adapter.target_modules, str)


# -- reachability ------------------------------------------------------------------------------------------


def _conv1d(c: Case) -> bool:
    return c.model.model_type in CONV1D_TYPES and not c.invalid and "c_attn" in (c.adapter.target_modules or ())


def _embedding(c: Case) -> bool:
    t = c.adapter.target_modules
    return not c.invalid and isinstance(t, tuple) and any(n in ZOO[c.model.model_type].embedding_names for n in t)


def _double_quant_float_storage(c: Case) -> bool:
    q = c.quant
    return q.kind == "4bit" and q.double_quant and q.quant_storage in FLOAT_STORAGE


def _regex(c: Case) -> bool:
    return not c.invalid and str_targets(c) and c.adapter.target_modules != "all-linear"


def _layer_regex(c: Case) -> bool:
    entry = ZOO[c.model.model_type]
    return _regex(c) and rf"\.{entry.layer_container}\.0\." in c.adapter.target_modules


def _near_miss_beside_real(c: Case) -> bool:
    t, entry = c.adapter.target_modules, ZOO[c.model.model_type]
    return (not c.invalid and isinstance(t, tuple) and any(near_miss(n, entry) for n in t)
            and any(n in entry.linear_names for n in t))


def _prefixed_near_miss(c: Case) -> bool:
    t, entry = c.adapter.target_modules, ZOO[c.model.model_type]
    return isinstance(t, tuple) and any(n.startswith("x") and n[1:] in entry.linear_names for n in t)


def _partial_near_miss(c: Case) -> bool:
    t, entry = c.adapter.target_modules, ZOO[c.model.model_type]
    return isinstance(t, tuple) and any(len(m) > 2 and n == m[:-1] for n in t for m in entry.linear_names)


def _undotted_suffix_near_miss(c: Case) -> bool:
    t, entry = c.adapter.target_modules, ZOO[c.model.model_type]
    return isinstance(t, tuple) and any(n.startswith("_") and any(m.endswith(n) for m in entry.linear_names) for n in t)


def _rank_pattern(c: Case) -> bool:
    a = c.adapter
    return not c.invalid and a.rank_pattern not in (ABSENT, None) and a.alpha_pattern not in (ABSENT, None)


def _layers_with_pattern(c: Case) -> bool:
    a = c.adapter
    return not c.invalid and a.layers_to_transform not in (ABSENT, None) and a.layers_pattern not in (ABSENT, None)


REACHABLE = {
    "conv1d_c_attn": _conv1d,
    "embedding_target": _embedding,
    "4bit_double_quant_float_storage": _double_quant_float_storage,
    "4bit_nf4_uint8": lambda c: c.quant.kind == "4bit" and c.quant.quant_type == "nf4" and c.quant.quant_storage == "uint8",
    "4bit_fp4_bf16_compute": lambda c: c.quant.kind == "4bit" and c.quant.quant_type == "fp4"
    and c.quant.compute_dtype == "bfloat16",
    "8bit": lambda c: c.quant.kind == "8bit",
    "8bit_threshold_0": lambda c: c.quant.kind == "8bit" and c.quant.int8_threshold == 0.0,
    "regex_targets": _regex,
    "regex_layer_0": _layer_regex,
    "all_linear": lambda c: c.adapter.target_modules == "all-linear",
    "default_targets": lambda c: not c.invalid and c.adapter.target_modules in (ABSENT, None),
    "near_miss_beside_real_name": _near_miss_beside_real,
    "prefixed_near_miss": _prefixed_near_miss,  # "xq_proj"
    "partial_near_miss": _partial_near_miss,  # "q_pro"
    "undotted_suffix_near_miss": _undotted_suffix_near_miss,  # "_proj"
    "uppercase_near_miss": lambda c: isinstance(c.adapter.target_modules, tuple) and any(
        n != n.lower() and n.lower() in ZOO[c.model.model_type].linear_names for n in c.adapter.target_modules),  # "Q_PROJ"
    "near_miss_regex": lambda c: c.invalid and str_targets(c) and (c.adapter.target_modules.startswith("(")
                                                                  or c.adapter.target_modules.endswith(r")\.")),
    "rank_and_alpha_pattern": _rank_pattern,
    "layers_with_pattern": _layers_with_pattern,
    "modules_to_save": lambda c: isinstance(c.adapter.modules_to_save, tuple) and len(c.adapter.modules_to_save) == 2,
    "seq_cls_quantized_heads_skipped": lambda c: c.quant.skip_modules is not None and c.model.task == "SEQ_CLS",
    "bf16_load": lambda c: c.model.load_dtype == "bfloat16" and c.quant.kind == "4bit",
    "no_kbit_step": lambda c: not c.training.prepare_kbit,
    "encoder_decoder": lambda c: c.model.task == "SEQ_2_SEQ_LM",
}


# Conditions about one model family search that family only: that cases() reaches every
# zoo type is tested separately, and a search over all 38 types would be slow.
RESTRICT = {"conv1d_c_attn": CONV1D_TYPES, "encoder_decoder": ("t5", "mt5", "bart")}


@pytest.mark.parametrize("name", sorted(REACHABLE))
def test_cases_reach(name):
    found = find_any(cases(profile=CURRENT, model_types=RESTRICT.get(name)), REACHABLE[name])
    assert REACHABLE[name](found)


TRL_INVALID_KINDS = {
    "peft_model_with_config": lambda trainer: pair_rule(trainer) == "reject",
    "quantization_config_twice": takes_quantization_config,
}
"""The trl-level invalid kinds, and whether a trainer of the installed trl can be given one."""


def test_cases_reach_every_invalid_kind(sample):
    seen = {invalid_kind(c) for c in sample}
    for kind in INVALID_KINDS:
        if kind in seen:
            continue
        # not in the sample: search for it (no_default_targets needs a type without defaults)
        types = NO_DEFAULTS if kind == "no_default_targets" else None
        if kind == "param_wrapper_option":  # (only the fused-expert types have parameters to refuse)
            from strategies.params import fused_types

            types = fused_types()
            if not types:
                continue  # (transformers 4 has no fused experts)
        # trl-level inputs (trl >= 0.27; >= 1.16 for the trainer's quantization_config)
        level = "trl" if kind in ("peft_model_with_config", "quantization_config_twice") else "peft"
        if kind in TRL_INVALID_KINDS and not any(TRL_INVALID_KINDS[kind](t) for t in installed_trainers()):
            continue  # (trl 0.19's trainers merge the pair and take no quantization_config)
        found = find_any(cases(profile=CURRENT, model_types=types, level=level),
                         lambda c, kind=kind: invalid_kind(c) == kind)
        assert found.invalid


def test_cases_with_the_installed_profile_reach_no_default_targets():
    # without profile=, cases() selects the installed profile itself
    found = find_any(cases(model_types=NO_DEFAULTS), lambda c: invalid_kind(c) == "no_default_targets")
    assert found.model.model_type not in CURRENT.default_targets
    with_defaults = find_any(cases(model_types=("llama",)), lambda c: not c.invalid and c.adapter.target_modules in (ABSENT, None))
    assert with_defaults.model.model_type == "llama"


def test_types_without_defaults_never_get_default_targets_unless_invalid():
    drawn = draw_many(cases(profile=CURRENT, model_types=NO_DEFAULTS), 80)
    for c in drawn:
        if c.adapter.target_modules in (ABSENT, None):
            assert c.invalid and invalid_kind(c) == "no_default_targets"


@pytest.mark.parametrize("field", OPTIONAL_ADAPTER_FIELDS + ("target_modules", "task_type"))
def test_each_adapter_field_is_sometimes_absent_and_sometimes_given(sample, field):
    values = [getattr(c.adapter, field) for c in sample]
    assert any(v is ABSENT for v in values)
    assert any(v is not ABSENT for v in values)


@pytest.mark.parametrize("field", OPTIONAL_TRAINING_FIELDS)
def test_each_training_field_is_sometimes_absent_and_sometimes_given(sample, field):
    values = [getattr(c.training, field) for c in sample]
    assert any(v is ABSENT for v in values) and any(v is not ABSENT for v in values)


def test_many_fields_absent_at_once():
    def absent(c: Case) -> int:
        return sum(getattr(c.adapter, f) is ABSENT for f in OPTIONAL_ADAPTER_FIELDS)

    found = find_any(cases(profile=CURRENT), lambda c: absent(c) >= 10 and not c.invalid)
    assert absent(found) >= 10


# -- rates and invariants over a sample ----------------------------------------------------------------------


def test_invalid_rate(sample):
    head = sample[:300]
    fraction = sum(c.invalid for c in head) / len(head)
    # (nominally 22 %; Hypothesis favours the wheel's low, valid slots, so fewer are drawn)
    assert 0.08 <= fraction <= 0.40, fraction


def test_invalid_cases_are_each_one_known_kind(sample):
    kinds = [invalid_kind(c) for c in sample if c.invalid]
    assert kinds and set(kinds) <= set(INVALID_KINDS), set(kinds) - set(INVALID_KINDS)


def test_invalid_rate_zero_draws_only_valid_cases():
    drawn = draw_many(cases(profile=CURRENT, invalid_rate=0.0), 80)
    assert drawn and not any(c.invalid for c in drawn)


def test_invalid_rate_one_draws_only_invalid_cases():
    drawn = draw_many(cases(profile=CURRENT, invalid_rate=1.0), 60)
    assert drawn and all(c.invalid for c in drawn)
    assert all(invalid_kind(c) in INVALID_KINDS for c in drawn)


def test_every_zoo_type_is_reachable(sample):
    seen = {c.model.model_type for c in sample}
    assert len(seen) >= len(ZOO) * 3 // 4  # the sample alone covers most of the zoo
    for model_type in sorted(set(ZOO) - seen):
        found = find_any(cases(profile=CURRENT), lambda c, t=model_type: c.model.model_type == t)
        assert found.model.model_type == model_type


def test_every_task_of_the_zoo_is_reachable():
    from strategies.zoo import tasks_of

    pairs = {(t, task) for t in ZOO for task in tasks_of(t)}  # (the installed transformers' heads)
    drawn = {(m.model_type, m.task) for m in draw_many(model_specs(), 1500)}
    assert pairs == drawn


def test_drawn_tasks_belong_to_their_model_type(sample):
    for c in sample:
        assert c.model.task in ZOO[c.model.model_type].tasks
        assert c.adapter.task_type in (ABSENT, c.model.task)
        assert c.model.hidden_size % 64 == 0 and 1 <= c.model.num_layers <= 3


def test_quantized_cases_always_take_the_kbit_step(sample):
    quantized = [c for c in sample if c.quant.kind != "none"]
    assert quantized and all(c.training.prepare_kbit for c in quantized)
    kinds = {c.quant.kind for c in sample}
    assert kinds == {"none", "8bit", "4bit"}


def test_layers_to_transform_never_with_str_targets_unless_invalid(sample):
    with_str = [c for c in sample if str_targets(c)]
    assert len(with_str) >= 50
    for case in with_str:
        a = case.adapter
        if a.layers_to_transform not in (ABSENT, None):
            assert case.invalid and invalid_kind(case) == "layers_with_regex_targets", case
        if a.layers_pattern not in (ABSENT, None):  # rejected for the pattern as well
            assert case.invalid, case
    # (that layers_with_regex_targets is drawn at all: test_cases_reach_every_invalid_kind)


def test_valid_cases_have_well_formed_fields(sample):
    for case in sample:
        a = case.adapter
        if case.invalid:
            continue
        assert a.bias in (ABSENT, "none", "all", "lora_only"), case
        assert a.r is ABSENT or (isinstance(a.r, int) and a.r > 0), case
        if a.layers_pattern not in (ABSENT, None):
            assert a.layers_to_transform not in (ABSENT, None), case
        for pattern in (a.rank_pattern, a.alpha_pattern):
            if pattern not in (ABSENT, None):
                for key, value in pattern:
                    re.compile(key)
                    assert value > 0


def test_model_types_argument_restricts_the_zoo():
    drawn = draw_many(cases(profile=CURRENT, model_types=("gpt2", "t5")), 60)
    assert {c.model.model_type for c in drawn} == {"gpt2", "t5"}


def test_quant_kinds_argument_restricts_quantization():
    drawn = draw_many(cases(profile=CURRENT, quant_kinds=("4bit",)), 60)
    assert {c.quant.kind for c in drawn} == {"4bit"}


# -- argument validation -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [dict(invalid_rate=2), dict(invalid_rate=-0.1), dict(invalid_rate="0.5"), dict(invalid_rate=True),
     dict(quant_kinds=("bogus",)), dict(quant_kinds=()), dict(quant_kinds=("4bit", "3bit"))],
    ids=["rate-2", "rate-negative", "rate-str", "rate-bool", "kinds-bogus", "kinds-empty", "kinds-mixed"],
)
def test_cases_argument_validation_happens_before_drawing(monkeypatch, kwargs):
    drawn_models = []

    def spy(*args, **kw):
        drawn_models.append(kw)
        return st.nothing()

    monkeypatch.setattr(cases_module, "model_specs", spy)
    calls = []
    with pytest.raises(InvalidArgument):
        find_any(cases(profile=CURRENT, **kwargs), lambda c: calls.append(c) or True, max_examples=5)
    assert drawn_models == [] and calls == []


def test_quant_specs_validates_eagerly():
    with pytest.raises(InvalidArgument, match="bogus"):
        quant_specs(("bogus",))


def test_model_specs_and_adapter_specs_compose():
    model = find_any(model_specs(model_types=("gpt2",)), lambda m: m.num_layers == 3)
    spec = find_any(adapter_specs(model, invalid="container_target", profile=CURRENT), lambda a: True)
    assert spec.target_modules == ("h",)


def _token_rows(indices) -> list[int]:
    """Every row of list- or dict-form ``trainable_token_indices``."""
    from reference.tokens import is_dict_form, token_mapping

    return [i for rows in token_mapping(indices).values() for i in rows] if is_dict_form(indices) else list(indices)
