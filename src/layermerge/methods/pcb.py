"""PCB-Merging (Du et al., NeurIPS 2024): Parameter Competition Balancing, per tensor.

Scores per task i and entry (softmax and Norm over the entries of the tensor; Norm = min-max to [0,1]):
  intra-balancing  β_intra,i = softmax(T · Norm(τ_i ⊙ τ_i))
  inter-balancing  β_inter,i = Σ_j softmax(Norm(τ_i ⊙ τ_j))          (j over all tasks, i included)
  β_i = β_intra,i ⊙ β_inter,i
Drop: m_i keeps the entries with β_i ≥ the value at rank ⌊(1−r)·n⌋ of the ascending sort (the top r
fraction; ties at the threshold are all kept). Rescale: τ_m = Σ_i m_i β_i τ_i / Σ_i m_i β_i (0 where
nothing is kept); θ = θ0 + λ τ_m. The paper normalises over all parameters of the model at once;
here every tensor is its own population, which keeps the method streamable.
"""

from __future__ import annotations

import math

import torch
from pydantic import Field

from layermerge.methods.base import DataFreeMethod, task_vectors
from layermerge.methods.radix_select import kth_largest_magnitude
from layermerge.methods.registry import MethodParams, register


def minmax_norm(values: torch.Tensor) -> torch.Tensor:
    """Rescale to [0, 1] over all entries; a constant tensor maps to zeros."""
    low, high = values.min(), values.max()
    if high <= low:
        return torch.zeros_like(values)
    return (values - low) / (high - low)


def scaled_softmax(values: torch.Tensor) -> torch.Tensor:
    """n · softmax over all n entries (exp(x − logsumexp x + log n)).

    The factor n is common to every task at a given tensor, so it changes neither the per-task
    ranking nor the ratio Σ m β τ / Σ m β; it only keeps the scores near 1 instead of 1/n² for
    large tensors, away from float32 underflow.
    """
    flat = values.reshape(-1)
    return torch.exp(flat - torch.logsumexp(flat, 0) + math.log(flat.numel())).reshape(values.shape)


def balance_scores(tau: torch.Tensor) -> torch.Tensor:
    """β_i (times the harmless constant n²) for stacked task vectors of shape (T, ...)."""
    count = tau.shape[0]
    intra = torch.stack([scaled_softmax(count * minmax_norm(t * t)) for t in tau])
    inter = torch.zeros_like(tau)
    for i in range(count):
        for j in range(i, count):
            similarity = scaled_softmax(minmax_norm(tau[i] * tau[j]))
            inter[i] += similarity
            if j != i:
                inter[j] += similarity
    return intra * inter


def top_ratio_mask(scores: torch.Tensor, ratio: float) -> torch.Tensor:
    """m = scores ≥ sorted_ascending(scores)[⌊(1−ratio)·n⌋] (clamped to the last index)."""
    n = scores.numel()
    index = min(n - 1, int((1.0 - ratio) * n))
    # sorted_ascending[index] is the (n − index)-th largest (scores are positive, so |score| = score)
    return scores >= kth_largest_magnitude(scores, n - index)


@register("pcb", summary="PCB-Merging: intra/inter balancing scores, keep top r per task, weighted mean")
class Pcb(DataFreeMethod):
    class Params(MethodParams):
        ratio: float = Field(0.1, gt=0.0, le=1.0,
                             description="r, fraction of entries kept per task and tensor (top scores)")
        scaling: float = Field(1.0, description="λ on the balanced task vector (a weighted mean, like TIES')")

    def merge_tensor(self, key, base, experts):
        tau = task_vectors(base, experts)
        if base.numel() == 0:
            return base.clone()
        scores = balance_scores(tau)
        masks = torch.stack([top_ratio_mask(s, self.params.ratio) for s in scores])
        weights = scores * masks
        total = weights.sum(0)
        merged = (weights * tau).sum(0) / torch.where(total > 0, total, 1.0)
        return base + self.params.scaling * merged
