"""Few-shot batches regrouped by length, so block training spends little compute on padding.

A collator pads each batch to its longest example; with examples of mixed lengths a third or more
of the positions can be padding, and every step of a data-driven method pays for them in every
block. ``group_by_length`` splits a task's batches into examples, sorts them by real length
(longest first, ties in their given order), cuts as many batches again where the cuts leave the
fewest padded positions (``batch_cuts``: a few long examples together, many short ones together)
and trims each to its own longest example. On glue8-minilm's 64 shots per task that left 7.4 %
fewer positions than sorted batches of 16 (19,636 real tokens in 22,352 positions instead of
24,144). Everything else about an example is unchanged, so an encoder (or a causal model) computes
the same outputs on its real tokens and masked losses and statistics are the same sums; only which
examples share a batch changes.

Given a block call's own cost in token positions (``block_call_cost``: ``CALL_COST`` on a CPU),
each of those batches is cut again into the pieces that cost least (``call_cuts``): a piece is its
own block call, split off only where it removes more padding than the call costs. The pieces of one
batch keep its ``unit`` number, and the learned-coefficient methods put a unit's pieces in the same
optimiser step, so the steps are the ones the batches would make and only the calls change.

It applies to right-padded token batches only: each batch's 2-D ``attention_mask`` (batch, tokens)
must hold every example's real tokens first. Left padding (common for causal LMs) is left alone,
because trimming it would move the real tokens' positions; so are batches without such a mask
(images), batches holding anything but tensors, and encoder-decoder batches (``decoder_*`` inputs:
the decoder's tokens have their own length and mask).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from itertools import pairwise

import torch

LARGEST_BATCH = 4           # a regrouped batch holds at most this many times the given batches' size
# What one more block call costs on a CPU, in token positions: a MiniLM layer's forward + backward in
# bfloat16 took 5.6 ms per call beyond its tokens' 0.075 ms a position on one thread (75 positions),
# 5.8 ms against 0.046 ms on two (124) (benchmarks/prodistill_kernels.py, ``calls``): weight-sized work
# every call pays (autocast's casts, the weight gradient, its sum). Larger blocks cost more per
# position and per call alike. At 80, glue8's merge was 3 % slower (docs/BENCHMARKS.md, item 19).
CALL_COST = 128


def block_call_cost(device: torch.device) -> int | None:
    """The cost of one more block call in token positions on ``device`` (``CALL_COST`` on a CPU), or
    None where it was not measured (GPUs: no batch is cut into pieces)."""
    return CALL_COST if device.type == "cpu" else None


def group_by_length(batches: Sequence[Mapping], call_cost: int | None = None) -> tuple[list[Mapping], list[int]]:
    """The task's batches regrouped by length and trimmed, each cut into its cheapest pieces given
    ``call_cost`` (None: not cut), with the number of the regrouped batch (the step unit) each piece
    came from (see the module); or ``batches`` as given, one unit each, when they are not
    right-padded token batches."""
    examples: list[tuple[int, dict]] = []
    aligned: set[str] | None = None
    fill: dict[str, torch.Tensor] = {}
    size = 0
    as_given = list(batches), list(range(len(batches)))
    for batch in batches:
        split = _split_examples(batch)
        if split is None or (aligned is not None and split[1] != aligned):
            return as_given
        examples.extend(split[0])
        aligned = split[1]
        for key, value in split[2].items():
            fill.setdefault(key, value)
        size = max(size, len(split[0]))
    if not examples:
        return as_given
    order = sorted(range(len(examples)), key=lambda position: -examples[position][0])
    lengths = [examples[position][0] for position in order]
    grouped, units = [], []
    for unit, (start, end) in enumerate(pairwise(batch_cuts(lengths, size))):
        pieces = [0, end - start] if call_cost is None else call_cuts(lengths[start:end], call_cost)
        for first, last in pairwise(pieces):
            grouped.append(_stack([examples[position] for position in order[start + first:start + last]],
                                  aligned, fill))
            units.append(unit)
    return grouped, units


def batch_cuts(lengths: Sequence[int], size: int) -> list[int]:
    """Where to cut ``lengths`` (sorted longest first) into as many batches as batches of ``size`` would
    make, so that the padded positions (each batch's examples × its longest) are fewest; batches hold at
    most ``LARGEST_BATCH`` × ``size`` examples. Returns the cut positions, 0 first and len last; cuts
    every ``size`` examples unless another cut saves positions.

    Dynamic programming over the sorted lengths: ``best[j][i]`` is the fewest positions for the first
    i examples in j batches, the last batch being examples s..i-1 at s's length.
    """
    count, total = -(-len(lengths) // size), len(lengths)
    even = list(range(0, total, size)) + [total]
    largest = LARGEST_BATCH * size
    if count <= 1:
        return even
    length = torch.tensor(lengths, dtype=torch.int64)
    unreachable = torch.iinfo(torch.int64).max // 4
    best = torch.full((total + 1,), unreachable, dtype=torch.int64)
    best[0] = 0
    starts = []
    ends = torch.arange(total + 1)
    for _ in range(count):
        new = torch.full_like(best, unreachable)
        start = torch.zeros(total + 1, dtype=torch.int64)
        for examples in range(1, min(largest, total) + 1):       # the last batch's size
            candidate = torch.full_like(best, unreachable)
            candidate[examples:] = best[:-examples] + length[:total + 1 - examples] * examples
            better = candidate < new
            new = torch.where(better, candidate, new)
            start = torch.where(better, ends - examples, start)
        best = new
        starts.append(start)
    even_positions = sum(lengths[a] * (b - a) for a, b in zip(even, even[1:]))
    if int(best[total]) >= even_positions:
        return even
    cuts, end = [total], total
    for start in reversed(starts):
        end = int(start[end])
        cuts.append(end)
    return cuts[::-1]


def call_cuts(lengths: Sequence[int], call_cost: int) -> list[int]:
    """Where to cut one batch's ``lengths`` (sorted longest first) into pieces so that the padded
    positions (each piece's examples × its longest) plus ``call_cost`` positions per piece are fewest.
    Returns the cut positions, 0 first and len last (``[0, len]``: one piece, when nothing pays).

    ``best[i]`` is the least cost of the first i examples, the last piece being examples s..i-1 at
    s's length; on a tie the last piece starts earliest (fewer pieces).
    """
    total = len(lengths)
    length = torch.tensor(lengths, dtype=torch.int64)
    best = torch.zeros(total + 1, dtype=torch.int64)
    start = [0] * (total + 1)
    for end in range(1, total + 1):
        costs = best[:end] + length[:end] * (end - torch.arange(end)) + call_cost
        first = int(torch.argmin(costs))               # the earliest of equal minima
        best[end] = costs[first]
        start[end] = first
    cuts, end = [total], total
    while end > 0:
        end = start[end]
        cuts.append(end)
    return cuts[::-1]


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
