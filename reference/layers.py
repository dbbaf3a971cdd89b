"""The reference's LoRA layers, laid out like PEFT's public checkpoints.

Parameter paths are ``<module>.base_layer.weight``, ``<module>.lora_A.<adapter>.weight``,
``<module>.lora_B.<adapter>.weight`` (and ``.bias`` with ``lora_bias``) for
linear-like bases, and ``<module>.lora_embedding_A.<adapter>`` /
``lora_embedding_B.<adapter>`` for embeddings, so adapters interoperate with PEFT.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from reference import dora, inits, loftq
from reference.errors import InvalidConfig, InvalidRank, LoraBiasUnsupported
from reference.notices import warn
from reference.rules import adapter_dtype, scaling

__all__ = ["AdapterParams", "LoraEmbedding", "LoraLinear", "SavedModule", "init_linear_factors"]


@dataclass(frozen=True)
class AdapterParams:
    """Resolved hyper-parameters of one adapter on one module."""

    r: int
    alpha: float
    dropout: float
    use_rslora: bool
    init: object
    """True, False, ``"gaussian"`` or one of ``init_variants`` (``reference.inits``)."""
    lora_bias: bool
    autocast: bool
    use_dora: bool = False
    """DoRA: a trainable magnitude beside the factors (``reference.dora``)."""
    dora_update_rounded_first: bool = False
    """On a bitsandbytes layer, the DoRA update is rounded to the base output's dtype before it
    is added, like a plain LoRA update (profile rule, peft 0.15); later the sum is rounded once."""
    dora_norm_update_in_input_dtype: bool = True
    """DoRA's forward scales ``B @ A`` in the input's dtype, not the autocast dtype (profile rule)."""
    follow_4bit_compute: bool = True
    """Factors on a bnb 4-bit layer follow its compute dtype (profile rule)."""
    warn_no_base_bias: bool = True
    """Warn when ``lora_bias`` meets a layer without a bias (profile rule)."""
    init_variants: tuple[str, ...] = ()
    """The ``init_lora_weights`` strings beyond ``"gaussian"`` that this era knows (profile)."""
    fan_in_fan_out: bool = False
    """The shared flag as the layer finds it (parameter targets refuse it; ``reference.params``)."""
    loftq_config: tuple[tuple[str, int], ...] = ()
    """``loftq_config`` as (key, value) pairs (``reference.loftq``)."""
    loftq_quantizers: tuple[tuple[int, str], ...] = ()
    """The profile's LoftQ (bits, quantizer) pairs."""


def _check_rank(r: object) -> int:
    if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
        raise InvalidRank(f"`r` should be a positive integer value but the value passed is {r!r}")
    return r


def _weight_dtype(base: nn.Module, follow_4bit_compute: bool) -> torch.dtype:
    """The dtype new factors follow: a 4-bit layer's compute dtype (where the profile
    says so), else its weight's."""
    compute = getattr(base, "compute_dtype", None)
    if follow_4bit_compute and type(base).__name__ == "Linear4bit" and compute is not None:
        return compute
    return base.weight.dtype


def init_linear_factors(a: nn.Linear, b: nn.Linear, init: object, r: int) -> None:
    """A Linear-like layer's default factor init: A He-uniform (``"gaussian"``: normal with std
    1/r), B and its bias zero, so the update starts at zero."""
    with torch.no_grad():
        if init == "gaussian":
            nn.init.normal_(a.weight, std=1.0 / r)
        else:
            # He-uniform with a = sqrt(5): the bound is 1/sqrt(fan_in), like nn.Linear's own init.
            nn.init.kaiming_uniform_(a.weight, a=math.sqrt(5))
        nn.init.zeros_(b.weight)
        if b.bias is not None:
            nn.init.zeros_(b.bias)


class _LoraBase(nn.Module):
    """State shared by the reference's LoRA layers."""

    def __init__(self, base_layer: nn.Module, in_features: int, out_features: int) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.in_features = in_features
        self.out_features = out_features
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.lora_bias: dict[str, bool] = {}
        self.lora_dropout = nn.ModuleDict()
        self.lora_magnitude_vector = nn.ModuleDict()
        self.dora_update_rounded_first: dict[str, bool] = {}
        self.dora_norm_update_in_input_dtype: dict[str, bool] = {}
        self.active_adapters: list[str] = []

    # Model code reads the wrapped module's tensors (t5's feed-forward compares its
    # hidden states' dtype with ``wo.weight.dtype``); like PEFT's layers, the wrapper
    # answers with its base layer's.
    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return getattr(self.base_layer, "bias", None)

    def _common(self, name: str, p: AdapterParams) -> None:
        _check_rank(p.r)
        if p.dropout > 1.0:
            raise InvalidConfig("invalid_dropout", f"lora_dropout={p.dropout!r} must be between 0 and 1")
        self.r[name] = p.r
        self.lora_alpha[name] = p.alpha
        self.scaling[name] = scaling(p.alpha, p.r, p.use_rslora)
        self.lora_bias[name] = p.lora_bias
        self.lora_dropout[name] = nn.Dropout(p=p.dropout) if p.dropout > 0.0 else nn.Identity()
        if name not in self.active_adapters:
            self.active_adapters.append(name)

    def _place(self, params: list[torch.Tensor], p: AdapterParams) -> None:
        """Move new factors to the base layer's device and the policy's dtype."""
        weight = self.base_layer.weight
        dtype = adapter_dtype(_weight_dtype(self.base_layer, p.follow_4bit_compute), p.autocast)
        for t in params:
            t.data = t.data.to(device=weight.device, dtype=dtype)


class LoraLinear(_LoraBase):
    """LoRA around a linear-like base: ``nn.Linear``, transformers ``Conv1D``, bnb 4/8-bit."""

    def __init__(self, base_layer: nn.Module, in_features: int, out_features: int, fan_in_fan_out: bool) -> None:
        super().__init__(base_layer, in_features, out_features)
        self.fan_in_fan_out = fan_in_fan_out
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()

    def add_adapter(self, name: str, p: AdapterParams) -> None:
        kind = inits.init_kind(p.init, p.init_variants)
        self._common(name, p)
        if p.lora_bias and p.warn_no_base_bias and getattr(self.base_layer, "bias", None) is None:
            warn(
                "lora_bias_without_base_bias",
                f"lora_bias=True on a {type(self.base_layer).__name__} without a bias: merging is impossible",
            )
        a = nn.Linear(self.in_features, p.r, bias=False)
        b = nn.Linear(p.r, self.out_features, bias=p.lora_bias)
        self.lora_A[name] = a
        self.lora_B[name] = b
        if kind in inits.RESIDUAL_INITS:
            self._init_residual(kind, a, b, name, p)
        elif kind == "orthogonal":
            weight = self.base_layer.weight
            dtype = weight.dtype if weight.dtype.is_floating_point else torch.float32
            a.weight.data, b.weight.data = inits.orthogonal_factors(self.in_features, self.out_features, p.r, dtype)
        elif kind != "none":
            self._init(a, b, p)
        self._place(list(a.parameters()) + list(b.parameters()), p)
        if p.use_dora:
            self.dora_update_rounded_first[name] = p.dora_update_rounded_first
            self.dora_norm_update_in_input_dtype[name] = p.dora_norm_update_in_input_dtype
            dtype = dora.magnitude_dtype(self.base_layer, a.weight.dtype)
            norm = dora.linear_norm(self.base_layer, self.fan_in_fan_out, a.weight.detach(), b.weight.detach(),
                                    self.scaling[name], dtype)
            self.lora_magnitude_vector[name] = dora.Magnitude(norm.to(device=a.weight.device, dtype=dtype))

    def _init_residual(self, kind: str, a: nn.Linear, b: nn.Linear, name: str, p: AdapterParams) -> None:
        """OLoRA / PiSSA / LoftQ: factors from the dense (out, in) weight; the base keeps the
        residual (LoftQ: the quantized weight)."""
        inits.check_residual_base(kind, self.base_layer)
        niter = inits.pissa_niter(p.init) if kind == "pissa_niter" else None  # (after the base check, as peft)
        weight = dora.dense_weight(self.base_layer)
        dense = weight.T if self.fan_in_fan_out else weight
        if kind == "loftq":
            a.weight.data, b.weight.data, residual = loftq.loftq_factors(dense, self.r[name], p.loftq_config,
                                                                         p.loftq_quantizers)
        else:
            a.weight.data, b.weight.data, residual = inits.residual_factors(kind, dense, self.r[name],
                                                                            self.scaling[name], niter)
        inits.write_residual(self.base_layer, residual, self.fan_in_fan_out)

    def _init(self, a: nn.Linear, b: nn.Linear, p: AdapterParams) -> None:
        init_linear_factors(a, b, p.init, p.r)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        out_dtype = result.dtype
        # Plain Linear / Conv1D: the input is cast to the factors' dtype, the update added in the
        # promoted dtype (fp32 factors beside a bf16 base add in fp32) and the sum rounded to the
        # base output's dtype once, at the end.  bitsandbytes bases convert only where
        # `torch.is_autocast_enabled()` (CUDA's autocast state, whatever the device: on the CPU it
        # is False even under CPU autocast) says no autocast runs; then the scaled update is first
        # rounded to the base output's dtype and added in that dtype: two roundings (observed in
        # peft 0.15 - 0.21; it shows as ~1e-3 gradient differences when a 4-bit model's
        # activations stay fp16/bf16).  A DoRA update there is rounded with the sum (peft 0.16+)
        # or first (0.15: AdapterParams.dora_update_rounded_first).
        bnb = type(self.base_layer).__module__.startswith("bitsandbytes")
        convert = not bnb or not torch.is_autocast_enabled()
        for name in self.active_adapters:
            if name not in self.lora_A:
                continue  # active for the model, not held here (a layer another adapter created)
            a, b = self.lora_A[name], self.lora_B[name]
            h = self.lora_dropout[name](x.to(a.weight.dtype) if convert else x)
            if name in self.lora_magnitude_vector:
                reuse = isinstance(self.lora_dropout[name], nn.Identity) or not self.training
                bias = getattr(self.base_layer, "bias", None)
                base_result = (result - bias if bias is not None else result) if reuse else None
                update = dora.linear_update(self.base_layer, self.fan_in_fan_out, a, b, self.scaling[name],
                                            self.lora_magnitude_vector[name].weight, h, base_result,
                                            self.dora_norm_update_in_input_dtype[name])
                round_first = bnb and convert and self.dora_update_rounded_first[name]
            else:
                update = b(a(h)) * self.scaling[name]
                round_first = bnb and convert
            result = result + (update.to(out_dtype) if round_first else update)
        return result.to(out_dtype) if convert else result


class LoraEmbedding(_LoraBase):
    """LoRA around ``nn.Embedding``: factors are bare parameters, A is (r, vocab)."""

    def __init__(self, base_layer: nn.Embedding) -> None:
        super().__init__(base_layer, base_layer.num_embeddings, base_layer.embedding_dim)
        self.fan_in_fan_out = False
        self.lora_embedding_A = nn.ParameterDict()
        self.lora_embedding_B = nn.ParameterDict()

    def add_adapter(self, name: str, p: AdapterParams) -> None:
        if p.lora_bias:
            raise LoraBiasUnsupported(f"lora_bias={p.lora_bias} is not supported for {type(self).__name__}.")
        self._common(name, p)
        a = torch.randn(p.r, self.in_features)
        b = torch.randn(self.out_features, p.r)
        if p.init is not False:
            # Every other value, "gaussian" and unknown strings included, gives the
            # embedding default: A zero, B standard normal (observed in peft 0.21).
            nn.init.zeros_(a)
            nn.init.normal_(b)
        self.lora_embedding_A[name] = nn.Parameter(a)
        self.lora_embedding_B[name] = nn.Parameter(b)
        self._place([self.lora_embedding_A[name], self.lora_embedding_B[name]], p)
        if p.use_dora:
            placed_a, placed_b = self.lora_embedding_A[name].detach(), self.lora_embedding_B[name].detach()
            dtype = dora.magnitude_dtype(self.base_layer, placed_a.dtype)
            norm = dora.embedding_norm(dora.dense_weight(self.base_layer), placed_a, placed_b, self.scaling[name], dtype)
            self.lora_magnitude_vector[name] = dora.Magnitude(norm.to(device=placed_a.device, dtype=dtype))

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        out_dtype = result.dtype
        base = self.base_layer
        for name in self.active_adapters:
            if name not in self.lora_embedding_A:
                continue
            a = self.lora_embedding_A[name].T
            b = self.lora_embedding_B[name].T
            after_a = F.embedding(x, a, base.padding_idx, base.max_norm, base.norm_type, base.scale_grad_by_freq, base.sparse)
            update = (after_a @ b) * self.scaling[name]
            # A scaled embedding (transformers' *ScaledWordEmbedding: gemma, bart, ... with an
            # `embed_scale`) multiplies its output; the update is scaled alike, so that the
            # unmerged forward equals the merged weight's (peft >= 0.18, huggingface/peft#2825).
            embed_scale = getattr(base, "embed_scale", None)
            if embed_scale is not None:
                update = update * torch.as_tensor(embed_scale, device=update.device).to(update.dtype)
            if name in self.lora_magnitude_vector:
                with torch.no_grad():
                    a_emb = self.lora_embedding_A[name]
                    norm = dora.embedding_norm(base.weight, a_emb, self.lora_embedding_B[name], self.scaling[name],
                                               a_emb.dtype)
                scale = self.lora_magnitude_vector[name].weight / norm
                result = scale * (result + update)
                continue
            result = result + update
        return result.to(out_dtype)


class SavedModule(nn.Module):
    """A module trained in full: the frozen original beside one trainable copy per adapter."""

    def __init__(self, original: nn.Module, adapter: str, *, trains: bool = True,
                 trained_copy: nn.Module | None = None) -> None:
        super().__init__()
        self.original_module = original
        for param in original.parameters():
            if trains and not param.dtype.is_floating_point:
                raise InvalidConfig(
                    "saved_module_quantized",
                    f"modules_to_save cannot train a quantized module ({type(original).__name__}); "
                    "keep it unquantized (llm_int8_skip_modules)",
                )
        # (a tied module's trained copy is given: reference.tying)
        self.modules_to_save = nn.ModuleDict({adapter: copy.deepcopy(original) if trained_copy is None else trained_copy})
        self.active_adapter = adapter
        for param in original.parameters():
            param.requires_grad = False
        for param in self.modules_to_save[adapter].parameters():
            param.requires_grad = trains

    def add_copy(self, adapter: str) -> None:
        """A frozen copy for another adapter (``reference.adapters``), not active."""
        self.modules_to_save[adapter] = copy.deepcopy(self.original_module)
        for param in self.modules_to_save[adapter].parameters():
            param.requires_grad = False

    def forward(self, *args, **kwargs):
        if self.active_adapter is None:  # no copy for the active adapter: the original runs
            return self.original_module(*args, **kwargs)
        return self.modules_to_save[self.active_adapter](*args, **kwargs)

    def __getattr__(self, name: str):
        # Attribute reads (e.g. `weight`, `decoder`) fall through to the active copy.
        # nn.Module.__getattr__ only sees parameters, buffers and submodules, so the
        # plain attribute `active_adapter` is read from the instance dict.
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("modules_to_save", "active_adapter"):
                raise
            active = self.__dict__.get("active_adapter", False)
            copies = self._modules.get("modules_to_save")
            if active is False or copies is None:
                raise
            return getattr(copies[active] if active is not None else self._modules["original_module"], name)
