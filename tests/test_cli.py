"""``python -m conformance``: bad input is one line and exit status 2; 1 means a divergence, only.

Malformed cases, unknown fields, values of the wrong type and out-of-range values of the
harness-side fields are refused before anything is built, naming the field and what it
takes.  Deliberately invalid adapter values (``r=0``, an unknown ``bias``) are cases worth
explaining, so they pass the check.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conformance.cli import main
from conformance.cli.validate import CliError, case_from_json


def _run(capsys: pytest.CaptureFixture, *args: str) -> tuple[int, str, str]:
    try:
        code = main(list(args))
    except SystemExit as exc:  # argparse's own errors
        code = exc.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


GPT2 = {"model": {"model_type": "gpt2"}}


@pytest.mark.parametrize("case, message", [
    ("{not json", "--case: not valid JSON"),
    ("[]", "a case is a JSON object with the sections model, quant, adapter, training"),
    (json.dumps({"model": {"model_type": "nope"}}), "model.model_type='nope' is not one of t5, mt5, bart, gpt2"),
    (json.dumps({"model": {}}), "model.model_type is required: one of t5"),
    (json.dumps({"adapter": {"r": 4}}), "model.model_type is required"),
    (json.dumps({**GPT2, "adapterz": {}}), "'adapterz' is not a section of a case; the sections are model, quant"),
    (json.dumps({**GPT2, "adapter": {"rank": 4}}), "adapter.rank is not a field; the adapter fields are r, lora_alpha"),
    (json.dumps({**GPT2, "adapter": {"r": "four"}}), "adapter.r='four' is not an integer"),
    (json.dumps({**GPT2, "adapter": {"r": True}}), "adapter.r=True is not an integer"),
    (json.dumps({**GPT2, "adapter": {"target_modules": 3}}), "adapter.target_modules=3 is not null or a string or a list of strings"),
    (json.dumps({**GPT2, "adapter": []}), "adapter must be a JSON object of fields"),
    (json.dumps({**GPT2, "quant": {"kind": "2bit"}}), "quant.kind='2bit' is not one of none, 8bit, 4bit"),
    (json.dumps({**GPT2, "quant": {"int8_threshold": -1}}), "quant.int8_threshold=-1 is not a non-negative number"),
    (json.dumps({"model": {"model_type": "gpt2", "hidden_size": 65}}), "model.hidden_size=65 is not a positive multiple of 64"),
    (json.dumps({"model": {"model_type": "gpt2", "num_layers": 0}}), "model.num_layers=0 is not a positive integer"),
    (json.dumps({"model": {"model_type": "gpt2", "task": "SEQ_2_SEQ_LM"}}), "model.task='SEQ_2_SEQ_LM' is not one of CAUSAL_LM"),
    (json.dumps({"model": {"model_type": "gpt2", "load_dtype": "float8"}}), "model.load_dtype='float8' is not one of float32"),
    (json.dumps({**GPT2, "training": {"gradient_checkpointing": None}}), "training.gradient_checkpointing=None is not true or false"),
    (json.dumps({**GPT2, "training": {"level": "sft"}}), "training.level='sft' is not one of peft, trl"),
    (json.dumps({**GPT2, "invalid": "yes"}), "invalid='yes' is not true or false"),
])
def test_a_bad_case_is_one_line_and_status_2(capsys, case, message):
    code, out, err = _run(capsys, "explain", "--case", case)
    assert code == 2, (out, err)
    assert len(err.strip().splitlines()) == 1, err
    assert err.startswith("python -m conformance explain: error: argument --case: ") and message in err, err
    assert out == ""


@pytest.mark.parametrize("args, message", [
    (["--model-type", "gpt3"], "--model-type='gpt3' is not one of t5, mt5"),
    (["--model-type", "gpt2", "--task", "SEQ_2_SEQ_LM"], "--task='SEQ_2_SEQ_LM' is not one of CAUSAL_LM, SEQ_CLS, TOKEN_CLS for gpt2"),
    (["--model-type", "gpt2", "--set", "adapter.r=four"], "--set: adapter.r='four' is not an integer"),
    (["--model-type", "gpt2", "--set", "adapter.use_rslora=yes"], "--set: adapter.use_rslora='yes' is not true or false"),
    (["--model-type", "gpt2", "--set", "adapter.foo=1"], "--set: adapter.foo is not a field"),
    (["--model-type", "gpt2", "--set", "model.seed=-1"], "--set: model.seed=-1 is not a non-negative integer"),
    (["--model-type", "gpt2", "--set", "adapterr.r=1"], "argument --set: 'adapterr.r=1': expected SECTION.FIELD=VALUE"),
    (["--model-type", "gpt2", "--quant", "2bit"], "argument --quant: invalid choice: '2bit'"),
    (["--profile", "nope", "--model-type", "gpt2"], "argument --profile: 'nope' is not one of seed, "),
    (["--limit", "0"], "argument --limit: '0' is not a positive integer"),
    (["--case", "@/no/such/file.json"], "cannot read the case file '/no/such/file.json'"),
    ([], "give --case JSON (or @FILE), or --model-type TYPE"),
])
def test_bad_explain_flags_are_one_line_and_status_2(capsys, args, message):
    code, out, err = _run(capsys, "explain", *args)
    assert code == 2 and len(err.strip().splitlines()) == 1 and message in err, err


@pytest.mark.parametrize("args, message", [
    ([], "the following arguments are required: COMMAND"),
    (["bogus"], "invalid choice: 'bogus'"),
    (["compare", "/no/such/corpus", "--report", "r.json"], "compare: error: /no/such/corpus"),
    (["record", "/tmp/x", "--cases", "0"], "argument --cases: '0' is not a positive integer"),
    (["merge", "/no/such/report.json", "--out", "m.json"], "merge: error: /no/such/report.json: not a readable JSON report"),
])
def test_other_commands_refuse_bad_input_in_one_line(capsys, args, message):
    code, _, err = _run(capsys, *args)
    assert code == 2 and len(err.strip().splitlines()) == 1 and message in err, err


def test_typed_values_pass_and_deliberately_invalid_adapter_values_are_kept():
    case = case_from_json({"model": {"model_type": "gpt2", "task": "SEQ_CLS"}, "quant": {"kind": "4bit"},
                           "adapter": {"r": 0, "bias": "bogus", "target_modules": "c_.*", "lora_alpha": 8.5,
                                       "rank_pattern": {"c_attn": 2}, "init_lora_weights": "gaussian"},
                           "training": {"level": "trl", "gradient_checkpointing": True}})
    assert case.adapter.r == 0 and case.adapter.bias == "bogus" and case.adapter.rank_pattern == (("c_attn", 2),)
    with pytest.raises(CliError, match=r"^--set: adapter.r='4' is not an integer$"):
        case_from_json({"model": {"model_type": "gpt2"}, "adapter": {"r": "4"}}, "--set")


def test_set_takes_json_and_bare_words_where_the_field_takes_a_string(capsys, monkeypatch):
    from conformance.cli import explain

    seen = []
    monkeypatch.setattr("conformance.engine.runner.run_case", lambda case, profile: seen.append(case) or _Agree(case))
    monkeypatch.setattr(explain, "stack_line", lambda: "torch x")
    code, out, _ = _run(capsys, "explain", "--model-type", "gpt2", "--set", "adapter.r=4", "--set", "adapter.bias=all",
                        "--set", 'adapter.target_modules=["c_attn"]')
    assert code == 0 and seen[0].adapter.r == 4 and seen[0].adapter.bias == "all"
    assert seen[0].adapter.target_modules == ("c_attn",)
    assert out.startswith("stack: torch x\ninterpreter: python ") and sys.executable in out


class _Agree:
    def __init__(self, case):
        self.case, self.status, self.known, self.divergences = case, "agree", [], []
        self.reference = self.upstream = None


def test_a_bad_case_never_prints_a_traceback():
    """The real process: exit status 2, one line, and no Python internals (the issue's three inputs)."""
    for args in (["--model-type", "gpt3"], ["--case", '{"model":{"model_type":"nope"}}'], ["--case", '{"model":{}}']):
        proc = subprocess.run([sys.executable, "-m", "conformance", "explain", *args], capture_output=True, text=True,
                              timeout=300)
        assert proc.returncode == 2, proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr, proc.stderr
        assert "__init__()" not in proc.stderr and "missing 1 required positional argument" not in proc.stderr


def test_explain_prints_what_the_numerics_found():
    """A replayed strict failure about numerics shows it: the exception raised on both sides, or the entry naming it."""
    from conformance.cli.explain import _numerics_lines

    raised = "train_forward: RuntimeError: Trying to backward through the graph a second time"
    lines = _numerics_lines({"tolerance": "int8", "max_error_in_tolerances": 0.0, "both_raised": [raised],
                             "note": f"{raised} on both sides"})
    assert lines[0].startswith("numerics: tolerance int8, worst error 0.0 of it; train_forward")
    assert lines[1] == f"  a forward raised on both sides (unexplained; fails --conformance-strict): {raised}"
    known = _numerics_lines({"tolerance": "int8", "max_error_in_tolerances": 0.0, "both_raised_known": ["entry-id"]})
    assert known[1] == "  a forward raised on both sides, explained by entry-id"
    assert _numerics_lines(None)[0].startswith("numerics: not run")
