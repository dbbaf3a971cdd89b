"""The trl trainers that take a ``peft_config``, and how each prepares the model, per trl era.

Every trl trainer carries its own copy of the preparation code, and the copies differ.  This
module is the table of what each one does; :mod:`reference.trl` holds the steps themselves
(one function per step, shared by every trainer that takes it).

``preparation`` names the shape of a trainer's own peft block:

* ``sft``: SFTTrainer's, per trl era (:data:`reference.trl.TRL_FLOWS`).
* ``family`` (trl 0.19's DPO, KTO, ORPO, CPO and BCO, each a copy of the same block): a
  PeftModel given with a ``peft_config`` is merged and unloaded first; a 4-bit or 8-bit model
  then takes peft's k-bit step with the trainer's checkpointing settings (no "sharded" test,
  unlike SFTTrainer's), any other model gets input grads when checkpointing is on;
  ``get_peft_model`` with peft's defaults; with ``bf16`` a 4-bit model gets norms in fp32 and
  fp32 embeddings / head in bf16.  Without a ``peft_config``: input grads when checkpointing is on.
* ``reward_classic`` (trl 0.19's RewardTrainer): a model that is not already a PeftModel takes
  the k-bit step when quantized, then ``get_peft_model``; no input grads, no bf16 cast.  A
  PeftModel is left as it is, with or without a ``peft_config``.
* ``grpo_classic`` (trl 0.19's GRPOTrainer): plain ``get_peft_model``, no k-bit step; with
  checkpointing, ``use_cache`` off, the model's ``gradient_checkpointing_enable()`` and input
  grads unless ``use_reentrant`` is False.
* ``helper`` (trl 0.25's Reward): trl's module-level
  ``prepare_peft_model``, the one SFTTrainer 0.25 calls (:data:`reference.trl.TRL_FLOWS`
  ``helper-0.25``: trl's own norms-only k-bit step, checkpointing turned on at construction,
  the bf16 module cast of a non-sharded 4-bit model, a PeftModel with a config merged first).
* ``inline`` (trl 0.26's Reward, 1.16's DPO, KTO, Reward, GRPO and RLOO, each with its
  own copy of the block): plain ``get_peft_model``; input grads with checkpointing; every trainable
  parameter of a quantized model cast to bf16 (from 1.16: DoRA magnitudes excepted); a PeftModel
  with a ``peft_config`` is merged first (0.26) or rejected (1.16).

The other columns: ``ref_adapter`` (a PeftModel given without a ``peft_config`` and without a
``ref_model`` gets ``add_adapter("ref", <its config>)``, a frozen, inactive copy of its adapter's
values, the DPO-family reference model); ``disables_dropout`` (``disable_dropout=True`` by
default: every ``nn.Dropout`` of the model, LoRA's included, gets ``p=0``); ``mirrors_pad_token``
(the tokenizer's pad token id written into the text config); ``rejects_head_lora``;
``gradient_checkpointing_default`` (the config's default); ``task`` (the model class it trains)
and ``dataset`` (the smallest dataset it accepts, ``conformance.engine.offline``).

Rows were read from each trainer's source (to find where to probe) and observed on trl 0.19.1,
0.25.1, 0.26.0 and 1.16.0 (CPU, the zoo's tiny models): ``docs/spec/trl-notes.md`` section 7.
On trl 0.25.1 / 0.26.0 (run under transformers 5) only RewardTrainer works at all (see the rows),
so the others have no row there.  An era without a
row for a trainer does not generate it: the harness claims nothing it has not checked.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

from packaging.specifiers import SpecifierSet
from packaging.version import Version

__all__ = ["TRAINERS", "TRAINER_NAMES", "TrainerRules", "available_trainers", "trainer_rules"]

TRAINER_NAMES = ("sft", "dpo", "kto", "reward", "grpo", "rloo", "orpo", "cpo", "bco")
"""Every trainer short name a case may carry (``training.trainer``)."""


@dataclass(frozen=True)
class TrainerRules:
    """One trainer's preparation in one trl era."""

    trainer: str
    trl: str
    """The trl versions the row was checked on, as a PEP 440 specifier."""
    preparation: str
    """``sft``, ``family``, ``reward_classic``, ``grpo_classic``, ``helper`` or ``inline`` (module docstring)."""
    dataset: str
    """``text`` (SFT), ``preference``, ``unpaired``, ``pairs`` or ``prompts``."""
    task: str = "CAUSAL_LM"
    disables_dropout: bool = False
    ref_adapter: bool = False
    mirrors_pad_token: bool = False
    rejects_head_lora: bool = False
    gradient_checkpointing_default: bool = False
    peft_model_with_config: str = "merge"
    """A PeftModel passed with a ``peft_config``: ``merge`` (merged and unloaded, then a new
    adapter), ``ignore`` (kept, the config dropped), ``reject`` (an error) or ``none`` (not
    generated: the trainer wraps the PeftModel again)."""
    loads_paths: bool = True
    """The trainer takes a checkpoint path and ``model_init_kwargs`` (trl 0.19's RewardConfig has
    no ``model_init_kwargs``)."""
    bf16_cast_skips_dora_magnitude: bool = False
    """inline: the bf16 cast of a quantized model's trainables leaves DoRA magnitudes in fp32."""
    takes_quantization_config: bool = False
    """The trainer has a ``quantization_config`` argument (trl PR #6157, KTO #6276; observed on 1.16)."""
    clones_chat_template: bool = False
    """The trainer has ``chat_template_path`` (checked on 1.16: SFT and Reward; ``reference.chat_template``)."""
    template_tokens_trainable: bool = True
    """The tokens a cloned template added are made trainable."""
    template_eos_on_text_config: bool = True
    """A cloned template's end-of-sequence id goes to the text config (``reference.trl.TrlFlow``)."""
    loads_image_text_paths: bool = True
    """A vision-language checkpoint path loads as its own class (``reference.trl.TrlFlow``); trl
    0.19's trainers load every path with ``AutoModelForCausalLM`` (trl#3099)."""


_SEED = ">=0.19,<0.20"
_025 = ">=0.25,<0.26"
_026 = ">=0.26,<0.27"
_CURRENT = ">=1.16"


def _family(name: str, dataset: str) -> TrainerRules:
    return TrainerRules(name, _SEED, "family", dataset, disables_dropout=True, loads_image_text_paths=False)


def _helper(name: str, dataset: str, trl: str, **rules) -> TrainerRules:
    return TrainerRules(name, trl, "helper", dataset, gradient_checkpointing_default=True, **rules)


def _inline(name: str, dataset: str, trl: str = _CURRENT, **rules) -> TrainerRules:
    current = trl == _CURRENT
    defaults = dict(mirrors_pad_token=current, rejects_head_lora=current, bf16_cast_skips_dora_magnitude=current,
                    peft_model_with_config="reject" if current else "merge", takes_quantization_config=current)
    return TrainerRules(name, trl, "inline", dataset, gradient_checkpointing_default=True, **(defaults | rules))


TRAINERS: tuple[TrainerRules, ...] = (
    # trl 0.19.1
    TrainerRules("sft", ">=0.15,<0.22", "sft", "text"),
    _family("dpo", "preference"),
    _family("orpo", "preference"),
    _family("cpo", "preference"),
    _family("kto", "unpaired"),
    _family("bco", "unpaired"),
    TrainerRules("reward", _SEED, "reward_classic", "pairs", task="SEQ_CLS", disables_dropout=True,
                 peft_model_with_config="ignore", loads_paths=False),
    TrainerRules("grpo", _SEED, "grpo_classic", "prompts", peft_model_with_config="none", loads_image_text_paths=False),
    # trl 0.22 - 0.24, 0.27 - 1.15: SFTTrainer only (the other trainers' rows were not checked there)
    TrainerRules("sft", ">=0.22", "sft", "text"),
    # trl 0.25.1 and 0.26.0 under transformers 5 (the gate's release stacks): only RewardTrainer works
    # there.  trl <= 0.28 reads transformers' `_is_package_available`, which transformers 5 made return a
    # `(bool, version)` tuple, always truthy, so DPO, GRPO, RLOO and BCO import mergekit / weave /
    # requests / vllm / joblib unconditionally and fail (trl 0.29 vendors its own check); KTO, ORPO and
    # CPO read `model.warnings_issued`, which transformers 5 removed.
    # 0.25.1: Reward calls the module-level helper.
    _helper("reward", "pairs", _025, task="SEQ_CLS", disables_dropout=True, mirrors_pad_token=True),
    # 0.26.0 (PR 4577 "Clean up model preparation"): Reward inlines its own block.
    _inline("reward", "pairs", _026, task="SEQ_CLS", disables_dropout=True, mirrors_pad_token=True),
    # trl 1.16.0
    _inline("dpo", "preference", disables_dropout=True, ref_adapter=True),
    _inline("kto", "unpaired", disables_dropout=True, ref_adapter=True),
    # RewardTrainer trains a one-label sequence classifier; it writes the pad token (a sequence
    # classifier finds the last token with it) but has no output head to reject LoRA on.
    _inline("reward", "pairs", task="SEQ_CLS", disables_dropout=True, clones_chat_template=True),
    # GRPOTrainer adds the "ref" adapter only when beta != 0, and GRPOConfig's beta is 0.0.
    _inline("grpo", "prompts"),
    _inline("rloo", "prompts", ref_adapter=True),
)
"""The table: one row per trainer and trl era."""


def _version(version: str) -> Version:
    v = Version(version)
    return Version(v.base_version) if (v.is_prerelease or v.is_devrelease) else v


def trainer_rules(trainer: str, version: str) -> TrainerRules | None:
    """The row of ``trainer`` for trl ``version``, or None where no row was checked."""
    v = _version(version)
    for row in TRAINERS:
        if row.trainer == trainer and SpecifierSet(row.trl).contains(v, prereleases=True):
            return row
    return None


def available_trainers(version: str | None) -> tuple[str, ...]:
    """The trainers generated for trl ``version``: those with a checked row (SFT always)."""
    if version is None:
        return ("sft",)
    return tuple(name for name in TRAINER_NAMES if name == "sft" or trainer_rules(name, version) is not None)


def table(rows: Iterable[TrainerRules] = TRAINERS) -> str:
    """The table as Markdown (README, ``docs/spec/trl-notes.md``)."""
    def mark(flag: bool) -> str:
        return "yes" if flag else "-"

    out = ["| trainer | trl | preparation | task | dataset | drops dropout | ref adapter | pad token | rejects head LoRA | "
           "checkpointing default | PeftModel + config | loads a path |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r.preparation == "sft":  # SFTTrainer's rules are its trl flow's (reference.trl.TRL_FLOWS)
            out.append(f"| {r.trainer} | `{r.trl}` | sft (trl flows) | {r.task} | {r.dataset} |" + " flow |" * 7)
            continue
        out.append(f"| {r.trainer} | `{r.trl}` | {r.preparation} | {r.task} | {r.dataset} | {mark(r.disables_dropout)} | "
                   f"{mark(r.ref_adapter)} | {mark(r.mirrors_pad_token)} | {mark(r.rejects_head_lora)} | "
                   f"{mark(r.gradient_checkpointing_default)} | {r.peft_model_with_config} | {mark(r.loads_paths)} |")
    return "\n".join(out)
