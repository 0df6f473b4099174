"""TSV-Merge (Gargiulo et al., CVPR 2025, "Task Singular Vectors: Reducing Task Interference in
Model Merging"), per weight matrix.

For a matrix with T task vectors τ_i = U_i Σ_i V_iᵀ (r = min(m, n), k = ⌊r/T⌋):

1. keep each task's top k components: Û_i = U_i[:, :k], Σ̂_i, V̂_i;
2. gather them: U = [Û_1 … Û_T], Σ = diag(Σ̂_1 … Σ̂_T), V = [V̂_1 … V̂_T];
3. decorrelate: replace U and V by their polar factors (closest orthogonal matrices) U⊥, V⊥;
4. merged = U⊥ Σ V⊥ᵀ, θ = θ0 + α·merged.

Keeping 1/T of each task makes the gathered U square-or-smaller (T·k ≤ r), so the orthogonalisation
only removes the overlap between tasks' subspaces: if the tasks' row and column spaces are already
mutually orthogonal, step 3 changes nothing and TSV-M equals Task Arithmetic with λ = α.

A 1×1 convolution counts as the (out, in) matrix of its map (``spectral.matrix_view``). Every other
tensor (1-D, spatial conv kernels, scalars) gets the mean task vector, θ0 + α·mean_i τ_i, as in
the released code. A matrix too small to give every task one component (r < T) also takes the mean;
the released code keeps zero components there and leaves the weight at θ0.
"""

from __future__ import annotations

import torch
from pydantic import Field

from layermerge.methods.base import DataFreeMethod
from layermerge.methods.registry import MethodParams, register
from layermerge.methods.spectral import (
    add_scaled,
    matrix_view,
    mean_task_vector,
    numerical_rank,
    polar_factor,
    thin_svd,
)


def tsv_merge(base: torch.Tensor, experts: list[torch.Tensor], keep: int) -> torch.Tensor:
    """The merged task matrix U⊥ Σ V⊥ᵀ (float64) from each task's top ``keep`` singular components.

    One task's SVD is held at a time and cut to ``keep`` components at once, so the peak is one
    full SVD plus the r gathered columns, not T full SVDs.
    """
    base64 = base.to(torch.float64)
    lefts, values, rights = [], [], []
    for expert in experts:
        left, singular, right = thin_svd(expert.to(torch.float64) - base64)
        # Copies, not views: a view would keep the whole m × r factor alive until the end.
        lefts.append(left[:, :keep].clone())
        values.append(singular[:keep].clone())
        rights.append(right[:keep].clone())
        del left, singular, right
    # Components at rounding-noise level carry arbitrary singular vectors that would still steer
    # the orthogonalisation; drop them (one scale for all tasks: the largest singular value).
    scale = max(float(s[0]) for s in values)
    kept = [numerical_rank(s, scale, tuple(base.shape)) for s in values]
    if sum(kept) == 0:
        return torch.zeros_like(base64)
    left = torch.cat([u[:, :c] for u, c in zip(lefts, kept)], dim=1)
    sigma = torch.cat([s[:c] for s, c in zip(values, kept)])
    right = torch.cat([v[:c] for v, c in zip(rights, kept)], dim=0)
    return (polar_factor(left) * sigma) @ polar_factor(right)


@register("tsv_m", summary="TSV-Merge: per matrix keep each task's top 1/T singular vectors, orthogonalise, "
                           "θ0 + α·U⊥ΣV⊥ᵀ (Gargiulo et al. 2025)")
class TaskSingularVectorsMerge(DataFreeMethod):
    class Params(MethodParams):
        scaling: float = Field(
            1.0, description="α on the merged task vector (FusionBench default 1.0; the paper tunes it on validation)")

    def __init__(self, params, task_names):
        super().__init__(params, task_names)
        self.counts = {"spectral": 0, "mean": 0, "mean_rank_below_tasks": 0}

    def merge_tensor(self, key, base, experts):
        matrix = matrix_view(base)
        keep = min(matrix.shape) // len(experts) if matrix is not None else 0
        if keep == 0:
            self.counts["mean_rank_below_tasks" if matrix is not None else "mean"] += 1
            return add_scaled(base, mean_task_vector(base, experts), self.params.scaling)
        self.counts["spectral"] += 1
        merged = tsv_merge(matrix, [matrix_view(expert) for expert in experts], keep)
        return add_scaled(base, merged.reshape(base.shape), self.params.scaling)

    def summary(self):
        return {"tensors": dict(self.counts)}
