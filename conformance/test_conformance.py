"""The conformance tests: each Hypothesis example prepares a case twice and diffs.

Run with ``python -m pytest conformance``; options are ``--conformance-*``.

Two families of tests:

* **cell tests** (``test_peft_cell[...]``, ``test_trl_cell[...]``): one test per cell of
  ``strategies.coverage.cells``, so every model type meets every quantization kind and
  every target kind (peft level) in every run, whatever Hypothesis draws.  Hypothesis
  explores the rest of the case inside the cell, with a seed derived from the run's seed
  and the cell, and shrinks a failure inside it.  Each runs ``Settings.cell_examples``
  examples (the first is the cell's simplest case: every optional field left out);
* **free tests**: one per level and quantization kind, ``--conformance-examples``
  examples each, drawn from the whole zoo (Hypothesis decides the cells there), with the
  explicit seed scenario as ``@example``.
"""

from __future__ import annotations

import dataclasses
import hashlib

import pytest
from hypothesis import example, given, seed

from conformance.plugin import checks
from reference.spec import AdapterSpec, Case, ModelSpec, QuantSpec, TrainingSpec
from strategies import cases
from strategies.coverage import Cell, cells

# The seed scenario: nf4 QLoRA of a Llama-style model, bf16 compute, r=8, rsLoRA off and on.
SEED_SCENARIO = tuple(
    Case(
        model=ModelSpec("llama", "CAUSAL_LM", num_layers=2, load_dtype="bfloat16"),
        quant=QuantSpec(kind="4bit", quant_type="nf4", double_quant=True, compute_dtype="bfloat16"),
        adapter=AdapterSpec(
            r=8,
            lora_alpha=16,
            lora_dropout=0.05,
            target_modules=("q_proj", "k_proj", "v_proj", "o_proj"),
            use_rslora=rslora,
            task_type="CAUSAL_LM",
        ),
        training=TrainingSpec(level="peft", prepare_kbit=True, gradient_checkpointing=True),
    )
    for rslora in (False, True)
)


# The same QLoRA run through SFTTrainer with bf16 training, the model given as a path.
TRL_SEED_SCENARIO = tuple(
    dataclasses.replace(
        case,
        training=TrainingSpec(level="trl", gradient_checkpointing=True, bf16=True, model_from_path=True),
    )
    for case in SEED_SCENARIO
)


def _cell_seed(run_seed: int, cell: Cell) -> int:
    """The Hypothesis seed of one cell test: the run's seed and the cell, nothing else, so a
    run replays and no two cells share a random stream."""
    return int.from_bytes(hashlib.sha256(f"{run_seed}|{cell.level}|{cell.id}".encode()).digest()[:8], "little")


def _run_cell(cell: Cell, request: pytest.FixtureRequest) -> None:
    # (cells the options exclude are deselected by the plugin)
    conf = checks.current()
    strategy = cases(level=cell.level, model_types=(cell.model_type,), quant_kinds=(cell.quantization,),
                     target_kinds=(cell.target_kind,), tasks=(cell.task,),
                     dora=True if cell.adapter_feature == "dora" else None,
                     init=None if cell.init_variant == "default" else cell.init_variant,
                     tokens=cell.adapter_feature == "tokens", parameters=cell.adapter_feature == "parameters",
                     tying=cell.adapter_feature == "tying", resume=cell.adapter_feature == "resume",
                     adapters=cell.adapter_feature == "adapters", trainer=cell.trainer if cell.level == "trl" else None,
                     template=cell.adapter_feature == "template")

    @seed(_cell_seed(conf.seed, cell))
    @checks.hypothesis_settings(max_examples=conf.cell_examples, test_id=request.node.nodeid)
    @given(case=strategy)
    def run(case: Case) -> None:
        checks.check_case(case, conf, request.node.nodeid)

    run()


def _cells(level: str) -> tuple[Cell, ...]:
    """The cells of ``level`` for this run's options: the kinds rotate over the quantization kinds
    the run checks, so a restricted run still meets every target kind; a shard keeps its own.
    (An excluded level keeps its full list, which the plugin deselects.)"""
    conf = checks.current()
    keep = (lambda c: conf.in_shard(c.model_type, c.quantization)) if conf.shard else None
    chosen = cells(level, quant_kinds=conf.quant_kinds, keep=keep) if conf.wants(level) else ()
    return chosen or cells(level)


@pytest.mark.parametrize("cell", _cells("peft"), ids=lambda c: c.id)
def test_peft_cell(cell: Cell, request):
    """peft level, one cell: prepare_model_for_kbit_training (when asked) + get_peft_model agree."""
    _run_cell(cell, request)


@pytest.mark.parametrize("cell", _cells("trl"), ids=lambda c: c.id)
def test_trl_cell(cell: Cell, request):
    """trl level, one cell: the cell's trainer's preparation agrees with the reference's flow for it."""
    _run_cell(cell, request)


def _level(level: str, case: Case, request: pytest.FixtureRequest) -> None:
    conf = checks.current()
    if not conf.wants(level):
        pytest.skip(f"--conformance-level excludes {level}")
    if case.quant.kind not in conf.quant_kinds:
        pytest.skip(f"--conformance-quant excludes {case.quant.kind}")
    explicit = case in SEED_SCENARIO or case in TRL_SEED_SCENARIO
    if conf.shard and not explicit and not conf.in_shard(case.model.model_type, case.quant.kind):
        pytest.skip(f"--conformance-shard={conf.shard} excludes {case.model.model_type}/{case.quant.kind}")
    checks.check_case(case, conf, request.node.nodeid)


@checks.hypothesis_settings()
@given(case=cases(level="peft", quant_kinds=("none",), model_types=checks.current().shard_model_types("none")))
def test_peft_level_unquantized(case, request):
    """peft level, full-precision models: get_peft_model (and sometimes the k-bit step) agree."""
    _level("peft", case, request)


@checks.hypothesis_settings()
@given(case=cases(level="peft", quant_kinds=("8bit",), model_types=checks.current().shard_model_types("8bit")))
def test_peft_level_8bit(case, request):
    """peft level, bitsandbytes 8-bit: prepare_model_for_kbit_training + get_peft_model agree."""
    _level("peft", case, request)


@checks.hypothesis_settings()
@given(case=cases(level="peft", quant_kinds=("4bit",), model_types=checks.current().shard_model_types("4bit")))
@example(case=SEED_SCENARIO[0])
@example(case=SEED_SCENARIO[1])
def test_peft_level_4bit(case, request):
    """peft level, bitsandbytes 4-bit (QLoRA): prepare_model_for_kbit_training + get_peft_model agree."""
    _level("peft", case, request)


@checks.hypothesis_settings()
@given(case=cases(level="trl", quant_kinds=("none",), model_types=checks.current().shard_model_types("none")))
def test_trl_level_unquantized(case, request):
    """trl level, full-precision models: SFTTrainer's preparation agrees with the reference's trl flow."""
    _level("trl", case, request)


@checks.hypothesis_settings()
@given(case=cases(level="trl", quant_kinds=("8bit",), model_types=checks.current().shard_model_types("8bit")))
def test_trl_level_8bit(case, request):
    """trl level, bitsandbytes 8-bit: SFTTrainer's preparation agrees with the reference's trl flow."""
    _level("trl", case, request)


@checks.hypothesis_settings()
@given(case=cases(level="trl", quant_kinds=("4bit",), model_types=checks.current().shard_model_types("4bit")))
@example(case=TRL_SEED_SCENARIO[0])
@example(case=TRL_SEED_SCENARIO[1])
def test_trl_level_4bit(case, request):
    """trl level, bitsandbytes 4-bit (QLoRA): SFTTrainer's preparation agrees with the reference's trl flow."""
    _level("trl", case, request)
