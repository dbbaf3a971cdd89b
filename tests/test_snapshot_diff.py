"""Snapshots of prepared models, their JSON form, the diff, and Case serialisation."""

from __future__ import annotations

import dataclasses
import json
import pathlib
import warnings

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from torch import nn

from conformance.engine.diff import ERROR, MODEL, Divergence, diff, format_table
from conformance.engine.models import build_model, load_model
from conformance.engine.snapshot import (
    AdapterFacts,
    LoraModuleFacts,
    ParamFacts,
    SavedModuleFacts,
    Snapshot,
    error_snapshot,
    snapshot_of,
)
from reference import ABSENT, PROFILES, AdapterSpec, Case, ModelSpec, QuantSpec, TrainingSpec, prepare
from reference.spec import _Absent
from strategies import cases

CURRENT = PROFILES["current"]
Q = "model.layers.0.self_attn.q_proj"


def _prepare(model: nn.Module, training: TrainingSpec = TrainingSpec(prepare_kbit=False), **adapter) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return prepare(model, AdapterSpec(**adapter), training, CURRENT)


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> pathlib.Path:
    return tmp_path_factory.mktemp("checkpoints")


@pytest.fixture(scope="module")
def llama_snap() -> Snapshot:
    model = build_model(ModelSpec("llama", num_layers=2))
    model = _prepare(model, r=4, lora_alpha=8, lora_dropout=0.1, target_modules=("q_proj", "v_proj", "embed_tokens"),
                     modules_to_save=("lm_head",))
    return snapshot_of(model)


@pytest.fixture(scope="module")
def qlora_snap(cache) -> Snapshot:
    model = load_model(ModelSpec("llama", num_layers=1), QuantSpec(kind="4bit", quant_type="fp4", double_quant=True,
                                                                    compute_dtype="bfloat16"), cache)
    return snapshot_of(_prepare(model, TrainingSpec(), r=2, target_modules=("q_proj",)))


@pytest.fixture(scope="module")
def int8_snap(cache) -> Snapshot:
    model = load_model(ModelSpec("llama", num_layers=1), QuantSpec(kind="8bit", int8_threshold=0.0), cache)
    return snapshot_of(_prepare(model, TrainingSpec(), r=2, target_modules=("q_proj",)))


def _param(snap: Snapshot, path: str) -> ParamFacts:
    (found,) = [p for p in snap.params if p.path == path]
    return found


def _lora(snap: Snapshot, path: str) -> LoraModuleFacts:
    (found,) = [m for m in snap.lora if m.path == path]
    return found


# -- snapshot_of --------------------------------------------------------------------------------------


def test_param_facts(llama_snap):
    paths = [p.path for p in llama_snap.params]
    assert paths == sorted(paths) and len(paths) == len(set(paths))
    assert _param(llama_snap, f"{Q}.lora_A.default.weight") == ParamFacts(
        f"{Q}.lora_A.default.weight", (4, 64), "float32", True, "plain", ())
    assert _param(llama_snap, f"{Q}.lora_B.default.weight").shape == (64, 4)
    base = _param(llama_snap, f"{Q}.base_layer.weight")
    assert (base.shape, base.requires_grad, base.cls) == ((64, 64), False, "plain")
    assert _param(llama_snap, "model.embed_tokens.lora_embedding_A.default").shape == (4, 256)
    assert _param(llama_snap, "lm_head.original_module.weight").requires_grad is False
    assert _param(llama_snap, "lm_head.modules_to_save.default.weight").requires_grad is True
    assert f"{Q}.weight" not in paths and "lm_head.weight" not in paths


def test_lora_facts(llama_snap):
    assert [m.path for m in llama_snap.lora] == [
        "model.embed_tokens",
        "model.layers.0.self_attn.q_proj",
        "model.layers.0.self_attn.v_proj",
        "model.layers.1.self_attn.q_proj",
        "model.layers.1.self_attn.v_proj",
    ]
    v = _lora(llama_snap, "model.layers.1.self_attn.v_proj")
    assert (v.kind, v.in_features, v.out_features, v.fan_in_fan_out, v.base) == ("linear", 64, 32, False, ())
    assert v.adapters == (
        ("default", AdapterFacts(r=4, alpha=8.0, scaling=2.0, dropout="dropout(0.1)", lora_bias=False,
                                 a_shape=(4, 64), a_dtype="float32", b_shape=(32, 4), b_dtype="float32",
                                 init="A=nonzero,B=zero")),
    )
    emb = _lora(llama_snap, "model.embed_tokens")
    assert (emb.kind, emb.in_features, emb.out_features) == ("embedding", 256, 64)
    (name, facts), = emb.adapters
    assert name == "default"
    assert (facts.a_shape, facts.b_shape, facts.init, facts.lora_bias) == ((4, 256), (64, 4), "A=zero,B=nonzero", False)


def test_saved_and_model_facts(llama_snap):
    assert llama_snap.saved == (SavedModuleFacts("lm_head", ("default",)),)
    m = llama_snap.model
    # the embedding carries a trainable adapter, so its outputs require grad without any hook
    assert (m.gradient_checkpointing, m.input_grads, m.loaded_in_4bit, m.loaded_in_8bit) == (False, True, False, False)
    assert m.gradient_checkpointing_kwargs is None and m.config_writes == ()
    trainable = sum(_numel(p) for p in llama_snap.params if p.requires_grad)
    lora = 2 * 4 * (64 + 64) + 2 * 4 * (64 + 32) + 4 * (256 + 64)
    assert m.trainable_params == trainable == lora + 256 * 64  # + the lm_head copy
    assert m.total_params == sum(_numel(p) for p in llama_snap.params)
    assert llama_snap.error is None


def _numel(p: ParamFacts) -> int:
    n = 1
    for d in p.shape:
        n *= d
    return n


def test_conv1d_facts():
    snap = snapshot_of(_prepare(build_model(ModelSpec("gpt2", num_layers=1)), r=2, lora_bias=True,
                                target_modules=("c_attn",)))
    (m,) = snap.lora
    assert (m.path, m.kind, m.in_features, m.out_features, m.fan_in_fan_out) == (
        "transformer.h.0.attn.c_attn", "conv1d", 64, 192, True)
    facts = dict(m.adapters)["default"]
    assert facts.lora_bias is True and facts.b_shape == (192, 2)
    assert _param(snap, "transformer.h.0.attn.c_attn.lora_B.default.bias").shape == (192,)
    assert (snap.model.gradient_checkpointing, snap.model.input_grads) == (False, False)


def test_4bit_facts(qlora_snap):
    q = _lora(qlora_snap, Q)
    assert (q.kind, q.in_features, q.out_features) == ("bnb4bit", 64, 64)
    assert dict(q.base) == {"compute_dtype": "bfloat16", "quant_type": "fp4", "compress_statistics": True,
                            "quant_storage": "uint8"}
    packed = _param(qlora_snap, f"{Q}.base_layer.weight")
    assert packed.cls == "Params4bit" and packed.dtype == "uint8" and packed.requires_grad is False
    assert dict(packed.quant)["quant_type"] == "fp4" and dict(packed.quant)["nested"] is True
    m = qlora_snap.model
    assert (m.gradient_checkpointing, m.input_grads, m.loaded_in_4bit, m.loaded_in_8bit) == (True, True, True, False)


def test_8bit_facts(int8_snap):
    q = _lora(int8_snap, Q)
    assert q.kind == "bnb8bit"
    assert dict(q.base) == {"threshold": 0.0, "has_fp16_weights": False}
    w = _param(int8_snap, f"{Q}.base_layer.weight")
    assert (w.cls, w.dtype, w.shape) == ("Int8Params", "int8", (64, 64))
    assert int8_snap.model.loaded_in_8bit is True


# -- JSON round trip ----------------------------------------------------------------------------------------


def _round_trip(snap: Snapshot) -> Snapshot:
    return Snapshot.from_json(json.loads(json.dumps(snap.to_json())))


@pytest.mark.parametrize("name", ["llama_snap", "qlora_snap", "int8_snap"])
def test_snapshot_json_round_trip(name, request):
    snap = request.getfixturevalue(name)
    back = _round_trip(snap)
    assert back == snap
    assert isinstance(back.lora[0].adapters[0][1], AdapterFacts)
    assert isinstance(back.params[0].shape, tuple)


def test_warning_kinds_are_sorted_unique_and_round_trip():
    model = _prepare(build_model(ModelSpec("gpt2", num_layers=1)), r=2, target_modules=("c_attn",))
    snap = snapshot_of(model, ["exclude_unused", "conv1d_fan_in_fan_out", "exclude_unused"])
    assert snap.warnings == ("conv1d_fan_in_fan_out", "exclude_unused")
    assert snapshot_of(model).warnings == ()
    assert _round_trip(snap) == snap


def test_error_snapshot_round_trip():
    snap = error_snapshot("ValueError", "no_target_matched", "nothing matched")
    back = _round_trip(snap)
    assert back == snap and back.error.message == "nothing matched"
    assert back.params == () and back.model is None


# -- diff ------------------------------------------------------------------------------------------------------


def test_identical_snapshots_have_no_divergences(llama_snap):
    assert diff(llama_snap, llama_snap) == []
    assert diff(llama_snap, _round_trip(llama_snap)) == []


def _replace_param(snap: Snapshot, path: str, **changes) -> Snapshot:
    params = tuple(dataclasses.replace(p, **changes) if p.path == path else p for p in snap.params)
    return dataclasses.replace(snap, params=params)


def _replace_adapter(snap: Snapshot, path: str, **changes) -> Snapshot:
    lora = []
    for m in snap.lora:
        if m.path == path:
            m = dataclasses.replace(m, adapters=tuple((n, dataclasses.replace(f, **changes)) for n, f in m.adapters))
        lora.append(m)
    return dataclasses.replace(snap, lora=tuple(lora))


def test_changed_dtype(llama_snap):
    path = f"{Q}.lora_A.default.weight"
    up = _replace_param(llama_snap, path, dtype="bfloat16")
    assert diff(llama_snap, up) == [Divergence(path, "dtype", "float32", "bfloat16")]


def test_changed_requires_grad_and_shape(llama_snap):
    path = f"{Q}.lora_B.default.weight"
    up = _replace_param(llama_snap, path, requires_grad=False, shape=(64, 8))
    assert diff(llama_snap, up) == [
        Divergence(path, "shape", (64, 4), (64, 8)),
        Divergence(path, "requires_grad", True, False),
    ]


def test_changed_scaling(llama_snap):
    up = _replace_adapter(llama_snap, Q, scaling=4.0)
    assert diff(llama_snap, up) == [Divergence(Q, "adapter[default].scaling", 2.0, 4.0)]


def test_changed_lora_module_field(llama_snap):
    lora = tuple(dataclasses.replace(m, fan_in_fan_out=True) if m.path == Q else m for m in llama_snap.lora)
    assert diff(llama_snap, dataclasses.replace(llama_snap, lora=lora)) == [Divergence(Q, "fan_in_fan_out", False, True)]


def test_missing_param_and_module(llama_snap):
    path = f"{Q}.lora_A.default.weight"
    up = dataclasses.replace(
        llama_snap,
        params=tuple(p for p in llama_snap.params if p.path != path),
        lora=tuple(m for m in llama_snap.lora if m.path != Q),
    )
    assert diff(llama_snap, up) == [
        Divergence(path, "param.present", True, False),
        Divergence(Q, "lora.present", True, False),
    ]
    assert diff(up, llama_snap) == [
        Divergence(path, "param.present", False, True),
        Divergence(Q, "lora.present", False, True),
    ]


def test_missing_adapter_and_saved_wrapper(llama_snap):
    lora = tuple(dataclasses.replace(m, adapters=()) if m.path == Q else m for m in llama_snap.lora)
    up = dataclasses.replace(llama_snap, lora=lora, saved=())
    assert diff(llama_snap, up) == [
        Divergence(Q, "adapter[default].present", True, False),
        Divergence("lm_head", "saved.present", True, False),
    ]


def test_model_fields(llama_snap):
    model = dataclasses.replace(llama_snap.model, trainable_params=1, gradient_checkpointing=True)
    assert diff(llama_snap, dataclasses.replace(llama_snap, model=model)) == [
        Divergence(MODEL, "gradient_checkpointing", False, True),
        Divergence(MODEL, "trainable_params", llama_snap.model.trainable_params, 1),
    ]


def test_warning_kinds(llama_snap):
    up = dataclasses.replace(llama_snap, warnings=("exclude_unused", "conv1d_fan_in_fan_out"))
    # one divergence per warning kind, so that an entry can excuse exactly one
    assert diff(llama_snap, up) == [Divergence(MODEL, "warnings.conv1d_fan_in_fan_out", False, True),
                                    Divergence(MODEL, "warnings.exclude_unused", False, True)]
    assert diff(up, llama_snap)[0] == Divergence(MODEL, "warnings.conv1d_fan_in_fan_out", True, False)
    assert diff(up, up) == []


def test_error_class_and_kind():
    ref = error_snapshot("ValueError", "invalid_r", "a")
    assert diff(ref, error_snapshot("TypeError", "invalid_r", "b")) == [
        Divergence(ERROR, "error", "ValueError[invalid_r]", "TypeError[invalid_r]")]
    assert diff(ref, error_snapshot("ValueError", "other", "a")) == [
        Divergence(ERROR, "error", "ValueError[invalid_r]", "ValueError[other]")]
    assert diff(ref, error_snapshot("ValueError", "invalid_r", "different words")) == []  # messages are not compared


def test_error_on_one_side_only(llama_snap):
    err = error_snapshot("ValueError", "no_target_matched", "nothing matched")
    (d,) = diff(err, llama_snap)
    assert (d.path, d.field, d.upstream) == (ERROR, "raised", "no error")
    assert d.reference == "ValueError[no_target_matched]: nothing matched"
    (d,) = diff(llama_snap, err)
    assert (d.reference, d.upstream) == ("no error", "ValueError[no_target_matched]: nothing matched")


def test_divergences_are_sorted_by_path(llama_snap):
    paths = [f"{Q}.lora_A.default.weight", "model.embed_tokens.lora_embedding_A.default", "lm_head.original_module.weight"]
    up = llama_snap
    for path in reversed(paths):
        up = _replace_param(up, path, dtype="float16")
    assert [d.path for d in diff(llama_snap, up)] == sorted(paths)


def test_divergence_to_json():
    d = Divergence("p", "shape", (1, 2), (2, 1))
    assert d.to_json() == {"path": "p", "field": "shape", "reference": [1, 2], "upstream": [2, 1]}
    json.dumps(d.to_json())


def test_format_table():
    divs = [Divergence(f"{Q}.lora_A.default.weight", "dtype", "float32", "bfloat16"),
            Divergence(Q, "adapter[default].scaling", 2.0, 4.0)]
    lines = format_table(divs).splitlines()
    assert lines[0].split() == ["path", "field", "reference", "upstream"]
    assert set(lines[1].replace(" ", "")) == {"-"}
    assert lines[2].split() == [f"{Q}.lora_A.default.weight", "dtype", "'float32'", "'bfloat16'"]
    assert lines[3].split() == [Q, "adapter[default].scaling", "2.0", "4.0"]
    assert len(lines) == 4
    # columns line up
    assert lines[2].index("dtype") == lines[0].index("field") == lines[3].index("adapter[default]")


def test_format_table_limit():
    divs = [Divergence(f"p{i}", "f", i, i + 1) for i in range(5)]
    lines = format_table(divs, limit=2).splitlines()
    assert len(lines) == 2 + 2 + 1
    assert lines[-1] == "... and 3 more"
    assert format_table([]).splitlines()[0].split() == ["path", "field", "reference", "upstream"]


# -- Case JSON ---------------------------------------------------------------------------------------------------


FULL_CASE = Case(
    model=ModelSpec("gpt2", "SEQ_CLS", num_layers=3, hidden_size=128, load_dtype="bfloat16", seed=7),
    quant=QuantSpec(kind="4bit", quant_type="fp4", double_quant=True, compute_dtype="bfloat16",
                    quant_storage="float16", skip_modules=("score", "classifier")),
    adapter=AdapterSpec(
        r=4,
        target_modules=("c_attn", "c_fc"),
        exclude_modules=None,
        layers_to_transform=(0, 2),
        layers_pattern=("h",),
        rank_pattern=(("c_attn", 2), (r".*\.0\..*", 8)),
        alpha_pattern=(("c_fc", 64),),
        modules_to_save=("lm_head",),
        bias="lora_only",
        init_lora_weights="gaussian",
        task_type="SEQ_CLS",
    ),
    training=TrainingSpec(gradient_checkpointing=True, autocast_adapter_dtype=False),
    invalid=True,
)


def test_case_json_round_trip():
    text = FULL_CASE.dumps()
    back = Case.loads(text)
    assert back == FULL_CASE
    assert back.dumps() == text
    assert back.adapter.lora_alpha is ABSENT and back.training.use_reentrant is ABSENT
    assert back.adapter.exclude_modules is None
    assert back.adapter.rank_pattern == (("c_attn", 2), (r".*\.0\..*", 8))
    assert isinstance(back.quant.skip_modules, tuple) and isinstance(back.adapter.layers_pattern, tuple)


def test_case_json_omits_absent_fields():
    data = json.loads(FULL_CASE.dumps())
    assert "lora_alpha" not in data["adapter"] and "use_reentrant" not in data["training"]
    assert data["adapter"]["exclude_modules"] is None  # None is a value, not absent
    assert data["adapter"]["target_modules"] == ["c_attn", "c_fc"]
    assert data["invalid"] is True
    minimal = Case(ModelSpec("llama"))
    assert json.loads(minimal.dumps())["adapter"] == {}
    assert Case.loads(minimal.dumps()) == minimal


def test_case_given_converts_to_lora_config_types():
    given_ = FULL_CASE.adapter.given()
    assert "lora_alpha" not in given_ and given_["exclude_modules"] is None
    assert given_["target_modules"] == ["c_attn", "c_fc"]
    assert given_["rank_pattern"] == {"c_attn": 2, r".*\.0\..*": 8}
    assert list(given_["rank_pattern"]) == ["c_attn", r".*\.0\..*"]  # order kept


def test_case_from_json_rejects_unknown_fields():
    with pytest.raises(ValueError, match="unknown fields"):
        Case.from_json({"model": {"model_type": "llama", "colour": "red"}})


def test_absent_is_a_falsy_singleton():
    assert _Absent() is ABSENT and not ABSENT and repr(ABSENT) == "ABSENT"
    import pickle

    assert pickle.loads(pickle.dumps(ABSENT)) is ABSENT


@settings(max_examples=60, deadline=None, database=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(cases(profile=CURRENT))
def test_drawn_cases_round_trip(case):
    assert Case.loads(case.dumps()) == case
    assert Case.from_json(json.loads(json.dumps(case.to_json()))) == case


def test_value_relation_is_bitwise_after_rounding_and_handles_scalars_and_nan():
    from conformance.engine.facts import value_relation

    scalar = torch.tensor(1.5, dtype=torch.bfloat16)  # a 0-dim bf16 tensor (a scale, a norm's eps buffer)
    assert value_relation(scalar, torch.tensor(1.5)) == "equal"  # an exact cast is equal
    assert value_relation(scalar, torch.tensor(1.501)) == "equal"  # the loaded value rounded to bf16 is 1.5
    assert value_relation(scalar, torch.tensor(1.75)).startswith("changed: ")
    with_nan = torch.tensor([float("nan"), 1.0])
    assert value_relation(with_nan, with_nan.clone()) == "equal"  # an unchanged NaN is no change
    assert value_relation(torch.tensor([-0.0]), torch.tensor([0.0])).startswith("changed: ")
    assert value_relation(torch.zeros(3), None) == value_relation(torch.zeros(3), torch.zeros(4)) == "new"
