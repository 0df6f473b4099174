"""EMR-Merging (Huang et al., NeurIPS 2024): Elect, Mask & Rescale.

Elect a unified task vector τ_uni: sign γ = sign(Σ_i τ_i); magnitude = the largest |τ_i| among
the entries whose sign agrees with γ. Per task keep a binary mask M_t = (τ_t ⊙ τ_uni > 0) and a
scalar rescaler λ_t = Σ|τ_t| / Σ|M_t ⊙ τ_uni| (sums over the whole model). The task-t model is
θ0 + λ_t · M_t ⊙ τ_uni, so inference needs the task id.

Output layout: the main weights are θ0 + τ_uni (usable without a task id); each task's mask is
stored as bool tensors under ``task_extras/<task>/``; the rescalers are in
``layermerge_summary.json`` (``summary.rescalers``). ``layermerge.load_task_model(folder, task)``
rebuilds θ_t from these and the base recorded in ``layermerge.yaml`` (or ``base=``), using
τ_uni = merged − θ0.
"""

from __future__ import annotations

import torch

from layermerge.methods.base import DataFreeMethod, TensorResult, task_vectors
from layermerge.methods.registry import MethodParams, register


def unified_vector(tau: torch.Tensor) -> torch.Tensor:
    """τ_uni from the stacked task vectors (T, ...): elected sign times the largest agreeing magnitude.

    An exact zero Σ_i τ_i elects no sign, so τ_uni is 0 there and no task mask is on.
    """
    sign = torch.sign(tau.sum(0))
    agreeing = (tau * sign).clamp(min=0)  # |τ_i| where τ_i agrees with the elected sign, else 0
    return sign * agreeing.max(0).values


def task_masks(tau: torch.Tensor, unified: torch.Tensor) -> torch.Tensor:
    """M_t = τ_t ⊙ τ_uni > 0, stacked (T, ...) as bool."""
    return tau * unified > 0


def rebuild_task_weight(base: torch.Tensor, merged: torch.Tensor, mask: torch.Tensor,
                        rescaler: float) -> torch.Tensor:
    """θ_t = θ0 + λ_t · M_t ⊙ τ_uni, with τ_uni = merged − θ0 (all in float32)."""
    base = base.to(torch.float32)
    unified = merged.to(torch.float32) - base
    return base + rescaler * (mask.to(torch.bool) * unified)


@register("emr", summary="EMR-Merging: unified τ (elected sign, max agreeing |τ|), task masks + rescalers")
class Emr(DataFreeMethod):
    class Params(MethodParams):
        pass

    stat_passes = 1

    def __init__(self, params, task_names):
        super().__init__(params, task_names)
        self.task_abs = torch.zeros(len(task_names), dtype=torch.float64)
        self.masked_abs = torch.zeros(len(task_names), dtype=torch.float64)
        self.kept = torch.zeros(len(task_names), dtype=torch.float64)
        self.total = 0

    def observe(self, pass_index, key, base, experts):
        tau = task_vectors(base, experts)
        unified = unified_vector(tau)
        masks = task_masks(tau, unified)
        flat = tau.reshape(len(experts), -1)
        self.task_abs += flat.abs().sum(1, dtype=torch.float64)
        self.masked_abs += (masks * unified.abs()).reshape(len(experts), -1).sum(1, dtype=torch.float64)
        self.kept += masks.reshape(len(experts), -1).sum(1).to(torch.float64)
        self.total += base.numel()

    def rescalers(self) -> dict[str, float]:
        """λ_t per task; 0 when the task keeps nothing (its model is then θ0 whatever λ_t is)."""
        values = torch.where(self.masked_abs > 0, self.task_abs / self.masked_abs.clamp(min=1e-300), 0.0)
        return {task: float(v) for task, v in zip(self.task_names, values)}

    def merge_tensor(self, key, base, experts):
        tau = task_vectors(base, experts)
        unified = unified_vector(tau)
        masks = task_masks(tau, unified)
        return TensorResult(base + unified, {task: mask for task, mask in zip(self.task_names, masks)})

    def summary(self):
        density = {t: float(k) / max(self.total, 1) for t, k in zip(self.task_names, self.kept)}
        return {"rescalers": self.rescalers(), "mask_density": density,
                "output": "main weights θ0 + τ_uni; load_task_model(folder, task) gives θ0 + λ_t·M_t⊙τ_uni"}
