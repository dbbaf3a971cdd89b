"""Tiny offline configs of the vision-language types in scope (``strategies.zoo``).

Each factory takes ``(num_layers, hidden_size)`` like the text types and keeps the zoo's rules
(32-wide heads, a 256-entry vocabulary with pad 0 / bos 1 / eos 2, no dropout, every Linear
input width a multiple of 64) in *both* towers: the vision tower has ``num_layers`` blocks of
width ``hidden_size`` too, and sees 32x32 images cut into 8x8 patches (16 patches).  The image
placeholder tokens sit at the top of the vocabulary (:data:`IMAGE_TOKEN` and its neighbours), so
the random ids that numerics draw below them never collide with them.

The model class of such a type is its ``AutoModelForImageTextToText`` class; peft prepares it as
a ``CAUSAL_LM`` model (``task_type="CAUSAL_LM"``, what peft's and trl's vision examples pass).
"""

from __future__ import annotations

from transformers import PretrainedConfig

__all__ = ["IMAGE_SIZE", "IMAGE_TOKEN", "PATCH", "gemma3", "llava", "mllama", "qwen2_vl"]

VOCAB = 256
IMAGE_SIZE = 32
PATCH = 8
IMAGE_TOKEN = 255
"""The image placeholder id of every type (the other special ids of a type sit just below it)."""
_HEAD_DIM = 32


def _heads(hidden: int) -> int:
    if hidden % 64:
        raise ValueError(f"hidden_size must be a multiple of 64, got {hidden}")
    return hidden // _HEAD_DIM


def _text(num_layers: int, hidden: int, **extra) -> dict:
    return dict(vocab_size=VOCAB, pad_token_id=0, bos_token_id=1, eos_token_id=2, hidden_size=hidden,
                intermediate_size=2 * hidden, num_hidden_layers=num_layers, num_attention_heads=_heads(hidden),
                num_key_value_heads=max(1, _heads(hidden) // 2), max_position_embeddings=64, **extra)


def _vision(num_layers: int, hidden: int, **extra) -> dict:
    return dict(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=num_layers,
                num_attention_heads=_heads(hidden), image_size=IMAGE_SIZE, patch_size=PATCH, **extra)


def _ids() -> dict:
    return dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)


def llava(num_layers: int, hidden: int) -> PretrainedConfig:
    """A llama language model behind a CLIP vision tower and a two-layer projector."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    vision = CLIPVisionConfig(**_vision(num_layers, hidden, projection_dim=hidden, attention_dropout=0.0))
    return LlavaConfig(vision_config=vision, text_config=LlamaConfig(**_text(num_layers, hidden)),
                       image_token_index=IMAGE_TOKEN, projector_hidden_act="gelu", vision_feature_layer=-1,
                       **_ids())


def qwen2_vl(num_layers: int, hidden: int) -> PretrainedConfig:
    """Qwen2-VL: a ViT with 2x2 patch merging (``visual.blocks``) and multimodal rotary positions."""
    from transformers import Qwen2VLConfig

    text = _text(num_layers, hidden, rope_scaling={"type": "mrope", "mrope_section": [4, 6, 6]})
    vision = dict(depth=num_layers, embed_dim=hidden, hidden_size=hidden, num_heads=_heads(hidden), mlp_ratio=2,
                  patch_size=PATCH, spatial_merge_size=2, temporal_patch_size=2, in_channels=3)
    # (transformers 4.53's loss reads the top-level vocab_size, which its nested form leaves unset)
    return Qwen2VLConfig(text_config=text, vision_config=vision, image_token_id=IMAGE_TOKEN,
                         video_token_id=IMAGE_TOKEN - 1, vision_start_token_id=IMAGE_TOKEN - 3,
                         vision_end_token_id=IMAGE_TOKEN - 2, vocab_size=VOCAB, **_ids())


def gemma3(num_layers: int, hidden: int) -> PretrainedConfig:
    """Gemma 3 (multimodal): a SigLIP tower, pooled to 4 soft tokens per image; tied head."""
    from transformers import Gemma3Config

    text = _text(num_layers, hidden, head_dim=_HEAD_DIM, sliding_window=16, query_pre_attn_scalar=_HEAD_DIM,
                 attention_dropout=0.0)
    return Gemma3Config(text_config=text, vision_config=_vision(num_layers, hidden, attention_dropout=0.0),
                        mm_tokens_per_image=4, image_token_index=IMAGE_TOKEN, boi_token_index=IMAGE_TOKEN - 2,
                        eoi_token_index=IMAGE_TOKEN - 1, **_ids())


def mllama(num_layers: int, hidden: int) -> PretrainedConfig:
    """Llama 3.2 Vision: cross-attention text layers (the last one) over a tiled vision encoder."""
    from transformers import MllamaConfig

    text = _text(num_layers, hidden, cross_attention_layers=[num_layers - 1],
                 rope_scaling={"rope_type": "default"}, rope_theta=10000.0)
    vision = dict(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=num_layers,
                  num_global_layers=num_layers, attention_heads=_heads(hidden), image_size=IMAGE_SIZE,
                  patch_size=PATCH, vision_output_dim=2 * hidden, intermediate_layers_indices=[0], max_num_tiles=1,
                  supported_aspect_ratios=[[1, 1]])
    return MllamaConfig(text_config=text, vision_config=vision, image_token_index=IMAGE_TOKEN, **_ids())
