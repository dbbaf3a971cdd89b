"""Case features the known-divergence registry names: what *causes* an upstream behaviour.

A registry entry's ``when`` may name a case field (``quant.kind``) or a feature
(``feature.targets_reach_head``); its path and field regexes may hold a set feature as
a placeholder (``{widened_targets}``), which expands to an alternation of exactly those
module paths.  Features are computed once per case, lazily, from the case, the two
snapshots and the loaded model, with the reference's own target rules: an entry then
excuses a behaviour only where the behaviour's cause is present, and only on the modules
it reaches.
"""

from __future__ import annotations

import dataclasses
import re
import warnings
from typing import Any, Callable

from torch import nn

from conformance.engine.snapshot import Snapshot
from reference.config import LoraSettings, resolve
from reference.errors import PreparationError
from reference.peft_model import CLASSIFIER_NAMES, stored_config
from reference.prepare import is_bias_for_all
from reference.profiles import Profile
from reference.spec import ABSENT, Case
from reference.targets import is_saved, iter_targets, match_names
from strategies.inits import init_variant
from strategies.targets import target_kind

__all__ = ["CASE_ONLY", "FEATURES", "SET_FEATURES", "CaseContext"]

_MISSING = object()


class CaseContext:
    """One case and what its features are computed from; each feature is computed once."""

    def __init__(self, case: Case, reference: Snapshot | None = None, upstream: Snapshot | None = None,
                 profile: Profile | None = None, model: Callable[[], nn.Module] | None = None) -> None:
        self.case = case
        self.reference = reference
        self.upstream = upstream
        self._profile = profile
        self._model_factory = model
        self._model: nn.Module | None = None
        self._data = case.to_json()
        self._cache: dict[str, Any] = {}

    @property
    def profile(self) -> Profile:
        if self._profile is None:
            from reference import select_profile

            self._profile = select_profile()
        return self._profile

    @property
    def model(self) -> nn.Module:
        """The loaded model the case starts from (never to be changed)."""
        if self._model is None:
            if self._model_factory is not None:
                self._model = self._model_factory()
            else:
                from conformance.engine.models import cache_dir, pristine_model

                c = self.case
                self._model = pristine_model(c.model, c.quant, cache_dir(), device=c.training.device,
                                             via_checkpoint=c.training.level == "trl" and c.training.model_from_path)
        return self._model

    def value(self, key: str) -> Any:
        """A dotted case field (``"<absent>"`` when left out, ``"<none>"`` for null) or ``feature.<name>``."""
        if key.startswith("feature."):
            name = key.removeprefix("feature.")
            if name not in self._cache:
                self._cache[name] = FEATURES[name](self)
            return self._cache[name]
        value: Any = self._data
        for part in key.split("."):
            value = value.get(part, _MISSING) if isinstance(value, dict) else _MISSING
        if value is _MISSING:
            return "<absent>"
        if value is None:
            return "<none>"
        return tuple(value) if isinstance(value, list) else value

    def paths(self, name: str) -> frozenset[str]:
        key = "{" + name + "}"  # set features share the cache with scalar ones of the same name
        if key not in self._cache:
            self._cache[key] = SET_FEATURES[name](self)
        return self._cache[key]

    def expand(self, pattern: str) -> str:
        """``pattern`` with each ``{set_feature}`` replaced by an alternation of its escaped paths."""
        def sub(m: re.Match) -> str:
            paths = self.paths(m.group(1))
            return "(?:" + "|".join(re.escape(p) for p in sorted(paths)) + ")" if paths else "(?!)"

        return re.sub(r"\{(\w+)\}", sub, pattern)


# -- helpers ---------------------------------------------------------------------------------------


def _settings(ctx: CaseContext) -> LoraSettings | None:
    try:
        return resolve(ctx.case.adapter, ctx.profile)
    except PreparationError:
        return None


def _task_heads(ctx: CaseContext) -> tuple[str, ...]:
    return CLASSIFIER_NAMES if ctx.case.adapter.task_type in ("SEQ_CLS", "TOKEN_CLS") else ()


def _head_paths(model: nn.Module) -> set[str]:
    return {name for name, _ in model.named_modules()
            if name and name.split(".")[0] in CLASSIFIER_NAMES}


def _reached(ctx: CaseContext, saved: tuple[str, ...] = ()) -> list[str]:
    """The module names the targets reach by the reference's rules (excludes and layer filter
    applied), guarding only ``saved``; empty when the targets reach nothing or are invalid."""
    settings = _settings(ctx)
    if settings is None:
        return []
    try:
        return [t.name for t in iter_targets(ctx.model, settings, ctx.profile, saved)]
    except PreparationError:
        return []


# -- features for `when` ---------------------------------------------------------------------------


def _targets_reach_head(ctx: CaseContext) -> bool:
    """The targets reach a classification head (``classifier`` / ``score`` or a module inside it)
    when nothing but the user's own modules_to_save is guarded."""
    settings = _settings(ctx)
    guarded = tuple(settings.modules_to_save or ()) if settings else ()
    heads = _head_paths(ctx.model)
    return any(name in heads for name in _reached(ctx, guarded))


def _saved_module_quantized(ctx: CaseContext) -> bool:
    """A module to be trained in full (modules_to_save, the task's head, or the ``lm_head`` a trainer
    saves for a cloned chat template's tokens) holds a quantized parameter."""
    names = tuple(ctx.case.adapter.modules_to_save or ()) if ctx.case.adapter.modules_to_save is not ABSENT else ()
    names += _task_heads(ctx)
    if ctx.case.training.level == "trl" and ctx.case.training.chat_template == "tokenizer":
        names += ("lm_head",)
    for key, module in ctx.model.named_modules():
        if key and any(key.endswith(n) for n in names):
            if any(not p.dtype.is_floating_point for p in module.parameters()):
                return True
    return False


def _user_excludes_nothing(ctx: CaseContext, settings: LoraSettings) -> bool:
    """Neither ``exclude_modules`` nor the user's own ``modules_to_save`` keep any module from targeting."""
    saved = tuple(settings.modules_to_save or ())
    return not any(match_names(name, settings.exclude_modules) or is_saved(name, saved)
                   for name, _ in ctx.model.named_modules() if name)


def _exclude_given_excludes_nothing(ctx: CaseContext) -> bool:
    """``exclude_modules`` is given, yet only a task head guard keeps modules from targeting:
    the exclusions match no module and the user's modules_to_save guard none."""
    settings = _settings(ctx)
    return bool(settings is not None and settings.exclude_modules and _user_excludes_nothing(ctx, settings))


def _nothing_targeted_and_nothing_excluded(ctx: CaseContext) -> bool:
    """The targets reach no module (with no guard at all), and neither the exclusions nor the
    user's modules_to_save keep any module from targeting."""
    settings = _settings(ctx)
    return bool(settings is not None and not _reached(ctx) and _user_excludes_nothing(ctx, settings))


def _embedding_targeted(ctx: CaseContext) -> bool:
    snap = ctx.reference
    return snap is not None and any(m.kind == "embedding" for m in snap.lora)


def _trainable_besides_lora(ctx: CaseContext) -> bool:
    """The reference's prepared model trains a parameter that is no LoRA factor (a bias, a saved copy)."""
    snap = ctx.reference
    return snap is not None and any(p.requires_grad and "lora_" not in p.path for p in snap.params)


def _trainable_4bit_weight(ctx: CaseContext) -> bool:
    """The reference's prepared model trains a 4-bit packed weight (a saved copy of a layer whose
    4-bit storage dtype is a float, so nothing refused to make it trainable)."""
    snap = ctx.reference
    return snap is not None and any(p.requires_grad and p.cls == "Params4bit" for p in snap.params)


def _reentrant_checkpointing(ctx: CaseContext) -> bool:
    """The reference's prepared model checkpoints its blocks with torch's reentrant checkpoint
    (``use_reentrant=True``, what transformers and peft pass when the user gives no kwargs;
    kwargs without the key read as reentrant too, torch's default before 2.9)."""
    snap = ctx.reference
    if snap is None or snap.model is None or not snap.model.gradient_checkpointing:
        return False
    kwargs = dict(snap.model.gradient_checkpointing_kwargs or ())
    return kwargs.get("use_reentrant", "True") == "True"


def _relative_embeddings_trained(ctx: CaseContext) -> bool:
    """A side's prepared model trains a parameter of the relative position embeddings a DeBERTa
    encoder computes once, before its layers (``encoder.rel_embeddings``, and ``encoder.LayerNorm``,
    which deberta-v2 applies to them): a bias with bias="all", a saved copy.  The reference's
    snapshot decides, or upstream's where only upstream trains it (an inference-mode model whose
    biases peft leaves trainable)."""
    return any(snap is not None and any(p.requires_grad and re.search(r"(^|\.)encoder\.(rel_embeddings|LayerNorm)\.", p.path)
                                        for p in snap.params) for snap in (ctx.reference, ctx.upstream))


def _bias_mode_trains_a_bias(ctx: CaseContext) -> bool:
    """The bias mode has a bias to train: ``bias="all"`` and the model has a parameter the
    profile's naming rule calls a bias, or ``bias="lora_only"`` and a module the targets reach
    has a bias (the reference's rules: ``reference.prepare``)."""
    settings = _settings(ctx)
    if settings is None:
        return False
    if settings.bias == "all":  # (lora_bias adds LoRA B biases, which "all" trains too)
        return settings.lora_bias or any(is_bias_for_all(name, ctx.profile.bias_all_substring)
                                         for name, _ in ctx.model.named_parameters())
    if settings.bias == "lora_only":
        modules = dict(ctx.model.named_modules())
        guarded = tuple(settings.modules_to_save or ()) + _task_heads(ctx)
        return any(getattr(modules[name], "bias", None) is not None for name in _reached(ctx, guarded))
    return False


def _integer_bnb_weights(ctx: CaseContext) -> bool:
    """The model's bitsandbytes weights have an integer dtype (8-bit, or 4-bit packed in uint8; a
    float quant storage makes the packed weight a float tensor).  From the case alone, so that it
    holds where the reference rejects the case before building its layers."""
    q = ctx.case.quant
    return q.kind == "8bit" or (q.kind == "4bit" and q.quant_storage == "uint8")


def _tied_head_with_bias(ctx: CaseContext) -> bool:
    """The loaded model has a Linear sharing the input embedding's weight that carries a bias (a
    BERT-style LM head): what trainable tokens wrap as a tied output layer."""
    try:
        weight = ctx.model.get_input_embeddings().weight
    except (AttributeError, NotImplementedError):
        return False
    return any(isinstance(m, nn.Linear) and m.weight is weight and m.bias is not None for m in ctx.model.modules())


def _token_linear_with_bias(ctx: CaseContext) -> bool:
    """Trainable tokens wrap a Linear that carries a bias: a tied output layer (list form, or the
    dict form naming the input embedding), or a Linear the dict form names itself (codegen's
    ``lm_head``)."""
    from reference.tokens import is_dict_form, token_mapping

    indices = ctx.case.adapter.trainable_token_indices
    if indices in (ABSENT, None, ()):
        return False
    if not is_dict_form(indices):
        return _tied_head_with_bias(ctx)
    keys = tuple(token_mapping(indices))
    embedding = ctx.model.get_input_embeddings()
    for name, module in ctx.model.named_modules():
        if name and any(name == k or name.endswith("." + k) for k in keys):
            if module is embedding and _tied_head_with_bias(ctx):
                return True
            if isinstance(module, nn.Linear) and module.bias is not None:
                return True
    return False


def _layers_pattern_given(ctx: CaseContext) -> bool:
    return ctx.case.adapter.layers_pattern not in (ABSENT, None, "", ())


def _lora_dropout_given(ctx: CaseContext) -> bool:
    return ctx.case.adapter.lora_dropout not in (ABSENT, None, 0, 0.0)


def _scales(scale: object) -> bool:
    from conformance.numerics.emulate import scales

    return scales(scale)


FEATURES: dict[str, Callable[[CaseContext], Any]] = {
    "target_kind": lambda ctx: target_kind(ctx.case.adapter.target_modules),
    "targets_reach_head": _targets_reach_head,
    "saved_module_quantized": _saved_module_quantized,
    "exclude_given_excludes_nothing": _exclude_given_excludes_nothing,
    "nothing_targeted_and_nothing_excluded": _nothing_targeted_and_nothing_excluded,
    "embedding_targeted": _embedding_targeted,
    "layers_pattern_given": _layers_pattern_given,
    "bias_mode_trains_a_bias": _bias_mode_trains_a_bias,
    "init_variant": lambda ctx: init_variant(ctx.case.adapter.init_lora_weights),
    "tied_head_with_bias": _tied_head_with_bias,
    "token_linear_with_bias": _token_linear_with_bias,
    # an embed_scale of 1 (bart without scale_embedding) scales nothing: no scale to lose
    "scaled_input_embedding": lambda ctx: _scales(getattr(ctx.model.get_input_embeddings(), "embed_scale", None)),
    "bare_parameter_adapters": lambda ctx: bool(ctx.value("feature.trainable_tokens")
                                                or ctx.value("feature.embedding_targeted")),
    "moe_converted": lambda ctx: _moe_converted(ctx),
    "tied_factors_upcast": lambda ctx: _tied_factors_upcast(ctx),
    "ties_targets": lambda ctx: _ties_targets(ctx),
    "parameter_targets": lambda ctx: ctx.case.adapter.target_parameters not in (ABSENT, None, ()) or _moe_converted(ctx),
    # (_moe_converted loads the model only for the fused families' types)
    "trainable_tokens": lambda ctx: ctx.case.adapter.trainable_token_indices not in (ABSENT, None, ()),
    "conv1d_targeted": lambda ctx: bool(ctx.paths("conv1d_lora_modules")),
    "integer_bnb_weights": _integer_bnb_weights,
    "lora_dropout_given": _lora_dropout_given,
    "targets_inside_saved": lambda ctx: bool(ctx.paths("targets_inside_saved")),
    "saved_with_lora_inside": lambda ctx: _saved_with_lora_inside(ctx),
    "trainable_besides_lora": _trainable_besides_lora,
    "trainable_4bit_weight": _trainable_4bit_weight,
    "reentrant_checkpointing": _reentrant_checkpointing,
    "relative_embeddings_trained": _relative_embeddings_trained,
}
"""Scalar features for ``when``; each is documented by its function."""


# -- set features for placeholders -----------------------------------------------------------------


def _without(facts: Any, names: tuple[str, ...]) -> tuple:
    return tuple((f.name, getattr(facts, f.name)) for f in dataclasses.fields(facts) if f.name not in names)


def _without_path(facts: Any) -> tuple:
    return _without(facts, ("path",))


def _relative(params: dict[str, Any], prefix: str, skip: tuple[str, ...] = ("path",)) -> dict[str, tuple]:
    """The parameter facts under module ``prefix`` (less the ``skip`` fields), keyed by their path below it."""
    return {p[len(prefix) + 1:]: _without(f, skip) for p, f in params.items() if p.startswith(prefix + ".")}


def _seeded(ctx: CaseContext) -> bool:
    from conformance.engine.runner import seeded_values

    return seeded_values(ctx.case)


def _widened_targets(ctx: CaseContext) -> frozenset[str]:
    """Modules a regex target does not match but whose leaf name is the leaf name of one it
    matches (not excluded, not saved): what resolving the regex to leaf names adds.  A module
    counts only when upstream prepared it exactly as the reference prepared a matched module
    of the same leaf name (the same LoRA facts and parameter facts, below the module path), so
    a fault on a widened module still shows."""
    settings = _settings(ctx)
    if settings is None or not isinstance(settings.target_modules, str) or settings.target_modules == "all-linear":
        return frozenset()
    saved = tuple(settings.modules_to_save or ()) + _task_heads(ctx)
    matched = set(_reached(ctx, saved))
    leaves = {name.rsplit(".", 1)[-1] for name in matched}
    ref, up = ctx.reference, ctx.upstream
    if ref is None or up is None:
        return frozenset()
    ref_lora, up_lora = {m.path: m for m in ref.lora}, {m.path: m for m in up.lora}
    ref_params, up_params = {p.path: p for p in ref.params}, {p.path: p for p in up.params}
    # OLoRA, PiSSA and LoftQ leave each module's own residual in its base weight: values differ per module
    # (and seeded trained values, fingerprinted where a passed-in adapter's are compared, are seeded per path)
    per_module = init_variant(ctx.case.adapter.init_lora_weights) in ("olora", "pissa", "pissa_niter", "loftq") \
        or _seeded(ctx)
    skip = ("path", "value") if per_module else ("path",)
    out = set()
    for name, _ in ctx.model.named_modules():
        if not name or name in matched or name.rsplit(".", 1)[-1] not in leaves:
            continue
        if match_names(name, settings.exclude_modules) or is_saved(name, saved) or name not in up_lora:
            continue
        siblings = [m for m in matched if m.rsplit(".", 1)[-1] == name.rsplit(".", 1)[-1] and m in ref_lora]
        if any(_without_path(ref_lora[s]) == _without_path(up_lora[name])
               and _relative(ref_params, s, skip) == _relative(up_params, name, skip) for s in siblings):
            out.add(name)
    return frozenset(out)


def _parameter_targets(ctx: CaseContext) -> tuple[set[str], set[str]]:
    """(module names, parameter keys) the reference's prepared model put LoRA on."""
    modules, keys = set(), set()
    for m in (ctx.reference.lora if ctx.reference is not None else ()):
        if m.kind.startswith("parameter:"):
            keys.add(re.sub(r"(\.base_layer)+$", "", m.path) + "." + m.kind.split(":", 1)[1])
        else:
            modules.add(m.path)
    return modules, keys


def _rewrapped_parameter_paths(ctx: CaseContext) -> frozenset[str]:
    """LoRA module paths where both sides wrap a parameter, but not the same one, and upstream's
    wrapper there scales as the reference's wrapper of *that* parameter on the same module does
    (so a wrong scaling still shows)."""
    if ctx.reference is None or ctx.upstream is None:
        return frozenset()

    def owner(path: str) -> str:
        return re.sub(r"(\.base_layer)+$", "", path)

    def scalings(m: Any) -> dict:
        return {name: a.scaling for name, a in m.adapters}

    ref_by_kind = {(owner(m.path), m.kind): m for m in ctx.reference.lora}
    up = {m.path: m for m in ctx.upstream.lora}
    out = set()
    for m in ctx.reference.lora:
        other = up.get(m.path)
        if other is None or not m.kind.startswith("parameter:") or not other.kind.startswith("parameter:"):
            continue
        same = ref_by_kind.get((owner(m.path), other.kind))
        if other.kind != m.kind and same is not None and scalings(same) == scalings(other):
            out.add(m.path)
    return frozenset(out)


def _pattern_kinds_on_parameters_only(ctx: CaseContext) -> frozenset[str]:
    """``rank_pattern`` / ``alpha_pattern`` when one of its keys (as the reference stored them)
    reaches a targeted parameter and no targeted module."""
    snap = ctx.reference
    if snap is None or snap.peft is None:
        return frozenset()
    modules, keys = _parameter_targets(ctx)
    config = dict(snap.peft.adapter_config)
    out = set()
    for kind in ("rank_pattern", "alpha_pattern"):
        for key, _ in config.get(kind) or ():
            on_params = any(re.match(rf"(.*\.)?({key})$", n) for n in keys)
            if on_params and not any(re.match(rf"(.*\.)?({key})$", n) for n in modules):
                out.add(kind)
    return frozenset(out)


def _ties_targets(ctx: CaseContext) -> bool:
    """``ensure_weight_tying`` acts through the targets: a module is tied to the input embedding and
    the targets name an embedding (``reference.tying``)."""
    from reference.tying import plan_tying

    settings = _settings(ctx)
    if settings is None or not settings.ensure_weight_tying:
        return False
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return bool(plan_tying(ctx.model, settings).targets)


def _tied_lora_factor_groups(ctx: CaseContext) -> frozenset[str]:
    """The reference's groups of tensors sharing storage that hold LoRA factors (``ensure_weight_tying``)."""
    snap = ctx.reference
    if snap is None or snap.model is None:
        return frozenset()
    return frozenset(g for g in snap.model.shared_storage if ".lora_" in g)


def _tied_factors_upcast(ctx: CaseContext) -> bool:
    """Tied LoRA factors next to a half-precision input embedding, with ``autocast_adapter_dtype`` on:
    the adapter dtype policy upcasts them to fp32."""
    snap = ctx.reference
    if snap is None or not _tied_lora_factor_groups(ctx) or ctx.case.training.autocast_adapter_dtype is False:
        return False
    bases = [p for p in snap.params if re.search(r"\.base_layer\.weight$", p.path)
             and any(p.path[: -len(".base_layer.weight")] + ".lora_embedding" in g for g in snap.model.shared_storage)]
    return any(p.dtype in ("float16", "bfloat16") for p in bases)


def _moe_converted(ctx: CaseContext) -> bool:
    """The reference converted the case's targets for fused experts (``reference.params``)."""
    from reference.params import convert_moe_targets
    from reference.targets import effective_targets

    from reference.params import FAMILY_OF

    settings = _settings(ctx)
    if settings is None or not ctx.profile.moe_conversion or ctx.case.model.model_type not in FAMILY_OF:
        return False
    try:
        resolved = effective_targets(ctx.model, settings, ctx.profile)
        return convert_moe_targets(ctx.model, resolved, settings.r, settings.lora_alpha, settings.rank_pattern,
                                   settings.alpha_pattern,
                                   resolved if settings.target_modules == "all-linear" else None) is not None
    except PreparationError as exc:
        return exc.kind == "moe_fused_half"


def _targets_inside_saved(ctx: CaseContext) -> frozenset[str]:
    """Modules the targets match that lie strictly inside a modules_to_save entry (which guards
    them): a module that *is* the entry is saved whole, no stray layer is attached to it."""
    out: set[str] = set()
    settings = _settings(ctx)
    if settings is not None and settings.modules_to_save:
        names = tuple(settings.modules_to_save)
        inside = set(_reached(ctx)) - set(_reached(ctx, names))
        out |= {k for k in inside if "." in k and is_saved(k.rpartition(".")[0], names)}
    if ctx.case.second_adapter is not None:  # the second adapter's own targets and saved modules
        try:
            second = resolve(ctx.case.second_adapter, ctx.profile)
        except PreparationError:
            second = None
        if second is not None and second.modules_to_save:
            names = tuple(second.modules_to_save)
            inside = set(_reached_by(ctx, second, ())) - set(_reached_by(ctx, second, names))
            out |= {k for k in inside if "." in k and is_saved(k.rpartition(".")[0], names)}
    return frozenset(out)


def _reached_by(ctx: CaseContext, settings: LoraSettings, saved: tuple[str, ...]) -> list[str]:
    try:
        return [t.name for t in iter_targets(ctx.model, settings, ctx.profile, saved)]
    except PreparationError:
        return []


def _saved_with_lora_inside(ctx: CaseContext) -> bool:
    """The targets reach a module strictly inside a module that is saved (a ``modules_to_save``
    entry or, with a classification task, its head), guarding only what the profile guards while
    targets are resolved: where peft 0.15 leaves LoRA inside the saved copy."""
    settings = _settings(ctx)
    if settings is None:
        return False
    names = tuple(settings.modules_to_save or ()) + _task_heads(ctx)
    guarded = tuple(settings.modules_to_save or ()) + (
        _task_heads(ctx) if (settings.task_type or "") in ctx.profile.guarded_task_heads else ())
    inside = set(_reached(ctx, guarded)) - set(_reached(ctx, names))
    return any("." in k and is_saved(k.rpartition(".")[0], names) for k in inside)


def _resolved_config_fields(ctx: CaseContext) -> frozenset[str]:
    """The adapter-config fields that preparation stores resolved (the reference's stored config
    differs from the config as given): what a LoraConfig mutated in place may show."""
    from conformance.engine.facts import normalise_config

    settings, snap = _settings(ctx), ctx.reference
    if settings is None or snap is None or snap.peft is None:
        return frozenset()
    given = stored_config(settings, settings.target_modules, settings.fan_in_fan_out, task_heads=False)
    stored = dict(snap.peft.adapter_config)
    return frozenset(k for k, v in normalise_config(given) if k in stored and stored[k] != v)


def _bnb_lora_modules(ctx: CaseContext) -> frozenset[str]:
    """The reference's LoRA modules around a bitsandbytes 8-bit or 4-bit base layer."""
    snap = ctx.reference
    return frozenset(m.path for m in snap.lora if m.kind in ("bnb4bit", "bnb8bit")) if snap is not None else frozenset()


def _lora_modules(ctx: CaseContext) -> frozenset[str]:
    """The reference's LoRA modules, whatever their base layer."""
    snap = ctx.reference
    return frozenset(m.path for m in snap.lora) if snap is not None else frozenset()


def _conv1d_lora_modules(ctx: CaseContext) -> frozenset[str]:
    """The reference's LoRA modules around a transformers ``Conv1D`` (weight stored (in, out))."""
    snap = ctx.reference
    return frozenset(m.path for m in snap.lora if m.kind == "conv1d") if snap is not None else frozenset()


CASE_ONLY = frozenset({"target_kind", "layers_pattern_given", "lora_dropout_given", "init_variant", "trainable_tokens",
                       "integer_bnb_weights"})
"""Features computed from the case alone (no model, no snapshot): a ``when`` checks them first."""


SET_FEATURES: dict[str, Callable[[CaseContext], frozenset[str]]] = {
    "bnb_lora_modules": _bnb_lora_modules,
    "lora_modules": _lora_modules,
    "conv1d_lora_modules": _conv1d_lora_modules,
    "widened_targets": _widened_targets,
    "pattern_kinds_on_parameters_only": _pattern_kinds_on_parameters_only,
    "tied_lora_factor_groups": _tied_lora_factor_groups,
    "rewrapped_parameter_paths": _rewrapped_parameter_paths,
    "targets_inside_saved": _targets_inside_saved,
    "resolved_config_fields": _resolved_config_fields,
}
"""Set features for ``{placeholders}`` in an entry's path and field regexes."""


# The features of resumed and several-adapter cases live beside these (conformance.engine.features_adapters);
# imported last, since they build on this module's helpers.
from conformance.engine.features_adapters import (  # noqa: E402
    ADAPTER_CASE_ONLY,
    ADAPTER_FEATURES,
    ADAPTER_SET_FEATURES,
)

FEATURES.update(ADAPTER_FEATURES)
SET_FEATURES.update(ADAPTER_SET_FEATURES)
CASE_ONLY = CASE_ONLY | ADAPTER_CASE_ONLY
