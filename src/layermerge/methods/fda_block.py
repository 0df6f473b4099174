"""FDA block by block: the paper's own form of Functional Dual Anchors, on the block engine.

The paper (Shi et al. 2025, §2.4 and Algorithm 1) and its code build the anchors of every expert
separately for each transformer block: they are hidden states at that block's input, the
representation is the block's output at every position, and only that block is fitted. ``fda``
(``methods/fda.py``) is the whole-model form; this module runs the same core (``alignment_loss``,
``construct_anchors``, ``fit_anchors``) one block at a time through ``kind="block"``.

Per block and expert i: anchors X_i (``anchors`` of them, each shaped like one example of the block's
input on the few-shot data) start as σ·N(0, I) with σ = ``init_scale`` × the RMS of that real input
(the hidden states' scale varies along the network, unlike the paper's embedding-space σ), and AdamW
moves them until −∇θ D_i(θ0; X_i) points along the block's task vector τ_i, D_i being the distance
between the block's outputs under θ and θ_i. Then the block's weights, from the base (or from Task
Arithmetic as element-wise coefficients on the task vectors), are fitted with Adam to every expert's
outputs on its anchors. Anchors run with the extra arguments (masks, rotary tables...) of one few-shot
example of the task (the longest of its narrowest batch), so any block the engine can stream can take
them; the few-shot inputs set only that and the scale.
"""

from __future__ import annotations

import torch
from pydantic import Field
from torch.nn.attention import SDPBackend, sdpa_kernel

from layermerge.engine import BlockResult, call_block
from layermerge.engine.tree import map_tensors
from layermerge.errors import ConfigError
from layermerge.methods.base import DataDrivenMethod
from layermerge.methods.fda import (
    MERGE_LR,
    AnchorParams,
    MergedBackbone,
    alignment_loss,
    construct_anchors,
    fit_and_measure,
    gaussian_anchors,
    task_arithmetic_start,
)
from layermerge.methods.registry import register
from layermerge.norm_stats import is_running_statistic, mean_of_experts


def one_example_extras(extras: tuple[tuple, dict], size: int, example: int) -> tuple[tuple, dict]:
    """A batch's extra block arguments cut to one example (every tensor whose first dimension is the batch
    size keeps row ``example`` as a batch of one), so they broadcast over any number of anchors."""
    return map_tensors(extras, lambda t: t[example:example + 1] if t.dim() >= 1 and t.shape[0] == size else t)


@register("fda_block", summary="Functional Dual Anchors block by block, the paper's form: per block and expert, "
                               "hidden-state anchors whose base gradient points along the block's task vector; "
                               "each block fitted to the experts' outputs on them", needs_data=True, kind="block",
          min_experts=1)
class BlockFunctionalDualAnchors(DataDrivenMethod):
    method_name = "fda_block"

    class Params(AnchorParams):
        anchors: int = Field(64, ge=1, description="anchors per expert and block (the paper: 64)")
        init_scale: float = Field(0.01, gt=0, description="σ of the gaussian anchors, relative to the RMS of the "
                                                          "block's real input (the paper: 0.01 in embedding units)")

    def non_block_scaling(self, num_experts: int) -> float:
        """Outside the blocks nothing is fitted: the base's weights (λ = 0) from the base, Task Arithmetic's
        from Task Arithmetic, as the paper keeps the embeddings of its starting model."""
        return 0.0 if self.params.start == "base" else self.params.scaling

    def merge_block(self, ctx) -> BlockResult:
        p = self.params
        if ctx.world_size > 1:
            raise ConfigError("fda_block builds its anchors from one few-shot example per task on one process; "
                              "run it without torchrun")
        # Weights are aligned and fitted; normalisation running statistics are not weights: the fit starts
        # from (and keeps) the experts' mean, as every other method's output does (layermerge.norm_stats).
        keys = [name for name, tensor in ctx.base.items()
                if tensor.is_floating_point() and not is_running_statistic(name)]
        statistics = {name: mean_of_experts([ctx.experts[task][name] for task in ctx.tasks])
                      for name, tensor in ctx.base.items() if tensor.is_floating_point() and is_running_statistic(name)}
        vectors = {task: {key: ctx.experts[task][key] - ctx.base[key] for key in keys} for task in ctx.tasks}
        templates = {task: self._template(ctx, task) for task in ctx.tasks}

        def represent(task, weights, anchors):
            extras = templates[task][1]
            return call_block(ctx.module, {**ctx.base, **weights} if weights else ctx.experts[task],
                              anchors, extras, ctx.dtype)

        anchors, targets, alignment = {}, {}, {}
        with sdpa_kernel([SDPBackend.MATH]):          # fused attention has no second derivative
            for task in ctx.tasks:
                shape, _, scale = templates[task]
                init = gaussian_anchors(p.anchors, shape, p.init_scale * scale, ctx.generator).to(ctx.device)
                aligned = {key: tensor for key, tensor in vectors[task].items() if bool(tensor.any())}
                if aligned:
                    def objective(x, create_graph, task=task, aligned=aligned):
                        return alignment_loss(represent, task, x, ctx.base, {}, aligned,
                                              distance=p.anchor_distance, create_graph=create_graph)[0]

                    anchors[task], record = construct_anchors(
                        objective, init, steps=p.anchor_steps, lr=p.anchor_lr,
                        progress=lambda it, task=task: ctx.progress(it, f"fda_block: anchors for {task}"))
                else:                                   # τ = 0 in this block: nothing to align
                    anchors[task], record = init, {"first": 1.0, "best": 1.0, "best_step": 0, "last": 1.0}
                alignment[task] = {"cosine_first": round(1 - record["first"], 6),
                                   "cosine_best": round(1 - record["best"], 6), "best_step": record["best_step"]}
                with torch.no_grad():
                    targets[task] = represent(task, {}, anchors[task]).detach()

        stacked = None
        if p.start == "task_arithmetic":
            stacked = {key: torch.stack([vectors[task][key] for task in ctx.tasks]) for key in keys}
            start = {**task_arithmetic_start(ctx.base, stacked, p.scaling), **statistics}
        else:
            start = {**ctx.base, **statistics}
        merged = MergedBackbone(start, keys, stacked)
        token_blocks = len(templates[ctx.tasks[0]][0]) == 2
        lr = p.merge_lr if p.merge_lr is not None else MERGE_LR[(p.start, "text" if token_blocks else "pixels")]
        weights, fit = fit_and_measure(merged, represent, anchors, targets, p, lr, ctx.generator,
                                       lambda it: ctx.progress(it, "fda_block: fitting"))
        merged_block = {**ctx.base, **weights}          # the start's statistics: the experts' mean
        params = {name: merged_block[name].detach() for name in ctx.base}
        stats = {"anchor_shape": list(templates[ctx.tasks[0]][0]), "alignment": alignment, "merge_lr": lr,
                 "merge_steps": fit["steps"], "loss_start": round(fit["loss_start"], 6),
                 "loss_final": round(fit["loss_final"], 6),
                 "loss_final_per_epoch": [round(value, 6) for value in fit["history"][-3:]]}
        return BlockResult(params, stats=stats)

    @staticmethod
    def _template(ctx, task: str) -> tuple[tuple[int, ...], tuple[tuple, dict], float]:
        """(one anchor's shape, the extra arguments anchors run with, the RMS of the block's real input): from
        the longest example of the task's narrowest few-shot batch on the merged stream (no padding: batches
        are regrouped by length and trimmed to their longest example). The narrowest batch keeps anchors
        short, nearer the paper's five tokens, and cheap: the construction differentiates twice."""
        refs = ctx.local_pairs(task)
        ref = min(refs, key=lambda r: tuple(ctx.merged_input(r).shape[1:]))
        hidden = ctx.merged_input(ref)
        mask = ctx.token_mask(ref)
        example = int(mask.sum(1).argmax()) if mask is not None else 0
        extras = one_example_extras(ctx.extra(ref, "merged"), ref.size, example)
        scale = float(hidden[example].float().pow(2).mean().sqrt()) or 1.0
        return tuple(hidden.shape[1:]), extras, scale


__all__ = ["BlockFunctionalDualAnchors", "one_example_extras"]
