"""Few-shot batches regrouped by length, so block training spends no compute on padding.

A collator pads each batch to its longest example; with examples of mixed lengths a third or more
of the positions can be padding, and every step of a data-driven method pays for them in every
block. ``group_by_length`` splits a task's batches into examples, sorts them by real length
(longest first, ties in their given order), cuts batches of the same size again and trims each to
its own longest example. Everything else about an example is unchanged, so an encoder (or a causal
model) computes the same outputs on its real tokens and masked losses and statistics are the same
sums; only which examples share a batch changes.

It applies to right-padded token batches only: each batch's 2-D ``attention_mask`` (batch, tokens)
must hold every example's real tokens first. Left padding (common for causal LMs) is left alone,
because trimming it would move the real tokens' positions; so are batches without such a mask
(images), batches holding anything but tensors, and encoder-decoder batches (``decoder_*`` inputs:
the decoder's tokens have their own length and mask).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch


def group_by_length(batches: Sequence[Mapping]) -> list[Mapping]:
    """The task's batches regrouped by length and trimmed (see the module), or ``batches`` as given
    when they are not right-padded token batches."""
    examples: list[tuple[int, dict]] = []
    aligned: set[str] | None = None
    fill: dict[str, torch.Tensor] = {}
    size = 0
    for batch in batches:
        split = _split_examples(batch)
        if split is None or (aligned is not None and split[1] != aligned):
            return list(batches)
        examples.extend(split[0])
        aligned = split[1]
        for key, value in split[2].items():
            fill.setdefault(key, value)
        size = max(size, len(split[0]))
    if not examples:
        return list(batches)
    order = sorted(range(len(examples)), key=lambda position: -examples[position][0])
    return [_stack([examples[position] for position in order[start:start + size]], aligned, fill)
            for start in range(0, len(order), size)]


def padding_share(batches: Sequence[Mapping]) -> float | None:
    """The share of token positions that are padding (None: no 2-D attention masks)."""
    real = total = 0
    for batch in batches:
        mask = batch.get("attention_mask")
        if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
            return None
        real += int(mask.bool().sum())
        total += mask.numel()
    return 1.0 - real / total if total else None


def _split_examples(batch: Mapping) -> tuple[list[tuple[int, dict]], set[str], dict] | None:
    """([(real length, {key: one example's tensor})], token-aligned keys, {key: a padding value}), or
    None when the batch is not right-padded tokens."""
    mask = batch.get("attention_mask")
    if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
        return None
    if not all(isinstance(value, torch.Tensor) and value.dim() >= 1 for value in batch.values()):
        return None
    if any(key.startswith("decoder_") for key in batch):
        return None
    rows, width = mask.shape
    if any(value.shape[0] != rows for value in batch.values()):
        return None
    real = mask.bool()
    lengths = real.sum(1)
    if not torch.equal(real, torch.arange(width, device=mask.device).unsqueeze(0) < lengths.unsqueeze(1)):
        return None                              # left padding or gaps: positions would move
    aligned = {key for key, value in batch.items() if value.dim() >= 2 and value.shape[1] == width}
    fill = {}
    padded_row = int(torch.argmin(lengths))
    if int(lengths[padded_row]) < width:         # the batch's own padding value of each aligned tensor
        fill = {key: batch[key][padded_row, width - 1].clone() for key in aligned}
    examples = []
    for row in range(rows):
        length = int(lengths[row])
        examples.append((length, {key: value[row, :length] if key in aligned else value[row]
                                  for key, value in batch.items()}))
    return examples, aligned, fill


def _stack(examples: list[tuple[int, dict]], aligned: set[str], fill: dict[str, torch.Tensor]) -> dict:
    """One batch from examples, token-aligned tensors padded on the right to the longest with the
    padding value the given batches used (zero when none had padding)."""
    width = max(length for length, _ in examples)
    batch = {}
    for key in examples[0][1]:
        parts = [example[key] for _, example in examples]
        if key not in aligned:
            batch[key] = torch.stack(parts)
            continue
        padded = parts[0].new_zeros((len(parts), width, *parts[0].shape[1:]))
        if key in fill:
            padded[:] = fill[key]
        for position, part in enumerate(parts):
            padded[position, :part.shape[0]] = part
        batch[key] = padded
    return batch
