"""Consensus merging with TALL masks (Wang et al., ICML 2024, "Localizing Task Information...").

Per task a TALL mask marks the entries where the task's own vector dominates what the other
tasks add: m_t = |τ_t| ≥ λ_t·|τ_MTL − τ_t| with τ_MTL = Σ_j τ_j. Entries active in fewer than
``min_agreement`` masks are "selfish" (one task) or "catastrophic" (none) and are removed from
the Task Arithmetic sum: θ = θ0 + α Σ_t (m_cons ⊙ τ_t). Everything is element-wise, so streaming
per tensor gives exactly the whole-model result.
"""

from __future__ import annotations

from pydantic import Field

from layermerge.errors import ConfigError
from layermerge.methods.base import DataFreeMethod, task_vectors
from layermerge.methods.registry import MethodParams, register


@register("consensus", summary="Consensus TA: keep entries active in ≥k TALL masks |τ_t| ≥ λ|Σ_j τ_j − τ_t|",
          min_experts=2)
class Consensus(DataFreeMethod):
    class Params(MethodParams):
        tall_lambda: float = Field(0.4, ge=0.0,
                                   description="λ_t of the TALL masks (paper: chosen per task in [0.2, 0.6])")
        min_agreement: int = Field(2, ge=0, description="k: keep entries active in at least k task masks")
        scaling: float = Field(0.3, description="α on the masked summed task vectors (Task Arithmetic's)")

    def __init__(self, params, task_names):
        super().__init__(params, task_names)
        if params.min_agreement > len(task_names):
            raise ConfigError(
                f"consensus: min_agreement={params.min_agreement} exceeds the number of experts "
                f"({len(task_names)}), so every entry would be dropped; use at most {len(task_names)}")
        self.kept = 0
        self.total = 0

    def merge_tensor(self, key, base, experts):
        tau = task_vectors(base, experts)
        multi = tau.sum(0)
        tall = tau.abs() >= self.params.tall_lambda * (multi - tau).abs()
        consensus = tall.sum(0) >= self.params.min_agreement
        self.kept += int(consensus.sum())
        self.total += base.numel()
        return base + self.params.scaling * (tau * consensus).sum(0)

    def summary(self):
        return {"kept_fraction": self.kept / max(self.total, 1)}
