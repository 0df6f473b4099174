"""Functional Dual Anchors (FDA; Shi, Wen, Liu, arXiv:2510.21223, 2025): the task vectors are turned
into synthetic inputs ("anchors"), and the merged model is fitted on those inputs instead of being
assembled from weights.

**Construction**, per expert i: n anchors X_i in the base model's input space (token embeddings fed
as ``inputs_embeds`` for text, images fed as ``pixel_values`` for vision) start as σ·N(0, I) (or as
rows of the expert's weight matrices) and AdamW minimises

    A_i(X) = mean over backbone tensors k of  1 − cos(−∇_θk D_i(θ0, X), τ_ik)
    D_i(θ, X) = mean over anchors x of  Dist(φ_i(θ, x), φ_i(θ_i, x))

so that one descent step on D_i from the base θ0 points along the task vector τ_i = θ_i − θ0: the
anchors encode τ_i as a function rather than as weights. φ_i is expert i's task model with the given
backbone, read at the input of its final ``nn.Linear`` (the representation its head classifies);
Dist is the cosine distance by default. This needs second derivatives through the whole model.
The best anchors seen (lowest A_i) are kept, and the expert's representations on them become the
targets y_ij = φ_i(θ_i, x_ij).

**Merging**: from θ0 (the paper's default) Adam minimises Σ_ij Dist(φ_i(θ, x_ij), y_ij) over all
tasks' anchors in shuffled minibatches. With ``start="task_arithmetic"`` the paper's second use of
FDAs is run instead: θ = θ_TA + Σ_i δ_i ⊙ τ_i with element-wise δ trained from zero (the released
code's parametrisation), so no steps leave exactly Task Arithmetic.

Data: no task example is used. A ``kind="model"`` method is always given few-shot batches; FDA reads
only the image shape of a vision expert's first batch (its anchors get that shape), and nothing of
text batches. Every construction step differentiates the whole model twice and every fitting step
once, so memory is the experts' task models plus a few backbone copies (T more, and Adam's moments
of T, with ``start="task_arithmetic"``); docs/METHODS_FDA.md gives the cost.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Iterable, Mapping
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from layermerge.errors import ConfigError
from layermerge.methods.adamerging import stacked_task_vectors
from layermerge.methods.base import DataDrivenMethod, ModelMergeResult
from layermerge.methods.registry import MethodParams, register

# (task, backbone, anchors) -> that task's representation of each anchor, differentiable in both.
Represent = Callable[[str, Mapping[str, torch.Tensor], torch.Tensor], torch.Tensor]

# The released code's merging learning rates (Appendix C.3): the base model is fine-tuned gently,
# element-wise coefficients on task vectors take large steps.
MERGE_LR = {("base", "text"): 5e-5, ("base", "pixels"): 1e-5, ("task_arithmetic", "text"): 1e-2,
            ("task_arithmetic", "pixels"): 1e-2}


# --------------------------------------------------------------------- the pure core
def distances(ours: torch.Tensor, theirs: torch.Tensor, kind: str) -> torch.Tensor:
    """Dist per anchor (first dimension), each anchor's representation flattened: 1 − cosine, or the
    mean squared difference."""
    a, b = ours.reshape(len(ours), -1), theirs.reshape(len(theirs), -1)
    if kind == "cosine":
        return 1 - F.cosine_similarity(a, b, dim=1)
    return (a - b).square().mean(dim=1)


def alignment_loss(represent: Represent, task: str, anchors: torch.Tensor, base: Mapping[str, torch.Tensor],
                   expert: Mapping[str, torch.Tensor], vectors: Mapping[str, torch.Tensor], *,
                   distance: str = "cosine", create_graph: bool = True) -> tuple[torch.Tensor, list[str]]:
    """A_i: mean over the tensors in ``vectors`` of 1 − cos(−∇D_i at θ0, τ_ik), and the keys of
    ``vectors`` the anchors do not reach (no gradient: word embeddings when anchors are embeddings).

    ``base``: θ0, every key the representation needs; ``expert``: the backbone that gives the
    expert's own representation (an empty mapping where ``represent`` falls back to the expert's
    weights); ``vectors``: τ_i for the tensors to align. With ``create_graph`` the loss is
    differentiable in the anchors (a second derivative through the model).
    """
    leaves = {key: base[key].detach().requires_grad_(True) for key in vectors}
    ours = represent(task, {**base, **leaves}, anchors)
    theirs = represent(task, expert, anchors)
    gap = distances(ours, theirs, distance).mean()
    keys = list(vectors)
    grads = torch.autograd.grad(gap, [leaves[key] for key in keys], create_graph=create_graph, allow_unused=True)
    unreached = [key for key, grad in zip(keys, grads) if grad is None]
    terms = [1 - F.cosine_similarity(-grad.reshape(-1), vectors[key].reshape(-1), dim=0)
             for key, grad in zip(keys, grads) if grad is not None]
    if not terms:
        raise ConfigError(f"fda: no backbone tensor of expert '{task}' changes its representation of the anchors, "
                          "so no gradient can be aligned with its task vector")
    return torch.stack(terms).mean(), unreached


def construct_anchors(objective: Callable[[torch.Tensor, bool], torch.Tensor], init: torch.Tensor, *,
                      steps: int, lr: float, progress: Callable[[Iterable], Iterable] | None = None
                      ) -> tuple[torch.Tensor, dict]:
    """Minimise ``objective(anchors, create_graph)`` over the anchors with AdamW (torch's defaults
    beside ``lr``, as the released code); full batch. Returns the anchors with the lowest value seen
    (before each step, and after the last) and a record of the values."""
    anchors = init.detach().clone().requires_grad_(True)
    optimizer = torch.optim.AdamW([anchors], lr=lr)
    best, best_value, best_step, first = anchors.detach().clone(), math.inf, 0, None
    for step in (progress or (lambda it: it))(range(steps)):
        loss = objective(anchors, True)
        value = float(loss.detach())
        first = value if first is None else first
        if value < best_value:
            best, best_value, best_step = anchors.detach().clone(), value, step
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    last = float(objective(anchors.detach(), False).detach())
    if last < best_value:
        best, best_value, best_step = anchors.detach().clone(), last, steps
    return best, {"first": first if first is not None else last, "best": best_value, "best_step": best_step,
                  "last": last}


def gaussian_anchors(count: int, shape: tuple[int, ...], scale: float, generator: torch.Generator) -> torch.Tensor:
    """σ·N(0, I): small anchors keep little energy in the directions the task vector barely uses (the
    paper's Principle 2.2), which it found to converge faster and better than large ones."""
    return torch.randn((count, *shape), generator=generator) * scale


def weight_row_anchors(count: int, shape: tuple[int, int], state: Mapping[str, torch.Tensor],
                       generator: torch.Generator) -> torch.Tensor:
    """Anchors made of rows of the expert's 2-D weights as wide as one token embedding, drawn without
    replacement (the paper's "linear weight sampling": such rows have a long-tailed spectrum like
    the task vector's)."""
    tokens, width = shape
    matrices = [tensor for tensor in state.values()
                if tensor.is_floating_point() and tensor.dim() == 2 and tensor.shape[1] == width]
    sizes = torch.tensor([0] + [len(matrix) for matrix in matrices]).cumsum(0)
    needed = count * tokens
    if int(sizes[-1]) < needed:
        raise ConfigError(f"fda: init 'weight' needs {needed} weight rows of width {width} (anchors x tokens), the "
                          f"expert has {int(sizes[-1])}; lower anchors or tokens, or use init 'gaussian'")
    chosen = torch.randperm(int(sizes[-1]), generator=generator)[:needed]
    which = torch.searchsorted(sizes, chosen, right=True) - 1
    rows = [matrices[int(m)][int(r - sizes[m])].float().cpu() for m, r in zip(which, chosen)]
    return torch.stack(rows).reshape(count, tokens, width)


class MergedBackbone:
    """The backbone being fitted on the anchors.

    ``vectors`` None: θ itself, a copy of ``start`` (θ0), is trained (the paper's Eq. 5).
    Otherwise θ = start + Σ_i δ_i ⊙ τ_i with element-wise δ trained from zero (Eq. 6, as the
    released code parametrises it): δ = 0 is ``start`` bit for bit.
    """

    def __init__(self, start: Mapping[str, torch.Tensor], keys: list[str],
                 vectors: Mapping[str, torch.Tensor] | None = None):
        self.start, self.vectors = dict(start), vectors
        source = start if vectors is None else {key: torch.zeros_like(vectors[key]) for key in keys}
        self.trained = {key: source[key].detach().clone().requires_grad_(True) for key in keys}

    def leaves(self) -> list[torch.Tensor]:
        return list(self.trained.values())

    def weights(self) -> dict[str, torch.Tensor]:
        if self.vectors is None:
            return {**self.start, **self.trained}
        weights = dict(self.start)
        for key, delta in self.trained.items():
            merged = self.start[key]
            for position in range(len(delta)):
                merged = torch.addcmul(merged, delta[position], self.vectors[key][position])
            weights[key] = merged
        return weights


def anchor_fit_loss(represent: Represent, weights: Mapping[str, torch.Tensor], anchors: Mapping[str, torch.Tensor],
                    targets: Mapping[str, torch.Tensor], chosen: list[tuple[str, int]], distance: str) -> torch.Tensor:
    """Mean Dist between the merged model's and the experts' representations over ``chosen``
    (task, anchor index) pairs; each anchor runs through its own task's model."""
    total = 0.0
    for task in anchors:
        rows = [index for name, index in chosen if name == task]
        if rows:
            ours = represent(task, weights, anchors[task][rows])
            total = total + distances(ours, targets[task][rows], distance).sum()
    return total / len(chosen)


def fit_anchors(merged: MergedBackbone, represent: Represent, anchors: Mapping[str, torch.Tensor],
                targets: Mapping[str, torch.Tensor], *, lr: float, epochs: int, batch_size: int, distance: str,
                generator: torch.Generator, progress: Callable[[Iterable], Iterable] | None = None) -> list[float]:
    """Adam on the merged backbone over all tasks' anchors, reshuffled every epoch (seeded); returns
    the mean loss of each epoch (each batch measured before its step)."""
    pool = [(task, index) for task in anchors for index in range(len(anchors[task]))]
    optimizer = torch.optim.Adam(merged.leaves(), lr=lr)
    history = []
    for _ in (progress or (lambda it: it))(range(epochs)):
        order = torch.randperm(len(pool), generator=generator).tolist()
        total = 0.0
        for first in range(0, len(pool), batch_size):
            chosen = [pool[i] for i in order[first:first + batch_size]]
            loss = anchor_fit_loss(represent, merged.weights(), anchors, targets, chosen, distance)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += float(loss.detach()) * len(chosen)
        history.append(total / len(pool))
    return history


def fit_and_measure(merged: MergedBackbone, represent: Represent, anchors: Mapping[str, torch.Tensor],
                    targets: Mapping[str, torch.Tensor], params: AnchorParams, lr: float, generator: torch.Generator,
                    progress: Callable[[Iterable], Iterable] | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """``fit_anchors`` with FDA's settings, and the anchors' mean distance before and after: (the fitted
    weights, {loss_start, loss_final, history, steps})."""
    everything = [(task, index) for task in anchors for index in range(len(anchors[task]))]
    with torch.no_grad():
        loss_start = float(anchor_fit_loss(represent, merged.weights(), anchors, targets, everything,
                                           params.merge_distance))
    history = fit_anchors(merged, represent, anchors, targets, lr=lr, epochs=params.merge_epochs,
                          batch_size=params.merge_batch_size, distance=params.merge_distance, generator=generator,
                          progress=progress)
    with torch.no_grad():
        weights = merged.weights()
        loss_final = float(anchor_fit_loss(represent, weights, anchors, targets, everything, params.merge_distance))
    steps = params.merge_epochs * math.ceil(len(everything) / params.merge_batch_size)
    return weights, {"loss_start": loss_start, "loss_final": loss_final, "history": history, "steps": steps}


def anchor_space(model: nn.Module, batch: Mapping[str, object], tokens: int, task: str) -> tuple[str, tuple[int, ...]]:
    """Where a task model's anchors live: ("pixels", image shape) for a model fed ``pixel_values``,
    ("text", (tokens, embedding width)) for a transformers model that takes ``inputs_embeds``."""
    from transformers import PreTrainedModel

    pixels = batch.get("pixel_values")
    if isinstance(pixels, torch.Tensor) and pixels.dim() >= 2:
        return "pixels", tuple(pixels.shape[1:])
    if isinstance(model, PreTrainedModel) and "inputs_embeds" in inspect.signature(model.forward).parameters:
        embeddings = model.get_input_embeddings()
        if isinstance(embeddings, nn.Embedding):
            return "text", (tokens, embeddings.embedding_dim)
    raise ConfigError(f"fda: expert '{task}' ({type(model).__name__}) has no input space to place anchors in; FDA "
                      "supports transformers models that take inputs_embeds (text) and image models fed pixel_values")


def anchor_batch(space: str, anchors: torch.Tensor) -> dict[str, torch.Tensor]:
    """The model inputs for a set of anchors (text anchors attend to every position)."""
    if space == "pixels":
        return {"pixel_values": anchors}
    mask = torch.ones(anchors.shape[:2], dtype=torch.long, device=anchors.device)
    return {"inputs_embeds": anchors, "attention_mask": mask}


class AnchorParams(MethodParams):
    """The anchor construction and fitting settings FDA's two forms share (the paper's defaults)."""

    anchors: int = Field(64, ge=1, description="anchors per expert (the paper: 64)")
    init_scale: float = Field(0.01, gt=0, description="σ of the gaussian initialisation (the paper: 0.01)")
    anchor_steps: int = Field(1200, ge=0, description="AdamW steps of the anchor construction, per expert "
                                                      "(the paper: 1200)")
    anchor_lr: float = Field(0.01, ge=0, description="AdamW learning rate of the anchors (the paper: 1e-2)")
    anchor_distance: Literal["cosine", "mse"] = Field(
        "cosine", description="Dist whose gradient at the base is aligned with the task vector (the paper: cosine)")
    start: Literal["base", "task_arithmetic"] = Field(
        "base", description="base: fit θ from the base (the paper's default); task_arithmetic: fit element-wise "
                            "coefficients on the task vectors from Task Arithmetic (the paper's refinement use)")
    scaling: float = Field(0.3, description="Task Arithmetic's λ when start is task_arithmetic (the released "
                                            "code: 0.3 for RoBERTa-base)")
    merge_epochs: int = Field(100, ge=0, description="passes over all experts' anchors when fitting (the paper: "
                                                     "100)")
    merge_batch_size: int = Field(128, ge=1, description="anchors per Adam step when fitting (the paper: 128)")
    merge_lr: float | None = Field(None, gt=0, description="Adam learning rate of the fit; unset: the released "
                                                           "code's, 5e-5 (text) or 1e-5 (images) from the base, "
                                                           "1e-2 from task_arithmetic")
    merge_distance: Literal["cosine", "mse"] = Field(
        "cosine", description="Dist between merged and expert representations when fitting (the paper: cosine)")


# --------------------------------------------------------------------- the model method
@register("fda", summary="Functional Dual Anchors (Shi et al. 2025): per expert, synthetic inputs whose base-model "
                         "gradient points along its task vector; the base is then fitted to every expert's outputs "
                         "on them (uses no task data)", needs_data=True, kind="model", min_experts=1)
class FunctionalDualAnchors(DataDrivenMethod):
    artifact_name = "anchors"

    class Params(AnchorParams):
        tokens: int = Field(5, ge=1, description="tokens per text anchor (the paper: 5 for RoBERTa); image anchors "
                                                 "take the shape of the expert's images")
        init: Literal["gaussian", "weight"] = Field(
            "gaussian", description="initial anchors: init_scale x N(0, I), or rows of the expert's weight matrices "
                                    "as wide as a token embedding (text only)")
        save_anchors: bool = Field(False, description="save every expert's anchors and targets as fda/artifacts."
                                                      "safetensors, keys '<task>/anchors' and '<task>/targets'")

    def merge_models(self, ctx) -> ModelMergeResult:
        p = self.params
        spaces = {task: anchor_space(ctx.task_model(task), ctx.batches(task)[0], p.tokens, task) for task in ctx.tasks}
        space = spaces[ctx.tasks[0]][0]
        if any(kind != space for kind, _ in spaces.values()):
            raise ConfigError(f"fda: the experts do not share one input space ({spaces})")
        if p.init == "weight" and space != "text":
            raise ConfigError("fda: init 'weight' draws token-embedding-wide weight rows and applies to text models "
                              "only; use init 'gaussian' for image models")

        def represent(task, backbone, anchors):
            return ctx.features(task, backbone, anchor_batch(space, anchors))

        base = ctx.base_state()
        keys = [key for key in ctx.parameter_keys(ctx.tasks[0]) if base[key].is_floating_point()]
        stacked = stacked_task_vectors(ctx, base) if p.start == "task_arithmetic" else None
        anchors, targets, records, unreached = {}, {}, {}, set()
        # Fused attention kernels have no second derivative; the plain matmul-softmax path does.
        with sdpa_kernel([SDPBackend.MATH]):
            for position, task in enumerate(ctx.tasks):
                anchors[task], records[task], missed = self._construct(ctx, represent, task, position, spaces[task][1],
                                                                       base, keys, stacked)
                unreached.update(missed)
                with torch.no_grad():
                    targets[task] = represent(task, {}, anchors[task]).detach()

        start = base if stacked is None else task_arithmetic_start(base, stacked, p.scaling)
        merged = MergedBackbone(start, keys, None if stacked is None else {key: stacked[key] for key in keys})
        del stacked
        lr = p.merge_lr if p.merge_lr is not None else MERGE_LR[(p.start, space)]
        weights, fit = fit_and_measure(merged, represent, anchors, targets, p, lr, ctx.generator,
                                       lambda it: ctx.progress(it, "fda: fitting"))
        params = {key: weights[key].detach() for key in ctx.merge_keys}
        loss_start, loss_final, history, steps = fit["loss_start"], fit["loss_final"], fit["history"], fit["steps"]
        stats = {
            "input_space": space, "anchor_shape": list(spaces[ctx.tasks[0]][1]), "init": p.init,
            "task_data_used": "image shape of the first batch" if space == "pixels" else "none",
            "alignment": {task: {"cosine_first": round(1 - r["first"], 6), "cosine_best": round(1 - r["best"], 6),
                                 "best_step": r["best_step"], "cosine_last": round(1 - r["last"], 6)}
                          for task, r in records.items()},
            "unreached_keys": sorted(unreached),
            "merge": {"start": p.start, "lr": lr, "epochs": p.merge_epochs, "steps": steps,
                      "loss_start": round(loss_start, 6), "loss_final": round(loss_final, 6),
                      "loss_per_epoch": [round(value, 6) for value in history]},
        }
        artifacts = {}
        if p.save_anchors:
            for task in ctx.tasks:
                artifacts[f"{task}/anchors"], artifacts[f"{task}/targets"] = anchors[task].cpu(), targets[task].cpu()
        return ModelMergeResult(params, artifacts=artifacts, stats=stats)

    def _construct(self, ctx, represent, task, position, shape, base, keys, stacked):
        """One expert's anchors: (anchors, record of A_i, keys the anchors do not reach)."""
        p = self.params
        state = ctx.expert_state(task) if stacked is None or p.init == "weight" else None
        if stacked is not None:
            vectors = {key: stacked[key][position] for key in keys}
        else:
            vectors = {key: state[key] - base[key] for key in keys}
        vectors = {key: tensor for key, tensor in vectors.items() if bool(tensor.any())}   # τ = 0: nothing to align
        if p.init == "weight":
            init = weight_row_anchors(p.anchors, shape, state, ctx.generator)
        else:
            init = gaussian_anchors(p.anchors, shape, p.init_scale, ctx.generator)
        del state
        init = init.to(ctx.device)
        if not vectors:
            return init, {"first": 1.0, "best": 1.0, "best_step": 0, "last": 1.0}, []

        def objective(anchors, create_graph):
            return alignment_loss(represent, task, anchors, base, {}, vectors, distance=p.anchor_distance,
                                  create_graph=create_graph)[0]

        found, record = construct_anchors(objective, init, steps=p.anchor_steps, lr=p.anchor_lr,
                                          progress=lambda it: ctx.progress(it, f"fda: anchors for {task}"))
        _, unreached = alignment_loss(represent, task, found, base, {}, vectors, distance=p.anchor_distance,
                                      create_graph=False)
        return found, record, unreached


def task_arithmetic_start(base: Mapping[str, torch.Tensor], stacked: Mapping[str, torch.Tensor],
                          scaling: float) -> dict[str, torch.Tensor]:
    """θ0 + λ Σ_i τ_i with Task Arithmetic's own expression (τ summed in task order, × λ, + θ0), so no
    fitting gives the ``task_arithmetic`` method's weights bit for bit; other keys are the base's."""
    start = dict(base)
    for key, vectors in stacked.items():
        total = vectors[0].clone()
        for position in range(1, len(vectors)):
            total += vectors[position]
        start[key] = total.mul_(scaling).add_(base[key])
    return start


__all__ = ["AnchorParams", "FunctionalDualAnchors", "MergedBackbone", "alignment_loss", "anchor_batch",
           "anchor_fit_loss", "anchor_space", "construct_anchors", "distances", "fit_and_measure", "fit_anchors",
           "gaussian_anchors", "task_arithmetic_start", "weight_row_anchors"]
