"""What SFTTrainer needs besides the model, built offline: a tokenizer and a dataset.

No hub access: the tokenizer is a word-level ``tokenizers`` model over the zoo's
256-entry vocabulary, wrapped in ``PreTrainedTokenizerFast``; the dataset is four
rows already tokenized (``input_ids``, ending in the end-of-sequence id, as SFTTrainer's own
preparation of the rows' text would give), passed with ``skip_prepare_dataset``: trl's
dataset preparation never sees the model, and its ``datasets.map`` calls (fingerprinting each
transform with dill) cost some 30 ms per trainer.  Both are built once per process.
"""

from __future__ import annotations

import functools

__all__ = ["DATASET_KWARGS", "dataset", "tokenizer"]

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
