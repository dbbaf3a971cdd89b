"""The model zoo and the model builders: every type builds, deterministically,
and a representative subset loads quantized and runs a forward pass."""

from __future__ import annotations

import concurrent.futures
import pathlib

import pytest
import torch
from transformers.models.auto import modeling_auto
from transformers.pytorch_utils import Conv1D

from conformance.engine import models
from conformance.engine.models import build_model, checkpoint_path, load_model, quantization_config
from reference.spec import ModelSpec, QuantSpec
from strategies.zoo import NUM_LABELS, TASKS, ZOO

REQUIRED = (
    "t5 mt5 bart gpt2 bloom opt gptj gpt_neox gpt_neo llama gpt_bigcode codegen mistral "
    "mixtral stablelm phi gemma gemma2 qwen2 qwen3 gemma3_text phi3 olmo olmo2 granite bert "
    "roberta xlm-roberta electra deberta-v2 deberta layoutlm falcon"
).split()

MAPPINGS = {
    "CAUSAL_LM": modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
    "SEQ_CLS": modeling_auto.MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES,
    "SEQ_2_SEQ_LM": modeling_auto.MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES,
    "TOKEN_CLS": modeling_auto.MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES,
}

PAIRS = [(t, task) for t, e in ZOO.items() for task in e.tasks]
IMAGE_TEXT = modeling_auto.MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES
# Linear leaf names a vision-language entry leaves out of linear_names (its nn.Sequential members,
# and qwen2_vl's attention output `proj`, a name its Conv3d patch embedding shares)
VISION_UNNAMED = {"0", "2", "lm_head"}
VISION_LEFT_OUT = {"qwen2_vl": {"proj"}}


def _mapping(model_type: str, task: str) -> dict:
    return IMAGE_TEXT if ZOO[model_type].image_text else MAPPINGS[task]


def _linears(model: torch.nn.Module):
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            yield name, module, module.in_features, module.out_features
        elif isinstance(module, Conv1D):
            yield name, module, module.weight.shape[0], module.weight.shape[1]


def _block_parts(name: str, container: str) -> bool:
    parts = name.split(".")
    return any(p == container and i + 1 < len(parts) and parts[i + 1].isdigit()
               for i, p in enumerate(parts))


def _inputs(spec: ModelSpec, config) -> dict:
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 256, (2, 8), generator=gen)
    ids[:, -1] = config.eos_token_id  # bart / t5 classification pool at <eos>
    kw = {"input_ids": ids}
    if spec.task == "SEQ_2_SEQ_LM":
        kw["decoder_input_ids"] = ids[:, :4]
    return kw


# -- the catalog --------------------------------------------------------------------------


def test_zoo_covers_required_types():
    assert set(REQUIRED) <= set(ZOO), sorted(set(REQUIRED) - set(ZOO))
    for name, entry in ZOO.items():
        assert entry.model_type == name
        assert entry.tasks and set(entry.tasks) <= set(TASKS)


def test_zoo_has_types_with_and_without_peft_defaults():
    constants = pytest.importorskip("peft.utils.constants")
    table = constants.TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
    without = {t for t in ZOO if t not in table}
    assert {"phi3", "olmo", "olmo2", "granite"} <= without
    assert len(without) >= 6 and len(set(ZOO) - without) >= 20


@pytest.mark.parametrize("model_type", sorted(ZOO))
def test_tasks_match_auto_mappings(model_type):
    if ZOO[model_type].image_text:  # built as its image-text-to-text class, prepared as a causal LM
        assert ZOO[model_type].tasks == ("CAUSAL_LM",) and model_type in IMAGE_TEXT
        return
    expected = tuple(task for task in TASKS if model_type in MAPPINGS[task])
    assert ZOO[model_type].tasks == expected


@pytest.mark.parametrize("model_type", sorted(ZOO))
def test_config_factory(model_type):
    make = ZOO[model_type].make_config
    for layers, hidden in ((1, 64), (2, 64), (3, 128)):
        a, b = make(layers, hidden), make(layers, hidden)
        assert a is not b and a.to_dict() == b.to_dict()
        assert a.model_type == model_type
        if ZOO[model_type].image_text:  # a composite config: the text config holds the vocabulary
            text = a.get_text_config()
            assert text.vocab_size == 256 and text.pad_token_id == 0 and a.pad_token_id == 0
            continue
        assert a.vocab_size == 256 and a.pad_token_id == 0 and a.num_labels == NUM_LABELS
    with pytest.raises(ValueError, match="multiple of 64"):
        make(2, 96)


@pytest.mark.parametrize("model_type", sorted(ZOO))
def test_module_names(model_type):
    """linear_names / embedding_names are exactly what the built models hold."""
    entry = ZOO[model_type]
    linear, embedding = set(), set()
    for task in entry.tasks:
        model = build_model(ModelSpec(model_type, task))
        for name, _, _, _ in _linears(model):
            if _block_parts(name, entry.layer_container) or entry.image_text:
                linear.add(name.rsplit(".", 1)[-1])
        for name, module in model.named_modules(remove_duplicate=False):
            if isinstance(module, torch.nn.Embedding):
                embedding.add(name.rsplit(".", 1)[-1])
        blocks = [m for n, m in model.named_modules()
                  if n.rsplit(".", 1)[-1] == entry.layer_container]
        assert blocks and all(isinstance(m, torch.nn.ModuleList) and len(m) == 2 for m in blocks)
    if entry.image_text:
        linear -= VISION_UNNAMED | VISION_LEFT_OUT.get(model_type, set())
    assert linear == set(entry.linear_names)
    assert embedding == set(entry.embedding_names)


# -- build_model ----------------------------------------------------------------------------


@pytest.mark.parametrize("model_type,task", PAIRS)
def test_build_model(model_type, task):
    spec = ModelSpec(model_type, task)
    torch.manual_seed(1234)
    state = torch.get_rng_state()
    model = build_model(spec)
    assert torch.equal(torch.get_rng_state(), state), "global RNG disturbed"
    assert model.config.model_type == model_type and not model.training
    assert type(model).__name__ == _mapping(model_type, task)[model_type]
    for name, _, fan_in, fan_out in _linears(model):
        assert fan_in % 64 == 0, (name, fan_in)
        # (a layer narrower than the kernels take is kept out of quantization: keep_unquantized)
        assert fan_out % 32 == 0 or name.rsplit(".", 1)[-1] in ZOO[model_type].keep_unquantized, (name, fan_out)
    torch.rand(3)  # move the global RNG: must not matter
    again = build_model(spec).state_dict()
    first = model.state_dict()
    assert first.keys() == again.keys()
    for key, value in first.items():
        assert value.dtype == again[key].dtype and torch.equal(value, again[key]), key


@pytest.mark.parametrize("model_type", sorted(ZOO))
def test_build_model_sizes_dtypes_seeds(model_type):
    task = ZOO[model_type].tasks[0]
    big = build_model(ModelSpec(model_type, task, num_layers=3, hidden_size=128,
                                load_dtype="bfloat16", seed=1))
    blocks = [m for n, m in big.named_modules()
              if n.rsplit(".", 1)[-1] == ZOO[model_type].layer_container]
    assert blocks and all(len(m) == 3 for m in blocks)
    floats = {n: p.dtype for n, p in big.named_parameters() if p.is_floating_point()}
    # DebertaDisentangledSelfAttention creates q_bias / v_bias as float32 whatever the dtype
    odd = {n for n, d in floats.items() if d != torch.bfloat16}
    assert floats and all(n.endswith((".q_bias", ".v_bias")) for n in odd), sorted(odd)
    for name, _, fan_in, _ in _linears(big):
        assert fan_in % 64 == 0, (name, fan_in)
    a = build_model(ModelSpec(model_type, task, seed=0)).state_dict()
    b = build_model(ModelSpec(model_type, task, seed=1)).state_dict()
    assert any(not torch.equal(a[k], b[k]) for k in a if a[k].is_floating_point())


def test_build_model_rejects_unsupported():
    with pytest.raises(ValueError, match=r"codegen.*SEQ_CLS"):
        build_model(ModelSpec("codegen", "SEQ_CLS"))
    with pytest.raises(ValueError, match=r"t5.*CAUSAL_LM"):
        build_model(ModelSpec("t5", "CAUSAL_LM"))
    with pytest.raises(ValueError, match="not in the zoo"):
        build_model(ModelSpec("no_such_model"))
    with pytest.raises(ValueError, match="multiple of 64"):
        build_model(ModelSpec("llama", hidden_size=100))


def test_encoder_causal_lm_is_decoder():
    assert build_model(ModelSpec("bert", "CAUSAL_LM")).config.is_decoder
    assert not build_model(ModelSpec("bert", "SEQ_CLS")).config.is_decoder


# -- quantized loads ------------------------------------------------------------------------


def test_quantization_config_mapping():
    assert quantization_config(QuantSpec()) is None
    q8 = quantization_config(QuantSpec("8bit", int8_threshold=3.0, skip_modules=("score",)))
    assert q8.load_in_8bit and not q8.load_in_4bit
    assert q8.llm_int8_threshold == 3.0 and q8.llm_int8_skip_modules == ["score"]
    q4 = quantization_config(QuantSpec("4bit", quant_type="fp4", double_quant=True,
                                       compute_dtype="bfloat16", quant_storage="float16"))
    assert q4.load_in_4bit and q4.bnb_4bit_quant_type == "fp4" and q4.bnb_4bit_use_double_quant
    assert q4.bnb_4bit_compute_dtype == torch.bfloat16
    assert q4.bnb_4bit_quant_storage == torch.float16
    assert q4.llm_int8_skip_modules is None


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> pathlib.Path:
    return tmp_path_factory.mktemp("zoo-cache")


def test_checkpoint_round_trip_and_cache(cache_dir):
    spec = ModelSpec("gpt2", "CAUSAL_LM")  # tied lm_head, Conv1D
    path = checkpoint_path(spec, cache_dir)
    assert checkpoint_path(spec, cache_dir) == path
    assert [p.name for p in cache_dir.iterdir()] == [path.name]
    reloaded = models.AUTO_CLASSES["CAUSAL_LM"].from_pretrained(path).state_dict()
    built = build_model(spec).state_dict()
    assert reloaded.keys() == built.keys()
    assert all(torch.equal(reloaded[k], built[k]) for k in built)
    assert load_model(spec, QuantSpec(), cache_dir).state_dict().keys() == built.keys()


def test_checkpoint_concurrent_writers(tmp_path):
    spec = ModelSpec("llama", "SEQ_CLS")
    models._paths.clear()
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        paths = set(pool.map(lambda _: checkpoint_path(spec, tmp_path), range(4)))
    assert len(paths) == 1
    assert [p.name for p in tmp_path.iterdir()] == [paths.pop().name]  # no temp dirs left


# Every type x task: a quantized load is ~15 ms here and the forward a few ms.
QUANT_CASES = PAIRS


@pytest.mark.parametrize("kind", ["4bit", "8bit"])
@pytest.mark.parametrize("model_type,task", QUANT_CASES)
def test_quantized_load_and_forward(model_type, task, kind, cache_dir):
    import bitsandbytes as bnb

    spec = ModelSpec(model_type, task)
    keep = ZOO[model_type].keep_unquantized
    model = load_model(spec, QuantSpec(kind, quant_type="nf4", skip_modules=("lm_head", *keep) if keep else None),
                       cache_dir)
    assert not model.training
    layer = bnb.nn.Linear4bit if kind == "4bit" else bnb.nn.Linear8bitLt
    param = bnb.nn.Params4bit if kind == "4bit" else bnb.nn.Int8Params
    quantized = [n for n, m in model.named_modules() if isinstance(m, layer)]
    if model_type == "falcon":
        # transformers 5.23 does not replace FalconLinear (an nn.Linear subclass)
        assert not any(".h." in n for n in quantized)
    else:
        assert quantized
        assert all(isinstance(m.weight, param) for m in model.modules() if isinstance(m, layer))
    if task in ("CAUSAL_LM", "SEQ_2_SEQ_LM"):
        assert type(model.get_output_embeddings()) is torch.nn.Linear  # lm_head left alone
    with torch.no_grad():
        out = model(**_inputs(spec, model.config))
    logits = out.logits
    assert logits.shape[0] == 2 and torch.isfinite(logits).all()
