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


SENTENCES = ["a good film", "a bad film", "what a great cast", "dull and slow", "fine acting", "poor script",
             "lovely music", "boring plot"]


def write_tiny_glue(data_dir: Path, task: str, rows: int = 16) -> None:
    """``glue/<task>/{train,test}.jsonl`` of short labelled sentences (sst2: one field; others: a pair)."""
    import json

    folder = data_dir / "glue" / task
    folder.mkdir(parents=True, exist_ok=True)
    for split in ("train", "test"):
        lines = []
        for i in range(rows):
            text = SENTENCES[i % len(SENTENCES)]
            row = {"sentence": text} if task == "sst2" else {"sentence1": text, "sentence2": SENTENCES[-1 - i % 8]}
            lines.append(json.dumps({**row, "label": i % 2, "idx": i}))
        (folder / f"{split}.jsonl").write_text("\n".join(lines) + "\n")


def save_text_experts(root: Path, base: Path, tasks=("sst2", "rte")) -> dict[str, Path]:
    """Two-label BERT experts of ``base`` (its backbone plus seeded noise), saved as ``root/<task>``."""
    from conftest import perturb_
    from safetensors.torch import load_file
    from transformers import BertForSequenceClassification

    base_state = load_file(str(base / "model.safetensors"))
    experts = {}
    for index, task in enumerate(tasks):
        torch.manual_seed(10 + index)
        model = BertForSequenceClassification(make_config("bert", num_labels=2))
        model.bert.load_state_dict(base_state)
        perturb_(model, seed=index, scale=0.05)
        model.save_pretrained(root / task)
        experts[task] = root / task
    return experts


def build_text_setup(root: Path) -> tuple[Path, dict[str, Path], Path]:
    """A tiny BERT base with its tokenizer, experts 'sst2' and 'rte' fine-tuned from it (seeded noise),
    and a local GLUE folder for both: everything a data-driven merge needs, without the shared data."""
    base = build_tiny_text_base(root / "base")
    experts = save_text_experts(root, base)
    data_dir = root / "data"
    for task in experts:
        write_tiny_glue(data_dir, task)
    return base, experts, data_dir


CHAT_TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
                 "{% if add_generation_prompt %}<assistant>{% endif %}")
CAUSAL_VOCAB = (["<pad>", "<eos>", "<unk>"] + list(string.ascii_lowercase) + list(string.digits)
                + list(" .,:?!<>-+=") )


def char_tokenizer(chat_template: str | None = CHAT_TEMPLATE):
    """A character-level fast tokenizer with <pad>, <eos>, <unk> (and, by default, a chat template)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.WordLevel({c: i for i, c in enumerate(CAUSAL_VOCAB)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    core.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="<eos>",
                                        unk_token="<unk>")
    if chat_template:
        tokenizer.chat_template = chat_template
    return tokenizer


def build_tiny_causal_base(folder: Path, chat_template: str | None = CHAT_TEMPLATE) -> Path:
    """Save a tiny Llama causal LM with a character tokenizer (a base for generation tasks)."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    config = make_config("llama", vocab_size=len(CAUSAL_VOCAB), max_position_embeddings=128,
                         pad_token_id=0, eos_token_id=1, bos_token_id=None, tie_word_embeddings=True)
    LlamaForCausalLM(config).save_pretrained(folder)
    char_tokenizer(chat_template).save_pretrained(folder)
    return folder


def write_generation_task(folder: Path, name: str, answer: str, rows: int = 24) -> Path:
    """A prompt -> completion task whose completion is always ``answer``; returns its spec file."""
    import json
    import random

    rng = random.Random(name)
    folder.mkdir(parents=True, exist_ok=True)
    for split in ("train", "test"):
        lines = [json.dumps({"question": "".join(rng.choice(string.ascii_lowercase) for _ in range(6)) + "?",
                             "answer": answer}) for _ in range(rows)]
        (folder / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    spec = folder / f"{name}.yaml"
    spec.write_text(f"name: {name}\ntype: generation\nprompt: question\ncompletion: answer\n"
                    "files: {train: train.jsonl, test: test.jsonl}\nmetric: exact_match\nmax_new_tokens: 5\n")
    return spec
