"""``load_model`` hands out deep copies of one pristine model per case: exact, private, and cheaper."""

from __future__ import annotations

import pytest
import torch

from conformance.engine.models import clear_model_cache, load_fresh, load_model
from reference.spec import ModelSpec, QuantSpec

QUANTS = [
    QuantSpec(kind="none"),
    QuantSpec(kind="8bit"),
    QuantSpec(kind="4bit", quant_type="nf4", double_quant=True, compute_dtype="bfloat16"),
    QuantSpec(kind="4bit", quant_type="fp4", quant_storage="bfloat16"),
]


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().view(torch.uint8)


@pytest.mark.parametrize("quant", QUANTS, ids=lambda q: f"{q.kind}-{q.quant_type}")
def test_a_copy_is_exact_and_shares_no_storage(quant, cache):
    if quant.quantized:
        pytest.importorskip("bitsandbytes")
    spec = ModelSpec("llama", "CAUSAL_LM", num_layers=1, load_dtype="bfloat16")
    clear_model_cache()
    first, second, fresh = load_model(spec, quant, cache), load_model(spec, quant, cache), load_fresh(spec, quant, cache)
    for (name, a), (_, b), (_, f) in zip(first.named_parameters(), second.named_parameters(), fresh.named_parameters(), strict=True):
        assert type(a) is type(b) is type(f), name
        assert a.dtype == f.dtype and torch.equal(_bytes(a), _bytes(f)), name
        assert a.data_ptr() != b.data_ptr(), name
        qa, qf = getattr(a, "quant_state", None), getattr(f, "quant_state", None)
        assert (qa is None) == (qf is None), name
        if qa is not None:
            da, df = qa.as_dict(packed=True), qf.as_dict(packed=True)
            assert da.keys() == df.keys() and all(torch.equal(da[k], df[k]) for k in da), name
        if getattr(f, "SCB", None) is not None:
            assert torch.equal(a.SCB, f.SCB), name
    for copy_, original in ((first, fresh), (second, fresh)):
        for (name, module), (_, fresh_module) in zip(copy_.named_modules(), original.named_modules(), strict=True):
            weight = getattr(module, "weight", None)
            if type(weight).__name__ != "Params4bit":
                continue
            # A copy is linked like a fresh load: its weight points at its own layer, never the cached
            # original's, and the layer and its weight hold one quant state.
            assert (weight.module is module) == (fresh_module.weight.module is fresh_module) is True, name
            assert (module.quant_state is weight.quant_state) == (
                fresh_module.quant_state is fresh_module.weight.quant_state) is True, name
    assert getattr(first, "is_loaded_in_4bit", False) == getattr(fresh, "is_loaded_in_4bit", False)
    assert getattr(first, "is_loaded_in_8bit", False) == getattr(fresh, "is_loaded_in_8bit", False)
    next(first.parameters()).data.zero_()  # a caller mutating its copy leaves the next copy untouched
    assert torch.equal(_bytes(next(load_model(spec, quant, cache).parameters())), _bytes(next(fresh.parameters())))


def test_zoo_models_have_no_constant_parameters():
    """Biases and norm weights carry seeded noise, so that a fault in their values shows."""
    from conformance.engine.models import build_model

    for model_type in ("llama", "bert", "gpt2", "gemma", "t5"):
        task = "SEQ_CLS" if model_type in ("bert", "t5") else "CAUSAL_LM"
        model = build_model(ModelSpec(model_type, task, num_layers=1))
        constant = [n for n, p in model.named_parameters() if p.numel() > 1 and bool(p.min() == p.max())]
        assert not constant, (model_type, constant)
        again = build_model(ModelSpec(model_type, task, num_layers=1))
        assert all(torch.equal(a, b) for a, b in zip(model.parameters(), again.parameters(), strict=True))


def test_the_cache_can_be_turned_off(cache, monkeypatch):
    monkeypatch.setenv("CONFORMANCE_MODEL_CACHE", "0")
    spec = ModelSpec("gpt2", num_layers=1)
    assert load_model(spec, QuantSpec(), cache) is not load_model(spec, QuantSpec(), cache)
