"""MagMax (Marczak et al., ECCV 2024): per entry, the task-vector value of largest magnitude."""

from __future__ import annotations

import torch
from pydantic import Field

from layermerge.methods.base import DataFreeMethod, task_vectors
from layermerge.methods.registry import MethodParams, register


@register("magmax", summary="MagMax: per entry the τ_i of largest |τ_i|; θ0 + λ·that (Marczak et al. 2024)")
class MagMax(DataFreeMethod):
    class Params(MethodParams):
        scaling: float = Field(0.5, description="λ on the max-magnitude task vector (released code: 0.5)")

    def merge_tensor(self, key, base, experts):
        tau = task_vectors(base, experts)
        # Equal magnitudes go to the later expert (the released code replaces on >=): flip, take
        # the first maximum, map back.
        last = tau.shape[0] - 1 - torch.flip(tau.abs(), [0]).argmax(0)
        return base + self.params.scaling * torch.gather(tau, 0, last.unsqueeze(0)).squeeze(0)
