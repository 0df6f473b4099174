"""AdaMerging (Yang et al., ICLR 2024): merging coefficients learned by entropy minimisation.

θ = θ0 + Σ_i λ_i(l) τ_i(l) with one λ per task (``granularity="task"``) or one per task per backbone
tensor (``"layer"``: the released code's "layer-wise" is one λ per parameter tensor, which needs no
knowledge of the architecture). λ starts at ``init`` (0.3) and is trained by Adam on the sum over
tasks of the mean Shannon entropy of each task head's softmax on that task's *unlabelled* few-shot
inputs (labels are ignored), then projected back to [0, 1] after every step.

Unlike the block methods this runs the whole merged model forward and backward at every step, so
memory is the base plus T task vectors, the merged backbone and its gradient, the experts' task
models (ModelContext keeps one per task) and one batch's activations — not one block.

λ is stored as ``init + δ`` with δ trained from zero and clamped to [−init, 1 − init]: the same
optimisation, and at δ = 0 (lr 0 or no steps) the merged weights are bit-for-bit Task Arithmetic
at ``init``. Regression experts (one output) have no prediction entropy: they add no loss term (their
λ is still learned through the other tasks) and are listed in the stats under ``skipped_tasks``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Literal

import torch
from pydantic import Field

from layermerge.errors import ConfigError
from layermerge.methods.base import DataDrivenMethod
from layermerge.methods.registry import MethodParams, register
from layermerge.norm_stats import experts_mean_statistics, is_running_statistic

LogitsFn = Callable[[str, Mapping[str, torch.Tensor], Mapping[str, torch.Tensor]], torch.Tensor]
REGRESSION_NOTE = "one output (regression): no prediction entropy, no loss term"


def entropy_sum(logits: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Σ over prediction rows of −Σ_c p_c log p_c (p = softmax of the last dim), and the row count."""
    flat = logits.float().reshape(-1, logits.shape[-1])
    log_p = torch.log_softmax(flat, dim=-1)
    return -(log_p.exp() * log_p).sum(), flat.shape[0]


class Coefficients:
    """λ = init + δ for T tasks over the float backbone tensors; builds the merged weights."""

    def __init__(self, base: Mapping[str, torch.Tensor], vectors: Mapping[str, torch.Tensor], tasks: Sequence[str],
                 init: float, granularity: str):
        if granularity not in ("task", "layer"):
            raise ConfigError(f"adamerging: granularity must be 'task' or 'layer', got {granularity!r}")
        self.tasks, self.init, self.granularity = list(tasks), float(init), granularity
        self.vectors = vectors
        self.keys = list(vectors)             # the coefficient groups of "layer": one per float tensor
        device = next(iter(base.values())).device if base else torch.device("cpu")
        # Task Arithmetic's own expression (Σ τ in task order, × init, + θ0), so δ = 0 is bit-identical to it.
        self.start = {}
        for key, tensor in base.items():
            if key in vectors:
                total = vectors[key][0].clone()
                for position in range(1, len(self.tasks)):
                    total += vectors[key][position]
                tensor = total.mul_(self.init).add_(tensor)
            self.start[key] = tensor
        shape = (len(self.tasks),) if granularity == "task" else (len(self.tasks), len(self.keys))
        self.delta = torch.zeros(shape, device=device, requires_grad=True)

    def lambdas(self) -> torch.Tensor:
        """λ, shape (T,) or (T, number of float tensors), detached."""
        return (self.init + self.delta).detach()

    def weights(self) -> dict[str, torch.Tensor]:
        """θ0 + Σ_i λ_i τ_i for every tensor, differentiable in δ (non-float tensors are the base's)."""
        weights = dict(self.start)
        for column, key in enumerate(self.keys):
            merged = self.start[key]
            for position in range(len(self.tasks)):
                factor = self.delta[position] if self.granularity == "task" else self.delta[position, column]
                merged = torch.addcmul(merged, factor, self.vectors[key][position])
            weights[key] = merged
        return weights

    @torch.no_grad()
    def clamp_(self) -> None:
        """Project λ back onto [0, 1]."""
        self.delta.clamp_(-self.init, 1.0 - self.init)


def _task_entropies(tasks, weights, batches, logits_fn, skipped, *, backward: bool) -> dict[str, float]:
    """Mean prediction entropy per task over all its batches; with ``backward`` the gradient of their
    sum lands in ``.grad`` of the (leaf) ``weights``. One batch's activations are alive at a time."""
    values = {}
    for task in tasks:
        if task in skipped:
            continue
        count = sum(_rows(batch) for batch in batches[task])
        total = 0.0
        for batch in batches[task]:
            value, _ = entropy_sum(logits_fn(task, weights, batch))
            value = value / count
            if backward:
                value.backward()
            total += float(value.detach())
        values[task] = total
    return values


def _rows(batch: Mapping[str, torch.Tensor]) -> int:
    """Examples in a batch (the leading size of its first tensor input)."""
    for key, value in batch.items():
        if key not in ("labels", "label") and isinstance(value, torch.Tensor) and value.dim() > 0:
            return int(value.shape[0])
    raise ConfigError("adamerging: a few-shot batch has no tensor input")


def regression_tasks(tasks, start, batches, logits_fn) -> dict[str, str]:
    """Tasks whose head has a single output (probed on their first batch): they have no entropy."""
    skipped = {}
    with torch.no_grad():
        for task in tasks:
            if logits_fn(task, start, batches[task][0]).shape[-1] == 1:
                skipped[task] = REGRESSION_NOTE
    return skipped


def adamerge(coefficients: Coefficients, batches: Mapping[str, Sequence[Mapping[str, torch.Tensor]]],
             logits_fn: LogitsFn, *, lr: float = 1e-3, steps: int = 500,
             progress: Callable | None = None, trainable: set[str] | None = None) -> dict:
    """Train ``coefficients`` in place (``coefficients.weights()`` is then the merge); returns JSON-able stats.

    ``logits_fn(task, backbone, batch)``: that task's logits with the given backbone. Every step uses
    all few-shot batches of every task (a full-batch gradient: the few-shot set is one minibatch).
    ``trainable``: the keys the entropy may differentiate (the model's parameters); buffers such as
    BatchNorm statistics take no gradient and follow their λ as the parameters' gradients move it.
    """
    tasks, granularity = coefficients.tasks, coefficients.granularity
    skipped = regression_tasks(tasks, coefficients.start, batches, logits_fn)
    if len(skipped) == len(tasks):
        raise ConfigError("adamerging: every expert has a single output (regression), so no prediction entropy "
                          "exists to minimise; use a data-free method or one that uses labels (fisher, "
                          "localize_stitch)")
    # lr 0 still runs the steps (the entropies are recorded): λ stays exactly at init, a check of the loop.
    optimizer = torch.optim.Adam([coefficients.delta], lr=lr)
    history = []
    for _ in (progress or (lambda it, **_: it))(range(steps), desc="adamerging: steps"):
        merged = coefficients.weights()
        leaves = {key: merged[key].detach().requires_grad_(trainable is None or key in trainable)
                  for key in coefficients.keys}
        entropies = _task_entropies(tasks, {**merged, **leaves}, batches, logits_fn, skipped, backward=True)
        history.append(sum(entropies.values()))
        optimizer.zero_grad()
        grads = [(merged[key], leaves[key].grad) for key in coefficients.keys if leaves[key].grad is not None]
        if grads:
            torch.autograd.backward([m for m, _ in grads], [g for _, g in grads])
        optimizer.step()
        coefficients.clamp_()
    with torch.no_grad():
        final = _task_entropies(tasks, coefficients.weights(), batches, logits_fn, skipped, backward=False)
    lambdas = coefficients.lambdas().cpu()
    stats = {
        "granularity": granularity, "steps": len(history),
        "entropy_per_step": [round(value, 6) for value in history],
        "entropy_final": round(sum(final.values()), 6),
        "entropy_final_per_task": {task: round(value, 6) for task, value in final.items()},
        "skipped_tasks": skipped,
    }
    if granularity == "task":
        stats["lambdas"] = {task: round(float(lambdas[i]), 6) for i, task in enumerate(tasks)}
    else:
        stats["lambdas"] = {task: {"mean": round(float(lambdas[i].mean()), 6), "min": round(float(lambdas[i].min()), 6),
                                   "max": round(float(lambdas[i].max()), 6)} for i, task in enumerate(tasks)}
    return stats


def stacked_task_vectors(ctx, base: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """float key → (T, *shape) stack of τ_i = θ_i − θ0, filled one expert at a time (peak: the stack
    plus one expert's backbone)."""
    keys = [key for key, tensor in base.items() if tensor.is_floating_point() and not is_running_statistic(key)]
    vectors = {key: torch.empty((len(ctx.tasks), *base[key].shape), device=base[key].device) for key in keys}
    for position, task in enumerate(ctx.tasks):
        state = ctx.expert_state(task)
        for key in keys:
            torch.sub(state[key], base[key], out=vectors[key][position])
        del state
    return vectors



@register("adamerging", summary="task- or layer-wise merging coefficients learned by minimising the prediction "
                                "entropy on unlabelled few-shot inputs (Yang et al. 2024); runs the whole model",
          needs_data=True, kind="model", min_experts=1)
class AdaMerging(DataDrivenMethod):
    artifact_name = "lambdas"

    class Params(MethodParams):
        granularity: Literal["task", "layer"] = Field(
            "task", description="task: one λ per expert; layer: one λ per expert per backbone tensor "
                                "(the released code's layer-wise AdaMerging)")
        init: float = Field(0.3, ge=0, le=1, description="initial λ (the paper: 0.3)")
        lr: float = Field(1e-3, ge=0, description="Adam learning rate (the paper: 1e-3)")
        steps: int = Field(500, ge=0, description="Adam steps, each over all few-shot batches of every task "
                                                  "(the paper: 500 iterations)")


    def merge_models(self, ctx):
        from layermerge.methods.base import ModelMergeResult

        p = self.params
        base = ctx.base_state()
        vectors = stacked_task_vectors(ctx, base)
        base.update(experts_mean_statistics(ctx, base))   # no λ on running statistics (layermerge.norm_stats)
        coefficients = Coefficients(base, vectors, ctx.tasks, p.init, p.granularity)
        del base  # the coefficients hold θ0 + init Σ τ instead
        batches = {task: ctx.batches(task) for task in ctx.tasks}
        stats = adamerge(coefficients, batches, ctx.logits, lr=p.lr, steps=p.steps, progress=ctx.progress,
                         trainable=set(ctx.parameter_keys(ctx.tasks[0])))
        with torch.no_grad():
            params = {key: tensor.detach() for key, tensor in coefficients.weights().items()}
        lambdas = coefficients.lambdas().cpu()
        if p.granularity == "task":
            artifacts = {task: lambdas[i].clone() for i, task in enumerate(ctx.tasks)}
        else:
            artifacts = {f"{task}/{key}": lambdas[i, j].clone() for i, task in enumerate(ctx.tasks)
                         for j, key in enumerate(coefficients.keys)}
        return ModelMergeResult(params, artifacts=artifacts, stats=stats)
