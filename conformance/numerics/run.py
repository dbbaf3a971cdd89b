"""The mechanics of the numerical checks: inputs, shared adapter values, forward and backward.

Everything here duck-types on PEFT's public module layout (``base_layer``,
``lora_A``/``lora_B`` ModuleDicts, ``lora_embedding_A``/``_B``), like
:mod:`conformance.engine.snapshot`, so the same code drives the reference's model and
upstream's and never imports peft.

Nothing reads or advances the global RNG state: inputs and values come from
``torch.Generator`` objects seeded from the case, and the training-mode forward
runs inside ``torch.random.fork_rng`` with a seed of its own.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import math
import warnings
from dataclasses import dataclass
from typing import Any, Iterator

import torch
from torch import nn

from conformance.numerics.images import image_inputs
from reference.spec import Case
from strategies.zoo import ZOO

__all__ = [
    "Run",
    "assign_shared_values",
    "bypassed",
    "case_seed",
    "lora_layers",
    "make_inputs",
    "run_model",
    "trainer_autocast",
]

BATCH = 2
SEQ = 6
DELTA_RMS = 0.2
"""The rms each LoRA update ``scaling * B A x`` is given, for inputs of rms 1: large
enough that a wrong scaling, transposition or dropout changes the logits by far more
than any tolerance, small enough to stay finite in fp16."""


def case_seed(case: Case, salt: str = "") -> int:
    """A 63-bit seed derived from the case alone (never from global state)."""
    digest = hashlib.sha256((case.dumps() + "|" + salt).encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def _generator(seed: int) -> torch.Generator:
    g = torch.Generator(device="cpu")
    g.manual_seed(seed)
    return g


def is_lora_layer(module: nn.Module) -> bool:
    return hasattr(module, "base_layer") and (hasattr(module, "lora_A") or hasattr(module, "lora_embedding_A"))


def lora_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every LoRA-wrapped module, by path, in ``named_modules`` order."""
    return [(path, m) for path, m in model.named_modules() if is_lora_layer(m)]


def adapter_names(module: nn.Module) -> list[str]:
    names = set(getattr(module, "lora_A", {}).keys()) | set(getattr(module, "lora_embedding_A", {}).keys())
    return sorted(names)


# -- inputs ------------------------------------------------------------------------------------


def _vocab(model: nn.Module) -> int:
    emb = model.get_input_embeddings()
    base = getattr(emb, "base_layer", emb)
    base = getattr(base, "original_module", base)
    return int(base.num_embeddings)


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def make_inputs(case: Case, model: nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """Token ids, attention mask and labels for the case's task (and an image for a vision-language
    type: ``conformance.numerics.images``), from ``seed``.

    Pad tokens are avoided (a sequence-classification head reads the last non-pad
    token); a sequence-classification model without a pad token gets batch 1, the
    only batch size transformers accepts then.
    """
    g = _generator(seed)
    config = model.config
    vocab = _vocab(model)
    pad = getattr(config, "pad_token_id", None)
    task = case.model.task
    batch = 1 if task == "SEQ_CLS" and pad is None else BATCH

    def ids(*shape: int) -> torch.Tensor:
        out = torch.randint(0, vocab, shape, generator=g)
        if pad is not None and 0 <= pad < vocab:
            out = torch.where(out == pad, (out + 1) % vocab, out)
        return out

    input_ids = ids(batch, SEQ)
    eos = getattr(config, "eos_token_id", None)
    if task == "SEQ_CLS" and isinstance(eos, int) and 0 <= eos < vocab:
        # t5 / bart classify at the last <eos> and demand the same number in every row: exactly one
        input_ids = torch.where(input_ids == eos, (eos + 1) % vocab if (eos + 1) % vocab != pad else (eos + 2) % vocab,
                                input_ids)
        input_ids[:, -1] = eos
    inputs: dict[str, torch.Tensor] = {"input_ids": input_ids}
    if ZOO[case.model.model_type].image_text:
        # (one image per row: its placeholder tokens first; conformance.numerics.images)
        inputs = image_inputs(case.model.model_type, model, input_ids, g)
        input_ids = inputs["input_ids"]
    inputs["attention_mask"] = torch.ones_like(input_ids)
    labels_n = int(getattr(config, "num_labels", 2))
    if task == "CAUSAL_LM":
        inputs["labels"] = input_ids.clone()
    elif task == "SEQ_2_SEQ_LM":
        inputs["labels"] = ids(batch, 5)
    elif task == "SEQ_CLS":
        inputs["labels"] = torch.randint(0, labels_n, (batch,), generator=g) if labels_n > 1 else torch.rand(batch, 1, generator=g)
    elif task == "TOKEN_CLS":
        inputs["labels"] = torch.randint(0, labels_n, (batch, SEQ), generator=g)
    device = _device(model)
    return {k: v.to(device) for k, v in inputs.items()}


# -- shared adapter values ---------------------------------------------------------------------


def _values(g: torch.Generator, shape: tuple[int, ...], kind: str, scale: float) -> torch.Tensor:
    if kind == "uniform":
        return (torch.rand(shape, generator=g, dtype=torch.float64) * 2 - 1) * scale
    return torch.randn(shape, generator=g, dtype=torch.float64) * scale


def _set(param: torch.Tensor, values: torch.Tensor) -> None:
    with torch.no_grad():
        param.data.copy_(values.to(device=param.device, dtype=param.dtype))


def _scaling(module: nn.Module, name: str) -> float:
    s = float(module.scaling[name])
    return s if s != 0 and math.isfinite(s) else 1.0


def _fill_lora(path: str, module: nn.Module, seed: int, sizing: nn.Module) -> None:
    """Fresh values for one LoRA layer's factors: A uniform with unit-rms outputs, B
    normal so that ``scaling * B A x`` has rms ``DELTA_RMS``, any lora bias small.
    ``sizing`` is the layer whose ``r`` and ``scaling`` size B (the reference's)."""
    for name in adapter_names(module):
        g = _generator(seed ^ int.from_bytes(hashlib.sha256(f"{path}/{name}".encode()).digest()[:7], "little"))
        src = sizing if name in getattr(sizing, "scaling", {}) else module
        s, r = _scaling(src, name), int(src.r[name])
        if name in getattr(module, "lora_embedding_A", {}):
            a, b = module.lora_embedding_A[name], module.lora_embedding_B[name]
            _set(a, _values(g, tuple(a.shape), "uniform", math.sqrt(3.0)))  # each looked-up column: rms 1
            _set(b, _values(g, tuple(b.shape), "normal", DELTA_RMS / (s * math.sqrt(r))))
            continue
        a, b = module.lora_A[name], module.lora_B[name]
        fan_in = a.weight.shape[1]
        _set(a.weight, _values(g, tuple(a.weight.shape), "uniform", math.sqrt(3.0 / fan_in)))
        _set(b.weight, _values(g, tuple(b.weight.shape), "normal", DELTA_RMS / (s * math.sqrt(r))))
        if getattr(b, "bias", None) is not None:
            _set(b.bias, _values(g, tuple(b.bias.shape), "normal", DELTA_RMS / s))
    _nudge_magnitudes(path, module, seed)


def _nudge_magnitudes(path: str, module: nn.Module, seed: int) -> None:
    """DoRA magnitudes scaled by ``1 + 0.1 N(0, 1)`` per entry: after the factors are filled the
    norms already differ from the initial magnitudes, and the nudge also makes a forward that
    read the norms (or ones) where the magnitudes belong show."""
    for name, magnitude in getattr(module, "lora_magnitude_vector", {}).items():
        g = _generator(seed ^ int.from_bytes(hashlib.sha256(f"{path}/{name}/m".encode()).digest()[:7], "little"))
        weight = magnitude.weight
        factor = 1.0 + _values(g, tuple(weight.shape), "normal", 0.1)
        _set(weight, weight.detach().double().cpu() * factor)


def assign_shared_values(upstream: nn.Module, reference: nn.Module, seed: int) -> list[str]:
    """Give upstream's adapters fresh, non-zero values and copy every trainable
    parameter into the reference through the shared parameter layout.

    LoRA factors get :func:`_fill_lora` values; any other trainable parameter
    (a modules-to-save copy, a trainable bias) is nudged by 10 % of its rms, so a
    forward that reads the frozen original instead of the copy shows.  The scaling
    used to size B is the reference's (the spec's); both sides get the same numbers
    whatever it is.  Returns the trainable paths that the reference lacks (none when
    the structures agreed).
    """
    ref_layers = dict(lora_layers(reference))
    for path, module in lora_layers(upstream):
        _fill_lora(path, module, seed, ref_layers.get(path, module))
    lora_params = {n for n, _ in upstream.named_parameters() if ".lora_" in n or n.startswith("lora_")}
    g = _generator(seed ^ 0x5EED)
    for name, param in sorted(upstream.named_parameters()):
        if param.requires_grad and param.dtype.is_floating_point and name not in lora_params:
            rms = float(param.detach().double().pow(2).mean().sqrt()) if param.numel() else 0.0
            _set(param, param.detach().double().cpu() + _values(g, tuple(param.shape), "normal", 0.1 * (rms or 0.02)))
    missing = []
    ref_params = dict(reference.named_parameters())
    with torch.no_grad():
        for name, param in upstream.named_parameters():
            if not (param.requires_grad or name in lora_params):
                continue
            target = ref_params.get(name)
            if target is None or target.shape != param.shape:
                missing.append(name)
                continue
            target.data.copy_(param.data.to(target.dtype))
        # Parameters the reference ties (one storage, e.g. ensure_weight_tying's head and embedding
        # factors) hold whichever value was copied last: give upstream's the same values, so a
        # side that does not tie them computes with the same numbers (the tie itself is a snapshot fact).
        up_params = dict(upstream.named_parameters())
        storages: dict[int, list[str]] = {}
        for name, param in reference.named_parameters(remove_duplicate=False):
            if param.numel():
                storages.setdefault(param.data_ptr(), []).append(name)
        for names in storages.values():
            for name in names if len(names) > 1 else ():
                if name in lora_params and name in up_params and name in ref_params and up_params[name].shape == ref_params[name].shape:
                    up_params[name].data.copy_(ref_params[name].data.to(up_params[name].dtype))
    return missing


# -- running -------------------------------------------------------------------------------------


@dataclass
class Run:
    """What one forward (and backward) produced."""

    logits: torch.Tensor | None
    loss: torch.Tensor | None
    grads: dict[str, torch.Tensor | None]
    error: str | None = None
    """``ExcClass: message`` when the forward or backward raised."""


@contextlib.contextmanager
def _mode(model: nn.Module, train: bool) -> Iterator[None]:
    """``model.train(train)``, restored afterwards.

    bitsandbytes 4-bit layers stay in training mode throughout: on a CPU with
    AVX512-BF16, an eval-mode 4-bit forward whose input does not require grad
    repacks the weight in place for an inference kernel (bitsandbytes 0.48+) that has
    no backward and needs widths that are multiples of 64.  Training mode changes
    nothing else in that layer.

    Where no module changes what ``train`` does (:func:`_plain_train`), the flags are
    written directly, module by module, as ``nn.Module.train`` would write them: the
    recursive ``train`` with ``Module.__setattr__`` costs ~1 ms per pass on these models.
    Otherwise (peft's DoRA layer, a kernel-using transformers model) ``model.train`` runs.
    """
    modules = list(model.modules())
    saved = [m.training for m in modules]
    if all(_plain_train(m) for m in modules):
        for m in modules:
            m.__dict__["training"] = train
    else:
        model.train(train)
    for m in modules:
        if _is_bnb_4bit(type(m)):
            m.__dict__["training"] = True
    try:
        yield
    finally:
        for m, flag in zip(modules, saved, strict=True):
            m.__dict__["training"] = flag


def _plain_train(module: nn.Module) -> bool:
    """``module.train(mode)`` only sets ``training`` on itself and its children: its class
    keeps ``nn.Module.train``, or transformers' ``PreTrainedModel.train`` with kernels off (that
    override only re-applies kernels when they are in use)."""
    train = type(module).train
    if train is nn.Module.train:
        return True
    return _is_transformers_train(train) and not getattr(module, "use_kernels", False)


@functools.lru_cache(maxsize=None)
def _is_transformers_train(train: Any) -> bool:
    return getattr(train, "__module__", "") == "transformers.modeling_utils" and train.__qualname__ == "PreTrainedModel.train"


@functools.lru_cache(maxsize=None)
def _is_bnb_4bit(cls: type) -> bool:
    return cls.__name__ == "Linear4bit" and cls.__module__.startswith("bitsandbytes")


def _seed(seed: int, device: torch.device) -> None:
    """Seed the generators a forward on ``device`` draws its dropout masks from.

    What ``torch.manual_seed`` does for that device, without seeding every other backend: on
    a machine without CUDA, ``torch.manual_seed`` queues the CUDA seeding with a formatted
    stack trace, about 90 us a call (torch 2.x), against 1 us for the CPU generator alone."""
    torch.default_generator.manual_seed(seed)
    if device.type == "cuda":
        torch.cuda.manual_seed_all(seed)


def _detach(t: Any) -> torch.Tensor | None:
    return t.detach().clone() if isinstance(t, torch.Tensor) else None


def trainer_autocast(case: Case) -> torch.dtype | None:
    """The mixed precision a trainer runs the case's forward under: ``bf16`` / ``fp16`` of the
    trl level's training arguments (the Trainer wraps each step in ``torch.autocast``); None
    at the peft level and for fp32 training.  fp16 mixed precision needs a GPU (accelerate
    refuses it on the CPU, and CPU autocast cannot mix fp16 with bitsandbytes' kernels), so on
    the CPU an fp16 case runs as it was prepared."""
    t = case.training
    if t.level != "trl":
        return None
    if t.bf16:
        return torch.bfloat16
    return torch.float16 if t.fp16 and t.device == "cuda" else None


def run_model(model: nn.Module, inputs: dict[str, torch.Tensor], *, train: bool, seed: int,
              backward: bool = True, autocast: torch.dtype | None = None) -> Run:
    """One forward on ``inputs`` (and a backward of its loss), dropout active only with ``train``,
    under ``torch.autocast(dtype=autocast)`` when given (what a mixed-precision trainer does).

    The global RNG is forked and seeded with ``seed`` first, so two models that
    draw the same random numbers in the same order (dropout masks) get the same ones.
    """
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    for _, p in trainable:
        p.grad = None
    device = _device(model)
    devices = [torch.cuda.current_device()] if device.type == "cuda" else []
    try:
        with _mode(model, train), torch.random.fork_rng(devices=devices), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _seed(seed, device)
            mixed = (torch.autocast(device_type=device.type, dtype=autocast) if autocast is not None
                     else contextlib.nullcontext())
            with torch.enable_grad() if backward else torch.no_grad(), mixed:
                out = model(**inputs)
                logits = getattr(out, "logits", None)
                loss = getattr(out, "loss", None)
                if backward and isinstance(loss, torch.Tensor) and loss.requires_grad:
                    loss.backward()
    except Exception as exc:  # noqa: BLE001 - a forward that raises is an outcome to compare
        return Run(None, None, {}, error=f"{type(exc).__name__}: {str(exc)[:200]}")
    grads = {n: _detach(p.grad) for n, p in trainable} if backward else {}
    for _, p in trainable:
        p.grad = None
    return Run(_detach(logits), _detach(loss), grads)


@contextlib.contextmanager
def bypassed(model: nn.Module) -> Iterator[None]:
    """Every LoRA layer temporarily replaced by its base layer: the model without adapters."""
    layers = lora_layers(model)
    for path, module in layers:
        model.set_submodule(path, module.base_layer)
    try:
        yield
    finally:
        for path, module in layers:
            model.set_submodule(path, module)
