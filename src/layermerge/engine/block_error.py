"""The squared error of a block's output against a target, padding left out: ProDistill's block loss,
the engine's measure of a merged block on the streams, and the block-error diagnostics all use it."""

from __future__ import annotations

import torch


def squared_error(output: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """‖output − target‖² summed over tokens and features (in fp32), padding tokens left out."""
    squared = (output.float() - target.float()).pow(2)
    if mask is not None:
        squared = squared * mask.reshape(*mask.shape, *([1] * (squared.dim() - mask.dim()))).to(squared.dtype)
    return squared.sum()
