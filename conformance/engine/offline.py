"""What SFTTrainer needs besides the model, built offline: a tokenizer and a dataset.

No hub access: the tokenizer is a word-level ``tokenizers`` model over the zoo's
256-entry vocabulary, wrapped in ``PreTrainedTokenizerFast``; the dataset is four
rows of text.  Both are built once per process.
"""

from __future__ import annotations

import functools

__all__ = ["dataset", "tokenizer"]


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
    return Dataset.from_dict({"text": ["w1 w2 w3 w4", "w5 w6 w7", "w8 w9", "w10 w11 w12"]})
