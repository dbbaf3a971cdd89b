"""Checking a case given on the command line (``--case JSON``, ``--set SECTION.FIELD=VALUE``).

A case from the command line is checked field by field before anything is built, so
that a typo is one line naming the field and what it takes (exit status 2), never a
traceback and never a "divergence": ``explain`` exits 1 only when the two sides
disagree.

What a field takes comes from two places: the annotations of the spec dataclasses in
``reference/spec.py`` (``Literal`` choices, ``bool``, ``int``, ``float``), and, for the
fields annotated ``Any`` there (the ``LoraConfig`` fields, which the strategies fill
with deliberately invalid values too, such as ``r=0`` or ``bias="bogus"``), the JSON
types the strategies draw them from (:data:`ADAPTER_FIELDS`).  Values of the right type
are never range-checked on the adapter: an out-of-range adapter value is an invalid
input both sides must reject, which is worth explaining.  The model, quantization and
training fields describe what the harness builds, so their ranges are checked.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass
from typing import Any, Callable, Mapping

__all__ = ["ADAPTER_FIELDS", "CliError", "case_from_json"]

SECTIONS = ("model", "quant", "adapter", "training")


class CliError(Exception):
    """Bad command-line input.  The message is one line naming the argument, the field and what
    it takes; ``main`` prints it and exits with status 2."""


@dataclass(frozen=True)
class _Kind:
    """One JSON type a field accepts."""

    name: str
    test: Callable[[Any], bool]


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _pairs(value_test: Callable[[Any], bool]) -> Callable[[Any], bool]:
    def test(v: Any) -> bool:
        return isinstance(v, list) and all(
            isinstance(p, list) and len(p) == 2 and isinstance(p[0], str) and value_test(p[1]) for p in v)

    return test


NULL = _Kind("null", lambda v: v is None)
BOOL = _Kind("true or false", lambda v: isinstance(v, bool))
INT = _Kind("an integer", _is_int)
NUMBER = _Kind("a number", _is_number)
STRING = _Kind("a string", lambda v: isinstance(v, str))
STRINGS = _Kind("a list of strings", lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v))
INTS = _Kind("a list of integers", lambda v: isinstance(v, list) and all(_is_int(x) for x in v))
INT_PAIRS = _Kind('a list of ["pattern", integer] pairs (or an object)', _pairs(_is_int))
INTS_PAIRS = _Kind('a list of ["module", [integers]] pairs (or an object)',
                   _pairs(lambda v: isinstance(v, list) and all(_is_int(x) for x in v)))
NUMBER_PAIRS = _Kind('a list of ["pattern", number] pairs (or an object)', _pairs(_is_number))

ADAPTER_FIELDS: dict[str, tuple[_Kind, ...]] = {
    # The JSON types the strategies draw each LoraConfig field from (strategies/cases.py).
    "r": (INT,),
    "lora_alpha": (NUMBER,),
    "lora_dropout": (NUMBER,),
    "target_modules": (NULL, STRING, STRINGS),
    "exclude_modules": (NULL, STRING, STRINGS),
    "layers_to_transform": (NULL, INT, INTS),
    "layers_pattern": (NULL, STRING, STRINGS),
    "rank_pattern": (NULL, INT_PAIRS),
    "alpha_pattern": (NULL, NUMBER_PAIRS),
    "modules_to_save": (NULL, STRINGS),
    "bias": (STRING,),
    "lora_bias": (BOOL,),
    "use_rslora": (BOOL,),
    "use_dora": (BOOL,),
    "init_lora_weights": (BOOL, STRING),
    "loftq_config": (NULL, INT_PAIRS),
    "fan_in_fan_out": (BOOL,),
    "task_type": (NULL, STRING),
    "inference_mode": (BOOL,),
    "trainable_token_indices": (NULL, INTS, INTS_PAIRS),
}
_ANY_FIELDS = {
    # TrainingSpec fields annotated Any (ABSENT means "not passed"); the strategies draw booleans.
    "gradient_checkpointing": (BOOL,),
    "use_reentrant": (BOOL,),
    "autocast_adapter_dtype": (BOOL,),
    "is_trainable": (BOOL,),
    "set_adapter": (STRING,),
    "trainer": (STRING,),
    "quantization_config_in": (STRING,),
    "chat_template": (STRING,),
    "num_labels": (INT,),
}


def _kinds(annotation: Any, name: str) -> tuple[tuple[_Kind, ...], tuple[Any, ...] | None]:
    """(accepted JSON types, closed choices or None) of one annotated spec field."""
    if typing.get_origin(annotation) is typing.Literal:
        return (STRING,), typing.get_args(annotation)
    if annotation is bool:
        return (BOOL,), None
    if annotation is int:
        return (INT,), None
    if annotation is float:
        return (NUMBER,), None
    if annotation is str:
        return (STRING,), None
    if annotation == (tuple[str, ...] | None):
        return (NULL, STRINGS), None
    if name in _ANY_FIELDS:
        return _ANY_FIELDS[name], None
    if name in ADAPTER_FIELDS:
        return ADAPTER_FIELDS[name], None
    raise AssertionError(f"no JSON type known for spec field {name!r} ({annotation!r}): add it to conformance/cli/validate.py")


def _ranges(section: str, name: str, value: Any) -> str | None:
    """What is wrong with a well-typed value of a harness-side field, or None."""
    if section == "model" and name == "num_layers" and value < 1:
        return "a positive integer"
    if section == "model" and name == "hidden_size" and (value < 64 or value % 64):
        return "a positive multiple of 64 (the 4-bit CPU kernels need it)"
    if section == "model" and name == "seed" and value < 0:
        return "a non-negative integer"
    if section == "quant" and name == "int8_threshold" and value < 0:
        return "a non-negative number"
    if section == "model" and name == "num_labels" and value < 1:
        return "a positive integer"
    if section == "training" and name == "trainer":
        from reference.trainers import TRAINER_NAMES

        if value not in TRAINER_NAMES:
            return f"one of {', '.join(TRAINER_NAMES)}"
    if section == "training" and name == "quantization_config_in" and value not in ("model_init_kwargs", "trainer", "both"):
        return "one of model_init_kwargs, trainer, both"
    if section == "training" and name == "chat_template" and value not in ("tokenizer", "jinja"):
        return "one of tokenizer, jinja"
    return None


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _check_field(where: str, section: str, name: str, value: Any, annotation: Any) -> Any:
    kinds, choices = _kinds(annotation, name)
    field_name = f"{section}.{name}"
    if not any(k.test(value) for k in kinds):
        raise CliError(f"{where}: {field_name}={_show(value)} is not {' or '.join(k.name for k in kinds)}"
                       + (f": one of {', '.join(choices)}" if choices else ""))
    if choices is not None and value not in choices:
        raise CliError(f"{where}: {field_name}={_show(value)} is not one of {', '.join(choices)}")
    if (kinds == (INT,) or kinds == (NUMBER,)) and (problem := _ranges(section, name, value)) is not None:
        raise CliError(f"{where}: {field_name}={_show(value)} is not {problem}")
    return value


def _section(where: str, section: str, data: Any, spec_cls: type) -> dict[str, Any]:
    if not isinstance(data, Mapping):
        raise CliError(f"{where}: {section} must be a JSON object of fields, got {_show(data)}")
    hints = typing.get_type_hints(spec_cls)
    names = [f.name for f in dataclasses.fields(spec_cls)]
    out = {}
    for name, value in data.items():
        if name not in names:
            raise CliError(f"{where}: {section}.{name} is not a field; the {section} fields are {', '.join(names)}")
        if name in ("rank_pattern", "alpha_pattern", "trainable_token_indices", "loftq_config") and isinstance(value, Mapping):
            value = [[k, v] for k, v in value.items()]  # given as an object: the spec holds (pattern, value) pairs
        out[name] = _check_field(where, section, name, value, hints[name])
    return out


def case_from_json(data: Any, where: str = "--case") -> Any:
    """The :class:`reference.spec.Case` that ``data`` (parsed JSON) describes, every field checked;
    :class:`CliError` names the first bad one.  ``where`` names the argument in the message."""
    from reference.spec import AdapterSpec, Case, ModelSpec, QuantSpec, TrainingSpec
    from strategies.zoo import ZOO, tasks_of

    if not isinstance(data, Mapping):
        raise CliError(f"{where}: a case is a JSON object with the sections {', '.join(SECTIONS)}, got {_show(data)}")
    unknown = [k for k in data if k not in (*SECTIONS, "second_adapter", "invalid")]
    if unknown:
        raise CliError(f"{where}: {unknown[0]!r} is not a section of a case; the sections are {', '.join(SECTIONS)} "
                       "(and invalid: true or false)")
    if "invalid" in data and not isinstance(data["invalid"], bool):
        raise CliError(f"{where}: invalid={_show(data['invalid'])} is not true or false")
    specs = {"model": ModelSpec, "quant": QuantSpec, "adapter": AdapterSpec, "training": TrainingSpec}
    checked = {s: _section(where, s, data.get(s, {}), specs[s]) for s in SECTIONS}
    if data.get("second_adapter") is not None:  # an optional section: a second adapter (add_adapter)
        checked["second_adapter"] = _section(where, "second_adapter", data["second_adapter"], AdapterSpec)
    model_type = checked["model"].get("model_type")
    if model_type is None:
        raise CliError(f"{where}: model.model_type is required: one of {', '.join(ZOO)}")
    if model_type not in ZOO:
        raise CliError(f"{where}: model.model_type={model_type!r} is not one of {', '.join(ZOO)}")
    task = checked["model"].get("task", "CAUSAL_LM")
    if task not in tasks_of(model_type):
        raise CliError(f"{where}: model.task={task!r} is not one of {', '.join(tasks_of(model_type))} for {model_type} "
                       "(with the installed transformers)")
    return Case.from_json({**checked, "invalid": data.get("invalid", False)})
