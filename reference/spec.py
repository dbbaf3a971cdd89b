"""The case: frozen, JSON-serialisable descriptions of what to prepare.

A :class:`Case` is everything needed to prepare one model twice, once by the
reference and once by upstream.  Each spec documents its fields once, here.

Optional adapter and training fields may be :data:`ABSENT`: the field is then
*not passed* to upstream at all, so that upstream's defaults are exercised and
the reference must supply the same defaults from its profile.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, Literal, Mapping

__all__ = [
    "ABSENT",
    "AdapterSpec",
    "Case",
    "ModelSpec",
    "QuantSpec",
    "TrainingSpec",
]


class _Absent:
    """Marker for a field that is left out, so the upstream default applies."""

    _instance: "_Absent | None" = None

    def __new__(cls) -> "_Absent":
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "ABSENT"

    def __bool__(self) -> bool:
        return False

    def __reduce__(self):
        return (_Absent, ())


ABSENT: Any = _Absent()

TaskType = Literal["CAUSAL_LM", "SEQ_CLS", "SEQ_2_SEQ_LM", "TOKEN_CLS"]
DType = Literal["float32", "float16", "bfloat16"]


@dataclass(frozen=True)
class ModelSpec:
    """A tiny random model built offline from a transformers config class."""

    model_type: str
    """transformers ``model_type``, e.g. ``"llama"``."""
    task: TaskType = "CAUSAL_LM"
    """Which head: the auto class used to build the model."""
    num_layers: int = 2
    """Number of transformer blocks (each stack for encoder-decoders)."""
    hidden_size: int = 64
    """Hidden width; a multiple of 64 so 4-bit CPU kernels accept every input."""
    load_dtype: DType = "float32"
    """``dtype`` passed to the model (``torch_dtype`` of the checkpoint load)."""
    seed: int = 0
    """Seed of the random weights."""
    num_labels: Any = ABSENT
    """Classification heads: the number of labels (ABSENT: the zoo's).  A reward model has 1."""


@dataclass(frozen=True)
class QuantSpec:
    """bitsandbytes quantization applied at load time."""

    kind: Literal["none", "8bit", "4bit"] = "none"
    quant_type: Literal["nf4", "fp4"] = "nf4"
    """4-bit only: ``bnb_4bit_quant_type``."""
    double_quant: bool = False
    """4-bit only: ``bnb_4bit_use_double_quant`` (compress statistics)."""
    compute_dtype: DType = "float32"
    """4-bit only: ``bnb_4bit_compute_dtype``."""
    quant_storage: Literal["uint8", "float16", "bfloat16", "float32"] = "uint8"
    """4-bit only: ``bnb_4bit_quant_storage``."""
    int8_threshold: float = 6.0
    """8-bit only: ``llm_int8_threshold``."""
    skip_modules: tuple[str, ...] | None = None
    """``llm_int8_skip_modules``: names left unquantized (None: transformers' default)."""

    @property
    def quantized(self) -> bool:
        return self.kind != "none"


@dataclass(frozen=True)
class AdapterSpec:
    """The ``LoraConfig`` fields in scope.  ``ABSENT`` means "not passed"."""

    r: Any = ABSENT
    lora_alpha: Any = ABSENT
    lora_dropout: Any = ABSENT
    target_modules: Any = ABSENT
    """None, a regex string (full match), or a tuple of names (exact or dotted suffix)."""
    exclude_modules: Any = ABSENT
    """None, a regex string, or a tuple of names."""
    layers_to_transform: Any = ABSENT
    """An int or a tuple of ints."""
    layers_pattern: Any = ABSENT
    """A string or a tuple of strings naming the module list holding the layers."""
    rank_pattern: Any = ABSENT
    """A tuple of ``(pattern, r)`` pairs, passed as a dict."""
    alpha_pattern: Any = ABSENT
    """A tuple of ``(pattern, alpha)`` pairs, passed as a dict."""
    modules_to_save: Any = ABSENT
    """A tuple of module names trained and saved in full."""
    bias: Any = ABSENT
    """``"none"``, ``"all"``, ``"lora_only"`` or anything else (invalid)."""
    lora_bias: Any = ABSENT
    use_rslora: Any = ABSENT
    use_dora: Any = ABSENT
    """DoRA (Liu et al. 2024): a trainable magnitude per output row beside the factors."""
    init_lora_weights: Any = ABSENT
    """True, False, ``"gaussian"`` or a variant: ``"olora"``, ``"pissa"``, ``"pissa_niter_K"``,
    ``"loftq"``, ``"orthogonal"``."""
    loftq_config: Any = ABSENT
    """``(key, value)`` pairs passed as a dict: ``loftq_bits``, ``loftq_iter`` (``reference.loftq``)."""
    fan_in_fan_out: Any = ABSENT
    task_type: Any = ABSENT
    """Usually the model's task; absent gives a plain ``PeftModel``."""
    inference_mode: Any = ABSENT
    """A model prepared for inference: nothing trains."""
    trainable_token_indices: Any = ABSENT
    """A tuple of embedding row indices that train (list form: the input embedding and the
    modules tied to it), or (module name, rows) pairs (dict form: ``{"lm_head": [...]}``; in
    JSON a list of ``[name, [rows]]`` pairs, like ``rank_pattern``); ``reference.tokens``."""
    ensure_weight_tying: Any = ABSENT
    """Keep the modules tied to the input embedding tied once adapters are added (``reference.tying``)."""
    target_parameters: Any = ABSENT
    """A tuple of parameter names (``<module>.<parameter>``, exact or dotted suffix) that get
    parameter-level LoRA, e.g. fused MoE experts (``reference.params``)."""

    def given(self) -> dict[str, Any]:
        """The fields that are passed, converted to ``LoraConfig`` argument types."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is ABSENT:
                continue
            if f.name in ("rank_pattern", "alpha_pattern", "loftq_config") and value is not None:
                value = dict(value)
            elif f.name == "trainable_token_indices" and isinstance(value, tuple) and value and all(
                    isinstance(v, tuple) for v in value):
                value = {name: list(rows) for name, rows in value}  # the dict form, as (name, rows) pairs
            elif isinstance(value, tuple):
                value = list(value)
            out[f.name] = value
        return out


@dataclass(frozen=True)
class TrainingSpec:
    """How the model is prepared for training."""

    level: Literal["peft", "trl"] = "peft"
    """``peft``: prepare_model_for_kbit_training + get_peft_model; ``trl``: SFTTrainer."""
    prepare_kbit: bool = True
    """peft level: call ``prepare_model_for_kbit_training`` before ``get_peft_model``."""
    gradient_checkpointing: Any = ABSENT
    """``use_gradient_checkpointing`` of the k-bit step (ABSENT: its default)."""
    use_reentrant: Any = ABSENT
    """``gradient_checkpointing_kwargs={"use_reentrant": ...}``; ABSENT passes no kwargs."""
    autocast_adapter_dtype: Any = ABSENT
    """``get_peft_model(..., autocast_adapter_dtype=...)``."""
    bf16: bool = False
    """trl level: ``SFTConfig.bf16``."""
    fp16: bool = False
    """trl level: ``SFTConfig.fp16``."""
    model_from_path: bool = False
    """trl level: the trainer gets a checkpoint directory and ``model_init_kwargs``
    (dtype, quantization config) and loads the model itself."""
    peft_model_in: bool = False
    """trl level: the trainer gets an already-built PeftModel (``get_peft_model`` of the
    adapter spec) instead of a plain model."""
    peft_config_too: bool = True
    """trl level, with ``peft_model_in``: ``peft_config`` is passed as well."""
    load_saved: bool = False
    """peft level: resume from a saved adapter.  The adapter spec is prepared on a fresh load of
    the model (no k-bit step), given trained values (``reference.trained``) and saved; the case's
    model (after the k-bit step, if asked) then loads it with ``PeftModel.from_pretrained``
    instead of ``get_peft_model`` (``reference.resume``)."""
    is_trainable: Any = ABSENT
    """With ``load_saved``: ``from_pretrained``'s ``is_trainable`` (ABSENT: its default, False)."""
    set_adapter: Any = ABSENT
    """peft level, with a second adapter: ``peft_model.set_adapter(<name>)`` after it is added
    (``"default"`` or ``"second"``; ABSENT: no call, ``default`` stays active)."""
    trainer: Any = ABSENT
    """trl level: which trainer prepares the model, by trl's short name (``sft``, ``dpo``, ``kto``,
    ``reward``, ``grpo``, ``rloo``, ``orpo``, ``cpo``, ``bco``; ABSENT: ``sft``).  Its rules per trl
    era: ``reference.trainers``."""
    quantization_config_in: Any = ABSENT
    """trl level, quantized cases: where the bitsandbytes config goes.  ABSENT (or
    ``"model_init_kwargs"``): ``args.model_init_kwargs`` when the trainer loads a path (a model
    object is loaded quantized beforehand); ``"trainer"``: the trainer's own ``quantization_config``
    argument (trl >= 1.16; beside a model object it is documented as ignored); ``"both"``: both
    places (an error)."""
    chat_template: Any = ABSENT
    """trl level (trainers with ``chat_template_path``, trl >= 1.16): ``"tokenizer"``, a tokenizer
    directory whose template is cloned (tokens added, embeddings resized, the added rows made
    trainable: ``reference.chat_template``), or ``"jinja"``, a bare template file; ABSENT: none."""
    device: Literal["cpu", "cuda"] = "cpu"

    @property
    def trainer_name(self) -> str:
        """The trainer's short name (``sft`` when not given)."""
        return "sft" if self.trainer is ABSENT else str(self.trainer)


@dataclass(frozen=True)
class Case:
    """Everything needed to prepare one model."""

    model: ModelSpec
    quant: QuantSpec = field(default_factory=QuantSpec)
    adapter: AdapterSpec = field(default_factory=AdapterSpec)
    training: TrainingSpec = field(default_factory=TrainingSpec)
    invalid: bool = False
    """True when the strategy built this case to be rejected by both sides."""
    second_adapter: AdapterSpec | None = None
    """peft level: a second adapter, added as ``peft_model.add_adapter("second", LoraConfig(...))``
    after ``get_peft_model`` (``reference.adapters``); None: one adapter."""

    # -- serialisation -------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict; ABSENT fields are omitted."""
        return {
            "model": _present(self.model),
            "quant": _present(self.quant),
            "adapter": _present(self.adapter),
            "training": _present(self.training),
            "invalid": self.invalid,
            **({"second_adapter": _present(self.second_adapter)} if self.second_adapter is not None else {}),
        }

    def dumps(self) -> str:
        return json.dumps(self.to_json(), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "Case":
        """Inverse of :meth:`to_json`; unknown keys raise ``ValueError``."""
        return cls(
            model=_build(ModelSpec, data.get("model", {})),
            quant=_build(QuantSpec, data.get("quant", {})),
            adapter=_build(AdapterSpec, data.get("adapter", {})),
            training=_build(TrainingSpec, data.get("training", {})),
            invalid=bool(data.get("invalid", False)),
            second_adapter=_build(AdapterSpec, data["second_adapter"]) if data.get("second_adapter") is not None else None,
        )

    @classmethod
    def loads(cls, text: str) -> "Case":
        return cls.from_json(json.loads(text))


def _jsonable(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_jsonable(v) for v in value]
    return value


def _present(spec: Any) -> dict[str, Any]:
    return {
        f.name: _jsonable(getattr(spec, f.name))
        for f in dataclasses.fields(spec)
        if getattr(spec, f.name) is not ABSENT
    }


def _tupled(value: Any) -> Any:
    if isinstance(value, list):
        return tuple(_tupled(v) for v in value)
    return value


def _build(cls: type, data: Mapping[str, Any]) -> Any:
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - names
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown fields {sorted(unknown)!r}; known: {sorted(names)!r}")
    return cls(**{k: _tupled(v) for k, v in data.items()})
