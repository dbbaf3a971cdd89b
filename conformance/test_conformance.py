"""The conformance tests: each Hypothesis example prepares a case twice and diffs.

Run with ``python -m pytest conformance``; options are ``--conformance-*``.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from conformance import checks
from reference.spec import AdapterSpec, Case, ModelSpec, QuantSpec, TrainingSpec
from strategies import cases

SEED_SCENARIO = [
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
]


@settings(checks.hypothesis_settings())
@given(data=st.data())
@example(data=checks.Fixed(SEED_SCENARIO[0]))
@example(data=checks.Fixed(SEED_SCENARIO[1]))
def test_peft_level(data, conformance_settings, request):
    """peft level: prepare_model_for_kbit_training + get_peft_model agree with the reference."""
    if not conformance_settings.wants("peft"):
        pytest.skip("--conformance-level excludes peft")
    case = data.draw(cases(level="peft", quant_kinds=checks.quant_kinds(conformance_settings)), label="case")
    checks.check_case(case, conformance_settings, request.node.nodeid)
