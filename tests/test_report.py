"""Reports: crash-safe example streams, strict judgement, markdown, and merging shard reports."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from conformance.plugin.merge import MergeError, load_reports, merge_reports
from conformance.plugin.report import Recorder, build_report, strict_failures, write_report
from conformance.plugin.stream import ExampleStream, read_stream, read_streams, stream_files
from conformance.plugin.summary import markdown, summary_lines
from reference.profiles import installed_versions

STACK = installed_versions()
GPT2 = {"model": {"model_type": "gpt2"}, "adapter": {"r": 4, "target_modules": ["c_attn"]}}
BERT = {"model": {"model_type": "bert", "task": "SEQ_CLS"}, "adapter": {"r": 2}}


def _entry(case: dict, outcome: str = "agree", **extra) -> dict:
    return {
        "model_type": case["model"]["model_type"], "task": "CAUSAL_LM", "quantization": "none",
        "load_dtype": "float32", "level": "peft", "invalid": False, "rejected": False,
        "outcome": outcome, "case": case, **extra,
    }


DIVERGENCE = {"path": "transformer.h.0.attn.c_attn", "field": "adapter[default].scaling", "reference": 4.0, "upstream": 2.0}
DIVERGING = _entry(GPT2, "diverge", divergences=[DIVERGENCE])


def _settings(**kw) -> SimpleNamespace:
    base = {"stack": STACK, "profile_name": "current", "device": "cpu", "seed": 7, "level": "all"}
    return SimpleNamespace(**{**base, **kw})


def test_a_worker_stream_survives_a_crash_mid_write(tmp_path):
    rec = Recorder(ExampleStream(tmp_path, "gw0"))
    rec.record("t", {"n": 1}, failed=False, final=False)
    rec.record("t", {"n": 2}, failed=True, final=False)  # shrinking starts: provisional
    rec.record("t", {"n": 3}, failed=True, final=False)  # a shrink replay: not written
    rec.record("t", {"n": 4}, failed=True, final=True)  # the minimal example replaces n=2
    rec.record("u", {"n": 5}, failed=True, final=False)  # the worker "dies" while shrinking u
    path = rec.stream.path
    with open(path, "a") as fh:
        fh.write('{"test": "u", "entry": {"n": ')  # torn last line
    assert [e["n"] for e in read_stream(path)] == [1, 4, 5]
    ExampleStream(tmp_path, "gw1").write("v", {"n": 6})
    assert [e["n"] for e in read_streams(stream_files(tmp_path))] == [1, 4, 5, 6]


def test_the_summary_groups_divergences_and_counts_invalid_inputs():
    invalid = _entry(GPT2, invalid=True, rejected=True)
    report = build_report(_settings(), [DIVERGING, invalid, _entry(GPT2)])
    assert report["summary"]["gpt2"]["none"] == {"diverge": 1, "agree": 2}
    assert report["invalid_summary"]["gpt2"]["none"] == 1
    assert report["divergence_groups"] == [
        {"field": "adapter[default].scaling", "module_kind": "lora module", "count": 1, "examples": [0]}
    ]
    text = "\n".join(summary_lines(report, strict=[]))
    assert "gpt22/1/0/0/1" in text.replace(" ", "") and "agree/diverge/known/skip/invalid" in text
    assert "adapter[default].scaling on lora module: x1 in 1 example (#0 gpt2 none peft)" in text
    assert "(#N: the example's index in the JSON report's \"examples\")" in text


def test_strict_fails_an_empty_run_skips_stale_entries_and_crashes():
    assert "empty run" in strict_failures(build_report(_settings(), []))[0]
    skipped = _entry(GPT2, "skip", reason="bitsandbytes is not installed")
    report = build_report(_settings(), [skipped], run={"crashed_workers": {"gw1": "Not properly terminated"}})
    reasons = "\n".join(strict_failures(report))
    assert "1 examples skipped: bitsandbytes is not installed" in reasons
    assert "worker gw1 crashed: Not properly terminated" in reasons
    assert "coverage gap: peft: model_type x quantization: 0/" in reasons
    assert "stale" not in reasons  # one example in no entry's scope: too few to judge an entry
    # five examples in an entry's scope, none explained by it: the entry is stale
    in_scope = [dict(_entry(GPT2), registry_scope=["quantized-classification-head"]) for _ in range(5)]
    report = build_report(_settings(), in_scope)
    assert "stale known-divergence entry quantized-classification-head: 5 examples in its scope" in "\n".join(
        strict_failures(report))
    assert "stale" not in "\n".join(strict_failures(report, judge_stale=False))
    four = build_report(_settings(), in_scope[:4])
    assert four["unjudged_known"]["quantized-classification-head"]["cases_in_scope"] == 4 and not four["stale_known"]


def test_markdown_is_short_and_replays_each_divergence():
    report = build_report(_settings(), [DIVERGING, _entry(GPT2)])
    text = markdown(report, strict=["2 examples diverge"])
    assert text.startswith("## LoRA conformance: ❌ failed")
    assert "**profile** `current`" in text and "torch " in text
    assert "| 2 | 1 | 1 | 0 | 0 | 0 | 0 |" in text  # examples, agree, diverge, known, skip, invalid, rejected
    assert "| `adapter[default].scaling` | lora module | 1 |" in text
    assert "python -m conformance explain --profile current --case '" + json.dumps(GPT2, sort_keys=True, separators=(",", ":")) in text
    assert len(text.splitlines()) < 40
    assert markdown(build_report(_settings(), [_entry(GPT2)])).startswith("## LoRA conformance: ✅ passed")


def _write(path: Path, entries: list, **run) -> Path:
    write_report(path, build_report(_settings(), entries, run=run))
    return path


def test_merge_combines_shards_counts_explicit_examples_once_and_names_missing_shards(tmp_path):
    seed_example = _entry(GPT2)
    a = _write(tmp_path / "a.json", [seed_example, DIVERGING], shard="1/3")
    b = _write(tmp_path / "b.json", [seed_example, _entry(BERT)], shard="2/3")
    merged = merge_reports(load_reports([a, b]))
    assert merged["totals"]["examples"] == 3 and merged["totals"]["diverge"] == 1
    assert merged["summary"]["bert"]["none"] == {"agree": 1}
    assert merged["missing_shards"] == ["3/3"] and merged["merged_from"] == [str(a), str(b)]
    assert any("shard 3/3 has no report" in r for r in strict_failures(merged))
    other = tmp_path / "c.json"
    write_report(other, build_report(_settings(profile_name="seed"), [_entry(BERT)]))
    with pytest.raises(MergeError, match="differ in profile"):
        merge_reports(load_reports([a, other]))


def test_merge_cli_exit_status_and_outputs(tmp_path):
    a = _write(tmp_path / "a.json", [_entry(GPT2)])
    b = _write(tmp_path / "b.json", [DIVERGING])
    out, md = tmp_path / "m.json", tmp_path / "m.md"
    cmd = [sys.executable, "-m", "conformance", "merge", str(a), str(b), "--out", str(out), "--markdown", str(md)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1, result.stderr  # a divergence fails the merge
    assert json.loads(out.read_text())["totals"]["examples"] == 2 and "### Divergences" in md.read_text()
    strict = subprocess.run(cmd[:5] + ["--out", str(out), "--strict"], capture_output=True, text=True, timeout=120)
    assert strict.returncode == 1 and "STRICT MODE FAILED" in strict.stdout and "coverage gap" in strict.stdout
    bad = subprocess.run(cmd[:4] + [str(tmp_path / "none.json"), "--out", str(out)], capture_output=True, text=True)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1
    assert bad.stderr.startswith("python -m conformance merge: error: ") and "not a readable JSON report" in bad.stderr


def test_summary_counts_the_numerics_checks():
    from conformance.plugin.summary import _numerics_line

    same = {"same_structure": True}
    examples = [
        {"outcome": "agree", **same, "numerics": {"tolerance": "fp32", "max_error_in_tolerances": 0.0}},
        {"outcome": "agree", **same, "numerics": {"tolerance": "bf16", "max_error_in_tolerances": 0.25}},
        {"outcome": "known", **same,
         "numerics": {"tolerance": "bf16", "max_error_in_tolerances": 3.5, "explained_divergences": 1}},
        {"outcome": "agree", **same},  # numerics off
        {"outcome": "known", "same_structure": False},  # a known structural difference: nothing to pair
        {"outcome": "agree", "upstream_error": "ValueError[x]"},  # both rejected: nothing to run
        {"outcome": "diverge", **same},
        {"outcome": "agree", **same, "numerics": {"tolerance": "fp32", "max_error_in_tolerances": 0.0,
                                                  "both_raised": ["eval forward: RuntimeError: x"]}},
    ]
    line = _numerics_line({"examples": examples})
    assert line == ("numerics: ran on 4 of the 5 passing examples where both sides prepared a model of the same "
                    "structure (80.0%) (bf16 x2, fp32 x2); worst error 0.25 of its tolerance (known divergences "
                    "reach 3.5); on 1 a forward raised the same exception on both sides, so those passes compared "
                    "nothing (see `both_raised` in the JSON report)")
    assert _numerics_line({"examples": []}) == ""


def test_known_counts_agree_with_the_headline():
    """An entry that explained a divergence of a diverging example is not a "known" example: the
    summary says how many of the examples each entry touched ended known and how many diverge."""
    mutated = {"known": ["loraconfig-mutated-in-place"]}
    entries = [dict(DIVERGING, **mutated), dict(DIVERGING, **mutated), _entry(GPT2, "known", **mutated)]
    report = build_report(_settings(), entries)
    assert report["known_by_outcome"] == {"loraconfig-mutated-in-place": {"diverge": 2, "known": 1}}
    text = "\n".join(summary_lines(report))
    assert "3 examples: 0 agree, 2 diverge, 1 known, 0 skip (known: registry entries explain every divergence" in text
    assert "loraconfig-mutated-in-place in 3 examples (1 known, 2 diverge)" in text
    assert "those with another, unexplained divergence count as diverge" in text


def test_the_summary_says_how_many_examples_each_test_family_asked_for_and_ran():
    def ran(test, asked, n):
        return [_entry(GPT2, test=test, asked=asked) for _ in range(n)]

    entries = (ran("t.py::test_peft_cell[a]", 2, 2) + ran("t.py::test_peft_cell[b]", 2, 1)
               + ran("t.py::test_peft_level_8bit", 20, 8) + ran("t.py::test_peft_level_4bit", 20, 22))
    report = build_report(_settings(), entries)
    assert report["tests"]["t.py::test_peft_level_8bit"] == {"asked": 20, "ran": 8}
    line = next(x for x in summary_lines(report) if x.startswith("examples asked/ran per test family: "))
    assert "test_peft_cell 4/3 (2 tests), test_peft_level_8bit 20/8, test_peft_level_4bit 20/22" in line
    assert "Hypothesis ran out of new cases" in line and "explicit @examples" in line
    assert not any(x.startswith("examples asked/ran") for x in summary_lines(build_report(_settings(), [_entry(GPT2)])))


def test_the_markdown_replays_with_the_interpreter_of_the_run():
    report = build_report(_settings(), [DIVERGING], run={"replay": {"conformance": "/venv/bin/python -m conformance"}})
    text = markdown(report)
    assert "/venv/bin/python -m conformance explain --profile current --case '" in text
    assert "**example #0** (its index in the JSON report's `examples`): gpt2" in text


def test_a_strict_reason_about_numerics_names_the_examples_and_their_replay():
    """'a forward raised on both sides' is actionable: the test, the exception and a replay command."""
    raised = {"tolerance": "fp32", "max_error_in_tolerances": 0.0,
              "both_raised": ["train_forward: RuntimeError: Trying to backward through the graph a second time"]}
    entries = [_entry(GPT2, "agree", numerics=raised, test=f"t::cell[{i}]") for i in range(5)]
    report = build_report(_settings(), entries)
    (reason,) = [r for r in strict_failures(report, judge_stale=False) if "raised the same exception" in r]
    assert reason.startswith("5 examples whose forward raised")
    assert "t::cell[0]: train_forward: RuntimeError: Trying to backward" in reason
    assert reason.count("replay: ") == 3 and "explain --profile" in reason and '"model_type":"gpt2"' in reason
    assert reason.endswith("... and 2 more (see the JSON report)")


def test_valid_cases_upstream_rejected_are_split_by_whether_a_registry_entry_names_the_bug():
    """The share of wasted examples the issue bounds (under 5 %) is the one no registry entry explains."""
    named = _entry(GPT2, "known", rejected=True, upstream_error="TypeError[saved_module_is_lora]",
                   known=["token-classification-head-targeted"])
    both = _entry(GPT2, "agree", rejected=True, upstream_error="ValueError[no_target_modules]",
                  reference_error="ValueError[no_target_modules]")
    # both sides refuse alike, known only for another reason (the config written in place): no upstream bug
    alike = _entry(GPT2, "known", rejected=True, upstream_error="ValueError[no_target_modules]",
                   reference_error="ValueError[no_target_modules]", known=["loraconfig-mutated-in-place"])
    report = build_report(_settings(), [named, both, alike] + [_entry(GPT2) for _ in range(7)])
    assert report["totals"]["unintended_rejections"] == 3 and report["totals"]["rejections_by_known_bugs"] == 1
    text = "\n".join(summary_lines(report))
    assert ("valid cases upstream rejected anyway: 3 of 10 (30.0%; 1 of them upstream bugs the registry names, "
            "the rest 20.0%)") in text


def test_the_report_counts_trl_examples_per_trainer():
    trl = {"model": {"model_type": "llama"}, "training": {"level": "trl", "trainer": "dpo"}}
    entries = [_entry(trl, level="trl", trainer="dpo"), _entry(trl, "known", level="trl", trainer="dpo"),
               _entry(GPT2, level="trl", trainer="sft"), _entry(GPT2)]
    report = build_report(_settings(), entries)
    assert report["trainers"] == {"dpo": {"agree": 1, "known": 1}, "sft": {"agree": 1}}
    assert "trl-level examples per trainer: dpo 2 (1 agree, 1 known); sft 1 (1 agree)" in summary_lines(report)
