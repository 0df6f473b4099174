"""ProDistill (Xu, Li, Zhang, ICML 2025): progressive layer-wise distillation of merging coefficients.

For each block, in order, learn coefficients λ_{i,p} (element-wise by default) so that the merged
block W_p(λ) = θ0_p + Σ_i λ_{i,p} ⊙ τ_{i,p} maps the merged model's inputs z_m onto the task's
expert outputs Block(θ_i; z_i). Loss Σ_i 1/(2T|D_i|) Σ_x ‖Block(W(λ); z_m) − Block(θ_i; z_i)‖²,
summed over tokens and features with padding masked. A fresh Adam per block; the expert outputs
come from the engine's cache, computed once per block (``recompute_expert_outputs`` recomputes them
at every step instead, only to measure what that saves). See ../shared/docs/METHODS.md.

λ is stored as ``init + δ`` with δ trained from zero: the same optimisation, and at δ = 0 the
merged weights are bit-for-bit Task Arithmetic at ``init``.

Defaults that depart from the paper, chosen by measurement (docs/BENCHMARKS.md, "ProDistill,
faster"): 64 examples per Adam step at lr 0.03 (each step's λ-sized work — W(λ), its gradient, Adam —
costs the same at 16 examples as at 64, and the larger lr makes up for the fewer steps), a block
stops once its epoch loss has improved by less than 1 % for two epochs in a row (``patience=2,
tolerance=0.01``), and the block's matmuls run in bfloat16 where the hardware does that natively
(``train_precision=auto``), and so do the forwards that compute the experts' targets
(``target_precision=auto``). The paper's schedule is ``batch_size=16, lr=0.01, patience=0,
train_precision=float32, target_precision=float32`` (with its ``epochs``); ``schedule`` can decay
the lr (measured: it cost quality at equal epochs). Two switches change only the rounding: a
step's cached batches share one block call where nothing ties them to their own shape
(``stack_batches``, ``methods.stacking``), and CNN blocks train through their batch norms folded into
the convolutions and their symmetric zero paddings moved into them (``fold_batch_norms``,
``methods.folding``).
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import nn

from layermerge.engine import BlockResult, run_engine
from layermerge.engine.block_error import squared_error
from layermerge.engine.precision import matmul_precision, resolve_precision
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
from layermerge.methods.folding import FoldedBlock, fold_block
from layermerge.methods.registry import MethodParams, register
from layermerge.methods.stacking import Stacking, weighted_squared_error


@register("prodistill", summary="few-shot layer-wise distillation of element-wise merging coefficients "
                                "(Xu et al. 2025)", needs_data=True, kind="block")
class ProDistill(DataDrivenMethod):
    artifact_name = "coefficients"

    class Params(MethodParams):
        init: float = Field(0.3, description="initial λ for every task and element (the paper: 0.3; 0.5 for "
                                             "two experts); also the Task Arithmetic λ of non-block weights")
        lr: float = Field(0.03, ge=0, description="Adam learning rate (paper: 0.01 vision/NLU at batch 16, "
                                                  "0.1 LLMs; 0.03 goes with the default batch of 64)")
        epochs: int = Field(50, ge=0, description="most passes over the cached few-shot pairs per block "
                                                  "(paper: 50-100); patience may stop a block sooner")
        batch_size: int = Field(64, ge=1, description="examples per Adam step (whole cached batches are "
                                                      "grouped up to this size; paper: 16 NLU, 128 vision)")
        patience: Patience = 2
        tolerance: Tolerance = 0.01
        schedule: Schedule = "constant"
        train_precision: TrainPrecision = "auto"
        target_precision: Literal["auto", "float32", "bfloat16"] = Field(
            "auto", description="matmul precision of the experts' targets Block(θ_i; z_i) (and so of the "
                                "expert stream, computed once per block without gradients). auto: as the "
                                "block trains (train_precision), so targets and trained outputs are "
                                "rounded alike; float32: exact targets (the paper). Stored in float32 "
                                "either way")
        granularity: Literal["element", "tensor", "task"] = Field(
            "element", description="λ per element (paper), one per task per tensor, or one per task per "
                                   "block")
        input_mode: Literal["dual", "merged", "expert"] = Field(
            "dual", description="dual: merged block on z_m vs expert on z_i (paper); merged: both on z_m; "
                                "expert: both on z_i")
        stack_batches: bool = Field(
            True, description="run a step's cached batches through the block in one call where the block "
                              "takes no tensor argument but its input and no batch has padding (CNN blocks); "
                              "checked once per block to give the same outputs as separate calls")
        fold_batch_norms: bool = Field(
            True, description="train through each convolution with the eval-mode batch norm after it folded "
                              "in (one weight-sized product per step instead of a pass over every "
                              "activation), and a symmetric zero padding before it moved into its own "
                              "padding (no padded copy); checked once per block to give the block's outputs")
        recompute_expert_outputs: bool = Field(
            False, description="recompute the expert outputs at every step instead of once per block "
                               "(same result, slower; for timing comparisons)")


    def config(self) -> dict:
        """What the checkpoint fingerprint records (the timing switch does not change the result)."""
        return self.params.model_dump(exclude={"recompute_expert_outputs"})

    # ----------------------------------------------------------------- one block
    def merge_block(self, ctx) -> BlockResult:
        p = self.params
        coefficients = MergingCoefficients(ctx.module, ctx.base, ctx.experts, ctx.tasks, p.init, p.granularity,
                                           ctx.device)
        targets = self._targets(ctx)
        scale = {task: 1.0 / (2 * len(ctx.tasks) * ctx.num_examples(task)) for task in ctx.tasks}
        stream = self._stream()
        stacking = Stacking(ctx, stream, enabled=p.stack_batches)
        folded = self._folded(ctx, coefficients.final()) if p.fold_batch_norms else None

        def run(weights, hidden, ref):
            if folded is None:
                return ctx.run(weights, hidden, ref, stream)
            return folded.run(weights, hidden, ctx.dtype)

        def group_loss(refs):
            weights = coefficients.weights()
            if folded is not None:
                weights = folded.weights(weights)
            inputs = [self._input(ctx, ref) for ref in refs]
            return sum(self._call_error(ctx, run, weights, [refs[i] for i in call], [inputs[i] for i in call],
                                        targets, scale, stacking)
                       for call in stacking.plan(refs, inputs))

        precision = resolve_precision(p.train_precision, ctx.device, ctx.module)
        fallback = None
        try:
            losses = fit(ctx, coefficients.leaves(), group_loss, lr=p.lr, epochs=p.epochs, batch_size=p.batch_size,
                         stop=StoppingRule(p.patience, p.tolerance), precision=precision,
                         schedule=p.schedule)
        except RuntimeError as exc:
            if p.train_precision != "auto" or precision == "float32":
                raise
            # 'auto' chose bfloat16, which some blocks cannot run (DeBERTa's attention overflows, X-MOD's
            # adapters mix dtypes): this block trains in float32 from the same start instead.
            fallback = f"bfloat16 failed ({str(exc).strip().splitlines()[0][:120]}); trained in float32"
            precision = "float32"
            coefficients = MergingCoefficients(ctx.module, ctx.base, ctx.experts, ctx.tasks, p.init, p.granularity,
                                               ctx.device)
            losses = fit(ctx, coefficients.leaves(), group_loss, lr=p.lr, epochs=p.epochs, batch_size=p.batch_size,
                         stop=StoppingRule(p.patience, p.tolerance), precision=precision,
                         schedule=p.schedule)
        final = coefficients.final()
        stats = {"loss_first_epoch": losses[0] if losses else None,
                 "loss_last_epoch": losses[-1] if losses else None,
                 "epochs_run": len(losses), "epoch_losses": losses,
                 "train_precision": precision, **({"precision_fallback": fallback} if fallback else {}),
                 "folded_batch_norms": len(folded.folds) if folded is not None else 0,
                 "folded_paddings": folded.paddings if folded is not None else 0}
        if p.input_mode == "dual" and not p.recompute_expert_outputs:
            # the loss of the final weights is the engine's to measure as it pushes z_m through them
            return BlockResult(final, coefficients.artifacts(), stats, loss_weights=scale)
        with torch.no_grad():
            local_loss = sum(float(scale[ref.task] * self._error(ctx, final, ref, targets))
                             for ref in ctx.local_pairs())
        return BlockResult(final, coefficients.artifacts(), {**stats, "loss_final": ctx.sum(local_loss)})

    # ----------------------------------------------------------------- pieces
    def _targets(self, ctx) -> dict:
        """In 'merged' mode the targets are Block(θ_i; z_m), computed here once per block (this rank's
        batches); otherwise the engine's cached Block(θ_i; z_i) serve."""
        if self.params.input_mode != "merged" or self.params.recompute_expert_outputs:
            return {}
        targets = {}
        with torch.no_grad():
            for ref in ctx.local_pairs():
                hidden = ctx.merged_input(ref)
                try:
                    with self._target_precision(ctx):
                        target = ctx.run_expert(ref.task, hidden, ref, "merged")
                except RuntimeError:        # a block that cannot run in bfloat16, as the engine falls back
                    target = ctx.run_expert(ref.task, hidden, ref, "merged")
                targets[ref] = target.to(hidden.dtype).cpu()
        return targets

    def expert_output_precision(self, device: torch.device, module: nn.Module) -> str:
        """The engine's question: the precision of this block's targets (``target_precision``)."""
        precision = self.params.target_precision
        if precision == "auto":
            precision = self.params.train_precision
        return resolve_precision(precision, device, module)

    def _target_precision(self, ctx):
        """The precision the engine computes cached targets in, for targets computed here."""
        return matmul_precision(self.expert_output_precision(ctx.device, ctx.module), ctx.device)

    def _target(self, ctx, ref, targets) -> torch.Tensor:
        mode = self.params.input_mode
        if self.params.recompute_expert_outputs:       # in the precision of the cached targets
            with torch.no_grad(), torch.autocast(ctx.device.type, enabled=False), self._target_precision(ctx):
                if mode == "merged":
                    hidden = ctx.merged_input(ref)
                    return ctx.run_expert(ref.task, hidden, ref, "merged").to(hidden.dtype)
                hidden = ctx.expert_input(ref)
                return ctx.run_expert(ref.task, hidden, ref).to(hidden.dtype)
        return targets[ref].to(ctx.device) if mode == "merged" else ctx.expert_output(ref)

    def _stream(self) -> str:
        """The stream the merged block is trained on."""
        return "expert" if self.params.input_mode == "expert" else "merged"

    def _input(self, ctx, ref) -> torch.Tensor:
        return ctx.expert_input(ref) if self.params.input_mode == "expert" else ctx.merged_input(ref)

    def _folded(self, ctx, weights) -> FoldedBlock | None:
        """The block with its batch norms folded for training (``methods.folding``), when every batch
        calls it with the same non-tensor arguments and the folded block gives its outputs."""
        refs = ctx.local_pairs()
        if not refs:
            return None
        extra = ctx.extra(refs[0], self._stream())
        folded = fold_block(ctx.module, extra)
        if folded is None or any(repr(ctx.extra(ref, self._stream())) != repr(extra) for ref in refs[1:]):
            return None
        try:
            same = folded.matches(weights, self._input(ctx, refs[0]), extra, ctx.dtype)
        except Exception:               # noqa: BLE001 - a traced copy that cannot run: train the block as is
            same = False
        return folded if same else None

    def _error(self, ctx, weights, ref, targets, hidden: torch.Tensor | None = None, run=None) -> torch.Tensor:
        """‖Block(W; input) − target‖² summed over tokens and features, padding tokens left out."""
        hidden = self._input(ctx, ref) if hidden is None else hidden
        output = ctx.run(weights, hidden, ref, self._stream()) if run is None else run(weights, hidden, ref)
        return squared_error(output, self._target(ctx, ref, targets), ctx.token_mask(ref))

    def _call_error(self, ctx, run, weights, refs, inputs, targets, scale, stacking) -> torch.Tensor:
        """The scaled loss of ``refs``' batches: in one block call when ``stacking`` planned them together
        (and its check passes), else batch by batch; ``run(weights, hidden, ref)`` calls the block."""
        def call(hidden, ref):
            return run(weights, hidden, ref)

        if len(refs) > 1 and (stacking.verified or (stacking.verified is None and stacking.verify(call, refs, inputs))):
            target = torch.cat([self._target(ctx, ref, targets) for ref in refs])
            row_weights = torch.cat([torch.full((hidden.shape[0],), scale[ref.task], device=hidden.device)
                                     for ref, hidden in zip(refs, inputs)])
            return weighted_squared_error(call(torch.cat(inputs), refs[0]), target, row_weights)
        return sum(scale[ref.task] * self._error(ctx, weights, ref, targets, hidden, run)
                   for ref, hidden in zip(refs, inputs))


def prodistill_merge(model, weights, data, *, engine_options: dict | None = None, **params):
    """Run ProDistill on ``model`` (a template) with ``weights`` (ExpertSet or WeightSource) and few-shot
    ``data`` ({task: [model-input batches]}); returns the engine's result. ``params`` are ProDistill's.
    For a Hugging Face output folder use ``layermerge.merge(..., method="prodistill", data=...)``."""
    source_tasks = list(getattr(weights, "names", None) or getattr(weights, "tasks", []))
    method = ProDistill(ProDistill.Params(**params), source_tasks)
    options = {"scaling": method.params.init, **(engine_options or {})}
    return run_engine(model, weights, data, method, **options)
