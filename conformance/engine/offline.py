"""What SFTTrainer needs besides the model, built offline: a tokenizer and a dataset.

No hub access: the tokenizer is a word-level ``tokenizers`` model over the zoo's
256-entry vocabulary, wrapped in ``PreTrainedTokenizerFast``; the dataset is four
rows already tokenized (``input_ids``, ending in the end-of-sequence id, as SFTTrainer's own
preparation of the rows' text would give), passed with ``skip_prepare_dataset``: trl's
dataset preparation never sees the model, and its ``datasets.map`` calls (fingerprinting each
transform with dill) cost some 30 ms per trainer.  Both are built once per process.

The other trainers get the smallest dataset of their kind (:func:`trainer_dataset`): preference
pairs (DPO, ORPO, CPO), unpaired labelled completions (KTO, BCO), chosen / rejected texts
(Reward) or prompts (GRPO, RLOO, with :func:`reward_function`; nothing is generated, since
``train()`` never runs).
"""

from __future__ import annotations

import functools

__all__ = ["DATASET_KWARGS", "chat_template_paths", "dataset", "reward_function", "template_source", "tokenizer",
           "trainer_dataset"]

DATASET_KWARGS = {"skip_prepare_dataset": True}
"""``SFTConfig.dataset_kwargs`` for :func:`dataset` (trl 0.19 and 1.x read the same key)."""

TEXTS = ("w1 w2 w3 w4", "w5 w6 w7", "w8 w9", "w10 w11 w12")


@functools.lru_cache(maxsize=1)
def tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(252)} | {"<pad>": 252, "</s>": 253, "<s>": 254, "<unk>": 255}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=raw, pad_token="<pad>", eos_token="</s>", bos_token="<s>", unk_token="<unk>"
    )


@functools.lru_cache(maxsize=1)
def dataset():
    from datasets import Dataset, disable_progress_bars

    disable_progress_bars()
    tok = tokenizer()
    rows = [tok(text)["input_ids"] + [tok.eos_token_id] for text in TEXTS]
    return Dataset.from_dict({"input_ids": rows})


_ROWS = {
    "preference": {"prompt": ["w1 w2", "w3 w4"], "chosen": [" w5", " w6"], "rejected": [" w7", " w8"]},
    "unpaired": {"prompt": ["w1 w2", "w3 w4"], "completion": [" w5", " w6"], "label": [True, False]},
    "pairs": {"chosen": ["w1 w2 w5", "w3 w4 w6"], "rejected": ["w1 w2 w7", "w3 w4 w8"]},
    "prompts": {"prompt": ["w1 w2", "w3 w4"]},
}


@functools.lru_cache(maxsize=None)
def trainer_dataset(kind: str):
    """The two-row dataset of ``kind``: ``preference``, ``unpaired``, ``pairs`` or ``prompts``."""
    from datasets import Dataset, disable_progress_bars

    disable_progress_bars()
    return Dataset.from_dict(_ROWS[kind])


def reward_function(completions, **kwargs):
    """GRPO's / RLOO's reward: a constant (it is never called: nothing trains)."""
    return [0.0 for _ in completions]


TEMPLATE_ADDED = ("<|im_start|>", "<|im_end|>")
"""The special tokens the chat-template tokenizer has beyond the zoo's vocabulary."""
TEMPLATE_EOS = "<|im_end|>"
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }} {{ message['content'] }}<|im_end|>"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant {% endif %}"
)


@functools.lru_cache(maxsize=1)
def chat_template_paths() -> dict[str, str]:
    """``SFTConfig.chat_template_path`` values, written once per process under a temporary folder:
    ``tokenizer``, a tokenizer directory whose template brings two special tokens (trl then clones
    it: tokens added, embeddings resized); ``jinja``, the bare template file (nothing added)."""
    import atexit
    import copy
    import shutil
    import tempfile
    from pathlib import Path

    root = Path(tempfile.mkdtemp(prefix="conformance-chat-template-"))
    atexit.register(shutil.rmtree, root, True)
    source = copy.deepcopy(tokenizer())
    source.add_special_tokens({"additional_special_tokens": list(TEMPLATE_ADDED)})
    source.eos_token = TEMPLATE_EOS
    source.chat_template = CHAT_TEMPLATE
    source.save_pretrained(root / "tokenizer")
    (root / "template.jinja").write_text(CHAT_TEMPLATE)
    return {"tokenizer": str(root / "tokenizer"), "jinja": str(root / "template.jinja")}


def template_source():
    """The chat-template tokenizer as the reference describes it (``reference.chat_template``)."""
    from reference.chat_template import TemplateSource

    return TemplateSource(vocab_size=len(tokenizer().get_vocab()), added=TEMPLATE_ADDED,
                          eos_index=TEMPLATE_ADDED.index(TEMPLATE_EOS))
