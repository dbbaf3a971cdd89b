"""Unit tests of the reference preparer, run without peft.

Expected values come from docs/spec/peft-0.21-notes.md (the observed upstream
behaviour the reference implements); the section is named next to each group.
Where the reference contradicts the notes, the test states the notes' behaviour
and is marked ``xfail(strict=True)``.
"""

from __future__ import annotations

import ast
import builtins
import contextlib
import math
import pathlib
import re
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
from torch import nn
from transformers import LlamaModel

from conformance.models import build_model, load_model, make_config
from reference import ABSENT, PROFILES, AdapterSpec, ModelSpec, PreparationError, QuantSpec, TrainingSpec
from reference import builtin_class, prepare, select_profile
from reference import errors
from reference.config import resolve
from reference.dispatch import wrap
from reference.kbit import prepare_for_kbit_training
from reference.layers import LoraEmbedding, LoraLinear, SavedModule
from reference.rules import adapter_dtype, scaling
from reference.targets import effective_targets, is_saved, match_names, pattern_value

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


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> pathlib.Path:
    return tmp_path_factory.mktemp("checkpoints")


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


# -- independence from peft / trl ---------------------------------------------------------------

_NO_PEFT_SCRIPT = textwrap.dedent(
    """
    import pathlib, sys, warnings
    sys.modules["peft"] = None
    sys.modules["trl"] = None
    for name in ("peft", "trl"):
        try:
            __import__(name)
        except ImportError:
            pass
        else:
            raise SystemExit(name + " is importable")
    warnings.simplefilter("ignore")

    from reference import AdapterSpec, ModelSpec, QuantSpec, TrainingSpec, prepare, select_profile
    from reference.layers import LoraLinear
    from conformance.models import build_model, load_model

    profile = select_profile()  # by installed versions: metadata only, no import
    model = build_model(ModelSpec("llama", num_layers=2))
    prepare(model, AdapterSpec(r=4, target_modules=("q_proj", "v_proj")), TrainingSpec(prepare_kbit=False), profile)
    lora = [n for n, m in model.named_modules() if isinstance(m, LoraLinear)]
    assert len(lora) == 4, lora

    q = load_model(ModelSpec("llama", num_layers=1), QuantSpec(kind="4bit"), pathlib.Path(sys.argv[1]))
    prepare(q, AdapterSpec(target_modules="all-linear"), TrainingSpec(), profile)
    lora = {n: m for n, m in q.named_modules() if isinstance(m, LoraLinear)}
    assert len(lora) == 7 and "lm_head" not in lora, sorted(lora)
    assert all(type(m.base_layer).__name__ == "Linear4bit" for m in lora.values())
    assert q.is_gradient_checkpointing

    assert sys.modules["peft"] is None and sys.modules["trl"] is None
    loaded = [n for n, m in sys.modules.items() if m is not None and n.split(".")[0] in ("peft", "trl")]
    assert not loaded, loaded
    print("REFERENCE-OK")
    """
)


def test_reference_runs_where_peft_and_trl_cannot_be_imported(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-c", _NO_PEFT_SCRIPT, str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "REFERENCE-OK" in proc.stdout


def test_reference_sources_never_import_peft_or_trl():
    for path in sorted((REPO / "reference").glob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                roots = [alias.name.split(".")[0] for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                roots = [(node.module or "").split(".")[0]]
            else:
                continue
            assert not {"peft", "trl"} & set(roots), f"{path.name}:{node.lineno} imports {roots}"


# -- scaling, rank_pattern / alpha_pattern (notes §4) ---------------------------------------------------


@pytest.mark.parametrize(
    "alpha, r, rslora, expected",
    [(16, 8, False, 2.0), (16, 4, False, 4.0), (16, 4, True, 8.0), (16, 8, True, 16 / math.sqrt(8)), (0, 4, False, 0.0),
     (-1, 4, False, -0.25)],
)
def test_scaling_rule(alpha, r, rslora, expected):
    assert scaling(alpha, r, rslora) == pytest.approx(expected)


def test_scaling_on_prepared_layers_with_and_without_rslora():
    plain = lora_layers(quiet_prep(llama(), r=8, lora_alpha=16, target_modules=("q_proj",)))
    rs = lora_layers(quiet_prep(llama(), r=8, lora_alpha=16, use_rslora=True, target_modules=("q_proj",)))
    assert {m.scaling["default"] for m in plain.values()} == {2.0}
    assert [m.scaling["default"] for m in rs.values()] == pytest.approx([5.657, 5.657], abs=1e-3)
    assert {m.r["default"] for m in rs.values()} == {8}


def test_rank_pattern_does_not_change_alpha():
    layers = lora_layers(quiet_prep(llama(), r=8, lora_alpha=16, target_modules=("q_proj", "v_proj"),
                                    rank_pattern=(("q_proj", 4),)))
    q = layers["model.layers.0.self_attn.q_proj"]
    v = layers["model.layers.0.self_attn.v_proj"]
    assert (q.r["default"], q.lora_alpha["default"], q.scaling["default"]) == (4, 16, 4.0)
    assert (v.r["default"], v.lora_alpha["default"], v.scaling["default"]) == (8, 16, 2.0)
    assert q.lora_A["default"].weight.shape == (4, 64)


def test_alpha_pattern_falls_back_to_lora_alpha():
    layers = lora_layers(quiet_prep(llama(), r=8, lora_alpha=16, target_modules=("q_proj", "v_proj"),
                                    alpha_pattern=(("v_proj", 3),)))
    assert layers["model.layers.1.self_attn.v_proj"].scaling["default"] == pytest.approx(3 / 8)
    assert layers["model.layers.1.self_attn.q_proj"].lora_alpha["default"] == 16
    assert layers["model.layers.1.self_attn.q_proj"].scaling["default"] == 2.0


@pytest.mark.parametrize(
    "order, layer0, layer1",
    [
        ((("q_proj", 2), (r".*\.0\..*q_proj", 4)), 2, 2),  # the general key comes first and wins everywhere
        (((r".*\.0\..*q_proj", 4), ("q_proj", 2)), 4, 2),  # first match in order, not the longest
    ],
)
def test_rank_pattern_first_match_in_insertion_order(order, layer0, layer1):
    layers = lora_layers(quiet_prep(llama(), r=8, target_modules=("q_proj",), rank_pattern=order))
    assert layers["model.layers.0.self_attn.q_proj"].r["default"] == layer0
    assert layers["model.layers.1.self_attn.q_proj"].r["default"] == layer1


KEY = "model.layers.0.self_attn.q_proj"


@pytest.mark.parametrize(
    "pattern, hit",
    [
        ("q_proj", True),
        ("layers.0.self_attn.q_proj", True),
        (r".*\.0\..*q_proj", True),
        ("^model.layers.0.self_attn.q_proj", True),
        (KEY, True),
        ("proj", False),
        ("_proj", False),
        ("model.layers.0", False),
        ("k_proj", False),
    ],
)
def test_pattern_keys_match_a_dot_bounded_suffix(pattern, hit):
    assert pattern_value(KEY, ((pattern, 3),), 8) == (3 if hit else 8)


def test_rank_pattern_value_not_positive_fails_like_r():
    with pytest.raises(errors.InvalidRank) as info:
        quiet_prep(llama(), target_modules=("q_proj", "v_proj"), rank_pattern=(("v_proj", 0),))
    assert builtin_class(info.value) == "ValueError" and info.value.kind == "invalid_r"


# -- target matching (notes §1, §2, §3, §13) --------------------------------------------------------


@pytest.mark.parametrize(
    "targets, expected",
    [
        (".*q_proj", qkeys(0, 1)),
        ("model.layers.0.self_attn.q_proj", qkeys(0)),
        (r"model\.layers\.1\.self_attn\.(q|v)_proj", qkeys(1, names=("q_proj", "v_proj"))),
        (("q_proj",), qkeys(0, 1)),
        (("self_attn.q_proj",), qkeys(0, 1)),
        (("0.self_attn.q_proj",), qkeys(0)),
        (("model.layers.1.self_attn.q_proj",), qkeys(1)),
        (("q_proj", "q_proj", "nothing"), qkeys(0, 1)),
    ],
)
def test_target_matching(targets, expected):
    assert targeted(llama(), target_modules=targets) == expected


@pytest.mark.parametrize(
    "targets",
    [
        "q_proj",  # a str is a full-match regex
        "(q|v)_proj",  # not a suffix search
        "base_model.model.model.layers.0.self_attn.q_proj",  # names are never prefixed
        (".*q_proj",),  # list entries are literal
        ("_proj",),  # a suffix needs a dot boundary
        ("xq_proj",),  # near miss: a different name
        ("q_pro",),  # near miss: partial name
        ("Q_PROJ",),
        ("all-linear",),  # only a str means all-linear
        (),
        "",
    ],
)
def test_target_near_misses_match_nothing(targets):
    with pytest.raises(errors.NoTargetMatched):
        prep(llama(), target_modules=targets)


def test_dotted_suffix_does_not_match_a_longer_name():
    assert targeted(Toy(), target_modules=("q_proj",)) == {"model.layers.0.q_proj", "model.layers.1.q_proj"}
    assert targeted(Toy(), target_modules=("xq_proj",)) == {"model.layers.0.xq_proj", "model.layers.1.xq_proj"}
    assert not match_names("model.layers.0.xq_proj", frozenset({"q_proj"}))
    assert match_names("model.layers.0.xq_proj", r".*q_proj")


@pytest.mark.parametrize("spelling", ["all-linear", "ALL-LINEAR", "All-Linear"])
def test_all_linear_is_every_linear_but_the_output_head(spelling):
    assert targeted(llama(), target_modules=spelling) == qkeys(0, 1, names=LLAMA_LINEARS)


def test_all_linear_includes_conv1d_and_excludes_lm_head_on_gpt2():
    got = targeted(gpt2(), target_modules="all-linear")
    expected = {f"transformer.h.{i}.{n}" for i in (0, 1) for n in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")}
    assert got == expected


def test_all_linear_on_a_plain_module_keeps_every_linear():
    assert targeted(Toy(1), target_modules="all-linear") == {
        "model.layers.0.q_proj", "model.layers.0.xq_proj", "model.layers.0.v_proj", "lm_head"
    }


@pytest.mark.xfail(
    strict=True,
    reason="notes §1: for a non-PreTrainedModel all-linear removes nothing; the reference removes whatever "
    "get_output_embeddings() returns on any module that has the method",
)
def test_all_linear_on_a_plain_module_with_get_output_embeddings_keeps_the_head():
    class WithHead(Toy):
        def get_output_embeddings(self):
            return self.lm_head

    assert "lm_head" in targeted(WithHead(1), target_modules="all-linear")


def test_all_linear_sequence_classification_head():
    seq = quiet_prep(llama("SEQ_CLS", num_layers=1), target_modules="all-linear", task_type="SEQ_CLS")
    assert "score" not in lora_layers(seq) and isinstance(seq.score, SavedModule)
    # Without a task type the classifier head is an ordinary Linear and gets LoRA.
    plain = quiet_prep(llama("SEQ_CLS", num_layers=1), target_modules="all-linear")
    assert "score" in lora_layers(plain)
    assert not any(isinstance(m, SavedModule) for m in plain.modules())


def test_all_linear_seq_cls_excludes_head_when_task_says_so_even_without_saving():
    # the all-linear expansion itself drops `score` for SEQ_CLS (output embeddings are None)
    model = llama("SEQ_CLS", num_layers=1)
    with_task = effective_targets(model, resolve(AdapterSpec(target_modules="all-linear", task_type="SEQ_CLS"), CURRENT), CURRENT)
    without = effective_targets(model, resolve(AdapterSpec(target_modules="all-linear"), CURRENT), CURRENT)
    assert "score" in without and "score" not in with_task
    assert without - with_task == {"score"}


@pytest.mark.parametrize(
    "exclude, expected",
    [
        (("0.self_attn.v_proj",), qkeys(0, 1) | qkeys(1, names=("v_proj",))),
        (r".*v_proj", qkeys(0, 1)),
        (r".*\.0\..*", qkeys(1, names=("q_proj", "v_proj"))),
        ("v_proj", qkeys(0, 1, names=("q_proj", "v_proj"))),  # a str must match the whole name
        ((".*v_proj",), qkeys(0, 1, names=("q_proj", "v_proj"))),  # list entries are literal
        (None, qkeys(0, 1, names=("q_proj", "v_proj"))),
    ],
)
def test_exclude_modules(exclude, expected):
    assert targeted(llama(), target_modules=("q_proj", "v_proj"), exclude_modules=exclude) == expected


@pytest.mark.parametrize(
    "adapter, expected",
    [
        (dict(layers_to_transform=1), qkeys(1)),
        (dict(layers_to_transform=(0,)), qkeys(0)),
        (dict(layers_to_transform=(0, 1)), qkeys(0, 1)),
        (dict(layers_to_transform=()), qkeys(0, 1)),  # empty list: no filter
        (dict(layers_to_transform=(1,), layers_pattern="layers"), qkeys(1)),
        (dict(layers_to_transform=(1,), layers_pattern=("x", "layers")), qkeys(1)),
        (dict(layers_to_transform=(1,), layers_pattern="l.yers"), qkeys(1)),  # the pattern is a regex
        (dict(layers_to_transform=(0,), layers_pattern=()), qkeys(0)),
    ],
)
def test_layers_to_transform(adapter, expected):
    assert targeted(llama(), target_modules=("q_proj",), **adapter) == expected


@pytest.mark.parametrize("layers_pattern", ["lay", "model"])
def test_layers_pattern_must_be_a_whole_segment_before_the_index(layers_pattern):
    with pytest.raises(errors.NoTargetMatched):
        prep(llama(), target_modules=("q_proj",), layers_to_transform=(0,), layers_pattern=layers_pattern)


def test_layers_pattern_empty_string_means_no_pattern():
    """notes §3: layers_pattern "" is "no layers_pattern" (the default index regex applies)."""
    assert targeted(llama(), target_modules=("q_proj",), layers_to_transform=(0,), layers_pattern="") == qkeys(0)


def test_exact_full_name_bypasses_the_layer_filter():
    got = targeted(llama(), target_modules=("model.layers.0.self_attn.q_proj", "k_proj"), layers_to_transform=(1,))
    assert got == qkeys(0) | qkeys(1, names=("k_proj",))
    assert targeted(llama(), target_modules=("lm_head",), layers_to_transform=1) == {"lm_head"}


def test_suffix_match_without_layer_index_is_filtered():
    # embed_tokens matched by suffix has no layer index: dropped by the layer filter
    assert targeted(llama(), target_modules=("embed_tokens", "q_proj"), layers_to_transform=(0,)) == qkeys(0)


def test_top_level_layer_list_has_no_index_without_layers_pattern():
    config = make_config(ModelSpec("llama"))
    with pytest.raises(errors.NoTargetMatched):
        prep(LlamaModel(config), target_modules=("q_proj",), layers_to_transform=(1,))
    got = targeted(LlamaModel(config), target_modules=("q_proj",), layers_to_transform=(1,), layers_pattern="layers")
    assert got == {"layers.1.self_attn.q_proj"}


@pytest.mark.xfail(
    strict=True,
    reason='notes §3: layers_to_transform given as a str ("0") raises TypeError at get_peft_model; the '
    "reference treats it as a sequence of strings and raises NoTargetMatched (a ValueError)",
)
def test_layers_to_transform_str_raises_type_error():
    with pytest.raises(TypeError):
        quiet_prep(llama(), target_modules=("q_proj",), layers_to_transform="0")


def test_modules_to_save_guard_excludes_the_module_and_its_descendants():
    model = quiet_prep(llama(), target_modules=("q_proj", "up_proj"), modules_to_save=("layers.0.mlp",))
    assert set(lora_layers(model)) == qkeys(0, 1) | qkeys(1, names=("up_proj",))
    assert isinstance(model.model.layers[0].mlp, SavedModule)
    assert not isinstance(model.model.layers[1].mlp, SavedModule)


@pytest.mark.parametrize(
    "key, saved, hit",
    [
        ("model.layers.0.mlp", ("layers.0.mlp",), True),
        ("model.layers.0.mlp.up_proj", ("layers.0.mlp",), True),
        ("model.layers.1.mlp.up_proj", ("layers.0.mlp",), False),
        ("lm_head", ("lm_head",), True),
        ("lm_head", ("head",), False),  # the guard needs whole segments
        ("model.layers.0.self_attn.q_proj", ("_proj",), False),
        ("model.layers.0.self_attn.q_proj", ("self_attn",), True),
    ],
)
def test_is_saved(key, saved, hit):
    assert is_saved(key, saved) is hit


# -- errors: class and kind (notes §1, §5, §6, §7) ---------------------------------------------------------


def _toy_factory():
    return Toy()


ERROR_CASES = [
    ("no_default_targets", _toy_factory, dict(), errors.NoDefaultTargets, "ValueError", "no_default_targets"),
    ("nothing_matched", llama, dict(target_modules=("nothing",)), errors.NoTargetMatched, "ValueError",
     "no_target_matched"),
    ("all_excluded", llama, dict(target_modules=("q_proj",), exclude_modules=("q_proj",)), errors.NoTargetMatched,
     "ValueError", "no_target_matched"),
    ("only_saved_targets", llama, dict(target_modules=("q_proj",), modules_to_save=("q_proj",)),
     errors.NoTargetMatched, "ValueError", "no_target_matched"),
    ("container", llama, dict(target_modules=("self_attn",)), errors.UnsupportedModule, "ValueError",
     "unsupported_module"),
    ("container_regex", llama, dict(target_modules=r".*self_attn"), errors.UnsupportedModule, "ValueError",
     "unsupported_module"),
    ("norm_with_valid_targets", llama, dict(target_modules=("q_proj", "input_layernorm")), errors.UnsupportedModule,
     "ValueError", "unsupported_module"),
    ("r_zero", llama, dict(r=0, target_modules=("q_proj",)), errors.InvalidRank, "ValueError", "invalid_r"),
    ("r_negative", llama, dict(r=-1, target_modules=("q_proj",)), errors.InvalidRank, "ValueError", "invalid_r"),
    ("unknown_bias", llama, dict(bias="bogus", target_modules=("q_proj",)), errors.InvalidBias,
     "NotImplementedError", "invalid_bias"),
    ("lora_bias_embedding", llama, dict(lora_bias=True, target_modules=("embed_tokens",)),
     errors.LoraBiasUnsupported, "ValueError", "lora_bias_unsupported"),
    ("lora_bias_gaussian", llama, dict(lora_bias=True, init_lora_weights="gaussian", target_modules=("q_proj",)),
     errors.InvalidConfig, "ValueError", "lora_bias_init"),
    ("layers_with_regex", llama, dict(target_modules=r".*q_proj", layers_to_transform=0), errors.InvalidConfig,
     "ValueError", "layers_with_regex_targets"),
    ("layers_with_all_linear", llama, dict(target_modules="all-linear", layers_to_transform=(0,)),
     errors.InvalidConfig, "ValueError", "layers_with_regex_targets"),
    ("pattern_with_regex", llama, dict(target_modules=r".*q_proj", layers_pattern=()), errors.InvalidConfig,
     "ValueError", "layers_with_regex_targets"),
    ("pattern_without_layers", llama, dict(target_modules=("q_proj",), layers_pattern="layers"),
     errors.InvalidConfig, "ValueError", "layers_pattern_without_layers"),
    ("dropout_above_one", llama, dict(lora_dropout=1.5, target_modules=("q_proj",)), errors.InvalidConfig,
     "ValueError", "invalid_dropout"),
    ("dropout_above_one_embedding", llama, dict(lora_dropout=1.5, target_modules=("embed_tokens",)),
     errors.InvalidConfig, "ValueError", "invalid_dropout"),
    ("unknown_init", llama, dict(init_lora_weights="bogus", target_modules=("q_proj",)), errors.InvalidConfig,
     "ValueError", "unknown_init"),
]


@pytest.mark.parametrize("factory, adapter, exc, builtin, kind", [c[1:] for c in ERROR_CASES],
                         ids=[c[0] for c in ERROR_CASES])
def test_rejections_have_builtin_class_and_kind(factory, adapter, exc, builtin, kind):
    with pytest.raises(exc) as info:
        quiet_prep(factory(), **adapter)
    assert isinstance(info.value, PreparationError)
    assert builtin_class(info.value) == builtin
    assert isinstance(info.value, getattr(builtins, builtin))
    assert info.value.kind == kind


def test_unknown_init_is_accepted_when_only_embeddings_are_targeted():
    layer = lora_layers(quiet_prep(llama(), init_lora_weights="bogus", target_modules=("embed_tokens",)))
    emb = layer["model.embed_tokens"]
    assert not emb.lora_embedding_A["default"].any() and emb.lora_embedding_B["default"].any()


def test_modules_to_save_wrapping_a_lora_layer_is_a_type_error():
    with pytest.raises(TypeError, match="already has LoRA") as info:
        quiet_prep(llama(), target_modules=("q_proj",), modules_to_save=("_proj",))
    assert info.value.kind == "saved_module_is_lora"


@pytest.mark.xfail(strict=True, reason="notes §7: r=2.5 / r='4' fail with TypeError; the reference raises InvalidRank (ValueError)")
@pytest.mark.parametrize("r", [2.5, "4"])
def test_non_integer_rank_raises_type_error(r):
    with pytest.raises(TypeError):
        quiet_prep(llama(), r=r, target_modules=("q_proj",))


@pytest.mark.xfail(strict=True, reason='notes §7: task_type="BOGUS" is a ValueError at LoraConfig; the reference accepts it')
def test_invalid_task_type_rejected():
    with pytest.raises(ValueError, match="Invalid task type"):
        quiet_prep(llama(), target_modules=("q_proj",), task_type="BOGUS")


@pytest.mark.parametrize("adapter", [dict(target_modules=5), dict(target_modules=("q_proj",), exclude_modules=5)])
def test_non_iterable_targets_are_type_errors(adapter):
    with pytest.raises(TypeError):
        quiet_prep(llama(), **adapter)


# -- dropout (notes §6) ----------------------------------------------------------------------------------


@pytest.mark.parametrize("p, expected", [(0.0, nn.Identity), (-0.1, nn.Identity), (0.05, nn.Dropout), (1.0, nn.Dropout)])
def test_dropout_module(p, expected):
    layers = lora_layers(quiet_prep(llama(num_layers=1), lora_dropout=p, target_modules=("q_proj", "embed_tokens")))
    for layer in layers.values():
        module = layer.lora_dropout["default"]
        assert type(module) is expected
        if expected is nn.Dropout:
            assert module.p == p


# -- dispatch (notes §5, §6) --------------------------------------------------------------------------------


def test_conv1d_gets_fan_in_fan_out_true_with_a_warning():
    model = gpt2()
    with expect_warning("conv1d_fan_in_fan_out", CONV1D_WARNING):
        model = prep(model, r=4, target_modules=("c_attn",))
    layer = model.transformer.h[0].attn.c_attn
    assert isinstance(layer, LoraLinear) and layer.fan_in_fan_out is True
    assert (layer.in_features, layer.out_features) == (64, 192)
    assert layer.lora_A["default"].weight.shape == (4, 64)
    assert layer.lora_B["default"].weight.shape == (192, 4)
    assert type(layer.base_layer).__name__ == "Conv1D"


def test_conv1d_with_fan_in_fan_out_true_does_not_warn():
    model = gpt2()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = prep(model, fan_in_fan_out=True, target_modules=("c_attn",))
    assert not [w for w in caught if issubclass(w.category, UserWarning)], [str(w.message) for w in caught]
    assert model.transformer.h[1].attn.c_attn.fan_in_fan_out is True


def test_linear_with_fan_in_fan_out_true_warns_and_gets_false():
    model = llama()
    with expect_warning("linear_fan_in_fan_out", LINEAR_WARNING):
        model = prep(model, fan_in_fan_out=True, target_modules=("q_proj",))
    assert all(layer.fan_in_fan_out is False for layer in lora_layers(model).values())


def test_mixed_conv1d_and_linear_flip_the_shared_flag_in_order():
    layers = lora_layers(quiet_prep(gpt2(), target_modules=("c_attn", "lm_head")))
    assert layers["transformer.h.0.attn.c_attn"].fan_in_fan_out is True
    assert layers["transformer.h.1.attn.c_attn"].fan_in_fan_out is True
    assert layers["lm_head"].fan_in_fan_out is False


def test_embedding_layout():
    model = quiet_prep(llama(), r=4, target_modules=("embed_tokens",))
    layer = model.model.embed_tokens
    assert isinstance(layer, LoraEmbedding) and isinstance(layer.base_layer, nn.Embedding)
    assert layer.lora_embedding_A["default"].shape == (4, 256)
    assert layer.lora_embedding_B["default"].shape == (64, 4)
    names = {n for n, _ in model.named_parameters() if n.startswith("model.embed_tokens.")}
    assert names == {
        "model.embed_tokens.base_layer.weight",
        "model.embed_tokens.lora_embedding_A.default",
        "model.embed_tokens.lora_embedding_B.default",
    }
    assert not hasattr(layer, "lora_A")


def test_linear_layout():
    model = quiet_prep(llama(), r=4, target_modules=("k_proj",))
    layer = model.model.layers[0].self_attn.k_proj
    assert layer.lora_A["default"].weight.shape == (4, 64)
    assert layer.lora_B["default"].weight.shape == (32, 4)
    assert layer.lora_A["default"].bias is None and layer.lora_B["default"].bias is None
    names = {n for n, _ in model.named_parameters() if n.startswith("model.layers.0.self_attn.k_proj.")}
    assert names == {
        "model.layers.0.self_attn.k_proj.base_layer.weight",
        "model.layers.0.self_attn.k_proj.lora_A.default.weight",
        "model.layers.0.self_attn.k_proj.lora_B.default.weight",
    }


def test_wrap_rejects_unsupported_modules():
    with pytest.raises(errors.UnsupportedModule) as info:
        wrap("model.norm", nn.LayerNorm(8), False)
    assert info.value.kind == "unsupported_module"


def test_bnb_linear4bit_keeps_its_quantization(cache):
    model = quantized(cache, "4bit", quant_type="fp4", double_quant=True, compute_dtype="bfloat16")
    layer = quiet_prep(model, r=4, target_modules=("k_proj",)).model.layers[0].self_attn.k_proj
    base = layer.base_layer
    assert isinstance(layer, LoraLinear) and type(base).__name__ == "Linear4bit"
    assert type(base).__module__.startswith("bitsandbytes")
    assert base.compute_dtype == torch.bfloat16
    assert base.weight.quant_type == "fp4"
    assert base.weight.compress_statistics is True
    assert type(base.weight).__name__ == "Params4bit"
    assert (layer.in_features, layer.out_features) == (64, 32)
    assert layer.lora_A["default"].weight.shape == (4, 64)
    assert layer.lora_B["default"].weight.shape == (32, 4)
    assert layer.fan_in_fan_out is False


def test_bnb_linear8bitlt(cache):
    model = quiet_prep(quantized(cache, "8bit"), r=4, target_modules=("k_proj",))
    layer = model.model.layers[0].self_attn.k_proj
    base = layer.base_layer
    assert isinstance(layer, LoraLinear) and type(base).__name__ == "Linear8bitLt"
    assert type(base.weight).__name__ == "Int8Params" and base.weight.dtype == torch.int8
    assert tuple(base.weight.shape) == (32, 64)
    assert (layer.in_features, layer.out_features) == (64, 32)
    assert layer.lora_B["default"].weight.shape == (32, 4)


# -- init (notes §6) -----------------------------------------------------------------------------------------


def test_init_true():
    torch.manual_seed(0)
    layers = lora_layers(quiet_prep(llama(hidden_size=128), r=8, target_modules=("q_proj", "embed_tokens")))
    q = layers["model.layers.0.self_attn.q_proj"]
    a, b = q.lora_A["default"].weight, q.lora_B["default"].weight
    assert not b.any()
    bound = 1 / math.sqrt(128)
    assert a.abs().max() <= bound and a.abs().max() > bound / 2
    emb = layers["model.embed_tokens"]
    assert not emb.lora_embedding_A["default"].any()
    assert 0.8 < emb.lora_embedding_B["default"].std().item() < 1.2


def test_init_gaussian():
    torch.manual_seed(0)
    layers = lora_layers(quiet_prep(llama(hidden_size=128), r=8, init_lora_weights="gaussian",
                                    target_modules=("q_proj", "embed_tokens")))
    a = torch.cat([layers[k].lora_A["default"].weight.flatten() for k in qkeys(0, 1)])
    assert a.std().item() == pytest.approx(1 / 8, rel=0.15)
    assert a.abs().max() > 1 / math.sqrt(128)  # not the uniform init
    assert not any(layers[k].lora_B["default"].weight.any() for k in qkeys(0, 1))
    emb = layers["model.embed_tokens"]  # embeddings: the same as True
    assert not emb.lora_embedding_A["default"].any() and emb.lora_embedding_B["default"].any()


def test_init_false_leaves_both_factors_nonzero():
    layers = lora_layers(quiet_prep(llama(), init_lora_weights=False, target_modules=("q_proj", "embed_tokens")))
    q = layers["model.layers.0.self_attn.q_proj"]
    assert q.lora_A["default"].weight.any() and q.lora_B["default"].weight.any()
    emb = layers["model.embed_tokens"]
    assert emb.lora_embedding_A["default"].any() and emb.lora_embedding_B["default"].any()


@pytest.mark.parametrize("model_factory, target, out", [(llama, "q_proj", 64), (gpt2, "c_attn", 192)])
def test_lora_bias_is_zero_initialised_and_trainable(model_factory, target, out):
    model = quiet_prep(model_factory(), lora_bias=True, target_modules=(target,))
    for layer in lora_layers(model).values():
        bias = layer.lora_B["default"].bias
        assert bias is not None and bias.shape == (out,)
        assert not bias.any() and bias.requires_grad
    assert any(n.endswith("lora_B.default.bias") for n, p in model.named_parameters() if p.requires_grad)


def test_lora_bias_on_bnb_4bit(cache):
    model = quiet_prep(quantized(cache, "4bit"), lora_bias=True, target_modules=("q_proj",))
    bias = model.model.layers[0].self_attn.q_proj.lora_B["default"].bias
    assert bias.shape == (64,) and not bias.any() and bias.requires_grad


def test_lora_bias_on_layer_without_bias_warns():
    model = llama()
    with expect_warning("lora_bias_without_base_bias",
                        r"`lora_bias=True` was passed but the targeted layer of type Linear has no bias"):
        prep(model, lora_bias=True, target_modules=("q_proj",))


def test_lora_bias_on_layer_with_bias_does_not_warn():
    model = gpt2()  # Conv1D layers have a bias
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        prep(model, lora_bias=True, fan_in_fan_out=True, target_modules=("c_attn",))
    assert not [w for w in caught if issubclass(w.category, UserWarning)], [str(w.message) for w in caught]


def test_exclude_modules_that_exclude_nothing_warn():
    model = llama()
    with expect_warning("exclude_unused", r"You have passed exclude_modules=.* but no modules were excluded"):
        prep(model, target_modules=("q_proj",), exclude_modules=("nothing",))


def test_exclude_modules_that_exclude_something_do_not_warn():
    model = llama()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        prep(model, target_modules=("q_proj",), exclude_modules=("0.self_attn.q_proj",))
        prep(llama(), target_modules=("q_proj",), modules_to_save=("lm_head",), exclude_modules=("lm_head",))
    assert not [w for w in caught if issubclass(w.category, UserWarning)], [str(w.message) for w in caught]


@pytest.mark.parametrize("field", ["rank_pattern", "alpha_pattern"])
def test_unused_pattern_keys_warn(field):
    model = llama()
    with expect_warning(f"{field}_unused", rf"following {field} keys did not match any targeted module"):
        prep(model, target_modules=("q_proj",), **{field: (("proj", 2), ("q_proj", 4))})


def test_used_pattern_keys_do_not_warn():
    model = llama()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        prep(model, target_modules=("q_proj", "v_proj"), rank_pattern=(("q_proj", 2),), alpha_pattern=(("v_proj", 4),))
    assert not [w for w in caught if issubclass(w.category, UserWarning)], [str(w.message) for w in caught]


@pytest.mark.xfail(strict=True, reason="notes §4: unused rank_pattern / alpha_pattern keys are a RuntimeWarning; "
                   "the reference emits a PreparationWarning, a UserWarning")
@pytest.mark.parametrize("field", ["rank_pattern", "alpha_pattern"])
def test_unused_pattern_keys_warning_is_a_runtime_warning(field):
    model = llama()
    with pytest.warns(RuntimeWarning):
        prep(model, target_modules=("q_proj",), **{field: (("proj", 2),)})


# -- dtype policy (notes §10) ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "base, autocast, expected",
    [
        (torch.float16, True, torch.float32),
        (torch.float16, False, torch.float16),
        (torch.bfloat16, True, torch.float32),
        (torch.bfloat16, False, torch.bfloat16),
        (torch.float32, True, torch.float32),
        (torch.float32, False, torch.float32),
        (torch.uint8, False, torch.float32),  # packed 4-bit storage: no cast
        (torch.int8, False, torch.float32),  # 8-bit: no cast
        (torch.int8, True, torch.float32),
    ],
)
def test_adapter_dtype_table(base, autocast, expected):
    assert adapter_dtype(base, autocast) == expected


def _lora_dtypes(model: nn.Module) -> dict[str, set[torch.dtype]]:
    out: dict[str, set[torch.dtype]] = {}
    for name, layer in lora_layers(model).items():
        params = [p for n, p in layer.named_parameters() if "lora_" in n]
        out[name] = {p.dtype for p in params}
    return out


@pytest.mark.parametrize("load_dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("autocast", [True, False])
def test_half_precision_base_adapter_dtype(load_dtype, autocast):
    model = quiet_prep(llama(load_dtype=load_dtype), TrainingSpec(prepare_kbit=False, autocast_adapter_dtype=autocast),
                       target_modules=("q_proj", "embed_tokens"))
    expected = torch.float32 if autocast else getattr(torch, load_dtype)
    assert set().union(*_lora_dtypes(model).values()) == {expected}


@pytest.mark.parametrize("autocast, q_dtype", [(True, torch.float32), (False, torch.bfloat16)])
def test_4bit_adapter_follows_compute_dtype(cache, autocast, q_dtype):
    model = quantized(cache, "4bit", load_dtype="bfloat16", compute_dtype="bfloat16", quant_storage="bfloat16")
    model = quiet_prep(model, TrainingSpec(autocast_adapter_dtype=autocast), target_modules=("q_proj", "embed_tokens"))
    dtypes = _lora_dtypes(model)
    assert dtypes["model.layers.0.self_attn.q_proj"] == {q_dtype}
    assert dtypes["model.embed_tokens"] == {torch.float32}  # the k-bit step upcast the embedding


def test_4bit_float_storage_with_default_compute_is_fp32(cache):
    model = quantized(cache, "4bit", compute_dtype="float32", quant_storage="float16")
    model = quiet_prep(model, TrainingSpec(autocast_adapter_dtype=False), target_modules=("q_proj",))
    assert set().union(*_lora_dtypes(model).values()) == {torch.float32}


def test_8bit_adapter_is_fp32(cache):
    model = quiet_prep(quantized(cache, "8bit"), TrainingSpec(autocast_adapter_dtype=False), target_modules=("q_proj",))
    assert set().union(*_lora_dtypes(model).values()) == {torch.float32}


def test_saved_copies_are_never_autocast():
    model = quiet_prep(llama(load_dtype="bfloat16"), TrainingSpec(prepare_kbit=False, autocast_adapter_dtype=True),
                       target_modules=("q_proj",), modules_to_save=("lm_head",))
    assert model.lm_head.modules_to_save["default"].weight.dtype == torch.bfloat16
    assert model.lm_head.original_module.weight.dtype == torch.bfloat16


# -- trainability (notes §8, §9, §12) ----------------------------------------------------------------------------------


def _trainable(model: nn.Module) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def test_only_adapters_are_trainable_and_counts():
    model = llama()
    for p in model.parameters():
        p.requires_grad = True
    model = quiet_prep(model, r=2, target_modules=("q_proj",))
    assert _trainable(model) == {f"{k}.lora_{x}.default.weight" for k in qkeys(0, 1) for x in "AB"}
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 2 * 2 * (64 + 64)


def _bias_numel(model: nn.Module, pred) -> int:
    return sum(p.numel() for n, p in model.named_parameters() if pred(n))


@pytest.mark.parametrize("bias", ["none", "all", "lora_only", ABSENT])
def test_bias_modes_on_gpt2(bias):
    model = quiet_prep(gpt2(), r=2, bias=bias, target_modules=("c_attn",))
    lora = {n for n in _trainable(model) if ".lora_" in n}
    biases = _trainable(model) - lora
    assert sum(p.numel() for n, p in model.named_parameters() if n in lora) == 2 * 2 * (64 + 192)
    every_bias = {n for n, _ in model.named_parameters() if n.endswith(".bias")}
    if bias in ("none", ABSENT):
        assert biases == set()
    elif bias == "all":
        assert biases == every_bias
        assert {"transformer.ln_f.bias", "transformer.h.0.attn.c_attn.base_layer.bias"} <= biases
    else:
        assert biases == {f"transformer.h.{i}.attn.c_attn.base_layer.bias" for i in (0, 1)}


def test_bias_all_matches_whole_names_only():
    class WithTable(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(4, 4)
            self.my_bias_table = nn.Parameter(torch.zeros(3))
            self.bias = nn.Parameter(torch.zeros(2))

    model = quiet_prep(WithTable(), bias="all", target_modules=("proj",))
    assert "my_bias_table" not in _trainable(model)
    assert {"bias", "proj.base_layer.bias"} <= _trainable(model)


def test_lora_only_with_lora_bias():
    model = quiet_prep(gpt2(), bias="lora_only", lora_bias=True, target_modules=("c_attn",))
    assert {"transformer.h.0.attn.c_attn.base_layer.bias", "transformer.h.0.attn.c_attn.lora_B.default.bias"} <= _trainable(model)
    assert "transformer.h.0.attn.c_proj.bias" not in _trainable(model)


def test_modules_to_save_wrapper():
    model = quiet_prep(llama(), target_modules=("q_proj",), modules_to_save=("lm_head", "not_a_module"))
    wrapper = model.lm_head
    assert isinstance(wrapper, SavedModule)
    original, copy_ = wrapper.original_module.weight, wrapper.modules_to_save["default"].weight
    assert not original.requires_grad and copy_.requires_grad
    assert torch.equal(original, copy_) and original.data_ptr() != copy_.data_ptr()
    assert {"lm_head.original_module.weight", "lm_head.modules_to_save.default.weight"} <= {
        n for n, _ in model.named_parameters()}
    assert sum(isinstance(m, SavedModule) for m in model.modules()) == 1  # unknown names are ignored
    x = torch.randn(2, 64)
    assert torch.equal(wrapper(x), wrapper.modules_to_save["default"](x))


def test_modules_to_save_wraps_by_plain_string_suffix():
    model = quiet_prep(llama(), target_modules=("q_proj",), modules_to_save=("head",))
    assert isinstance(model.lm_head, SavedModule)


def test_bias_all_keeps_saved_originals_frozen():
    model = quiet_prep(build_model(ModelSpec("bert", "TOKEN_CLS", num_layers=1)), bias="all",
                       target_modules=("query", "value"), task_type="TOKEN_CLS")
    assert isinstance(model.classifier, SavedModule)
    trainable = _trainable(model)
    assert "classifier.modules_to_save.default.bias" in trainable
    assert "classifier.modules_to_save.default.weight" in trainable
    assert "classifier.original_module.bias" not in trainable
    assert "classifier.original_module.weight" not in trainable


@pytest.mark.parametrize("task", ["SEQ_CLS", "TOKEN_CLS"])
def test_classification_tasks_save_the_head(task):
    model = quiet_prep(llama(task, num_layers=1), target_modules=("q_proj",), task_type=task)
    assert isinstance(model.score, SavedModule)
    assert not model.score.original_module.weight.requires_grad
    assert model.score.modules_to_save["default"].weight.requires_grad


def test_without_task_type_the_head_stays_frozen_and_unwrapped():
    model = quiet_prep(llama("SEQ_CLS", num_layers=1), target_modules=("q_proj",))
    assert isinstance(model.score, nn.Linear) and not model.score.weight.requires_grad


@pytest.mark.xfail(strict=True, reason="notes §9: QUESTION_ANS adds qa_outputs to modules_to_save; the reference "
                   "only knows SEQ_CLS / TOKEN_CLS heads")
def test_question_answering_saves_qa_outputs():
    class QA(Toy):
        def __init__(self):
            super().__init__(1)
            self.qa_outputs = nn.Linear(8, 2)

    model = quiet_prep(QA(), target_modules="all-linear", task_type="QUESTION_ANS")
    assert isinstance(model.qa_outputs, SavedModule)


def test_kbit_step_on_an_unquantized_model():
    model = llama(load_dtype="bfloat16")
    model.model.norm.weight.requires_grad = True
    out = prepare_for_kbit_training(model)
    assert out is model
    assert all(not p.requires_grad for p in model.parameters())
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert not checkpointing(model)
    assert not input_grads(model)
    assert model.config.use_cache is True


def test_kbit_step_on_a_4bit_model(cache):
    model = quantized(cache, "4bit", load_dtype="bfloat16", compute_dtype="bfloat16", quant_storage="bfloat16")
    prepare_for_kbit_training(model)
    packed = {n: p for n, p in model.named_parameters() if type(p).__name__ == "Params4bit"}
    assert len(packed) == 7 and {p.dtype for p in packed.values()} == {torch.bfloat16}  # Params4bit not upcast
    others = {p.dtype for n, p in model.named_parameters() if n not in packed}
    assert others == {torch.float32}
    assert all(not p.requires_grad for p in model.parameters())
    assert checkpointing(model) and model.model.layers[0].gradient_checkpointing
    assert input_grads(model)
    assert model.model.layers[0]._gradient_checkpointing_func.keywords == {}  # `{}` passed, not None
    assert len(model.get_input_embeddings()._forward_hooks) == 2
    assert model.config.use_cache is True
    assert not model.training


def test_kbit_step_use_reentrant_false_adds_one_hook(cache):
    model = quantized(cache, "4bit")
    prepare_for_kbit_training(model, gradient_checkpointing_kwargs={"use_reentrant": False})
    assert model.model.layers[0]._gradient_checkpointing_func.keywords == {"use_reentrant": False}
    assert len(model.get_input_embeddings()._forward_hooks) == 1


def test_kbit_step_without_gradient_checkpointing(cache):
    model = quantized(cache, "4bit")
    prepare_for_kbit_training(model, use_gradient_checkpointing=False)
    assert not checkpointing(model) and not input_grads(model)


def test_kbit_step_keeps_int8_weights(cache):
    model = quantized(cache, "8bit", load_dtype="float16")
    prepare_for_kbit_training(model)
    int8 = [p for p in model.parameters() if type(p).__name__ == "Int8Params"]
    assert int8 and {p.dtype for p in int8} == {torch.int8}
    assert model.model.norm.weight.dtype == torch.float32
    assert checkpointing(model) and input_grads(model)


def test_prepare_honours_training_spec_gradient_checkpointing(cache):
    on = quiet_prep(quantized(cache, "4bit"), TrainingSpec(), target_modules=("q_proj",))
    off = quiet_prep(quantized(cache, "4bit"), TrainingSpec(gradient_checkpointing=False), target_modules=("q_proj",))
    skipped = quiet_prep(llama(load_dtype="bfloat16"), TrainingSpec(prepare_kbit=False), target_modules=("q_proj",))
    assert checkpointing(on) and input_grads(on)
    assert not checkpointing(off)
    assert skipped.model.norm.weight.dtype == torch.bfloat16  # no k-bit step: no upcast


# -- profiles ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "peft, expected",
    [("0.15.0", "seed"), ("0.15.2", "seed"), ("0.16.0", "current"), ("0.21.2", "current"), ("0.21.0.dev0", "current"),
     ("absent", "current")],
)
def test_select_profile_by_versions(peft, expected):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert select_profile(versions={"peft": peft}).name == expected


def test_select_profile_warns_for_a_newer_peft():
    with pytest.warns(UserWarning, match="peft 0.30.0 is newer than the newest known profile"):
        profile = select_profile(versions={"peft": "0.30.0"})
    assert profile.name == "current"


def test_select_profile_by_name():
    assert select_profile("seed", versions={"peft": "0.21.2"}) is PROFILES["seed"]
    assert select_profile("current", versions={"peft": "0.15.0"}) is PROFILES["current"]
    with pytest.raises(ValueError, match="profile='bogus' is not one of seed, current"):
        select_profile("bogus")


def test_profile_default_targets_differ_by_era():
    qwen3 = ModelSpec("qwen3", num_layers=1)
    assert targeted(build_model(qwen3)) == {"model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"}
    with pytest.raises(errors.NoDefaultTargets):
        prep(build_model(qwen3), profile=PROFILES["seed"])
    assert targeted(gpt2()) == {"transformer.h.0.attn.c_attn", "transformer.h.1.attn.c_attn"}


def test_profile_lora_defaults_apply_to_absent_fields():
    settings = resolve(AdapterSpec(), CURRENT)
    assert (settings.r, settings.lora_alpha, settings.lora_dropout, settings.bias) == (8, 8, 0.0, "none")
    assert (settings.use_rslora, settings.init_lora_weights, settings.fan_in_fan_out, settings.lora_bias) == (
        False, True, False, False)
    layers = lora_layers(quiet_prep(llama()))
    assert set(layers) == qkeys(0, 1, names=("q_proj", "v_proj"))
    q = layers["model.layers.0.self_attn.q_proj"]
    assert (q.r["default"], q.scaling["default"]) == (8, 1.0)
    assert isinstance(q.lora_dropout["default"], nn.Identity)
