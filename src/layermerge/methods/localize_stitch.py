"""Localize-and-Stitch (He et al., 2024): per task a sparse binary mask over its task vector, then stitching.

Localize: for each task t, real-valued scores s over every backbone entry define a soft mask σ(s);
they start at ±``sigmoid_bias`` on the global top-k magnitude entries of τ_t and the rest (so σ(s)
starts close to that magnitude selection, as the paper does) and are trained by Adam on

    L(s) = loss_t(θ0 + σ(s) ⊙ τ_t) + l1_weight · mean(σ(s))

with loss_t the cross-entropy of the task's own head on its labelled few-shot batches (mean squared
error for a one-output regression head). The penalty is the mean, so ``l1_weight`` is the loss one
would trade for keeping every entry: an entry's score rises when its first-order loss gain
−∂loss/∂m exceeds l1_weight / (number of entries). Then the mask is binarised: the k = sparsity · N
highest scores (exactly k, ties by position), or σ(s) > 0.5 (``binarize="round"``, the paper's rounding).

Stitch: θ = θ0 + Σ_t m_t ⊙ τ_t / max(1, Σ_t m_t) element-wise — entries claimed by several tasks get
the mean of their task vectors, entries claimed by none stay θ0.

Like every ``kind="model"`` method it runs each expert's whole task model; per task it holds the task
vector, the scores, their gradient and Adam's two moments (about five backbone copies) besides the
base, the running stitch and the experts' task models.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Literal

import torch
from pydantic import Field

from layermerge.errors import ConfigError, DataError
from layermerge.methods.base import DataDrivenMethod
from layermerge.methods.radix_select import KthLargestMagnitude
from layermerge.methods.registry import MethodParams, register
from layermerge.methods.supervision import (
    IGNORE_INDEX,
    predicted_labels,
    predicts_next_token,
    supervised_loss_sum,
)

LABEL_KEYS = ("labels", "label")


# --------------------------------------------------------------------------- selection
def kept_count(total: int, sparsity: float) -> int:
    """k = round(sparsity · total), at least 1: how many entries a mask keeps."""
    if not 0 < sparsity <= 1:
        raise ConfigError(f"localize_stitch: sparsity must be in (0, 1], got {sparsity}")
    return max(1, min(total, round(sparsity * total)))


def top_k_masks(tensors: Mapping[str, torch.Tensor], k: int) -> dict[str, torch.Tensor]:
    """Masks keeping exactly the k largest |values| over all tensors together (ties in visiting order).

    Streams two 65 536-bin histograms (radix selection), never a model-sized sort or concatenation.
    """
    selector = KthLargestMagnitude(k)
    for tensor in tensors.values():
        selector.observe_high(tensor.detach().cpu())
    selector.finish_high()
    for tensor in tensors.values():
        selector.observe_low(tensor.detach().cpu())
    selector.finish_low()
    return {key: selector.keep_mask(tensor.detach().cpu()).to(tensor.device) for key, tensor in tensors.items()}


def top_k_scores(scores: Mapping[str, torch.Tensor], k: int) -> dict[str, torch.Tensor]:
    """The k highest (signed) scores: shifted by the global minimum so magnitude order is score order."""
    low = min(float(tensor.detach().min()) for tensor in scores.values())
    return top_k_masks({key: tensor.detach() - low for key, tensor in scores.items()}, k)


def initial_scores(vector: Mapping[str, torch.Tensor], k: int, bias: float) -> dict[str, torch.Tensor]:
    """+bias on the global top-k magnitude entries of τ, −bias elsewhere (σ(±bias) ≈ a binary mask)."""
    masks = top_k_masks(vector, k)
    return {key: torch.where(masks[key], bias, -bias).to(torch.float32) for key in vector}


# --------------------------------------------------------------------------- the task loss
def labels_of(task: str, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    for key in LABEL_KEYS:
        if key in batch:
            return batch[key]
    raise DataError(f"localize_stitch learns each mask from labelled examples, but a few-shot batch of '{task}' "
                    f"has no 'labels' (keys: {sorted(batch)}); give labelled batches or a data: section "
                    "naming a labelled task")


# --------------------------------------------------------------------------- localize
def learn_scores(task: str, base: Mapping[str, torch.Tensor], vector: Mapping[str, torch.Tensor],
                 scores: dict[str, torch.Tensor], batches: Sequence[Mapping[str, torch.Tensor]],
                 logits_fn: Callable, *, lr: float, steps: int, l1_weight: float,
                 progress: Callable | None = None, trainable: set[str] | None = None,
                 shift: bool = False) -> list[dict]:
    """Train ``scores`` (float keys of τ) in place by Adam; per step the task loss (mean over the labelled
    examples, all batches: a full-batch gradient) and the mean soft mask before the update. ``shift``:
    the labels follow the input tokens (a causal language model's, ``layermerge.methods.supervision``).

    ``trainable``: the keys the task loss may differentiate (the model's parameters); buffers such as
    BatchNorm statistics take no gradient, so their scores move only by the sparsity penalty."""
    count = sum(int((predicted_labels(labels_of(task, batch), shift) != IGNORE_INDEX).sum()) for batch in batches)
    if count == 0:
        raise DataError(f"localize_stitch: every label of '{task}' is ignored ({IGNORE_INDEX}); nothing to learn from")
    leaves = list(scores.values())
    for leaf in leaves:
        leaf.requires_grad_(True)
    total = sum(leaf.numel() for leaf in leaves)
    optimizer = torch.optim.Adam(leaves, lr=lr)
    history = []
    for _ in (progress or (lambda it, **_: it))(range(steps), desc=f"localize_stitch: {task}"):
        soft = {key: torch.sigmoid(scores[key]) for key in scores}
        merged = {key: torch.addcmul(base[key], soft[key], vector[key]) for key in scores}
        inputs = {key: tensor.detach().requires_grad_(trainable is None or key in trainable)
                  for key, tensor in merged.items()}
        backbone = {**base, **inputs}
        task_loss = 0.0
        for batch in batches:
            value, _ = supervised_loss_sum(logits_fn(task, backbone, batch), labels_of(task, batch), shift=shift)
            value = value / count
            value.backward()
            task_loss += float(value.detach())
        penalty = l1_weight * sum(tensor.sum() for tensor in soft.values()) / total
        pairs = [(merged[key], inputs[key].grad) for key in scores if inputs[key].grad is not None]
        optimizer.zero_grad()
        torch.autograd.backward([m for m, _ in pairs] + [penalty], [g for _, g in pairs] + [None])
        optimizer.step()
        with torch.no_grad():
            mask_mean = float(sum(tensor.sum() for tensor in soft.values())) / total
        history.append({"loss": task_loss, "mask_mean": mask_mean})
    for leaf in leaves:
        leaf.requires_grad_(False)
    return history


def binarize(scores: Mapping[str, torch.Tensor], k: int, how: str = "topk") -> dict[str, torch.Tensor]:
    """Binary masks from trained scores: exactly the k highest, or σ(s) > 0.5 (``how="round"``)."""
    if how == "round":
        return {key: tensor.detach() > 0 for key, tensor in scores.items()}
    if how != "topk":
        raise ConfigError(f"localize_stitch: binarize must be 'topk' or 'round', got {how!r}")
    return top_k_scores(scores, k)


# --------------------------------------------------------------------------- stitch
class Stitcher:
    """Running Σ_t m_t ⊙ τ_t and Σ_t m_t; ``result`` is θ0 + the first over max(1, the second)."""

    def __init__(self, base: Mapping[str, torch.Tensor]):
        self.base = base
        self.keys = [key for key, tensor in base.items() if tensor.is_floating_point()]
        self.total = {key: torch.zeros_like(base[key]) for key in self.keys}
        self.count = {key: torch.zeros(base[key].shape, dtype=torch.int32, device=base[key].device)
                      for key in self.keys}

    def add(self, masks: Mapping[str, torch.Tensor], vector: Mapping[str, torch.Tensor]) -> None:
        for key in self.keys:
            self.total[key] += torch.where(masks[key], vector[key], 0.0)
            self.count[key] += masks[key]

    def result(self) -> dict[str, torch.Tensor]:
        merged = dict(self.base)
        for key in self.keys:
            merged[key] = self.base[key] + self.total[key] / self.count[key].clamp(min=1)
        return merged

    def coverage(self) -> dict:
        """How many entries one or more tasks claim, and how many several claim (overlaps averaged)."""
        claimed = sum(int((c > 0).sum()) for c in self.count.values())
        shared = sum(int((c > 1).sum()) for c in self.count.values())
        return {"entries_claimed": claimed, "entries_shared": shared,
                "shared_fraction_of_claimed": round(shared / claimed, 6) if claimed else 0.0}


def stitch(base: Mapping[str, torch.Tensor], masks: Mapping[str, Mapping[str, torch.Tensor]],
           vectors: Mapping[str, Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """θ0 + Σ_t m_t ⊙ τ_t / max(1, Σ_t m_t) for {task: masks} and {task: τ}."""
    stitcher = Stitcher(base)
    for task in masks:
        stitcher.add(masks[task], vectors[task])
    return stitcher.result()


# --------------------------------------------------------------------------- the method
@register("localize_stitch", summary="per task a sparse binary mask over its task vector learned on a few "
                                     "labelled examples, then the masked task vectors stitched into the base "
                                     "(He et al. 2024); runs the whole model",
          needs_data=True, kind="model", min_experts=1)
class LocalizeStitch(DataDrivenMethod):
    class Params(MethodParams):
        sparsity: float = Field(0.01, gt=0, le=1, description="fraction of backbone entries each task's mask keeps "
                                                              "(k; the paper: 1%)")
        steps: int = Field(20, ge=0, description="Adam steps per task, each over all its labelled few-shot batches")
        lr: float = Field(0.5, ge=0, description="Adam learning rate of the mask scores (which start at "
                                                 "±sigmoid_bias)")
        l1_weight: float = Field(1.0, ge=0, description="weight of the sparsity penalty mean(σ(s)): the loss one "
                                                        "would trade for keeping every entry")
        sigmoid_bias: float = Field(5.0, gt=0, description="initial scores: +bias on the top-k magnitude entries of "
                                                           "τ, −bias elsewhere (the paper: 5)")
        binarize: Literal["topk", "round"] = Field(
            "topk", description="topk: exactly the k highest scores; round: σ(s) > 0.5 (the paper's rounding; "
                                "its sparsity is whatever training left)")
        save_masks: bool = Field(False, description="also save every task's binary mask (bool, one per backbone "
                                                    "tensor) as <method>/artifacts.safetensors")


    def merge_models(self, ctx):
        from layermerge.methods.base import ModelMergeResult

        p = self.params
        base = ctx.base_state()
        stitcher = Stitcher(base)
        keys = stitcher.keys
        total = sum(base[key].numel() for key in keys)
        k = kept_count(total, p.sparsity)
        artifacts, per_task = {}, {}
        for task in ctx.tasks:
            batches = ctx.batches(task)
            for batch in batches:
                labels_of(task, batch)                # fail before any training when labels are missing
            expert = ctx.expert_state(task)
            vector = {key: expert[key] - base[key] for key in keys}
            del expert
            scores = initial_scores(vector, k, p.sigmoid_bias)
            start = {key: tensor > 0 for key, tensor in scores.items()}
            history = learn_scores(task, base, vector, scores, batches, ctx.logits, lr=p.lr, steps=p.steps,
                                   l1_weight=p.l1_weight, progress=ctx.progress,
                                   trainable=set(ctx.parameter_keys(task)),
                                   shift=predicts_next_token(ctx.task_model(task)))
            masks = binarize(scores, k, p.binarize)
            del scores
            stitcher.add(masks, vector)
            kept = sum(int(m.sum()) for m in masks.values())
            per_task[task] = {
                "kept": kept, "sparsity": round(kept / total, 8),
                "kept_from_initial_top_k": round(sum(int((masks[key] & start[key]).sum()) for key in keys) / kept, 6)
                if kept else 0.0,
                "loss_first": round(history[0]["loss"], 6) if history else None,
                "loss_last": round(history[-1]["loss"], 6) if history else None,
            }
            if p.save_masks:
                artifacts.update({f"{task}/{key}": mask.cpu() for key, mask in masks.items()})
            del vector, masks, start
        stats = {"entries": total, "k": k, "binarize": p.binarize, "tasks": per_task, **stitcher.coverage()}
        return ModelMergeResult(stitcher.result(), artifacts=artifacts, stats=stats)
