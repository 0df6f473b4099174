"""NP Merge (Orozco Camacho, Horoi, Wolf, Belilovsky, arXiv 2412.15467): non-uniform parameter-wise
merging of models that may come from different initialisations (no shared base needed).

1. Align: permute model B's neurons to match model A's (``layermerge.align``: weight or activation
   matching), giving B′ with B's function.
2. Learn, for every element of every parameter, α = sigmoid(a) with a = 0 at the start (α = ½):
   θ = α ⊙ θ_A + (1 − α) ⊙ θ_B′. Only a is trained, by Adam on the merged model's cross-entropy on a
   small labelled set; BatchNorm layers normalise with batch statistics while a is trained.
3. Reset the BatchNorm running statistics of the merged model on the same data.

More than two models: successive pairwise merges (A with B, the result with C, …; each new model
aligned to the current merge), or — our extension — ``mode="softmax"``: all models aligned to the
first and one softmax over the T models per element, θ = Σ_t softmax(a)_t ⊙ θ_t, a = 0 (uniform).

``np_merge_models`` works on plain ``nn.Module``s; the registered ``np_merge`` method runs the same
code on a ModelContext (each expert's task model, few-shot labelled batches). Memory: the merged
model runs end to end, and a plus Adam's two moments cost three model-sized tensors per pair
(T for softmax) on top of the inputs.
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from layermerge.align import (
    ModuleRunner,
    PermutationSpec,
    apply_perms,
    build_spec,
    match_activations,
    reset_batchnorm,
    weight_matching,
)
from layermerge.align.runner import batch_labels, batchnorm_modules, batchnorm_train_mode, eval_mode
from layermerge.errors import ConfigError, DataError
from layermerge.methods.base import DataDrivenMethod
from layermerge.methods.registry import MethodParams, register
from layermerge.methods.supervision import predicts_next_token

ALIGN = ("weight", "activation", "none")
BATCHNORM = ("batch", "running")
MODES = ("pairwise", "softmax")


@dataclass
class NPMergeResult:
    """The merged state (every key of the inputs), the learned α per merge step, the permutations
    applied to each model (by model index), and JSON-able stats."""

    state: dict[str, torch.Tensor]
    alphas: list[dict[str, torch.Tensor]]
    perms: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)
    stats: dict = field(default_factory=dict)


# --------------------------------------------------------------------- pieces
def task_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy for class labels (mean squared error for float labels: regression heads)."""
    labels = labels.to(logits.device)
    if labels.is_floating_point():
        return F.mse_loss(logits.squeeze(-1).float(), labels.float())
    return F.cross_entropy(logits.float(), labels.long(), ignore_index=-100)


def statistic_keys(feeds: Sequence[tuple]) -> set[str]:
    """State keys of BatchNorm running statistics: recomputed by the reset, never given an α."""
    keys = set()
    for runner, _ in feeds:
        for name, _module in batchnorm_modules(runner.module):
            for tensor in ("running_mean", "running_var", "num_batches_tracked"):
                key = runner.key_of(name, tensor)
                if key is not None:
                    keys.add(key)
    return keys


def merge_weights(states: Sequence[Mapping[str, torch.Tensor]], logits: Mapping[str, torch.Tensor],
                  mode: str) -> dict[str, torch.Tensor]:
    """θ for every key with logits: pairwise α⊙θ_A + (1−α)⊙θ_B, α = sigmoid(a); softmax Σ_t w_t⊙θ_t."""
    merged = {}
    for key, a in logits.items():
        if mode == "pairwise":
            alpha = torch.sigmoid(a)
            merged[key] = alpha * states[0][key] + (1 - alpha) * states[1][key]
        else:
            weights = torch.softmax(a, dim=0)
            merged[key] = sum(weights[t] * states[t][key] for t in range(len(states)))
    return merged


def _fixed_part(states, keys, mode: str, init: float) -> dict[str, torch.Tensor]:
    """Tensors without α: float ones (BN statistics) interpolated at the initial weights, others from A."""
    fixed = {}
    for key in keys:
        first = states[0][key]
        if not first.is_floating_point():
            fixed[key] = first.clone()
        elif mode == "pairwise":
            fixed[key] = init * first + (1 - init) * states[1][key]
        else:
            fixed[key] = sum(s[key] for s in states) / len(states)
    return fixed


def _steps(feeds, generator: torch.Generator) -> list[tuple[int, int]]:
    pairs = [(f, b) for f, (_, batches) in enumerate(feeds) for b in range(len(batches))]
    return [pairs[i] for i in torch.randperm(len(pairs), generator=generator).tolist()]


def learn_merge(states: Sequence[Mapping[str, torch.Tensor]], feeds: Sequence[tuple], *, mode: str = "pairwise",
                lr: float = 0.05, epochs: int = 30, init: float = 0.5, generator: torch.Generator | None = None,
                progress=None, statistics: Mapping[str, torch.Tensor] | None = None
                ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], list[float]]:
    """Learn the per-element weights of ``states`` (already aligned) on the labelled ``feeds``.

    ``statistics`` None: BatchNorm normalises with each batch's statistics while α is trained (the
    paper). Given: BatchNorm keeps these running statistics fixed (eval mode), in training and in the
    returned state. Returns the merged state (BN statistics not yet reset), α per key (pairwise: α of
    the first model; softmax: the weights, stacked over models) and the mean loss of every epoch.
    """
    if mode not in MODES:
        raise ConfigError(f"mode must be one of {MODES}, got {mode!r}")
    if mode == "pairwise" and len(states) != 2:
        raise ConfigError(f"pairwise NP Merge merges two models at a time, got {len(states)}")
    if not 0 < init < 1:
        raise ConfigError(f"init (the starting α) must lie strictly between 0 and 1, got {init}")
    generator = generator or torch.Generator().manual_seed(0)
    stats = statistic_keys(feeds)
    keys = [k for k, v in states[0].items() if v.is_floating_point() and k not in stats]
    fixed = {**_fixed_part(states, [k for k in states[0] if k not in keys], mode, init), **(statistics or {})}
    batch_statistics = statistics is None
    start = math.log(init / (1 - init))
    logits = {}
    for key in keys:
        shape = states[0][key].shape if mode == "pairwise" else (len(states), *states[0][key].shape)
        logits[key] = torch.full(shape, start if mode == "pairwise" else 0.0, device=states[0][key].device,
                                 requires_grad=True)
    detached = [{k: s[k].detach() for k in keys} for s in states]
    history: list[float] = []
    if epochs > 0:
        optimizer = torch.optim.Adam(list(logits.values()), lr=lr)
        running = {k: v.clone() for k, v in fixed.items()}   # BatchNorm in training mode updates these in place
        epochs_iter = range(epochs) if progress is None else progress(range(epochs))
        for _ in epochs_iter:
            total, count = 0.0, 0
            for f, b in _steps(feeds, generator):
                runner, batches = feeds[f]
                batch = batches[b]
                state = {**running, **merge_weights(detached, logits, mode)}
                with batchnorm_train_mode(runner.module) if batch_statistics else contextlib.nullcontext():
                    loss = task_loss(runner(state, batch), batch_labels(batch))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                total, count = total + float(loss.detach()), count + 1
            if count == 0:
                raise DataError("NP Merge needs at least one labelled batch")
            history.append(total / count)
    with torch.no_grad():
        merged = {**fixed, **merge_weights(detached, logits, mode)}
        alphas = {k: (torch.sigmoid(a) if mode == "pairwise" else torch.softmax(a, 0)).detach()
                  for k, a in logits.items()}
    return merged, alphas, history


def evaluate(state: Mapping[str, torch.Tensor], feeds: Sequence[tuple]) -> dict:
    """Mean loss and accuracy of the model with ``state`` over every batch of ``feeds`` (eval mode)."""
    loss, correct, count = 0.0, 0, 0
    with torch.no_grad():
        for runner, batches in feeds:
            for batch in batches:
                logits, labels = runner(state, batch), batch_labels(batch).to(state_device(state))
                keep = torch.ones_like(labels, dtype=torch.bool) if labels.is_floating_point() else labels != -100
                loss += float(task_loss(logits, labels)) * int(keep.sum())
                if not labels.is_floating_point():
                    correct += int((logits.argmax(-1)[keep] == labels[keep]).sum())
                count += int(keep.sum())
    return {"loss": loss / max(count, 1), "accuracy": correct / max(count, 1)}


def state_device(state: Mapping[str, torch.Tensor]) -> torch.device:
    return next(iter(state.values())).device


def align_to(spec: PermutationSpec | None, reference: Mapping[str, torch.Tensor], other: Mapping[str, torch.Tensor],
             feeds: Sequence[tuple], method: str, *, max_iter: int = 100, seed: int = 0,
             notes: list[str] | None = None) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """``other`` permuted to match ``reference`` (same function as ``other``), and the permutations."""
    if method not in ALIGN:
        raise ConfigError(f"align must be one of {ALIGN}, got {method!r}")
    if method == "none" or spec is None or not spec.groups:
        return dict(other), {}
    if method == "weight":
        perms = weight_matching(spec, reference, other, max_iter=max_iter, seed=seed)
    else:
        perms = match_activations(spec, feeds, reference, other, seed=seed, notes=notes)
    moved = apply_perms(spec, other, perms)
    return {k: v.to(other[k].device) for k, v in moved.items()}, perms


# --------------------------------------------------------------------- the whole merge
def np_merge_states(states: Sequence[Mapping[str, torch.Tensor]], feeds: Sequence[tuple],
                    spec: PermutationSpec | None, *, align: str = "weight", mode: str = "pairwise",
                    lr: float = 0.05, epochs: int = 30, init: float = 0.5, reset_bn: bool = True,
                    max_match_iter: int = 100, seed: int = 0, progress=None,
                    batchnorm: str = "batch") -> NPMergeResult:
    """NP Merge of ``states`` (same architecture, same keys) on the labelled ``feeds`` — a list of
    ``(runner, batches)``; ``spec`` gives the permutation groups (None: no alignment).

    ``batchnorm``: "batch" trains α with batch statistics (the paper); "running" keeps BatchNorm on
    the mean of the (aligned) models' running statistics while training and in the result."""
    if len(states) < 2:
        raise ConfigError(f"NP Merge needs at least two models, got {len(states)}")
    if align not in ALIGN:
        raise ConfigError(f"align must be one of {ALIGN}, got {align!r}")
    if batchnorm not in BATCHNORM:
        raise ConfigError(f"batchnorm must be one of {BATCHNORM}, got {batchnorm!r}")
    statistic = sorted(k for k in statistic_keys(feeds) if states[0][k].is_floating_point())

    def mean_statistics(models, weights):
        if batchnorm == "batch":
            return None
        return {k: sum(w * m[k].float() for w, m in zip(weights, models)).to(states[0][k].dtype) for k in statistic}

    generator = torch.Generator().manual_seed(seed)
    notes: list[str] = list(spec.notes) if spec is not None else []
    stats: dict = {"align": align, "mode": mode, "models": len(states), "steps": []}
    if spec is not None:
        stats["permutation_groups"] = len(spec.groups)

    def finish(state):
        return reset_batchnorm(state, feeds, notes=notes) if reset_bn else state

    perms: dict[int, dict[str, torch.Tensor]] = {}
    alphas = []
    if mode == "softmax":
        aligned = [dict(states[0])]
        for index in range(1, len(states)):
            moved, perms[index] = align_to(spec, states[0], states[index], feeds, align, max_iter=max_match_iter,
                                           seed=seed, notes=notes)
            aligned.append(moved)
        merged, alpha, history = learn_merge(aligned, feeds, mode="softmax", lr=lr, epochs=epochs,
                                             generator=generator, progress=progress,
                                             statistics=mean_statistics(aligned, [1 / len(aligned)] * len(aligned)))
        merged = finish(merged)
        alphas.append(alpha)
        stats["steps"].append(_step_stats(alpha, history, "softmax"))
    else:
        merged = dict(states[0])
        for index in range(1, len(states)):
            moved, perms[index] = align_to(spec, merged, states[index], feeds, align, max_iter=max_match_iter,
                                           seed=seed, notes=notes)
            # "running": the merge so far stands for `index` models, so the mean weighs it index : 1
            merged, alpha, history = learn_merge([merged, moved], feeds, mode="pairwise", lr=lr, epochs=epochs,
                                                 init=init, generator=generator, progress=progress,
                                                 statistics=mean_statistics([merged, moved],
                                                                            [index / (index + 1), 1 / (index + 1)]))
            merged = finish(merged)
            alphas.append(alpha)
            stats["steps"].append(_step_stats(alpha, history, "pairwise"))
    stats["fewshot"] = evaluate(merged, feeds)
    stats["notes"] = notes
    return NPMergeResult(merged, alphas, perms, stats)


def _step_stats(alpha: Mapping[str, torch.Tensor], history: list[float], mode: str) -> dict:
    flat = torch.cat([a.reshape(a.shape[0], -1) if mode == "softmax" else a.reshape(1, -1)
                      for a in alpha.values()], dim=1) if alpha else torch.zeros(1, 0)
    return {"loss_first_epoch": history[0] if history else None, "loss_last_epoch": history[-1] if history else None,
            "alpha_mean": flat.mean(1).tolist() if flat.numel() else [], "alpha_std": flat.std(1).tolist()
            if flat.shape[1] > 1 else []}


def np_merge_models(models: Sequence[nn.Module], batches: Sequence, *, spec: PermutationSpec | None = None,
                    align: str = "weight", mode: str = "pairwise", lr: float = 0.05, epochs: int = 30,
                    init: float = 0.5, reset_bn: bool = True, max_match_iter: int = 100,
                    seed: int = 0, batchnorm: str = "batch") -> tuple[nn.Module, NPMergeResult]:
    """NP Merge of ``models`` (same architecture, any initialisations) on labelled ``batches`` (dicts with
    ``labels`` or ``(inputs, labels)`` pairs). Returns a merged copy of the first model and the result.
    The permutation spec is found from the first model when not given (``layermerge.align.build_spec``)."""
    if len(models) < 2:
        raise ConfigError(f"NP Merge needs at least two models, got {len(models)}")
    batches = list(batches)
    if not batches:
        raise DataError("NP Merge needs labelled batches")
    template = models[0]
    if spec is None and align != "none":
        first = batches[0]
        example = first[0] if isinstance(first, (tuple, list)) else first
        spec = build_spec(template, example)
    states = [{k: v.detach().float().clone() if v.is_floating_point() else v.clone() for k, v in m.state_dict().items()}
              for m in models]
    feeds = [(ModuleRunner(template), batches)]
    with eval_mode(template):
        result = np_merge_states(states, feeds, spec, align=align, mode=mode, lr=lr, epochs=epochs, init=init,
                                 reset_bn=reset_bn, max_match_iter=max_match_iter, seed=seed, batchnorm=batchnorm)
    merged = copy.deepcopy(template)
    merged.load_state_dict(result.state)
    return merged.eval(), result


# --------------------------------------------------------------------- the registered method
class ContextRunner:
    """Expert ``task``'s task model inside a ModelContext, run with any backbone (merge keys)."""

    def __init__(self, ctx, task: str):
        self.ctx, self.task = ctx, task
        self.module = ctx.task_model(task)
        self.names = ctx.parameter_names(task)
        self.keys_by_name = {name: key for key, name in self.names.items()}
        own = self.module.state_dict()
        # Integer buffers (position ids...) stay the expert's: the merged state holds them as floats.
        self._float_keys = {key for key, name in self.names.items() if name in own and own[name].is_floating_point()}

    def key_of(self, module_name: str, tensor_name: str) -> str | None:
        return self.keys_by_name.get(f"{module_name}.{tensor_name}" if module_name else tensor_name)

    def __call__(self, state, batch):
        return self.ctx.logits(self.task, {k: v for k, v in state.items() if k in self._float_keys}, batch)


@register("np_merge", summary="NP Merge: align neurons (weight/activation matching), then learn element-wise "
                              "α = sigmoid(a) on a labelled few-shot set; works without a base (Orozco Camacho "
                              "et al. 2024)", needs_data=True, kind="model", needs_base=False, min_experts=2)
class NPMerge(DataDrivenMethod):
    artifact_name = "alphas"
    # α-interpolations are convex, and reset_bn re-estimates the statistics on data.
    merges_running_statistics = True

    class Params(MethodParams):
        align: Literal["weight", "activation", "none"] = Field(
            "weight", description="neuron alignment before merging: weight matching, activation matching on the "
                                  "few-shot inputs, or none (models fine-tuned from one base need none)")
        mode: Literal["pairwise", "softmax"] = Field(
            "pairwise", description="pairwise: successive merges A+B, then +C… (paper); softmax: one softmax over "
                                    "all experts per element (our extension)")
        lr: float = Field(0.05, gt=0, description="Adam learning rate of the logits a")
        epochs: int = Field(30, ge=0, description="passes over the labelled few-shot batches (one Adam step per "
                                                  "batch); 0 keeps α at init")
        init: float = Field(0.5, gt=0, lt=1, description="starting α of the first model in each pairwise merge "
                                                         "(paper: 0.5, a = 0)")
        reset_bn: bool = Field(True, description="recompute BatchNorm running statistics on the few-shot inputs "
                                                 "after merging")
        batchnorm: Literal["batch", "running"] = Field(
            "batch", description="BatchNorm while α is trained: batch statistics (paper; then reset_bn) or the "
                                 "models' mean running statistics, kept in the output (use with reset_bn: false "
                                 "when the experts are different tasks: per-task batches make batch statistics "
                                 "a task signal the merged model loses at test time)")
        max_match_iter: int = Field(100, ge=1, description="weight matching: most sweeps over the permutation groups")
        save_alpha: bool = Field(False, description="save the learned α (model-sized per merge step) as "
                                                    "np_merge/artifacts.safetensors, keys '<step>/<tensor>'")



    def merge_models(self, ctx):
        from layermerge.methods.base import ModelMergeResult

        p = self.params
        language = [task for task in ctx.tasks if predicts_next_token(ctx.task_model(task))]
        if language:
            raise ConfigError(f"np_merge learns α from one label per example (a classification head), but experts "
                              f"{language} are language models; use prodistill, regmean or df_merge for them")
        feeds = [(ContextRunner(ctx, task), ctx.batches(task)) for task in ctx.tasks]
        spec = None
        if p.align != "none":
            runner = feeds[0][0]
            spec, _ = build_spec(runner.module, feeds[0][1][0]).renamed(runner.keys_by_name)
        states = [ctx.expert_state(task) for task in ctx.tasks]
        result = np_merge_states(states, feeds, spec, align=p.align, mode=p.mode, lr=p.lr, epochs=p.epochs,
                                 init=p.init, reset_bn=p.reset_bn, max_match_iter=p.max_match_iter,
                                 seed=int(ctx.generator.initial_seed()), batchnorm=p.batchnorm,
                                 progress=lambda it: ctx.progress(it, "np_merge epochs"))
        artifacts = {}
        if p.save_alpha:
            artifacts = {f"{step}/{key}": a.cpu() for step, alpha in enumerate(result.alphas)
                         for key, a in alpha.items()}
        params = {key: result.state[key] for key in ctx.merge_keys}
        return ModelMergeResult(params, artifacts, {}, result.stats)
