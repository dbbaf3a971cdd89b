"""Image inputs for the vision-language types (``strategies.zoo_vision``): one 32x32 image per row.

Each row starts with the type's image placeholder tokens, as many as the vision tower turns the
image into, followed by the text ids; the pixels are seeded normal values in the dtype of the
vision tower's patch embedding (a convolution: never quantized).  The image thus passes through
the vision tower and the projector, so LoRA layers there take part in the logits and gradients.

* llava: 16 patches, the CLS feature dropped: 16 placeholders;
* gemma3: 16 patches pooled to ``mm_tokens_per_image`` (4) soft tokens; ``token_type_ids`` mark them;
* qwen2_vl: a (1, 4, 4) grid of 8x8 patches (each patch two frames deep), merged 2x2: 4 placeholders;
  ``pixel_values`` holds the flattened patches, ``image_grid_thw`` the grid (and, transformers 5,
  ``mm_token_type_ids`` marks the placeholders);
* mllama: one tile, one ``<|image|>`` token, a cross-attention mask over the text.  Its
  cross-attention gates start at zero (scalars, which the zoo's perturbation leaves alone), so the
  image does not reach the logits: the vision tower's LoRA layers get no gradient there.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn

from strategies.zoo_vision import IMAGE_SIZE, IMAGE_TOKEN, PATCH

__all__ = ["image_inputs"]

_PATCHES = (IMAGE_SIZE // PATCH) ** 2
_SPECIAL = IMAGE_TOKEN - 4
"""The lowest special id of the vision types (video, vision start / end, begin / end of image)."""


def _pixel_dtype(model: nn.Module) -> torch.dtype:
    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.Conv3d)):
            return module.weight.dtype
    return torch.float32


def _placeholders(model_type: str, config) -> int:
    if model_type == "llava":
        return _PATCHES
    if model_type == "gemma3":
        return int(config.mm_tokens_per_image)
    if model_type == "qwen2_vl":
        return _PATCHES // config.vision_config.spatial_merge_size ** 2
    return 1  # mllama


def image_inputs(model_type: str, model: nn.Module, input_ids: torch.Tensor,
                 g: torch.Generator) -> dict[str, torch.Tensor]:
    """``input_ids`` with the image placeholders put first, and the image tensors the type takes."""
    config = model.config
    batch = input_ids.shape[0]
    n = _placeholders(model_type, config)
    # text ids stay clear of the special ids at the top of the vocabulary (and of a resized one)
    text = torch.where(input_ids >= _SPECIAL, input_ids % (_SPECIAL - 3) + 3, input_ids)
    ids = torch.cat([torch.full((batch, n), IMAGE_TOKEN, dtype=input_ids.dtype), text], dim=1)
    dtype = _pixel_dtype(model)
    out: dict[str, torch.Tensor] = {"input_ids": ids}
    if model_type == "qwen2_vl":
        v = config.vision_config
        depth = 3 * v.temporal_patch_size * PATCH * PATCH
        out["pixel_values"] = torch.randn(batch * _PATCHES, depth, generator=g).to(dtype)
        out["image_grid_thw"] = torch.tensor([[1, IMAGE_SIZE // PATCH, IMAGE_SIZE // PATCH]] * batch)
        if "mm_token_type_ids" in inspect.signature(model.forward).parameters:  # transformers 5
            out["mm_token_type_ids"] = (ids == IMAGE_TOKEN).long()
        return out
    if model_type == "mllama":
        out["pixel_values"] = torch.randn(batch, 1, 1, 3, IMAGE_SIZE, IMAGE_SIZE, generator=g).to(dtype)
        out["aspect_ratio_ids"] = torch.ones(batch, 1, dtype=torch.long)
        out["aspect_ratio_mask"] = torch.ones(batch, 1, 1, dtype=torch.long)
        out["cross_attention_mask"] = torch.ones(batch, ids.shape[1], 1, 1, dtype=torch.long)
        return out
    out["pixel_values"] = torch.randn(batch, 3, IMAGE_SIZE, IMAGE_SIZE, generator=g).to(dtype)
    if model_type == "gemma3":
        out["token_type_ids"] = (ids == IMAGE_TOKEN).long()
    return out
