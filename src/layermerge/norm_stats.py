"""Normalisation running statistics are merged as the experts' mean, whatever the method.

BatchNorm's ``running_mean`` and ``running_var`` are estimates of each expert's activation statistics,
not learned weights. Combining them like weights, θ0 + λ Σ τ_i, leaves the experts' convex hull as
soon as Σ λ > 1 (Task Arithmetic's 0.3 on five experts is 1.5) and can make a variance negative,
which turns every output into NaN: on five EfficientNet-Lite0 experts it put 17 BatchNorm layers
below zero and every task at chance. The mean of the experts' statistics is always a valid estimate
and is what weight averaging would give; methods that see data can do better by re-estimating them
(NP Merge's ``reset_bn``) and opt out with ``merges_running_statistics = True``.
"""

from __future__ import annotations

import torch

RUNNING_STATISTICS = ("running_mean", "running_var")


def is_running_statistic(key: str) -> bool:
    """True for a BatchNorm-style running mean or variance (by torch's buffer names)."""
    return key.rsplit(".", 1)[-1] in RUNNING_STATISTICS


def experts_mean_statistics(ctx, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """For the running statistics among ``tensors`` (float ones), the experts' mean read from a model
    context (``ctx.tasks``, ``ctx.expert_state``); other keys are left out."""
    keys = [key for key, tensor in tensors.items() if tensor.is_floating_point() and is_running_statistic(key)]
    if not keys:
        return {}
    states = [ctx.expert_state(task) for task in ctx.tasks]
    return {key: mean_of_experts([state[key] for state in states]).to(tensors[key].device) for key in keys}


def mean_of_experts(experts: list[torch.Tensor]) -> torch.Tensor:
    """The experts' mean, accumulated one tensor at a time (float32 or wider)."""
    total = experts[0].to(torch.promote_types(experts[0].dtype, torch.float32)).clone()
    for tensor in experts[1:]:
        total += tensor
    return total / len(experts)
