"""Several adapters on one model: ``add_adapter(name, config)`` and ``set_adapter(name)``.

Observed on peft 0.15.2 and 0.21.2 (CPU, llama / gpt2), after ``get_peft_model`` built ``default``:

* **add_adapter** resolves the new config's targets on the prepared model: a module that already
  has LoRA gets the new adapter beside the old one, any other target gets a new LoRA layer.  The
  new adapter is *not* active: its factors are frozen, each layer's active adapters stay what they
  were (a new layer is active for the current adapters even though it does not hold them, so its
  forward is the base layer's), and the PEFT model's active adapter is unchanged.  Its modules to
  save get a copy for the new adapter, frozen and inactive (a module not saved before is wrapped,
  its forward still the original's).  peft 0.15 makes that copy active and trainable: registry
  ``new-adapter-saved-copy-active``.
* **set_adapter(name)** makes ``name`` the active adapter of every LoRA layer and every saved
  module that holds it (a saved module that does not falls back to its original): ``name``'s
  factors and copies train, every other adapter's are frozen.  The PEFT model then reports
  ``name`` as active and stores its config.
* The new adapter's factors follow ``add_adapter``'s own ``autocast_adapter_dtype`` (peft >= 0.19:
  True, fp32 over a half-precision base; before: the base's dtype; profile rule
  ``add_adapter_autocasts``), whatever ``get_peft_model`` was given.
* peft 0.15 - 0.18 train the *original* of a saved module that has no copy for the adapter
  ``set_adapter`` switches to (registry ``set-adapter-trains-original-of-unsaved-module``).
* A classification PEFT model (SEQ_CLS / TOKEN_CLS) appends its head names (``classifier``,
  ``score``) to the new config's modules to save, so the head gets a copy for the new adapter.
* Two adapters whose ``bias`` is not ``"none"`` are refused (``ValueError``: peft supports one
  adapter with biases).

The cases keep both adapters plain (no DoRA, init variants, trainable tokens, tying, parameter
targets, inference mode or bias mode: how peft re-marks biases when an adapter is added changed
between releases and is not modelled yet) and give the second one list targets
(``strategies.adapters``).
"""

from __future__ import annotations

import dataclasses

from torch import nn

from reference.config import resolve
from reference.dispatch import wrap
from reference.errors import InvalidConfig
from reference.layers import AdapterParams, LoraEmbedding, LoraLinear, SavedModule
from reference.peft_model import CLASSIFIER_NAMES, PeftWrapper, condensed_targets, stored_config
from reference.profiles import Profile
from reference.spec import ABSENT, AdapterSpec
from reference.params import add_parameter_adapter
from reference.targets import effective_targets, iter_targets, pattern_value

__all__ = ["SECOND", "add_adapter", "set_adapter", "with_second_adapter"]

SECOND = "second"
"""The name the cases give the added adapter."""

_LORA = (LoraLinear, LoraEmbedding)
CLASSIFIER_WRAPPERS = ("PeftModelForSequenceClassification", "PeftModelForTokenClassification")


@dataclasses.dataclass
class Adapters:
    """What the PEFT wrapper knows of its adapters: the stored config of each, the active one."""

    wrapper: str
    active: list[str]
    configs: dict[str, dict]

    def facts(self) -> PeftWrapper:
        return PeftWrapper(self.wrapper, tuple(self.active), self.configs[self.active[0]])


def adapters_of(wrapper: PeftWrapper, adapter: str) -> Adapters:
    return Adapters(wrapper.wrapper, list(wrapper.active_adapters), {adapter: dict(wrapper.config)})


def _inside_lora(key: str, model: nn.Module) -> bool:
    """A module inside a LoRA layer or a saved module (a base layer, a factor, a copy)."""
    parts = key.split(".")
    for i in range(1, len(parts)):
        parent = model.get_submodule(".".join(parts[:i]))
        if isinstance(parent, (*_LORA, SavedModule)):
            return True
    return False


def add_adapter(model: nn.Module, adapters: Adapters, name: str, spec: AdapterSpec, profile: Profile) -> None:
    """``peft_model.add_adapter(name, LoraConfig(**spec))`` on a prepared ``model``."""
    settings = resolve(spec, profile)
    biased = [n for n, c in adapters.configs.items() if c.get("bias", "none") != "none"]
    if biased and settings.bias != "none":
        raise InvalidConfig("several_adapters_with_bias",
                            f"adapter {name!r} has bias={settings.bias!r} and {biased[0]!r} has biases too: "
                            "one adapter may train biases, set bias='none' for the others")
    autocast = profile.add_adapter_autocasts  # add_adapter's own rule, whatever get_peft_model was given
    resolved = effective_targets(model, settings, profile)
    fifo = settings.fan_in_fan_out
    before = list(adapters.active)

    def params_of(r: int, alpha: float) -> AdapterParams:
        return AdapterParams(
            r=r, alpha=alpha, dropout=settings.lora_dropout, use_rslora=settings.use_rslora,
            init=settings.init_lora_weights, lora_bias=settings.lora_bias, autocast=autocast,
            dora_update_rounded_first=profile.dora_bnb_update_rounded_first,
            dora_norm_update_in_input_dtype=profile.dora_norm_update_in_input_dtype,
            follow_4bit_compute=profile.adapter_dtype_follows_4bit_compute,
            warn_no_base_bias=profile.warns_lora_bias_without_base_bias, init_variants=profile.init_variants,
            fan_in_fan_out=fifo, loftq_config=settings.loftq_config, loftq_quantizers=profile.loftq_quantizers)

    for target in iter_targets(model, settings, profile, tuple(settings.modules_to_save or ()), targets=resolved):
        if _inside_lora(target.name, model):
            continue
        params = params_of(target.r, target.alpha)
        layer = target.module
        if not isinstance(layer, _LORA):
            layer, fifo = wrap(target.name, layer, fifo, profile.embedding_keeps_fan_in_fan_out)
            model.set_submodule(target.name, layer)
        layer.add_adapter(name, params)
        layer.active_adapters = list(before)
    if settings.target_parameters:  # (a stored config holds the MoE conversion's parameters: reference.params)
        add_parameter_adapter(model, frozenset(settings.target_parameters), name, lambda key: params_of(
            pattern_value(key, settings.rank_pattern, settings.r), pattern_value(key, settings.alpha_pattern,
                                                                                 settings.lora_alpha)))
    for path, param in model.named_parameters():
        if f".{name}." in f".{path}." and ".lora_" in path:
            param.requires_grad = False
    for key, module in list(model.named_modules()):
        if not key or not any(key.endswith(n) for n in settings.modules_to_save or ()) or _inside_lora(key, model):
            continue
        if not isinstance(module, SavedModule):
            module = SavedModule(module, name, trains=False)
            module.active_adapter = None
            model.set_submodule(key, module)
        else:
            module.add_copy(name)
    stored = stored_config(settings, condensed_targets(resolved, (n for n, _ in model.named_modules())), fifo)
    adapters.configs[name] = stored


def set_adapter(model: nn.Module, adapters: Adapters, name: str) -> None:
    """``peft_model.set_adapter(name)``: ``name`` active and trainable, every other adapter frozen."""
    if name not in adapters.configs:
        raise InvalidConfig("unknown_adapter", f"adapter {name!r} does not exist")
    for module in model.modules():
        if isinstance(module, _LORA):
            module.active_adapters = [name]
            for path, param in module.named_parameters():
                if ".lora_" in f".{path}" or path.startswith("lora_"):
                    param.requires_grad = f".{name}." in f".{path}." or path.endswith(f".{name}")
        elif isinstance(module, SavedModule):
            module.active_adapter = name if name in module.modules_to_save else None
            for copy_name, copy in module.modules_to_save.items():
                for param in copy.parameters():
                    param.requires_grad = copy_name == name and param.dtype.is_floating_point
    adapters.active = [name]


def with_second_adapter(model: nn.Module, wrapper: PeftWrapper, case, profile: Profile) -> PeftWrapper:
    """The second adapter of ``case`` added to the prepared ``model`` (and ``set_adapter`` as the
    case asks); returns the PEFT wrapper's facts afterwards."""
    from reference.prepare import ADAPTER

    adapters = adapters_of(wrapper, ADAPTER)
    second = case.second_adapter
    if wrapper.wrapper in CLASSIFIER_WRAPPERS:  # a classification PEFT model saves its head for every adapter
        saved = tuple(second.modules_to_save or ()) if second.modules_to_save is not ABSENT else ()
        second = dataclasses.replace(second, modules_to_save=saved + CLASSIFIER_NAMES)
    add_adapter(model, adapters, SECOND, second, profile)
    if case.training.set_adapter is not ABSENT:
        set_adapter(model, adapters, case.training.set_adapter)
    return adapters.facts()
