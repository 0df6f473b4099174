"""NeuLig — Neural Ligand (Li, Yu, Wang, arXiv 2503.01268): a router that makes merging match ensembling.

A small router, Portland (one ``Linear(T·d → T)`` and a softmax), reads the concatenated features of
all T experts for an input x and outputs β(x) on the simplex. β(x) serves twice: as ensembling
weights of the experts' predictions and as merging coefficients of their weights, θ = Σ_i β_i θ_i.
Training (only the router; experts and heads frozen) minimises L_b + w·L_a:

- L_b, the boosting loss: cross-entropy with labels, or the mean prediction entropy without, of the
  task's head applied to the β-weighted feature ensemble Σ_i β_i(x) z_i(x). A regression head (one
  output) has no class distribution: with labels its term is the squared error of the ensemble's
  prediction, without labels it adds no term (as in AdaMerging) and only L_a moves its β;
- L_a, the alignment loss: mean over x of (Σ_i β_i(x) ε_i)², with ε the standardised offsets
  (ξ_i = θ_i − mean_j θ_j, s_i = sum of ξ_i's elements, ε = (s − mean s) / std s across experts).
  It pushes β onto the hyperplane where merging and ensembling agree (w = 1/100 in the paper).

Heads differ per task here, so z_i(x) for task t is the input of task t's classifier when its
model runs on expert i's backbone; the classifier is affine and Σβ = 1, so the head of the feature
ensemble equals Σ_i β_i · logits_t(θ_i; x), which is how it is computed (one cached forward per
expert and task). The router reads each expert's own features (its own model, its own head's
pre-classifier layers), so it needs no task id.

Three ways to turn β into models (``model_mode``): ``per_batch`` — input-adaptive, β recomputed per
batch (from its first example, as the released code does, or the batch mean); the saved backbone
is then the global model and the router is saved beside it, because an input-adaptive model cannot
be one checkpoint. ``per_task`` — one fixed model per task from β averaged over that task's few-shot
data (saved as per-task weights). ``global`` — one model from β averaged over all tasks. See
docs/NEULIG.md. Memory: every expert's full task model plus every expert backbone (fp32) at once.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from layermerge.errors import ConfigError, DataError
from layermerge.methods.base import DataDrivenMethod
from layermerge.methods.registry import MethodParams, register

MODES = ("per_batch", "per_task", "global")


# --------------------------------------------------------------------- the pieces, on plain tensors
def offset_sums(states: Sequence[Mapping[str, torch.Tensor]], keys: Sequence[str]) -> torch.Tensor:
    """s_i = Σ elements of ξ_i = θ_i − mean_j θ_j over the flattened ``keys``, in float64.

    Σ(θ_i − mean_j θ_j) = Σθ_i − mean_j Σθ_j, so one float64 sum per expert and tensor is enough:
    no stacked copy of the experts, and no cancellation in fp32."""
    totals = torch.zeros(len(states), dtype=torch.float64)
    for key in keys:
        for index, state in enumerate(states):
            totals[index] += state[key].sum(dtype=torch.float64).cpu()
    return totals - totals.mean()


def standardise(values: torch.Tensor) -> torch.Tensor:
    """(v − mean) / std across experts (population std); all zeros when the values do not vary
    (one expert, or identical experts), where the alignment loss then has nothing to align."""
    values = values.to(torch.float64)
    centred = values - values.mean()
    std = centred.pow(2).mean().sqrt()
    if len(values) < 2 or float(std) == 0.0:
        return torch.zeros_like(values)
    return centred / std


class Portland(nn.Module):
    """The router: one Linear over the T concatenated expert features, then a softmax over experts."""

    def __init__(self, num_experts: int, feature_dim: int, generator: torch.Generator | None = None,
                 init: str = "random"):
        super().__init__()
        self.num_experts, self.feature_dim = num_experts, feature_dim
        self.linear = nn.Linear(num_experts * feature_dim, num_experts)
        with torch.no_grad():
            if init == "zero":          # β uniform everywhere: training starts from weight averaging
                self.linear.weight.zero_()
                self.linear.bias.zero_()
            else:                       # nn.Linear's own scheme, but from the seeded generator
                bound = 1.0 / math.sqrt(num_experts * feature_dim)
                for tensor in (self.linear.weight, self.linear.bias):
                    tensor.copy_((torch.rand(tensor.shape, generator=generator) * 2 - 1) * bound)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """``features``: (N, T·d), expert i's features in columns i·d..(i+1)·d; returns β, (N, T)."""
        return torch.softmax(self.linear(features), dim=-1)

    @classmethod
    def from_artifacts(cls, artifacts: Mapping[str, torch.Tensor]) -> Portland:
        """Rebuild a trained router from a NeuLig output's ``neulig/artifacts.safetensors``."""
        weight, bias = artifacts["router.weight"], artifacts["router.bias"]
        router = cls(weight.shape[0], weight.shape[1] // weight.shape[0], init="zero")
        with torch.no_grad():
            router.linear.weight.copy_(weight)
            router.linear.bias.copy_(bias)
        return router


def ensemble_logits(beta: torch.Tensor, expert_logits: torch.Tensor) -> torch.Tensor:
    """Σ_i β_i(x) · logits_i(x): beta (N, T) or (T,), expert_logits (T, N, C) → (N, C)."""
    if beta.dim() == 1:
        beta = beta.expand(expert_logits.shape[1], -1)
    return torch.einsum("nt,tnc->nc", beta, expert_logits)


def boosting_loss(logits: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
    """Cross-entropy with ``labels``, or the mean prediction entropy without them. For a regression
    head (one output) the mean squared error with ``labels``, and zero without them (no entropy)."""
    if logits.shape[-1] == 1:
        if labels is None:
            return logits.sum() * 0.0
        return F.mse_loss(logits.squeeze(-1), labels.to(logits.dtype))
    if labels is not None:
        return F.cross_entropy(logits, labels)
    log_p = torch.log_softmax(logits, dim=-1)
    return -(log_p.exp() * log_p).sum(-1).mean()


def alignment_loss(beta: torch.Tensor, epsilon: torch.Tensor) -> torch.Tensor:
    """mean over x of (Σ_i β_i(x) ε_i)²."""
    return (beta @ epsilon.to(beta)).pow(2).mean()


def merge_states(states: Sequence[Mapping[str, torch.Tensor]], weights: torch.Tensor,
                 keys: Sequence[str]) -> dict[str, torch.Tensor]:
    """θ = Σ_i w_i θ_i for every key (with Σw = 1 this is θ0 + Σ_i w_i τ_i whatever the base)."""
    weights = [float(w) for w in weights]
    merged = {}
    for key in keys:
        total = states[0][key] * weights[0]
        for weight, state in zip(weights[1:], states[1:]):
            total = total + state[key] * weight
        merged[key] = total
    return merged


def batch_weights(beta: torch.Tensor, how: str) -> torch.Tensor:
    """One β for a whole batch: its first example's (the released code) or the batch mean."""
    return beta[0] if how == "first" else beta.mean(0)


@dataclass
class TaskData:
    """One task's cached few-shot tensors; ``sizes`` keeps the batch boundaries (per-batch β)."""

    features: torch.Tensor               # (N, T·d) router input
    expert_logits: torch.Tensor          # (T, N, C): task head on expert i's backbone (C = 1: regression)
    labels: torch.Tensor | None          # (N,) class ids, float targets (regression), or None
    sizes: list[int]

    @property
    def regression(self) -> bool:
        return self.expert_logits.shape[-1] == 1


def train_router(router: Portland, data: Mapping[str, TaskData], epsilon: torch.Tensor, *, epochs: int, lr: float,
                 batch_size: int, align_weight: float, supervised: bool, generator: torch.Generator,
                 progress: Callable = lambda iterable, desc: iterable) -> list[dict]:
    """Adam on the router only; per epoch each task's examples are shuffled into batches and the
    tasks are visited round-robin (one batch of each in turn). Returns per-epoch mean losses."""
    optimizer = torch.optim.Adam(router.parameters(), lr=lr)
    history = []
    for _ in progress(range(epochs), desc="neulig router"):
        chunks = {task: torch.randperm(len(d.features), generator=generator).split(batch_size)
                  for task, d in data.items()}
        sums = {"loss": 0.0, "boosting": 0.0, "alignment": 0.0}
        steps = 0
        for position in range(max(len(c) for c in chunks.values())):
            for task, d in data.items():
                if position >= len(chunks[task]):
                    continue
                index = chunks[task][position].to(d.features.device)
                beta = router(d.features[index])
                boost = boosting_loss(ensemble_logits(beta, d.expert_logits[:, index]),
                                      d.labels[index] if supervised else None)
                align = alignment_loss(beta, epsilon)
                loss = boost + align_weight * align
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                sums["loss"] += loss.item()
                sums["boosting"] += boost.item()
                sums["alignment"] += align.item()
                steps += 1
        history.append({k: v / steps for k, v in sums.items()})
    return history


# --------------------------------------------------------------------- the method
@register("neulig", summary="Neural Ligand: a router over the experts' features gives merging weights that "
                            "make merging match ensembling (Li, Yu, Wang 2025)", needs_data=True, kind="model",
          needs_base=False)
class NeuLig(DataDrivenMethod):
    # β-weighted sums of the experts are convex: their statistics stay valid and follow the weights.
    merges_running_statistics = True

    class Params(MethodParams):
        model_mode: Literal["per_task", "per_batch", "global"] = Field(
            "per_task", description="per_task: one fixed model per task from β averaged over its data (saved as "
                                    "per-task weights); per_batch: input-adaptive, β per batch as the released "
                                    "code (saved: the global model plus the router); global: one model, β "
                                    "averaged over all tasks")
        loss: Literal["entropy", "cross_entropy"] = Field(
            "entropy", description="boosting loss of the β-weighted ensemble: prediction entropy (unlabelled) "
                                   "or cross-entropy with the few-shot labels (regression heads: squared error "
                                   "with labels, no term without)")
        align_weight: float = Field(0.01, ge=0, description="weight of the alignment loss (paper: 1/100)")
        lr: float = Field(1e-3, gt=0, description="Adam learning rate of the router (paper: 1e-3)")
        epochs: int = Field(300, ge=0, description="passes over the few-shot data (each task's examples in "
                                                   "batches, tasks round-robin)")
        batch_size: int = Field(128, ge=1, description="examples per Adam step (paper: 128)")
        batch_weights: Literal["first", "mean"] = Field(
            "first", description="per_batch mode: β of a batch from its first example (released code) or the "
                                 "batch mean")
        router_init: Literal["random", "zero"] = Field(
            "random", description="random: nn.Linear's initialisation (seeded); zero: start from uniform β "
                                  "(weight averaging)")
        evaluate: bool = Field(True, description="measure merged and ensemble accuracy of all three modes on "
                                                 "the few-shot data (in-sample) for the summary")


    def merge_models(self, ctx):
        from layermerge.methods.base import ModelMergeResult

        fit = self.fit(ctx)
        p = self.params
        params = merge_states(fit.states, fit.global_weights, ctx.merge_keys)
        task_params = {}
        if p.model_mode == "per_task":
            task_params = {task: merge_states(fit.states, fit.task_weights[task], ctx.merge_keys)
                           for task in ctx.tasks}
        artifacts = {"router.weight": fit.router.linear.weight.detach().cpu(),
                     "router.bias": fit.router.linear.bias.detach().cpu(),
                     "epsilon": fit.epsilon.float(), "weights.global": fit.global_weights.cpu(),
                     "weights.per_task": torch.stack([fit.task_weights[t] for t in ctx.tasks]).cpu()}
        stats = fit.summary()
        if p.evaluate:
            report = evaluate(ctx, fit, fit.data, p.batch_weights)
            stats["evaluation"] = {"data": "the few-shot examples the router trained on (in-sample)", **report}
            chosen = report["modes"][p.model_mode]
            stats.update(merged_accuracy=chosen["merged_accuracy"], ensemble_accuracy=chosen["ensemble_accuracy"],
                         gap=chosen["gap"], agreement=chosen["agreement"])
        return ModelMergeResult(params=params, artifacts=artifacts, task_params=task_params, stats=stats)

    def fit(self, ctx) -> NeuLigFit:
        """Cache the experts' features and logits, compute ε, train the router, average its β."""
        p = self.params
        if p.loss == "cross_entropy":
            missing = [t for t in ctx.tasks if any("labels" not in b for b in ctx.batches(t))]
            if missing:
                raise DataError(f"NeuLig loss='cross_entropy' needs labels, but the few-shot batches of {missing} "
                                "have no 'labels'; add them to the batches or use loss='entropy'")
        states = [ctx.expert_state(task) for task in ctx.tasks]
        epsilon = standardise(offset_sums(states, ctx.merge_keys))
        data = {task: collect(ctx, task, states) for task in ctx.progress(ctx.tasks, desc="neulig features")}
        feature_dim = next(iter(data.values())).features.shape[1] // len(ctx.tasks)
        router = Portland(len(ctx.tasks), feature_dim, ctx.generator, p.router_init).to(ctx.device)
        eps_device = epsilon.to(ctx.device, torch.float32)
        with torch.no_grad():
            start = _alignment_on(router, data, eps_device)
        history = train_router(router, data, eps_device, epochs=p.epochs, lr=p.lr, batch_size=p.batch_size,
                               align_weight=p.align_weight, supervised=p.loss == "cross_entropy",
                               generator=ctx.generator, progress=ctx.progress)
        router.eval()
        with torch.no_grad():
            end = _alignment_on(router, data, eps_device)
            task_weights = {task: router(d.features).mean(0).cpu() for task, d in data.items()}
        global_weights = torch.stack(list(task_weights.values())).mean(0)
        return NeuLigFit(router, epsilon, states, data, task_weights, global_weights, history, start, end)


@dataclass
class NeuLigFit:
    """A trained router and what it implies: ε, the per-task and global β̄, the training history."""

    router: Portland
    epsilon: torch.Tensor
    states: list[dict[str, torch.Tensor]]
    data: dict[str, TaskData]
    task_weights: dict[str, torch.Tensor]
    global_weights: torch.Tensor
    history: list[dict] = field(default_factory=list)
    alignment_start: float = 0.0
    alignment_end: float = 0.0

    def summary(self) -> dict:
        return {"epsilon": _floats(self.epsilon), "weights": {"global": _floats(self.global_weights),
                                                              "per_task": {t: _floats(w) for t, w in
                                                                           self.task_weights.items()}},
                "alignment_start": self.alignment_start, "alignment_end": self.alignment_end,
                "loss_first_epoch": self.history[0] if self.history else None,
                "loss_last_epoch": self.history[-1] if self.history else None}


def collect(ctx, task: str, states: Sequence[Mapping[str, torch.Tensor]]) -> TaskData:
    """Router inputs (each expert's own features, concatenated) and task ``task``'s logits on every
    expert's backbone, for all of ``task``'s few-shot batches; no gradients."""
    features, logits, labels, sizes = [], [], [], []
    with torch.no_grad():
        for batch in ctx.batches(task):
            per_expert = [_features(ctx, expert, batch) for expert in ctx.tasks]
            features.append(torch.cat(per_expert, dim=1))
            logits.append(torch.stack([ctx.logits(task, {} if expert == task else state, batch)
                                       for expert, state in zip(ctx.tasks, states)]))
            sizes.append(len(per_expert[0]))
            if "labels" in batch:
                labels.append(batch["labels"].reshape(-1).to(ctx.device))
    logits = torch.cat(logits, dim=1).float()
    if logits.dim() != 3:
        raise ConfigError(f"NeuLig needs one prediction vector per example, but expert '{task}''s head gives "
                          f"logits of shape {tuple(logits.shape[1:])}; a pooled classification or regression "
                          "head is needed")
    label_tensor = None
    if len(labels) == len(sizes):
        label_tensor = torch.cat(labels)
        label_tensor = label_tensor.float() if logits.shape[-1] == 1 else label_tensor.long()
    return TaskData(torch.cat(features).float(), logits, label_tensor, sizes)


def _features(ctx, expert: str, batch) -> torch.Tensor:
    value = ctx.features(expert, {}, batch)
    if value.dim() != 2:
        raise ConfigError(f"NeuLig's router reads one feature vector per example, but expert '{expert}''s head "
                          f"input has shape {tuple(value.shape)}; a pooled classifier head is needed")
    return value


def _alignment_on(router: Portland, data: Mapping[str, TaskData], epsilon: torch.Tensor) -> float:
    """mean over all few-shot examples of (β·ε)²."""
    betas = torch.cat([router(d.features) for d in data.values()])
    return float(alignment_loss(betas, epsilon))


def evaluate(ctx, fit: NeuLigFit, data: Mapping[str, TaskData], how: str = "first") -> dict:
    """Merged vs ensemble accuracy of each mode on ``data`` (collected from ``ctx``'s batches).

    ``ensemble`` is the router's per-example ensemble Σβ(x)·logits (the paper's); ``gap`` is ensemble
    minus merged accuracy; ``ensemble_same_weights`` uses the mode's own β (per batch, per task, global)
    so that ``merged`` and it differ only by merging vs ensembling; ``agreement`` is the share of
    examples where merged and ensemble predict the same class (no labels needed). For a regression
    head "accuracy" and "agreement" are Pearson correlations (with the labels, between the predictions). Accuracies are
    means over tasks with labels (None without)."""
    keys, router = ctx.merge_keys, fit.router
    global_state = merge_states(fit.states, fit.global_weights, keys)
    rows: dict[str, dict[str, dict]] = {mode: {} for mode in MODES}
    ensemble_accuracy = {}
    with torch.no_grad():
        for task in ctx.tasks:
            d = data[task]
            beta = router(d.features)
            ensemble_pred = _predict(ensemble_logits(beta, d.expert_logits))
            ensemble_accuracy[task] = _accuracy(ensemble_pred, d.labels)
            task_state = merge_states(fit.states, fit.task_weights[task], keys)
            merged = {mode: [] for mode in MODES}
            same = {mode: [] for mode in MODES}
            start = 0
            for batch, size in zip(ctx.batches(task), d.sizes):
                span = slice(start, start + size)
                start += size
                w_batch = batch_weights(beta[span], how)
                for mode, (w, state) in {
                        "per_batch": (w_batch, merge_states(fit.states, w_batch, keys)),
                        "per_task": (fit.task_weights[task], task_state),
                        "global": (fit.global_weights, global_state)}.items():
                    merged[mode].append(_predict(ctx.logits(task, state, batch).float()))
                    same[mode].append(_predict(ensemble_logits(w.to(d.expert_logits), d.expert_logits[:, span])))
            for mode in MODES:
                merged_pred, same_pred = torch.cat(merged[mode]), torch.cat(same[mode])
                rows[mode][task] = {"merged": _accuracy(merged_pred, d.labels),
                                    "ensemble_same_weights": _accuracy(same_pred, d.labels),
                                    "agreement": _agreement(merged_pred, ensemble_pred)}
    ensemble_mean = _mean(ensemble_accuracy.values())
    modes = {}
    for mode in MODES:
        merged_mean = _mean(r["merged"] for r in rows[mode].values())
        modes[mode] = {"merged_accuracy": merged_mean, "ensemble_accuracy": ensemble_mean,
                       "gap": None if merged_mean is None else ensemble_mean - merged_mean,
                       "ensemble_same_weights_accuracy": _mean(r["ensemble_same_weights"]
                                                               for r in rows[mode].values()),
                       "agreement": _mean(r["agreement"] for r in rows[mode].values()),
                       "per_task": rows[mode]}
    return {"batch_weights": how, "ensemble_per_task": ensemble_accuracy, "modes": modes}


def _predict(logits: torch.Tensor) -> torch.Tensor:
    """Class ids, or the float predictions of a regression head (one output)."""
    return logits.squeeze(-1) if logits.shape[-1] == 1 else logits.argmax(-1)


def _accuracy(prediction: torch.Tensor, labels: torch.Tensor | None) -> float | None:
    """Share of correct class ids; for regression (float predictions) the Pearson correlation."""
    if labels is None:
        return None
    if prediction.is_floating_point():
        return _pearson(prediction, labels)
    return float((prediction == labels).float().mean())


def _agreement(first: torch.Tensor, second: torch.Tensor) -> float:
    """Share of examples with the same class; for regression the Pearson correlation of the predictions."""
    if first.is_floating_point():
        return _pearson(first, second)
    return float((first == second).float().mean())


def _pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    """The evaluation's Pearson correlation; 0 (not NaN) when either side is constant."""
    from layermerge.eval.metrics import pearson

    value = pearson(a.detach().double().cpu().numpy(), b.detach().double().cpu().numpy())
    return 0.0 if math.isnan(value) else value


def _mean(values) -> float | None:
    values = list(values)
    return None if not values or any(v is None for v in values) else sum(values) / len(values)


def _floats(tensor: torch.Tensor) -> list[float]:
    return [float(v) for v in tensor]
