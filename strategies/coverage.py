"""Coverage by construction: the cells every run must reach, and how a case falls into them.

A *cell* pins the coarse features of a case (level, model type, quantization kind,
target kind, task); Hypothesis draws everything else inside it.  :func:`cells` lists,
per level, the few cells that together reach every value pair of the coverage
*dimensions*:

* peft level: model type x quantization kind, model type x target kind, model type x task
  (four cells per model type: the kinds rotate, so each type meets each kind);
* trl level (SFTTrainer trains causal LMs): causal model type x quantization kind (three
  cells per type), the target kinds rotating over the types;
* both levels: adapter feature x quantization kind, where the feature is ``lora`` (plain) or
  one that changes the layers (``dora``) or adds trainable rows (``tokens``): extra cells pin the
  feature, one per quantization
  kind and target kind at the peft level, one per quantization kind at the trl level, the
  model types rotating over the zoo;
* both levels: ``parameters`` (``target_parameters`` pinned) on the fused-expert types only: at
  the peft level one cell per fused type and quantization kind (target kinds list, all-linear,
  regex rotating), at the trl level one per quantization kind; the dimension
  ``parameter_targets x model_type`` asks for every fused type with parameter targets;
* trl level: ``template`` (a ``chat_template_path`` pinned, SFTTrainer), one cell per quantization
  kind where the installed trl's SFTTrainer clones templates;
* trl level: trainer x quantization kind, where the trainer is each one the installed trl is
  generated with (``strategies.trainers``): one cell per trainer other than SFT and quantization
  kind, the model types of the trainer's task rotating (SFT's cells are the plain ones above, which
  pin it, as the feature cells do);
* peft level: ``tying`` (``ensure_weight_tying`` pinned), one cell per quantization kind on the
  decoder types whose embeddings are tied;
* peft level: ``resume`` (``training.load_saved`` pinned: ``PeftModel.from_pretrained`` of a saved
  adapter) and ``adapters`` (a second adapter pinned: ``add_adapter`` / ``set_adapter``), one cell
  each per quantization kind;
* peft level: init variant x quantization kind, where the variant is one of the profile's
  ``init_lora_weights`` variants (``olora``, ``pissa``, ``orthogonal``, ``pissa_niter``,
  ``loftq``; ``default`` for the rest): extra cells pin each variant, one per quantization kind
  it accepts (PiSSA and ``pissa_niter_K`` refuse a quantized base, LoftQ is drawn unquantized),
  targets ``all-linear`` / ``default`` alternating.

The conformance suite runs one test per cell, so which cells exist is decided here, not by
the draw.  :func:`dimension_cells` reads the cells of the same dimensions off any case,
which is how a report measures what a run reached (free tests included).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping

from reference.profiles import select_profile
from strategies.inits import UNQUANTIZED_ONLY, init_variant
from strategies.targets import TARGET_KINDS, target_kind
from strategies.trainers import clones_chat_template, installed_trainers, trainer_of, trainer_task
from strategies.zoo import ZOO, model_types, tasks_of

__all__ = ["ADAPTER_FEATURES", "DIMENSIONS", "QUANT_KINDS", "Cell", "adapter_feature", "cells", "dimension_cells",
           "expected_cells", "init_quant_kinds"]

QUANT_KINDS = ("none", "8bit", "4bit")
ADAPTER_FEATURES = ("lora", "dora", "tokens", "parameters", "tying", "resume", "adapters", "template")
"""The adapter features a cell may pin: ``lora`` leaves them to the draw (its first example is
plain LoRA), ``dora`` pins ``use_dora=True``, ``tokens`` pins ``trainable_token_indices``,
``parameters`` pins ``target_parameters`` (on the fused-expert types only: ``strategies.params``),
``tying`` pins ``ensure_weight_tying`` (peft level, on types with tied embeddings: ``strategies.tying``),
``resume`` pins ``training.load_saved`` (peft level: ``strategies.resume``), ``adapters`` pins a second
adapter (peft level: ``strategies.adapters``), ``template`` pins a ``chat_template_path`` (trl level, where
SFTTrainer clones templates: ``strategies.trainers``)."""

DIMENSIONS: dict[str, tuple[str, tuple[str, ...]]] = {
    "peft: model_type x quantization": ("peft", ("model_type", "quantization")),
    "peft: model_type x target_kind": ("peft", ("model_type", "target_kind")),
    "peft: model_type x task": ("peft", ("model_type", "task")),
    "trl: model_type x quantization": ("trl", ("model_type", "quantization")),
    "peft: adapter_feature x quantization": ("peft", ("adapter_feature", "quantization")),
    "trl: adapter_feature x quantization": ("trl", ("adapter_feature", "quantization")),
    "trl: trainer x quantization": ("trl", ("trainer", "quantization")),
    "peft: init_variant x quantization": ("peft", ("init_variant", "quantization")),
    "peft: parameter_targets x model_type": ("peft", ("parameter_targets", "model_type")),
}
"""Each coverage dimension: the level it is measured at and the case features it pairs."""


@dataclass(frozen=True)
class Cell:
    """The coarse features of a case that a conformance test pins."""

    level: str
    model_type: str
    quantization: str
    target_kind: str
    task: str
    adapter_feature: str = "lora"
    """One of :data:`ADAPTER_FEATURES`."""
    init_variant: str = "default"
    """``default`` (drawn freely) or an ``init_lora_weights`` variant the cell pins."""
    trainer: str = "sft"
    """trl level: the trainer the cell pins (``-`` at the peft level)."""

    @property
    def parameter_targets(self) -> str:
        """``given`` where the cell pins ``target_parameters``, else ``-``."""
        return "given" if self.adapter_feature == "parameters" else "-"

    @property
    def id(self) -> str:
        base = f"{self.model_type}-{self.quantization}-{self.target_kind}-{self.task}"
        base = base if self.adapter_feature == "lora" else f"{base}-{self.adapter_feature}"
        base = base if self.trainer in ("sft", "-") else f"{base}-{self.trainer}"
        return base if self.init_variant == "default" else f"{base}-init_{self.init_variant}"

    def feature(self, name: str) -> str:
        return getattr(self, name)


def cells(level: str, *, quant_kinds: Iterable[str] = QUANT_KINDS,
          keep: Callable[[Cell], bool] | None = None) -> tuple[Cell, ...]:
    """The cells of ``level`` over ``quant_kinds``, those ``keep`` accepts (default: all).

    ``keep`` selects a shard; the kinds rotate over the full list either way, so a
    shard's cells are exactly the full run's cells that fall in it."""
    quants = tuple(q for q in QUANT_KINDS if q in tuple(quant_kinds))
    if not quants:
        return ()
    out: list[Cell] = []
    if level == "peft":
        for index, model_type in enumerate(model_types()):
            tasks = tasks_of(model_type)
            rows = max(len(quants), len(TARGET_KINDS), len(tasks))
            for row in range(rows):
                out.append(Cell("peft", model_type, quants[(row + index) % len(quants)],
                                TARGET_KINDS[row % len(TARGET_KINDS)], tasks[row % len(tasks)]))
        types = _with_defaults(model_types())
        for feature in ("dora", "tokens"):
            for row, (quant, kind) in enumerate((q, k) for q in quants for k in TARGET_KINDS):
                model_type = types[(row * 7 + len(feature)) % len(types)]
                task = tasks_of(model_type)[row % len(tasks_of(model_type))]
                out.append(Cell("peft", model_type, quant, kind, task, feature))
        for index, model_type in enumerate(_fused_types()):
            for row, quant in enumerate(quants):
                task = tasks_of(model_type)[(row + index) % len(tasks_of(model_type))]
                out.append(Cell("peft", model_type, quant, _PARAMETER_KINDS[(row + index) % 3], task, "parameters"))
        tied = _tied_types()
        for row, quant in enumerate(quants if tied else ()):
            model_type = tied[row % len(tied)]
            out.append(Cell("peft", model_type, quant, ("list", "default", "list")[row % 3], "CAUSAL_LM", "tying"))
        for row, quant in enumerate(quants):
            model_type = types[(row * 9 + 4) % len(types)]
            out.append(Cell("peft", model_type, quant, TARGET_KINDS[(row * 2) % len(TARGET_KINDS)],
                            tasks_of(model_type)[row % len(tasks_of(model_type))], "resume"))
        for row, quant in enumerate(quants):
            model_type = types[(row * 11 + 6) % len(types)]
            out.append(Cell("peft", model_type, quant, ("list", "default", "regex")[row % 3],
                            tasks_of(model_type)[row % len(tasks_of(model_type))], "adapters"))
        for v, variant in enumerate(select_profile().init_variants):
            for row, quant in enumerate(q for q in quants if q in init_quant_kinds(variant)):
                model_type = types[(row * 5 + v * 13 + 3) % len(types)]
                task = tasks_of(model_type)[(row + v) % len(tasks_of(model_type))]
                out.append(Cell("peft", model_type, quant, ("all-linear", "default")[(row + v) % 2], task,
                                init_variant=variant))
    elif level == "trl":
        causal = model_types("CAUSAL_LM")
        for index, model_type in enumerate(causal):
            for row, quant in enumerate(quants):
                out.append(Cell("trl", model_type, quant, TARGET_KINDS[(row + index) % len(TARGET_KINDS)], "CAUSAL_LM"))
        causal = _with_defaults(causal)
        for feature in ("dora", "tokens"):
            for row, quant in enumerate(quants):
                model_type = causal[(row * 11 + len(feature)) % len(causal)]
                out.append(Cell("trl", model_type, quant, TARGET_KINDS[row % len(TARGET_KINDS)], "CAUSAL_LM", feature))
        fused = _fused_types()
        for row, quant in enumerate(quants if fused else ()):
            out.append(Cell("trl", fused[row % len(fused)], quant, _PARAMETER_KINDS[row % 3], "CAUSAL_LM", "parameters"))
        # (on types whose input embedding is `embed_tokens`: trl's name for it, see chat-template-assumes-embed-tokens)
        named = tuple(t for t in causal if ZOO[t].embedding_names[:1] == ("embed_tokens",))
        for row, quant in enumerate(quants if clones_chat_template("sft") else ()):
            model_type = named[(row * 13 + 8) % len(named)]
            out.append(Cell("trl", model_type, quant, ("list", "default", "all-linear")[row % 3], "CAUSAL_LM", "template"))
        for t, trainer in enumerate(n for n in installed_trainers() if n != "sft"):
            task = trainer_task(trainer)
            typed = _with_defaults(model_types(task))
            for row, quant in enumerate(quants):
                model_type = typed[(row * 5 + t * 7) % len(typed)]
                out.append(Cell("trl", model_type, quant, TARGET_KINDS[(row + t) % len(TARGET_KINDS)], task,
                                trainer=trainer))
    else:
        raise ValueError(f"level={level!r} is not one of peft, trl")
    return tuple(c for c in out if keep is None or keep(c))


_PARAMETER_KINDS = ("list", "all-linear", "regex")
"""The target kinds a parameters cell rotates over (parameters beside default targets are left out)."""


def _tied_types() -> tuple[str, ...]:
    """The types a tying cell pins, where the installed stack has the feature."""
    from strategies.tying import tied_types

    return tied_types() if "ensure_weight_tying" in select_profile().features else ()


def _fused_types() -> tuple[str, ...]:
    """The fused-expert types a parameters cell pins, where the installed stack has the feature."""
    from strategies.params import fused_types

    return fused_types() if "target_parameters" in select_profile().features else ()


def init_quant_kinds(variant: str) -> tuple[str, ...]:
    """The quantization kinds a cell of init ``variant`` is drawn with: PiSSA refuses a quantized
    base (an invalid kind, not a cell), LoftQ is drawn unquantized (``strategies.inits``)."""
    return ("none",) if variant in UNQUANTIZED_ONLY else QUANT_KINDS


def _with_defaults(types: tuple[str, ...]) -> tuple[str, ...]:
    """The types every profile has default targets for: a feature cell's ``default`` target kind
    then stays a valid case on any stack (the plain cells meet the types without defaults)."""
    from reference.profiles import PROFILES

    return tuple(t for t in types if all(t in p.default_targets for p in PROFILES.values()))


def _features(case: Mapping[str, Any]) -> dict[str, str]:
    """The coarse features of a case in its JSON form (``Case.to_json()``)."""
    model, adapter = case.get("model", {}), case.get("adapter", {})
    return {
        "level": case.get("training", {}).get("level", "peft"),
        "model_type": model.get("model_type", "?"),
        "quantization": case.get("quant", {}).get("kind", "none"),
        "target_kind": target_kind(adapter.get("target_modules")),
        "task": model.get("task", "CAUSAL_LM"),
        "adapter_feature": "resume" if case.get("training", {}).get("load_saved") else
        "adapters" if case.get("second_adapter") else
        "template" if case.get("training", {}).get("chat_template") else adapter_feature(adapter),
        "init_variant": init_variant(adapter.get("init_lora_weights")),
        "parameter_targets": "given" if adapter.get("target_parameters") else "-",
        "trainer": trainer_of(case),
    }


def adapter_feature(adapter: Mapping[str, Any]) -> str:
    """The adapter feature of an ``adapter`` in its JSON form: ``dora`` with ``use_dora``, else
    ``tokens`` with trainable token rows, else ``parameters`` with parameter targets, else ``lora``."""
    if adapter.get("use_dora") is True:
        return "dora"
    if adapter.get("trainable_token_indices"):
        return "tokens"
    if adapter.get("target_parameters"):
        return "parameters"
    return "tying" if adapter.get("ensure_weight_tying") is True else "lora"


def dimension_cells(case: Mapping[str, Any]) -> dict[str, tuple[str, ...]]:
    """The cell ``case`` (JSON) falls into, for each dimension of its level."""
    f = _features(case)
    return {name: tuple(f[k] for k in keys) for name, (level, keys) in DIMENSIONS.items() if level == f["level"]}


def expected_cells(levels: Iterable[str], *, quant_kinds: Iterable[str] = QUANT_KINDS,
                   keep: Callable[[Cell], bool] | None = None) -> dict[str, list[tuple[str, ...]]]:
    """For each dimension of ``levels``, the sorted cells a run with these restrictions must reach."""
    out: dict[str, set[tuple[str, ...]]] = {}
    levels = tuple(levels)
    for name, (level, keys) in DIMENSIONS.items():
        if level not in levels:
            continue
        out[name] = {tuple(c.feature(k) for k in keys) for c in cells(level, quant_kinds=quant_kinds, keep=keep)}
    return {name: sorted(found) for name, found in out.items()}
