"""Adapter interoperability: the reference's PEFT-format adapters load in upstream, and back.

Both directions on the same bases: the reference prepares, gets non-zero adapter
values, saves with :func:`reference.adapter_io.save_adapter` (no peft involved),
and ``peft.PeftModel.from_pretrained`` loads it onto a fresh copy of the base;
upstream's ``get_peft_model`` + ``save_pretrained`` output is read by
:func:`reference.adapter_io.load_adapter`.  Each time both models must produce
the same logits on the same inputs (eval mode), within the numerical checks'
tolerance for the model's precision.  Bases: fp32 with embedding and
modules-to-save, rank and alpha patterns and rsLoRA, a Conv1D with lora_bias and
bias="all", a classification head, bitsandbytes 8-bit and 4-bit.
"""

from __future__ import annotations

import json

import pytest
import torch

from conformance.engine.models import load_model
from conformance.numerics import tolerance_for
from conformance.numerics.run import assign_shared_values, case_seed, make_inputs, run_model
from conformance.engine.runner import cache_dir
from reference import prepare, select_profile
from reference.adapter_io import (
    CONFIG_NAME,
    PREFIX,
    WEIGHTS_NAME,
    adapter_state_dict,
    checkpoint_key,
    load_adapter,
    read_adapter_spec,
    save_adapter,
)
from reference.config import resolve
from reference.spec import AdapterSpec, Case, ModelSpec, QuantSpec, TrainingSpec

PROFILE = select_profile()
NO_KBIT = TrainingSpec(prepare_kbit=False)
QKVO = ("q_proj", "k_proj", "v_proj", "o_proj")

CASES = {
    "llama-fp32-patterns-embedding-saved-head": Case(
        ModelSpec("llama", "CAUSAL_LM", num_layers=2),
        adapter=AdapterSpec(r=4, lora_alpha=8, target_modules=("q_proj", "v_proj", "embed_tokens"),
                            rank_pattern=(("v_proj", 2),), alpha_pattern=(("q_proj", 32),),
                            modules_to_save=("lm_head",), task_type="CAUSAL_LM"),
        training=NO_KBIT,
    ),
    "gpt2-conv1d-lora-bias-bias-all": Case(
        ModelSpec("gpt2", "CAUSAL_LM", num_layers=2),
        adapter=AdapterSpec(r=2, lora_alpha=16, target_modules=("c_attn", "c_proj"), lora_bias=True, bias="all",
                            fan_in_fan_out=True, task_type="CAUSAL_LM"),
        training=NO_KBIT,
    ),
    "llama-seq-cls-rslora": Case(
        ModelSpec("llama", "SEQ_CLS", num_layers=1),
        adapter=AdapterSpec(r=8, lora_alpha=16, use_rslora=True, target_modules="all-linear", task_type="SEQ_CLS"),
        training=NO_KBIT,
    ),
    "llama-8bit-rank-pattern": Case(
        ModelSpec("llama", "CAUSAL_LM", num_layers=2, load_dtype="float16"),
        QuantSpec(kind="8bit"),
        AdapterSpec(r=4, lora_alpha=16, target_modules=QKVO, rank_pattern=(("o_proj", 8),), task_type="CAUSAL_LM"),
        NO_KBIT,
    ),
    "llama-4bit-nf4-bf16-alpha-pattern": Case(
        ModelSpec("llama", "CAUSAL_LM", num_layers=2, load_dtype="bfloat16"),
        QuantSpec(kind="4bit", quant_type="nf4", double_quant=True, compute_dtype="bfloat16"),
        AdapterSpec(r=8, lora_alpha=16, target_modules=QKVO, alpha_pattern=(("k_proj", 4),), task_type="CAUSAL_LM"),
        NO_KBIT,
    ),
}


def _base(case: Case):
    return load_model(case.model, case.quant, cache_dir())


def _assert_same_outputs(case: Case, ours, theirs) -> None:
    seed = case_seed(case)
    inputs = make_inputs(case, ours, seed)
    a = run_model(ours, inputs, train=False, seed=seed, backward=False)
    b = run_model(theirs, inputs, train=False, seed=seed, backward=False)
    assert a.error is None and b.error is None, (a.error, b.error)
    tol = tolerance_for(ours)
    err = float((a.logits.double() - b.logits.double()).abs().max())
    assert torch.isfinite(a.logits).all() and torch.isfinite(b.logits).all()
    assert err <= tol.rtol * float(a.logits.double().abs().max()) + tol.atol, (err, tol)


def _reference_with_values(case: Case):
    model = prepare(_base(case), case.adapter, case.training, PROFILE)
    assign_shared_values(model, model, case_seed(case))  # non-zero B, nudged saved copies
    return model


@pytest.mark.parametrize("name", sorted(CASES))
def test_upstream_loads_the_reference_adapter(name, tmp_path):
    """reference -> disk -> PeftModel.from_pretrained: same outputs."""
    from peft import PeftModel

    case = CASES[name]
    ours = _reference_with_values(case)
    save_adapter(ours, tmp_path, case.adapter, PROFILE)
    theirs = PeftModel.from_pretrained(_base(case), str(tmp_path))
    inner = theirs.base_model.model
    ours_state = adapter_state_dict(ours)
    theirs_params = dict(inner.named_parameters())
    for path, param in ours.named_parameters():  # every adapter tensor arrived, bit for bit
        if checkpoint_key(path) in ours_state and ".lora_" in path:
            assert torch.equal(theirs_params[path].detach().cpu().float(), param.detach().cpu().float()), path
    _assert_same_outputs(case, ours, inner)


@pytest.mark.parametrize("name", sorted(CASES))
def test_reference_loads_the_upstream_adapter(name, tmp_path):
    """get_peft_model -> save_pretrained -> reference.load_adapter: same outputs."""
    from peft import LoraConfig, get_peft_model

    case = CASES[name]
    peft_model = get_peft_model(_base(case), LoraConfig(**case.adapter.given()))
    inner = peft_model.base_model.model
    assign_shared_values(inner, inner, case_seed(case))
    peft_model.save_pretrained(str(tmp_path))
    ours = load_adapter(_base(case), tmp_path, PROFILE)
    _assert_same_outputs(case, ours, inner)


def test_checkpoint_keys_follow_peft_layout():
    assert checkpoint_key("model.layers.0.self_attn.q_proj.lora_A.default.weight") == (
        PREFIX + "model.layers.0.self_attn.q_proj.lora_A.weight"
    )
    assert checkpoint_key("model.embed_tokens.lora_embedding_B.default") == PREFIX + "model.embed_tokens.lora_embedding_B"
    assert checkpoint_key("score.modules_to_save.default.weight") == PREFIX + "score.weight"
    assert checkpoint_key("transformer.h.0.attn.c_attn.base_layer.bias") == (
        PREFIX + "transformer.h.0.attn.c_attn.base_layer.bias"
    )
    # a module that happens to be called "default" is not an adapter segment
    assert checkpoint_key("default.lora_A.default.weight") == PREFIX + "default.lora_A.weight"


def test_saved_files_and_config_round_trip(tmp_path):
    """The config written is LoraConfig-shaped and reads back to the same resolved settings."""
    case = CASES["llama-fp32-patterns-embedding-saved-head"]
    save_adapter(_reference_with_values(case), tmp_path, case.adapter, PROFILE)
    assert {p.name for p in tmp_path.iterdir()} == {CONFIG_NAME, WEIGHTS_NAME}
    config = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert config["peft_type"] == "LORA" and config["rank_pattern"] == {"v_proj": 2}
    assert resolve(read_adapter_spec(tmp_path), PROFILE) == resolve(case.adapter, PROFILE)


def test_reference_adapter_io_does_not_import_peft():
    import ast
    from pathlib import Path

    source = Path(__file__).resolve().parents[1] / "reference" / "adapter_io.py"
    names = {
        alias.name.split(".")[0]
        for node in ast.walk(ast.parse(source.read_text()))
        if isinstance(node, (ast.Import, ast.ImportFrom))
        for alias in (node.names if isinstance(node, ast.Import) else [ast.alias(node.module or "")])
    }
    assert not names & {"peft", "trl"}


def test_load_rejects_tensors_that_match_nothing(tmp_path):
    from safetensors.torch import save_file

    case = CASES["llama-seq-cls-rslora"]
    save_adapter(_reference_with_values(case), tmp_path, case.adapter, PROFILE)
    tensors = {"base_model.model.nowhere.lora_A.weight": torch.zeros(2, 2)}
    save_file(tensors, str(tmp_path / WEIGHTS_NAME))
    with pytest.raises(ValueError, match="match no parameter"):
        load_adapter(_base(case), tmp_path, PROFILE)
