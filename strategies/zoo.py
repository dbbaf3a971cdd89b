"""The model catalog: tiny offline configs for every transformers type in scope.

Pure data and config factories; nothing here builds a model.  Every factory
takes ``(num_layers, hidden_size)`` and returns a fresh config in which

* every ``nn.Linear`` / ``Conv1D`` input width is a multiple of 64 (the
  bitsandbytes 4-bit CPU kernels reject anything else), given a hidden size
  that is a multiple of 64;
* heads are 32 wide (``hidden_size // 32`` of them), the feed-forward width is
  ``2 * hidden_size``, the vocabulary has 256 entries and at most 64 positions;
* ``pad_token_id`` is 0 (sequence classification with batch > 1), there are
  ``NUM_LABELS`` (32) labels, and every dropout probability is 0.

``ZooEntry.linear_names`` are the leaf names of the Linear / Conv1D modules
inside a block of ``layer_container`` (union over the entry's tasks);
``embedding_names`` the leaf names of every ``nn.Embedding`` in the model
(union over tasks, shared modules counted under each of their names).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable

from transformers import (
    BartConfig, BertConfig, BloomConfig, CodeGenConfig, CohereConfig, DebertaConfig,
    DebertaV2Config, ElectraConfig, FalconConfig, Gemma2Config, Gemma3TextConfig,
    GemmaConfig, GlmConfig, GPT2Config, GPTBigCodeConfig, GPTJConfig, GPTNeoConfig,
    GPTNeoXConfig, GraniteConfig, LayoutLMConfig, LlamaConfig, MistralConfig, MixtralConfig,
    MT5Config, Olmo2Config, OlmoConfig, OlmoeConfig, OPTConfig, PersimmonConfig, Phi3Config, PhiConfig,
    PretrainedConfig, Qwen2Config, Qwen2MoeConfig, Qwen3Config, Qwen3MoeConfig, RobertaConfig,
    StableLmConfig, Starcoder2Config, T5Config, XLMRobertaConfig,
)

from strategies import zoo_vision

__all__ = [
    "CAUSAL_NEEDS_IS_DECODER",
    "NUM_LABELS",
    "TASKS",
    "ZOO",
    "ZooEntry",
    "model_types",
    "image_text_types",
    "tasks_of",
]

TASKS: tuple[str, ...] = ("CAUSAL_LM", "SEQ_CLS", "SEQ_2_SEQ_LM", "TOKEN_CLS")

VOCAB = 256
POSITIONS = 64
HEAD_DIM = 32
# Not 2: a 4-bit Linear's eval / no-grad forward on an AVX512-BF16 CPU repacks
# its weight in 32-row blocks and asserts out_features % 32 == 0, and
# transformers quantizes classification heads that have a bias.
NUM_LABELS = 32

ConfigFactory = Callable[[int, int], PretrainedConfig]


@dataclass(frozen=True)
class ZooEntry:
    """One transformers model type and how to build a tiny one."""

    model_type: str
    make_config: ConfigFactory
    """``(num_layers, hidden_size) -> config``; a fresh object on every call."""
    tasks: tuple[str, ...]
    """Tasks whose auto class maps this type (see ``TASKS``)."""
    layer_container: str
    """Leaf name of the ModuleList holding the blocks."""
    linear_names: tuple[str, ...]
    """Leaf names of the Linear / Conv1D modules inside a block."""
    embedding_names: tuple[str, ...]
    """Leaf names of the ``nn.Embedding`` modules anywhere in the model."""
    keep_unquantized: tuple[str, ...] = ()
    """Leaf names of Linear layers narrower than the 4-bit CPU kernels take (an output width not a
    multiple of 32): a quantized case keeps them out of quantization (``QuantSpec.skip_modules``)."""
    image_text: bool = False
    """A vision-language type (``strategies.zoo_vision``): its ``CAUSAL_LM`` class is the
    ``AutoModelForImageTextToText`` one, and ``linear_names`` also holds the Linear leaf names of
    its vision tower and projector (outside the blocks of ``layer_container``)."""


# Encoder-only types whose ``*ForCausalLM`` wants ``is_decoder=True`` (it warns
# otherwise and attends bidirectionally); build_model sets it for CAUSAL_LM.
CAUSAL_NEEDS_IS_DECODER = frozenset({"bert", "roberta", "xlm-roberta", "electra"})


def _heads(hidden: int) -> int:
    if hidden % 64:
        raise ValueError(f"hidden_size must be a multiple of 64, got {hidden}")
    return hidden // HEAD_DIM


def _kv(hidden: int) -> int:
    return max(1, _heads(hidden) // 2)


def _common() -> dict:
    return dict(
        vocab_size=VOCAB, pad_token_id=0, bos_token_id=1, eos_token_id=2, num_labels=NUM_LABELS
    )


# -- decoder-only, llama-like ------------------------------------------------------


def _llama_like(cls: type, **extra) -> ConfigFactory:
    def make(num_layers: int, hidden: int) -> PretrainedConfig:
        kw = dict(
            _common(),
            hidden_size=hidden,
            intermediate_size=2 * hidden,
            num_hidden_layers=num_layers,
            max_position_embeddings=POSITIONS,
        )
        kw["num_attention_heads"] = _heads(hidden)
        kw.update(extra)
        if "num_key_value_heads" in kw and kw["num_key_value_heads"] is None:
            kw["num_key_value_heads"] = _kv(hidden)
        return cls(**kw)

    return make


_LLAMA = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
_FUSED = ("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h")
_BERT = ("query", "key", "value", "dense")
_DEC3 = ("CAUSAL_LM", "SEQ_CLS", "TOKEN_CLS")
_ENC2 = ("SEQ_CLS", "TOKEN_CLS")
_ENC3 = _DEC3


def _gemma(cls: type, **extra) -> ConfigFactory:
    return _llama_like(
        cls, num_key_value_heads=None, head_dim=HEAD_DIM, attention_dropout=0.0, **extra
    )


# -- GPT-2 family ------------------------------------------------------------------


def _gpt2_like(cls: type, **extra) -> ConfigFactory:
    def make(num_layers: int, hidden: int) -> PretrainedConfig:
        kw = dict(
            _common(),
            n_embd=hidden,
            n_layer=num_layers,
            n_head=_heads(hidden),
            n_inner=2 * hidden,
            n_positions=POSITIONS,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
        )
        kw.update(extra)
        return cls(**kw)

    return make


def _gpt_neo(num_layers: int, hidden: int) -> PretrainedConfig:
    # alternating global / local layers (all global for an odd count)
    if num_layers % 2:
        types = [["global"], num_layers]
    else:
        types = [["global", "local"], num_layers // 2]
    return GPTNeoConfig(
        **_common(),
        hidden_size=hidden,
        num_layers=num_layers,
        attention_types=[types],
        num_heads=_heads(hidden),
        intermediate_size=2 * hidden,
        max_position_embeddings=POSITIONS,
        window_size=16,
        resid_dropout=0.0,
        embed_dropout=0.0,
        attention_dropout=0.0,
        classifier_dropout=0.0,
    )


def _bloom(num_layers: int, hidden: int) -> PretrainedConfig:
    # the MLP is always 4 * hidden wide (256 or 512): still a multiple of 64
    return BloomConfig(
        **_common(), hidden_size=hidden, n_layer=num_layers, n_head=_heads(hidden),
        hidden_dropout=0.0, attention_dropout=0.0,
    )


def _opt(num_layers: int, hidden: int) -> PretrainedConfig:
    return OPTConfig(
        **_common(), hidden_size=hidden, num_hidden_layers=num_layers, ffn_dim=2 * hidden,
        num_attention_heads=_heads(hidden), max_position_embeddings=POSITIONS,
        word_embed_proj_dim=hidden, dropout=0.0, attention_dropout=0.0, layerdrop=0.0,
    )


def _gpt_neox(num_layers: int, hidden: int) -> PretrainedConfig:
    return GPTNeoXConfig(
        **_common(), hidden_size=hidden, num_hidden_layers=num_layers,
        num_attention_heads=_heads(hidden), intermediate_size=2 * hidden,
        max_position_embeddings=POSITIONS, attention_dropout=0.0, hidden_dropout=0.0,
        classifier_dropout=0.0,
    )


def _falcon(num_layers: int, hidden: int) -> PretrainedConfig:
    # falcon-7b layout: multi-query, parallel attention, rotary, no bias
    return FalconConfig(
        **_common(), hidden_size=hidden, num_hidden_layers=num_layers,
        num_attention_heads=_heads(hidden), ffn_hidden_size=2 * hidden,
        max_position_embeddings=POSITIONS, hidden_dropout=0.0, attention_dropout=0.0,
    )


def _codegen(num_layers: int, hidden: int) -> PretrainedConfig:
    # CodeGen splits qkv into 4 model-parallel shards of n_head // 4 heads each:
    # n_head must be a multiple of 4 (16-wide heads at hidden 64, 32-wide at 128)
    _heads(hidden)  # validates hidden
    return CodeGenConfig(
        **_common(), n_embd=hidden, n_layer=num_layers, n_head=4 * max(1, hidden // 128),
        n_inner=2 * hidden, rotary_dim=16, n_positions=POSITIONS, n_ctx=POSITIONS,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )


# -- encoders ----------------------------------------------------------------------


def _bert_like(cls: type, **extra) -> ConfigFactory:
    def make(num_layers: int, hidden: int) -> PretrainedConfig:
        kw = dict(
            _common(),
            hidden_size=hidden,
            num_hidden_layers=num_layers,
            num_attention_heads=_heads(hidden),
            intermediate_size=2 * hidden,
            max_position_embeddings=POSITIONS,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
        )
        kw.update(extra)
        return cls(**kw)

    return make


def _electra(num_layers: int, hidden: int) -> PretrainedConfig:
    # embedding_size == hidden_size: no embeddings_project Linear
    make = _bert_like(ElectraConfig, embedding_size=hidden, classifier_dropout=0.0,
                      summary_last_dropout=0.0)
    return make(num_layers, hidden)


# -- encoder-decoders ----------------------------------------------------------------


def _t5_like(cls: type, **extra) -> ConfigFactory:
    def make(num_layers: int, hidden: int) -> PretrainedConfig:
        kw = dict(
            vocab_size=VOCAB, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
            num_labels=NUM_LABELS, d_model=hidden, d_kv=HEAD_DIM, d_ff=2 * hidden,
            num_layers=num_layers, num_decoder_layers=num_layers, num_heads=_heads(hidden),
            relative_attention_num_buckets=8, relative_attention_max_distance=POSITIONS,
            dropout_rate=0.0, classifier_dropout=0.0,
        )
        kw.update(extra)
        return cls(**kw)

    return make


def _bart(num_layers: int, hidden: int) -> PretrainedConfig:
    return BartConfig(
        **_common(), decoder_start_token_id=2, forced_eos_token_id=2, d_model=hidden,
        encoder_layers=num_layers, decoder_layers=num_layers,
        encoder_attention_heads=_heads(hidden), decoder_attention_heads=_heads(hidden),
        encoder_ffn_dim=2 * hidden, decoder_ffn_dim=2 * hidden,
        max_position_embeddings=POSITIONS, dropout=0.0, attention_dropout=0.0,
        activation_dropout=0.0, classifier_dropout=0.0,
    )


# -- the catalog ---------------------------------------------------------------------


def _e(model_type, make, tasks, container, linears, embeddings, keep_unquantized=(), image_text=False) -> ZooEntry:
    return ZooEntry(model_type, make, tuple(tasks), container, tuple(linears), tuple(embeddings),
                    tuple(keep_unquantized), image_text)


def _vl(model_type, make, vision_linears, embeddings, keep_unquantized=()) -> ZooEntry:
    """A vision-language entry: a llama-like language model (``layers``) plus ``vision_linears``."""
    return _e(model_type, make, ("CAUSAL_LM",), "layers", vision_linears + _LLAMA, embeddings, keep_unquantized,
              image_text=True)


_ENTRIES = [
    # encoder-decoders
    _e("t5", _t5_like(T5Config), ("SEQ_CLS", "SEQ_2_SEQ_LM", "TOKEN_CLS"), "block",
       ("q", "k", "v", "o", "wi", "wo"), ("shared", "embed_tokens", "relative_attention_bias")),
    _e("mt5", _t5_like(MT5Config), ("SEQ_CLS", "SEQ_2_SEQ_LM", "TOKEN_CLS"), "block",
       ("q", "k", "v", "o", "wi_0", "wi_1", "wo"),
       ("shared", "embed_tokens", "relative_attention_bias")),
    _e("bart", _bart, ("CAUSAL_LM", "SEQ_CLS", "SEQ_2_SEQ_LM"), "layers",
       ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"),
       ("shared", "embed_tokens", "embed_positions")),
    # GPT-2 family
    _e("gpt2", _gpt2_like(GPT2Config, summary_first_dropout=0.0), _DEC3, "h",
       ("c_attn", "c_proj", "c_fc"), ("wte", "wpe")),
    _e("gpt_bigcode", _gpt2_like(GPTBigCodeConfig), _DEC3, "h", ("c_attn", "c_proj", "c_fc"),
       ("wte", "wpe")),
    _e("gptj", _gpt2_like(GPTJConfig, rotary_dim=16), ("CAUSAL_LM", "SEQ_CLS"), "h",
       ("q_proj", "k_proj", "v_proj", "out_proj", "fc_in", "fc_out"), ("wte",)),
    _e("codegen", _codegen, ("CAUSAL_LM",), "h", ("qkv_proj", "out_proj", "fc_in", "fc_out"),
       ("wte",)),
    _e("gpt_neo", _gpt_neo, _DEC3, "h",
       ("q_proj", "k_proj", "v_proj", "out_proj", "c_fc", "c_proj"), ("wte", "wpe")),
    _e("bloom", _bloom, _DEC3, "h", _FUSED, ("word_embeddings",)),
    _e("gpt_neox", _gpt_neox, _DEC3, "layers", _FUSED, ("embed_in",)),
    _e("falcon", _falcon, _DEC3, "h", _FUSED, ("word_embeddings",)),
    _e("opt", _opt, ("CAUSAL_LM", "SEQ_CLS"), "layers",
       ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"),
       ("embed_tokens", "embed_positions")),
    # llama-like
    _e("llama", _llama_like(LlamaConfig, num_key_value_heads=None), _DEC3, "layers", _LLAMA,
       ("embed_tokens",)),
    _e("mistral", _llama_like(MistralConfig, num_key_value_heads=None, head_dim=HEAD_DIM),
       _DEC3, "layers", _LLAMA, ("embed_tokens",)),
    _e("mixtral", _llama_like(MixtralConfig, num_key_value_heads=None, head_dim=HEAD_DIM,
                              num_local_experts=2, num_experts_per_tok=2),
       _DEC3, "layers", _ATTN, ("embed_tokens",)),
    _e("qwen2", _llama_like(Qwen2Config, num_key_value_heads=None), _DEC3, "layers", _LLAMA,
       ("embed_tokens",)),
    _e("qwen3", _llama_like(Qwen3Config, num_key_value_heads=None, head_dim=HEAD_DIM), _DEC3,
       "layers", _LLAMA, ("embed_tokens",)),
    _e("qwen3_moe", _llama_like(Qwen3MoeConfig, num_key_value_heads=None, head_dim=HEAD_DIM,
                                num_experts=2, num_experts_per_tok=2, moe_intermediate_size=128),
       _DEC3, "layers", _ATTN, ("embed_tokens",)),
    # qwen2_moe: a shared expert (plain Linear layers) beside the routed ones; its gate is 1 wide
    _e("qwen2_moe", _llama_like(Qwen2MoeConfig, num_key_value_heads=None, num_experts=2, num_experts_per_tok=2,
                                moe_intermediate_size=128, shared_expert_intermediate_size=128),
       _DEC3, "layers", _ATTN + ("gate_proj", "up_proj", "down_proj", "shared_expert_gate"), ("embed_tokens",),
       keep_unquantized=("shared_expert_gate",)),
    _e("olmoe", _llama_like(OlmoeConfig, num_key_value_heads=None, num_experts=2, num_experts_per_tok=2),
       ("CAUSAL_LM",), "layers", _ATTN, ("embed_tokens",)),
    _e("stablelm", _llama_like(StableLmConfig, num_key_value_heads=None, hidden_dropout=0.0),
       _DEC3, "layers", _LLAMA, ("embed_tokens",)),
    _e("phi", _llama_like(PhiConfig, num_key_value_heads=None, resid_pdrop=0.0, embd_pdrop=0.0),
       _DEC3, "layers", ("q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2"),
       ("embed_tokens",)),
    _e("phi3", _llama_like(Phi3Config, num_key_value_heads=None, resid_pdrop=0.0,
                           embd_pdrop=0.0, original_max_position_embeddings=POSITIONS),
       _DEC3, "layers", ("qkv_proj", "o_proj", "gate_up_proj", "down_proj"), ("embed_tokens",)),
    _e("gemma", _gemma(GemmaConfig), _DEC3, "layers", _LLAMA, ("embed_tokens",)),
    _e("gemma2", _gemma(Gemma2Config, query_pre_attn_scalar=HEAD_DIM, sliding_window=16),
       _DEC3, "layers", _LLAMA, ("embed_tokens",)),
    _e("gemma3_text", _gemma(Gemma3TextConfig, query_pre_attn_scalar=HEAD_DIM,
                             sliding_window=16),
       ("CAUSAL_LM", "SEQ_CLS"), "layers", _LLAMA, ("embed_tokens",)),
    _e("olmo", _llama_like(OlmoConfig, num_key_value_heads=None), ("CAUSAL_LM", "SEQ_CLS"),
       "layers", _LLAMA, ("embed_tokens",)),
    _e("olmo2", _llama_like(Olmo2Config, num_key_value_heads=None), ("CAUSAL_LM", "SEQ_CLS"),
       "layers", _LLAMA, ("embed_tokens",)),
    _e("granite", _llama_like(GraniteConfig, num_key_value_heads=None), ("CAUSAL_LM",),
       "layers", _LLAMA, ("embed_tokens",)),
    _e("cohere", _llama_like(CohereConfig, num_key_value_heads=None), ("CAUSAL_LM",), "layers",
       _LLAMA, ("embed_tokens",)),
    _e("starcoder2", _llama_like(Starcoder2Config, num_key_value_heads=None,
                                 residual_dropout=0.0, embedding_dropout=0.0),
       _DEC3, "layers", _ATTN + ("c_fc", "c_proj"), ("embed_tokens",)),
    _e("persimmon", _llama_like(PersimmonConfig, hidden_dropout=0.0), _DEC3, "layers", _FUSED,
       ("embed_tokens",)),
    _e("glm", _llama_like(GlmConfig, num_key_value_heads=None, head_dim=HEAD_DIM), _DEC3,
       "layers", ("q_proj", "k_proj", "v_proj", "o_proj", "gate_up_proj", "down_proj"),
       ("embed_tokens",)),
    # encoders
    _e("bert", _bert_like(BertConfig), _ENC3, "layer", _BERT,
       ("word_embeddings", "position_embeddings", "token_type_embeddings")),
    _e("roberta", _bert_like(RobertaConfig), _ENC3, "layer", _BERT,
       ("word_embeddings", "position_embeddings", "token_type_embeddings")),
    _e("xlm-roberta", _bert_like(XLMRobertaConfig), _ENC3, "layer", _BERT,
       ("word_embeddings", "position_embeddings", "token_type_embeddings")),
    _e("electra", _electra, _ENC3, "layer", _BERT,
       ("word_embeddings", "position_embeddings", "token_type_embeddings")),
    _e("layoutlm", _bert_like(LayoutLMConfig, max_2d_position_embeddings=POSITIONS), _ENC2,
       "layer", _BERT,
       ("word_embeddings", "position_embeddings", "x_position_embeddings",
        "y_position_embeddings", "h_position_embeddings", "w_position_embeddings",
        "token_type_embeddings")),
    # deberta-base layout: disentangled attention, c2p + p2c
    _e("deberta", _bert_like(DebertaConfig, relative_attention=True, pos_att_type=["c2p", "p2c"],
                             position_biased_input=False, pooler_dropout=0.0),
       _ENC2, "layer", ("in_proj", "pos_proj", "pos_q_proj", "dense"),
       ("word_embeddings", "rel_embeddings")),
    # deberta-v3 layout: shared attention keys, log buckets, layer-normed rel. embeddings
    _e("deberta-v2", _bert_like(DebertaV2Config, relative_attention=True,
                                pos_att_type=["p2c", "c2p"], position_biased_input=False,
                                position_buckets=32, norm_rel_ebd="layer_norm",
                                share_att_key=True, pooler_dropout=0.0),
       _ENC2, "layer", ("query_proj", "key_proj", "value_proj", "dense"),
       ("word_embeddings", "rel_embeddings")),
    # vision-language models (strategies.zoo_vision): text layers plus a vision tower
    _vl("llava", zoo_vision.llava, ("out_proj", "fc1", "fc2", "linear_1", "linear_2"),
        ("embed_tokens", "position_embedding")),
    # (its vision attention's output Linear, `attn.proj`, is left out: the name also reaches the
    # Conv3d patch embedding `patch_embed.proj`, and the reference models no convolution LoRA)
    _vl("qwen2_vl", zoo_vision.qwen2_vl, ("qkv", "fc1", "fc2"), ("embed_tokens",)),
    # (transformers 4.53 quantizes the SigLIP head's nn.MultiheadAttention out_proj, whose weight the
    # attention reads directly: the quantized model's own forward raises; kept unquantized, as 5.23 does)
    _vl("gemma3", zoo_vision.gemma3, ("out_proj", "fc1", "fc2"), ("embed_tokens", "position_embedding"),
        keep_unquantized=("head.attention",)),
    _vl("mllama", zoo_vision.mllama, ("fc1", "fc2", "multi_modal_projector"),
        ("embed_tokens", "embedding", "tile_embedding")),
]

ZOO: dict[str, ZooEntry] = {e.model_type: e for e in _ENTRIES}


def model_types(task: str | None = None) -> tuple[str, ...]:
    """The zoo's types, in catalog order; only those supporting ``task`` if given."""
    return tuple(t for t in ZOO if tasks_of(t) and (task is None or task in tasks_of(t)))


_IMAGE_TEXT_MAPPING = "MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES"
_AUTO_MAPPINGS = {
    "CAUSAL_LM": "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES",
    "SEQ_CLS": "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES",
    "SEQ_2_SEQ_LM": "MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES",
    "TOKEN_CLS": "MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES",
}


@functools.lru_cache(maxsize=None)
def tasks_of(model_type: str) -> tuple[str, ...]:
    """The entry's tasks that the *installed* transformers maps to an auto class.

    transformers 4.x lacks some heads that 5.x has (e.g. gemma3_text sequence
    classification), so the catalog's declared tasks are filtered here.
    """
    from transformers.models.auto import modeling_auto

    out = []
    entry = ZOO[model_type]
    for task in entry.tasks:
        names = getattr(modeling_auto, _IMAGE_TEXT_MAPPING if entry.image_text else _AUTO_MAPPINGS[task], {})
        if model_type in names:
            out.append(task)
    return tuple(out)


def image_text_types() -> tuple[str, ...]:
    """The vision-language types (``ZooEntry.image_text``) the installed transformers builds."""
    return tuple(t for t, e in ZOO.items() if e.image_text and tasks_of(t))
