"""The Adam loop that learns merging coefficients (ProDistill, DistillMerge), and when it stops.

``fit`` runs epochs over shuffled groups of cached batches, data-parallel aware: each rank adds the
loss of the batches it holds, gradients are summed across ranks before every step, so all ranks take
identical steps. It stops early when a ``StoppingRule`` says the epoch loss has flattened, and can
run the block's matmuls in bfloat16 (``engine.precision``) while λ, the loss and the optimiser stay
in float32. Large depthwise convolutions take a faster weight gradient (``layermerge.methods.depthwise``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Literal

import torch
from pydantic import Field

from layermerge.allocator import keep_freed_memory
from layermerge.engine.precision import PRECISIONS, matmul_precision, resolve_precision
from layermerge.methods.depthwise import faster_depthwise

SCHEDULES = ("constant", "cosine", "linear")

# The parameters of the loop, shared by the methods that use it (each sets its own defaults).
Patience = Annotated[int, Field(ge=0, description="stop training (a block's, for ProDistill) after this many "
                                                  "epochs in a row without the epoch loss falling below "
                                                  "(1 - tolerance) x its best; 0 runs every epoch (the paper)")]
Tolerance = Annotated[float, Field(ge=0, lt=1, description="relative fall of the epoch loss that counts as "
                                                           "progress for patience")]
TrainPrecision = Annotated[Literal[PRECISIONS], Field(
    description="matmul precision while λ is trained: float32, bfloat16 by autocast (λ, the loss, the "
                "optimiser and the final weights stay float32), or auto (bfloat16 where the device "
                "multiplies it natively, AMX/AVX512-BF16 CPUs or GPUs with bfloat16, and the block has no "
                "convolutions)")]

Schedule = Annotated[Literal[SCHEDULES], Field(
    description="learning rate over the epochs: constant (the paper), or decayed step by step from lr to 0 "
                "at the last epoch, along a half cosine or a straight line")]


def scheduled_lr(lr: float, schedule: str, progress: float) -> float:
    """The learning rate at ``progress`` (0 at the first step, 1 after the last epoch) of ``schedule``."""
    if schedule == "constant":
        return lr
    if schedule == "cosine":
        return lr * 0.5 * (1.0 + math.cos(math.pi * progress))
    if schedule == "linear":
        return lr * (1.0 - progress)
    raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")


@dataclass(frozen=True)
class StoppingRule:
    """Stop when the epoch loss has not fallen below ``(1 - tolerance)`` × its best for ``patience``
    epochs in a row.

    The loss is the distillation objective itself, summed over every few-shot pair in the epoch (and
    over ranks, so every rank stops at the same epoch). Holding pairs out instead would take shots
    from training, which with 16-64 examples per task costs more than it tells. ``patience=0``
    never stops early.
    """

    patience: int = 0
    tolerance: float = 0.0

    def __post_init__(self):
        if self.patience < 0 or self.tolerance < 0:
            raise ValueError(f"patience and tolerance must be >= 0, got {self.patience}, {self.tolerance}")

    def stopped_at(self, losses: list[float]) -> int | None:
        """The number of epochs after which the rule stops, given the epoch losses so far (None: go on)."""
        if self.patience <= 0:
            return None
        best, waited = float("inf"), 0
        for epoch, loss in enumerate(losses, start=1):
            if loss < best * (1.0 - self.tolerance):
                best, waited = loss, 0
            else:
                best, waited = min(best, loss), waited + 1
                if waited >= self.patience:
                    return epoch
        return None


def adam(leaves: list[torch.Tensor], lr: float) -> torch.optim.Adam:
    """Adam with the fused kernel where the device has one (one pass over λ, its moments and its
    gradient, no temporaries), else the one-tensor-at-a-time loop (the multi-tensor path holds
    temporaries for every leaf at once, and element-wise λ is the block's size times the tasks)."""
    try:
        return torch.optim.Adam(leaves, lr=lr, fused=True)
    except RuntimeError:
        return torch.optim.Adam(leaves, lr=lr, foreach=False)


def step_units(refs: list) -> list[list]:
    """``refs`` gathered into the units a step takes whole: the pieces of one regrouped batch (same task
    and ``unit``, ``engine.batching``), in order of first appearance; a ref without a unit is its own."""
    units: dict[tuple, list] = {}
    for position, ref in enumerate(refs):
        unit = getattr(ref, "unit", None)
        units.setdefault((ref.task, unit) if unit is not None else (None, position), []).append(ref)
    return list(units.values())


def fit(ctx, leaves: list[torch.Tensor], group_loss: Callable[[list], torch.Tensor], *, lr: float, epochs: int,
        batch_size: int, stop: StoppingRule | None = None, precision: str = "float32",
        schedule: str = "constant") -> list[float]:
    """Adam on ``leaves``; returns the loss summed over each epoch run (over all ranks).

    Every epoch the cached batches are shuffled by ``ctx.generator`` (the same order on every rank;
    the pieces of one regrouped batch stay together, ``step_units``) and grouped until ``batch_size``
    examples; ``group_loss(local_refs)`` is the loss of the group's batches this rank holds, computed
    under ``matmul_precision(precision)``. At most ``epochs`` epochs, fewer when ``stop`` says so.
    Empty when there is nothing to learn (no leaves, lr 0 or 0 epochs). ``schedule`` sets the learning
    rate of each step (``scheduled_lr``): progress counts the units (batches) seen out of ``epochs`` ×
    all units, so a decay ends at the last epoch allowed, whether or not ``stop`` ends training sooner.
    """
    if not leaves or lr <= 0 or epochs <= 0:
        return []
    stop = stop or StoppingRule()
    units = step_units(ctx.pairs())
    precision = resolve_precision(precision, ctx.device)
    optimizer = adam(leaves, lr)
    scheduled_lr(lr, schedule, 0.0)                  # an unknown schedule fails before any work
    losses: list[float] = []
    with keep_freed_memory():                        # each step reuses the memory the last one freed
        for epoch in ctx.progress(range(epochs), desc="epochs"):
            order = torch.randperm(len(units), generator=ctx.generator).tolist()
            epoch_loss, group, group_size = 0.0, [], 0
            for position, unit_index in enumerate(order):
                if not group:
                    first = position
                group.extend(units[unit_index])
                group_size += sum(ref.size for ref in units[unit_index])
                if group_size < batch_size and position < len(order) - 1:
                    continue
                optimizer.zero_grad(set_to_none=True)
                local = [ref for ref in group if ctx.is_local(ref)]
                value = 0.0
                if local:
                    with matmul_precision(precision, ctx.device), faster_depthwise(ctx.device):
                        loss = group_loss(local)
                    loss.backward()
                    value = float(loss.detach())
                for leaf in leaves:                       # a rank with no pair in this group adds zeros
                    if leaf.grad is None:
                        leaf.grad = torch.zeros_like(leaf)
                ctx.all_reduce_([leaf.grad for leaf in leaves])
                if schedule != "constant":                # the units seen before this step, of all epochs'
                    progress = (epoch * len(order) + first) / (epochs * len(order))
                    for settings in optimizer.param_groups:
                        settings["lr"] = scheduled_lr(lr, schedule, progress)
                optimizer.step()
                epoch_loss += ctx.sum(value)
                group, group_size = [], 0
            losses.append(epoch_loss)
            if stop.stopped_at(losses) is not None:
                break
    return losses
