"""Parameter-level LoRA: ``target_parameters``, and what ``"all-linear"`` means on fused experts.

transformers 5 stores the routed experts of a mixture-of-experts block as 3-D parameters of one
module (``mlp.experts.gate_up_proj`` of shape (experts, 2 * intermediate, hidden) and
``mlp.experts.down_proj``), and its router as a module holding a bare ``weight``.  No Linear is
left there to wrap, so LoRA targets the *parameters* (peft >= 0.17, ``target_parameters``):

* a name in ``target_parameters`` matches the key ``<module>.<parameter>`` exactly or as a dotted
  suffix (``gate_up_proj`` matches ``model.layers.0.mlp.experts.gate_up_proj``); names are taken
  in sorted order and a module's own parameters in their registration order;
* each targeted parameter gets one wrapper around its module, and a second parameter of the same
  module wraps the first wrapper (``experts.base_layer.base_layer.gate_up_proj``);
* the wrapper holds ``lora_A`` = Linear(in, r * experts) and ``lora_B`` = Linear(r * experts, out),
  in the parameter's dtype (then the adapter dtype policy), initialised as a Linear's factors; a
  3-D parameter is (experts, out, in) unless its module says ``is_transposed`` (experts, in, out),
  a 2-D one (out, in) with one expert;
* during the forward the parameter reads ``W + scaling * B_e @ A_e`` per expert ``e``, where
  ``A_e`` is rows ``e*r .. e*r + r`` of A and ``B_e`` the columns ``e, e + experts, ...`` of B (the
  checkpoint layout peft writes), folded in the parameter's dtype (:meth:`LoraParam.effective`);
* it refuses dropout, ``fan_in_fan_out``, ``lora_bias`` and DoRA (a ValueError), in that order,
  and the init variants that decompose a weight (the reference's own ValueError: peft crashes,
  registered).

The MoE config conversion (peft >= 0.19 with transformers 5, profile rule ``moe_conversion``)
keeps the transformers-4 meaning of the user's targets on the fused families: the v4 names of the
experts' projections and of the router become parameter targets, and fusing two projections into
one parameter doubles its rank and alpha (``rank_pattern`` / ``alpha_pattern`` keys
``.*\\.gate_up_proj``), so that alpha / r is kept.  ``"all-linear"`` reaches every Linear (as on
any model) plus every fused parameter and the router.  Naming one half of a fused pair alone is a
ValueError.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from reference.errors import InvalidConfig, InvalidRank
from reference.inits import variant_family
from reference.layers import init_linear_factors
from reference.rules import adapter_dtype, scaling

__all__ = ["FAMILIES", "LoraParam", "MoeConversion", "add_parameter_adapter", "convert_moe_targets", "inject_parameters"]


@dataclass(frozen=True)
class Family:
    """One family of fused-expert layouts: v4 name -> v5 target, and which v4 names fuse."""

    renames: tuple[tuple[str, str], ...]
    fused: tuple[tuple[str, tuple[str, ...]], ...]


FAMILIES: dict[str, Family] = {
    "mixtral": Family(
        renames=(("gate", "gate.weight"), ("w1", "gate_up_proj"), ("w3", "gate_up_proj"), ("w2", "down_proj")),
        fused=(("gate_up_proj", ("w1", "w3")),),
    ),
    "qwen2_moe": Family(
        renames=(("gate", "gate.weight"), ("gate_proj", "gate_up_proj"), ("up_proj", "gate_up_proj"),
                 ("down_proj", "down_proj")),
        fused=(("gate_up_proj", ("gate_proj", "up_proj")),),
    ),
}
FAMILY_OF = {"mixtral": "mixtral", "qwen2_moe": "qwen2_moe", "qwen3_moe": "qwen2_moe", "olmoe": "qwen2_moe"}
"""The model types of each family (the zoo's; transformers maps more types to the two layouts)."""


@dataclass(frozen=True)
class MoeConversion:
    """The targets after conversion, and what the stored config then says."""

    modules: Any
    """Module targets: a frozenset of full names (a string or ``all-linear`` target resolved) or
    the remaining list names."""
    parameters: frozenset[str]
    rank_pattern: tuple[tuple[str, int], ...]
    alpha_pattern: tuple[tuple[str, float], ...]
    stored_modules: Any
    """``target_modules`` as the stored config holds it: leaf names for a resolved string."""


def _fused_layout(model: nn.Module, family: Family) -> bool:
    """Whether ``model`` has its experts fused (transformers 5): a 3-D parameter of a fused name."""
    names = {new for _, new in family.renames}
    return any(p.dim() == 3 and key.rpartition(".")[2] in names for key, p in model.named_parameters())


def convert_moe_targets(model: nn.Module, modules: Any, r: int, alpha: float, rank_pattern: tuple,
                        alpha_pattern: tuple, all_linear: frozenset[str] | None) -> MoeConversion | None:
    """The converted targets of a fused-expert model, or None when no conversion applies.

    ``modules`` are the effective module targets (a list, a regex, or ``all_linear``'s set when
    the user said ``"all-linear"``)."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    family = FAMILIES.get(FAMILY_OF.get(model_type, ""))
    if family is None or not _fused_layout(model, family) or modules is None:
        return None
    renames = dict(family.renames)
    named: set[str] = set()  # the v4 names the targets meant
    if all_linear is not None:
        kept = all_linear
        named = set(renames)
        stored = frozenset(k.rpartition(".")[2] for k in kept)
    elif isinstance(modules, str):
        keys = [k for k, _ in model.named_modules() if k]
        matched = {k for k in keys if re.fullmatch(modules, k)}
        containers = {key.rpartition(".")[0] for key, _ in model.named_parameters()}
        for old in renames:
            if any(re.fullmatch(modules, f"{c}.{old}") for c in containers) or any(
                    k.rpartition(".")[2] == old for k in matched):
                named.add(old)
        # a matched Linear keeps its LoRA (qwen2_moe's shared expert); the router module is converted
        linear = {k for k, m in model.named_modules() if isinstance(m, nn.Linear)}
        kept = frozenset(k for k in matched if k.rpartition(".")[2] not in renames or k in linear)
        stored = frozenset(k.rpartition(".")[2] for k in kept)
    else:
        keys = [k for k, _ in model.named_modules() if k]
        kept_names = []
        for name in modules:
            old = next((o for o in renames if name == o or name.endswith("." + o)), None)
            if old is not None:
                named.add(old)
            # a v4 name that still names real modules (qwen2_moe's shared expert) keeps them targeted
            if old is None or any(k == name or k.endswith("." + name) for k in keys):
                kept_names.append(name)
        kept = frozenset(kept_names)
        stored = kept
    if not named:
        return None
    for new, halves in family.fused:
        present = [h for h in halves if h in named]
        if 0 < len(present) < len(halves):
            missing = ", ".join(sorted(set(halves) - set(present)))
            raise InvalidConfig("moe_fused_half", f"Cannot convert target(s) {', '.join(sorted(present))} without "
                                                  f"also targeting {missing}: they are fused into {new}")
    extra_r, extra_alpha = [], []
    for new, halves in family.fused:
        if all(h in named for h in halves):
            key = rf".*\.{re.escape(new)}"
            extra_r.append((key, r * len(halves)))
            extra_alpha.append((key, alpha * len(halves)))
    return MoeConversion(
        modules=kept,
        parameters=frozenset(renames[o] for o in named),
        rank_pattern=tuple(dict((*rank_pattern, *extra_r)).items()),
        alpha_pattern=tuple(dict((*alpha_pattern, *extra_alpha)).items()),
        stored_modules=stored,
    )


def _unwrapped(name: str) -> str:
    return re.sub(r"(^|\.)base_layer(?=\.|$)", "", name).lstrip(".")


class LoraParam(nn.Module):
    """LoRA on one parameter of ``base_layer`` (a module, or another LoraParam of the same module)."""

    def __init__(self, base_layer: nn.Module, parameter_name: str) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.parameter_name = parameter_name
        shape = tuple(self.param().shape)
        if len(shape) == 3:
            transposed = bool(getattr(self.host(), "is_transposed", False))
            self.num_experts = shape[0]
            self.in_features, self.out_features = (shape[1], shape[2]) if transposed else (shape[2], shape[1])
        elif len(shape) == 2:
            self.num_experts, self.out_features, self.in_features = 1, shape[0], shape[1]
        else:
            raise InvalidConfig("param_wrapper_ndim", f"only 2-D and 3-D parameters take LoRA, got {len(shape)}-D")
        self.transposed = len(shape) == 3 and bool(getattr(self.host(), "is_transposed", False))
        self.fan_in_fan_out = False
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.lora_dropout = nn.ModuleDict()
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.active_adapters: list[str] = []

    def host(self) -> nn.Module:
        module = self.base_layer
        while isinstance(module, LoraParam):
            module = module.base_layer
        return module

    def param(self) -> torch.Tensor:
        return getattr(self.host(), self.parameter_name)

    def add_adapter(self, name: str, p: Any) -> None:
        """``p``: ``reference.layers.AdapterParams``."""
        what = "lora.ParamWrapper"
        for bad, label in ((p.dropout, "lora_dropout != 0"), (p.fan_in_fan_out, "fan_in_fan_out"),
                           (p.lora_bias, "lora_bias=True"), (p.use_dora, "use_dora=True")):
            if bad:
                raise InvalidConfig("param_wrapper_unsupported", f"{what} does not work with {label}.")
        if isinstance(p.r, bool) or not isinstance(p.r, int) or p.r <= 0:
            raise InvalidRank(f"`r` should be a positive integer value but the value passed is {p.r!r}")
        if variant_family(p.init, p.init_variants) is not None:
            raise InvalidConfig("param_wrapper_init_unsupported",
                                f"init_lora_weights={p.init!r} decomposes a weight; parameter targets have none")
        self.r[name], self.lora_alpha[name] = p.r, p.alpha
        self.scaling[name] = scaling(p.alpha, p.r, p.use_rslora)
        self.lora_dropout[name] = nn.Identity()
        a = nn.Linear(self.in_features, p.r * self.num_experts, bias=False)
        b = nn.Linear(p.r * self.num_experts, self.out_features, bias=False)
        if p.init is not False:
            init_linear_factors(a, b, p.init, p.r)
        param = self.param()
        dtype = adapter_dtype(param.dtype, p.autocast)
        for t in (a.weight, b.weight):
            t.data = t.data.to(device=param.device, dtype=dtype)
        self.lora_A[name], self.lora_B[name] = a, b
        if name not in self.active_adapters:
            self.active_adapters.append(name)

    def factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(lhs, rhs) per expert, with ``lhs @ rhs`` laid out like the parameter: (B_e, A_e), or
        (A_e^T, B_e^T) for a transposed (experts, in, out) parameter."""
        a, b, e = self.lora_A[name].weight, self.lora_B[name].weight, self.num_experts
        a_e = a.reshape(e, -1, a.shape[-1])  # (experts, r, in)
        b_e = b.reshape(b.shape[0], -1, e).permute(2, 0, 1)  # (experts, out, r)
        return (a_e.transpose(-2, -1), b_e.transpose(-2, -1)) if self.transposed else (b_e, a_e)

    def delta(self, name: str) -> torch.Tensor:
        """``scaling * B_e @ A_e`` for every expert, shaped like the parameter, in its dtype (a 2-D
        parameter's product is taken in fp32 where the factors are half precision)."""
        a, b = self.lora_A[name].weight, self.lora_B[name].weight
        param = self.param()
        if self.num_experts == 1 and param.dim() == 2:
            d = b.float() @ a.float() if a.dtype in (torch.float16, torch.bfloat16) else b @ a
        else:
            lhs, rhs = self.factors(name)
            d = lhs @ rhs
        return (d * self.scaling[name]).to(param.dtype)

    def effective(self, original: torch.Tensor, active: list[str]) -> torch.Tensor:
        """What the module computes with: one adapter on a stack of experts is folded in by a
        single batched multiply-add in the parameter's dtype (factors cast to it, no autocast);
        otherwise the deltas are added."""
        if len(active) == 1 and self.num_experts > 1:
            lhs, rhs = self.factors(active[0])
            with torch.autocast(device_type=original.device.type, enabled=False):
                return torch.baddbmm(original, lhs.to(original.dtype), rhs.to(original.dtype),
                                     alpha=self.scaling[active[0]])
        value = original
        for name in active:
            value = value + self.delta(name)
        return value

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        host, pname = self.host(), self.parameter_name
        active = [n for n in self.active_adapters if n in self.lora_A]
        if not active:
            return self.base_layer(x, *args, **kwargs)
        original = host._parameters[pname]
        value = self.effective(original, active)
        del host._parameters[pname]
        setattr(host, pname, value)
        try:
            return self.base_layer(x, *args, **kwargs)
        finally:
            delattr(host, pname)
            host._parameters[pname] = original


def add_parameter_adapter(model: nn.Module, names: frozenset[str], adapter: str, make_params) -> list[str]:
    """``add_adapter`` for parameter targets: every wrapped parameter whose key matches ``names``
    takes the adapter ``adapter`` in its existing wrapper (nested wrappers each take it; upstream
    updates a ParamWrapper rather than nesting another), and a matching parameter not wrapped yet
    gets a wrapper of its own.  The adapters active before stay active.  Returns the keys."""
    targets = sorted(names)
    done: list[str] = []

    def matches(key: str) -> bool:
        return any(key == t or key.endswith("." + t) for t in targets)

    for path, module in list(model.named_modules()):
        if isinstance(module, LoraParam):
            key = f"{_unwrapped(path)}.{module.parameter_name}"
            if matches(key):
                before = list(module.active_adapters)
                module.add_adapter(adapter, make_params(key))
                module.active_adapters = before
                done.append(key)
    fresh = frozenset(t for t in targets if not any(k == t or k.endswith("." + t) for k in done))
    if fresh:
        for key in inject_parameters(model, fresh, make_params, (), adapter=adapter):
            done.append(key)
    return done


def inject_parameters(model: nn.Module, names: frozenset[str], make_params, lora_layer_types: tuple[type, ...],
                      adapter: str = "default") -> list[str]:
    """Wrap every parameter whose key matches ``names`` with the adapter ``adapter``;
    ``make_params(key)`` gives its ``AdapterParams``.  Returns the keys wrapped (the caller
    judges an empty list)."""
    targets = sorted(names)
    wrapped: list[str] = []
    for module_name, module in list(model.named_modules()):
        owner = _unwrapped(module_name)
        for pname, _ in list(module.named_parameters(recurse=False)):
            key = f"{owner}.{pname}" if owner else pname
            if not any(key == t or key.endswith("." + t) for t in targets):
                continue
            if not owner:
                raise InvalidConfig("param_on_top_module", f"cannot target parameter {pname!r} of the top-level module")
            current = model.get_submodule(owner)
            if isinstance(current, lora_layer_types):
                raise InvalidConfig("param_on_lora_module",
                                    f"Trying to wrap an `nn.Parameter` of layer {owner!r}, which is not a valid "
                                    "target: it is also targeted with target_modules")
            layer = LoraParam(current, pname)
            layer.add_adapter(adapter, make_params(key))
            model.set_submodule(owner, layer)
            wrapped.append(key)
    return wrapped
