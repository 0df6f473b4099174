"""The contract of a data-free method: a pure function of one tensor's base and expert values.

The driver streams the merge keys one at a time and calls ``merge_tensor``. A method that needs a
statistic over the whole model (TIES' global top-k, EMR's rescalers) declares ``stat_passes`` and
receives every tensor in ``observe`` first; it never holds more than the statistic.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from layermerge.methods.registry import MethodParams


@dataclass
class TensorResult:
    """A merged tensor plus optional per-task tensors to store beside the model (EMR masks...)."""

    merged: torch.Tensor
    per_task: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class ModelMergeResult:
    """A ``kind="model"`` method's answer.

    ``params``: every merge key (base checkpoint names) → merged fp32 tensor. ``artifacts``: tensors
    saved as ``<method>/artifacts.safetensors``. ``task_params``: optional per-task backbone tensors
    that replace the shared ones when that task's model is loaded. ``stats``: JSON-able numbers for
    ``layermerge_summary.json``. What a ``kind="model"`` method returns.
    """

    params: dict[str, torch.Tensor]
    artifacts: dict[str, torch.Tensor] = field(default_factory=dict)
    task_params: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    stats: dict = field(default_factory=dict)


class DataFreeMethod:
    """Base class. Subclasses define ``Params`` and ``merge_tensor``; all tensors arrive as fp32."""

    Params = MethodParams
    method_name = "?"
    stat_passes = 0
    # The merge driver sets this: its input tensors are fresh copies it never reuses, so a method may
    # overwrite them to save memory. Direct callers (tests) keep the default and their inputs intact.
    inputs_owned = False

    def __init__(self, params: MethodParams, task_names: list[str]):
        self.params = params
        self.task_names = task_names

    def observe(self, pass_index: int, key: str, base: torch.Tensor, experts: list[torch.Tensor]) -> None:
        """Accumulate whole-model statistics (only called when stat_passes > 0)."""

    def end_pass(self, pass_index: int) -> None:
        """Called after each statistics pass over all tensors."""

    def merge_tensor(self, key: str, base: torch.Tensor,
                     experts: list[torch.Tensor]) -> torch.Tensor | TensorResult:
        raise NotImplementedError

    def summary(self) -> dict:
        """JSON-able facts to record in the output (thresholds, rescalers...)."""
        return {}


def task_vectors(base: torch.Tensor, experts: list[torch.Tensor]) -> torch.Tensor:
    """Stack of τ_i = θ_i − θ0, shape (T, *base.shape).

    Subtracting straight into the stack (rather than stacking T temporaries) halves the peak
    memory and the page-faulting of this step; the values are the same.
    """
    if base.requires_grad or any(expert.requires_grad for expert in experts):
        return torch.stack([expert - base for expert in experts])  # out= does not support autograd
    dtype = base.dtype
    for expert in experts:
        dtype = torch.promote_types(dtype, expert.dtype)
    stacked = torch.empty((len(experts), *base.shape), dtype=dtype, device=base.device)
    for index, expert in enumerate(experts):
        torch.sub(expert, base, out=stacked[index])
    return stacked


class DataDrivenMethod:
    """Base of the methods that learn from few-shot data (``kind="block"`` or ``"model"``): their
    parameters, the expert names, and what a resumable run's fingerprint records."""

    Params = MethodParams
    method_name = "?"

    def __init__(self, params: MethodParams | None = None, task_names: list[str] | None = None):
        self.params = params or self.Params()
        self.task_names = list(task_names or [])
        self.name = self.method_name

    def config(self) -> dict:
        return self.params.model_dump()

