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
    assert getattr(first, "is_loaded_in_4bit", False) == getattr(fresh, "is_loaded_in_4bit", False)
    assert getattr(first, "is_loaded_in_8bit", False) == getattr(fresh, "is_loaded_in_8bit", False)
    next(first.parameters()).data.zero_()  # a caller mutating its copy leaves the next copy untouched
    assert torch.equal(_bytes(next(load_model(spec, quant, cache).parameters())), _bytes(next(fresh.parameters())))


def test_the_cache_can_be_turned_off(cache, monkeypatch):
    monkeypatch.setenv("CONFORMANCE_MODEL_CACHE", "0")
    spec = ModelSpec("gpt2", num_layers=1)
    assert load_model(spec, QuantSpec(), cache) is not load_model(spec, QuantSpec(), cache)
