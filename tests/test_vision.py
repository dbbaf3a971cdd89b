"""Vision-language models (``strategies.zoo_vision``): they prepare as upstream does, the numerical
checks reach their vision towers through real image inputs, and faults there are caught.

The clean cases cover LoRA on the vision tower, the projector and the language model, plain and
quantized; the faults are planted into upstream peft right after ``get_peft_model``.
"""

from __future__ import annotations

import pytest
import torch

from conformance.engine.models import build_model
from conformance.numerics.run import make_inputs
from fault_kit import after_get_peft_model, assert_caught, assert_clean
from reference.spec import AdapterSpec, Case, ModelSpec, QuantSpec, TrainingSpec
from strategies.zoo import ZOO, image_text_types

pytestmark = pytest.mark.skipif(not image_text_types(), reason="no vision-language type builds here")

_QLORA = QuantSpec(kind="4bit", quant_type="nf4", compute_dtype="bfloat16")


def _case(model_type: str, targets, quant: QuantSpec | None = None, **adapter) -> Case:
    return Case(model=ModelSpec(model_type, "CAUSAL_LM", num_layers=1), quant=quant or QuantSpec(),
                adapter=AdapterSpec(r=4, lora_alpha=8, target_modules=targets, task_type="CAUSAL_LM", **adapter),
                training=TrainingSpec(prepare_kbit=quant is not None))


LLAVA_ALL = _case("llava", "all-linear")
LLAVA_QLORA = _case("llava", "all-linear", _QLORA)
QWEN_VISION = _case("qwen2_vl", ("qkv", "fc1", "fc2"))
GEMMA3_8BIT = _case("gemma3", ("out_proj", "fc1", "q_proj"), QuantSpec(kind="8bit"))
MLLAMA_PROJECTOR = _case("mllama", ("multi_modal_projector", "q_proj"))
VISION_CASES = (LLAVA_ALL, LLAVA_QLORA, QWEN_VISION, GEMMA3_8BIT, MLLAMA_PROJECTOR)


def _vision(path: str) -> bool:
    return any(part in path for part in ("vision_tower", "visual", "vision_model"))


@pytest.mark.parametrize("case", VISION_CASES, ids=lambda c: c.model.model_type + "-" + c.quant.kind)
def test_vision_language_cases_agree_with_numerics(case):
    (outcome,) = assert_clean([case], numerics=True)
    lora = [p for p in outcome.upstream.params if ".lora_A." in p.path] if outcome.upstream else []
    assert any(_vision(p.path) for p in lora), "the case puts LoRA on the vision tower"


@pytest.mark.parametrize("model_type", ["llava", "qwen2_vl", "gemma3"])
def test_image_inputs_reach_the_vision_tower(model_type):
    """The numerics' inputs carry an image whose pixels change the logits (mllama's zero
    cross-attention gates keep the image out of a fresh model's logits: left out)."""
    case = _case(model_type, "all-linear")
    model = build_model(case.model)
    inputs = make_inputs(case, model, seed=3)
    assert "pixel_values" in inputs
    with torch.no_grad():
        first = model(**inputs).logits
        inputs["pixel_values"] = inputs["pixel_values"] * 2
        second = model(**inputs).logits
    assert not torch.equal(first, second)


def test_catches_a_vision_tower_forward_fault(monkeypatch):
    """A numbers-only fault: the vision tower's LoRA layers add their update twice (the class's
    forward, so that no hook or attribute shows in the snapshot)."""
    from peft.tuners.lora.layer import Linear

    original = Linear.forward

    def faulty(self, x, *args, **kwargs):
        out = original(self, x, *args, **kwargs)
        if self in marked:
            out = out + (out - self.base_layer(x, *args, **kwargs))
        return out

    marked: set = set()

    def mark(peft_model, _config):
        marked.update(m for p, m in peft_model.named_modules() if _vision(p) and isinstance(m, Linear))

    monkeypatch.setattr(Linear, "forward", faulty)
    after_get_peft_model(monkeypatch, mark)
    assert_caught([LLAVA_ALL, QWEN_VISION], {"numerics.logits", "numerics.train_logits", "numerics.grad",
                                            "numerics.train_grad"}, budget_s=120)


def test_catches_an_untrainable_vision_factor(monkeypatch):
    def freeze(peft_model, _config):
        for path, param in peft_model.named_parameters():
            if _vision(path) and ".lora_B." in path:
                param.requires_grad_(False)
                return

    after_get_peft_model(monkeypatch, freeze)
    assert_caught([LLAVA_QLORA, GEMMA3_8BIT], {"requires_grad"}, path=r".*(vision_tower|visual).*lora_B.*")


def test_catches_a_projector_left_out_of_all_linear(monkeypatch):
    """all-linear reaches the projector too (only the output head is left out)."""
    import peft.tuners.tuners_utils as tu

    original = tu._maybe_include_all_linear_layers

    def faulty(peft_config, model):
        out = original(peft_config, model)
        if isinstance(out.target_modules, (set, list)):
            out.target_modules = {t for t in out.target_modules if "multi_modal_projector" not in t}
        return out

    monkeypatch.setattr(tu, "_maybe_include_all_linear_layers", faulty)
    assert_caught([LLAVA_ALL], {"lora.present", "module.kind", "param.present"}, path=r".*multi_modal_projector.*")


def test_zoo_vision_entries_are_causal_lm_image_text_types():
    for model_type in image_text_types():
        entry = ZOO[model_type]
        assert entry.tasks == ("CAUSAL_LM",) and "embed_tokens" in entry.embedding_names
