"""Every known-divergence entry is narrow: a different fault inside its scope still fails.

For each entry that the installed stack activates, a case in the entry's scope (same model
types, same task, its cause present) is prepared with a fault planted into upstream that is
*not* the excused behaviour; the example must diverge, with the fault's field among the
unexplained divergences.  Where the entry is about a cause (a quantized head, a head the
targets reach), a second test plants the excused behaviour itself on a case *without* that
cause: it must fail too.  Entries of upstream ranges between the pinned stacks are checked
on synthetic divergences with the registry loaded for a stack in their range.

Run on both pinned stacks (``nox -s "faults(stack='seed')"`` for the seed-era entries).
"""

from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch

from conformance.engine.diff import Divergence
from conformance.engine.features import CaseContext
from conformance.engine.known import default_registry, load_registry
from conformance.engine.runner import Outcome, run_case
from fault_kit import after_get_peft_model
from reference import select_profile
from reference.spec import AdapterSpec, Case, ModelSpec, QuantSpec, TrainingSpec

NO_KBIT = TrainingSpec(prepare_kbit=False)


def _active(entry_id: str) -> None:
    if entry_id not in {e.id for e in default_registry().active}:
        pytest.skip(f"{entry_id} does not apply to the installed stack")


def _in_scope(entry_id: str, case: Case) -> None:
    (entry,) = [e for e in default_registry().active if e.id == entry_id]
    assert entry.holds_for(CaseContext(case, profile=select_profile())), f"the case is not in {entry_id}'s scope"


def _out_of_scope(entry_id: str, case: Case) -> None:
    (entry,) = [e for e in default_registry().active if e.id == entry_id]
    assert not entry.holds_for(CaseContext(case, profile=select_profile())), f"the case is in {entry_id}'s scope"


def _fails(case: Case, field: str, path: str | None = None) -> Outcome:
    outcome = run_case(case, select_profile(), numerics=False)
    assert outcome.status == "diverge", (outcome.status, outcome.known, case.dumps())
    hits = [d for d in outcome.divergences if d.field == field and (path is None or d.path == path)]
    assert hits, [(d.path, d.field) for d in outcome.divergences]
    return outcome


_after_get_peft_model = after_get_peft_model


def _raise_in_get_peft_model(monkeypatch: pytest.MonkeyPatch, exc: BaseException, when=lambda config: True) -> None:
    import peft

    original = peft.get_peft_model

    def faulty(model, config, *args, **kwargs):
        if when(config):
            raise exc
        return original(model, config, *args, **kwargs)

    monkeypatch.setattr(peft, "get_peft_model", faulty)


def _freeze_after_get_peft_model(monkeypatch: pytest.MonkeyPatch, picked) -> None:
    """Plant frozen parameters: every parameter whose name ``picked(name)`` accepts."""
    def freeze(peft_model, config):
        for name, param in peft_model.named_parameters():
            if picked(name):
                param.requires_grad = False

    _after_get_peft_model(monkeypatch, freeze)


def _modules(peft_model, suffix: str):
    return [(n, m) for n, m in peft_model.named_modules() if n.endswith(suffix)]


def _double_scaling(monkeypatch: pytest.MonkeyPatch, suffix: str) -> None:
    """Plant a doubled LoRA scaling on every module whose name ends in ``suffix``."""

    def double(peft_model, config):
        for _, module in _modules(peft_model, suffix):
            module.scaling["default"] *= 2

    _after_get_peft_model(monkeypatch, double)


# -- quantized-classification-head -----------------------------------------------------------------

ELECTRA_8BIT = Case(ModelSpec("electra", "SEQ_CLS", num_layers=1), QuantSpec(kind="8bit"),
                    AdapterSpec(target_modules=("query",), task_type="SEQ_CLS"), TrainingSpec(prepare_kbit=True))


def test_quantized_head_entry_does_not_excuse_another_error_in_scope(monkeypatch):
    _active("quantized-classification-head")
    _in_scope("quantized-classification-head", ELECTRA_8BIT)
    _raise_in_get_peft_model(monkeypatch, RuntimeError("CUDA error: an illegal memory access was encountered"))
    _fails(ELECTRA_8BIT, "error")


def test_quantized_head_entry_needs_a_quantized_module_to_save(monkeypatch):
    """The excused crash, planted where the head was kept unquantized: not excused."""
    _active("quantized-classification-head")
    kept = dataclasses.replace(ELECTRA_8BIT, quant=QuantSpec(kind="8bit", skip_modules=("classifier",)))
    _out_of_scope("quantized-classification-head", kept)
    _raise_in_get_peft_model(monkeypatch, RuntimeError("only Tensors of floating point dtype can require gradients"))
    _fails(kept, "raised")


# -- token-classification-head-targeted / -not-counted-as-excluded -------------------------------------

LLAMA_TOKEN_CLS = Case(ModelSpec("llama", "TOKEN_CLS", num_layers=1),
                       adapter=AdapterSpec(target_modules=("q_proj",), task_type="TOKEN_CLS"), training=NO_KBIT)
SAVED_IS_LORA = TypeError("modules_to_save cannot be applied to modules of type <class 'peft.tuners.lora.layer.Linear'>")


def test_token_cls_entry_needs_targets_that_reach_the_head(monkeypatch):
    """The issue's example: a regression rejecting every TOKEN_CLS preparation, even one whose
    targets never reach the head, must not read as known."""
    _active("token-classification-head-targeted")
    _out_of_scope("token-classification-head-targeted", LLAMA_TOKEN_CLS)
    _raise_in_get_peft_model(monkeypatch, SAVED_IS_LORA, when=lambda c: c.task_type == "TOKEN_CLS")
    _fails(LLAMA_TOKEN_CLS, "raised")


def test_token_cls_entry_does_not_excuse_another_error_in_scope(monkeypatch):
    _active("token-classification-head-targeted")
    case = dataclasses.replace(LLAMA_TOKEN_CLS, adapter=AdapterSpec(target_modules="all-linear", task_type="TOKEN_CLS"))
    _in_scope("token-classification-head-targeted", case)
    _raise_in_get_peft_model(monkeypatch, TypeError("unsupported operand type(s) for +: 'NoneType' and 'int'"))
    _fails(case, "raised")


def test_unused_exclude_warning_entry_needs_an_exclude_that_matches_nothing(monkeypatch):
    _active("token-classification-head-not-counted-as-excluded")
    case = dataclasses.replace(LLAMA_TOKEN_CLS, adapter=AdapterSpec(
        target_modules=("q_proj",), exclude_modules=("v_proj",), task_type="TOKEN_CLS"))
    _out_of_scope("token-classification-head-not-counted-as-excluded", case)

    def warn(peft_model, config):
        warnings.warn(f"You have passed exclude_modules={config.exclude_modules} but no modules were excluded.", stacklevel=2)

    _after_get_peft_model(monkeypatch, warn)
    _fails(case, "warnings.exclude_unused")


def test_unused_exclude_warning_entry_excuses_only_that_warning(monkeypatch):
    _active("token-classification-head-not-counted-as-excluded")
    case = dataclasses.replace(LLAMA_TOKEN_CLS, adapter=AdapterSpec(
        target_modules=("q_proj",), exclude_modules=("nothing_here",), task_type="TOKEN_CLS"))
    _in_scope("token-classification-head-not-counted-as-excluded", case)

    def warn(peft_model, config):
        warnings.warn("fan_in_fan_out is set to True but the target module is `torch.nn.Linear`. Setting to False.", stacklevel=2)

    _after_get_peft_model(monkeypatch, warn)
    _fails(case, "warnings.linear_fan_in_fan_out")


def test_rejection_wording_entry_needs_targets_that_reach_nothing(monkeypatch):
    _active("token-classification-head-not-counted-as-excluded-in-rejection")
    from peft.tuners.tuners_utils import NoMatchingPeftModuleError

    _raise_in_get_peft_model(monkeypatch, NoMatchingPeftModuleError("Target modules {'q_proj'} not found in the base model."))
    _out_of_scope("token-classification-head-not-counted-as-excluded-in-rejection", LLAMA_TOKEN_CLS)
    _fails(LLAMA_TOKEN_CLS, "raised")


def test_rejection_wording_entry_excuses_only_not_found(monkeypatch):
    _active("token-classification-head-not-counted-as-excluded-in-rejection")
    from peft.tuners.tuners_utils import NoMatchingPeftModuleError

    case = dataclasses.replace(LLAMA_TOKEN_CLS, adapter=AdapterSpec(target_modules=("q_pro",), task_type="TOKEN_CLS"),
                               invalid=True)
    _in_scope("token-classification-head-not-counted-as-excluded-in-rejection", case)
    _raise_in_get_peft_model(monkeypatch, NoMatchingPeftModuleError("All modules were excluded. This is likely unintended."))
    _fails(case, "error")


# -- MoE entries -------------------------------------------------------------------------------------------

MIXTRAL_DEFAULT = Case(ModelSpec("mixtral", "CAUSAL_LM", num_layers=1),
                       adapter=AdapterSpec(task_type="CAUSAL_LM"), training=NO_KBIT)
MIXTRAL_ALL_LINEAR = Case(ModelSpec("mixtral", "CAUSAL_LM", num_layers=1),
                          adapter=AdapterSpec(r=4, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM"),
                          training=NO_KBIT)
MIXTRAL_REGEX = Case(ModelSpec("mixtral", "CAUSAL_LM", num_layers=2),
                     adapter=AdapterSpec(r=4, lora_alpha=16, target_modules=r".*\.layers\.0\..*\.(q_proj|v_proj)"),
                     training=NO_KBIT)


def test_moe_default_targets_entry_excuses_only_its_rejections(monkeypatch):
    _active("moe-default-targets-lost")
    _in_scope("moe-default-targets-lost", MIXTRAL_DEFAULT)
    _raise_in_get_peft_model(monkeypatch, ValueError("Target module MixtralDecoderLayer() is not supported."))
    _fails(MIXTRAL_DEFAULT, "raised")


def test_moe_default_targets_entry_needs_default_targets(monkeypatch):
    _active("moe-default-targets-lost")
    listed = dataclasses.replace(MIXTRAL_DEFAULT, adapter=AdapterSpec(target_modules=("q_proj",), task_type="CAUSAL_LM"))
    _out_of_scope("moe-default-targets-lost", listed)
    _raise_in_get_peft_model(monkeypatch, ValueError("No `target_modules` passed but also no `target_parameters` found."))
    _fails(listed, "raised")


def test_moe_regex_entry_catches_a_fault_on_a_widened_module(monkeypatch):
    _active("moe-regex-targets-widened")
    _in_scope("moe-regex-targets-widened", MIXTRAL_REGEX)
    _double_scaling(monkeypatch, "layers.1.self_attn.q_proj")
    _fails(MIXTRAL_REGEX, "lora.present", path="model.layers.1.self_attn.q_proj")


def test_moe_regex_entry_catches_lora_on_a_module_the_widening_cannot_reach(monkeypatch):
    """Before narrowing, the entry excused extra LoRA on any path: k_proj is no leaf the regex matched."""
    _active("moe-regex-targets-widened")
    from fault_kit import wrap_target_check

    def factory(original):
        def faulty(config, key):
            return True if key.endswith(".k_proj") else original(config, key)
        return faulty

    wrap_target_check(monkeypatch, factory)
    _fails(MIXTRAL_REGEX, "lora.present", path="model.layers.0.self_attn.k_proj")


# -- loraconfig-mutated-in-place -----------------------------------------------------------------------------


def test_config_mutation_entry_excuses_only_resolved_fields(monkeypatch):
    _active("loraconfig-mutated-in-place")
    case = Case(ModelSpec("llama", "CAUSAL_LM", num_layers=1), adapter=AdapterSpec(target_modules="all-linear"),
                training=NO_KBIT)

    def bump_dropout(peft_model, config):
        config.lora_dropout = 0.5

    _after_get_peft_model(monkeypatch, bump_dropout)
    _fails(case, "config_mutations.lora_dropout")


def test_config_mutation_entry_does_not_excuse_a_rewritten_target_list(monkeypatch):
    _active("loraconfig-mutated-in-place")
    case = Case(ModelSpec("llama", "CAUSAL_LM", num_layers=1), adapter=AdapterSpec(target_modules=("q_proj",)),
                training=NO_KBIT)

    def rewrite(peft_model, config):
        config.target_modules = {"q_proj", "k_proj"}

    _after_get_peft_model(monkeypatch, rewrite)
    _fails(case, "config_mutations.target_modules")


# -- seed-era entries ------------------------------------------------------------------------------------------


def test_orphan_lora_entry_does_not_excuse_a_frozen_saved_copy(monkeypatch):
    _active("orphan-lora-inside-saved-module")
    case = Case(ModelSpec("roberta", "CAUSAL_LM", num_layers=1),
                adapter=AdapterSpec(target_modules="all-linear", modules_to_save=("lm_head",)), training=NO_KBIT)
    _in_scope("orphan-lora-inside-saved-module", case)
    _freeze_after_get_peft_model(monkeypatch, lambda name: ".modules_to_save." in name)
    _fails(case, "requires_grad")


def test_layer_zero_entry_excuses_only_its_config_rejection(monkeypatch):
    _active("layers-to-transform-zero-read-as-missing")
    case = Case(ModelSpec("llama", "CAUSAL_LM", num_layers=1),
                adapter=AdapterSpec(target_modules=("q_proj",), layers_to_transform=0, layers_pattern="layers"),
                training=NO_KBIT)
    _in_scope("layers-to-transform-zero-read-as-missing", case)
    import peft

    # the excused rejection happens when the config is built: plant the other error there
    def faulty(self, *args, **kwargs):
        raise ValueError("`layers_to_transform` cannot be used when `target_modules` is a str.")

    monkeypatch.setattr(peft.LoraConfig, "__post_init__", faulty)
    _fails(case, "raised")


def test_embed_scale_entry_does_not_excuse_a_structural_fault(monkeypatch):
    _active("lora-embedding-update-ignores-embed-scale")
    case = Case(ModelSpec("gemma3_text", "CAUSAL_LM", num_layers=1),
                adapter=AdapterSpec(target_modules=("embed_tokens",), task_type="CAUSAL_LM"), training=NO_KBIT)

    def dropout(peft_model, config):
        for _, emb in _modules(peft_model, "embed_tokens"):
            emb.lora_dropout["default"] = torch.nn.Dropout(p=0.3)

    _after_get_peft_model(monkeypatch, dropout)
    _fails(case, "adapter[default].dropout")


def test_untied_head_token_entry_does_not_excuse_frozen_token_rows(monkeypatch):
    _active("tokens-share-rows-with-an-untied-head")
    case = Case(ModelSpec("llava", "CAUSAL_LM", num_layers=1),
                adapter=AdapterSpec(r=4, target_modules=("q_proj",), trainable_token_indices=(1,), task_type="CAUSAL_LM"),
                training=NO_KBIT)
    # (the input embedding's rows, which the entry leaves compared)
    _freeze_after_get_peft_model(monkeypatch, lambda name: "embed_tokens" in name and "trainable_tokens_delta" in name)
    _fails(case, "requires_grad")


def test_dpo_family_merge_entry_does_not_excuse_a_merge_that_skips_the_bias(monkeypatch):
    _active("dpo-family-merge-reads-a-missing-bias")
    case = Case(ModelSpec("llama", "CAUSAL_LM", num_layers=1),
                adapter=AdapterSpec(lora_bias=True, target_modules="all-linear", task_type="CAUSAL_LM"),
                training=TrainingSpec(level="trl", trainer="orpo", peft_model_in=True, peft_config_too=True,
                                      prepare_kbit=False))
    import peft

    # a merge that silently drops the LoRA bias instead of refusing it (or crashing as peft 0.15 does)
    monkeypatch.setattr(peft.tuners.lora.LoraModel, "merge_and_unload", lambda self, *a, **k: self.unload())
    _fails(case, "raised")


# -- the count rule and the placeholders (any stack) ----------------------------------------------------------


def test_a_count_divergence_needs_parameter_divergences_that_add_up(tmp_path):
    from conformance.engine.snapshot import ModelFacts, ParamFacts, Snapshot

    path = tmp_path / "r.toml"
    path.write_text('[[divergence]]\nid = "extra-lora"\nexplanation = "extra LoRA on x, for a test of the count rule."\n'
                    'link = "https://example.org"\nmatch = [{ path = "x.lora_A.default.weight", field = "param\\\\.present" }]\n')
    registry = load_registry(path, versions={})
    model = ModelFacts(False, False, False, False, 10, 100)
    ref = Snapshot(params=(ParamFacts("w", (10, 10), "float32", True, "plain"),), model=model)
    extra = ParamFacts("x.lora_A.default.weight", (2, 3), "float32", True, "plain")
    up_ok = Snapshot(params=ref.params + (extra,), model=dataclasses.replace(model, trainable_params=16, total_params=106))
    case = Case(ModelSpec("llama"))
    found = [Divergence("x.lora_A.default.weight", "param.present", False, True),
             Divergence("<model>", "trainable_params", 10, 16), Divergence("<model>", "total_params", 100, 106)]
    assert registry.explain(case, found, reference=ref, upstream=up_ok) == ([], ["extra-lora"])
    # one more trainable parameter than the explained ones account for: the count is not explained
    off = [found[0], Divergence("<model>", "trainable_params", 10, 17), found[2]]
    unexplained, _ = registry.explain(case, off, reference=ref, upstream=up_ok)
    assert [d.field for d in unexplained] == ["trainable_params"]
    # and a count alone is never explained
    assert registry.explain(case, found[1:], reference=ref, upstream=up_ok)[0] == found[1:]


def test_entries_may_not_match_counts_or_name_unknown_features(tmp_path):
    base = 'id = "e"\nexplanation = "an entry used to test the loader refuses this."\nlink = "https://example.org"\n'
    for body, message in (('match = [{ path = "<model>", field = "trainable_params" }]', "parameter count"),
                          ('match = [{ path = "{nope}", field = "x" }]', "unknown set feature"),
                          ('when = { "feature.nope" = true }\nmatch = [{ path = "a", field = "b" }]', "unknown feature")):
        path = tmp_path / "r.toml"
        path.write_text("[[divergence]]\n" + base + body + "\n")
        with pytest.raises(ValueError, match=message):
            load_registry(path, versions={})


# -- entries of ranges between the pinned stacks: synthetic divergences -------------------------------------

BETWEEN = {
    "seq2seq-peft-model-transformers-5-18": {"peft": "0.19.0", "transformers": "5.23.0"},
    "moe-string-targets-split-into-characters": {"peft": "0.19.0", "transformers": "5.23.0"},
    "trl-kbit-step-freezes-passed-peft-model": {"trl": "0.22.0"},
}


def _registry_for(entry_id: str):
    registry = load_registry(versions=BETWEEN[entry_id])
    assert entry_id in {e.id for e in registry.active}
    return registry


def test_seq2seq_entry_excuses_only_the_missing_helper():
    registry = _registry_for("seq2seq-peft-model-transformers-5-18")
    case = Case(ModelSpec("t5", "SEQ_2_SEQ_LM", num_layers=1), adapter=AdapterSpec(target_modules=("q",),
                                                                                    task_type="SEQ_2_SEQ_LM"))
    excused = Divergence("<error>", "raised", "no error", "AttributeError[seq2seq_generation_kwargs_missing]: "
                         "AttributeError: 'T5ForConditionalGeneration' has no attribute "
                         "'_prepare_encoder_decoder_kwargs_for_generation'")
    other = Divergence("<error>", "raised", "no error", "AttributeError[other]: AttributeError: 'NoneType' has no 'x'")
    assert registry.explain(case, [excused])[0] == []
    assert registry.explain(case, [other])[0] == [other]
    causal = dataclasses.replace(case, adapter=AdapterSpec(target_modules=("q",), task_type="CAUSAL_LM"))
    assert registry.explain(causal, [excused])[0] == [excused]


def test_moe_string_split_entry_needs_a_string_target():
    registry = _registry_for("moe-string-targets-split-into-characters")
    split = Divergence("<error>", "raised", "no error",
                       "ValueError[targets_not_found]: ValueError: Target modules {'a', 'l'} not found in the base model.")
    regex = Case(ModelSpec("mixtral", num_layers=1), adapter=AdapterSpec(target_modules="all-linear"))
    listed = Case(ModelSpec("mixtral", num_layers=1), adapter=AdapterSpec(target_modules=("q_proj",)))
    assert registry.explain(regex, [split])[0] == []
    assert registry.explain(listed, [split])[0] == [split]
    other = Divergence("<error>", "raised", "no error", "ValueError[targets_not_found]: ValueError: Target modules "
                       "{'q_proj'} not found in the base model.")
    assert registry.explain(regex, [other])[0] == [other]
    # an invalid rank: the reference refuses it, peft never reaches its rank check
    rank = Divergence("<error>", "error", "ValueError[invalid_r]", "ValueError[targets_not_found]")
    assert registry.explain(regex, [rank])[0] == [] and registry.explain(listed, [rank])[0] == [rank]
    for swap in (Divergence("<error>", "error", "ValueError[invalid_r]", "TypeError[targets_not_found]"),
                 Divergence("<error>", "error", "ValueError[lora_bias_init]", "ValueError[targets_not_found]")):
        assert registry.explain(regex, [swap])[0] == [swap]


def test_trl_kbit_entry_excuses_frozen_lora_and_upcasts_only():
    registry = _registry_for("trl-kbit-step-freezes-passed-peft-model")
    case = Case(ModelSpec("llama", num_layers=1), QuantSpec(kind="8bit"), AdapterSpec(target_modules=("q_proj",)),
                TrainingSpec(level="trl", prepare_kbit=False, peft_model_in=True))
    frozen = Divergence("model.layers.0.self_attn.q_proj.lora_A.default.weight", "requires_grad", True, False)
    upcast = Divergence("model.norm.weight", "dtype", "float16", "float32")
    lora_cast = Divergence("model.layers.0.self_attn.q_proj.lora_A.default.weight", "dtype", "float32", "bfloat16")
    trainable_norm = Divergence("model.norm.weight", "requires_grad", False, True)
    assert registry.explain(case, [frozen, upcast])[0] == []
    assert registry.explain(case, [lora_cast, trainable_norm])[0] == [lora_cast, trainable_norm]
    unquantized = dataclasses.replace(case, quant=QuantSpec())
    assert registry.explain(unquantized, [frozen])[0] == [frozen]


# -- numerics that cannot run: trl's QLoRA bf16 cast -----------------------------------------------------------

LLAMA_TRL_BIAS_ALL = Case(ModelSpec("llama", "CAUSAL_LM", num_layers=1), QuantSpec(kind="4bit"),
                          AdapterSpec(r=4, target_modules=("q_proj",), modules_to_save=("lm_head",), task_type="CAUSAL_LM"),
                          TrainingSpec(level="trl", prepare_kbit=False, gradient_checkpointing=False))


def test_bf16_cast_entry_excuses_only_the_forward_failure(monkeypatch):
    _active("trl-qlora-bf16-cast-mixes-dtypes")
    ctx = CaseContext(LLAMA_TRL_BIAS_ALL, profile=select_profile())
    clean = run_case(LLAMA_TRL_BIAS_ALL, select_profile())
    assert clean.status == "known" and "trl-qlora-bf16-cast-mixes-dtypes" in clean.known, clean.divergences

    from fault_kit import wrap_update_layer

    def double(layer, args):  # (trl imports get_peft_model itself: plant the fault in the LoRA layer)
        layer.scaling[args["adapter_name"]] *= 2

    wrap_update_layer(monkeypatch, after=double)
    _fails(LLAMA_TRL_BIAS_ALL, "adapter[default].scaling")
    assert ctx.case is LLAMA_TRL_BIAS_ALL


def test_bf16_cast_entry_names_the_cpu_layer_norm_failure():
    """A fp32 RoBERTa whose saved lm_head (a layer norm inside) trl casts to bf16: the CPU's layer
    norm refuses the mix with its own wording (CI, 2026-12-02)."""
    _active("trl-qlora-bf16-cast-mixes-dtypes")
    case = Case(ModelSpec("xlm-roberta", "CAUSAL_LM", num_layers=1, hidden_size=128),
                QuantSpec(kind="4bit", quant_storage="float16"),
                AdapterSpec(target_modules="all-linear", modules_to_save=("lm_head",), task_type="CAUSAL_LM"),
                TrainingSpec(level="trl", prepare_kbit=False, gradient_checkpointing=True))
    outcome = run_case(case, select_profile())
    assert outcome.status == "known" and "trl-qlora-bf16-cast-mixes-dtypes" in outcome.known, outcome.divergences
    assert "mixed dtype (CPU)" in str(outcome.numerics), outcome.numerics


def test_bf16_cast_entries_need_their_cause():
    registry = default_registry()
    if "trl-qlora-bf16-cast-mixes-dtypes" not in {e.id for e in registry.active}:
        pytest.skip("trl < 0.26")
    raised = Divergence("<model>", "numerics.both_raised", "eval forward: RuntimeError: expected scalar type Float but "
                        "found BFloat16", "eval forward: RuntimeError: expected scalar type Float but found BFloat16")
    only_lora = dataclasses.replace(LLAMA_TRL_BIAS_ALL, adapter=AdapterSpec(r=4, target_modules=("q_proj",)))
    from conformance.engine.snapshot import ParamFacts, Snapshot

    lora_only = Snapshot(params=(ParamFacts("q.lora_A.default.weight", (4, 64), "bfloat16", True, "plain"),))
    with_bias = Snapshot(params=lora_only.params + (ParamFacts("q.bias", (64,), "bfloat16", True, "plain"),))
    assert registry.explain(CaseContext(only_lora, lora_only, lora_only), [raised])[0] == [raised]
    assert registry.explain(CaseContext(LLAMA_TRL_BIAS_ALL, with_bias, with_bias), [raised])[0] == []
    # the CPU layer norm's wording of the same mix (a saved RoBERTa lm_head's bf16 layer_norm)
    norm = "init forward: raised: RuntimeError: mixed dtype (CPU): expect parameter to have scalar type of Float"
    norm_raised = Divergence("<model>", "numerics.both_raised", norm, norm)
    assert registry.explain(CaseContext(LLAMA_TRL_BIAS_ALL, with_bias, with_bias), [norm_raised])[0] == []
    assert registry.explain(CaseContext(only_lora, lora_only, lora_only), [norm_raised])[0] == [norm_raised]
    other = Divergence("<model>", "numerics.both_raised", "x", "eval forward: RuntimeError: CUDA out of memory")
    assert registry.explain(CaseContext(LLAMA_TRL_BIAS_ALL, with_bias, with_bias), [other])[0] == [other]
    packed = Divergence("<model>", "numerics.both_raised", "x",
                        "init forward: raised: RuntimeError: shape '[64, 32]' is invalid for input of size 1024")
    assert registry.explain(CaseContext(LLAMA_TRL_BIAS_ALL, with_bias, with_bias), [packed])[0] == [packed]


def test_falcon_view_entry_needs_falcon_8bit_and_its_message():
    registry = load_registry(versions={"transformers": "4.53.3", "bitsandbytes": "0.47.0"})
    assert "falcon-8bit-modifies-a-matmul8bit-view-in-place" in {e.id for e in registry.active}
    view = "eval forward: RuntimeError: Output 0 of MatMul8bitLt is a view and is being modified inplace."
    raised = Divergence("<model>", "numerics.both_raised", view, view)
    falcon = Case(ModelSpec("falcon", num_layers=1), QuantSpec(kind="8bit"), AdapterSpec(target_modules=("dense",)))
    llama = dataclasses.replace(falcon, model=ModelSpec("llama", num_layers=1))
    assert registry.explain(falcon, [raised])[0] == []
    assert registry.explain(llama, [raised])[0] == [raised]
    other = Divergence("<model>", "numerics.both_raised", "x", "eval forward: RuntimeError: CUDA error")
    assert registry.explain(falcon, [other])[0] == [other]
    assert registry.explain(falcon, [Divergence("<model>", "numerics.logits", "a", "b")])[0] != []


def test_deberta_rel_embeddings_entry_needs_reentrant_checkpointing_trained_embeddings_and_its_message():
    from conformance.engine.snapshot import ModelFacts, ParamFacts, Snapshot

    entry_id = "deberta-v2-reentrant-checkpointing-backwards-rel-embeddings-twice"
    registry = load_registry(versions={"transformers": "5.23.0"})
    assert entry_id in {e.id for e in registry.active}
    twice = "train_forward: RuntimeError: Trying to backward through the graph a second time (or directly access"
    raised = Divergence("<model>", "numerics.both_raised", twice, twice)
    case = Case(ModelSpec("deberta-v2", "SEQ_CLS", num_layers=2), QuantSpec(kind="8bit"),
                AdapterSpec(target_modules=("query_proj",), bias="all", task_type="SEQ_CLS"), TrainingSpec(prepare_kbit=True))

    def snap(reentrant: str | None = "True", trained: str = "deberta.encoder.LayerNorm.bias", checkpointing=True):
        facts = ModelFacts(checkpointing, True, False, True, 1, 2, gradient_checkpointing_kwargs=(
            (("use_reentrant", reentrant),) if reentrant is not None else ()))
        return Snapshot(params=(ParamFacts(trained, (4,), "float32", True, "plain"),), model=facts)

    def left(case_: Case, s) -> list:
        return registry.explain(CaseContext(case_, s, s), [raised])[0]

    assert left(case, snap()) == [] and left(case, snap(reentrant=None)) == []
    assert left(case, snap(trained="deberta.encoder.rel_embeddings.weight")) == []
    assert left(case, snap(reentrant="False")) == [raised]  # non-reentrant checkpointing runs
    assert left(case, snap(checkpointing=False)) == [raised]
    assert left(case, snap(trained="deberta.encoder.layer.0.output.LayerNorm.bias")) == [raised]
    assert left(dataclasses.replace(case, model=ModelSpec("deberta", "SEQ_CLS", num_layers=2)), snap()) == [raised]
    other = Divergence("<model>", "numerics.both_raised", "x", "train_forward: RuntimeError: CUDA error")
    assert registry.explain(CaseContext(case, snap(), snap()), [other])[0] == [other]
    assert registry.explain(CaseContext(case, snap(), snap()), [Divergence("<model>", "numerics.loss", "a", "b")])[0] != []


MERGE_STACK = {"peft": "0.21.2", "trl": "0.25.1", "transformers": "5.23.0"}
QUANTIZED_MERGE = Case(ModelSpec("llama", num_layers=1), QuantSpec(kind="8bit"),
                       AdapterSpec(r=4, lora_alpha=16, target_modules=("q_proj",), lora_bias=True),
                       TrainingSpec(level="trl", prepare_kbit=False, peft_model_in=True, peft_config_too=True))


def test_bnb_merge_bias_entries_need_a_quantized_merge_with_lora_bias():
    from conformance.engine.snapshot import LoraModuleFacts, Snapshot

    registry = load_registry(versions=MERGE_STACK)
    ref = Snapshot(lora=(LoraModuleFacts("model.q_proj", "bnb8bit", 64, 64, False, (), ()),
                         LoraModuleFacts("model.k_proj", "linear", 64, 64, False, (), ())))
    unscaled = Divergence("model.q_proj.base_layer.bias", "value", "changed: a", "changed: b")
    on_plain = Divergence("model.k_proj.base_layer.bias", "value", "changed: a", "changed: b")
    weight = Divergence("model.q_proj.base_layer.weight", "value", "changed: a", "changed: b")
    ctx = CaseContext(QUANTIZED_MERGE, ref, ref)
    assert registry.explain(ctx, [unscaled])[0] == []
    assert registry.explain(ctx, [on_plain, weight])[0] == [on_plain, weight]
    no_bias = dataclasses.replace(QUANTIZED_MERGE, adapter=AdapterSpec(r=4, lora_alpha=16, target_modules=("q_proj",)))
    assert registry.explain(CaseContext(no_bias, ref, ref), [unscaled])[0] == [unscaled]
    swap = Divergence("<error>", "error", "RuntimeError[merge_lora_bias_without_base_bias]",
                      "AttributeError[merge_reads_a_missing_bias]")
    other = Divergence("<error>", "error", "RuntimeError[merge_lora_bias_without_base_bias]", "AttributeError[other]")
    assert registry.explain(ctx, [swap])[0] == [] and registry.explain(ctx, [other])[0] == [other]
    unquantized = dataclasses.replace(QUANTIZED_MERGE, quant=QuantSpec())
    assert registry.explain(CaseContext(unquantized, ref, ref), [swap])[0] == [swap]


def test_trl_025_kbit_entry_needs_half_precision_and_full_precision_training():
    registry = load_registry(versions={"trl": "0.25.1"})
    half = "eval forward: RuntimeError: expected m1 and m2 to have the same dtype, but got: float != c10::Half"
    raised = Divergence("<model>", "numerics.both_raised", half, half)
    case = Case(ModelSpec("glm", num_layers=1, load_dtype="float16"), QuantSpec(kind="8bit"),
                AdapterSpec(target_modules=("q_proj",)), TrainingSpec(level="trl", prepare_kbit=False))
    assert registry.explain(case, [raised])[0] == []
    for other in (dataclasses.replace(case, model=ModelSpec("glm", num_layers=1)),  # an fp32 load
                  dataclasses.replace(case, training=TrainingSpec(level="trl", prepare_kbit=False, bf16=True))):
        assert registry.explain(other, [raised])[0] == [raised]
    assert registry.explain(case, [Divergence("<model>", "numerics.loss", "a", "b")])[0] != []
