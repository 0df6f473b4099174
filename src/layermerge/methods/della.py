"""DELLA-Merging (Deep, Bhardwaj & Poria, 2024): drop by magnitude rank (MAGPRUNE), elect sign, fuse.

MAGPRUNE differs from DARE only in its drop probabilities: within each row of a task vector, entries
are ranked by |τ| and the smallest get the highest drop probability. With drop rate p and window ε,
the drop probability runs linearly from p + ε (smallest |τ| in the row) down to p − ε (largest);
the survivors are divided by their own keep probability 1 − p_i, so E[τ̃] = τ entry by entry.
``della`` then elects signs and takes TIES' disjoint mean; ``della_linear`` adds the sparse vectors
(Task Arithmetic). The masks come from the (seed, tensor, task) generators DARE uses, with DARE's
draw, so with ε = 0 both equal DARE exactly.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, model_validator

from layermerge.methods.base import DataFreeMethod, task_vectors
from layermerge.methods.ops import disjoint_mean, key_generator
from layermerge.methods.registry import MethodParams, register


def magprune_drop_probability(tau: torch.Tensor, drop_rate: float, epsilon: float) -> torch.Tensor:
    """Per entry, the probability MAGPRUNE drops it: p + ε − 2ε · (rank − 1)/(n − 1) within its row.

    Rows are the first axis (a 1-D tensor is one row); ranks ascend with |τ|, and among equal
    magnitudes the lower column index ranks lower, as a stable sort orders them. A row of one entry
    gets the middle probability p.
    """
    rows = tau.reshape(1, -1) if tau.dim() < 2 else tau.reshape(tau.shape[0], -1)
    width = rows.shape[1]
    if width < 2 or epsilon == 0:
        return torch.full(tau.shape, drop_rate, dtype=tau.dtype)
    order = torch.argsort(rows.abs(), dim=1, stable=True)
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(width).expand_as(order))
    position = ranks.to(tau.dtype) / (width - 1)           # 0 for the smallest |τ|, 1 for the largest
    return ((drop_rate + epsilon) - 2.0 * epsilon * position).reshape(tau.shape)


def rescale_l1(tau: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """Scale the sparse ``kept`` so its L1 norm equals τ's (mergekit's ``rescale`` convention)."""
    before, after = float(tau.abs().sum()), float(kept.abs().sum())
    if before < 1e-7 or after < 1e-7:
        return kept
    return kept * (before / after)


class _Della(DataFreeMethod):
    """MAGPRUNE for every task vector of a tensor; subclasses decide how the sparse vectors combine."""

    class Params(MethodParams):
        drop_rate: float = Field(0.3, gt=0.0, lt=1.0, description="p, the mean drop probability (DELLA's "
                                 "README example: 0.3)")
        epsilon: float = Field(0.07, ge=0.0, description="ε, half the window of drop probabilities: p ± ε "
                               "(the README's window 0.14)")
        scaling: float = Field(1.0, description="λ on the merged task vector (the README's example: 1.1)")
        rescale: Literal["probability", "l1", "none"] = Field(
            "probability", description="survivors ÷ their keep probability (the paper), to the task vector's "
                                       "L1 norm (mergekit), or not at all")
        seed: int = Field(0, description="seed of the masks (derived per tensor and task)")

        @model_validator(mode="after")
        def window_inside_unit_interval(self):
            if self.epsilon >= min(self.drop_rate, 1.0 - self.drop_rate):
                raise ValueError(f"epsilon {self.epsilon} must be below min(drop_rate, 1 − drop_rate) = "
                                 f"{min(self.drop_rate, 1.0 - self.drop_rate):g}, so every keep probability "
                                 "lies strictly between 0 and 1")
            return self

    def __init__(self, params, task_names):
        super().__init__(params, task_names)
        self.kept = [0] * len(task_names)
        self.total = 0

    def sparse_task_vectors(self, key: str, base: torch.Tensor, experts: list[torch.Tensor]) -> torch.Tensor:
        """τ̃_i for every task: MAGPRUNE's random mask, then the chosen rescale; shape (T, *tensor)."""
        p = self.params
        tau = task_vectors(base, experts)
        for index, (task, t) in enumerate(zip(self.task_names, tau)):
            drop = magprune_drop_probability(t, p.drop_rate, p.epsilon)
            # DARE's draw (keep where U[0,1) ≥ drop probability): with ε = 0 the masks are DARE's.
            keep = torch.rand(t.shape, generator=key_generator(p.seed, key, task)) >= drop
            self.kept[index] += int(keep.sum())
            kept = t * keep
            if p.rescale == "probability":
                kept = kept / (1.0 - drop)
            elif p.rescale == "l1":
                kept = rescale_l1(t, kept)
            tau[index] = kept
        self.total += base.numel()
        return tau

    def summary(self):
        return {"kept_fraction": {t: k / max(self.total, 1) for t, k in zip(self.task_names, self.kept)}}


@register("della", summary="DELLA: magnitude-ranked random drop (MAGPRUNE), rescale, elect sign, disjoint mean")
class Della(_Della):
    def merge_tensor(self, key, base, experts):
        return base + disjoint_mean(self.sparse_task_vectors(key, base, experts)) * self.params.scaling


@register("della_linear", summary="DELLA's MAGPRUNE drop and rescale, then Task Arithmetic: θ0 + λ Σ τ̃_i")
class DellaLinear(_Della):
    class Params(_Della.Params):
        scaling: float = Field(0.3, description="λ on the summed sparse task vectors (Task Arithmetic's, as "
                                                "dare_linear)")

    def merge_tensor(self, key, base, experts):
        return base + self.sparse_task_vectors(key, base, experts).sum(0) * self.params.scaling
