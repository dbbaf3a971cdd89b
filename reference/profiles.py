"""Profiles: the behaviour of one range of upstream versions.

A profile holds every rule that changed between upstream releases, so a change
lives in exactly one place.  :func:`select_profile` picks one from installed
versions (read from package metadata; peft and trl are never imported) and a
user can force one by name.
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Mapping

from reference.versions import installed_versions, release

__all__ = ["PROFILES", "Profile", "installed_versions", "peft_selection_note", "select_profile"]

_QV = ("q_proj", "v_proj")

# The per-model-type default targets that peft applies when `target_modules` is
# None.  Documented in peft's `TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING`;
# peft 0.15 is the seed era.  A type absent here has no default: get_peft_model
# must be given explicit targets.
_DEFAULT_TARGETS_0_15: dict[str, tuple[str, ...] | str] = {
    "t5": ("q", "v"),
    "mt5": ("q", "v"),
    "bart": _QV,
    "gpt2": ("c_attn",),
    "bloom": ("query_key_value",),
    "blip-2": ("q", "v", "q_proj", "v_proj"),
    "opt": _QV,
    "gptj": _QV,
    "gpt_neox": ("query_key_value",),
    "gpt_neo": _QV,
    "bert": ("query", "value"),
    "roberta": ("query", "value"),
    "xlm-roberta": ("query", "value"),
    "electra": ("query", "value"),
    "deberta-v2": ("query_proj", "value_proj"),
    "deberta": ("in_proj",),
    "layoutlm": ("query", "value"),
    "llama": _QV,
    "chatglm": ("query_key_value",),
    "gpt_bigcode": ("c_attn",),
    "mpt": ("Wqkv",),
    "RefinedWebModel": ("query_key_value",),
    "RefinedWeb": ("query_key_value",),
    "falcon": ("query_key_value",),
    "btlm": ("c_proj", "c_attn"),
    "codegen": ("qkv_proj",),
    "mistral": _QV,
    "mixtral": _QV,
    "stablelm": _QV,
    "phi": ("q_proj", "v_proj", "fc1", "fc2"),
    "gemma": _QV,
    "gemma2": _QV,
    "qwen2": _QV,
}

# Each table is the previous one plus the families that peft release added (read from
# peft's TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING of each release).
# peft 0.16.0: llama4, gemma3_text, qwen3.
_DEFAULT_TARGETS_0_16: dict[str, tuple[str, ...] | str] = {
    **_DEFAULT_TARGETS_0_15,
    "llama4": _QV,
    "gemma3_text": _QV,
    "qwen3": _QV,
}
# peft 0.18.0: rwkv, rwkv7.
_DEFAULT_TARGETS_0_18: dict[str, tuple[str, ...] | str] = {
    **_DEFAULT_TARGETS_0_16,
    "rwkv": ("key", "value", "receptance", "output"),
    "rwkv7": ("r_proj", "k_proj", "v_proj", "o_proj", "key", "value"),
}
# peft 0.19.0: gemma4 (a regex on the language model's attention).
_DEFAULT_TARGETS_0_19: dict[str, tuple[str, ...] | str] = {
    **_DEFAULT_TARGETS_0_18,
    "gemma4": r".*language_model\..*\.(q_proj|v_proj)",
}
# peft 0.20.0: nemotron_h.  Unchanged in 0.21.
_DEFAULT_TARGETS_0_20: dict[str, tuple[str, ...] | str] = {
    **_DEFAULT_TARGETS_0_19,
    "nemotron_h": ("q_proj", "k_proj", "v_proj", "o_proj"),
}
_DEFAULT_TARGETS_0_21 = _DEFAULT_TARGETS_0_20


@dataclass(frozen=True)
class Profile:
    """One upstream era's behaviour."""

    name: str
    peft: str
    """The peft versions it covers, as a PEP 440 specifier."""
    description: str
    default_targets: Mapping[str, tuple[str, ...] | str]
    lora_defaults: Mapping[str, object] = field(
        default_factory=lambda: MappingProxyType(
            {
                "r": 8,
                "lora_alpha": 8,
                "lora_dropout": 0.0,
                "bias": "none",
                "use_rslora": False,
                "use_dora": False,
                "inference_mode": False,
                "trainable_token_indices": None,
                "ensure_weight_tying": False,
                "init_lora_weights": True,
                "fan_in_fan_out": False,
                "lora_bias": False,
            }
        )
    )
    """``LoraConfig`` defaults for the fields the reference models."""
    autocast_adapter_dtype_default: bool = True
    gradient_checkpointing_default: bool = True
    """``prepare_model_for_kbit_training(use_gradient_checkpointing=...)`` default."""
    adapter_dtype_follows_4bit_compute: bool = True
    """New factors on a bnb 4-bit layer follow its compute dtype (peft >= 0.19, PR #2893,
    issue #2889; before, the uint8 weight dtype was not a float, so they stayed fp32 even
    with ``autocast_adapter_dtype=False``: observed on 0.15.2 and 0.18.1)."""
    embedding_keeps_fan_in_fan_out: bool = True
    """An Embedding LoRA layer records the shared ``fan_in_fan_out`` flag (peft >= 0.19,
    where LoRA layers are built from the LoraConfig; peft 0.15 - 0.18 drop the flag for
    embeddings, so they record False)."""
    warns_lora_bias_without_base_bias: bool = True
    """The ``lora_bias`` on a bias-less layer warning exists (peft >= 0.18)."""
    warns_unused_patterns: bool = True
    """rank_pattern / alpha_pattern keys that matched nothing are reported (peft >= 0.21)."""
    guarded_task_heads: tuple[str, ...] = ("SEQ_CLS", "TOKEN_CLS")
    """Task types whose classification head is known to be trained in full *before*
    targets are resolved, so it never gets LoRA.  peft 0.15 adds the heads only after
    injecting LoRA (for every task type), so LoRA lands in them and the saved copy
    carries it.  (peft 0.16+ does so for TOKEN_CLS only, and then crashes: a known
    divergence, not a profile rule.)"""
    saved_guard_counts_as_excluded: bool = True
    """A module skipped because it is (inside) a modules_to_save entry counts as
    "excluded" for the unused-exclude_modules warning (peft >= 0.16)."""
    layer_index_regex: str = r".*?\.[^.]*\.(\d+)\."
    """Without layers_pattern: where the layer index of a name is.  peft >= 0.20 takes the
    first digit segment after two leading segments; peft 0.15 - 0.19's greedy ``.*`` took the
    *last* (t5's ``block.0.layer.1`` is layer 1 there, layer 0 now)."""
    layer_pattern_regex: str = r"(?:^|.*?\.){pattern}\.(\d+)\."
    """With layers_pattern (``{pattern}`` is substituted, as a regex)."""
    saved_module_may_be_lora: bool = False
    """A modules_to_save entry may wrap a module that already got LoRA (peft 0.15);
    later that is a TypeError."""
    bias_all_substring: bool = False
    """``bias="all"`` trains every parameter whose name *contains* "bias" (peft 0.15 - 0.20,
    e.g. DeBERTa's ``q_bias``, t5's ``relative_attention_bias.weight``: observed on 0.15.2,
    0.18.1 and 0.19.0, in 0.16.0 - 0.20.0's source); peft 0.21 (PR #3490, "Refactor state dict
    handling") trains only names that are or end with ``.bias``."""
    features: tuple[str, ...] = ("use_dora", "inference_mode", "trainable_token_indices", "target_parameters",
                                 "ensure_weight_tying")
    """The ``LoraConfig`` features beyond the base fields that this era has and the reference
    models: the strategies draw only these, and the run header lists them."""
    init_variants: tuple[str, ...] = ("olora", "pissa", "orthogonal", "pissa_niter", "loftq")
    """The ``init_lora_weights`` strings beyond ``"gaussian"`` this era knows and the reference
    models (``reference.inits``; ``pissa_niter`` stands for ``"pissa_niter_K"``); others are
    unknown inits.  ``"orthogonal"`` came with peft 0.17 (absent from 0.16.0's source, present in
    0.17.0's); ``pissa_niter`` and ``loftq`` are in 0.15.2 and 0.21.2."""
    loftq_quantizers: tuple[tuple[int, str], ...] = ((4, "nf4"), (8, "int8"))
    """LoftQ's (``loftq_bits``, quantizer) pairs (``reference.loftq``): peft 0.20 removed its own
    normal-float quantizer (2 and 8 bits) for bitsandbytes' nf4 and int8 (0.15.2's and 0.21.2's
    source; 0.16 - 0.19 assumed to be 0.15's)."""
    dora_bnb_update_rounded_first: bool = False
    """A bitsandbytes layer rounds its DoRA update to the base output's dtype before adding it,
    as it does a plain LoRA update (peft 0.15); peft 0.16's LoRA variants round the sum once."""
    dora_norm_update_in_input_dtype: bool = True
    """DoRA's forward casts ``B @ A`` to the layer input's dtype before scaling it into the
    weight norm, so under autocast the scaled update is not rounded to the autocast dtype
    (huggingface/peft PR #2661, in 0.19.0; 0.15.2 - 0.18.1 scale the autocast-dtype product:
    their sources; observed on 0.15.2 and 0.21.2 as bit-exact bf16-autocast gradients)."""
    add_adapter_autocasts: bool = True
    """``add_adapter`` upcasts the new adapter's half-precision factors to fp32 (its own
    ``autocast_adapter_dtype=True``, peft >= 0.19; before, they kept the base's dtype, observed on
    0.15.2 and 0.18.1: ``reference.adapters``)."""
    moe_conversion: bool = True
    """With transformers 5, the targets of a fused-expert MoE model are converted to keep their
    transformers-4 meaning: expert projections and the router become ``target_parameters``
    (``reference.params``; peft >= 0.19, where 0.19.0 splits a string target: registered)."""
    merge_unties_diverged_embeddings: bool = True
    """``merge_and_unload`` on a model whose config says its embeddings are tied, but whose
    output embedding no longer shares the input embedding's weight (a trained modules_to_save
    copy of ``lm_head`` replaced it), writes ``tie_word_embeddings=False`` into the config and
    warns (peft >= 0.19; observed on 0.19.0 and 0.21.2, absent from 0.18.1's source)."""


# One profile per range of peft releases whose rules agree; each profile after the seed is
# the previous one with the rules that release changed (written once, here).  Verified by
# the conformance suite on peft 0.15.2 (seed), 0.18.1, 0.19.0 and 0.21.2 (current); the
# 0.16 - 0.17 entries are read from those releases' sources.
_SEED = Profile(
    name="seed",
    peft=">=0.15,<0.16",
    description="peft 0.15 (seed era, with trl 0.19 / transformers 4.53)",
    default_targets=MappingProxyType(_DEFAULT_TARGETS_0_15),
    adapter_dtype_follows_4bit_compute=False,
    embedding_keeps_fan_in_fan_out=False,
    warns_lora_bias_without_base_bias=False,
    warns_unused_patterns=False,
    guarded_task_heads=(),
    saved_guard_counts_as_excluded=False,
    layer_index_regex=r".*\.[^.]*\.(\d+)\.",
    layer_pattern_regex=r".*\.{pattern}\.(\d+)\.",
    saved_module_may_be_lora=True,
    bias_all_substring=True,
    merge_unties_diverged_embeddings=False,
    dora_bnb_update_rounded_first=True,
    dora_norm_update_in_input_dtype=False,
    init_variants=("olora", "pissa", "pissa_niter", "loftq"),
    loftq_quantizers=((2, "normal-float"), (4, "nf4"), (8, "normal-float")),
    features=("use_dora", "inference_mode", "trainable_token_indices"),
    moe_conversion=False,
    add_adapter_autocasts=False,
)
# peft 0.16.0: SEQ_CLS heads guarded before targeting,
# modules_to_save over a LoRA layer is a TypeError, new default-target
# families (see the 0.15 notes, docs/spec/).  The greedy layer-index regexes stay until 0.20.
_PEFT_0_16 = dataclasses.replace(
    _SEED,
    name="peft-0.16",
    peft=">=0.16,<0.17",
    description="peft 0.16",
    default_targets=MappingProxyType(_DEFAULT_TARGETS_0_16),
    guarded_task_heads=("SEQ_CLS", "TOKEN_CLS"),
    saved_guard_counts_as_excluded=True,
    saved_module_may_be_lora=False,
    dora_bnb_update_rounded_first=False,
)
# peft 0.17.0: target_parameters (ParamWrapper, fused MoE experts); init_lora_weights="orthogonal".
_PEFT_0_17 = dataclasses.replace(
    _PEFT_0_16,
    name="peft-0.17",
    peft=">=0.17,<0.18",
    description="peft 0.17",
    features=("use_dora", "inference_mode", "trainable_token_indices", "target_parameters"),
    init_variants=Profile.init_variants,
)
# peft 0.18.0: the "lora_bias=True but the targeted layer has no bias" warning; rwkv defaults;
# ensure_weight_tying (absent from 0.17.1's source, present in 0.18.0's).
_PEFT_0_18 = dataclasses.replace(
    _PEFT_0_17,
    name="peft-0.18",
    peft=">=0.18,<0.19",
    description="peft 0.18",
    default_targets=MappingProxyType(_DEFAULT_TARGETS_0_18),
    warns_lora_bias_without_base_bias=True,
    features=Profile.features,
)
# peft 0.19.0: LoRA layers are built from the LoraConfig, so an Embedding layer records the
# shared fan_in_fan_out flag (0.18 dropped it from the embedding kwargs: observed False);
# new factors on a bnb 4-bit layer follow its compute dtype, so autocast_adapter_dtype=False keeps
# e.g. fp16 factors (huggingface/peft PR #2893, issue #2889; 0.16 - 0.18 read the uint8 storage
# dtype and kept fp32: observed on 0.18.1, and 0.16.0's source has no compute-dtype branch);
# gemma4 defaults.  (peft 0.19 also converts MoE configs for transformers 5: registry entries.)
_PEFT_0_19 = dataclasses.replace(
    _PEFT_0_18,
    name="peft-0.19",
    peft=">=0.19,<0.20",
    description="peft 0.19",
    default_targets=MappingProxyType(_DEFAULT_TARGETS_0_19),
    embedding_keeps_fan_in_fan_out=True,
    adapter_dtype_follows_4bit_compute=True,
    merge_unties_diverged_embeddings=True,
    dora_norm_update_in_input_dtype=True,
    moe_conversion=True,
    add_adapter_autocasts=True,  # add_adapter(..., autocast_adapter_dtype=True)
)
# peft 0.20.0: LoftQ quantizes with bitsandbytes only (nf4, int8; its normal-float quantizer is gone);
# the layer index is the *first* digit segment after two leading segments (lazy
# `.*?`; before, the greedy `.*` took the last one, e.g. an MoE expert index instead of the
# layer: huggingface/peft PR #3028 discussion); nemotron_h defaults.
_PEFT_0_20 = dataclasses.replace(
    _PEFT_0_19,
    name="peft-0.20",
    peft=">=0.20,<0.21",
    description="peft 0.20",
    default_targets=MappingProxyType(_DEFAULT_TARGETS_0_20),
    layer_index_regex=r".*?\.[^.]*\.(\d+)\.",
    layer_pattern_regex=r".*?\.{pattern}\.(\d+)\.",
    loftq_quantizers=Profile.loftq_quantizers,
)
# peft 0.21.0: bias="all" by name suffix (PR #3490; 0.16 - 0.20 still matched "bias" anywhere in the
# name, observed on 0.18.1 and 0.19.0); unused rank_pattern / alpha_pattern keys warn ("did not match any targeted
# module"); a layers_pattern may start the module name (`(?:^|.*?\.)`, peft issue #3610).
_CURRENT = dataclasses.replace(
    _PEFT_0_20,
    name="current",
    peft=">=0.21",
    description="peft 0.21 (current: peft 0.21.2 with trl 1.16 / transformers 5.23)",
    default_targets=MappingProxyType(_DEFAULT_TARGETS_0_21),
    warns_unused_patterns=True,
    bias_all_substring=False,
    layer_index_regex=Profile.layer_index_regex,
    layer_pattern_regex=Profile.layer_pattern_regex,
)

PROFILES: dict[str, Profile] = {p.name: p for p in (_SEED, _PEFT_0_16, _PEFT_0_17, _PEFT_0_18, _PEFT_0_19, _PEFT_0_20, _CURRENT)}

_NEWEST = "current"
_NEWEST_KNOWN_PEFT = (0, 21)


def peft_selection_note(version: str) -> str | None:
    """Why the profile for peft ``version`` is a guess (newer than the newest known profile),
    or None when a profile covers it."""
    found = release(version)
    if found and found[:2] > _NEWEST_KNOWN_PEFT:
        return (
            f"peft {version} is newer than the newest known profile "
            f"({_NEWEST!r}, peft <= {'.'.join(map(str, _NEWEST_KNOWN_PEFT))}); using it anyway"
        )
    if found and found[:2] < (0, 15):
        return f"peft {version} is older than the oldest known profile ('seed', peft >= 0.15); using it anyway"
    return None


def select_profile(name: str | None = None, versions: Mapping[str, str] | None = None) -> Profile:
    """The profile named ``name``, or the one matching the installed peft version.

    A peft newer than the newest known profile selects it with a warning (the same text
    :func:`reference.selection.selection_notes` gives the header)."""
    if name is not None:
        if name not in PROFILES:
            raise ValueError(f"profile={name!r} is not one of {', '.join(PROFILES)}")
        return PROFILES[name]
    versions = dict(versions or installed_versions())
    peft = release(versions.get("peft", "absent"))
    if not peft:
        return PROFILES[_NEWEST]
    note = peft_selection_note(versions["peft"])
    if note:
        warnings.warn(note, stacklevel=2)
    for profile in PROFILES.values():
        if _in_range(peft, profile.peft):
            return profile
    return PROFILES["seed"] if peft < (0, 16) else PROFILES[_NEWEST]


def _in_range(version: tuple[int, ...], spec: str) -> bool:
    """``version`` (release numbers) within a profile's ``>=A,<B`` specifier (release tuples, so pre-releases
    and local builds of a version count as that version)."""
    for clause in spec.split(","):
        clause = clause.strip()
        op = clause[:2] if clause[:2] in (">=", "<=", "==") else clause[:1]
        bound = release(clause[len(op):])
        value = version[: len(bound)] if op != "<" else version
        if not {">=": value >= bound, "<=": value <= bound, "==": value == bound, ">": value > bound,
                "<": version < bound}[op]:
            return False
    return True
