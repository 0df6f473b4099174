"""RegMean (Jin, Ren, Preotiuc-Pietro, Cheng, ICLR 2023): merge every linear layer as the least-squares
fit of the experts' outputs on their own inputs.

A 1×1 convolution (one group) is the same linear map applied at every pixel, so it is solved the
same way with each pixel's channel vector as one row of X (``pointwise_convs``, on by default; the
paper's models have only nn.Linear). Without it a CNN such as EfficientNet gets weight averaging.

For a linear layer y = x Wᵀ with expert weights W_i and that layer's inputs X_i on task i (rows =
tokens), the merged W minimises Σ_i ‖X_i Wᵀ − X_i W_iᵀ‖², whose normal equations are
(Σ_i G_i) Wᵀ = Σ_i G_i W_iᵀ with G_i = X_iᵀ X_i. Off-diagonal entries of each Gram are scaled by α
(G̃ = αG + (1−α) diag G) for stability, as the paper does. The system is solved by Cholesky (no
inverse); if it is singular (too few tokens, dead inputs), a small ridge pulling towards the
experts' average is added until it factors. Every other tensor of the block (biases, norms) is
averaged, or merged by Task Arithmetic as an option.

It runs on the block engine: for each block and each task the expert's block runs on the expert's
own stream with forward pre-hooks on its linear layers, padding tokens left out. Memory: per block,
the summed Gram (in×in) and right-hand side (in×out) of every linear layer, plus one task's Grams at
a time; nothing large is saved in the output. See docs and ../shared/docs/METHODS.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from pydantic import Field
from torch import nn

from layermerge.engine import BlockResult, non_block_tensor
from layermerge.errors import ConfigError
from layermerge.methods.base import DataDrivenMethod
from layermerge.methods.registry import MethodParams, register

RIDGE_STEPS = tuple(10.0 ** -k for k in range(10, 0, -1))   # 1e-10 … 1e-1 of the mean diagonal
SOLVE_DTYPES = {"float64": torch.float64, "float32": torch.float32}


# --------------------------------------------------------------------- the pure core
def regularised_gram(gram: torch.Tensor, alpha: float) -> torch.Tensor:
    """G̃ = α G + (1 − α) diag(G): off-diagonal entries scaled by α, the diagonal kept."""
    if alpha == 1.0:
        return gram
    scaled = gram * alpha
    scaled.diagonal().add_(gram.diagonal(), alpha=1.0 - alpha)
    return scaled


def solve_normal_equations(lhs: torch.Tensor, rhs: torch.Tensor, mean_solution: torch.Tensor,
                           dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, float]:
    """Solve ``lhs @ X = rhs`` (lhs = Σ G̃_i symmetric PSD) by Cholesky, without an inverse.

    When lhs does not factor, add r·s to its diagonal and r·s·``mean_solution`` to rhs (s the mean
    diagonal, r from 1e-10 up): a ridge towards the experts' average, equal to adding the same ridge
    to every task's Gram, so directions no task's data reaches fall back to the average.
    Returns (X in fp32, the relative ridge r used, 0 when none).
    """
    a = lhs.to(dtype)
    b = rhs.to(dtype)
    factor, info = torch.linalg.cholesky_ex(a)
    if int(info) == 0:
        solution = torch.cholesky_solve(b, factor)
        if torch.isfinite(solution).all():
            return solution.float(), 0.0
    scale = float(a.diagonal().mean())
    if not scale > 0:                     # no data reached this layer at all: the average
        return mean_solution.float().clone(), float("inf")
    mean = mean_solution.to(dtype)
    for step in RIDGE_STEPS:
        ridge = step * scale
        shifted = a.clone()
        shifted.diagonal().add_(ridge)
        factor, info = torch.linalg.cholesky_ex(shifted)
        if int(info) == 0:
            solution = torch.cholesky_solve(b + ridge * mean, factor)
            if torch.isfinite(solution).all():
                return solution.float(), step
    solution = torch.linalg.lstsq(a, b).solution        # last resort: minimum-norm least squares
    return solution.float(), float("nan")


def regmean_linear(grams: list[torch.Tensor], weights: list[torch.Tensor], alpha: float = 1.0,
                   dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Merged weight (out×in, torch.nn.Linear layout) of one linear layer from per-expert input Grams
    (in×in) and weights (out×in): Wᵀ = (Σ G̃_i)⁻¹ Σ G̃_i W_iᵀ, solved, not inverted."""
    if not grams or len(grams) != len(weights):
        raise ValueError(f"need one Gram per weight, got {len(grams)} Grams and {len(weights)} weights")
    lhs = torch.zeros_like(grams[0], dtype=torch.float32)
    rhs = torch.zeros_like(weights[0].T, dtype=torch.float32)
    for gram, weight in zip(grams, weights):
        scaled = regularised_gram(gram.float(), alpha)
        lhs += scaled
        rhs += scaled @ weight.float().T
    mean = torch.stack([w.float() for w in weights]).mean(0).T
    solution, _ = solve_normal_equations(lhs, rhs, mean, dtype)
    return solution.T.contiguous()


# --------------------------------------------------------------------- the block method
@dataclass
class _Layer:
    """One linear layer of a block: its module path, weight name, whether the stored weight is
    already (in, out) (transformers' Conv1D, GPT-2) instead of nn.Linear's (out, in), and for a 1×1
    convolution its stride (its weight is (out, in, 1, 1) and its input (N, in, H, W))."""

    path: str
    weight: str
    in_features: int
    transposed: bool
    conv_stride: tuple[int, int] | None = None

    def as_in_out(self, weight: torch.Tensor) -> torch.Tensor:
        if self.conv_stride is not None:
            return weight.reshape(weight.shape[0], -1).T
        return weight if self.transposed else weight.T

    def from_in_out(self, solution: torch.Tensor) -> torch.Tensor:
        if self.conv_stride is not None:
            return solution.T.contiguous().reshape(*solution.T.shape, 1, 1)
        return solution.contiguous() if self.transposed else solution.T.contiguous()

    def rows(self, x: torch.Tensor) -> torch.Tensor:
        """The layer input as rows of ``in_features``: tokens (linear) or pixels (1×1 convolution,
        at the positions its stride reads)."""
        if self.conv_stride is not None:
            x = x[..., ::self.conv_stride[0], ::self.conv_stride[1]].movedim(-3, -1)
        return x.reshape(-1, x.shape[-1])


def linear_layers(module: nn.Module, names: set[str], pointwise_convs: bool = True) -> list[_Layer]:
    """Every nn.Linear (and transformers Conv1D) of ``module`` whose weight is a merged tensor, and
    with ``pointwise_convs`` every 1×1 nn.Conv2d with one group and no padding."""
    layers = []
    for path, sub in module.named_modules():
        weight = f"{path}.weight" if path else "weight"
        if weight not in names:
            continue
        if isinstance(sub, nn.Linear):
            layers.append(_Layer(path, weight, sub.in_features, False))
        elif type(sub).__name__ == "Conv1D" and hasattr(sub, "nf") and sub.weight.dim() == 2:
            layers.append(_Layer(path, weight, sub.weight.shape[0], True))
        elif pointwise_convs and _is_pointwise_conv(sub):
            layers.append(_Layer(path, weight, sub.in_channels, False, tuple(sub.stride)))
    return layers


def _is_pointwise_conv(module: nn.Module) -> bool:
    """A 1×1 Conv2d, one group, reading its input unpadded (a static 'same' padding must be a no-op)."""
    if not isinstance(module, nn.Conv2d) or tuple(module.kernel_size) != (1, 1) or module.groups != 1:
        return False
    if module.padding_mode != "zeros" or tuple(module.padding) != (0, 0):
        return False
    padding = getattr(module, "static_padding", None)          # efficientnet_lite_pytorch's 'same' padding
    if padding is None or isinstance(padding, nn.Identity) or type(padding).__name__ == "Identity":
        return True
    return isinstance(padding, nn.ZeroPad2d) and not any(padding.padding)


@register("regmean", summary="per linear layer the least-squares fit of the experts' outputs on their own "
                             "few-shot inputs (Gram matrices; Jin et al. 2023)", needs_data=True, kind="block")
class RegMean(DataDrivenMethod):
    class Params(MethodParams):
        alpha: float = Field(0.9, ge=0, le=1, description="off-diagonal scaling α of each Gram: G̃ = αG + "
                                                          "(1−α)diag(G) (paper: tuned, 0.9 a common choice; "
                                                          "1 = plain least squares)")
        others: Literal["average", "task_arithmetic"] = Field(
            "average", description="how tensors that are not linear weights (biases, norms, embeddings) "
                                   "merge: averaged (paper) or Task Arithmetic at `scaling`")
        scaling: float = Field(0.3, description="Task Arithmetic λ when others='task_arithmetic'")
        inputs: Literal["expert", "merged"] = Field(
            "expert", description="whose layer inputs build task i's Gram: expert i's own stream (paper) or "
                                  "the merged model's stream built so far (a progressive variant)")
        gram_scale: Literal["per_example", "sum"] = Field(
            "per_example", description="divide each task's Gram by its number of examples (tasks weigh the "
                                       "same whatever their shots) or keep the plain sum over tokens")
        solve_dtype: Literal["float64", "float32"] = Field(
            "float64", description="precision of the Cholesky solve (Grams are accumulated in float32)")
        pointwise_convs: bool = Field(
            True, description="solve 1×1 convolutions too (a linear map at every pixel); False averages them "
                              "like the other non-linear-layer tensors (the paper's models have none)")



    def non_block_scaling(self, num_experts: int) -> float:
        """Task Arithmetic λ of the non-block weights: 1/T is the average."""
        return 1.0 / num_experts if self.params.others == "average" else self.params.scaling

    # ----------------------------------------------------------------- one block
    def merge_block(self, ctx) -> BlockResult:
        names = set(ctx.base)
        layers = linear_layers(ctx.module, names, self.params.pointwise_convs)
        lhs = {layer.weight: None for layer in layers}
        rhs = {layer.weight: None for layer in layers}
        reached = torch.zeros(len(layers), device=ctx.device)
        unmasked: set[str] = set()
        constant = 0.0                          # Σ_i tr(W_i G̃_i W_iᵀ), for the objective value
        for task in ctx.tasks:
            grams, rows = self._task_grams(ctx, task, layers, unmasked)
            reached += rows
            scale = 1.0 / ctx.num_examples(task) if self.params.gram_scale == "per_example" else 1.0
            for layer in layers:
                gram = regularised_gram(grams.pop(layer.weight).mul_(scale), self.params.alpha)
                weight = layer.as_in_out(ctx.experts[task][layer.weight].float())
                product = gram @ weight
                constant += float((weight * product).sum())
                lhs[layer.weight] = gram if lhs[layer.weight] is None else lhs[layer.weight].add_(gram)
                rhs[layer.weight] = product if rhs[layer.weight] is None else rhs[layer.weight].add_(product)
                del gram, product
        merged, stats = self._solve(ctx, layers, lhs, rhs, reached, constant)
        for name in ctx.base:
            if name not in merged:
                merged[name] = self._other(ctx, name)
        stats["unmasked_layers"] = sorted(unmasked)
        return BlockResult(merged, {}, stats)

    # ----------------------------------------------------------------- pieces
    def _task_grams(self, ctx, task: str, layers: list[_Layer], unmasked: set[str]):
        """Σ XᵀX of every linear layer's inputs over task ``task``'s real tokens (all ranks), and the
        number of rows each layer saw."""
        grams = {layer.weight: torch.zeros(layer.in_features, layer.in_features, device=ctx.device)
                 for layer in layers}
        rows = torch.zeros(len(layers), device=ctx.device)
        mask_now: list[torch.Tensor | None] = [None]

        def hook(position: int, layer: _Layer):
            def record(module, args):
                x = args[0].detach()
                mask = mask_now[0]
                if mask is not None and layer.conv_stride is None and tuple(x.shape[:-1]) == tuple(mask.shape):
                    x = x[mask]
                elif mask is not None:
                    unmasked.add(layer.path)
                x = layer.rows(x).float()
                grams[layer.weight].addmm_(x.T, x)
                rows[position] += x.shape[0]
            return record

        handles = [ctx.module.get_submodule(layer.path).register_forward_pre_hook(hook(i, layer))
                   for i, layer in enumerate(layers)]
        try:
            with torch.no_grad():
                for ref in ctx.local_pairs(task):
                    mask_now[0] = ctx.token_mask(ref)
                    if self.params.inputs == "merged":
                        ctx.run_expert(task, ctx.merged_input(ref), ref, "merged")
                    else:
                        ctx.run_expert(task, ctx.expert_input(ref), ref)
        finally:
            for handle in handles:
                handle.remove()
        ctx.all_reduce_([*grams.values(), rows])
        return grams, rows

    def _solve(self, ctx, layers, lhs, rhs, reached, constant) -> tuple[dict, dict]:
        dtype = SOLVE_DTYPES[self.params.solve_dtype]
        merged: dict[str, torch.Tensor] = {}
        ridges, without_data, objective = [], [], constant
        for position, layer in enumerate(layers):
            experts = [ctx.experts[task][layer.weight].float() for task in ctx.tasks]
            mean = layer.as_in_out(torch.stack(experts).mean(0))
            if float(reached[position]) == 0:
                without_data.append(layer.path)
                merged[layer.weight] = self._other(ctx, layer.weight)
                continue
            a, b = lhs.pop(layer.weight), rhs.pop(layer.weight)
            solution, ridge = solve_normal_equations(a, b, mean, dtype)
            if ridge:
                ridges.append({"layer": layer.path, "relative_ridge": ridge})
            # Σ_i ‖X_i Wᵀ − X_i W_iᵀ‖²_G̃ = tr(XᵀAX) − 2 tr(XᵀB) + Σ_i tr(W_i G̃_i W_iᵀ), X = Wᵀ
            objective += float((solution * (a @ solution)).sum() - 2 * (solution * b).sum())
            merged[layer.weight] = layer.from_in_out(solution)
            del a, b
        if layers and len(without_data) == len(layers):
            raise ConfigError(f"regmean: no linear layer of block {ctx.name!r} received any input; check that "
                              "the few-shot batches reach this block")
        stats = {"linear_layers": len(layers), "layers_without_inputs": without_data, "ridged_layers": ridges,
                 "loss_final": max(objective, 0.0) / max(len(ctx.tasks), 1)}
        return merged, stats

    def _other(self, ctx, name: str) -> torch.Tensor:
        experts = [ctx.experts[task][name] for task in ctx.tasks]
        base = ctx.base[name]
        if not base.is_floating_point():
            return base
        if self.params.others == "task_arithmetic":
            return non_block_tensor(name, base, experts, self.params.scaling)
        return torch.stack(experts).mean(0)


__all__ = ["RegMean", "linear_layers", "regmean_linear", "regularised_gram", "solve_normal_equations"]
