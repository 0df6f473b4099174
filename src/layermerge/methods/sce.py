"""SCE (Wan et al., FuseChat-2.0, 2024): select by variance, calculate weights, erase sign conflicts.

Per tensor: keep the entries where the task vectors disagree most (the ``select_topk`` fraction of
entries with nonzero variance across tasks, largest variance first), weight each task by the mean
square of its (selected) task vector relative to the other tasks', keep only the entries whose
sign agrees with TIES' elected sign, and take the weighted mean of what remains:

    θ = θ0 + Σ_i w_i m_i τ_i / Σ_i w_i m_i,   w_i = mean(τ_i²) / Σ_j mean(τ_j²).

No scaling coefficient: the result is on the scale of one task vector, like TIES' disjoint mean.
"""

from __future__ import annotations

import torch
from pydantic import Field

from layermerge.methods.base import DataFreeMethod, task_vectors
from layermerge.methods.ops import elect_sign
from layermerge.methods.radix_select import largest_mask
from layermerge.methods.registry import MethodParams, register

WEIGHT_FLOOR = 1e-6      # Σ_i w_i m_i below this divides by this (entries nobody keeps stay 0)


def variance_mask(tau: torch.Tensor, fraction: float) -> torch.Tensor:
    """The ⌊fraction · (entries with nonzero variance)⌋ entries of largest variance across tasks."""
    if fraction >= 1:
        return torch.ones(tau.shape[1:], dtype=torch.bool)
    variance = tau.var(dim=0, unbiased=False)
    count = int(int(torch.count_nonzero(variance)) * fraction)
    return largest_mask(variance, count)


def task_weights(tau: torch.Tensor) -> torch.Tensor:
    """w_i = mean(τ_i²) / Σ_j mean(τ_j²), uniform when every task vector is (nearly) zero."""
    energy = tau.square().reshape(tau.shape[0], -1).mean(dim=1)
    total = float(energy.sum())
    if abs(total) < 1e-6:
        return torch.full_like(energy, 1.0 / tau.shape[0])
    return energy / total


@register("sce", summary="SCE: select high-variance entries, weight tasks by mean τ², erase minority signs, "
                         "weighted mean (FuseChat-2.0)")
class Sce(DataFreeMethod):
    class Params(MethodParams):
        select_topk: float = Field(1.0, ge=0.0, le=1.0, description="fraction of entries kept by variance "
                                   "across tasks (mergekit's default 1: keep all)")

    def __init__(self, params, task_names):
        super().__init__(params, task_names)
        self.selected = 0
        self.total = 0

    def merge_tensor(self, key, base, experts):
        tau = task_vectors(base, experts)
        selected = variance_mask(tau, self.params.select_topk)
        self.selected += int(selected.sum())
        self.total += base.numel()
        tau = tau * selected
        agree = torch.sign(tau) == elect_sign(tau)
        weights = task_weights(tau).reshape(-1, *([1] * (tau.dim() - 1))) * agree
        return base + (tau * weights).sum(0) / weights.sum(0).clamp(min=WEIGHT_FLOOR)

    def summary(self):
        return {"selected_fraction": self.selected / max(self.total, 1)}
