"""How far a merged model's blocks are from the experts': the block error of any set of merged weights.

ProDistill minimises, block by block, ``Σ_i ‖Block(W; z_m) − Block(θ_i; z_i)‖²`` where ``z_m`` is the
block's input in the merged model built so far and ``z_i`` its input in task ``i``'s expert. The same
number for weights a method already produced (Task Arithmetic, RegMean, a finished ProDistill run) says
which merge keeps each block closer to the experts, on the same few-shot inputs, whatever the method.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from layermerge.engine.block_error import squared_error
from layermerge.engine.context import BlockContext, BlockResult
from layermerge.engine.driver import run_engine


class FixedWeights:
    """A block 'method' that returns given merged weights and records their block error."""

    name = "block_errors"

    def __init__(self, merged: Mapping[str, torch.Tensor]):
        self.merged = merged

    def merge_block(self, ctx: BlockContext) -> BlockResult:
        prefix = ctx.name + "." if ctx.name else ""
        missing = [prefix + name for name in ctx.base if prefix + name not in self.merged]
        if missing:
            raise KeyError(f"the merged weights lack {missing[:3]} of block {ctx.name!r}")
        weights = {name: self.merged[prefix + name].to(ctx.device, torch.float32) for name in ctx.base}
        error = 0.0
        with torch.no_grad():
            for ref in ctx.local_pairs():
                output = ctx.run(weights, ctx.merged_input(ref), ref, "merged")
                error += float(squared_error(output, ctx.expert_output(ref), ctx.token_mask(ref)))
        return BlockResult(weights, stats={"block_error": ctx.sum(error)})


def block_errors(model: torch.nn.Module, weights, data: Mapping[str, Sequence[Mapping]],
                 merged: Mapping[str, torch.Tensor], **engine_options) -> list[float]:
    """Per block, ``Σ_i Σ_examples ‖Block(W; z_m) − Block(θ_i; z_i)‖²`` for the merged weights ``merged``
    (template names), with the merged stream built by ``merged`` itself; ``model``, ``weights``, ``data``
    and the options as for ``run_engine``. Non-block weights come from ``merged`` too."""
    options = dict(engine_options)
    result = run_engine(model, weights, data, FixedWeights(merged), non_block_weights=merged, **options)
    return [stats["block_error"] for stats in result.block_stats]
