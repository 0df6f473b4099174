"""Isotropic merging (Marczak et al., ICML 2025, "No Task Left Behind: Isotropic Model Merging with
Common and Task-Specific Subspaces"), per weight matrix.

Both methods start from the Task Arithmetic matrix M = Σ_i τ_i = U Σ Vᵀ (r = min(m, n)), whose
spectrum is dominated by a few directions shared by the tasks. Flattening it gives every direction
the same weight, so the directions that matter to only one task are no longer drowned out.

ISO-C:   merged = σ̄ · U Vᵀ with σ̄ the mean of M's singular values; θ = θ0 + α·merged.

ISO-CTS: the common subspace is M's top k directions, with k = r − T·s and s = round((r − ⌊f·r⌋)/T)
         (f = ``common_space_fraction``, so the task-specific part divides evenly among the T tasks).
         Each task contributes the top s directions of its residual τ_i − U_k U_kᵀ τ_i (its task
         vector with the common column space removed). The k + T·s gathered left and right vectors
         are orthogonalised (polar factors U⊥, V⊥, as in TSV-M); merged = σ̄ · U⊥ V⊥ᵀ with σ̄ the mean
         of the gathered singular values; θ = θ0 + α·merged. f = 1 gives ISO-C.

Every other tensor (1-D, conv kernels, scalars) gets θ0 + α·mean_i τ_i, as in the released code.
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
    summed_task_vector,
    thin_svd,
)

ALPHA_HELP = ("α on the merged task vector; the paper picks it on validation data from 0.1–3.0, "
              "1.5 is what FusionBench's published CLIP runs use")


def iso_c_merge(base: torch.Tensor, experts: list[torch.Tensor]) -> torch.Tensor:
    """σ̄ · U Vᵀ from the SVD of M = Σ τ_i (float64); σ̄ is the mean of M's nonzero singular values."""
    left, values, right = thin_svd(summed_task_vector(base, experts))
    rank = numerical_rank(values, float(values[0]), tuple(base.shape))
    if rank == 0:
        return torch.zeros(base.shape, dtype=torch.float64)
    return values[:rank].mean() * (left[:, :rank] @ right[:rank])


def iso_cts_split(rank: int, tasks: int, common_space_fraction: float) -> tuple[int, int]:
    """(k common directions, s directions per task) with k + T·s = r, as the released code sizes them.

    Python's round (half to even) as there; s is capped at ⌊r/T⌋ so that k never goes negative,
    which the released code can do when f is small and T large.
    """
    common = int(rank * common_space_fraction)
    per_task = min(round((rank - common) / tasks), rank // tasks)
    return rank - tasks * per_task, per_task


def iso_cts_merge(base: torch.Tensor, experts: list[torch.Tensor], common_space_fraction: float) -> torch.Tensor:
    """σ̄ · U⊥ V⊥ᵀ over M's top-k common directions and each task's top-s residual directions (float64)."""
    common, per_task = iso_cts_split(min(base.shape), len(experts), common_space_fraction)
    left, values, right = thin_svd(summed_task_vector(base, experts))
    # Copies, not views, so that M's full factors are freed before the T residual SVDs.
    lefts, sigmas, rights = [left[:, :common].clone()], [values[:common].clone()], [right[:common].clone()]
    del left, values, right
    if per_task:
        base64 = base.to(torch.float64)
        common_left = lefts[0]
        for expert in experts:
            tau = expert.to(torch.float64) - base64
            residual = tau - common_left @ (common_left.T @ tau)
            del tau
            u, s, v = thin_svd(residual)
            lefts.append(u[:, :per_task].clone())
            sigmas.append(s[:per_task].clone())
            rights.append(v[:per_task].clone())
            del residual, u, s, v
    # Drop components at rounding-noise level (their vectors are arbitrary; see ``spectral``), with
    # one scale for the whole family: the largest singular value of M or of any residual.
    scale = max((float(s[0]) for s in sigmas if s.numel()), default=0.0)
    kept = [numerical_rank(s, scale, tuple(base.shape)) for s in sigmas]
    if sum(kept) == 0:
        return torch.zeros(base.shape, dtype=torch.float64)
    left = torch.cat([u[:, :c] for u, c in zip(lefts, kept)], dim=1)
    right = torch.cat([v[:c] for v, c in zip(rights, kept)], dim=0)
    mean_sigma = torch.cat([s[:c] for s, c in zip(sigmas, kept)]).mean()
    return mean_sigma * (polar_factor(left) @ polar_factor(right))


class IsotropicMerge(DataFreeMethod):
    """What ISO-C and ISO-CTS share: the mean task vector off the matrices, α, the summary."""

    def __init__(self, params, task_names):
        super().__init__(params, task_names)
        self.counts = {"spectral": 0, "mean": 0}

    def merged_matrix(self, base: torch.Tensor, experts: list[torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    def merge_tensor(self, key, base, experts):
        matrix = matrix_view(base)
        if matrix is None:
            self.counts["mean"] += 1
            return add_scaled(base, mean_task_vector(base, experts), self.params.scaling)
        self.counts["spectral"] += 1
        merged = self.merged_matrix(matrix, [matrix_view(expert) for expert in experts])
        return add_scaled(base, merged.reshape(base.shape), self.params.scaling)

    def summary(self):
        return {"tensors": dict(self.counts)}


@register("iso_c", summary="ISO-C: per matrix flatten the spectrum of Σ_i τ_i to its mean singular value, "
                           "θ0 + α·σ̄UVᵀ (Marczak et al. 2025)")
class IsoC(IsotropicMerge):
    class Params(MethodParams):
        scaling: float = Field(1.5, description=ALPHA_HELP)

    def merged_matrix(self, base, experts):
        return iso_c_merge(base, experts)


@register("iso_cts", summary="ISO-CTS: common top directions of Σ_i τ_i plus each task's own residual "
                             "directions, orthogonalised, flat spectrum (Marczak et al. 2025)")
class IsoCTS(IsotropicMerge):
    class Params(MethodParams):
        scaling: float = Field(1.5, description=ALPHA_HELP)
        common_space_fraction: float = Field(
            0.8, ge=0.0, le=1.0,
            description="share of each matrix's rank given to the common subspace of Σ_i τ_i (paper: 0.8)")

    def merged_matrix(self, base, experts):
        return iso_cts_merge(base, experts, self.params.common_space_fraction)
