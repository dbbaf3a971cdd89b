"""Unit tests of the reference without peft: independence, scaling, target matching, errors."""

from __future__ import annotations

import ast
import builtins
import math
import subprocess
import sys
import textwrap

import pytest
from transformers import LlamaModel

from conformance.engine.models import make_config
from reference import AdapterSpec, ModelSpec, PreparationError
from reference import builtin_class
from reference import errors
from reference.config import resolve
from reference.layers import SavedModule
from reference.rules import scaling
from reference.targets import effective_targets, is_saved, match_names, pattern_value
from reference_helpers import (  # noqa: F401 - the shared helpers and fixtures
    REPO,
    CURRENT,
    NO_KBIT,
    LLAMA_LINEARS,
    llama,
    gpt2,
    prep,
    quiet_prep,
    lora_layers,
    targeted,
    qkeys,
    Attn,
    Toy,
    quantized,
    CONV1D_WARNING,
    LINEAR_WARNING,
    expect_warning,
    checkpointing,
    input_grads,
)


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
    from conformance.engine.models import build_model, load_model

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
    # upstream's wording: nothing excluded -> "not found"; something excluded -> "nothing targeted"
    ("nothing_matched", llama, dict(target_modules=("nothing",)), errors.NoTargetMatched, "ValueError",
     "targets_not_found"),
    ("all_excluded", llama, dict(target_modules=("q_proj",), exclude_modules=("q_proj",)), errors.NoTargetMatched,
     "ValueError", "nothing_targeted"),
    ("only_saved_targets", llama, dict(target_modules=("q_proj",), modules_to_save=("q_proj",)),
     errors.NoTargetMatched, "ValueError", "nothing_targeted"),
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


