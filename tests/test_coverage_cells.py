"""Coverage by construction: the cells of every run, and strategies that stay inside a pinned cell."""

from __future__ import annotations

import itertools
import re

import pytest

from reference import PROFILES, select_profile
from reference.spec import ABSENT
from strategies import ZOO, cases
from strategies.coverage import DIMENSIONS, cells, dimension_cells, expected_cells
from strategies.inits import init_variant
from strategies.targets import TARGET_KINDS, target_kind
from strategies.zoo import model_types, tasks_of
from test_strategies import draw_many

CURRENT = PROFILES["current"]
QUANTS = ("none", "8bit", "4bit")


def test_peft_cells_reach_every_pair_of_each_dimension():
    peft = tuple(c for c in cells("peft") if c.adapter_feature == "lora" and c.init_variant == "default")
    types = model_types()
    assert {(c.model_type, c.quantization) for c in peft} == set(itertools.product(types, QUANTS))
    assert {(c.model_type, c.target_kind) for c in peft} == set(itertools.product(types, TARGET_KINDS))
    assert {(c.model_type, c.task) for c in peft} == {(t, task) for t in types for task in tasks_of(t)}
    assert len(peft) == 4 * len(types)  # four cells a type are enough for all three pairings


def test_trl_cells_reach_every_causal_type_with_every_quantization():
    trl = tuple(c for c in cells("trl") if c.adapter_feature == "lora" and c.trainer == "sft")
    causal = model_types("CAUSAL_LM")
    assert {(c.model_type, c.quantization) for c in trl} == set(itertools.product(causal, QUANTS))
    assert {c.task for c in trl} == {"CAUSAL_LM"}
    assert {c.target_kind for c in trl} == set(TARGET_KINDS)


@pytest.mark.parametrize("level", ["peft", "trl"])
def test_feature_cells_reach_every_quantization_kind_with_valid_default_targets(level):
    """Each adapter feature beyond plain LoRA has a cell per quantization kind (and, at the peft
    level, per target kind too), on types every profile has default targets for, so that a
    feature cell is never forced invalid; restricting the quantization kinds keeps them."""
    from reference.profiles import PROFILES

    for feature in ("dora", "tokens"):
        pinned = [c for c in cells(level) if c.adapter_feature == feature]
        wanted = set(itertools.product(QUANTS, TARGET_KINDS)) if level == "peft" else set(QUANTS)
        got = {(c.quantization, c.target_kind) for c in pinned} if level == "peft" else {c.quantization for c in pinned}
        assert got == wanted
        assert all(c.model_type in p.default_targets for c in pinned for p in PROFILES.values())
        assert all(c.id.endswith(f"-{feature}") for c in pinned)
        only = [c for c in cells(level, quant_kinds=("8bit",)) if c.adapter_feature == feature]
        assert only and {c.quantization for c in only} == {"8bit"}


@pytest.mark.parametrize("level", ["peft", "trl"])
def test_parameter_cells_pin_every_fused_expert_type(level):
    """``parameters`` cells exist where the stack fuses experts and has target_parameters: at the
    peft level every fused type meets every quantization kind, at the trl level every kind is met;
    never with default targets (peft loses them on these types: a registry entry)."""
    from strategies.coverage import ADAPTER_FEATURES
    from strategies.params import fused_types

    assert "parameters" in ADAPTER_FEATURES
    pinned = [c for c in cells(level) if c.adapter_feature == "parameters"]
    if not fused_types() or "target_parameters" not in select_profile().features:
        assert pinned == []
        return
    if level == "peft":
        assert {(c.model_type, c.quantization) for c in pinned} == set(itertools.product(fused_types(), QUANTS))
    else:
        assert {c.quantization for c in pinned} == set(QUANTS) and {c.model_type for c in pinned} <= set(fused_types())
    assert {c.target_kind for c in pinned} <= {"list", "regex", "all-linear"}
    assert all(c.id.endswith("-parameters") and c.parameter_targets == "given" for c in pinned)


def test_tying_cells_pin_weight_tying_on_tied_decoders():
    """``tying`` cells: peft level only, one per quantization kind, on decoder types whose config ties
    the embeddings, where the profile has ensure_weight_tying; drawn cases ask for it."""
    from strategies.tying import tied_types

    pinned = [c for c in cells("peft") if c.adapter_feature == "tying"]
    assert not [c for c in cells("trl") if c.adapter_feature == "tying"]
    if "ensure_weight_tying" not in select_profile().features:
        assert pinned == []
        return
    assert {c.quantization for c in pinned} == set(QUANTS)
    assert {c.model_type for c in pinned} <= set(tied_types()) and "gemma" in tied_types()
    assert not {"t5", "mt5", "bart", "llama"} & set(tied_types())
    for cell in pinned:
        drawn = draw_many(cases(model_types=(cell.model_type,), quant_kinds=(cell.quantization,),
                                target_kinds=(cell.target_kind,), tasks=(cell.task,), tying=True), 5)
        assert all(c.adapter.ensure_weight_tying is True for c in drawn)


def test_init_cells_pin_each_variant_with_every_quantization_kind_it_accepts():
    """One cell per init variant of the profile and quantization kind it accepts (PiSSA and
    pissa_niter refuse a quantized base, LoftQ is drawn unquantized), targets reaching Linear
    layers, on types every profile has defaults for; a pinned cell draws that init, valid or as
    its own invalid kind (pissa_niter: "pissa_niter_K"; loftq with a loftq_config)."""
    from reference import select_profile

    pinned = [c for c in cells("peft") if c.init_variant != "default"]
    variants = select_profile().init_variants
    assert {(c.init_variant, c.quantization) for c in pinned} == {
        (v, q) for v in variants for q in (("none",) if v in ("pissa", "pissa_niter", "loftq") else QUANTS)}
    assert {"pissa_niter", "loftq"} <= {c.init_variant for c in pinned}
    assert {c.target_kind for c in pinned} <= {"all-linear", "default"}
    assert all(c.model_type in p.default_targets for c in pinned for p in PROFILES.values())
    assert all(c.id.endswith(f"-init_{c.init_variant}") and c.adapter_feature == "lora" for c in pinned)
    assert {c.quantization for c in cells("peft", quant_kinds=("8bit",)) if c.init_variant != "default"} == {"8bit"}
    for cell in pinned:
        drawn = draw_many(cases(profile=CURRENT, model_types=(cell.model_type,), quant_kinds=(cell.quantization,),
                                target_kinds=(cell.target_kind,), tasks=(cell.task,), init=cell.init_variant), 15)
        assert all(init_variant(c.adapter.init_lora_weights) == cell.init_variant for c in drawn), cell
        if cell.init_variant == "pissa_niter":
            assert all(re.fullmatch(r"pissa_niter_[0-4]", c.adapter.init_lora_weights) for c in drawn if not c.invalid)
        assert all((c.adapter.loftq_config is not ABSENT) == (cell.init_variant == "loftq") for c in drawn if not c.invalid)
        assert any(not c.invalid for c in drawn), cell
        assert all(c.adapter.lora_bias is not True for c in drawn)


def test_cells_follow_the_quantization_restriction_and_a_shard_filter():
    only = cells("peft", quant_kinds=("4bit",))
    assert {c.quantization for c in only} == {"4bit"}
    assert {(c.model_type, c.target_kind) for c in only} == set(itertools.product(model_types(), TARGET_KINDS))
    kept = cells("peft", keep=lambda c: c.model_type == "llama")
    assert kept == tuple(c for c in cells("peft") if c.model_type == "llama")
    assert cells("peft", quant_kinds=()) == ()


def test_expected_cells_are_the_projections_of_the_cells():
    expected = expected_cells(("peft", "trl"))
    assert set(expected) == set(DIMENSIONS)
    assert len(expected["peft: model_type x quantization"]) == len(model_types()) * 3
    trl_pairs = set(expected["trl: model_type x quantization"])
    assert set(itertools.product(model_types("CAUSAL_LM"), QUANTS)) <= trl_pairs
    # (beyond the causal types: the sequence classifiers a RewardTrainer cell meets)
    assert {t for t, _ in trl_pairs} - set(model_types("CAUSAL_LM")) <= set(model_types("SEQ_CLS"))
    from strategies.params import fused_types

    features = ("dora", "lora", "tokens") + (("parameters",) if fused_types()
                                              and "target_parameters" in select_profile().features else ())
    tying = ("tying",) if "ensure_weight_tying" in select_profile().features else ()
    from strategies.trainers import clones_chat_template, installed_trainers

    template = ("template",) if clones_chat_template("sft") else ()
    for level in ("peft", "trl"):
        assert expected[f"{level}: adapter_feature x quantization"] == sorted(
            itertools.product(features + (tying + ("resume", "adapters") if level == "peft" else template), QUANTS))
    assert expected["trl: trainer x quantization"] == sorted(
        itertools.product(installed_trainers(), QUANTS))
    assert {c for c in expected["peft: parameter_targets x model_type"] if c[0] == "given"} == {
        ("given", t) for t in (fused_types() if "parameters" in features else ())}
    assert set(expected_cells(("trl",))) == {"trl: model_type x quantization", "trl: adapter_feature x quantization",
                                              "trl: trainer x quantization"}


def test_a_case_falls_in_the_cells_of_its_level():
    case = {"model": {"model_type": "gpt2", "task": "SEQ_CLS"}, "quant": {"kind": "8bit"},
            "adapter": {"target_modules": ".*c_attn"}, "training": {"level": "peft"}}
    assert dimension_cells(case) == {
        "peft: model_type x quantization": ("gpt2", "8bit"),
        "peft: model_type x target_kind": ("gpt2", "regex"),
        "peft: model_type x task": ("gpt2", "SEQ_CLS"),
        "peft: adapter_feature x quantization": ("lora", "8bit"),
        "peft: init_variant x quantization": ("default", "8bit"),
        "peft: parameter_targets x model_type": ("-", "gpt2"),
    }
    case["adapter"]["init_lora_weights"] = "OLoRA"
    assert dimension_cells(case)["peft: init_variant x quantization"] == ("olora", "8bit")
    del case["adapter"]["init_lora_weights"]
    case["training"]["level"] = "trl"
    case["adapter"]["use_dora"] = True
    assert dimension_cells(case) == {"trl: model_type x quantization": ("gpt2", "8bit"),
                                     "trl: adapter_feature x quantization": ("dora", "8bit"),
                                     "trl: trainer x quantization": ("sft", "8bit")}
    case["training"]["trainer"] = "kto"
    case["training"]["chat_template"] = "jinja"
    assert dimension_cells(case)["trl: trainer x quantization"] == ("kto", "8bit")
    assert dimension_cells(case)["trl: adapter_feature x quantization"] == ("template", "8bit")


@pytest.mark.parametrize("targets, kind", [(None, "default"), ("ALL-LINEAR", "all-linear"), (".*q", "regex"),
                                           (["q"], "list"), (("q",), "list")])
def test_target_kind(targets, kind):
    assert target_kind(targets) == kind


# A cell for every target kind on a type with defaults and one without, and every quantization.
PINNED = [("llama", q, k, "CAUSAL_LM") for q in QUANTS for k in TARGET_KINDS] + [
    ("granite", "none", k, "CAUSAL_LM") for k in TARGET_KINDS] + [("bert", "4bit", "regex", "TOKEN_CLS"),
                                                                   ("t5", "8bit", "default", "SEQ_2_SEQ_LM")]


@pytest.mark.parametrize("model_type, quant, kind, task", PINNED)
def test_a_pinned_cell_draws_only_cases_of_that_cell(model_type, quant, kind, task):
    drawn = draw_many(cases(profile=CURRENT, model_types=(model_type,), quant_kinds=(quant,),
                            target_kinds=(kind,), tasks=(task,)), 25)
    for case in drawn:
        assert (case.model.model_type, case.quant.kind, case.model.task) == (model_type, quant, task)
        assert target_kind(case.adapter.target_modules) == kind, case
    if kind == "default" and model_type not in CURRENT.default_targets:
        assert all(case.invalid for case in drawn)  # only no_default_targets can be drawn there
    else:
        assert any(not case.invalid for case in drawn)


def test_every_trl_cell_draws_causal_lm_cases():
    for cell in cells("trl")[:9]:
        for case in draw_many(cases(level="trl", profile=CURRENT, model_types=(cell.model_type,),
                                    quant_kinds=(cell.quantization,), target_kinds=(cell.target_kind,),
                                    trainer=cell.trainer), 5):
            assert case.model.task == "CAUSAL_LM" and case.training.level == "trl"
            assert target_kind(case.adapter.target_modules) == cell.target_kind
            assert case.model.model_type in ZOO
