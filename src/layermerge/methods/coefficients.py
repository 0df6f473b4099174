"""Learned merging coefficients shared by ProDistill and DistillMerge.

For one block, ``MergingCoefficients`` holds λ_{i,p} for every task i and learnable tensor p and
builds W_p(λ) = θ0_p + Σ_i λ_{i,p} ⊙ τ_{i,p}. λ is stored as ``init + δ`` with δ trained from zero:
the same optimisation (Adam is unchanged by a constant shift), and at δ = 0 the weights are
bit-for-bit Task Arithmetic at ``init``. ``fit`` is the Adam loop over shuffled groups of cached
batches, data-parallel aware: each rank adds the loss of the batches it holds, gradients are summed
across ranks before every step, so all ranks take identical steps.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from layermerge.methods.base import task_vectors
from layermerge.norm_stats import is_running_statistic, mean_of_experts

GRANULARITIES = ("element", "tensor", "task")


class MergingCoefficients:
    """λ for one block: per element (the paper), per tensor, or one per task for the whole block.

    Only ``nn.Parameter``s get coefficients; BatchNorm running statistics are the experts' mean
    (``layermerge.norm_stats``), other float buffers Task Arithmetic at ``init``, and integer
    buffers the base's.
    """

    def __init__(self, module: nn.Module, base: dict[str, torch.Tensor], experts: dict[str, dict[str, torch.Tensor]],
                 tasks: list[str], init: float, granularity: str, device: torch.device):
        if granularity not in GRANULARITIES:
            raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
        self.tasks = list(tasks)
        self.init = float(init)
        self.base = base
        self.learnable = [name for name, _ in module.named_parameters() if base[name].is_floating_point()]
        self.vectors = {name: task_vectors(base[name], [experts[t][name] for t in tasks])
                        for name in base if base[name].is_floating_point()}
        self.start = {name: base[name] + self.init * self.vectors[name].sum(0) if name in self.vectors
                      else base[name] for name in base}
        for name in self.start:
            if name in self.vectors and name not in self.learnable and is_running_statistic(name):
                self.start[name] = mean_of_experts([experts[t][name] for t in tasks]).to(base[name].dtype)
        count = len(self.tasks)
        if granularity == "task":
            shared = torch.zeros(count, device=device, requires_grad=True)
            self.deltas = {name: shared for name in self.learnable}
            self._leaves = [shared] if self.learnable else []
        else:
            self.deltas = {name: torch.zeros((count, *(base[name].shape if granularity == "element" else ())),
                                             device=device, requires_grad=True) for name in self.learnable}
            self._leaves = list(self.deltas.values())

    def leaves(self) -> list[torch.Tensor]:
        """The trainable tensors (δ)."""
        return self._leaves

    def weights(self) -> dict[str, torch.Tensor]:
        """W(λ) for every tensor of the block, differentiable in δ.

        Task by task with addcmul: one tensor-sized temporary at a time instead of a (T, ...) product;
        at δ = 0 every term adds exact zeros, so the result is ``start`` bit for bit.
        """
        weights = dict(self.start)
        for name in self.learnable:
            delta = self.deltas[name]
            if delta.dim() == 1:
                delta = delta.reshape(len(self.tasks), *([1] * self.base[name].dim()))
            merged = self.start[name]
            for position in range(len(self.tasks)):
                merged = torch.addcmul(merged, delta[position], self.vectors[name][position])
            weights[name] = merged
        return weights

    @torch.no_grad()
    def final(self) -> dict[str, torch.Tensor]:
        return {name: tensor.detach() for name, tensor in self.weights().items()}

    def artifacts(self) -> dict[str, torch.Tensor]:
        """λ per ``task/tensor`` (CPU), as saved with the output."""
        return {f"{task}/{name}": (self.init + self.deltas[name][position]).detach().to("cpu")
                for name in self.learnable for position, task in enumerate(self.tasks)}


def squared_error(output: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """‖output − target‖² summed over tokens and features (in fp32), padding tokens left out."""
    squared = (output.float() - target.float()).pow(2)
    if mask is not None:
        squared = squared * mask.reshape(*mask.shape, *([1] * (squared.dim() - mask.dim()))).to(squared.dtype)
    return squared.sum()


def fit(ctx, leaves: list[torch.Tensor], group_loss: Callable[[list], torch.Tensor], *, lr: float, epochs: int,
        batch_size: int) -> list[float]:
    """Adam on ``leaves``; returns the loss summed over each epoch (over all ranks).

    Every epoch the cached batches are shuffled by ``ctx.generator`` (the same order on every rank)
    and grouped until ``batch_size`` examples; ``group_loss(local_refs)`` is the loss of the group's
    batches this rank holds. Empty when there is nothing to learn (no leaves, lr 0 or 0 epochs).
    """
    if not leaves or lr <= 0 or epochs <= 0:
        return []
    refs = ctx.pairs()
    # One tensor at a time (not foreach): the multi-tensor path holds temporaries for every leaf at once,
    # and element-wise coefficients are as large as the block times the number of tasks.
    optimizer = torch.optim.Adam(leaves, lr=lr, foreach=False)
    for leaf in leaves:
        leaf.grad = torch.zeros_like(leaf)
    losses = []
    for _ in ctx.progress(range(epochs), desc="epochs"):
        order = torch.randperm(len(refs), generator=ctx.generator).tolist()
        epoch_loss, group, group_size = 0.0, [], 0
        for position, ref_index in enumerate(order):
            group.append(refs[ref_index])
            group_size += refs[ref_index].size
            if group_size < batch_size and position < len(order) - 1:
                continue
            optimizer.zero_grad(set_to_none=False)
            local = [ref for ref in group if ctx.is_local(ref)]
            value = 0.0
            if local:
                loss = group_loss(local)
                loss.backward()
                value = float(loss.detach())
            ctx.all_reduce_([leaf.grad for leaf in leaves])
            optimizer.step()
            epoch_loss += ctx.sum(value)
            group, group_size = [], 0
        losses.append(epoch_loss)
    return losses
