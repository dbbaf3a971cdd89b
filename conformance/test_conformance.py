"""The conformance tests: each Hypothesis example prepares a case twice and diffs.

Run with ``python -m pytest conformance``; options are ``--conformance-*``.

There is one test per level and quantization kind: each gets
``--conformance-examples`` examples, so every kind is exercised equally, and
Hypothesis's mutation of previous examples (which keeps the model type) cannot
crowd out model types.
"""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import example, given

from conformance.plugin import checks
from reference.spec import AdapterSpec, Case, ModelSpec, QuantSpec, TrainingSpec
from strategies import cases

# The seed scenario: nf4 QLoRA of a Llama-style model, bf16 compute, r=8, rsLoRA off and on.
SEED_SCENARIO = tuple(
    Case(
        model=ModelSpec("llama", "CAUSAL_LM", num_layers=2, load_dtype="bfloat16"),
        quant=QuantSpec(kind="4bit", quant_type="nf4", double_quant=True, compute_dtype="bfloat16"),
        adapter=AdapterSpec(
            r=8,
            lora_alpha=16,
            lora_dropout=0.05,
            target_modules=("q_proj", "k_proj", "v_proj", "o_proj"),
            use_rslora=rslora,
            task_type="CAUSAL_LM",
        ),
        training=TrainingSpec(level="peft", prepare_kbit=True, gradient_checkpointing=True),
    )
    for rslora in (False, True)
)


# The same QLoRA run through SFTTrainer with bf16 training, the model given as a path.
TRL_SEED_SCENARIO = tuple(
    dataclasses.replace(
        case,
        training=TrainingSpec(level="trl", gradient_checkpointing=True, bf16=True, model_from_path=True),
    )
    for case in SEED_SCENARIO
)


def _level(level: str, case: Case, request: pytest.FixtureRequest) -> None:
    conf = checks.current()
    if not conf.wants(level):
        pytest.skip(f"--conformance-level excludes {level}")
    if case.quant.kind not in conf.quant_kinds:
        pytest.skip(f"--conformance-quant excludes {case.quant.kind}")
    explicit = case in SEED_SCENARIO or case in TRL_SEED_SCENARIO
    if conf.shard and not explicit and not conf.in_shard(case.model.model_type, case.quant.kind):
        pytest.skip(f"--conformance-shard={conf.shard} excludes {case.model.model_type}/{case.quant.kind}")
    checks.check_case(case, conf, request.node.nodeid)


@checks.hypothesis_settings()
@given(case=cases(level="peft", quant_kinds=("none",), model_types=checks.current().shard_model_types("none")))
def test_peft_level_unquantized(case, request):
    """peft level, full-precision models: get_peft_model (and sometimes the k-bit step) agree."""
    _level("peft", case, request)


@checks.hypothesis_settings()
@given(case=cases(level="peft", quant_kinds=("8bit",), model_types=checks.current().shard_model_types("8bit")))
def test_peft_level_8bit(case, request):
    """peft level, bitsandbytes 8-bit: prepare_model_for_kbit_training + get_peft_model agree."""
    _level("peft", case, request)


@checks.hypothesis_settings()
@given(case=cases(level="peft", quant_kinds=("4bit",), model_types=checks.current().shard_model_types("4bit")))
@example(case=SEED_SCENARIO[0])
@example(case=SEED_SCENARIO[1])
def test_peft_level_4bit(case, request):
    """peft level, bitsandbytes 4-bit (QLoRA): prepare_model_for_kbit_training + get_peft_model agree."""
    _level("peft", case, request)


@checks.hypothesis_settings()
@given(case=cases(level="trl", quant_kinds=("none",), model_types=checks.current().shard_model_types("none")))
def test_trl_level_unquantized(case, request):
    """trl level, full-precision models: SFTTrainer's preparation agrees with the reference's trl flow."""
    _level("trl", case, request)


@checks.hypothesis_settings()
@given(case=cases(level="trl", quant_kinds=("8bit",), model_types=checks.current().shard_model_types("8bit")))
def test_trl_level_8bit(case, request):
    """trl level, bitsandbytes 8-bit: SFTTrainer's preparation agrees with the reference's trl flow."""
    _level("trl", case, request)


@checks.hypothesis_settings()
@given(case=cases(level="trl", quant_kinds=("4bit",), model_types=checks.current().shard_model_types("4bit")))
@example(case=TRL_SEED_SCENARIO[0])
@example(case=TRL_SEED_SCENARIO[1])
def test_trl_level_4bit(case, request):
    """trl level, bitsandbytes 4-bit (QLoRA): SFTTrainer's preparation agrees with the reference's trl flow."""
    _level("trl", case, request)
