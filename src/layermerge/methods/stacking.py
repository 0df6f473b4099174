"""A step's cached batches run through the block as one batch where nothing ties them to their own shape.

A training step groups several cached batches (four of 16 examples at ProDistill's default 64); run
one by one, each call pays the block's per-call costs again (oneDNN's set-up, the element-wise
passes over small tensors, the casts of the weights). Batches can share one call when the block
takes no tensor argument besides the hidden states (CNN blocks; a transformer block's attention
mask ties a batch to its own length), none has a padding mask, and their examples have the same
shape: the block then computes each example on its own (eval mode), so the stacked call returns
the same rows, and a loss weighted per example is the same sum.

Whether the block really treats examples independently is checked once per block
(``Stacking.verified``) on the first stack: its outputs must match the batches run one by one, or
the block is run batch by batch. On EfficientNet-Lite0's sixteen blocks (64 × 64 images, one
thread), forward + backward of 64 examples took 572 ms as four calls of 16 and 502 ms as one call,
474-521 ms with stacks capped at 2, 4 or 8 MiB of input (``benchmarks/prodistill_kernels.py``, docs/
BENCHMARKS.md, "ProDistill, faster"); the cap (``max_bytes``, 8 MiB: all 64 of those examples in
every block) keeps calls on larger images near the sizes measured.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from layermerge.engine.tree import leaves

STACK_BYTES = 8 << 20       # input bytes per stacked call (measured, see the module docstring)
CHECK_TOLERANCE = 1e-2      # largest |stacked - separate| relative to the largest |output| (bf16 rounds ~4e-3)


class Stacking:
    """Plans which of a group's cached batches share one block call, for one block and stream."""

    def __init__(self, ctx, stream: str = "merged", max_bytes: int = STACK_BYTES, enabled: bool = True):
        self.ctx = ctx
        self.stream = stream
        self.max_bytes = max_bytes
        self.enabled = enabled
        self.verified: bool | None = None          # None: not checked yet; False: run batch by batch
        self._keys: dict = {}                      # per ref: a batch's shape and arguments stay put in a block

    def key(self, ref, hidden: torch.Tensor):
        """What batches must share to run in one call (None: this batch runs on its own)."""
        if not self.enabled or self.verified is False:
            return None
        if ref not in self._keys:
            extra = self.ctx.extra(ref, self.stream)
            tied = self.ctx.token_mask(ref) is not None or any(isinstance(leaf, torch.Tensor) for leaf in leaves(extra))
            self._keys[ref] = None if tied else (tuple(hidden.shape[1:]), hidden.dtype, repr(extra))
        return self._keys[ref]

    def plan(self, refs: list, inputs: list[torch.Tensor]) -> list[list[int]]:
        """Positions of ``refs`` grouped into calls: consecutive batches with the same key, up to
        ``max_bytes`` of input per call."""
        calls: list[list[int]] = []
        last_key, size = None, 0
        for position, (ref, hidden) in enumerate(zip(refs, inputs)):
            key = self.key(ref, hidden)
            nbytes = hidden.numel() * hidden.element_size()
            if key is not None and key == last_key and size + nbytes <= self.max_bytes:
                calls[-1].append(position)
                size += nbytes
            else:
                calls.append([position])
                last_key, size = key, nbytes
        return calls

    def verify(self, run: Callable[[torch.Tensor, object], torch.Tensor], refs: list,
               inputs: list[torch.Tensor]) -> bool:
        """Whether one stacked call of ``refs`` gives the outputs of separate calls (no grad); the answer
        holds for the rest of the block."""
        with torch.no_grad():
            stacked = run(torch.cat(inputs), refs[0]).float()
            separate = torch.cat([run(hidden, ref).float() for ref, hidden in zip(refs, inputs)])
        scale = separate.abs().max().clamp_min(1e-12)
        self.verified = bool((stacked - separate).abs().max() <= CHECK_TOLERANCE * scale)
        return self.verified


def weighted_squared_error(output: torch.Tensor, target: torch.Tensor, row_weights: torch.Tensor) -> torch.Tensor:
    """Σ_rows weight × ‖output_row − target_row‖² (in fp32): per-example loss weights over a stacked call."""
    squared = (output.float() - target.float()).pow(2).flatten(1).sum(1)
    return (row_weights * squared).sum()
