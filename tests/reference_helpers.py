"""Shared helpers of the reference unit tests (tiny models, preparation shortcuts)."""

from __future__ import annotations

import contextlib
import pathlib
import re
import warnings

import torch
from torch import nn

from conformance.engine.models import build_model, load_model
from reference import PROFILES, AdapterSpec, ModelSpec, QuantSpec, TrainingSpec
from reference import prepare
from reference.layers import LoraEmbedding, LoraLinear

REPO = pathlib.Path(__file__).resolve().parents[1]
CURRENT = PROFILES["current"]
NO_KBIT = TrainingSpec(prepare_kbit=False)

LLAMA_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


# -- helpers ---------------------------------------------------------------------------------


def llama(task: str = "CAUSAL_LM", **kw) -> nn.Module:
    return build_model(ModelSpec("llama", task, **kw))


def gpt2(**kw) -> nn.Module:
    return build_model(ModelSpec("gpt2", **kw))


def prep(model: nn.Module, training: TrainingSpec = NO_KBIT, profile=CURRENT, **adapter) -> nn.Module:
    return prepare(model, AdapterSpec(**adapter), training, profile)


def quiet_prep(model: nn.Module, training: TrainingSpec = NO_KBIT, **adapter) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return prep(model, training, **adapter)


def lora_layers(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if isinstance(m, (LoraLinear, LoraEmbedding))}


def targeted(model: nn.Module, training: TrainingSpec = NO_KBIT, **adapter) -> set[str]:
    return set(lora_layers(quiet_prep(model, training, **adapter)))


def qkeys(*layers: int, names=("q_proj",)) -> set[str]:
    return {f"model.layers.{i}.{'mlp' if n in ('gate_proj', 'up_proj', 'down_proj') else 'self_attn'}.{n}"
            for i in layers for n in names}


class Attn(nn.Module):
    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.q_proj = nn.Linear(width, width)
        self.xq_proj = nn.Linear(width, width)
        self.v_proj = nn.Linear(width, width, bias=False)


class Toy(nn.Module):
    """A plain nn.Module (not a PreTrainedModel): model.layers.{i}.{q,xq,v}_proj and lm_head."""

    def __init__(self, n: int = 2, width: int = 8) -> None:
        super().__init__()
        self.model = nn.Module()
        self.model.layers = nn.ModuleList(Attn(width) for _ in range(n))
        self.lm_head = nn.Linear(width, width)


def quantized(cache: pathlib.Path, kind: str = "4bit", load_dtype: str = "float32", **quant) -> nn.Module:
    return load_model(ModelSpec("llama", num_layers=1, load_dtype=load_dtype), QuantSpec(kind=kind, **quant), cache)


CONV1D_WARNING = r"fan_in_fan_out is set to False but the target module is `Conv1D`"
LINEAR_WARNING = r"fan_in_fan_out is set to True but the target module is `torch.nn.Linear`"


@contextlib.contextmanager
def expect_warning(kind: str, upstream_text: str):
    """A UserWarning that is either upstream's message (notes) or a reference warning of ``kind``
    (reference.notices: the harness compares warnings by kind, not by wording)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    hits = [
        w for w in caught
        if getattr(w.message, "kind", None) == kind or re.search(upstream_text, str(w.message))
    ]
    assert hits, f"no {kind!r} warning; got {[str(w.message) for w in caught]}"
    assert all(issubclass(w.category, UserWarning) for w in hits)


def checkpointing(model: nn.Module) -> bool:
    """Gradient checkpointing is on (read from the layers: the model-level property is deprecated)."""
    return any(getattr(m, "gradient_checkpointing", False) for m in model.modules())


def input_grads(model: nn.Module) -> bool:
    with torch.enable_grad():
        return bool(model.get_input_embeddings()(torch.tensor([[1, 2]])).requires_grad)


