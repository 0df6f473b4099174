"""A tiny BERT with a character-level WordPiece tokenizer, for fine-tuning/evaluation/demo tests.

Shared by test_finetune_eval.py and test_demo.py. The vocabulary (73 entries: specials, letters,
'##'-continuations, digits, punctuation) fits the tiny config's 99 embedding rows, so any English
text tokenises without [UNK] floods and the model runs in milliseconds.
"""

from __future__ import annotations

import string
from pathlib import Path

import torch
from conftest import make_config

VOCAB = (["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + list(string.ascii_lowercase)
         + ["##" + c for c in string.ascii_lowercase] + list(string.digits) + list(".,'!?-"))


def build_tiny_text_base(folder: Path) -> Path:
    """Save a tiny BertModel plus its tokenizer in ``folder`` (a base for ``finetune``)."""
    from transformers import AutoModel, BertTokenizer

    torch.manual_seed(0)
    model = AutoModel.from_config(make_config("bert"))
    model.save_pretrained(folder)
    BertTokenizer(vocab={w: i for i, w in enumerate(VOCAB)}).save_pretrained(folder)
    return folder
