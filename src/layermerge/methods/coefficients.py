"""Learned merging coefficients shared by ProDistill and DistillMerge.

For one block, ``MergingCoefficients`` holds λ_{i,p} for every task i and learnable tensor p and
builds W_p(λ) = θ0_p + Σ_i λ_{i,p} ⊙ τ_{i,p}. λ is stored as ``init + δ`` with δ trained from zero:
the same optimisation (Adam is unchanged by a constant shift), and at δ = 0 the weights are
bit-for-bit Task Arithmetic at ``init``. The training loop that learns δ is ``layermerge.methods.fitting``.
"""

from __future__ import annotations

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
        """W(λ) for every tensor of the block, differentiable in δ (see ``combine``)."""
        weights = dict(self.start)
        for name in self.learnable:
            delta = self.deltas[name]
            if delta.dim() == 1:
                delta = delta.reshape(len(self.tasks), *([1] * self.base[name].dim()))
            weights[name] = combine(self.start[name], delta, self.vectors[name])
        return weights

    @torch.no_grad()
    def final(self) -> dict[str, torch.Tensor]:
        return {name: tensor.detach() for name, tensor in self.weights().items()}

    def artifacts(self) -> dict[str, torch.Tensor]:
        """λ per ``task/tensor`` (CPU), as saved with the output."""
        return {f"{task}/{name}": (self.init + self.deltas[name][position]).detach().to("cpu")
                for name in self.learnable for position, task in enumerate(self.tasks)}


class _Combine(torch.autograd.Function):
    """W = start + Σ_i δ_i ⊙ τ_i with a backward that costs one pass: ∂L/∂δ = τ ⊙ ∂L/∂W.

    Autograd through a loop of ``addcmul(W, δ[i], τ[i])`` would also work, but each ``δ[i]`` select
    scatters its gradient into a zero tensor of δ's full size, so the backward moves T² block-sized
    tensors through memory; here it is one product. Nothing is saved but τ, which is held anyway.
    """

    @staticmethod
    def forward(ctx, start, delta, vectors):
        if delta.shape[0] == 0:
            merged = start.clone()
        else:                      # the first product out of place: no separate copy of ``start``
            merged = torch.addcmul(start, delta[0], vectors[0])
        for position in range(1, delta.shape[0]):
            merged.addcmul_(delta[position], vectors[position])
        ctx.save_for_backward(vectors)
        ctx.delta_shape = delta.shape
        return merged

    @staticmethod
    def backward(ctx, grad):
        (vectors,) = ctx.saved_tensors
        grad_delta = vectors * grad
        if ctx.delta_shape != grad_delta.shape:      # one λ per task and tensor: sum over the elements
            dims = [d for d, size in enumerate(ctx.delta_shape) if size == 1 and grad_delta.shape[d] != 1]
            grad_delta = grad_delta.sum(dims, keepdim=True)
        return None, grad_delta, None


def combine(start: torch.Tensor, delta: torch.Tensor, vectors: torch.Tensor) -> torch.Tensor:
    """``start + Σ_i delta[i] * vectors[i]`` (task by task, in that order: at δ = 0 the result is
    ``start`` bit for bit), differentiable in ``delta``; ``delta`` is (T, *shape) or (T, 1, ..., 1)."""
    return _Combine.apply(start, delta, vectors)


