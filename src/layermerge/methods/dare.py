"""DARE (Yu et al., ICML 2024): drop each task-vector entry with probability p, rescale survivors by 1/(1−p).

The mask of a tensor for a task is drawn from a generator seeded by (seed, tensor name, task
name), so it is reproducible and independent of the order tensors and experts are visited in.
``dare_linear`` then adds the sparse vectors (Task Arithmetic); ``dare_ties`` merges them with
TIES' sign election and disjoint mean (no extra magnitude trim, as in mergekit's ``dare_ties``).
"""

from __future__ import annotations

import torch
from pydantic import Field

from layermerge.methods.base import DataFreeMethod, task_vectors
from layermerge.methods.ops import disjoint_mean, key_generator, random_keep_mask
from layermerge.methods.registry import MethodParams, register


class _Dare(DataFreeMethod):
    """Shared drop-and-rescale step."""

    def __init__(self, params, task_names):
        super().__init__(params, task_names)
        self.kept = [0] * len(task_names)
        self.total = 0

    def drop_and_rescale(self, key: str, tau: torch.Tensor) -> torch.Tensor:
        p = self.params.drop_rate
        out = torch.empty_like(tau)
        for index, (task, t) in enumerate(zip(self.task_names, tau)):
            keep = random_keep_mask(t.shape, p, key_generator(self.params.seed, key, task))
            self.kept[index] += int(keep.sum())
            out[index] = t * keep / (1.0 - p)
        self.total += tau[0].numel()
        return out

    def summary(self):
        return {"kept_fraction": {t: k / max(self.total, 1) for t, k in zip(self.task_names, self.kept)}}


@register("dare_linear", summary="DARE then Task Arithmetic: random drop p, rescale 1/(1−p), θ0 + λ Σ τ̃_i")
class DareLinear(_Dare):
    class Params(MethodParams):
        drop_rate: float = Field(0.9, ge=0.0, lt=1.0, description="p, probability of dropping each τ entry")
        seed: int = Field(0, description="seed of the drop masks (derived per tensor and task)")
        scaling: float = Field(0.3, description="λ on the summed sparse task vectors (Task Arithmetic's)")

    def merge_tensor(self, key, base, experts):
        return base + self.params.scaling * self.drop_and_rescale(key, task_vectors(base, experts)).sum(0)


@register("dare_ties", summary="DARE then TIES: random drop p, rescale 1/(1−p), elect sign, disjoint mean")
class DareTies(_Dare):
    class Params(MethodParams):
        drop_rate: float = Field(0.9, ge=0.0, lt=1.0, description="p, probability of dropping each τ entry")
        seed: int = Field(0, description="seed of the drop masks (derived per tensor and task)")
        scaling: float = Field(1.0, description="λ on the merged (disjoint-mean) task vector (TIES')")

    def merge_tensor(self, key, base, experts):
        sparse = self.drop_and_rescale(key, task_vectors(base, experts))
        return base + disjoint_mean(sparse) * self.params.scaling
