"""The conformance tests: each Hypothesis example prepares a case twice and diffs.

Run with ``python -m pytest conformance``; options are ``--conformance-*``.

There is one test per quantization kind: each gets ``--conformance-examples``
examples, so every kind is exercised equally, and Hypothesis's mutation of
previous examples (which keeps the model type) cannot crowd out model types.
"""

from __future__ import annotations

import pytest
from hypothesis import example, given

from conformance import checks
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


def _peft_level(case: Case, request: pytest.FixtureRequest) -> None:
    conf = checks.current()
    if not conf.wants("peft"):
        pytest.skip("--conformance-level excludes peft (and the trl level has no tests yet)")
    if case.quant.kind not in conf.quant_kinds:
        pytest.skip(f"--conformance-quant excludes {case.quant.kind}")
    if conf.shard and case not in SEED_SCENARIO and not conf.in_shard(case.model.model_type, case.quant.kind):
        pytest.skip(f"--conformance-shard={conf.shard} excludes {case.model.model_type}/{case.quant.kind}")
    checks.check_case(case, conf, request.node.nodeid)


@checks.hypothesis_settings()
@given(case=cases(level="peft", quant_kinds=("none",), model_types=checks.current().shard_model_types("none")))
def test_peft_level_unquantized(case, request):
    """peft level, full-precision models: get_peft_model (and sometimes the k-bit step) agree."""
    _peft_level(case, request)


@checks.hypothesis_settings()
@given(case=cases(level="peft", quant_kinds=("8bit",), model_types=checks.current().shard_model_types("8bit")))
def test_peft_level_8bit(case, request):
    """peft level, bitsandbytes 8-bit: prepare_model_for_kbit_training + get_peft_model agree."""
    _peft_level(case, request)


@checks.hypothesis_settings()
@given(case=cases(level="peft", quant_kinds=("4bit",), model_types=checks.current().shard_model_types("4bit")))
@example(case=SEED_SCENARIO[0])
@example(case=SEED_SCENARIO[1])
def test_peft_level_4bit(case, request):
    """peft level, bitsandbytes 4-bit (QLoRA): prepare_model_for_kbit_training + get_peft_model agree."""
    _peft_level(case, request)
