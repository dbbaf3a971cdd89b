"""``chat_template_path``: a trainer given a chat template to clone, and what it does to the model.

Observed on trl 1.16.0 (SFTTrainer, RewardTrainer), CPU, before ``get_peft_model``:

* a ``.jinja`` / ``.j2`` file only sets the tokenizer's template: nothing of the model changes;
* any other path is a tokenizer to clone (``trl.clone_chat_template``): its added tokens that the
  trainer's tokenizer lacks are added to it, its end-of-sequence token becomes the tokenizer's and
  the model's (``eos_token_id`` of the text config and, for a generative model, of the generation
  config), and the token embeddings are resized to the new vocabulary rounded up to a multiple of
  64 (transformers' ``resize_token_embeddings``: the new rows drawn from the old rows' mean and
  covariance), the rounding filled with dummy tokens.  Every token added, dummies included, is
  then made trainable: the trainer writes ``trainable_token_indices={"embed_tokens": ids}`` (or
  extends the ``embed_tokens`` entry) and appends ``lm_head`` to ``modules_to_save``, in the
  user's own ``peft_config`` (trl issue 7319).

The reference puts the rows on the model's input embedding whatever its name; trl names it
``embed_tokens`` literally, which peft cannot find on GPT-2, GPT-NeoX, BLOOM... (registry
``chat-template-assumes-embed-tokens``).  The template's source is described, not read: the
reference never opens the tokenizer files the harness writes.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

from reference.spec import ABSENT, AdapterSpec

__all__ = ["PAD_TO", "TemplateSource", "clone_chat_template", "with_added_tokens"]

PAD_TO = 64
"""``clone_chat_template``'s ``resize_to_multiple_of``."""


@dataclass(frozen=True)
class TemplateSource:
    """What the trainer's tokenizer and the template's tokenizer hold."""

    vocab_size: int
    """The trainer's tokenizer's vocabulary (the zoo models' embeddings have as many rows)."""
    added: tuple[str, ...]
    """The template tokenizer's added tokens the trainer's tokenizer lacks, in order."""
    eos_index: int
    """Which of ``added`` is the template's end-of-sequence token."""


def _embedding_name(model: nn.Module) -> str:
    embedding = model.get_input_embeddings()
    return next(name for name, module in model.named_modules() if module is embedding).rsplit(".", 1)[-1]


def clone_chat_template(model: nn.Module, source: TemplateSource, seed: int, eos_on_text_config: bool = True) -> list[int]:
    """Clone ``source``'s template onto ``model``: the ids of every token added (dummies included).
    ``seed`` seeds the new rows' draw (the harness seeds upstream's draw alike).  The end-of-sequence
    id goes to the text config (trl 1.16), or to the top-level config (``eos_on_text_config`` False:
    trl 0.19; the two differ for a vision-language model's composite config)."""
    wanted = source.vocab_size + len(source.added)
    padded = -(-wanted // PAD_TO) * PAD_TO
    eos = source.vocab_size + source.eos_index
    text_config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    (text_config if eos_on_text_config else model.config).eos_token_id = eos
    if model.can_generate():
        model.generation_config.eos_token_id = eos
    torch.manual_seed(seed)
    model.resize_token_embeddings(new_num_tokens=wanted, pad_to_multiple_of=PAD_TO)
    return list(range(source.vocab_size, padded))


def with_added_tokens(model: nn.Module, adapter: AdapterSpec, added: list[int]) -> AdapterSpec:
    """The adapter the trainer prepares after a clone: ``added`` rows trainable on the input
    embedding (beside rows the user asked for there) and ``lm_head`` saved."""
    if not added:
        return adapter
    name = _embedding_name(model)
    rows = adapter.trainable_token_indices
    if rows in (ABSENT, None):
        rows = ((name, tuple(added)),)
    else:
        pairs = dict(rows)
        pairs[name] = tuple(pairs.get(name, ())) + tuple(added)
        rows = tuple(pairs.items())
    saved = tuple(adapter.modules_to_save or ()) if adapter.modules_to_save is not ABSENT else ()
    if "lm_head" not in saved:
        saved += ("lm_head",)
    return dataclasses.replace(adapter, trainable_token_indices=rows, modules_to_save=saved)
