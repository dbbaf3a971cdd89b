"""The known-divergence registry: the shipped file, matching rules, and malformed files."""

from __future__ import annotations

import dataclasses
import re
import textwrap
import tomllib

import pytest
from packaging.specifiers import SpecifierSet

from conformance.engine.diff import Divergence
from conformance.engine.features import FEATURES
from conformance.engine.known import REGISTRY_PATH, Entry, Registry, load_registry
from reference import ABSENT, AdapterSpec, Case, ModelSpec, QuantSpec

STACK = {"peft": "0.21.2", "transformers": "5.23.0", "torch": "2.13.0", "trl": "1.16.0", "bitsandbytes": "0.50.2"}


def write(tmp_path, text: str, name: str = "registry.toml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def entry(registry: Registry, id_: str) -> Entry:
    (found,) = [e for e in registry.entries if e.id == id_]
    return found


def case(model_type: str = "llama", quant: str = "none", **adapter) -> Case:
    return Case(ModelSpec(model_type), QuantSpec(kind=quant), AdapterSpec(**adapter))


ERR_CLS = Divergence("<error>", "error", "ValueError[saved_module_quantized]", "RuntimeError[saved_module_quantized]")


# -- the shipped file ----------------------------------------------------------------------------------


def _case_fields() -> set[str]:
    sample = Case(ModelSpec("llama"))
    out = set()
    for part in ("model", "quant", "adapter", "training"):
        out |= {f"{part}.{f.name}" for f in dataclasses.fields(getattr(sample, part))}
    return out | {"invalid"}


def test_shipped_registry_parses_and_documents_every_entry():
    raw = tomllib.loads(REGISTRY_PATH.read_text())["divergence"]
    registry = load_registry(REGISTRY_PATH, versions=STACK)
    assert len(registry.entries) == len(raw) >= 1
    ids = [e.id for e in registry.entries]
    assert len(ids) == len(set(ids))
    fields = _case_fields()
    for item, e in zip(raw, registry.entries, strict=True):
        assert item["id"] == e.id and re.fullmatch(r"[a-z0-9]+(-[a-z0-9]+)*", e.id), e.id
        assert len(e.explanation.split()) >= 10, e.id
        assert e.link.startswith("https://"), e.id
        assert e.matches, e.id
        for m in e.matches:
            for pattern in (m.path, m.field, m.reference, m.upstream):
                if isinstance(pattern, str):
                    re.compile(re.sub(r"\{\w+\}", "x", pattern))
        for dotted, allowed in e.when:
            assert dotted in fields or dotted.removeprefix("feature.") in FEATURES, \
                f"{e.id}: when-key {dotted!r} is neither a Case field nor a feature"
            assert allowed, e.id
        for package, spec in e.versions:
            assert package in ("peft", "transformers", "torch", "trl", "bitsandbytes", "accelerate"), e.id
            SpecifierSet(spec)  # parses


SEED_ONLY = {"layers-to-transform-zero-read-as-missing", "orphan-lora-inside-saved-module",
             "inference-mode-leaves-saved-copy-trainable",
             "lora-embedding-update-ignores-embed-scale", "falcon-8bit-modifies-a-matmul8bit-view-in-place",
             "trainable-tokens-skip-aliased-embeddings", "trainable-tokens-ignore-embed-scale",
             "lora-only-bias-not-saved", "saved-copy-with-lora-inside-cannot-be-reloaded",
             "new-adapter-saved-copy-active", "set-adapter-trains-original-of-unsaved-module",
             "add-adapter-freezes-active-saved-copies", "dpo-family-merge-reads-a-missing-bias",
             "tokens-share-rows-with-an-untied-head",
             "peft-015-merge-drops-lora-bias-scaling"}
# Entries for upstream ranges between the pinned stacks (trl 0.20 - 0.23; peft < 0.21.2 with transformers >= 5.18).
NEITHER = {"trl-kbit-step-freezes-passed-peft-model", "seq2seq-peft-model-transformers-5-18",
           "moe-string-targets-split-into-characters", "peft-bnb-merge-drops-lora-bias-scaling",
           "peft-bnb-merge-reads-a-missing-bias", "trl-025-kbit-step-mixes-dtypes-in-full-precision-training"}


def test_shipped_entries_are_active_for_their_stacks_and_not_for_an_old_one():
    current = load_registry(REGISTRY_PATH, versions=STACK)
    assert {e.id for e in current.active} == {e.id for e in current.entries} - SEED_ONLY - NEITHER
    seed = load_registry(REGISTRY_PATH, versions={"peft": "0.15.2", "transformers": "4.53.3", "bitsandbytes": "0.47.0",
                                                  "trl": "0.19.1"})
    assert SEED_ONLY <= {e.id for e in seed.active} and not NEITHER & {e.id for e in seed.active}
    # bitsandbytes 0.47 keeps the int8 scales of a re-assigned 8-bit weight: QDoRA runs on the seed stack
    assert "qdora-8bit-cpu-weight-loses-int8-scales" not in {e.id for e in seed.active}
    middle = load_registry(REGISTRY_PATH, versions={"peft": "0.17.1", "transformers": "4.56.0", "trl": "0.21.0"})
    assert "trl-kbit-step-freezes-passed-peft-model" in {e.id for e in middle.active}
    release = load_registry(REGISTRY_PATH, versions={"peft": "0.19.0", "transformers": "5.23.0", "trl": "1.16.0"})
    assert "seq2seq-peft-model-transformers-5-18" in {e.id for e in release.active}
    # peft 0.19.0 splits a string target into characters on MoE models, so the 0.20+ MoE string-target entries are off.
    assert "moe-string-targets-split-into-characters" in {e.id for e in release.active}
    assert not {"init-variants-crash-on-expert-parameters", "moe-regex-targets-widened"} & {e.id for e in release.active}
    old = load_registry(REGISTRY_PATH, versions={"peft": "0.10.0", "transformers": "4.40.0"})
    assert old.active == []


# -- matching -------------------------------------------------------------------------------------------------

BASIC = """
[[divergence]]
id = "by-version"
versions = { peft = ">=0.19,<0.22", transformers = ">=5.0" }
match = [{ path = "<error>", field = "error" }]
explanation = "explains class divergences on peft 0.19 to 0.21 with transformers 5"
link = "https://example.org/1"
"""


@pytest.mark.parametrize(
    "versions, active",
    [
        ({"peft": "0.21.2", "transformers": "5.23.0"}, True),
        ({"peft": "0.19.0", "transformers": "5.0.0"}, True),
        ({"peft": "0.21.2+local", "transformers": "5.23.0"}, True),
        ({"peft": "0.22.0", "transformers": "5.23.0"}, False),
        ({"peft": "0.18.1", "transformers": "5.23.0"}, False),
        ({"peft": "0.21.2", "transformers": "4.57.0"}, False),
        ({"peft": "0.21.2"}, False),  # a package the entry names must be installed
        ({"peft": "absent", "transformers": "5.23.0"}, False),
    ],
)
def test_versions(tmp_path, versions, active):
    registry = load_registry(write(tmp_path, BASIC), versions=versions)
    assert [e.id for e in registry.active] == (["by-version"] if active else [])
    unexplained, used = registry.explain(case(), [ERR_CLS])
    assert (unexplained, used) == (([], ["by-version"]) if active else ([ERR_CLS], []))


WHEN = """
[[divergence]]
id = "quantized"
when = { "quant.kind" = ["4bit", "8bit"] }
match = [{ path = ".*", field = "error" }]
explanation = "only quantized cases are explained by this test entry"
link = "https://example.org/q"

[[divergence]]
id = "default-targets"
when = { "adapter.target_modules" = ["<absent>", "<none>"], "model.model_type" = "mixtral" }
match = [{ path = ".*", field = "error" }]
explanation = "only mixtral cases without targets are explained by this entry"
link = "https://example.org/d"

[[divergence]]
id = "listed-targets"
when = { "adapter.target_modules" = [["q_proj", "v_proj"]], "adapter.task_type" = "<absent>" }
match = [{ path = ".*", field = "error" }]
explanation = "only cases whose targets are exactly q_proj, v_proj are explained"
link = "https://example.org/l"
"""


@pytest.mark.parametrize(
    "the_case, holds",
    [
        (case(quant="4bit", target_modules=("x",)), {"quantized"}),
        (case(quant="8bit", target_modules=("x",)), {"quantized"}),
        (case(target_modules=("x",)), set()),
        (case("mixtral"), {"default-targets"}),  # field absent
        (case("mixtral", target_modules=None), {"default-targets"}),  # field given as None
        (case("mixtral", target_modules="all-linear"), set()),
        (case("llama"), set()),
        (case("llama", target_modules=("q_proj", "v_proj")), {"listed-targets"}),
        (case("llama", target_modules=("q_proj", "v_proj"), task_type="CAUSAL_LM"), set()),
        (case("llama", target_modules=("v_proj", "q_proj")), set()),
        (case("mixtral", "4bit"), {"quantized", "default-targets"}),
    ],
)
def test_when(tmp_path, the_case, holds):
    registry = load_registry(write(tmp_path, WHEN), versions=STACK)
    assert {e.id for e in registry.active if e.holds_for(the_case)} == holds
    unexplained, used = registry.explain(the_case, [ERR_CLS])
    assert bool(unexplained) is (not holds)
    assert set(used) <= holds and len(used) == (1 if holds else 0)


def test_when_reads_absent_and_none(tmp_path):
    e = entry(load_registry(write(tmp_path, WHEN), versions=STACK), "default-targets")
    assert dict(e.when)["adapter.target_modules"] == ("<absent>", "<none>")
    assert case("mixtral", target_modules=ABSENT).adapter.target_modules is ABSENT
    assert e.holds_for(case("mixtral", target_modules=ABSENT))


REGEX = r"""
[[divergence]]
id = "paths"
match = [{ path = '.*\.mlp\.(experts|gate)(\..*)?', field = 'dtype|shape' }]
explanation = "dtype and shape divergences of expert modules only"
link = "https://example.org/p"

[[divergence]]
id = "values"
match = [{ path = "<error>", field = "error", reference = 'ValueError\[saved_module_quantized\]', upstream = 'RuntimeError\[saved_module_quantized\]' }]
explanation = "error divergences with exactly these values on each side"
link = "https://example.org/v"

[[divergence]]
id = "listed"
match = [
    { path = "<model>", field = 'warnings\.exclude_unused' },
    { path = "<error>", field = "raised", upstream = 'ValueError\[other\]: .*ParamWrapper.*' },
    { path = ".*", field = 'adapter\[default\]\.scaling', reference = '2\.0' },
]
explanation = "a list of alternatives, each with its own value regexes"
link = "https://example.org/m"
"""


@pytest.mark.parametrize(
    "d, explained_by",
    [
        (Divergence("model.layers.0.mlp.experts", "dtype", "float32", "bfloat16"), "paths"),
        (Divergence("model.layers.0.mlp.gate.weight", "shape", (1,), (2,)), "paths"),
        (Divergence("model.layers.0.mlp.experts", "requires_grad", True, False), None),  # field regex
        (Divergence("model.layers.0.mlp.experts_extra", "dtype", "a", "b"), None),  # full match on path
        (Divergence("x.model.layers.0.mlp.gate_proj", "dtype", "a", "b"), None),
        (ERR_CLS, "values"),
        (Divergence("<error>", "error", "ValueError[saved_module_quantized]", "RuntimeError[other]"), None),
        (Divergence("<error>", "error", "ValueError[saved_module_quantized]", "TypeError[saved_module_quantized]"), None),
        (Divergence("<error>", "error", "TypeError[saved_module_quantized]", "RuntimeError[saved_module_quantized]"), None),
        (Divergence("<model>", "warnings.exclude_unused", False, True), "listed"),
        (Divergence("<model>", "warnings.conv1d_fan_in_fan_out", False, True), None),
        (Divergence("<error>", "raised", "no error", "ValueError[other]: ValueError: lora.ParamWrapper no"), "listed"),
        (Divergence("<error>", "raised", "no error", "TypeError[other]: ParamWrapper"), None),
        (Divergence("a.q_proj", "adapter[default].scaling", 2.0, 4.0), "listed"),  # str() of a float
        (Divergence("a.q_proj", "adapter[default].scaling", 1.0, 2.0), None),
    ],
)
def test_path_field_and_value_regexes(tmp_path, d, explained_by):
    registry = load_registry(write(tmp_path, REGEX), versions=STACK)
    unexplained, used = registry.explain(case(), [d])
    if explained_by is None:
        assert (unexplained, used) == ([d], [])
    else:
        assert (unexplained, used) == ([], [explained_by])


def test_explain_splits_and_reports_each_entry_once(tmp_path):
    registry = load_registry(write(tmp_path, REGEX), versions=STACK)
    found = [
        Divergence("<model>", "warnings.exclude_unused", False, True),
        Divergence("some.param", "requires_grad", True, False),
        Divergence("m.mlp.experts", "dtype", "a", "b"),
        Divergence("x.q_proj", "adapter[default].scaling", 2.0, 1.0),
        Divergence("<model>", "use_cache", True, False),
    ]
    unexplained, used = registry.explain(case(), found)
    assert unexplained == [found[1], found[4]]
    assert used == ["listed", "paths"]  # in order of first use, without repeats
    assert registry.explain(case(), []) == ([], [])


def test_stale_lists_active_entries_without_hits(tmp_path):
    text = REGEX + textwrap.dedent(
        """
        [[divergence]]
        id = "old-only"
        versions = { peft = "<0.15" }
        match = [{ path = ".*", field = "error" }]
        explanation = "an entry for an old stack that never applies here"
        link = "https://example.org/o"
        """
    )
    registry = load_registry(write(tmp_path, text), versions=STACK)
    assert [e.id for e in registry.stale(set())] == ["paths", "values", "listed"]
    assert [e.id for e in registry.stale({"values", "old-only"})] == ["paths", "listed"]
    assert registry.stale({"paths", "values", "listed"}) == []


def test_entry_fields(tmp_path):
    e = entry(load_registry(write(tmp_path, BASIC + REGEX), versions=STACK), "by-version")
    assert e.versions == (("peft", ">=0.19,<0.22"), ("transformers", ">=5.0"))
    assert e.explanation.startswith("explains") and e.link == "https://example.org/1"


# -- malformed files --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, message",
    [
        ('[[divergence]]\nmatch = []\nexplanation = "x"\nlink = "https://e"\n', r"'\?' lacks \['id'\]"),
        ('[[divergence]]\nid = "a"\nmatch = []\nlink = "https://e"\n', r"'a' lacks \['explanation'\]"),
        ('[[divergence]]\nid = "a"\nmatch = []\nexplanation = "x"\n', r"'a' lacks \['link'\]"),
        ('[[divergence]]\nid = "a"\nexplanation = "x"\nlink = "https://e"\n', r"lacks \['match'\]"),
        ('[[divergence]]\nid = "a"\nmatch = [{ path = ".*" }]\nexplanation = "x"\nlink = "https://e"\n',
         "a match row needs path and field"),
        (
            '[[divergence]]\nid = "a"\nmatch = []\nexplanation = "x"\nlink = "https://e"\n'
            '[[divergence]]\nid = "a"\nmatch = []\nexplanation = "y"\nlink = "https://e"\n',
            "duplicate ids",
        ),
    ],
    ids=["missing-id", "missing-explanation", "missing-link", "missing-match", "row-without-field", "duplicate-id"],
)
def test_malformed_registry_raises_with_the_path(tmp_path, text, message):
    path = write(tmp_path, text, "broken.toml")
    with pytest.raises(ValueError) as info:
        load_registry(path, versions=STACK)
    assert str(path) in str(info.value)
    assert re.search(message, str(info.value)), str(info.value)


def test_empty_registry(tmp_path):
    registry = load_registry(write(tmp_path, "# nothing yet\n"), versions=STACK)
    assert registry.entries == [] and registry.active == []
    d = Divergence("<error>", "error", "a", "b")
    assert registry.explain(case(), [d]) == ([d], [])


def test_case_only_features_never_load_the_model_and_come_first():
    """A `when` checks the features of the case alone before those that load the model (a CUDA case on
    a CPU machine, say, must not be loaded to learn that an entry is out of scope)."""
    from conformance.engine.features import CASE_ONLY, FEATURES, CaseContext
    from reference.spec import AdapterSpec, Case, ModelSpec

    def no_model():
        raise AssertionError("a case-only feature loaded the model")

    ctx = CaseContext(Case(ModelSpec("llama"), adapter=AdapterSpec(target_modules=("q_proj",))), model=no_model)
    for name in sorted(CASE_ONLY):
        ctx.value(f"feature.{name}")
    assert CASE_ONLY <= FEATURES.keys()
    entry = next(e for e in load_registry(REGISTRY_PATH, versions={}).entries if e.id == "trainable-tokens-tied-head-drops-bias")
    keys = [k for k, _ in entry.when]
    assert keys.index("feature.trainable_tokens") < keys.index("feature.token_linear_with_bias")
