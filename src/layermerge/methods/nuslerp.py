"""SLERP on task vectors (mergekit's NuSLERP) and its N-model generalisation (Multi-SLERP).

``slerp`` interpolates two whole models. With a base these interpolate the *task vectors* instead, so
the merge moves along the arc between the two fine-tuning directions and keeps their length, and
``nuslerp`` can treat each slice along the last (or first) axis as its own vector instead of the
whole tensor. ``multislerp`` takes
any number of experts: it maps their unit directions to the tangent plane at their weighted mean
direction, averages there, maps back with the exponential map and scales by the weighted mean norm.
Without a base both act on the experts' weights.
"""

from __future__ import annotations

import torch
from pydantic import Field

from layermerge.errors import ConfigError
from layermerge.methods.base import DataFreeMethod
from layermerge.methods.registry import MethodParams, register

UNIT_EPS = 1e-7          # norms are floored at this before dividing
COLINEAR_EPS = 1e-8      # 1 − cos² ≤ this² counts as colinear: interpolate linearly


def unit_rows(values: torch.Tensor) -> torch.Tensor:
    return values / values.norm(dim=-1, keepdim=True).clamp(min=UNIT_EPS)


def slerp_rows(t: float, first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """Spherical interpolation of each row (last axis) of two equal-shape tensors; linear where colinear."""
    cos = (unit_rows(first) * unit_rows(second)).sum(dim=-1, keepdim=True).clamp(-1.0, 1.0)
    colinear = (1 - cos * cos) <= COLINEAR_EPS ** 2
    angle = torch.acos(torch.where(colinear, torch.zeros_like(cos), cos))
    sine = torch.where(colinear, torch.ones_like(angle), torch.sin(angle))
    spherical = (torch.sin((1 - t) * angle) * first + torch.sin(t * angle) * second) / sine
    return torch.where(colinear, (1 - t) * first + t * second, spherical)


def interpolation_weights(weights: list[float] | None, count: int) -> list[float]:
    weights = list(weights) if weights is not None else [1.0] * count
    if len(weights) != count:
        raise ConfigError(f"need {count} weights, one per expert, got {len(weights)}")
    return weights


@register("nuslerp", summary="SLERP between two experts' task vectors (or weights without a base), per "
                             "tensor or per row (mergekit's nuslerp)", min_experts=2, max_experts=2,
          needs_base=False)
class NuSlerp(DataFreeMethod):
    class Params(MethodParams):
        weights: list[float] | None = Field(None, description="relative weights of the two experts; the "
                                            "position is t = w2 / (w1 + w2) (default 0.5)")
        flatten: bool = Field(True, description="the whole tensor is one vector (mergekit's default); "
                                                "otherwise each slice along the last axis is one")
        row_wise: bool = Field(False, description="without flatten: the vectors run along the first axis "
                                                  "instead (mergekit's nuslerp_row_wise)")

    def __init__(self, params, task_names):
        super().__init__(params, task_names)
        first, second = interpolation_weights(params.weights, 2)
        self.t = 0.5 if abs(first + second) < 1e-6 else second / (first + second)

    def merge_tensor(self, key, base, experts):
        first, second = experts if base is None else [expert - base for expert in experts]
        shape = first.shape
        if self.params.flatten or first.dim() < 2:
            merged = slerp_rows(self.t, first.reshape(-1), second.reshape(-1)).reshape(shape)
        elif self.params.row_wise:
            merged = slerp_rows(self.t, first.transpose(0, -1), second.transpose(0, -1)).transpose(0, -1)
        else:
            merged = slerp_rows(self.t, first, second)
        return merged if base is None else base + merged


@register("multislerp", summary="spherical barycentre of N experts' task vectors (or weights without a base) "
                                "through the tangent plane at their mean direction", needs_base=False)
class MultiSlerp(DataFreeMethod):
    class Params(MethodParams):
        weights: list[float] | None = Field(None, description="one weight per expert (default equal)")
        normalize_weights: bool = Field(True, description="divide the weights by their sum")
        eps: float = Field(1e-8, gt=0.0, description="added to norms before dividing")

    def __init__(self, params, task_names):
        super().__init__(params, task_names)
        weights = interpolation_weights(params.weights, len(task_names))
        total = sum(weights)
        if params.normalize_weights and abs(total) < 1e-12:
            raise ConfigError(f"multislerp: the weights {weights} sum to 0 and cannot be normalised")
        self.weights = [w / total for w in weights] if params.normalize_weights else weights

    def merge_tensor(self, key, base, experts):
        if len(experts) == 1:
            return experts[0]
        eps = self.params.eps
        points = torch.stack([e.reshape(-1) for e in experts] if base is None
                             else [(e - base).reshape(-1) for e in experts])
        weights = torch.tensor(self.weights, dtype=points.dtype).unsqueeze(1)
        norms = points.norm(dim=1, keepdim=True)
        units = points / (norms + eps)
        mean = (units * weights).sum(0)
        mean_norm = mean.norm()
        if bool((norms <= eps).all()):                         # no expert changed this tensor (a LoRA
            merged = torch.zeros_like(points[0])               # expert's embeddings): nothing to move
        elif mean_norm < eps:
            if len(experts) != 2:
                raise ConfigError(f"multislerp: the weighted directions of {key!r} cancel out (antipodal "
                                  "task vectors with balancing weights); choose other weights")
            merged = (points * weights).sum(0)                 # two antipodal points: the linear mix
        else:
            mean = mean / mean_norm
            tangents = units - (units * mean).sum(1, keepdim=True) * mean
            step = (tangents * weights).sum(0)
            length = step.norm() + eps
            merged = (mean * torch.cos(length) + step * (torch.sin(length) / length)) * (norms * weights).sum()
        merged = merged.reshape(experts[0].shape)
        return merged if base is None else base + merged
