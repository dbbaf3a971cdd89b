"""``chat_template_path`` (``training.chat_template``): the reference's clone, agreement with the
installed trl, held-out faults, and the registry entries the feature meets."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from conformance.engine import offline
from conformance.engine.diff import Divergence
from conformance.engine.features import CaseContext
from conformance.engine.known import default_registry
from conformance.engine.models import cache_dir, load_model
from conformance.engine.runner import run_case
from reference import select_profile
from reference.chat_template import PAD_TO, TemplateSource, clone_chat_template, with_added_tokens
from reference.spec import ABSENT, AdapterSpec, Case, ModelSpec, QuantSpec, TrainingSpec
from strategies.trainers import clones_chat_template
from reference.trl import select_trl_flow

PROFILE = select_profile()
SOURCE = TemplateSource(vocab_size=256, added=("<|im_start|>", "<|im_end|>"), eos_index=1)
SFT_CLONES = clones_chat_template("sft")
TRAINS_ROWS = SFT_CLONES and select_trl_flow().template_tokens_trainable


def _case(model_type: str = "llama", kind: str = "tokenizer", *, quant: QuantSpec = QuantSpec(),
          adapter: AdapterSpec | None = None, trainer: str = "sft") -> Case:
    reward = trainer == "reward"
    model = ModelSpec(model_type, "SEQ_CLS" if reward else "CAUSAL_LM", num_layers=1,
                      **({"num_labels": 1} if reward else {}))
    adapter = adapter or AdapterSpec(r=4, target_modules=("q_proj",), task_type=model.task)
    return Case(model, quant, adapter, TrainingSpec(level="trl", chat_template=kind,
                                                    **({"trainer": trainer} if trainer != "sft" else {})))


# -- the reference's clone -----------------------------------------------------------------------------


def test_a_clone_pads_the_vocabulary_to_64_and_every_added_row_trains_on_the_input_embedding():
    model = load_model(ModelSpec("gpt2", num_layers=1), QuantSpec(), cache_dir())
    added = clone_chat_template(model, SOURCE, seed=3)
    assert added == list(range(256, 320)) and 320 % PAD_TO == 0
    assert model.get_input_embeddings().weight.shape[0] == 320 and model.config.eos_token_id == 257
    assert model.generation_config.eos_token_id == 257
    adapter = with_added_tokens(model, AdapterSpec(modules_to_save=("score",)), added)
    assert adapter.trainable_token_indices == (("wte", tuple(added)),)  # the embedding's own name
    assert adapter.modules_to_save == ("score", "lm_head")


def test_a_clone_draws_its_rows_from_the_seed():
    def rows(seed):
        model = load_model(ModelSpec("llama", num_layers=1), QuantSpec(), cache_dir())
        clone_chat_template(model, SOURCE, seed)
        return model.get_input_embeddings().weight[256:].detach().clone()

    assert torch.equal(rows(5), rows(5)) and not torch.equal(rows(5), rows(6))


def test_the_harness_template_is_what_the_reference_is_told():
    from transformers import AutoTokenizer

    source = AutoTokenizer.from_pretrained(offline.chat_template_paths()["tokenizer"])
    described = offline.template_source()
    assert source.eos_token == described.added[described.eos_index]
    new = sorted((i, t) for t, i in source.get_vocab().items() if t not in offline.tokenizer().get_vocab())
    assert new == [(described.vocab_size + k, t) for k, t in enumerate(described.added)]  # added in this order


# -- agreement, and faults ------------------------------------------------------------------------------


@pytest.mark.skipif(not SFT_CLONES, reason="the installed trl's chat templates are not modelled")
@pytest.mark.parametrize("case", [
    _case(), _case(kind="jinja"), _case(quant=QuantSpec(kind="8bit")), _case("mistral", quant=QuantSpec(kind="4bit")),
], ids=["clone", "jinja", "8bit", "4bit"])
def test_clean_template_cases_agree(case):
    outcome = run_case(case, PROFILE)
    assert outcome.status in ("agree", "known") and set(outcome.known) <= {"loraconfig-mutated-in-place"}, \
        (outcome.status, outcome.divergences, outcome.known)


@pytest.mark.skipif(not TRAINS_ROWS, reason="the installed trl leaves a cloned template's rows untrained")
def test_catches_a_trainer_that_leaves_the_added_rows_untrained(monkeypatch):
    """Fault: SFTTrainer clones the template but no longer makes the added tokens trainable."""
    import trl.trainer.sft_trainer as sft

    original = sft.clone_chat_template
    monkeypatch.setattr(sft, "clone_chat_template", lambda *a, **k: (*original(*a, **k)[:2], []))
    outcome = run_case(_case(), PROFILE)
    assert outcome.status == "diverge"
    assert any(d.field == "tokens.present" for d in outcome.divergences)


@pytest.mark.skipif(not SFT_CLONES, reason="the installed trl's chat templates are not modelled")
def test_catches_a_clone_that_keeps_the_old_end_of_sequence(monkeypatch):
    """Fault: the cloned template's end-of-sequence token is not written into the model config."""
    import trl.trainer.sft_trainer as sft

    original = sft.clone_chat_template

    def keeps_eos(model, tokenizer, path, *args, **kwargs):
        eos = model.config.eos_token_id
        out = original(model, tokenizer, path, *args, **kwargs)
        model.config.eos_token_id = eos
        return out

    monkeypatch.setattr(sft, "clone_chat_template", keeps_eos)
    outcome = run_case(_case(), PROFILE)
    assert outcome.status == "diverge" and any("eos_token_id" in d.field for d in outcome.divergences)


# -- the registry entries -------------------------------------------------------------------------------


def _entry(entry_id: str):
    found = [e for e in default_registry().active if e.id == entry_id]
    if not found:
        pytest.skip(f"{entry_id} does not apply to the installed stack")
    return found[0]


def test_the_embed_tokens_entry_needs_an_embedding_of_another_name():
    entry = _entry("chat-template-assumes-embed-tokens")
    gpt2, llama = _case("gpt2", adapter=AdapterSpec(r=4, target_modules=("c_attn",))), _case()
    assert entry.holds_for(CaseContext(gpt2, profile=PROFILE))
    assert not entry.holds_for(CaseContext(llama, profile=PROFILE))  # the same rejection on llama is a fault
    assert not entry.holds_for(CaseContext(dataclasses.replace(gpt2, training=dataclasses.replace(
        gpt2.training, chat_template="jinja")), profile=PROFILE))
    wrong = Divergence("<error>", "raised", "no error", "ValueError[targets_not_found]: ValueError: Target modules {'wte'}")
    assert not entry.explains(wrong, CaseContext(gpt2, profile=PROFILE))


def test_the_saved_head_entry_excuses_only_the_token_layers_refusal():
    entry = _entry("tokens-around-a-saved-tied-head-cannot-run")
    case = Case(ModelSpec("opt", num_layers=1), adapter=AdapterSpec(r=4, target_modules=("q_proj",),
                trainable_token_indices=(3, 5), modules_to_save=("lm_head",)), training=TrainingSpec(prepare_kbit=False))
    outcome = run_case(case, PROFILE)
    assert outcome.status == "known" and list(outcome.known) == ["tokens-around-a-saved-tied-head-cannot-run"]
    other = Divergence("<model>", "numerics.forward", "ok", "RuntimeError: shapes cannot be multiplied")
    assert not entry.explains(other, CaseContext(case, outcome.reference, outcome.upstream, profile=PROFILE))
    untied = dataclasses.replace(case, model=ModelSpec("llama", num_layers=1))  # no tied head: out of scope
    assert run_case(untied, PROFILE).status in ("agree", "known")
    assert "tokens-around-a-saved-tied-head-cannot-run" not in run_case(untied, PROFILE).known


def test_rows_and_full_training_of_one_module_are_refused_and_a_nested_saved_copy_follows_the_adapter_dtype():
    from reference.errors import InvalidConfig
    from reference.prepare import prepare_wrapped

    both = AdapterSpec(r=4, target_modules=("q_proj",), trainable_token_indices=(("lm_head", (0,)),),
                       modules_to_save=("lm_head",))
    model = load_model(ModelSpec("qwen2", num_layers=1), QuantSpec(), cache_dir())
    with pytest.raises(InvalidConfig) as caught:
        prepare_wrapped(model, both, TrainingSpec(prepare_kbit=False), PROFILE)
    assert caught.value.kind == "tokens_on_saved_module"
    tied = load_model(ModelSpec("gemma2", num_layers=1, load_dtype="float16"), QuantSpec(), cache_dir())
    prepared, _ = prepare_wrapped(tied, AdapterSpec(r=4, target_modules=("q_proj",), trainable_token_indices=(3,),
                                                    modules_to_save=("lm_head",)), TrainingSpec(prepare_kbit=False), PROFILE)
    copy = prepared.lm_head.token_adapter.base_layer.modules_to_save["default"]
    assert copy.weight.dtype == torch.float32  # upcast with the rows (autocast_adapter_dtype), as peft does


def test_the_tied_head_lookup_entry_needs_a_saved_module_around_the_tied_layer():
    entry = _entry("tokens-tied-head-inside-a-saved-module-not-found")
    roberta = Case(ModelSpec("roberta", num_layers=1), adapter=AdapterSpec(
        r=4, target_modules=("query",), trainable_token_indices=(0,), modules_to_save=("lm_head",)),
        training=TrainingSpec(prepare_kbit=False))
    ctx = CaseContext(roberta, profile=PROFILE)
    assert entry.holds_for(ctx)
    raised = Divergence("<error>", "raised", "no error",
                        "ValueError[targets_not_found]: ValueError: Target modules {'lm_head.decoder'} not found in the base model.")
    assert entry.explains(raised, ctx)
    other = Divergence("<error>", "raised", "no error", "ValueError[targets_not_found]: ValueError: Target modules {'query'} not found")
    assert not entry.explains(other, ctx)
    for out in (dataclasses.replace(roberta, adapter=dataclasses.replace(roberta.adapter, modules_to_save=ABSENT)),
                dataclasses.replace(roberta, adapter=dataclasses.replace(roberta.adapter, trainable_token_indices=ABSENT)),
                dataclasses.replace(roberta, model=ModelSpec("opt", num_layers=1))):  # opt's lm_head *is* the tied layer
        assert not entry.holds_for(CaseContext(out, profile=PROFILE))
