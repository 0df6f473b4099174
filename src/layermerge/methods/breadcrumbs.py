"""Model Breadcrumbs (Davari & Belilovsky, ECCV 2024): drop both tails of each task vector, per tensor.

Per tensor and task, the largest ``top_drop`` fraction of |τ_i| (outliers) and the smallest
``bottom_drop`` fraction (noise) are masked out; the band in between is kept. ``breadcrumbs``
then adds the masked vectors (Task Arithmetic); ``breadcrumbs_ties`` merges them with TIES' sign
election and disjoint mean.
"""

from __future__ import annotations

import torch
from pydantic import Field, model_validator

from layermerge.methods.base import DataFreeMethod, task_vectors
from layermerge.methods.ops import band_keep_mask, disjoint_mean
from layermerge.methods.registry import MethodParams, register


class _BreadcrumbsParams(MethodParams):
    top_drop: float = Field(0.01, ge=0.0, le=1.0,
                            description="β, fraction of largest-|τ| entries dropped per tensor")
    bottom_drop: float = Field(0.9, ge=0.0, le=1.0,
                               description="γ, fraction of smallest-|τ| entries dropped per tensor")

    @model_validator(mode="after")
    def _leaves_something(self):
        if self.top_drop + self.bottom_drop > 1.0:
            raise ValueError(f"top_drop + bottom_drop must be at most 1, got {self.top_drop} + "
                             f"{self.bottom_drop}; lower one of them")
        return self


class _Breadcrumbs(DataFreeMethod):
    def masked(self, base: torch.Tensor, experts: list[torch.Tensor]) -> torch.Tensor:
        tau = task_vectors(base, experts)
        masks = [band_keep_mask(t, self.params.top_drop, self.params.bottom_drop) for t in tau]
        return tau * torch.stack(masks)


@register("breadcrumbs", summary="Model Breadcrumbs: per tensor drop the top β, bottom γ of |τ|; θ0 + λ Σ")
class Breadcrumbs(_Breadcrumbs):
    class Params(_BreadcrumbsParams):
        scaling: float = Field(0.3, description="λ on the summed masked task vectors (Task Arithmetic's)")

    def merge_tensor(self, key, base, experts):
        return base + self.params.scaling * self.masked(base, experts).sum(0)


@register("breadcrumbs_ties", summary="Model Breadcrumbs masks, then TIES sign election and disjoint mean")
class BreadcrumbsTies(_Breadcrumbs):
    class Params(_BreadcrumbsParams):
        scaling: float = Field(1.0, description="λ on the merged (disjoint-mean) task vector (TIES')")

    def merge_tensor(self, key, base, experts):
        return base + disjoint_mean(self.masked(base, experts)) * self.params.scaling
