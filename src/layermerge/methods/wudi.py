"""WUDI-Merging (Cheng et al., ICML 2025): "Whoever Started the Interference Should End It".

The paper argues that the rows of a linear layer's task vector τ_i (shape out × in) span,
approximately, the inputs that layer saw while task i was fine-tuned. So the interference a merged
task vector τ_m causes on task i can be measured without data, on τ_i itself:

    L(τ_m) = Σ_i ‖(τ_m − τ_i) τ_iᵀ‖_F² / ‖τ_i‖_F²

For each 2-D weight, τ_m starts at Task Arithmetic's Σ_i τ_i and takes ``steps`` Adam steps at
learning rate ``lr`` on L (the released code: 300 steps at 1e-5). The output is θ = θ0 + τ_m, with
no scaling coefficient. Tensors that are not optimised (biases, norms, embeddings, LM heads...)
follow ``others``. By default they keep θ0, which is what both of the paper's scripts do.

The objective is quadratic in τ_m, so nothing here needs autograd. Write D = τ_m − Σ_i τ_i and
G = Σ_i τ_iᵀτ_i / ‖τ_i‖_F² (in × in). Then
    ∇L = g0 + 2·D·G     and     L = L0 + ⟨g0, D⟩ + ⟨D·G, D⟩,
where g0 and L0 are the gradient and the loss at the start. One step costs one (out × in)·(in × in)
product. Autograd on the loss as written would cost T products of (out × in)·(in × out), a few times
over. The loss at every iterate comes almost for free. The code applies G either as the in × in Gram
matrix or as (D·Rᵀ)·R with R the stacked τ_i/‖τ_i‖, whichever is cheaper, so a (few × huge) matrix
never builds a huge × huge Gram. Optimising D from zero is Adam on τ_m from Σ τ_i: Adam only sees
gradients, so shifting the variable changes nothing but rounding (and D, being small, takes Adam's
tiny steps with less of it).

Deterministic: a fixed number of steps, float32 on the CPU, no randomness. A second run on the same
machine with the same thread count gives the same bits.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Literal

import torch
from pydantic import Field

from layermerge.methods.base import DataFreeMethod, task_vectors
from layermerge.methods.ops import RegexList, compile_any
from layermerge.methods.registry import MethodParams, register
from layermerge.methods.spectral import matrix_view

# Adam's constants as torch.optim.Adam's defaults, which the released code uses.
BETA1, BETA2, EPS = 0.9, 0.999, 1e-8

# Embeddings and output heads, by name (each checked with re.search). The paper optimises only linear
# layers inside the blocks: its ViT script names the four block weights, and its RoBERTa script
# excludes embeddings, LayerNorms, biases and the classifier.
DEFAULT_EXCLUDE = ("embed", r"(^|\.)(wte|wpe|shared|lm_head)\.")


def inner(a: torch.Tensor, b: torch.Tensor) -> float:
    """⟨a, b⟩ summed in float64, so the reported losses don't drift over the iterations."""
    return float(torch.sum(a * b, dtype=torch.float64))


@dataclass
class Quadratic:
    """L(Σ τ_i + D) = loss0 + ⟨grad0, D⟩ + ⟨curvature(D), D⟩, with ∇L = grad0 + 2·curvature(D).

    The curvature applies G = Σ_i τ_iᵀτ_i / ‖τ_i‖² through the Gram matrix (in × in) or, when the
    matrix is much wider than tall (in > 2·T·out), through the stacked, scaled task vectors.
    """

    loss0: float
    grad0: torch.Tensor
    gram: torch.Tensor | None = None
    factor: torch.Tensor | None = None

    @classmethod
    def build(cls, start: torch.Tensor, taus: torch.Tensor) -> Quadratic:
        """``taus``: (T, out, in), every τ_i nonzero. ``start``: the point D = 0 (Σ_i τ_i)."""
        count, rows, cols = taus.shape
        use_gram = cols <= 2 * count * rows
        gram = torch.zeros(cols, cols) if use_gram else None
        grad0 = torch.zeros_like(start)
        loss0 = 0.0
        for tau in taus:
            weight = 1.0 / float(tau.pow(2).sum())
            residual = start - tau
            if use_gram:
                products = tau.T @ tau                      # (in × in)
                gram.add_(products, alpha=weight)
                pushed = residual @ products                # (τ_m − τ_i) τ_iᵀτ_i
                loss0 += weight * inner(pushed, residual)   # = ‖(τ_m − τ_i) τ_iᵀ‖²
            else:
                overlap = residual @ tau.T                  # (out × out)
                pushed = overlap @ tau
                loss0 += weight * inner(overlap, overlap)
            grad0.add_(pushed, alpha=2.0 * weight)
        factor = None
        if not use_gram:
            scales = taus.flatten(1).pow(2).sum(1).rsqrt()
            factor = (taus * scales[:, None, None]).reshape(count * rows, cols)
        return cls(loss0, grad0, gram, factor)

    def curvature(self, delta: torch.Tensor) -> torch.Tensor:
        """D·G."""
        if self.gram is not None:
            return delta @ self.gram
        return (delta @ self.factor.T) @ self.factor

    def loss(self, delta: torch.Tensor, curved: torch.Tensor) -> float:
        return self.loss0 + inner(self.grad0, delta) + inner(curved, delta)


def wudi_task_vector(taus: torch.Tensor, lr: float, steps: int) -> tuple[torch.Tensor, list[float]]:
    """τ_m for one weight matrix from its task vectors ``taus`` (T, out, in), and the loss L at each
    of the ``steps`` + 1 iterates (the Task Arithmetic start first).

    Zero task vectors have no row space and an undefined weight 1/‖τ_i‖². They are left out of the
    loss, and they add nothing to the starting sum either.
    """
    start = taus.sum(0)
    live = taus[taus.flatten(1).pow(2).sum(1) > 0]
    if live.shape[0] == 0:
        return start, [0.0] * (steps + 1)
    objective = Quadratic.build(start, live)
    delta = torch.zeros_like(start)
    first = torch.zeros_like(start)      # Adam's moment estimates
    second = torch.zeros_like(start)
    losses = []
    for step in range(1, steps + 1):
        grad = objective.curvature(delta)
        losses.append(objective.loss(delta, grad))
        grad.mul_(2.0).add_(objective.grad0)
        # torch.optim.Adam's update (weight decay 0, not amsgrad), written out because the gradient is
        # known in closed form.
        first.mul_(BETA1).add_(grad, alpha=1.0 - BETA1)
        second.mul_(BETA2).addcmul_(grad, grad, value=1.0 - BETA2)
        denominator = (second.sqrt() / math.sqrt(1.0 - BETA2 ** step)).add_(EPS)
        delta.addcdiv_(first, denominator, value=-lr / (1.0 - BETA1 ** step))
    losses.append(objective.loss(delta, objective.curvature(delta)))
    return start.add_(delta), losses


@register("wudi", summary="WUDI-Merging: per linear weight, Adam from Σ τ_i on Σ_i ‖(τ_m − τ_i)τ_iᵀ‖²/‖τ_i‖² "
                          "(Cheng et al. 2025)")
class Wudi(DataFreeMethod):
    class Params(MethodParams):
        lr: float = Field(1e-5, gt=0.0, description="Adam learning rate on τ_m (released code: 1e-5 for ViT, "
                                                    "2e-5 for RoBERTa)")
        steps: int = Field(300, ge=0, description="Adam iterations per weight matrix (released code: 300; "
                                                  "FusionBench's config: 400); 0 = Task Arithmetic at λ = 1")
        exclude: RegexList = Field(
            None, description="regexes (re.search on the tensor name) of 2-D tensors not optimised; None: "
                              "embeddings and LM heads (names containing 'embed', or a 'wte', 'wpe', 'shared' "
                              "or 'lm_head' component); []: every 2-D tensor is optimised")
        others: Literal["base", "average", "sum"] = Field(
            "base", description="tensors not optimised (not matrices, or excluded): keep θ0 (the paper's code), "
                                "θ0 + mean τ_i (FusionBench) or θ0 + Σ τ_i (the optimisation's start)")
        transposed: RegexList = Field(
            None, description="regexes of 2-D weights stored (in, out), optimised as their transpose: GPT-2's "
                              "Conv1D needs ['c_attn', 'c_proj', 'c_fc']")

    def __init__(self, params, task_names):
        super().__init__(params, task_names)
        self.exclude = compile_any(DEFAULT_EXCLUDE if params.exclude is None else params.exclude)
        self.transposed = compile_any(params.transposed or [])
        self.ratios: list[float] = []    # final / initial loss per optimised tensor
        self.optimised = 0
        self.transposed_count = 0
        self.other = 0

    def is_optimised(self, key: str, base: torch.Tensor) -> bool:
        """A matrix (2-D, or a 1×1 convolution as its (out, in) map: ``spectral.matrix_view``) not excluded."""
        return matrix_view(base) is not None and not (self.exclude and self.exclude.search(key))

    def merge_tensor(self, key, base, experts):
        if not self.is_optimised(key, base):
            self.other += 1
            if self.params.others == "base":
                return base.clone()
            merged = task_vectors(base, experts).sum(0)
            if self.params.others == "average":
                merged /= len(experts)
            return merged.add_(base)
        tau = task_vectors(base, experts)
        tau = tau.reshape(len(experts), *matrix_view(base).shape)
        flip = bool(self.transposed and self.transposed.search(key))
        if flip:
            tau = tau.transpose(1, 2).contiguous()
            self.transposed_count += 1
        merged, losses = wudi_task_vector(tau, self.params.lr, self.params.steps)
        self.optimised += 1
        if losses[0] > 0:
            self.ratios.append(losses[-1] / losses[0])
        if flip:
            merged = merged.T.contiguous()
        return merged.reshape(base.shape).add_(base)

    def summary(self):
        facts = {"optimised_tensors": self.optimised, "other_tensors": self.other, "others": self.params.others,
                 "transposed_tensors": self.transposed_count}
        if self.ratios:
            facts["loss_final_over_initial"] = {"median": statistics.median(self.ratios),
                                                "max": max(self.ratios), "min": min(self.ratios)}
        return facts


__all__ = ["DEFAULT_EXCLUDE", "Quadratic", "Wudi", "wudi_task_vector"]
