"""DistillMerge: ProDistill's coefficients trained end to end, the variant the ProDistill paper
compares against (Xu, Li, Zhang, ICML 2025, Section 5).

The same parameterisation as ProDistill (λ per task and element of every block tensor, W(λ) =
θ0 + Σ_i λ_i ⊙ τ_i, initialised at ``init``) but every block's λ is trained at once, by
backpropagating through the whole merged stack: the merged model's first-block input (Task
Arithmetic embedding stage) goes through all merged blocks and is compared with the task's expert's
final features, the output of its last block on its own input. Loss Σ_i 1/(2T|D_i|) Σ_x ‖·‖²,
summed over tokens and features with padding masked. It holds every block's weights, coefficients
and Adam state at once and the activations of a whole step for backpropagation, so it needs far
more memory than ProDistill; it is here for comparison, not for large models. The head stage is
merged by Task Arithmetic and not trained.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import nn

from layermerge.engine import BlockResult
from layermerge.engine.block_error import squared_error
from layermerge.engine.precision import resolve_precision
from layermerge.methods.base import DataDrivenMethod
from layermerge.methods.coefficients import MergingCoefficients
from layermerge.methods.fitting import (
    Patience,
    Schedule,
    StoppingRule,
    Tolerance,
    TrainPrecision,
    fit,
)
from layermerge.methods.registry import MethodParams, register


@register("distillmerge", summary="end-to-end distillation of element-wise merging coefficients against the "
                                  "experts' final features (ProDistill paper's baseline)", needs_data=True,
          kind="block")
class DistillMerge(DataDrivenMethod):
    artifact_name = "coefficients"

    class Params(MethodParams):
        init: float = Field(0.3, description="initial λ for every task and element; also the Task Arithmetic λ "
                                             "of non-block weights")
        lr: float = Field(0.01, ge=0, description="Adam learning rate")
        epochs: int = Field(50, ge=0, description="passes over the few-shot examples")
        batch_size: int = Field(16, ge=1, description="examples per Adam step (whole cached batches grouped)")
        patience: Patience = 0
        tolerance: Tolerance = 0.0
        schedule: Schedule = "constant"
        train_precision: TrainPrecision = "float32"
        granularity: Literal["element", "tensor", "task"] = Field(
            "element", description="λ per element, one per task per tensor, or one per task per block")



    def merge_network(self, ctx) -> list[BlockResult]:
        p = self.params
        blocks = [MergingCoefficients(ctx.modules[index], ctx.base[index], ctx.experts[index], ctx.tasks, p.init,
                                      p.granularity, ctx.device) for index in range(ctx.num_blocks)]
        leaves = [leaf for block in blocks for leaf in block.leaves()]
        scale = {task: 1.0 / (2 * len(ctx.tasks) * ctx.num_examples(task)) for task in ctx.tasks}

        def error(weights, ref) -> torch.Tensor:
            return squared_error(ctx.run_network(weights, ref), ctx.expert_features(ref), ctx.token_mask(ref))

        def group_loss(refs):
            weights = [block.weights() for block in blocks]
            return sum(scale[ref.task] * error(weights, ref) for ref in refs)

        precision = resolve_precision(p.train_precision, ctx.device, nn.ModuleList(ctx.modules))
        losses = fit(ctx, leaves, group_loss, lr=p.lr, epochs=p.epochs, batch_size=p.batch_size,
                     stop=StoppingRule(p.patience, p.tolerance), precision=precision,
                     schedule=p.schedule)
        final = [block.final() for block in blocks]
        with torch.no_grad():
            local_loss = sum(float(scale[ref.task] * error(final, ref)) for ref in ctx.local_pairs())
        stats = {"loss_first_epoch": losses[0] if losses else None,
                 "loss_last_epoch": losses[-1] if losses else None,
                 "loss_final": ctx.sum(local_loss), "epochs_run": len(losses), "epoch_losses": losses,
                 "train_precision": precision}
        return [BlockResult(weights, block.artifacts(), stats if index == len(blocks) - 1 else {})
                for index, (weights, block) in enumerate(zip(final, blocks))]
