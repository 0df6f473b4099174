"""The two simplest methods: weight averaging and Task Arithmetic."""

from __future__ import annotations

from pydantic import Field

from layermerge.errors import ConfigError
from layermerge.methods.base import DataFreeMethod
from layermerge.methods.registry import MethodParams, register


@register("average", summary="θ = mean_i θ_i (model soup / uniform weight averaging)", needs_base=False)
class WeightAveraging(DataFreeMethod):
    class Params(MethodParams):
        weights: list[float] | None = Field(
            None, description="one weight per expert, normalised to sum 1; default uniform")

    def __init__(self, params, task_names):
        super().__init__(params, task_names)
        weights = params.weights or [1.0] * len(task_names)
        if len(weights) != len(task_names) or sum(weights) <= 0:
            raise ConfigError(f"average: need {len(task_names)} non-negative weights summing above 0, "
                              f"got {weights}")
        self.weights = [w / sum(weights) for w in weights]

    def merge_tensor(self, key, base, experts):
        return sum(w * t for w, t in zip(self.weights, experts))


@register("task_arithmetic", summary="θ = θ0 + λ Σ_i τ_i (Ilharco et al. 2023)")
class TaskArithmetic(DataFreeMethod):
    class Params(MethodParams):
        scaling: float = Field(0.3, description="λ, the coefficient on the summed task vectors")

    def merge_tensor(self, key, base, experts):
        # Accumulating one task vector at a time holds two tensors instead of the stack of T
        # (the difference between fitting a 1B model's embeddings in 2.5 GB or not); the sum runs in
        # the same order as stack(...).sum(0), so the result is bit-identical (and to mergekit's).
        total = experts[0] - base
        for expert in experts[1:]:
            total += expert - base
        return total.mul_(self.params.scaling).add_(base)


