"""Fault injection: the harness catches upstream misbehaviour.

Each ``test_catches_*`` test monkeypatches one small, realistic fault into
upstream peft (it wraps the real function, calls it, and corrupts the result),
runs the differential step (:func:`conformance.engine.runner.run_case`) over the cases
that can expose it, and asserts that an unexpected divergence is reported and
that it names the field the fault corrupts.  The reference never sees the fault:
it does not import peft.

The cases come from a deterministic corpus drawn once from the suite's own
Hypothesis strategy (:func:`strategies.cases`, fixed seed, about 40 per
quantization kind) and from a few hand-picked scenarios that guarantee each
fault has a case that reaches it (GPT-2 ``Conv1D``, an embedding target,
``bias="all"``, 4-bit with fp16 storage, ...).  The corpus is tried first, the
scenarios last.  :func:`test_clean_baseline_has_no_unexpected_divergence` shows
that without a fault the same cases produce no ``diverge`` outcome, so what the
fault tests detect is the fault.

:func:`test_real_suite_fails_on_injected_fault` runs the real conformance
suite (``conformance/test_conformance.py``) in a subprocess, once with a fault
injected by a ``conftest.py`` and once without.

This file, like any fault-injection test, imports peft itself; the harness
imports it only in ``conformance/upstream.py``.
"""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

from conformance.engine.runner import run_case
from reference.spec import ABSENT, Case
from strategies.zoo import ZOO
from strategies.coverage import cells
from fault_kit import (  # noqa: F401 - the corpus, scenarios and fault helpers
    REPO,
    SCALING_FAULT_CONFTEST,
    PROFILE,
    CORPUS_SEED,
    CORPUS_PER_KIND,
    QUANT_KINDS,
    corpus,
    _llama,
    QV,
    QLORA,
    QLORA_RSLORA,
    QLORA_FP16_STORAGE,
    QLORA_8BIT,
    LLAMA_FP16,
    LLAMA_NO_DROPOUT,
    LLAMA_EXCLUDE,
    LLAMA_LAYER_0,
    LLAMA_UNDOTTED_SUFFIX,
    LLAMA_EMBEDDING,
    LLAMA_SAVE_HEAD,
    LLAMA_SEQ_CLS,
    LLAMA_R_ZERO,
    LLAMA_CONTAINER,
    LLAMA_BOGUS_BIAS,
    GPT2,
    GPT2_BIAS_ALL,
    GPT2_BIAS_LORA_ONLY,
    SCENARIOS,
    _given,
    _half,
    candidates,
    invalid_candidates,
    assert_caught,
    wrap_update_layer,
    wrap_target_check,
    with_config,
    wrap_bias_marking,
    wrap_kbit_step,
    wrap_default_dispatch,
    _base_of,
)

pytest_plugins = ["pytester"]


# -- scaling -------------------------------------------------------------------------------------


def test_catches_scaling_alpha_over_2r(monkeypatch):
    """Fault: LoRA scaling computed as alpha / (2 r) instead of alpha / r."""

    def halve(layer, args):
        name = args["adapter_name"]
        layer.scaling[name] = args["lora_alpha"] / (2 * args["r"])

    wrap_update_layer(monkeypatch, after=halve)
    assert_caught(candidates(lambda c: True, QLORA), {"adapter[default].scaling"})


def test_catches_rslora_ignored(monkeypatch):
    """Fault: use_rslora=True ignored: scaling alpha / r instead of alpha / sqrt(r)."""

    def plain(layer, args):
        if args["config"].use_rslora:
            layer.scaling[args["adapter_name"]] = args["lora_alpha"] / args["r"]

    wrap_update_layer(monkeypatch, after=plain)
    assert_caught(candidates(lambda c: c.adapter.use_rslora is True and c.adapter.r != 1, QLORA_RSLORA),
                  {"adapter[default].scaling"})


# -- bias handling ---------------------------------------------------------------------------------


def test_catches_bias_all_treated_as_none(monkeypatch):
    """Fault: bias="all" handled like "none": no bias becomes trainable."""
    wrap_bias_marking(monkeypatch, lambda bias: "none" if bias == "all" else bias)
    assert_caught(candidates(lambda c: c.adapter.bias == "all", GPT2_BIAS_ALL), {"requires_grad"},
                  path=r".*\.bias")


def test_catches_bias_lora_only_marks_all_biases(monkeypatch):
    """Fault: bias="lora_only" makes every bias trainable, not only those of LoRA-wrapped layers."""
    wrap_bias_marking(monkeypatch, lambda bias: "all" if bias == "lora_only" else bias)
    assert_caught(candidates(lambda c: c.adapter.bias == "lora_only", GPT2_BIAS_LORA_ONLY), {"requires_grad"},
                  path=r".*\.bias")


# -- target matching ---------------------------------------------------------------------------------


def test_catches_suffix_match_without_dot_boundary(monkeypatch):
    """Fault: list targets match any string suffix ("_proj" reaches q_proj), not only dotted suffixes."""
    from peft.tuners.tuners_utils import _ExcludedModule

    def factory(original):
        def faulty(config, key):
            found = original(config, key)
            if found or isinstance(found, _ExcludedModule) or not isinstance(config.target_modules, (list, set)):
                return found
            return any(key.endswith(t) for t in config.target_modules)

        return faulty

    wrap_target_check(monkeypatch, factory)
    # The strategy's near misses ("q_pro", "xq_proj", "Q_PROJ") are no string suffixes
    # of module names either, so only the scenario reaches this fault.
    assert_caught(candidates(lambda c: False, LLAMA_UNDOTTED_SUFFIX), {"lora.present"})


def test_catches_exclude_modules_ignored(monkeypatch):
    """Fault: exclude_modules ignored when matching targets."""
    wrap_target_check(monkeypatch, lambda original: with_config(original, exclude_modules=None))
    assert_caught(candidates(lambda c: _given(c.adapter.exclude_modules), LLAMA_EXCLUDE),
                  {"lora.present", "raised"})


def test_catches_layers_to_transform_ignored(monkeypatch):
    """Fault: layers_to_transform ignored: suffix matches in every layer are targeted."""
    wrap_target_check(monkeypatch, lambda original: with_config(original, layers_to_transform=None))
    assert_caught(candidates(lambda c: _given(c.adapter.layers_to_transform), LLAMA_LAYER_0),
                  {"lora.present", "raised"})


# -- dtype casts -------------------------------------------------------------------------------------


def test_catches_autocast_adapter_dtype_ignored(monkeypatch):
    """Fault: autocast_adapter_dtype=True ignored: fp16/bf16 adapter weights are not upcast to fp32."""
    import peft.tuners.tuners_utils as tuners_utils

    original = tuners_utils.cast_adapter_dtype

    def faulty(model, adapter_name, autocast_adapter_dtype=True):
        return original(model, adapter_name, autocast_adapter_dtype=False)

    monkeypatch.setattr(tuners_utils, "cast_adapter_dtype", faulty)

    def reaches(c: Case) -> bool:
        half_base = (_half(c.model.load_dtype) and not c.quant.quantized and not c.training.prepare_kbit) or (
            c.quant.kind == "4bit" and _half(c.quant.compute_dtype))
        return half_base and c.training.autocast_adapter_dtype is not False

    assert_caught(candidates(reaches, LLAMA_FP16), {"adapter[default].a_dtype", "adapter[default].b_dtype"})


def test_catches_kbit_step_not_upcasting_half_norms(monkeypatch):
    """Fault: prepare_model_for_kbit_training leaves fp16/bf16 normalization weights in half precision."""

    def remember(model):
        return {id(p): p.dtype for m in model.modules() if "norm" in type(m).__name__.lower()
                for p in m.parameters(recurse=False)}

    def restore(model, dtypes):
        for m in model.modules():
            for p in m.parameters(recurse=False):
                if id(p) in dtypes and dtypes[id(p)] != p.dtype:
                    p.data = p.data.to(dtypes[id(p)])

    wrap_kbit_step(monkeypatch, restore, before=remember)
    assert_caught(candidates(lambda c: c.training.prepare_kbit and _half(c.model.load_dtype), QLORA),
                  {"dtype"}, path=r".*norm.*")


def test_catches_kbit_step_upcasting_params4bit(monkeypatch):
    """Fault: prepare_model_for_kbit_training also upcasts Params4bit with fp16/bf16 storage to fp32."""

    def upcast(model, _):
        for p in model.parameters():
            if type(p).__name__ == "Params4bit" and p.dtype in (torch.float16, torch.bfloat16):
                p.data = p.data.to(torch.float32)

    wrap_kbit_step(monkeypatch, upcast)
    assert_caught(
        candidates(lambda c: c.quant.kind == "4bit" and c.quant.quant_storage in ("float16", "bfloat16"),
                   QLORA_FP16_STORAGE),
        {"dtype"}, path=r".*\.weight")


# -- dispatch ----------------------------------------------------------------------------------------


def test_catches_conv1d_fan_in_fan_out_not_forced(monkeypatch):
    """Fault: a transformers Conv1D target keeps fan_in_fan_out=False instead of being forced to True."""
    from transformers.pytorch_utils import Conv1D

    def factory(original):
        def faulty(target, adapter_name, config, **kwargs):
            asked = config.fan_in_fan_out
            new_module = original(target, adapter_name, config=config, **kwargs)
            if new_module is not None and isinstance(_base_of(target), Conv1D) and not asked:
                new_module.fan_in_fan_out = False
                config.fan_in_fan_out = False
            return new_module

        return faulty

    wrap_default_dispatch(monkeypatch, factory)
    assert_caught(candidates(lambda c: c.model.model_type == "gpt2" and c.adapter.fan_in_fan_out is not True, GPT2),
                  {"fan_in_fan_out"})


def test_catches_bnb_4bit_layer_losing_compute_dtype(monkeypatch):
    """Fault: wrapping a bnb Linear4bit drops its compute dtype (reset to None)."""
    import peft.tuners.lora.bnb as lora_bnb

    original = lora_bnb.dispatch_bnb_4bit

    def faulty(target, adapter_name, config, **kwargs):
        new_module = original(target, adapter_name, config=config, **kwargs)
        if new_module is not None:
            new_module.get_base_layer().compute_dtype = None
        return new_module

    monkeypatch.setattr(lora_bnb, "dispatch_bnb_4bit", faulty)
    assert_caught(candidates(lambda c: c.quant.kind == "4bit", QLORA), {"base"})


def test_catches_embedding_not_dispatched(monkeypatch):
    """Fault: the nn.Embedding branch of the default dispatcher is lost: an embedding target is
    rejected as an unsupported module instead of getting a lora.Embedding layer."""

    def factory(original):
        def faulty(target, adapter_name, config, parameter_name=None, **kwargs):
            if parameter_name is None and isinstance(_base_of(target), nn.Embedding):
                return None
            return original(target, adapter_name, config=config, parameter_name=parameter_name, **kwargs)

        return faulty

    wrap_default_dispatch(monkeypatch, factory)

    def reaches(c: Case) -> bool:
        targets = c.adapter.target_modules
        return isinstance(targets, tuple) and bool(set(targets) & set(ZOO[c.model.model_type].embedding_names))

    # Dispatching the embedding to the Linear LoRA layer instead is no usable fault here: the
    # snapshot's input-grads probe runs the embedding forward, which then raises inside run_case.
    assert_caught(candidates(reaches, LLAMA_EMBEDDING), {"raised"}, path="<error>")


# -- dropout -----------------------------------------------------------------------------------------


def test_catches_dropout_identity_when_p_positive(monkeypatch):
    """Fault: lora_dropout > 0 builds nn.Identity instead of nn.Dropout(p)."""

    def identity(layer, args):
        if args["config"].lora_dropout > 0:
            layer.lora_dropout[args["adapter_name"]] = nn.Identity()

    wrap_update_layer(monkeypatch, after=identity)
    assert_caught(candidates(lambda c: _given(c.adapter.lora_dropout) and c.adapter.lora_dropout > 0, QLORA),
                  {"adapter[default].dropout"})


def test_catches_dropout_zero_instead_of_identity(monkeypatch):
    """Fault: lora_dropout == 0 builds nn.Dropout(0) instead of nn.Identity."""

    def dropout_zero(layer, args):
        if args["config"].lora_dropout <= 0:
            layer.lora_dropout[args["adapter_name"]] = nn.Dropout(p=0.0)

    wrap_update_layer(monkeypatch, after=dropout_zero)
    assert_caught(candidates(lambda c: not c.adapter.lora_dropout, LLAMA_NO_DROPOUT), {"adapter[default].dropout"})


# -- error handling ----------------------------------------------------------------------------------


def test_catches_non_positive_r_accepted(monkeypatch):
    """Fault: r <= 0 silently replaced by the default r=8 instead of raising ValueError."""

    def default_r(args):
        if args["r"] <= 0:
            args["r"] = 8

    wrap_update_layer(monkeypatch, before=default_r)
    assert_caught(invalid_candidates(lambda c: isinstance(c.adapter.r, int) and c.adapter.r <= 0, LLAMA_R_ZERO),
                  {"raised"}, path="<error>")


def test_catches_unsupported_module_silently_skipped(monkeypatch):
    """Fault: a matched module of an unsupported type (a container) skipped instead of raising ValueError."""
    from peft.tuners.lora.model import LoraModel

    original = LoraModel._create_and_replace

    def faulty(self, *args, **kwargs):
        try:
            return original(self, *args, **kwargs)
        except ValueError as exc:
            if "is not supported" not in str(exc):
                raise
            return None

    monkeypatch.setattr(LoraModel, "_create_and_replace", faulty)

    def reaches(c: Case) -> bool:
        return c.adapter.target_modules == (ZOO[c.model.model_type].layer_container,)

    assert_caught(invalid_candidates(reaches, LLAMA_CONTAINER), {"raised", "kind"}, path="<error>")


def test_catches_unknown_bias_accepted(monkeypatch):
    """Fault: an unknown bias value (e.g. "bogus") treated as "none" instead of raising NotImplementedError."""
    wrap_bias_marking(monkeypatch, lambda bias: bias if bias in ("none", "all") or bias.endswith("_only") else "none")
    assert_caught(invalid_candidates(lambda c: c.adapter.bias not in (ABSENT, "none", "all", "lora_only"),
                                     LLAMA_BOGUS_BIAS),
                  {"raised"}, path="<error>")


# -- initialisation ----------------------------------------------------------------------------------


def test_catches_b_not_zero_with_default_init(monkeypatch):
    """Fault: init_lora_weights=True leaves lora_B random (non-zero) instead of zero."""
    from peft.tuners.lora.layer import LoraLayer

    original = LoraLayer.reset_lora_parameters

    def faulty(self, adapter_name, init_lora_weights):
        original(self, adapter_name, init_lora_weights)
        if init_lora_weights is True and adapter_name in self.lora_B:
            with torch.no_grad():
                nn.init.normal_(self.lora_B[adapter_name].weight, std=0.02)

    monkeypatch.setattr(LoraLayer, "reset_lora_parameters", faulty)
    assert_caught(candidates(lambda c: c.adapter.init_lora_weights in (ABSENT, True), QLORA),
                  {"adapter[default].init"})


# -- requires_grad -----------------------------------------------------------------------------------


def test_catches_modules_to_save_copy_frozen(monkeypatch):
    """Fault: the trainable copy of a modules_to_save module is left frozen (requires_grad=False):
    the wrapper activates its adapter as if in inference mode."""
    from peft.utils.other import ModulesToSaveWrapper

    original = ModulesToSaveWrapper.set_adapter

    def faulty(self, adapter_names, inference_mode=False):
        return original(self, adapter_names, inference_mode=True)

    monkeypatch.setattr(ModulesToSaveWrapper, "set_adapter", faulty)

    def reaches(c: Case) -> bool:
        return _given(c.adapter.modules_to_save) or c.adapter.task_type in ("SEQ_CLS", "TOKEN_CLS")

    assert_caught(candidates(reaches, LLAMA_SAVE_HEAD, LLAMA_SEQ_CLS), {"requires_grad"},
                  path=r".*\.modules_to_save\..*")


# -- the k-bit step ----------------------------------------------------------------------------------


def _kbit_with_checkpointing(c: Case) -> bool:
    return c.quant.quantized and c.training.prepare_kbit and c.training.gradient_checkpointing is not False


def test_catches_gradient_checkpointing_not_enabled(monkeypatch):
    """Fault: prepare_model_for_kbit_training does not (or no longer) enable gradient checkpointing."""

    def disable(model, _):
        off = getattr(model, "activation_checkpointing_disable", None) or model.gradient_checkpointing_disable
        off()

    wrap_kbit_step(monkeypatch, disable)
    assert_caught(candidates(_kbit_with_checkpointing, QLORA, QLORA_8BIT), {"gradient_checkpointing"},
                  path="<model>")


def test_catches_input_require_grads_missing(monkeypatch):
    """Fault: after the k-bit step the input embeddings' outputs do not require grad (hook missing)."""

    def drop_hooks(model, _):
        embeddings = model.get_input_embeddings()
        for hook_id, hook in list(embeddings._forward_hooks.items()):
            if getattr(hook, "__name__", "") == "make_inputs_require_grads":
                del embeddings._forward_hooks[hook_id]

    wrap_kbit_step(monkeypatch, drop_hooks)
    assert_caught(candidates(_kbit_with_checkpointing, QLORA, QLORA_8BIT), {"input_grads"}, path="<model>")


# -- without a fault -----------------------------------------------------------------------------------


def test_clean_baseline_has_no_unexpected_divergence():
    """No fault: the corpus and the scenarios give no ``diverge`` outcome (``known`` is allowed)."""
    outcomes = [run_case(case, PROFILE) for case in (*corpus(), *SCENARIOS)]
    diverged = [o for o in outcomes if o.status == "diverge"]
    assert not diverged, "\n".join(
        f"{o.case.dumps()}\n  " + ", ".join(f"{d.path}:{d.field} ref={d.reference!r} up={d.upstream!r}"
                                             for d in o.divergences[:5])
        for o in diverged
    )
    # the scenarios each reach what they are meant to: valid ones prepare, invalid ones are rejected
    for case, outcome in zip(SCENARIOS, outcomes[len(corpus()):], strict=True):
        assert (outcome.upstream.error is not None) == case.invalid, case.dumps()


def test_corpus_is_deterministic_and_varied():
    """The corpus is drawn with a fixed seed: the same cases in the same order each time it is drawn."""
    first = corpus()
    corpus.cache_clear()
    assert corpus() == first
    assert {c.quant.kind for c in first} == set(QUANT_KINDS)
    assert len(first) >= 0.9 * CORPUS_PER_KIND * len(QUANT_KINDS)


# -- the real suite, end to end ----------------------------------------------------------------------



def _run_real_suite(pytester: pytest.Pytester, conftest: str | None) -> pytest.RunResult:
    source = (REPO / "conformance" / "test_conformance.py").read_text()
    pytester.makepyfile(test_conformance=source)
    if conftest is not None:
        pytester.makeconftest(conftest)
    # -x: with the fault, stop after the first failing test (Hypothesis shrinks that one failure only)
    # llama's cells and the free tests: the whole suite is CI's business; these show the plugin end to end
    args = ["-p", "no:cacheprovider", "-q", "-x", "--conformance-examples", "15", "--hypothesis-seed", "1",
            "-k", "(llama and not mllama) or level"]
    if os.environ.get("PYTEST_DISABLE_PLUGIN_AUTOLOAD"):
        args = ["-p", "conformance.plugin", "-p", "_hypothesis_pytestplugin", *args]
    return pytester.runpytest_subprocess(*args, timeout=600)


def test_real_suite_fails_on_injected_fault(pytester):
    """End to end: the real conformance suite fails, with a replay command, when peft's scaling is
    alpha / (2 r), and passes on the same seed without the fault."""
    faulty = _run_real_suite(pytester, SCALING_FAULT_CONFTEST)
    assert faulty.ret == pytest.ExitCode.TESTS_FAILED, faulty.stdout.str()[-3000:]
    output = faulty.stdout.str()
    assert "replay this case" in output and "adapter[default].scaling" in output, output[-3000:]

    (pytester.path / "conftest.py").unlink()
    clean = _run_real_suite(pytester, None)
    assert clean.ret == pytest.ExitCode.OK, clean.stdout.str()[-3000:]
    # llama's cells, and the six free tests (peft and trl level, one per quantization kind)
    llama = [c for level in ("peft", "trl") for c in cells(level) if c.model_type == "llama"]
    clean.assert_outcomes(passed=len(llama) + 6, deselected=None)
