"""The dict form of ``trainable_token_indices`` (``{"embed_tokens": [...], "lm_head": [...]}``):
the reference's rules, agreement with upstream on both pinned stacks, and held-out faults."""

from __future__ import annotations

import pytest
import torch

from conformance.engine.models import cache_dir, load_model
from conformance.engine.runner import run_case
from fault_kit import PROFILE, after_get_peft_model, assert_caught, assert_clean, unwrap_tied_head
from reference.errors import NoTargetMatched, TokensOnLoraLayer
from reference.prepare import prepare
from reference.spec import AdapterSpec, Case, ModelSpec, QuantSpec, TrainingSpec
from reference.tokens import TokensWrapper
from strategies.tokens import dict_form_types


def _case(model_type: str, pairs: tuple, targets: tuple = ("q_proj",), quant: QuantSpec = QuantSpec(),
          load_dtype: str = "float32") -> Case:
    return Case(ModelSpec(model_type, "CAUSAL_LM", num_layers=1, load_dtype=load_dtype), quant,
                AdapterSpec(r=4, target_modules=targets, trainable_token_indices=pairs),
                TrainingSpec(prepare_kbit=quant.quantized))


def _prepared(case: Case):
    return prepare(load_model(case.model, case.quant, cache_dir()), case.adapter, case.training, PROFILE)


EMBEDDING = _case("gemma", (("embed_tokens", (1, 2)),))
HEAD = _case("gemma", (("lm_head", (3,)),), load_dtype="bfloat16")
BOTH = _case("llama", (("embed_tokens", (1,)), ("lm_head", (2, 5))), quant=QuantSpec(kind="4bit"))
BOTH_TIED = _case("gemma", (("embed_tokens", (1,)), ("lm_head", (2, 5))))


# -- the reference's rules -------------------------------------------------------------------------


def test_naming_the_input_embedding_ties_the_head_as_the_list_form_does():
    model = _prepared(EMBEDDING)
    emb, head = model.model.embed_tokens, model.lm_head
    assert isinstance(head, TokensWrapper) and head.token_adapter.tied_adapter is emb.token_adapter


def test_a_named_head_trains_rows_of_its_own_even_when_tied():
    model = _prepared(BOTH_TIED)
    emb, head = model.model.embed_tokens.token_adapter, model.lm_head.token_adapter
    assert head.tied_adapter is None and emb.tied_adapter is None
    assert emb.token_indices["default"] == [1] and head.token_indices["default"] == [2, 5]
    assert head.base_layer.weight is emb.base_layer.weight  # the weight itself is still tied
    only_head = _prepared(HEAD)
    assert not isinstance(only_head.model.embed_tokens, TokensWrapper)
    assert only_head.lm_head.token_adapter.trainable_tokens_delta["default"].dtype == torch.float32


def test_dict_form_rejections():
    with pytest.raises(NoTargetMatched) as err:
        _prepared(_case("opt", (("nothing", (1,)),)))
    assert isinstance(err.value, ValueError) and err.value.kind == "targets_not_found"
    with pytest.raises(TokensOnLoraLayer):
        _prepared(_case("llama", (("lm_head", (1,)),), targets=("q_proj", "lm_head")))


def test_the_strategies_draw_the_dict_form():
    from strategies import cases
    from strategies.sample import sample

    drawn = sample(cases(level="peft", model_types=("llama",), tasks=("CAUSAL_LM",), tokens=True), 40, 3)
    forms = {isinstance(c.adapter.trainable_token_indices[0], tuple) for c in drawn if c.adapter.trainable_token_indices}
    assert forms == {True, False}
    assert "llama" in dict_form_types() and "t5" not in dict_form_types() and "bert" not in dict_form_types()


# -- agreement and faults --------------------------------------------------------------------------

CASES = [EMBEDDING, HEAD, BOTH, BOTH_TIED, _case("gpt2", (("wte", (1,)),), targets=("c_attn",), quant=QuantSpec(kind="8bit"))]


def test_clean_dict_form_cases_agree():
    assert_clean(CASES)


def test_catches_frozen_head_rows(monkeypatch):
    def freeze(pm, _config):
        pm.base_model.model.lm_head.token_adapter.trainable_tokens_delta["default"].requires_grad_(False)

    after_get_peft_model(monkeypatch, freeze)
    assert_caught([HEAD, BOTH], {"requires_grad"}, path=r"lm_head\.token_adapter\.trainable_tokens_delta\.default")


def test_catches_a_head_that_trains_the_embedding_rows(monkeypatch):
    """The named head's wrapper records the embedding's rows instead of its own."""
    def swap(pm, _config):
        model = pm.base_model.model
        model.lm_head.token_adapter.token_indices["default"] = list(
            model.model.embed_tokens.token_adapter.token_indices["default"])

    after_get_peft_model(monkeypatch, swap)
    assert_caught([BOTH_TIED], {"indices"}, path="lm_head")


def test_catches_a_tied_head_left_unwrapped(monkeypatch):
    after_get_peft_model(monkeypatch, unwrap_tied_head)
    assert_caught([EMBEDDING], {"tokens.present"}, path="lm_head")


def test_bias_entry_covers_a_named_head_with_a_bias_only():
    from conformance.engine.features import CaseContext
    from conformance.engine.known import default_registry
    from reference import select_profile

    def scope(case):
        outcome = run_case(case, select_profile(), numerics=False)
        (entry,) = [e for e in default_registry().active if e.id == "trainable-tokens-tied-head-drops-bias"]
        return entry.holds_for(CaseContext(case, outcome.reference, outcome.upstream, select_profile()))

    assert scope(_case("codegen", (("lm_head", (0,)),), targets=("qkv_proj",)))
    assert not scope(_case("codegen", (("wte", (0,)),), targets=("qkv_proj",)))  # untied: no head wrapped
    assert not scope(BOTH)  # llama's head has no bias
