"""Each real upstream divergence in the registry, reproduced by a minimal case.

These tests run both sides: they pin down that the registry entry still matches
the installed stack (so it is not stale) and explains *all* of the case's
divergences, no more and no less.
"""

from __future__ import annotations

import pytest

from conformance.engine.known import default_registry
from conformance.engine.runner import run_case
from reference import select_profile
from reference.spec import AdapterSpec, Case, ModelSpec, QuantSpec, TrainingSpec

KBIT = TrainingSpec(prepare_kbit=True)

MINIMAL = {
    # transformers quantizes ELECTRA's biased classification head; peft's modules_to_save
    # copy cannot train int8.
    "quantized-classification-head": Case(
        ModelSpec("electra", "SEQ_CLS", num_layers=1),
        QuantSpec(kind="8bit"),
        AdapterSpec(target_modules=("query",), task_type="SEQ_CLS"),
        KBIT,
    ),
    # TOKEN_CLS heads are added to modules_to_save only after injection: "all-linear" reaches them.
    "token-classification-head-targeted": Case(
        ModelSpec("llama", "TOKEN_CLS", num_layers=1),
        adapter=AdapterSpec(target_modules="all-linear", task_type="TOKEN_CLS"),
        training=TrainingSpec(prepare_kbit=False),
    ),
    # ...and the head does not count as excluded: an exclude_modules that matches nothing warns as unused.
    "token-classification-head-not-counted-as-excluded": Case(
        ModelSpec("llama", "TOKEN_CLS", num_layers=1),
        adapter=AdapterSpec(target_modules=("q_proj",), exclude_modules=("nothing_here",), task_type="TOKEN_CLS"),
        training=TrainingSpec(prepare_kbit=False),
    ),
    # ...nor in the wording of a rejection: targets that reach nothing are "not found" upstream.
    "token-classification-head-not-counted-as-excluded-in-rejection": Case(
        ModelSpec("llama", "TOKEN_CLS", num_layers=1),
        adapter=AdapterSpec(target_modules=("q_pro",), task_type="TOKEN_CLS"),
        training=TrainingSpec(prepare_kbit=False),
        invalid=True,
    ),
    # peft's MoE config conversion empties target_modules=None before the default table is read.
    "moe-default-targets-lost": Case(
        ModelSpec("mixtral", "CAUSAL_LM", num_layers=1),
        adapter=AdapterSpec(task_type="CAUSAL_LM"),
        training=TrainingSpec(prepare_kbit=False),
    ),
    # peft 0.15 reads layers_to_transform=0 as "not given" when layers_pattern is set.
    "layers-to-transform-zero-read-as-missing": Case(
        ModelSpec("llama", "CAUSAL_LM", num_layers=1),
        adapter=AdapterSpec(target_modules=("q_proj",), layers_to_transform=0, layers_pattern="layers"),
        training=TrainingSpec(prepare_kbit=False),
    ),
    # peft 0.15 attaches LoRA for a target inside a saved module to the wrapper itself.
    "orphan-lora-inside-saved-module": Case(
        ModelSpec("roberta", "CAUSAL_LM", num_layers=1),
        adapter=AdapterSpec(target_modules="all-linear", modules_to_save=("lm_head",)),
        training=TrainingSpec(prepare_kbit=False),
    ),
    # get_peft_model resolves "all-linear" into the user's own config object.
    "loraconfig-mutated-in-place": Case(
        ModelSpec("llama", "CAUSAL_LM", num_layers=1),
        adapter=AdapterSpec(target_modules="all-linear"),
        training=TrainingSpec(prepare_kbit=False),
    ),
    # A layer-0-only regex on mixtral is widened to the leaf name: every layer gets LoRA.
    "moe-regex-targets-widened": Case(
        ModelSpec("mixtral", "CAUSAL_LM", num_layers=2),
        adapter=AdapterSpec(target_modules=r".*\.layers\.0\..*\.(q_proj)"),
        training=TrainingSpec(prepare_kbit=False),
    ),
    # peft < 0.18 adds the LoRA update of gemma3's scaled embedding without its embed_scale.
    "lora-embedding-update-ignores-embed-scale": Case(
        ModelSpec("gemma3_text", "CAUSAL_LM", num_layers=1),
        adapter=AdapterSpec(target_modules=("embed_tokens",), task_type="CAUSAL_LM"),
        training=TrainingSpec(prepare_kbit=False),
    ),
    # peft < 0.21.2's PeftModelForSeq2SeqLM reads a generation helper transformers 5.18 removed.
    "seq2seq-peft-model-transformers-5-18": Case(
        ModelSpec("t5", "SEQ_2_SEQ_LM", num_layers=1),
        adapter=AdapterSpec(target_modules=("q",), task_type="SEQ_2_SEQ_LM"),
        training=TrainingSpec(prepare_kbit=False),
    ),
    # peft 0.19.0's MoE config conversion splits a string target into its characters: nothing is targeted.
    "moe-string-targets-split-into-characters": Case(
        ModelSpec("mixtral", "CAUSAL_LM", num_layers=1),
        adapter=AdapterSpec(target_modules="all-linear", task_type="CAUSAL_LM"),
        training=TrainingSpec(prepare_kbit=False),
    ),
    # trl >= 0.26 casts a quantized model's trainable lm_head copy to bf16: an fp32 forward cannot run.
    "trl-qlora-bf16-cast-mixes-dtypes": Case(
        ModelSpec("llama", "CAUSAL_LM", num_layers=1), QuantSpec(kind="4bit"),
        AdapterSpec(r=4, target_modules=("q_proj",), modules_to_save=("lm_head",), task_type="CAUSAL_LM"),
        TrainingSpec(level="trl", prepare_kbit=False, gradient_checkpointing=False),
    ),
    # ...and a trainable 4-bit weight with float storage (roberta's saved lm_head.dense) is reinterpreted.
    "trl-qlora-bf16-cast-corrupts-trainable-4bit-weights": Case(
        ModelSpec("xlm-roberta", "CAUSAL_LM", num_layers=1, load_dtype="bfloat16"),
        QuantSpec(kind="4bit", compute_dtype="float16", quant_storage="float32"),
        AdapterSpec(r=4, target_modules=("query",), modules_to_save=("lm_head",), task_type="CAUSAL_LM"),
        TrainingSpec(level="trl", prepare_kbit=False, gradient_checkpointing=False, bf16=True),
    ),
    # transformers 4.x falcon changes an 8-bit matmul's output view in place: its LoRA forward cannot run.
    "falcon-8bit-modifies-a-matmul8bit-view-in-place": Case(
        ModelSpec("falcon", "CAUSAL_LM", num_layers=1), QuantSpec(kind="8bit"),
        AdapterSpec(r=4, target_modules=("query_key_value",), task_type="CAUSAL_LM"), TrainingSpec(prepare_kbit=True),
    ),
    # deberta-v2 reuses its relative embeddings' graph in every reentrant-checkpointed layer: training's
    # backward raises once bias="all" trains encoder.LayerNorm.bias.
    "deberta-v2-reentrant-checkpointing-backwards-rel-embeddings-twice": Case(
        ModelSpec("deberta-v2", "SEQ_CLS", num_layers=2), QuantSpec(kind="8bit", skip_modules=("classifier",)),
        AdapterSpec(r=4, target_modules=("query_proj",), bias="all", task_type="SEQ_CLS"), TrainingSpec(prepare_kbit=True),
    ),
    # "all-linear" on qwen3_moe: peft's own rank / alpha patterns for the fused gate_up_proj are
    # reported as unused, though they set the parameters' rank and alpha.
    "pattern-unused-warning-ignores-parameter-targets": Case(
        ModelSpec("qwen3_moe", "CAUSAL_LM", num_layers=1),
        adapter=AdapterSpec(target_modules="all-linear", task_type="CAUSAL_LM"),
        training=TrainingSpec(prepare_kbit=False),
    ),
    # ensure_weight_tying on a bf16 model: the fp32 upcast of the adapters copies the tied factors apart.
    "weight-tying-lost-to-adapter-upcast": Case(
        ModelSpec("gemma", "CAUSAL_LM", num_layers=1, load_dtype="bfloat16"),
        adapter=AdapterSpec(r=4, target_modules=("q_proj", "embed_tokens"), ensure_weight_tying=True),
        training=TrainingSpec(prepare_kbit=False),
    ),
    # ensure_weight_tying with OLoRA: the init replaces the tied head's factors.
    "weight-tying-broken-by-decomposing-inits": Case(
        ModelSpec("opt", "CAUSAL_LM", num_layers=1),
        adapter=AdapterSpec(target_modules=("q_proj", "embed_tokens"), ensure_weight_tying=True, init_lora_weights="olora"),
        training=TrainingSpec(prepare_kbit=False),
    ),
    # "all-linear" on qwen2_moe: no conversion, the routed experts and the router get no LoRA.
    "moe-conversion-skips-qwen2-moe": Case(
        ModelSpec("qwen2_moe", "CAUSAL_LM", num_layers=1),
        adapter=AdapterSpec(target_modules="all-linear", task_type="CAUSAL_LM"),
        training=TrainingSpec(prepare_kbit=False),
    ),
    # ...and with rsLoRA, the rank and alpha the reference doubles on a named fused expert change its scaling
    "moe-conversion-skips-qwen2-moe-rslora-scaling": Case(
        ModelSpec("qwen2_moe", "CAUSAL_LM", num_layers=1),
        adapter=AdapterSpec(target_modules="all-linear", target_parameters=("gate_up_proj", "down_proj"),
                            use_rslora=True, task_type="CAUSAL_LM"),
        training=TrainingSpec(prepare_kbit=False),
    ),
    # inference_mode=True with bias="all": peft freezes the adapters, not the biases it marked
    "inference-mode-leaves-biases-trainable": Case(
        ModelSpec("gpt2", num_layers=1),
        adapter=AdapterSpec(r=4, target_modules=("c_attn",), bias="all", inference_mode=True),
        training=TrainingSpec(prepare_kbit=False),
    ),
    # inference_mode=True on a SEQ_CLS model: peft < 0.18 leaves the saved head's copy trainable
    "inference-mode-leaves-saved-copy-trainable": Case(
        ModelSpec("gpt2", "SEQ_CLS", num_layers=1),
        adapter=AdapterSpec(r=4, target_modules=("c_attn",), task_type="SEQ_CLS", inference_mode=True),
        training=TrainingSpec(prepare_kbit=False),
    ),
    # QDoRA on an 8-bit llama on the CPU: peft's DoRA re-assigns the weight as weight.to("cpu"), losing
    # its int8 scales, and bitsandbytes 0.50's CPU matmul raises in every forward
    "qdora-8bit-cpu-weight-loses-int8-scales": Case(
        ModelSpec("llama", num_layers=1),
        QuantSpec(kind="8bit"),
        AdapterSpec(target_modules=("q_proj",), use_dora=True, task_type="CAUSAL_LM"),
        TrainingSpec(),
    ),
    # OLoRA on gpt2's Conv1D c_attn: the QR is taken in the stored (in, out) layout
    "olora-ignores-conv1d-layout": Case(
        ModelSpec("gpt2", num_layers=1),
        adapter=AdapterSpec(r=4, target_modules=("c_attn",), init_lora_weights="olora"),
        training=TrainingSpec(prepare_kbit=False),
    ),
    # the orthogonal init on a 4-bit llama: the factors are cast to the packed weight's uint8
    "orthogonal-init-crashes-on-bitsandbytes": Case(
        ModelSpec("llama", num_layers=1), QuantSpec(kind="4bit"),
        AdapterSpec(r=4, target_modules=("q_proj",), init_lora_weights="orthogonal", task_type="CAUSAL_LM"),
        TrainingSpec(),
    ),
    # PiSSA on a 4-bit llama packed in float32: the packed bytes are decomposed as a weight
    "pissa-decomposes-packed-4bit-float-storage": Case(
        ModelSpec("llama", num_layers=1), QuantSpec(kind="4bit", quant_storage="float32"),
        AdapterSpec(r=4, target_modules=("q_proj",), init_lora_weights="pissa", task_type="CAUSAL_LM"),
        TrainingSpec(),
    ),
    # DoRA over OLoRA on an 8-bit llama: the magnitude is the norm under the loaded weight's scales
    "qdora-after-olora-8bit-magnitude-from-stale-scales": Case(
        ModelSpec("llama", num_layers=1), QuantSpec(kind="8bit"),
        AdapterSpec(r=4, target_modules=("q_proj",), init_lora_weights="olora", use_dora=True, task_type="CAUSAL_LM"),
        TrainingSpec(),
    ),
    # trainable tokens on BERT's tied MLM decoder: upstream's logits lose the decoder's bias
    "trainable-tokens-tied-head-drops-bias": Case(
        ModelSpec("bert", "CAUSAL_LM", num_layers=1),
        adapter=AdapterSpec(r=4, target_modules=("query",), trainable_token_indices=(1,), task_type="CAUSAL_LM"),
        training=TrainingSpec(prepare_kbit=False),
    ),
    # T5 sequence classification (transformers 5): only `shared` is wrapped for trainable tokens
    "trainable-tokens-skip-tied-embeddings": Case(
        ModelSpec("t5", "SEQ_CLS", num_layers=1),
        adapter=AdapterSpec(r=4, target_modules=("q",), trainable_token_indices=(1,), task_type="SEQ_CLS"),
        training=TrainingSpec(prepare_kbit=False),
    ),
    # mt5 for generation under transformers 4.x: embed_tokens *is* shared, and only `shared` is wrapped
    "trainable-tokens-skip-aliased-embeddings": Case(
        ModelSpec("mt5", "SEQ_2_SEQ_LM", num_layers=1),
        adapter=AdapterSpec(r=4, target_modules=("q",), trainable_token_indices=(1,), task_type="SEQ_2_SEQ_LM"),
        training=TrainingSpec(prepare_kbit=False),
    ),
    # inference mode on a bf16 llama with trainable tokens: the fp32 upcast makes the rows trainable again
    "inference-mode-autocast-retrains-embedding-adapters": Case(
        ModelSpec("llama", "CAUSAL_LM", num_layers=1, load_dtype="bfloat16"),
        adapter=AdapterSpec(r=4, target_modules=("q_proj",), trainable_token_indices=(1,), inference_mode=True,
                            task_type="CAUSAL_LM"),
        training=TrainingSpec(prepare_kbit=False),
    ),
    # OLoRA with all-linear on a fused-expert MoE (transformers 5): the init reads the experts' missing `weight`
    "init-variants-crash-on-expert-parameters": Case(
        ModelSpec("qwen3_moe", "CAUSAL_LM", num_layers=1),
        adapter=AdapterSpec(target_modules="all-linear", init_lora_weights="olora", task_type="CAUSAL_LM"),
        training=TrainingSpec(prepare_kbit=False),
    ),
    # peft 0.15 - 0.17: trainable tokens on gemma3's scaled embedding drop its embed_scale
    "trainable-tokens-ignore-embed-scale": Case(
        ModelSpec("gemma3_text", "CAUSAL_LM", num_layers=1),
        adapter=AdapterSpec(r=4, target_modules=("q_proj",), trainable_token_indices=(1,), task_type="CAUSAL_LM"),
        training=TrainingSpec(prepare_kbit=False),
    ),
    # trainable tokens on llava (transformers 4.53): the untied lm_head is wrapped as tied, by config.
    "tokens-share-rows-with-an-untied-head": Case(
        ModelSpec("llava", "CAUSAL_LM", num_layers=1),
        adapter=AdapterSpec(r=4, target_modules=("q_proj",), trainable_token_indices=(1,), task_type="CAUSAL_LM"),
        training=TrainingSpec(prepare_kbit=False),
    ),
    # bias="lora_only" resumed from a saved adapter: the trained base biases were not saved.
    "lora-only-bias-not-saved": Case(
        ModelSpec("gpt2", "CAUSAL_LM", num_layers=1),
        adapter=AdapterSpec(r=4, bias="lora_only", task_type="CAUSAL_LM"),
        training=TrainingSpec(prepare_kbit=False, load_saved=True, is_trainable=True),
    ),
    # peft 0.15 saves a classification head with a stray LoRA layer inside; from_pretrained cannot map its keys.
    "saved-copy-with-lora-inside-cannot-be-reloaded": Case(
        ModelSpec("roberta", "SEQ_CLS", num_layers=1),
        adapter=AdapterSpec(target_modules=("query", "dense"), task_type="SEQ_CLS"),
        training=TrainingSpec(prepare_kbit=False, load_saved=True),
    ),
    # add_adapter saving lm_head anew: peft 0.15 - 0.17 activate the new adapter's copy.
    "new-adapter-saved-copy-active": Case(
        ModelSpec("llama", "CAUSAL_LM", num_layers=1),
        adapter=AdapterSpec(r=4, target_modules=("q_proj",)),
        training=TrainingSpec(prepare_kbit=False),
        second_adapter=AdapterSpec(r=2, target_modules=("v_proj",), modules_to_save=("lm_head",)),
    ),
    # set_adapter("default") where only the second adapter saves lm_head: peft 0.15 - 0.18 train the original.
    "set-adapter-trains-original-of-unsaved-module": Case(
        ModelSpec("llama", "CAUSAL_LM", num_layers=1),
        adapter=AdapterSpec(r=4, target_modules=("q_proj",)),
        training=TrainingSpec(prepare_kbit=False, set_adapter="default"),
        second_adapter=AdapterSpec(r=2, target_modules=("v_proj",), modules_to_save=("lm_head",)),
    ),
    # add_adapter whose config saves nothing: peft 0.15 - 0.19 freeze the active adapter's lm_head copy.
    "add-adapter-freezes-active-saved-copies": Case(
        ModelSpec("llama", "CAUSAL_LM", num_layers=1),
        adapter=AdapterSpec(r=4, target_modules=("q_proj",), modules_to_save=("lm_head",)),
        training=TrainingSpec(prepare_kbit=False),
        second_adapter=AdapterSpec(r=2, target_modules=("v_proj",)),
    ),
    # trainable tokens with a saved, tied lm_head: peft wraps the saved module for the rows, and its token layer refuses to run
    "tokens-around-a-saved-tied-head-cannot-run": Case(
        ModelSpec("opt", num_layers=1),
        adapter=AdapterSpec(r=4, target_modules=("q_proj",), trainable_token_indices=(3, 5), modules_to_save=("lm_head",)),
        training=TrainingSpec(prepare_kbit=False),
    ),
    # ...and where a module to save contains the tied layer, peft cannot find it by its old path
    "tokens-tied-head-inside-a-saved-module-not-found": Case(
        ModelSpec("roberta", num_layers=1),
        adapter=AdapterSpec(r=4, target_modules=("query",), trainable_token_indices=(0,), modules_to_save=("lm_head",)),
        training=TrainingSpec(prepare_kbit=False),
    ),
    # trl 1.16 puts a cloned chat template's rows under `embed_tokens`, which GPT-2 does not have
    "chat-template-assumes-embed-tokens": Case(
        ModelSpec("gpt2", num_layers=1),
        adapter=AdapterSpec(r=4, target_modules=("c_attn",), task_type="CAUSAL_LM"),
        training=TrainingSpec(level="trl", prepare_kbit=False, chat_template="tokenizer"),
    ),
    # trl 1.16's DPO-family `ref` copy matches '.default.' in names: an embedding's LoRA factors are skipped
    "ref-adapter-copy-skips-embedding-factors": Case(
        ModelSpec("gpt2", num_layers=1),
        adapter=AdapterSpec(r=4, target_modules=("c_attn", "wte"), task_type="CAUSAL_LM"),
        training=TrainingSpec(level="trl", prepare_kbit=False, trainer="dpo", peft_model_in=True, peft_config_too=False),
    ),
    # trl 1.16's DPOTrainer and KTOTrainer refuse a quantization_config beside a loaded model (documented: ignored)
    "dpo-kto-refuse-quantization-config-beside-a-model": Case(
        ModelSpec("llama", num_layers=1),
        QuantSpec(kind="8bit"),
        AdapterSpec(r=4, target_modules=("q_proj",), task_type="CAUSAL_LM"),
        TrainingSpec(level="trl", prepare_kbit=False, trainer="kto", quantization_config_in="trainer"),
    ),
    # trl 0.19's DPO family merges a PeftModel given with a peft_config: peft 0.15's 8-bit merge reads a
    # missing base bias (llama's q_proj has none)...
    "dpo-family-merge-reads-a-missing-bias": Case(
        ModelSpec("llama", num_layers=1),
        QuantSpec(kind="8bit"),
        AdapterSpec(r=4, lora_alpha=8, target_modules=("q_proj",), lora_bias=True, task_type="CAUSAL_LM"),
        TrainingSpec(level="trl", prepare_kbit=False, trainer="dpo", peft_model_in=True, peft_config_too=True),
    ),
    # ...and its plain merge adds the LoRA bias unscaled (gpt_neox's query_key_value has a bias).
    "peft-015-merge-drops-lora-bias-scaling": Case(
        ModelSpec("gpt_neox", num_layers=1),
        adapter=AdapterSpec(r=4, lora_alpha=8, target_modules=("query_key_value",), lora_bias=True, task_type="CAUSAL_LM"),
        training=TrainingSpec(level="trl", prepare_kbit=False, trainer="kto", peft_model_in=True, peft_config_too=True),
    ),
}
ALSO = {"qdora-after-olora-8bit-magnitude-from-stale-scales": {"qdora-8bit-cpu-weight-loses-int8-scales"},
        "moe-conversion-skips-qwen2-moe-rslora-scaling": {"moe-conversion-skips-qwen2-moe"}}
"""Entries a minimal case may also meet: QDoRA on 8-bit on the CPU always meets the lost-scales one."""


def test_every_active_entry_has_a_minimal_case():
    active = {e.id for e in default_registry().active}
    assert active <= MINIMAL.keys(), f"registry entries without a reproduction: {sorted(active - MINIMAL.keys())}"


@pytest.mark.parametrize("entry_id", sorted(MINIMAL))
def test_minimal_case_is_explained_by_its_entry(entry_id):
    if entry_id not in {e.id for e in default_registry().active}:
        pytest.skip(f"{entry_id} does not apply to the installed stack")
    outcome = run_case(MINIMAL[entry_id], select_profile())
    assert outcome.status == "known", (outcome.status, outcome.divergences)
    # The case may also mutate the user's config (its own entry); the entry under test must explain some.
    allowed = {entry_id, "loraconfig-mutated-in-place"} | ALSO.get(entry_id, set())
    assert entry_id in outcome.known and set(outcome.known) <= allowed, outcome.known


def test_entries_do_not_hide_a_different_divergence():
    """The same case with the fix applied (head kept unquantized) agrees: the entry is specific."""
    case = MINIMAL["quantized-classification-head"]
    fixed = Case(case.model, QuantSpec(kind="8bit", skip_modules=("classifier",)), case.adapter, case.training)
    outcome = run_case(fixed, select_profile())
    assert outcome.status in ("agree", "known") and "quantized-classification-head" not in outcome.known
