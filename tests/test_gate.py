"""The regression gate: ``record`` / ``compare`` and the upgrade report.

A corpus recorded and replayed in the same environment reports no change; the same
corpus replayed with a fault planted in upstream (LoRA weights cast to bf16, the shape
of trl 0.26's documented change) reports exactly that change, grouped by field, module
kind and parameter role, with the smallest case and its replay command.  Corrupt and
foreign corpora are refused with one line, never a traceback.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conformance.cli import main
from conformance.gate import design
from reference.spec import ABSENT
from conformance.gate.corpus import (
    INVALID_SHARE, MIN_INVALID_SHARE, VERSION, CorpusError, Observation, design_corpus, generate_cases, load_corpus,
    prepared_coverage, record,
)
from conformance.engine.snapshot import ErrorFacts, Snapshot
from conformance.gate.upgrade import changes_of, markdown, param_role, report_json
from fault_kit import REPO

CASES = 12


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory, cache) -> Path:
    mp = pytest.MonkeyPatch()
    mp.setenv("CONFORMANCE_CACHE", str(cache))
    try:
        path = tmp_path_factory.mktemp("gate") / "corpus"
        record(path, CASES, seed=5, levels=("peft",))
    finally:
        mp.undo()
    return path


@pytest.fixture(autouse=True)
def _cache_env(monkeypatch, cache):
    monkeypatch.setenv("CONFORMANCE_CACHE", str(cache))


def test_generation_is_deterministic_and_stratified():
    first = generate_cases(12, seed=9, levels=("peft", "trl"))
    again = generate_cases(12, seed=9, levels=("peft", "trl"))
    assert [(i, c.dumps()) for i, c in first] == [(i, c.dumps()) for i, c in again]
    assert len({c.dumps() for _, c in first}) == 12
    strata = {i.rsplit("-", 1)[0] for i, _ in first}
    assert strata == {f"{lv}-{k}" for lv in ("peft", "trl") for k in ("none", "8bit", "4bit")}
    for case_id, case in first:
        level, kind, _ = case_id.split("-")
        assert (case.training.level, case.quant.kind) == (level, kind)
    assert [c.dumps() for _, c in generate_cases(12, seed=10, levels=("peft", "trl"))] != [c.dumps() for _, c in first]


@pytest.fixture(scope="module")
def default_corpus():
    """The cases of a default-size corpus (``record``'s ``--cases`` default), generated only."""
    return design_corpus(300, seed=1, levels=("peft", "trl"))


def test_default_size_covers_every_combination(default_corpus):
    # Measured here from the cases themselves, independently of the corpus's own report.
    from strategies.covering import coverage

    assert default_corpus.rows_recorded == default_corpus.rows_total and default_corpus.complete
    by_stratum: dict[str, list] = {}
    for case_id, case in default_corpus.cases:
        if not case.invalid:
            by_stratum.setdefault(case_id.rsplit("-", 1)[0], []).append(design.features(case))
    strata = design.strata(("peft", "trl"))
    assert {s.name for s in strata} == set(by_stratum)
    for s in strata:
        for name, measured in coverage(by_stratum[s.name], s.factors, s.groups, valid=s.valid).items():
            assert measured.complete, f"{name}: {measured.covered}/{measured.required}, missing e.g. {measured.missing[:3]}"
    groups = {g.name: g for s in strata for g in s.groups}
    assert groups["peft-4bit: quantization x training"].strength == 3
    assert groups["trl-4bit: adapter"].strength == 2
    assert "quant.quant_storage" in groups["peft-4bit: quantization x training"].factors
    assert "quant.int8_threshold" in groups["trl-8bit: quantization x training"].factors


def test_default_size_holds_peft_pr_2893(default_corpus):
    """peft PR #2893 (0.19.0): 4-bit LoRA factors follow the compute dtype; visible only with
    autocast off, a half-precision compute dtype and uint8 storage, at the peft level."""
    found = {c.quant.compute_dtype for _, c in default_corpus.cases
             if not c.invalid and c.training.level == "peft" and c.quant.kind == "4bit"
             and c.training.autocast_adapter_dtype is False and c.quant.quant_storage == "uint8"}
    assert {"bfloat16", "float16"} <= found


def test_default_size_spreads_model_types_and_keeps_invalid_cases(default_corpus):
    from strategies.zoo import model_types

    cases = [c for _, c in default_corpus.cases]
    assert len(cases) == 300 and len({c.dumps() for c in cases}) == 300
    for level, types in (("peft", model_types()), ("trl", model_types("CAUSAL_LM"))):
        counts = {t: sum(1 for c in cases if c.training.level == level and c.model.model_type == t) for t in types}
        # Spread evenly: default targets narrow some rows' choice, so allow one case of slack.
        assert min(counts.values()) >= 1 and max(counts.values()) - min(counts.values()) <= 2, counts
    invalid = sum(c.invalid for c in cases)
    assert round(300 * MIN_INVALID_SHARE) <= invalid <= round(300 * INVALID_SHARE)
    valid = [c for c in cases if not c.invalid]
    # The strategies' validity rules survive the pinning of covering rows.
    assert not any(c.adapter.lora_bias is True and c.adapter.init_lora_weights == "gaussian" for c in valid)
    assert not any(isinstance(c.adapter.target_modules, str) and c.adapter.layers_to_transform is not ABSENT
                   for c in valid)
    report = default_corpus.to_json()
    assert report["complete"] and report["rows_total"] == sum(report["rows"].values())
    assert all(g["missing"] == [] for g in report["groups"].values())


def test_a_short_corpus_says_its_coverage_is_partial(corpus_dir):
    manifest = json.loads((corpus_dir / "corpus.json").read_text())
    cov = manifest["coverage"]
    assert cov["complete"] is False and cov["rows_recorded"] < cov["rows_total"] < cov["cases_needed"]
    group = cov["groups"]["peft-4bit: quantization x training"]
    assert group["covered"] < group["required"] and 0 < len(group["missing"]) <= 5
    assert set(group["missing"][0]) <= set(group["factors"])
    # What the recording stack prepared: a combination held only by rejected cases is masked.
    assert group["prepared_covered"] + group["masked"] == group["covered"]


def test_combinations_held_only_by_rejected_cases_are_masked():
    cases = generate_cases(12, seed=5, levels=("peft",))
    everything = prepared_coverage(cases, {i for i, _ in cases}, ("peft",))
    nothing = prepared_coverage(cases, set(), ("peft",))
    name = "peft-none: adapter"
    assert everything[name]["masked"] == 0 and everything[name]["prepared_covered"] > 0
    assert nothing[name]["prepared_covered"] == 0 and nothing[name]["masked"] == everything[name]["prepared_covered"]
    assert len(nothing[name]["masked_first"]) == 5


def test_record_strict_refuses_a_partial_corpus(tmp_path, capsys):
    target = tmp_path / "partial"
    assert main(["record", str(target), "--cases", "12", "--seed", "1", "--level", "peft", "--strict"]) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("python -m conformance record: error: ")]
    assert len(lines) == 1 and "PARTIAL" in lines[0] and "--cases" in lines[0], err
    assert not (target / "corpus.json").exists()  # refused before anything was prepared


def test_record_strict_refuses_unbuildable_cases(tmp_path, capsys, monkeypatch):
    import conformance.gate.corpus as corpus_module
    from conformance.gate.generate import Generated

    cases = generate_cases(2, seed=1, levels=("peft",))
    complete = Generated(cases, {"peft-none": 2}, 2, 2, {})  # no group left to cover
    monkeypatch.setattr(corpus_module, "design_corpus", lambda count, seed, levels: complete)
    monkeypatch.setattr(corpus_module, "prepared_coverage", lambda cases, prepared, levels: {})
    monkeypatch.setattr(corpus_module, "observe", lambda case: Observation("unbuildable", build_error="KeyError: 'x'"))
    target = tmp_path / "unbuildable"
    assert main(["record", str(target), "--cases", "2", "--level", "peft", "--strict"]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines()
             if line.startswith("python -m conformance record: error: ")]
    assert len(lines) == 1 and "2 cases are unbuildable" in lines[0] and "KeyError" in lines[0]
    assert len(load_corpus(target).cases) == 2  # the corpus is written all the same


def test_corpus_round_trips(corpus_dir):
    corpus = load_corpus(corpus_dir)
    manifest = json.loads((corpus_dir / "corpus.json").read_text())
    assert manifest["format"] == "lora-conformance-corpus" and manifest["version"] == VERSION
    assert manifest["stack"]["peft"] == corpus.stack["peft"]
    assert len(corpus.cases) == CASES == len(corpus.observations)
    assert {o.status for o in corpus.observations.values()} <= {"prepared", "raised", "unbuildable"}
    assert any(o.status == "prepared" and o.snapshot.lora for o in corpus.observations.values())


def test_same_stack_reports_no_change(corpus_dir, tmp_path, capsys):
    report = tmp_path / "r.json"
    md = tmp_path / "r.md"
    assert main(["compare", str(corpus_dir), "--report", str(report), "--markdown", str(md), "--fail-on-change"]) == 0
    err = capsys.readouterr().err  # both stacks, with their install sources, and the interpreter replaying
    assert "recorded under: " in err and f"replaying {CASES} cases under: python " in err and sys.executable in err
    from importlib import metadata

    assert f"peft {metadata.version('peft')}" in err.split("recorded under: ")[1].splitlines()[0]
    data = json.loads(report.read_text())
    assert data["totals"]["changed"] == 0 and data["changes"] == [] and data["stack_changes"] == {}
    assert "No observable change" in md.read_text()


def test_planted_upstream_change_is_reported(corpus_dir, tmp_path, monkeypatch):
    import peft.tuners.tuners_utils as tuners_utils

    original = tuners_utils.cast_adapter_dtype

    def to_bf16(model, adapter_name, autocast_adapter_dtype=True):
        original(model, adapter_name, autocast_adapter_dtype=autocast_adapter_dtype)
        for name, param in model.named_parameters():
            if ".lora_A." in name or ".lora_B." in name:
                param.data = param.data.to(torch.bfloat16)

    monkeypatch.setattr(tuners_utils, "cast_adapter_dtype", to_bf16)
    report = tmp_path / "r.json"
    md = tmp_path / "r.md"
    assert main(["compare", str(corpus_dir), "--report", str(report), "--markdown", str(md), "--fail-on-change"]) == 1
    data = json.loads(report.read_text())
    fields = {(g["field"], g["role"]) for g in data["changes"]}
    assert ("dtype", "lora_A") in fields and ("dtype", "lora_B") in fields
    group = next(g for g in data["changes"] if (g["field"], g["role"]) == ("dtype", "lora_A"))
    assert group["module_kind"] in ("linear", "conv1d", "bnb4bit", "bnb8bit")
    assert {"before": "'float32'", "after": "'bfloat16'"}.items() <= group["values"][0].items() or any(
        v["after"] == "'bfloat16'" for v in group["values"]
    )
    smallest = group["smallest"]
    assert smallest["after"] == "bfloat16" and smallest["path"].endswith(".weight") and ".lora_A." in smallest["path"]
    assert smallest["replay"] == f"python -m conformance compare {corpus_dir} --case {smallest['id']}"
    # Only the planted fault's fields change: the factors' dtype, and the values of factors loaded
    # from a saved adapter (a resumed case: its bf16 factors hold the saved values rounded).
    assert {g["field"] for g in data["changes"]} <= {"dtype", "value"}
    assert {g["role"] for g in data["changes"] if g["field"] == "value"} <= {"lora_A", "lora_B", "lora module"}
    text = md.read_text()
    assert "`dtype`" in text and "lora_A" in text and smallest["id"] in text
    # The replay command shows the change for that one case.
    assert main(["compare", str(corpus_dir), "--case", smallest["id"]]) == 1


def _obs(status="prepared", error=None, warnings=()):
    if status == "unbuildable":
        return Observation("unbuildable", build_error="KeyError: 'mixtral'")
    snap = Snapshot(error=ErrorFacts(*error)) if error else Snapshot()
    return Observation(status, snap, tuple(warnings))


def test_status_changes_are_changes():
    built_to_broken = changes_of("c", _obs(), _obs("unbuildable"))
    assert [(c.field, c.before, c.after) for c in built_to_broken] == [("<build>.builds", "yes", "no (KeyError: 'mixtral')")]
    assert changes_of("c", _obs("unbuildable"), _obs("unbuildable")) == []
    now_raises = changes_of("c", _obs(), _obs("raised", ("ValueError", "invalid_bias", "m")))
    assert [c.field for c in now_raises] == ["<error>.raised"]
    other_kind = changes_of("c", _obs("raised", ("ValueError", "a", "")), _obs("raised", ("TypeError", "a", "")))
    assert [c.field for c in other_kind] == ["<error>.error"]
    warned = changes_of("c", _obs(warnings=["UserWarning: old"]), _obs(warnings=["UserWarning: new"]))
    assert [(c.field, c.before, c.after) for c in warned] == [
        ("<warning>.added", None, "UserWarning: new"), ("<warning>.removed", "UserWarning: old", None)]


@pytest.mark.parametrize(("path", "role"), [
    ("model.layers.0.self_attn.q_proj.lora_A.default.weight", "lora_A"),
    ("model.layers.0.self_attn.q_proj.lora_B.default.weight", "lora_B"),
    ("model.embed_tokens.lora_embedding_A.default", "lora_A"),
    ("model.layers.0.self_attn.q_proj.base_layer.weight", "base weight"),
    ("model.layers.0.self_attn.q_proj.base_layer.bias", "base bias"),
    ("model.layers.0.input_layernorm.weight", "norm"),
    ("transformer.h.0.ln_1.bias", "norm"),
    ("model.embed_tokens.weight", "embedding"),
    ("transformer.wte.weight", "embedding"),
    ("lm_head.weight", "head"),
    ("score.modules_to_save.default.weight", "saved copy"),
    ("score.original_module.weight", "saved original"),
    ("model.layers.0.mlp.down_proj.weight", "other weight"),
])
def test_param_roles(path, role):
    assert param_role(path) == role


def test_markdown_is_short(corpus_dir):
    corpus = load_corpus(corpus_dir)
    replayed = {i: _obs(warnings=[f"UserWarning: {i} " + "x" * 300]) for i in corpus.cases}
    report = report_json(corpus, replayed, {"peft": "9.9"}, str(corpus_dir))
    text = markdown(report, max_rows=30)
    assert len(text) < 20_000 and text.count("\n| `") <= 30


def _row(field, cases, before, after, *, role="model", kind="-", model_type="llama", more=0, extra_values=()):
    values = [{"before": before, "after": after, "count": cases}, *extra_values]
    return {"level": "peft", "field": field, "module_kind": kind, "role": role, "count": cases, "cases": cases,
            "case_ids": [], "values": values, "more_values": more,
            "smallest": {"id": f"peft-none-{cases:04d}", "path": "p", "before": before, "after": after,
                         "case": {"model": {"model_type": model_type}}, "replay": "python -m conformance compare c --case x"}}


def test_default_size_meets_every_trainer_of_the_installed_trl(default_corpus):
    from strategies.trainers import installed_trainers

    met = {c.training.trainer_name for _, c in default_corpus.cases if c.training.level == "trl" and not c.invalid}
    assert met == set(installed_trainers())
    groups = {g.name for s in design.strata(("trl",)) for g in s.groups}
    assert "trl-4bit: trainer x training" in groups


def test_markdown_groups_changes_by_trainer():
    rows = [dict(_row("dtype", 5, "'float32'", "'bfloat16'"), level="trl", trainer="reward"),
            dict(_row("dtype", 7, "'float32'", "'bfloat16'"), level="trl", trainer="sft"),
            dict(_row("requires_grad", 2, "False", "True"), level="trl", trainer="reward")]
    report = {"stack_changes": {}, "changes": rows, "by_trainer": {"-": {"cases": 9, "changed": 0},
                                                                   "reward": {"cases": 6, "changed": 5},
                                                                   "sft": {"cases": 8, "changed": 7}},
              "totals": {"cases": 23, "changed": 12, "changes": 14, "groups": 3, "before": {}, "after": {}}}
    text = markdown(report)
    assert "| reward | 6 | 5 |" in text and "| sft | 8 | 7 |" in text and "| - | 9 |" not in text
    table = [line.split(" | ")[1] for line in text.splitlines() if line.startswith("| trl |")]
    assert table == ["reward", "reward", "sft"]  # grouped by trainer, each one's largest groups first


def test_markdown_puts_status_changes_first_and_keeps_the_table_whole():
    rows = [
        _row("dtype", 40, "'float32'", "'bfloat16'", role="lora_A", kind="bnb4bit", model_type="gpt2"),
        _row("requires_grad", 12, "False", "True", role="other weight", more=2),
        _row("<warning>.added", 9, "None", "'UserWarning: `tied` and ``x``'"),
        _row("<error>.raised", 3, "'no error'", "'ValueError[x]: a | b'", model_type="mixtral"),
    ]
    report = {"stack_changes": {"trl": ["0.25.1", "0.26.0"]}, "changes": rows,
              "totals": {"cases": 50, "changed": 45, "changes": 64, "groups": 4, "before": {}, "after": {}}}
    text = markdown(report)
    table = [line for line in text.splitlines() if line.startswith("| peft |")]
    assert [line.split(" | ")[2] for line in table] == ["`<error>.raised`", "`dtype`", "`requires_grad`",
                                                        "`<warning>.added`"]
    assert "| model type |" in text and "| mixtral |" in table[0] and "| gpt2 |" in table[1]
    # a value holding backticks is fenced by a longer run of them, and a pipe is escaped: each row keeps its cells
    assert "``` 'UserWarning: `tied` and ``x``' ```" in table[3]
    assert "a \\| b" in table[0]
    header_cells = text.splitlines()[[i for i, x in enumerate(text.splitlines()) if x.startswith("| level |")][0]].count(" | ")
    for line in table:
        assert line.replace("\\|", "").count(" | ") == header_cells, line
    assert "(+2 more)" in table[2] and "*(+N more)*: the group holds N more distinct before → after pairs" in text
    assert "other weight: a weight of a module LoRA did not wrap" in text and "lora_A" in text


@pytest.mark.parametrize("damage", ["missing", "not_json", "foreign", "newer", "checksum", "bad_case"])
def test_bad_corpus_is_one_clear_line(corpus_dir, tmp_path, damage):
    bad = tmp_path / "bad"
    if damage != "missing":
        bad.mkdir()
        for f in corpus_dir.iterdir():
            (bad / f.name).write_bytes(f.read_bytes())
    manifest_path = bad / "corpus.json"
    if damage == "not_json":
        manifest_path.write_text("{not json")
    elif damage in ("foreign", "newer"):
        manifest = json.loads(manifest_path.read_text())
        manifest.update({"format": "something-else"} if damage == "foreign" else {"version": VERSION + 1})
        manifest_path.write_text(json.dumps(manifest))
    elif damage == "checksum":
        with (bad / "observations.jsonl").open("a") as fh:
            fh.write("{}\n")
    elif damage == "bad_case":
        lines = (bad / "cases.jsonl").read_text().splitlines()
        lines[0] = json.dumps({"id": "x", "case": {"model": {"model_type": 3}}})
        (bad / "cases.jsonl").write_text("\n".join(lines) + "\n")
        manifest = json.loads(manifest_path.read_text())
        import hashlib
        manifest["files"]["cases.jsonl"]["sha256"] = hashlib.sha256((bad / "cases.jsonl").read_bytes()).hexdigest()
        manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(CorpusError):
        load_corpus(bad)
    proc = subprocess.run([sys.executable, "-m", "conformance", "compare", str(bad), "--report", str(tmp_path / "r.json")],
                          capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    message = [line for line in proc.stderr.splitlines() if line.startswith("python -m conformance compare: error: ")]
    assert len(message) == 1 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_record_refuses_a_non_empty_directory(corpus_dir):
    with pytest.raises(CorpusError, match="not empty"):
        record(corpus_dir, 3, seed=1, levels=("peft",))
