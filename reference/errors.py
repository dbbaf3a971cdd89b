"""The reference's exceptions.

Every rejection is an instance of :class:`PreparationError` *and* of the builtin
class upstream raises for the same input (``ValueError``, ``TypeError``,
``NotImplementedError``), so callers catch what they would catch upstream.  The
``kind`` is a stable name for the reason; the harness compares (builtin class,
kind) between the two sides.
"""

from __future__ import annotations

import torch

__all__ = [
    "InvalidBias",
    "InvalidConfig",
    "InvalidRank",
    "LoftQNeedsCuda",
    "LoftQNeedsScipy",
    "LoraBiasUnsupported",
    "MergeImpossible",
    "NoDefaultTargets",
    "NoTargetMatched",
    "PreparationError",
    "QuantizedInitUnsupported",
    "SavedModuleIsLora",
    "TokenIndexOutOfRange",
    "TokensOnLoraLayer",
    "UnsupportedModule",
    "builtin_class",
]


class PreparationError(Exception):
    """Base of the reference's rejections; ``kind`` names the reason."""

    kind = "error"


class InvalidConfig(PreparationError, ValueError):
    """An adapter spec field has a value or combination upstream's config rejects.

    Remedy: fix the named field; the message shows its value.
    """

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


class InvalidConfigType(PreparationError, TypeError):
    """An adapter spec field has a value of a type upstream's config rejects (a TypeError there)."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


class InvalidRank(PreparationError, ValueError):
    """``r`` (or a ``rank_pattern`` value) is not a positive integer.  Use r >= 1."""

    kind = "invalid_r"


class NoDefaultTargets(PreparationError, ValueError):
    """``target_modules`` was not given and the model type has no default targets.

    Remedy: pass ``target_modules`` explicitly (a list, a regex or ``"all-linear"``).
    """

    kind = "no_default_targets"


class NoTargetMatched(PreparationError, ValueError):
    """No module of the model matched the targets (after excludes and layer filters).

    ``kind`` says what the walk over the modules saw, as upstream's message does:
    ``targets_not_found`` (nothing was excluded), ``nothing_targeted`` (some modules were
    excluded, by ``exclude_modules`` or as modules to save), ``all_excluded`` (every module
    was excluded).  Remedy: check the names against ``model.named_modules()``.
    """

    kind = "targets_not_found"

    def __init__(self, message: str, kind: str = "targets_not_found") -> None:
        super().__init__(message)
        self.kind = kind


class UnsupportedModule(PreparationError, ValueError):
    """A matched module has a class no LoRA layer wraps (a container, a norm...).

    Remedy: target its Linear / Embedding / Conv1D children instead.
    """

    kind = "unsupported_module"


class LoraBiasUnsupported(PreparationError, ValueError):
    """``lora_bias=True`` on a base layer that has no LoRA bias (e.g. Embedding)."""

    kind = "lora_bias_unsupported"


class MergeImpossible(PreparationError, RuntimeError):
    """Merging an adapter into its base layer cannot be done: a LoRA bias (``lora_bias=True``)
    has no base bias to be added to.  Reached when trl merges a passed-in PeftModel
    (``merge_and_unload``) before applying a new ``peft_config``.

    Remedy: pass a PeftModel without ``lora_bias``, or do not pass a ``peft_config`` with it.
    """

    kind = "merge_lora_bias_without_base_bias"


class SavedModuleIsLora(PreparationError, TypeError):
    """A modules_to_save entry names a module that already got LoRA (upstream matches
    modules_to_save by plain string suffix, e.g. ``"_proj"`` reaches ``q_proj``).

    Remedy: name the module to save by its full name or a dotted suffix that no target shares.
    """

    kind = "saved_module_is_lora"


class QuantizedInitUnsupported(PreparationError, TypeError):
    """``init_lora_weights="pissa"`` on a quantized base layer: PiSSA decomposes a float weight.

    Remedy: initialize PiSSA on the float model, then quantize the residual model.
    """

    kind = "pissa_quantized"


class LoftQNeedsScipy(PreparationError, ImportError):
    """``init_lora_weights="loftq"`` without scipy installed: peft's config checks for it
    (peft 0.15 - 0.21).  Remedy: install scipy."""

    kind = "loftq_needs_scipy"


_NO_CUDA = RuntimeError if torch.backends.cuda.is_built() else AssertionError
"""What torch raises when a tensor is moved to CUDA that is unavailable."""


class LoftQNeedsCuda(PreparationError, _NO_CUDA):
    """LoftQ with a bitsandbytes quantizer where CUDA is unavailable: peft computes it on CUDA
    whatever the model's device (torch's own error: an AssertionError on a CPU-only build, a
    RuntimeError otherwise).  Remedy: run on a CUDA machine."""

    kind = "loftq_needs_cuda"


class TokensOnLoraLayer(PreparationError, TypeError):
    """``trainable_token_indices`` on an embedding that ``target_modules`` already gave LoRA.

    Remedy: train the embedding's rows with trainable tokens or with LoRA, not both.
    """

    kind = "tokens_on_lora_layer"


class TokenIndexOutOfRange(PreparationError, IndexError):
    """A ``trainable_token_indices`` entry is not a row of the embedding (past the vocabulary).

    Remedy: resize the token embeddings first (``model.resize_token_embeddings``).
    """

    kind = "token_index_out_of_range"


class InvalidBias(PreparationError, NotImplementedError):
    """``bias`` is not one of ``none``, ``all``, ``lora_only``."""

    kind = "invalid_bias"


def builtin_class(exc: BaseException) -> str:
    """The nearest builtin class in ``exc``'s MRO: what both sides are compared on."""
    for cls in type(exc).__mro__:
        if cls.__module__ == "builtins":
            return cls.__name__
    return type(exc).__name__
