"""Which modules get a LoRA adapter, and with which rank and alpha.

Names are the dotted paths of ``model.named_modules()`` on the transformers
model.  The rules (peft's documented behaviour):

* a string target is a regex that must match the *whole* name;
* a list matches a name exactly, or as a dotted suffix (``q_proj`` matches
  ``model.layers.0.self_attn.q_proj`` but not ``...xq_proj``);
* ``"all-linear"`` is the full name of every Linear / Conv1D except the output head;
* ``exclude_modules`` uses the same two rules and wins over targets, and so does
  being (inside) a modules-to-save entry;
* ``layers_to_transform`` keeps only suffix-matched names whose layer index (the
  number after ``layers_pattern``, or after any two leading segments) is listed;
* ``rank_pattern`` / ``alpha_pattern`` keys are regexes matched against a
  dot-bounded suffix of the name; the first key in the user's order wins.
"""

from __future__ import annotations

import re
from typing import Iterable, Iterator

from torch import nn

from reference.config import LoraSettings
from reference.errors import NoDefaultTargets, NoTargetMatched
from reference.notices import warn
from reference.profiles import Profile

__all__ = ["Target", "effective_targets", "is_linear_like", "is_saved", "iter_targets", "match_names", "pattern_value",
           "warn_unused"]


def is_linear_like(module: nn.Module) -> bool:
    """nn.Linear (bitsandbytes' layers subclass it) or transformers' Conv1D."""
    return isinstance(module, nn.Linear) or (
        type(module).__name__ == "Conv1D" and type(module).__module__.startswith("transformers")
    )


def match_names(key: str, names: object) -> bool:
    """The shared matching rule of ``target_modules`` and ``exclude_modules``."""
    return _match(key, names) is not None


def _match(key: str, names: object) -> str | None:
    """``"regex"``, ``"exact"`` or ``"suffix"``: how ``key`` matched, or None."""
    if names is None:
        return None
    if isinstance(names, str):
        return "regex" if re.fullmatch(names, key) is not None else None
    if key in names:
        return "exact"
    return "suffix" if any(key.endswith("." + name) for name in names) else None


def is_saved(key: str, saved_names: Iterable[str]) -> bool:
    """Whether ``key`` is a modules-to-save entry or inside one: the entry must be a whole
    run of dotted segments (it is used as a regex, as upstream does)."""
    return any(re.match(rf"(^|.*\.){name}($|\..*)", key) for name in saved_names)


def _layer_index(key: str, patterns: tuple[str, ...] | None, profile: Profile) -> int | None:
    # The profile holds the index regexes: peft 0.15 and 0.16+ differ (first vs last index).
    if not patterns:
        found = re.match(profile.layer_index_regex, key)
    else:
        found = None
        for pattern in patterns:
            found = re.match(profile.layer_pattern_regex.replace("{pattern}", pattern), key)
            if found is not None:
                break
    return int(found.group(1)) if found is not None else None


def _in_layers(key: str, settings: LoraSettings, profile: Profile) -> bool:
    index = _layer_index(key, settings.layers_pattern, profile)
    return index is not None and index in settings.layers_to_transform


def pattern_value(key: str, pattern: tuple[tuple[str, object], ...], default: object) -> object:
    """The value of the first key (in the user's order) that matches a dot-bounded
    suffix of ``key`` as a regex, else ``default``."""
    for name, value in pattern:
        if re.match(rf"(.*\.)?({name})$", key):
            return value
    return default


def _output_head_name(model: nn.Module) -> str | None:
    get = getattr(model, "get_output_embeddings", None)
    head = get() if get is not None else None
    if head is None:
        return None
    for name, module in model.named_modules():
        if module is head:
            return name
    return None


def _all_linear(model: nn.Module, task_type: str | None) -> frozenset[str]:
    """Full names of every Linear / Conv1D, less the output head.

    The head is the output embedding of a transformers model; a sequence
    classifier's head (``score`` or else ``classifier``) is left out only when the
    task type says SEQ_CLS.
    """
    keys = {name for name, module in model.named_modules() if name and is_linear_like(module)}
    head = _output_head_name(model)
    if head is not None:
        keys.discard(head)
    elif task_type == "SEQ_CLS":
        for name in ("score", "classifier"):
            if hasattr(model, name):
                keys.discard(name)
                break
    return frozenset(keys)


def effective_targets(model: nn.Module, settings: LoraSettings, profile: Profile) -> object:
    """Targets after defaults and ``all-linear`` are expanded."""
    targets = settings.target_modules
    if targets is None:
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        if model_type not in profile.default_targets:
            raise NoDefaultTargets(
                f"model_type={model_type!r} has no default target_modules in profile {profile.name!r}; "
                "pass target_modules explicitly"
            )
        default = profile.default_targets[model_type]
        return default if isinstance(default, str) else frozenset(default)
    if targets == "all-linear":
        return _all_linear(model, settings.task_type)
    return targets


class Target:
    """One module chosen for LoRA, with its resolved rank and alpha."""

    __slots__ = ("name", "module", "r", "alpha")

    def __init__(self, name: str, module: nn.Module, r: int, alpha: float) -> None:
        self.name, self.module, self.r, self.alpha = name, module, r, alpha


def iter_targets(
    model: nn.Module, settings: LoraSettings, profile: Profile, saved_names: Iterable[str] = (),
    targets: object = None, deferred: list | None = None,
) -> Iterator[Target]:
    """The modules to wrap, lazily in ``named_modules`` order (so errors surface in that order).

    ``targets`` are the effective targets when the caller resolved them already.  Raises
    :class:`NoTargetMatched` at the end when none matched.  With ``deferred``, the unused-option
    warnings are not given but their arguments appended (for :func:`warn_unused`, once parameter
    targets are known too)."""
    targets = effective_targets(model, settings, profile) if targets is None else targets
    saved_names = tuple(saved_names)
    found = False
    excluded = unmatched = 0
    chosen: list[str] = []
    for key, module in list(model.named_modules()):
        if not key:
            unmatched += 1
            continue
        if match_names(key, settings.exclude_modules):
            excluded += 1
            continue
        if is_saved(key, saved_names):
            excluded += profile.saved_guard_counts_as_excluded
            continue
        how = _match(key, targets)
        if how is None:
            unmatched += 1
            continue
        # The layer filter applies to suffix matches only: a full name is taken as given.
        if how == "suffix" and settings.layers_to_transform is not None and not _in_layers(key, settings, profile):
            unmatched += 1
            continue
        found = True
        chosen.append(key)
        r = pattern_value(key, settings.rank_pattern, settings.r)
        alpha = pattern_value(key, settings.alpha_pattern, settings.lora_alpha)
        yield Target(key, module, r, alpha)
    if not found:
        # Upstream words the rejection by what the walk saw (peft 0.15 - 0.21).
        kind = "all_excluded" if excluded and not unmatched else "nothing_targeted" if excluded else "targets_not_found"
        raise NoTargetMatched(
            f"target_modules={settings.target_modules!r} (exclude_modules={settings.exclude_modules!r}, "
            f"layers_to_transform={settings.layers_to_transform!r}) matched no module of the model",
            kind,
        )
    if deferred is not None:
        deferred.append((settings, profile, excluded, chosen))
    else:
        warn_unused(settings, profile, excluded, chosen)


def warn_unused(settings: LoraSettings, profile: Profile, excluded: int | None, chosen: list[str]) -> None:
    """Options that had no effect are reported, not silently dropped.  ``chosen`` holds the
    targeted modules' names and the targeted parameters' keys: a rank or alpha pattern that
    reaches either is used."""
    if settings.exclude_modules and excluded == 0:
        warn("exclude_unused", f"exclude_modules={settings.exclude_modules!r} excluded nothing")
    if not profile.warns_unused_patterns:
        return
    for kind, pattern in (("rank_pattern_unused", settings.rank_pattern), ("alpha_pattern_unused", settings.alpha_pattern)):
        unused = [name for name, _ in pattern if not any(re.match(rf"(.*\.)?({name})$", key) for key in chosen)]
        if unused:
            warn(kind, f"{kind.split('_unused')[0]} keys {unused!r} matched no targeted module")
