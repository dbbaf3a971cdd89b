"""``merge_and_unload``: each LoRA update folded into its base weight, the wrappers removed.

trl 0.22 - 0.26 merge a passed-in PeftModel before applying a new ``peft_config``; a snapshot
records the merged weights' values, so the merge follows upstream's arithmetic (peft 0.21,
observed): the delta is ``scaling * B @ A`` (transposed for ``fan_in_fan_out``), computed in
fp32 on the CPU when the factors are half precision and cast back to their dtype;

* a plain Linear / Conv1D weight gets the delta added in place (its dtype kept); an Embedding
  weight gets the delta cast to the weight's dtype first, then added (two roundings);
* a bitsandbytes 8-bit weight is dequantized (row-wise scales), the delta added in the
  delta's dtype, and the sum quantized again as a new ``Int8Params``;
* a bitsandbytes 4-bit weight is dequantized, the delta added (the sum takes the promoted
  dtype, which the new quant state records), and the sum quantized again as a new
  ``Params4bit`` with the old one's settings.

A DoRA adapter folds ``(m / n) * (W + delta) - W`` instead (``reference.dora.merged_delta``).

A LoRA bias (``lora_bias``) is folded into the base bias *scaled*, as the forward scales it:
``b + scaling * l``.  peft does so for plain layers (PR 2489) but adds it unscaled into
bitsandbytes layers (peft issue 3741, open): a known divergence, not this module's rule.  A
LoRA bias with no base bias to fold into is refused.
"""

from __future__ import annotations

import torch
from torch import nn

from reference import dora
from reference.errors import MergeImpossible
from reference.layers import LoraEmbedding, LoraLinear, SavedModule
from reference.notices import warn
from reference.profiles import Profile

__all__ = ["delta_weight", "merge_and_unload"]


def _product(b: torch.Tensor, a: torch.Tensor, scaling: float, transpose: bool) -> torch.Tensor:
    dtype = b.dtype
    upcast = b.device.type == "cpu" and dtype in (torch.float16, torch.bfloat16)
    if upcast:  # half-precision matmuls on the CPU are slow and imprecise: fp32, then back
        a, b = a.float(), b.float()
    out = b @ a
    out = (out.T if transpose else out) * scaling
    return out.to(dtype) if upcast else out


def delta_weight(module: LoraLinear | LoraEmbedding, name: str) -> torch.Tensor:
    """The update adapter ``name`` of ``module`` adds to its base weight, in the base weight's layout."""
    if isinstance(module, LoraEmbedding):
        # A is (r, vocab) and B is (dim, r): B @ A is (dim, vocab), the weight (vocab, dim).
        return _product(module.lora_embedding_B[name], module.lora_embedding_A[name], module.scaling[name], True)
    return _product(module.lora_B[name].weight, module.lora_A[name].weight, module.scaling[name],
                    bool(module.fan_in_fan_out))


def _merge_8bit(base: nn.Module, delta: torch.Tensor) -> None:
    import bitsandbytes as bnb

    weight = base.weight
    dense = dora.dense_weight(base)
    merged = dense.to(delta.dtype).to(delta.device) + delta
    base.weight = bnb.nn.Int8Params(merged.to("cpu"), requires_grad=False,
                                    has_fp16_weights=weight.has_fp16_weights).to(weight.device)
    base.state.reset_grads()


def _merge_4bit(base: nn.Module, delta: torch.Tensor) -> None:
    import bitsandbytes as bnb

    weight = base.weight
    dense = dora.dense_weight(base)
    merged = dense + delta
    settings = {k: v for k, v in weight.__dict__.items() if not k.startswith("_") and k != "data"}
    settings.update(requires_grad=False, bnb_quantized=False)
    base.weight = bnb.nn.Params4bit(merged.to("cpu"), **settings).to(weight.device)


def _merge(name: str, module: LoraLinear | LoraEmbedding) -> None:
    base = module.base_layer
    kind = type(base).__name__ if type(base).__module__.startswith("bitsandbytes") else "plain"
    for adapter in module.active_adapters:
        delta = delta_weight(module, adapter)
        if adapter in module.lora_magnitude_vector:  # DoRA: the merged weight is m * V / ||V||
            per_column = isinstance(module, LoraEmbedding) or bool(module.fan_in_fan_out)
            delta = dora.merged_delta(module.lora_magnitude_vector[adapter].weight, dora.dense_weight(base).to(delta.device),
                                      delta, per_column)
        with torch.no_grad():
            if kind == "Linear8bitLt":
                _merge_8bit(base, delta)
            elif kind == "Linear4bit":
                _merge_4bit(base, delta)
            elif isinstance(module, LoraEmbedding):
                base.weight.data += delta.to(base.weight.dtype)
            else:
                base.weight.data += delta
        lora_b = module.lora_B[adapter] if isinstance(module, LoraLinear) else None
        lora_bias = getattr(lora_b, "bias", None)
        if lora_bias is None:
            continue
        base_bias = getattr(base, "bias", None)
        if base_bias is None:
            raise MergeImpossible(f"Impossible to merge LoRA with lora_bias=True into {name}: the base layer has no bias.")
        with torch.no_grad():
            update = lora_bias * module.scaling[adapter]
            if kind == "plain":
                base_bias.data += update
            else:  # bitsandbytes layers add out of place: the sum takes the promoted dtype
                base_bias.data = base_bias.data + update


def merge_and_unload(model: nn.Module, profile: Profile | None = None) -> None:
    """Fold every LoRA layer's update into its base and put the base back; replace every
    modules-to-save wrapper by its trained copy; then, where ``profile`` says so, record in the
    config that the embeddings came apart."""
    for name, module in list(model.named_modules()):
        if not name:
            continue
        if isinstance(module, SavedModule):
            model.set_submodule(name, module.modules_to_save[module.active_adapter])
        elif isinstance(module, (LoraLinear, LoraEmbedding)):
            _merge(name, module)
            model.set_submodule(name, module.base_layer)
    if profile is not None and profile.merge_unties_diverged_embeddings:
        _untie_if_apart(model)


def _untie_if_apart(model: nn.Module) -> None:
    config = getattr(model, "config", None)
    if not getattr(config, "tie_word_embeddings", False):
        return
    try:
        out_emb, in_emb = model.get_output_embeddings(), model.get_input_embeddings()
    except (NotImplementedError, AttributeError):
        return
    out_w, in_w = getattr(out_emb, "weight", None), getattr(in_emb, "weight", None)
    if out_w is not None and in_w is not None and out_w.data_ptr() != in_w.data_ptr():
        config.tie_word_embeddings = False
        warn("embeddings_untied_after_merge", "the merged model's output embedding is not its input embedding: "
             "tie_word_embeddings=False is written into the config")
