"""Turning rows into model inputs: tokenisation for text, resizing and normalisation for images.

Text is padded per batch to its longest row (dynamic padding), so batches of short sentences cost
little; ``length_grouped_batches`` makes batches of similar lengths to waste even less on padding.
Generation tasks (prompt -> completion) are tokenised with the tokenizer's chat template when it has
one (``GenerationCollator``, ``prompt_ids``).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from layermerge.data.sources import TaskData
from layermerge.data.tasks import Task
from layermerge.errors import DataError


class TextCollator:
    """rows -> {input_ids, attention_mask, [token_type_ids], labels} with a Hugging Face tokenizer."""

    def __init__(self, tokenizer, task: Task, max_length: int = 128):
        if not task.is_text:
            raise DataError(f"task {task.name!r} is not a text task; use ImageCollator")
        if max_length <= 0:
            raise DataError(f"max_length must be positive, got {max_length}")
        self.tokenizer, self.task, self.max_length = tokenizer, task, max_length

    def __call__(self, rows: Sequence[dict]) -> dict[str, torch.Tensor]:
        columns = [[row[field] for row in rows] for field in self.task.text_fields]
        batch = dict(self.tokenizer(*columns, truncation=True, max_length=self.max_length, padding=True,
                                    return_tensors="pt"))
        dtype = torch.float32 if self.task.is_regression else torch.long
        batch["labels"] = torch.tensor([row[self.task.label_field] for row in rows], dtype=dtype)
        return batch


IGNORE_INDEX = -100      # label of tokens the loss skips (prompt and padding), as transformers' losses do


def pad_token_id(tokenizer) -> int:
    """The tokenizer's padding id; causal LM tokenizers often have none, so their end-of-text id (else 0)."""
    for value in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if value is not None:
            return int(value)
    return 0


def uses_chat_template(tokenizer, task: Task) -> bool:
    return task.chat_template and bool(getattr(tokenizer, "chat_template", None))


def prompt_ids(tokenizer, task: Task, prompt: str) -> list[int]:
    """A generation prompt's token ids: in the tokenizer's chat template (a user turn, then the start of
    the assistant's) when it has one and the task allows it, else the plain text with the tokenizer's
    special tokens (e.g. BOS)."""
    if uses_chat_template(tokenizer, task):
        text = tokenizer.apply_chat_template([{"role": "user", "content": str(prompt)}], tokenize=False,
                                             add_generation_prompt=True)
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    return list(tokenizer(str(prompt), add_special_tokens=True)["input_ids"])


def completion_ids(tokenizer, completion: str) -> list[int]:
    """A completion's token ids followed by end-of-text, so a fine-tuned model learns where to stop."""
    ids = list(tokenizer(str(completion), add_special_tokens=False)["input_ids"])
    return ids + ([int(tokenizer.eos_token_id)] if tokenizer.eos_token_id is not None else [])


class GenerationCollator:
    """rows -> {input_ids, attention_mask[, labels]} for prompt -> completion tasks (causal LMs).

    ``include_completion``: the prompt followed by its completion (fine-tuning, and few-shot inputs as
    ProDistill's code feeds them), else the prompt alone. ``labels`` (with ``with_labels``) are the
    completion's ids, IGNORE_INDEX on prompt and padding, so fine-tuning learns the completion only.
    Sequences longer than ``max_length`` are cut at the end; padding is on the right.
    """

    def __init__(self, tokenizer, task: Task, max_length: int = 512, include_completion: bool = True,
                 with_labels: bool = False):
        if not task.is_generation:
            raise DataError(f"task {task.name!r} is not a generation task; use TextCollator")
        if max_length <= 0:
            raise DataError(f"max_length must be positive, got {max_length}")
        self.tokenizer, self.task, self.max_length = tokenizer, task, max_length
        self.include_completion, self.with_labels = include_completion, with_labels

    def encode(self, row: dict) -> tuple[list[int], list[int]]:
        prompt = prompt_ids(self.tokenizer, self.task, row[self.task.prompt])
        completion = completion_ids(self.tokenizer, row[self.task.completion]) if self.include_completion else []
        ids = (prompt + completion)[:self.max_length]
        labels = ([IGNORE_INDEX] * len(prompt) + completion)[:self.max_length]
        return ids, labels

    def __call__(self, rows: Sequence[dict]) -> dict[str, torch.Tensor]:
        encoded = [self.encode(row) for row in rows]
        width = max(len(ids) for ids, _ in encoded)
        pad = pad_token_id(self.tokenizer)
        input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
        attention = torch.zeros((len(rows), width), dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        for i, (ids, targets) in enumerate(encoded):
            input_ids[i, :len(ids)] = torch.tensor(ids, dtype=torch.long)
            attention[i, :len(ids)] = 1
            labels[i, :len(targets)] = torch.tensor(targets, dtype=torch.long)
        batch = {"input_ids": input_ids, "attention_mask": attention}
        if self.with_labels:
            batch["labels"] = labels
        return batch


class Seq2SeqCollator:
    """rows -> encoder and decoder inputs for an encoder-decoder model (T5, BART...).

    The encoder reads the prompt (a generation task) or the text fields (a text task); the decoder reads
    its start token followed by the completion, teacher-forced (``include_completion``, generation tasks),
    or its start token alone. Padding is on the right, with each side's own attention mask.
    """

    def __init__(self, tokenizer, task: Task, decoder_start: int, max_length: int = 512,
                 include_completion: bool = True):
        if task.is_image:
            raise DataError(f"task {task.name!r} is an image task; an encoder-decoder model reads text")
        if max_length <= 0:
            raise DataError(f"max_length must be positive, got {max_length}")
        self.tokenizer, self.task, self.max_length = tokenizer, task, max_length
        self.decoder_start, self.include_completion = int(decoder_start), include_completion

    def encoder_ids(self, row: dict) -> list[int]:
        if self.task.is_generation:
            return list(self.tokenizer(str(row[self.task.prompt]), add_special_tokens=True)["input_ids"])
        return list(self.tokenizer(*[str(row[field]) for field in self.task.text_fields])["input_ids"])

    def decoder_ids(self, row: dict) -> list[int]:
        completion = []
        if self.task.is_generation and self.include_completion:
            completion = completion_ids(self.tokenizer, row[self.task.completion])[:-1]   # the last is never read
        return [self.decoder_start, *completion]

    def __call__(self, rows: Sequence[dict]) -> dict[str, torch.Tensor]:
        encoder = [self.encoder_ids(row)[:self.max_length] for row in rows]
        decoder = [self.decoder_ids(row)[:self.max_length] for row in rows]
        pad = pad_token_id(self.tokenizer)
        batch = {}
        for ids_key, mask_key, sequences in (("input_ids", "attention_mask", encoder),
                                             ("decoder_input_ids", "decoder_attention_mask", decoder)):
            width = max(len(ids) for ids in sequences)
            ids = torch.full((len(rows), width), pad, dtype=torch.long)
            mask = torch.zeros((len(rows), width), dtype=torch.long)
            for i, sequence in enumerate(sequences):
                ids[i, :len(sequence)] = torch.tensor(sequence, dtype=torch.long)
                mask[i, :len(sequence)] = 1
            batch[ids_key], batch[mask_key] = ids, mask
        return batch


class ImageCollator:
    """rows -> {pixel_values (N×C×R×R float), labels}.

    uint8 images are scaled to [0, 1], gray images repeated to 3 channels when the model wants RGB
    (RGB averaged to gray when it wants 1), resized to ``resolution`` (bilinear, antialiased) and
    normalised as (x − mean) / std per channel; EfficientNet-Lite wants mean = std = 0.5.
    """

    def __init__(self, resolution: int | None = None, channels: int = 3,
                 mean: Sequence[float] | float = 0.5, std: Sequence[float] | float = 0.5):
        if channels not in (1, 3):
            raise DataError(f"channels must be 1 or 3, got {channels}")
        self.resolution, self.channels = resolution, channels
        self.mean = torch.tensor(mean, dtype=torch.float32).reshape(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).reshape(-1, 1, 1)
        if (self.std == 0).any():
            raise DataError(f"normalisation std must be non-zero, got {std}")

    def images_to_tensor(self, images: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(np.ascontiguousarray(images)).float().div_(255.0)
        x = x.unsqueeze(1) if x.ndim == 3 else x.permute(0, 3, 1, 2)
        if x.shape[1] == 1 and self.channels == 3:
            x = x.expand(-1, 3, -1, -1)
        elif x.shape[1] == 3 and self.channels == 1:
            x = x.mean(dim=1, keepdim=True)
        if self.resolution is not None and tuple(x.shape[-2:]) != (self.resolution, self.resolution):
            downsampling = self.resolution < x.shape[-1]
            x = F.interpolate(x, size=(self.resolution, self.resolution), mode="bilinear",
                              align_corners=False, antialias=downsampling)
        return (x - self.mean) / self.std

    def __call__(self, rows: Sequence[dict]) -> dict[str, torch.Tensor]:
        images = np.stack([row["image"] for row in rows])
        labels = torch.tensor([row["label"] for row in rows], dtype=torch.long)
        return {"pixel_values": self.images_to_tensor(images), "labels": labels}


def row_lengths(data: TaskData) -> np.ndarray:
    """Character length of each row's text (a cheap stand-in for token length); zeros for images."""
    task = data.task
    if task.is_image:
        return np.zeros(len(data), dtype=np.int64)
    fields = (task.prompt, task.completion) if task.is_generation else task.text_fields
    return np.array([sum(len(str(data[i][f])) for f in fields) for i in range(len(data))])


def length_grouped_batches(lengths: np.ndarray, batch_size: int, shuffle: bool, seed: int = 0,
                           group_batches: int = 50) -> list[np.ndarray]:
    """Batches of row indices with similar lengths, so dynamic padding wastes little.

    Without shuffling, rows are sorted by length (evaluation order does not matter). With shuffling,
    rows are shuffled, cut into groups of ``group_batches`` batches, sorted by length inside each
    group, and the batches shuffled again: random like plain shuffling, but with little padding.
    """
    if batch_size <= 0:
        raise DataError(f"batch size must be positive, got {batch_size}")
    n = len(lengths)
    if not shuffle:
        order = np.argsort(-lengths, kind="stable")
        return [order[i:i + batch_size] for i in range(0, n, batch_size)]
    rng = np.random.default_rng(seed)
    order = rng.permutation(n)
    group = batch_size * group_batches
    batches = []
    for start in range(0, n, group):
        chunk = order[start:start + group]
        chunk = chunk[np.argsort(-lengths[chunk], kind="stable")]
        batches.extend(chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size))
    return [batches[i] for i in rng.permutation(len(batches))]
