"""Model Stock (Jang, Yun & Han, ECCV 2024): pull the experts' average back toward the base by their angle.

Fine-tuned weights of one pretrained model lie near a thin shell around a centre; Model Stock
estimates that centre from the angle between task vectors alone. With N experts and cos θ the mean
pairwise cosine between their task vectors (per tensor, or per row with ``filter_wise``),

    t = N·cos θ / (1 + (N − 1)·cos θ),     θ = t · mean_i θ_i + (1 − t) · θ0.

Orthogonal task vectors (cos θ = 0) give the base; identical ones (cos θ = 1) give their average.
Where 1 + (N − 1)·cos θ vanishes no finite estimate exists and the base is kept (as mergekit does).
"""

from __future__ import annotations

import torch
from pydantic import Field

from layermerge.methods.base import DataFreeMethod
from layermerge.methods.registry import MethodParams, register

NORM_FLOOR = 1e-6        # |a|·|b| below this counts as this, so zero task vectors give cos θ = 0
SINGULAR = 1e-6          # |1 + (N − 1) cos θ| below this: keep the base


def mean_pairwise_cosine(offsets: list[torch.Tensor]) -> torch.Tensor:
    """Mean cosine over every pair of the (rows of the) offsets, along the last axis."""
    cosines = []
    for index, first in enumerate(offsets):
        for second in offsets[index + 1:]:
            norms = (first.norm(dim=-1) * second.norm(dim=-1)).clamp(min=NORM_FLOOR)
            cosines.append(((first * second).sum(dim=-1) / norms).clamp(-1.0, 1.0))
    return torch.stack(cosines).mean(dim=0)


def interpolation_ratio(cos_theta: torch.Tensor, count: int) -> torch.Tensor:
    """t = N cos θ / (1 + (N − 1) cos θ), and 0 where the denominator vanishes."""
    denominator = 1.0 + (count - 1) * cos_theta
    singular = denominator.abs() < SINGULAR
    return torch.where(singular, torch.zeros_like(cos_theta),
                       count * cos_theta / torch.where(singular, torch.ones_like(denominator), denominator))


@register("model_stock", summary="Model Stock: average of the experts pulled toward the base by their task "
                                 "vectors' angle (Jang et al. 2024)", min_experts=2)
class ModelStock(DataFreeMethod):
    class Params(MethodParams):
        filter_wise: bool = Field(False, description="one ratio per row (output filter) instead of per tensor")

    def __init__(self, params, task_names):
        super().__init__(params, task_names)
        self.ratios: list[float] = []

    def merge_tensor(self, key, base, experts):
        shape = base.shape
        if self.params.filter_wise and base.dim() >= 1:
            rows = 1 if base.dim() == 1 else shape[0]
            flat_base = base.reshape(rows, -1)
            flat = [expert.reshape(rows, -1) for expert in experts]
        else:
            flat_base = base.reshape(-1)
            flat = [expert.reshape(-1) for expert in experts]
        ratio = interpolation_ratio(mean_pairwise_cosine([t - flat_base for t in flat]), len(experts))
        self.ratios.append(float(ratio.mean()))
        average = sum(flat) / len(experts)
        ratio = ratio.unsqueeze(-1) if ratio.dim() else ratio
        return (ratio * average + (1 - ratio) * flat_base).reshape(shape)

    def summary(self):
        if not self.ratios:
            return {}
        return {"mean_ratio": sum(self.ratios) / len(self.ratios), "min_ratio": min(self.ratios),
                "max_ratio": max(self.ratios)}
