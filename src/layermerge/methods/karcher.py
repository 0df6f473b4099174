"""Karcher mean (Wang, Ye & Yin, 2026): the experts' directions averaged on the sphere, their norms averaged.

Per tensor, each expert is split into a norm and a unit direction. The direction of the merge is the
weighted Karcher (Fréchet) mean of the unit directions on the hypersphere: the point minimising the
weighted sum of squared geodesic distances, found by the fixed-point iteration

    v = Σ_i α_i · θ_i / sin θ_i · (u_i − cos θ_i · m),   m ← cos|v| · m + sin|v| · v/|v|,

where θ_i is the angle between m and u_i, starting from the normalised weighted mean of the
directions. The merged tensor is that direction times the weighted mean of the norms, so unlike
averaging it never shrinks the weights when the experts disagree. Expert weights, not task vectors,
are averaged (no base needed), as in mergekit's ``karcher``.
"""

from __future__ import annotations

import math

import torch
from pydantic import Field

from layermerge.methods.base import DataFreeMethod
from layermerge.methods.registry import MethodParams, register


def karcher_mean(tensors: list[torch.Tensor], weights: list[float], max_iter: int, tol: float) -> torch.Tensor:
    """The weighted Karcher mean of the tensors' directions, scaled by their weighted mean norm.

    Tensors whose norm is at most ``tol`` take no part in the direction (their weights are dropped
    and the rest renormalised) but still count in the norm. Stops when the tangent step is below
    ``tol`` or after ``max_iter`` steps.
    """
    norms = [float(torch.linalg.vector_norm(t)) for t in tensors]
    scale = sum(w * n for w, n in zip(weights, norms))
    usable = [i for i, n in enumerate(norms) if n > tol]
    if not usable:
        return torch.zeros_like(tensors[0])
    total = sum(weights[i] for i in usable)
    alphas = [weights[i] / total for i in usable]
    units = [tensors[i].reshape(-1) / norms[i] for i in usable]

    mean = sum(alpha * unit for alpha, unit in zip(alphas, units))
    mean_norm = float(torch.linalg.vector_norm(mean))
    mean = units[0].clone() if mean_norm < tol else mean / mean_norm
    for _ in range(max_iter):
        tangent = torch.zeros_like(mean)
        for alpha, unit in zip(alphas, units):
            cos = max(-1.0, min(1.0, float(torch.dot(mean, unit))))
            angle = math.acos(cos)
            if angle < tol:
                continue
            tangent += (alpha * angle / math.sin(angle)) * (unit - cos * mean)
        step = float(torch.linalg.vector_norm(tangent))
        if step < tol:
            break
        mean = math.cos(step) * mean + (math.sin(step) / step) * tangent
        length = float(torch.linalg.vector_norm(mean))
        if length > tol:
            mean = mean / length
    return (scale * mean).reshape(tensors[0].shape)


@register("karcher", summary="Karcher mean: the experts' directions averaged on the sphere, times their mean "
                             "norm (Wang et al. 2026)", needs_base=False)
class Karcher(DataFreeMethod):
    class Params(MethodParams):
        max_iter: int = Field(10, ge=0, description="most fixed-point steps per tensor (mergekit: 10)")
        tol: float = Field(1e-5, gt=0.0, description="stop when the tangent step is below this; norms at or "
                                                     "below it leave a tensor out of the direction")

    def merge_tensor(self, key, base, experts):
        if len(experts) == 1:
            return experts[0]
        weights = [1.0 / len(experts)] * len(experts)
        return karcher_mean(experts, weights, self.params.max_iter, self.params.tol)
