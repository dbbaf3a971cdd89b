"""Trainable token rows (``trainable_token_indices``): the reference's layout and forward, faults
planted into upstream, and the narrowness of the two registry entries they brought."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from conformance.engine.features import CaseContext
from conformance.engine.known import default_registry
from conformance.engine.models import cache_dir, load_model
from conformance.engine.runner import run_case
from fault_kit import PROFILE, after_get_peft_model, assert_caught, unwrap_tied_head
from reference.errors import TokenIndexOutOfRange, TokensOnLoraLayer
from reference.prepare import prepare
from reference.spec import AdapterSpec, Case, ModelSpec, QuantSpec, TrainingSpec
from reference.tokens import TokensWrapper

NO_KBIT = TrainingSpec(prepare_kbit=False)


def _case(model_type: str, targets: tuple, task: str = "CAUSAL_LM", rows: tuple = (1, 2), quant: QuantSpec = QuantSpec(),
          load_dtype: str = "float32", **adapter) -> Case:
    return Case(ModelSpec(model_type, task, num_layers=1, load_dtype=load_dtype), quant,
                AdapterSpec(r=4, target_modules=targets, trainable_token_indices=rows, task_type=task, **adapter),
                TrainingSpec(prepare_kbit=quant.quantized))


def _prepared(case: Case):
    model = load_model(case.model, case.quant, cache_dir())
    return prepare(model, case.adapter, case.training, PROFILE)


def test_the_input_embedding_and_its_tied_head_share_the_trainable_rows():
    model = _prepared(_case("gpt2", ("c_attn",), rows=(5, 7)))
    wte, head = model.transformer.wte, model.lm_head
    assert isinstance(wte, TokensWrapper) and isinstance(head, TokensWrapper)
    assert head.token_adapter.tied_adapter is wte.token_adapter and wte.token_adapter.tied_adapter is None
    delta = wte.token_adapter.trainable_tokens_delta["default"]
    assert delta is head.token_adapter.trainable_tokens_delta["default"] and delta.requires_grad
    base = wte.token_adapter.base_layer.weight
    assert torch.equal(delta, base[[5, 7]]) and not base.requires_grad
    names = [n for n, _ in model.named_parameters()]
    assert "transformer.wte.token_adapter.trainable_tokens_delta.default" in names
    with torch.no_grad():
        delta.add_(1.0)
        out = wte(torch.tensor([[5, 9]]))
    assert torch.equal(out[0, 0], base[5] + 1.0) and torch.equal(out[0, 1], base[9])


def test_rows_follow_the_adapter_dtype_policy_and_a_head_keeps_its_bias():
    model = _prepared(_case("llama", ("q_proj",), load_dtype="bfloat16"))
    adapter = model.model.embed_tokens.token_adapter
    assert adapter.trainable_tokens_delta["default"].dtype == torch.float32
    assert adapter.trainable_tokens_original.default.dtype == torch.float32
    bert = _prepared(_case("bert", ("query",)))
    head = bert.cls.predictions.decoder
    assert isinstance(head, TokensWrapper) and head.token_adapter.base_layer.bias is not None
    x = torch.randn(2, 64)
    with torch.no_grad():
        expected = torch.nn.functional.linear(x, head.token_adapter.base_layer.weight, head.token_adapter.base_layer.bias)
        torch.testing.assert_close(head(x), expected)


def test_t5_wraps_every_embedding_that_shares_the_weight():
    model = _prepared(_case("t5", ("q",), task="SEQ_2_SEQ_LM", rows=(3,)))
    for name in ("shared", "encoder.embed_tokens", "decoder.embed_tokens", "lm_head"):
        assert isinstance(model.get_submodule(name), TokensWrapper), name
    assert model.shared.token_adapter.tied_adapter is None


def test_rejections():
    with pytest.raises(TokenIndexOutOfRange) as err:
        _prepared(_case("llama", ("q_proj",), rows=(300,)))
    assert isinstance(err.value, IndexError) and err.value.kind == "token_index_out_of_range"
    with pytest.raises(TokensOnLoraLayer) as err:
        _prepared(_case("llama", ("q_proj", "embed_tokens")))
    assert isinstance(err.value, TypeError)


# -- faults planted into upstream ------------------------------------------------------------------------

CASES = [_case("llama", ("q_proj",)), _case("gpt2", ("c_attn",)), _case("llama", ("q_proj",), quant=QuantSpec(kind="4bit")),
         _case("t5", ("q",), task="SEQ_2_SEQ_LM")]


def test_clean_token_cases_agree():
    for case in CASES:
        outcome = run_case(case, PROFILE)
        assert outcome.status in ("agree", "known"), (case.dumps(), outcome.divergences)
        assert set(outcome.known) <= {"loraconfig-mutated-in-place"}, outcome.known


def _deltas(peft_model):
    return [p for n, p in peft_model.named_parameters() if "trainable_tokens_delta" in n]


def test_catches_frozen_rows(monkeypatch):
    after_get_peft_model(monkeypatch, lambda pm, _c: [p.requires_grad_(False) for p in _deltas(pm)])
    assert_caught(CASES, {"requires_grad"}, path=r".*trainable_tokens_delta\.default")


def test_catches_rows_that_do_not_start_from_the_embedding(monkeypatch):
    after_get_peft_model(monkeypatch, lambda pm, _c: [p.add_(0.25) for p in _deltas(pm)])
    assert_caught(CASES, {"numerics.init"})


def test_catches_a_forward_that_ignores_the_rows(monkeypatch):
    """Numbers only where nothing else shows: the wrapper looks up the frozen weight."""
    from peft.tuners.trainable_tokens.layer import TrainableTokensLayer

    monkeypatch.setattr(TrainableTokensLayer, "get_merged_weights", lambda self, active: self.base_layer.weight)
    assert_caught(CASES, {"numerics.logits", "numerics.grad", "numerics.train_grad", "input_grads"})


def test_catches_a_tied_head_left_unwrapped(monkeypatch):
    """gpt2's lm_head shares wte's weight: without its wrapper the logits ignore the rows."""
    after_get_peft_model(monkeypatch, unwrap_tied_head)
    assert_caught([CASES[1]], {"tokens.present"}, path="lm_head")


# -- the registry entries are narrow -------------------------------------------------------------------

BIAS = "trainable-tokens-tied-head-drops-bias"
TIED = "trainable-tokens-skip-tied-embeddings"
BERT = _case("bert", ("query",))
T5_CLS = _case("t5", ("q",), task="SEQ_CLS", rows=(0,))


def test_bias_entry_names_only_a_forward_that_is_exactly_the_bias_dropped(monkeypatch):
    outcome = run_case(BERT, PROFILE)
    assert outcome.status == "known" and BIAS in outcome.known, outcome.divergences
    # in scope, rows that do not start from the embedding still fail (the init check)
    after_get_peft_model(monkeypatch, lambda pm, _c: [p.add_(0.25) for p in _deltas(pm)])
    faulty = run_case(BERT, PROFILE)
    assert faulty.status == "diverge" and any(d.field == "numerics.init" for d in faulty.divergences)


def test_bias_defect_is_not_named_beside_another_forward_fault(monkeypatch):
    """The bias dropped *and* LoRA scaled twice: the reference with the bias dropped still differs."""
    from fault_kit import wrap_update_layer

    def double(layer, args):
        layer.scaling[args["adapter_name"]] *= 2

    wrap_update_layer(monkeypatch, after=double)
    outcome = run_case(dataclasses.replace(BERT, adapter=dataclasses.replace(BERT.adapter, init_lora_weights=False)),
                       PROFILE)
    assert outcome.status == "diverge"
    assert not any(d.field == "numerics.tied_head_bias_dropped" for d in outcome.divergences), outcome.divergences


def test_tied_embeddings_entry_is_for_t5_classification_only(monkeypatch):
    registry = default_registry()
    if TIED not in {e.id for e in registry.active}:
        pytest.skip(f"{TIED} does not apply to the installed stack")
    outcome = run_case(T5_CLS, PROFILE)
    assert outcome.status == "known" and TIED in outcome.known, outcome.divergences
    seq2seq = _case("t5", ("q",), task="SEQ_2_SEQ_LM")
    assert TIED not in registry.scope(CaseContext(seq2seq))
    assert TIED not in registry.scope(CaseContext(dataclasses.replace(
        T5_CLS, adapter=dataclasses.replace(T5_CLS.adapter, trainable_token_indices=None))))
    # in scope, frozen rows still fail
    after_get_peft_model(monkeypatch, lambda pm, _c: [p.requires_grad_(False) for p in _deltas(pm)])
    faulty = run_case(T5_CLS, PROFILE)
    assert faulty.status == "diverge" and any(d.field == "requires_grad" for d in faulty.divergences)


def test_autocast_entry_is_for_half_precision_bare_parameter_adapters_only():
    entry = "inference-mode-autocast-retrains-embedding-adapters"
    registry = default_registry()
    if entry not in {e.id for e in registry.active}:
        pytest.skip(f"{entry} does not apply to the installed stack")
    half = _case("llama", ("q_proj",), load_dtype="bfloat16", inference_mode=True)
    outcome = run_case(half, PROFILE)
    assert outcome.status == "known" and entry in outcome.known, outcome.divergences
    fp32 = _case("llama", ("q_proj",), inference_mode=True)
    assert entry not in registry.scope(CaseContext(fp32, outcome.reference, outcome.upstream))
    from conformance.engine.diff import Divergence

    linear = Divergence("model.layers.0.self_attn.q_proj.lora_A.default.weight", "requires_grad", "False", "True")
    assert registry.explain(CaseContext(half, outcome.reference, outcome.upstream), [linear])[0] == [linear]


def test_embed_scale_entry_names_only_the_scale_dropped(monkeypatch):
    entry = "trainable-tokens-ignore-embed-scale"
    if entry not in {e.id for e in default_registry().active}:
        pytest.skip(f"{entry} does not apply to the installed stack")
    gemma = _case("gemma3_text", ("q_proj",))
    outcome = run_case(gemma, PROFILE)
    assert outcome.status == "known" and entry in outcome.known, outcome.divergences
    assert entry not in default_registry().scope(CaseContext(_case("llama", ("q_proj",))))
    # in scope, rows that do not start from the embedding still fail
    after_get_peft_model(monkeypatch, lambda pm, _c: [p.add_(0.25) for p in _deltas(pm)])
    faulty = run_case(gemma, PROFILE)
    assert faulty.status == "diverge" and any(d.field == "numerics.init" for d in faulty.divergences)
