"""The trl trainers besides SFTTrainer (``training.trainer``): the table, the reference's flows,
agreement with the installed trl, and held-out faults planted in each trainer's preparation.

The reference's rules are checked against each era's row whatever trl is installed; agreement and
faults need the trainer in the installed trl, and skip with the reason elsewhere (CI runs this
file on both pinned stacks through the ``faults`` session).
"""

from __future__ import annotations

import dataclasses
import types
from importlib import metadata

import pytest
import torch

from conformance.engine.diff import Divergence
from conformance.engine.features import CaseContext
from conformance.engine.known import load_registry
from conformance.engine.models import cache_dir, load_model
from conformance.engine.runner import run_case
from reference import select_profile
from reference.spec import AdapterSpec, Case, ModelSpec, QuantSpec, TrainingSpec
from reference.trainer_flows import REF, prepare_trainer
from reference.trainers import TRAINERS, available_trainers, table, trainer_rules
from strategies.params import fused_types
from strategies.trainers import installed_trainers

TRL = metadata.version("trl")
INSTALLED = installed_trainers()
PROFILE = select_profile()
QV = AdapterSpec(r=4, lora_alpha=8, lora_dropout=0.1, target_modules=("q_proj", "v_proj"), task_type="CAUSAL_LM")
SEQ_QV = dataclasses.replace(QV, task_type="SEQ_CLS")


def _needs(trainer: str, era: str | None = None):
    rules = trainer_rules(trainer, TRL)
    ok = trainer in INSTALLED and (era is None or (rules is not None and rules.preparation == era))
    return pytest.mark.skipif(not ok, reason=f"{trainer} ({era or 'any'} shape) is not generated for trl {TRL}")


def _case(trainer: str, quant: QuantSpec = QuantSpec(), **training) -> Case:
    reward = trainer == "reward"
    model = ModelSpec("llama", "SEQ_CLS" if reward else "CAUSAL_LM", num_layers=1, load_dtype="bfloat16",
                      **({"num_labels": 1} if reward else {}))
    return Case(model, quant, SEQ_QV if reward else QV, TrainingSpec(level="trl", trainer=trainer, **training))


PASSED_IN = {"peft_model_in": True, "peft_config_too": False, "gradient_checkpointing": True}


# -- the table -----------------------------------------------------------------------------------


def test_each_pinned_stack_generates_the_trainers_it_ships_with_peft_support():
    assert available_trainers("0.19.1") == ("sft", "dpo", "kto", "reward", "grpo", "orpo", "cpo", "bco")
    assert available_trainers("1.16.0") == ("sft", "dpo", "kto", "reward", "grpo", "rloo")
    for release in ("0.25.1", "0.26.0"):  # the gate's release stacks: only Reward runs there (transformers 5)
        assert available_trainers(release) == ("sft", "reward")
    assert trainer_rules("reward", "0.25.1").preparation == "helper"
    assert trainer_rules("reward", "0.26.0").preparation == "inline"
    assert available_trainers("0.24.0") == ("sft",)  # no row was checked there: nothing else is claimed
    assert available_trainers(None) == ("sft",)


def test_one_row_per_trainer_and_era_and_the_readme_shows_the_table():
    from fault_kit import REPO

    keys = [(r.trainer, r.trl) for r in TRAINERS]
    assert len(keys) == len(set(keys))
    text = table()
    assert text.count("\n") == len(TRAINERS) + 1 and "| dpo | `>=1.16` | inline |" in text
    assert text in (REPO / "README.md").read_text(), "README's trainer table is stale: print reference.trainers.table()"


# -- the reference's flows, per era (whatever trl is installed) ------------------------------------


def _reference(case: Case, version: str):
    model = load_model(case.model, case.quant, cache_dir())
    rules = trainer_rules(case.training.trainer_name, version)
    result = prepare_trainer(model, case.adapter, case.training, PROFILE, rules, pad_token_id=252, trained_seed=7)
    return result.model, result.wrapper


def test_inline_dpo_copies_a_passed_in_adapter_into_a_frozen_inactive_ref_adapter():
    model, wrapper = _reference(_case("dpo", **PASSED_IN), "1.16.0")
    q = model.model.layers[0].self_attn.q_proj
    assert set(q.lora_A) == {"default", REF} and q.active_adapters == ["default"]
    assert q.lora_A["default"].weight.requires_grad and not q.lora_A[REF].weight.requires_grad
    torch.testing.assert_close(q.lora_B[REF].weight, q.lora_B["default"].weight.to(q.lora_B[REF].weight.dtype))
    assert q.lora_B["default"].weight.abs().sum() > 0  # the trained values, not the zero init
    assert wrapper.active_adapters == ("default",)


def test_grpo_adds_no_ref_adapter_with_its_default_beta_and_rloo_does():
    grpo, _ = _reference(_case("grpo", **PASSED_IN), "1.16.0")
    rloo, _ = _reference(_case("rloo", **PASSED_IN), "1.16.0")
    assert set(grpo.model.layers[0].self_attn.q_proj.lora_A) == {"default"}
    assert set(rloo.model.layers[0].self_attn.q_proj.lora_A) == {"default", REF}


def test_preference_trainers_disable_every_dropout_and_sampling_trainers_keep_it():
    dpo, _ = _reference(_case("dpo"), "1.16.0")
    grpo, _ = _reference(_case("grpo"), "1.16.0")
    assert dpo.model.layers[0].self_attn.q_proj.lora_dropout["default"].p == 0
    assert grpo.model.layers[0].self_attn.q_proj.lora_dropout["default"].p == 0.1


def test_seed_family_takes_the_kbit_step_and_casts_4bit_modules_for_bf16():
    case = _case("kto", QuantSpec(kind="4bit", compute_dtype="bfloat16"), bf16=True)
    model, _ = _reference(case, "0.19.1")
    assert model.model.norm.weight.dtype == torch.float32  # the k-bit step (no "sharded" test)
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16  # fp32 after the step, bf16 after the cast


def test_seed_reward_takes_the_kbit_step_but_arranges_no_input_grads():
    model, _ = _reference(_case("reward", QuantSpec(kind="8bit"), gradient_checkpointing=False), "0.19.1")
    assert model.model.norm.weight.dtype == torch.float32
    assert not model.model.embed_tokens.weight.requires_grad
    assert not getattr(model, "_require_grads_hook", None)


def test_seed_grpo_turns_checkpointing_on_itself():
    model, _ = _reference(_case("grpo", gradient_checkpointing=True), "0.19.1")
    assert model.is_gradient_checkpointing and model.config.use_cache is False


def test_inline_trainers_reject_a_peft_model_with_a_config():
    from reference.errors import InvalidConfig

    with pytest.raises(InvalidConfig) as caught:
        _reference(_case("kto", peft_model_in=True, peft_config_too=True), "1.16.0")
    assert caught.value.kind == "trl_peft_model_with_config"


def test_a_quantization_config_in_both_places_is_an_error_and_beside_a_model_is_ignored():
    from reference.errors import InvalidConfig
    from reference.trainer_flows import prepare_trl_level
    from reference.trl import select_trl_flow

    q4 = QuantSpec(kind="4bit", compute_dtype="bfloat16")
    twice = _case("dpo", q4, model_from_path=True, quantization_config_in="both")
    with pytest.raises(InvalidConfig) as caught:
        prepare_trl_level(load_model(twice.model, q4, cache_dir()), twice.adapter, twice.training, PROFILE,
                          select_trl_flow("current"))
    assert caught.value.kind == "quantization_config_twice"
    beside, _ = _reference(_case("grpo", q4, quantization_config_in="trainer"), "1.16.0")
    plain, _ = _reference(_case("grpo", q4), "1.16.0")
    assert [(n, p.dtype) for n, p in beside.named_parameters()] == [(n, p.dtype) for n, p in plain.named_parameters()]


# -- agreement with the installed trl --------------------------------------------------------------


def _status(case: Case) -> tuple[str, tuple[str, ...]]:
    outcome = run_case(case, PROFILE)
    return outcome.status, outcome.known


@pytest.mark.parametrize("trainer", [t for t in ("dpo", "kto", "reward", "grpo", "rloo", "orpo", "cpo", "bco")])
def test_clean_cases_agree_for_every_installed_trainer(trainer):
    if trainer not in INSTALLED:
        pytest.skip(f"{trainer} is not generated for trl {TRL}")
    for case in (_case(trainer), _case(trainer, QuantSpec(kind="8bit"), gradient_checkpointing=True),
                 _case(trainer, QuantSpec(kind="4bit", compute_dtype="bfloat16"), bf16=True),
                 _case(trainer, **PASSED_IN)):
        status, known = _status(case)
        assert status in ("agree", "known") and set(known) <= {"loraconfig-mutated-in-place"}, (case.dumps(), known)


# -- held-out faults, one per trainer flow -----------------------------------------------------------


def _fields(case: Case, path_part: str = "") -> set[str]:
    outcome = run_case(case, PROFILE)
    assert outcome.status == "diverge", f"the fault went unnoticed: {outcome.status} {outcome.known}"
    return {d.field for d in outcome.divergences if path_part in d.path}


def _after_add_adapter(monkeypatch, corrupt):
    import peft

    original = peft.PeftModel.add_adapter

    def faulty(self, adapter_name, peft_config, *args, **kwargs):
        out = original(self, adapter_name, peft_config, *args, **kwargs)
        corrupt(self, adapter_name)
        return out

    monkeypatch.setattr(peft.PeftModel, "add_adapter", faulty)


@_needs("dpo", "inline")
def test_catches_a_trainable_dpo_ref_adapter(monkeypatch):
    """Fault: DPOTrainer's reference copy of a passed-in adapter is left trainable."""
    def thaw(model, name):
        for path, param in model.named_parameters():
            if f".{name}." in path:
                param.requires_grad = True

    _after_add_adapter(monkeypatch, thaw)
    assert "requires_grad" in _fields(_case("dpo", **PASSED_IN), f".{REF}.")


def _moe_dpo_case() -> Case:
    """DPO given a PeftModel whose all-linear adapter reaches qwen3_moe's fused experts (nested
    parameter wrappers: gate_up_proj inside down_proj's)."""
    return Case(ModelSpec("qwen3_moe", "CAUSAL_LM", num_layers=1), adapter=AdapterSpec(target_modules="all-linear"),
                training=TrainingSpec(level="trl", trainer="dpo", peft_model_in=True, peft_config_too=False))


_FUSED = pytest.mark.skipif("qwen3_moe" not in fused_types(), reason="transformers 4 keeps experts as Linear layers")


@_needs("dpo", "inline")
@_FUSED
def test_the_ref_copy_reaches_every_nested_expert_parameter_wrapper():
    """The "ref" copy is added to each nested parameter wrapper of the experts, as upstream's
    add_adapter updates every ParamWrapper the stored config's target_parameters name."""
    outcome = run_case(_moe_dpo_case(), PROFILE)
    assert outcome.status in ("agree", "known") and not outcome.divergences, outcome.divergences[:3]
    ref_params = {p.path for p in outcome.reference.params}
    for wrapper in ("experts", "experts.base_layer"):
        assert f"model.layers.0.mlp.{wrapper}.lora_A.{REF}.weight" in ref_params


@_needs("dpo", "inline")
@_FUSED
def test_catches_a_ref_copy_missing_from_an_inner_expert_wrapper(monkeypatch):
    """Fault: add_adapter updates only the outer of two nested parameter wrappers."""
    def strip_inner(model, name):
        for path, module in model.named_modules():
            if path.endswith("experts.base_layer") and name in getattr(module, "lora_A", {}):
                del module.lora_A[name], module.lora_B[name]

    _after_add_adapter(monkeypatch, strip_inner)
    outcome = run_case(_moe_dpo_case(), PROFILE)
    assert outcome.status == "diverge", f"the fault went unnoticed: {outcome.status} {outcome.known}"
    # (trl's copy then looks the inner ".ref." parameter up and raises)
    assert {(d.path, d.field) for d in outcome.divergences} & {("<error>", "raised"), ("<error>", "error")} or \
        any(f".{REF}." in d.path for d in outcome.divergences), outcome.divergences[:3]


@_needs("dpo", "inline")
@_FUSED
def test_the_qwen2_moe_conversion_entry_does_not_excuse_a_trainable_ref_copy(monkeypatch):
    """The qwen2_moe conversion entry excuses the ref copy's expert factors only: a ref adapter
    left trainable on that model still fails."""
    def thaw(model, name):
        for path, param in model.named_parameters():
            if f".{name}." in path:
                param.requires_grad = True

    _after_add_adapter(monkeypatch, thaw)
    case = _moe_dpo_case()
    case = dataclasses.replace(case, model=dataclasses.replace(case.model, model_type="qwen2_moe"))
    assert "requires_grad" in _fields(case, f".{REF}.")


@_needs("kto", "inline")
def test_catches_a_ref_adapter_that_keeps_its_initial_values(monkeypatch):
    """Fault: KTOTrainer adds the ``ref`` adapter but its copy of the trained values goes nowhere."""
    import peft

    original = torch.nn.Module.get_parameter

    def detached(self, target):
        param = original(self, target)
        return torch.nn.Parameter(param.detach().clone()) if f".{REF}." in target else param

    monkeypatch.setattr(peft.PeftModel, "get_parameter", detached, raising=False)
    assert "value" in _fields(_case("kto", **PASSED_IN), f".{REF}.")


@_needs("dpo", "inline")
def test_the_embedding_ref_copy_entry_still_catches_a_linear_factor_left_uncopied(monkeypatch):
    """In the scope of ref-adapter-copy-skips-embedding-factors (LoRA on gpt2's wte), a ref copy that
    misses the Linear factors too is a fault: the entry excuses the embedding's factors only."""
    import peft

    original = torch.nn.Module.get_parameter

    def detached(self, target):
        param = original(self, target)
        return torch.nn.Parameter(param.detach().clone()) if f".{REF}." in target else param

    monkeypatch.setattr(peft.PeftModel, "get_parameter", detached, raising=False)
    case = Case(ModelSpec("gpt2", num_layers=1), adapter=AdapterSpec(r=4, target_modules=("c_attn", "wte"),
                task_type="CAUSAL_LM"), training=TrainingSpec(level="trl", trainer="dpo", **PASSED_IN))
    outcome = run_case(case, PROFILE)
    assert outcome.status == "diverge"
    assert any(d.field == "value" and ".c_attn.lora_A.ref" in d.path for d in outcome.divergences)


@_needs("rloo", "inline")
def test_catches_rloo_activating_its_ref_adapter(monkeypatch):
    """Fault: RLOOTrainer's ``ref`` copy of a passed-in adapter becomes the active, trained one."""
    _after_add_adapter(monkeypatch, lambda model, name: model.base_model.set_adapter(name))
    assert "requires_grad" in _fields(_case("rloo", **PASSED_IN), f".{REF}.")


@_needs("kto")
def test_catches_a_trainer_that_keeps_lora_dropout(monkeypatch):
    """Fault: KTOTrainer's ``disable_dropout`` no longer reaches the model."""
    import importlib

    kto = importlib.import_module("trl.trainer.kto_trainer")
    monkeypatch.setattr(kto, "disable_dropout_in_model", lambda model: None)
    assert any(f.endswith(".dropout") for f in _fields(_case("kto")))


@_needs("reward", "inline")
def test_catches_reward_quantized_trainables_cast_to_the_wrong_dtype(monkeypatch):
    """Fault: RewardTrainer's QLoRA cast uses fp16, not bf16."""
    import trl.trainer.reward_trainer as reward

    proxy = types.SimpleNamespace(**{name: getattr(torch, name) for name in dir(torch) if not name.startswith("__")})
    proxy.bfloat16 = torch.float16
    monkeypatch.setattr(reward, "torch", proxy)
    assert "dtype" in _fields(_case("reward", QuantSpec(kind="4bit", compute_dtype="bfloat16")))


def _takes_quantization_config(trainer: str) -> bool:
    rules = trainer_rules(trainer, TRL)
    return trainer in INSTALLED and rules is not None and rules.takes_quantization_config


@pytest.mark.skipif(not _takes_quantization_config("reward"), reason=f"no quantization_config argument in trl {TRL}")
def test_catches_a_trainer_that_drops_its_quantization_config(monkeypatch):
    """Fault: RewardTrainer's path load loses the quantization_config given to the trainer."""
    import trl.trainer.reward_trainer as reward

    original = reward.create_model_from_path

    def unquantized(*args, **kwargs):
        kwargs.pop("quantization_config", None)
        return original(*args, **kwargs)

    monkeypatch.setattr(reward, "create_model_from_path", unquantized)
    case = _case("reward", QuantSpec(kind="8bit"), model_from_path=True, quantization_config_in="trainer")
    assert run_case(case, PROFILE).status == "diverge"


def test_the_dpo_kto_quantization_config_entry_excuses_only_their_rejection():
    registry = load_registry(versions={"peft": "0.21.2", "transformers": "5.23.0", "trl": "1.16.0"})
    raised = Divergence("<error>", "raised", "no error",
                        "ValueError[quantization_config_with_model]: ValueError: You passed `quantization_config`...")
    dpo = _case("dpo", QuantSpec(kind="8bit"), quantization_config_in="trainer")
    assert registry.explain(CaseContext(dpo), [raised])[0] == []
    for other in (_case("sft", QuantSpec(kind="8bit"), quantization_config_in="trainer"),  # SFT ignores it: a fault
                  _case("dpo", QuantSpec(kind="8bit"), quantization_config_in="trainer", model_from_path=True),
                  _case("dpo", QuantSpec(kind="8bit"))):
        assert registry.explain(CaseContext(other), [raised])[0] == [raised]
    dtype = Divergence("model.layers.0.self_attn.q_proj.lora_A.default.weight", "dtype", "'float32'", "'bfloat16'")
    assert registry.explain(CaseContext(dpo), [dtype])[0] == [dtype]


@_needs("grpo", "inline")
def test_catches_grpo_without_input_grads(monkeypatch):
    """Fault: GRPOTrainer's checkpointing no longer makes the inputs require grad."""
    import peft

    monkeypatch.setattr(peft.PeftModel, "enable_input_require_grads", lambda self: None, raising=False)
    assert "input_grads" in _fields(_case("grpo", gradient_checkpointing=True))


@pytest.mark.parametrize("trainer, module", [
    pytest.param("dpo", "dpo_trainer", marks=_needs("dpo", "family")),
    pytest.param("reward", "reward_trainer", marks=_needs("reward", "reward_classic")),
])
def test_catches_a_seed_trainer_skipping_its_kbit_step(monkeypatch, trainer, module):
    """Fault: DPOTrainer / RewardTrainer 0.19 no longer run prepare_model_for_kbit_training on an 8-bit model."""
    import importlib

    monkeypatch.setattr(importlib.import_module(f"trl.trainer.{module}"), "prepare_model_for_kbit_training",
                        lambda model, **kwargs: model)
    assert "dtype" in _fields(_case(trainer, QuantSpec(kind="8bit")))


@_needs("cpo", "family")
def test_catches_a_seed_family_trainer_skipping_its_bf16_cast(monkeypatch):
    """Fault: CPOTrainer 0.19's bf16 cast of a 4-bit model's modules does nothing."""
    import trl.trainer.cpo_trainer as cpo

    monkeypatch.setattr(cpo, "peft_module_casting_to_bf16", lambda model: None)
    assert "dtype" in _fields(_case("cpo", QuantSpec(kind="4bit", compute_dtype="bfloat16"), bf16=True))


@_needs("grpo", "grpo_classic")
def test_catches_seed_grpo_without_input_grads(monkeypatch):
    """Fault: GRPOTrainer 0.19 turns checkpointing on but forgets the input grads."""
    import trl.trainer.grpo_trainer as grpo

    def checkpointing_only(self, model, args):
        model.config.use_cache = False
        model.base_model.gradient_checkpointing_enable()
        return model

    monkeypatch.setattr(grpo.GRPOTrainer, "_enable_gradient_checkpointing", checkpointing_only)
    assert "input_grads" in _fields(_case("grpo", gradient_checkpointing=True))


# -- the registry entries these trainers met (synthetic divergences: any stack) ---------------------

SEED = {"peft": "0.15.2", "transformers": "4.53.3", "bitsandbytes": "0.47.0", "trl": "0.19.1"}
MERGED = Case(ModelSpec("gpt_neox", num_layers=1), QuantSpec(kind="8bit"),
              AdapterSpec(r=4, lora_alpha=8, target_modules=("query_key_value",), lora_bias=True),
              TrainingSpec(level="trl", trainer="dpo", peft_model_in=True, peft_config_too=True))


def test_seed_family_merge_entries_need_a_family_trainer_merging_a_lora_bias():
    from conformance.engine.snapshot import LoraModuleFacts, Snapshot

    registry = load_registry(versions=SEED)
    ref = Snapshot(lora=(LoraModuleFacts("gpt_neox.layers.0.attention.query_key_value", "bnb8bit", 64, 192, False, (), ()),))
    unscaled = Divergence("gpt_neox.layers.0.attention.query_key_value.base_layer.bias", "value", "changed: a", "changed: b")
    weight = Divergence("gpt_neox.layers.0.attention.query_key_value.base_layer.weight", "value", "changed: a", "changed: b")
    swap = Divergence("<error>", "error", "RuntimeError[merge_lora_bias_without_base_bias]",
                      "AttributeError[merge_reads_a_missing_bias]")
    ctx = CaseContext(MERGED, ref, ref)
    assert registry.explain(ctx, [unscaled])[0] == [] and registry.explain(ctx, [swap])[0] == []
    assert registry.explain(ctx, [weight])[0] == [weight]  # a different value in scope still fails
    for other in (dataclasses.replace(MERGED, training=dataclasses.replace(MERGED.training, trainer="grpo")),
                  dataclasses.replace(MERGED, training=dataclasses.replace(MERGED.training, trainer="sft")),
                  dataclasses.replace(MERGED, adapter=dataclasses.replace(MERGED.adapter, lora_bias=False)),
                  dataclasses.replace(MERGED, training=dataclasses.replace(MERGED.training, peft_config_too=False))):
        assert registry.explain(CaseContext(other, ref, ref), [unscaled, swap])[0] == [unscaled, swap]
    unquantized = dataclasses.replace(MERGED, quant=QuantSpec())
    # peft 0.15's merge_and_unload reads the missing bias on a plain Linear too (observed: llama, qwen3 under ORPO)
    assert registry.explain(CaseContext(unquantized, ref, ref), [swap])[0] == []
    assert registry.explain(CaseContext(unquantized, ref, ref), [unscaled])[0] == []  # peft 0.15: every layer kind
    fixed = load_registry(versions=dict(SEED, peft="0.16.0"))
    assert fixed.explain(CaseContext(unquantized, ref, ref), [unscaled])[0] == [unscaled]
