"""SLERP between exactly two models, per tensor (the whole tensor is one vector).

θ = sin((1−t)Ω)/sin Ω · a + sin(tΩ)/sin Ω · b, with cos Ω the cosine between the flattened
tensors a and b. When the two are nearly colinear (|cos Ω| > 0.9995, mergekit's threshold) or
either is (nearly) zero (norm ≤ 1e-8), the angle is ill-defined and linear interpolation is used.
"""

from __future__ import annotations

import math

import torch
from pydantic import Field

from layermerge.methods.base import DataFreeMethod
from layermerge.methods.registry import MethodParams, register

DOT_THRESHOLD = 0.9995
NORM_EPS = 1e-8


def slerp(t: float, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Spherical interpolation from a (t=0) to b (t=1); linear when the angle is ill-defined."""
    norm_a, norm_b = float(a.norm()), float(b.norm())
    if norm_a <= NORM_EPS or norm_b <= NORM_EPS:
        return (1 - t) * a + t * b
    cos = max(-1.0, min(1.0, float(((a / norm_a) * (b / norm_b)).sum())))
    if abs(cos) > DOT_THRESHOLD:
        return (1 - t) * a + t * b
    omega = math.acos(cos)
    sin_omega = math.sin(omega)
    return (math.sin((1 - t) * omega) / sin_omega) * a + (math.sin(t * omega) / sin_omega) * b


@register("slerp", summary="spherical interpolation of two experts per tensor (t=0: first, t=1: second)",
          min_experts=2, max_experts=2, needs_base=False)
class Slerp(DataFreeMethod):
    class Params(MethodParams):
        t: float = Field(0.5, ge=0.0, le=1.0, description="position: 0 = first expert, 1 = second expert")

    def merge_tensor(self, key, base, experts):
        return slerp(self.params.t, experts[0], experts[1])
