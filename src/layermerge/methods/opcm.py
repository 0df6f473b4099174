"""OPCM (Tang et al., 2025, "Merging Models on the Fly Without Retraining: A Sequential Approach to
Scalable Continual Model Merging", arXiv 2501.09522): continual merging, one model at a time.

Models arrive one after another (here: the experts, in the order given) and only the current merge
is kept. Write τ_t = θ_t − θ0 for the t-th task vector. Each new τ_t is first projected, per weight
matrix, away from the directions the merged task vector already occupies, then added:

1. **Projection.** Take the SVD of the current merged task matrix, D = Σ_j σ_j u_j v_jᵀ with
   σ_1 ≥ … ≥ σ_ρ > 0. Its leading k directions are protected, where k counts the components whose
   cumulative share of Σσ is at most α: k = #{j : (σ_1 + … + σ_j) / (σ_1 + … + σ_ρ) ≤ α}. The new task
   matrix loses its coordinates u_iᵀ τ v_j inside the protected block (i, j ≤ k) and, with
   ``zero_diagonal``, along each of D's own directions u_j v_jᵀ:

       P(τ) = τ − U_k (U_kᵀ τ V_k) V_kᵀ − Σ_{k < j ≤ ρ} (u_jᵀ τ v_j) u_j v_jᵀ

   Tensors that are not projected (not 2-D, or excluded by name: embeddings by default, since the
   paper's code projects only linear layers) use P(τ) = τ.
2. **Running sum.** S_1 = τ_1 and S_t = S_{t−1} + P_{S_{t−1}}(τ_t).
3. **Adaptive scaling.** θ_t = θ0 + S_t / λ_t with λ_t = ‖S_t‖ / mean_{i ≤ t} ‖τ_i‖, so the merged task
   vector always has the average task vector's length. Norms are over the whole model (``scope``
   "model", the paper) or over each tensor alone ("tensor").

The released code stores θ_t and recovers S_{t−1} as λ_{t−1}(θ_{t−1} − θ0) at each step. P only sees
D's singular directions and the shares σ_j / Σσ, neither of which depends on D's scale, so keeping S_t
and scaling once at the end gives the same model. With one model the result is θ_1 itself (λ_1 = 1).

``ContinualMerge`` is the one-model-at-a-time form, in constant memory (θ0, S_t and running sums of norms).
The registered method applies the same update to the experts of each tensor in their given order.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Literal

import torch
from pydantic import Field

from layermerge.methods.base import DataFreeMethod
from layermerge.methods.ops import RegexList, compile_any
from layermerge.methods.registry import MethodParams, register
from layermerge.methods.spectral import matrix_view, numerical_rank, thin_svd
from layermerge.norm_stats import is_running_statistic

# Embedding tables, by name (re.search): the released code projects only nn.Linear weights, and an
# nn.Embedding's table is the only other common 2-D weight in a transformer.
DEFAULT_EXCLUDE = ("embed", r"(^|\.)(wte|wpe|shared)\.")


def protected_count(singular_values: torch.Tensor, alpha: float) -> int:
    """k: how many leading singular directions have a cumulative share of Σσ of at most α.

    The total is the last cumulative sum rather than a separate sum, so the last share is exactly 1
    and α = 1 protects every direction whatever the rounding.
    """
    cumulative = torch.cumsum(singular_values.to(torch.float64), 0)
    return int((cumulative / cumulative[-1] <= alpha).sum())


def project_out(left: torch.Tensor, values: torch.Tensor, right: torch.Tensor, tau: torch.Tensor,
                alpha: float, zero_diagonal: bool = True) -> torch.Tensor:
    """P(τ) given the merged matrix's thin SVD (``thin_svd``: left m × r, values r, right r × n).

    Only directions with numerically nonzero σ are used: the others' singular vectors are an
    arbitrary basis of the null spaces (a LAPACK choice), and removing τ's coordinates along them
    would make the result depend on that choice. Every term is a product u_i (u_iᵀ τ v_j) v_jᵀ, which
    a joint sign flip of (u_i, v_i) leaves unchanged, so the SVD's signs do not matter either.
    """
    scale = float(values[0]) if values.numel() else 0.0
    rank = numerical_rank(values, scale, (left.shape[0], right.shape[1]))
    if rank == 0:
        return tau.clone()          # nothing merged in this tensor yet: nothing to protect
    left, right = left[:, :rank], right[:rank]
    coordinates = left.T @ tau @ right.T                       # (u_iᵀ τ v_j), rank × rank
    removed = torch.zeros_like(coordinates)
    protected = protected_count(values[:rank], alpha)
    removed[:protected, :protected] = coordinates[:protected, :protected]
    if zero_diagonal:
        removed.diagonal().copy_(coordinates.diagonal())
    return tau - left @ removed @ right


def project_task_matrix(merged_tv: torch.Tensor, tau: torch.Tensor, alpha: float = 0.5,
                        zero_diagonal: bool = True) -> torch.Tensor:
    """P(τ): a new task matrix projected against the merged task matrix ``merged_tv`` (any scale)."""
    left, values, right = thin_svd(merged_tv)
    return project_out(left, values, right, tau.to(torch.float64), alpha, zero_diagonal)


def fold_in(running_sum: torch.Tensor | None, tau: torch.Tensor, *, project: bool, alpha: float = 0.5,
            zero_diagonal: bool = True) -> torch.Tensor:
    """S_t = S_{t−1} + P(τ_t) in float64 (S_1 = τ_1); ``project``: whether this tensor is projected."""
    tau = tau.to(torch.float64)
    if running_sum is None:
        return tau.clone()
    if project:         # a 1×1 convolution is projected as its (out, in) matrix (``spectral.matrix_view``)
        tau = project_task_matrix(matrix_view(running_sum), matrix_view(tau), alpha, zero_diagonal).reshape(tau.shape)
    return running_sum.to(torch.float64) + tau


def length_ratio(mean_task_norm: float, merged_norm: float) -> float:
    """1/λ = mean_i ‖τ_i‖ / ‖S‖, the factor on S; 0 when nothing changed (S = 0, the result is θ0)."""
    return mean_task_norm / merged_norm if merged_norm > 0 else 0.0


def squared_norm(tensor: torch.Tensor) -> float:
    return float(tensor.to(torch.float64).pow(2).sum())


def is_projected(key: str, tensor: torch.Tensor, exclude) -> bool:
    """A matrix (non-empty 2-D, or a 1×1 convolution as its (out, in) map: ``spectral.matrix_view``)
    whose name no ``exclude`` regex matches (``exclude``: a compiled pattern or None)."""
    return matrix_view(tensor) is not None and not (exclude and exclude.search(key))


class ContinualMerge:
    """OPCM as the paper runs it: models folded in one at a time, holding only θ0, the running sum
    S_t (one model's worth, in float32 or the base's wider dtype) and the task-vector norms so far.

    >>> merger = ContinualMerge(base_state)          # doctest: +SKIP
    >>> for state in arriving_models:               # doctest: +SKIP
    ...     merger.add(state)
    ...     current = merger.merged()               # θ_t, e.g. to save or evaluate after each arrival

    ``base`` and every added model map the same names to floating-point tensors; the names decide
    which 2-D tensors are excluded from the projection, as in the registered method.
    """

    def __init__(self, base: Mapping[str, torch.Tensor], alpha: float = 0.5, zero_diagonal: bool = True,
                 scope: Literal["model", "tensor"] = "model", exclude: list[str] | None = None):
        params = Opcm.Params(alpha=alpha, zero_diagonal=zero_diagonal, scope=scope, exclude=exclude)
        self.alpha, self.zero_diagonal, self.scope = params.alpha, params.zero_diagonal, params.scope
        self.exclude = compile_any(DEFAULT_EXCLUDE if exclude is None else exclude)
        self.base = dict(base)
        self.sums: dict[str, torch.Tensor] = {}
        self.count = 0
        self.model_norms = 0.0                  # Σ_i ‖τ_i‖ over the whole model
        self.tensor_norms = dict.fromkeys(self.base, 0.0)   # Σ_i ‖τ_i‖ per tensor

    def add(self, expert: Mapping[str, torch.Tensor]) -> None:
        """Fold in the next model (θ_t): one projection per projected matrix, then the new S_t."""
        if set(expert) != set(self.base):
            raise ValueError("the model does not have the base's tensors: "
                             f"{sorted(set(expert) ^ set(self.base))[:5]}")
        squares = 0.0
        for key, base in self.base.items():
            tau = expert[key].to(torch.float64) - base.to(torch.float64)
            square = squared_norm(tau)
            squares += square
            self.tensor_norms[key] += math.sqrt(square)
            total = fold_in(self.sums.get(key), tau, project=is_projected(key, base, self.exclude),
                            alpha=self.alpha, zero_diagonal=self.zero_diagonal)
            self.sums[key] = total.to(torch.promote_types(base.dtype, torch.float32))
        self.model_norms += math.sqrt(squares)
        self.count += 1

    def model_ratio(self) -> float:
        """1/λ_t over the whole model."""
        if self.count == 0:
            raise ValueError("no model has been added yet")
        merged_norm = math.sqrt(sum(squared_norm(total) for total in self.sums.values()))
        return length_ratio(self.model_norms / self.count, merged_norm)

    @property
    def lam(self) -> float:
        """λ_t for the whole model (the paper's logged λ; with scope "tensor" each tensor has its own)."""
        ratio = self.model_ratio()
        return 1.0 / ratio if ratio > 0 else math.inf

    def merged(self) -> dict[str, torch.Tensor]:
        """θ_t = θ0 + S_t / λ_t, in the base's dtypes."""
        model_ratio = self.model_ratio()
        result = {}
        for key, base in self.base.items():
            total = self.sums[key].to(torch.float64)
            ratio = (model_ratio if self.scope == "model" else
                     length_ratio(self.tensor_norms[key] / self.count, math.sqrt(squared_norm(total))))
            result[key] = (base.to(torch.float64) + ratio * total).to(base.dtype)
        return result


@register("opcm", summary="OPCM: continual merging in the given order; each τ_t projected off the merged "
                          "task matrix's leading singular directions, length kept at mean ‖τ_i‖ "
                          "(Tang et al. 2025)")
class Opcm(DataFreeMethod):
    class Params(MethodParams):
        alpha: float = Field(
            0.5, ge=0.0, le=1.0,
            description="leading singular directions of the merged task matrix protected from each new task "
                        "vector: those whose cumulative share of Σσ is at most α (paper and FusionBench: 0.5)")
        zero_diagonal: bool = Field(
            True, description="also remove the new task vector's coordinate along each of the merged matrix's "
                              "own directions u_j v_jᵀ (FusionBench's code since March 2025; the code released "
                              "with the paper did not: its diag() wrote into a copy)")
        scope: Literal["model", "tensor"] = Field(
            "model", description="norms for the scaling λ_t = ‖S_t‖ / mean ‖τ_i‖: over the whole model (the "
                                 "paper; a statistics pass, so every matrix's SVDs run twice) or per tensor")
        exclude: RegexList = Field(
            None, description="regexes (re.search on the tensor name) of 2-D tensors added without projection; "
                              "None: embedding tables (names containing 'embed', or a 'wte', 'wpe' or 'shared' "
                              "component), as the paper projects only linear layers; []: every 2-D tensor")

    def __init__(self, params, task_names):
        super().__init__(params, task_names)
        self.exclude = compile_any(DEFAULT_EXCLUDE if params.exclude is None else params.exclude)
        self.stat_passes = 1 if params.scope == "model" else 0
        self.model_squares = [0.0] * len(task_names)   # ‖τ_i‖² over the model, summed tensor by tensor
        self.sum_squares = 0.0                         # ‖S_T‖² likewise
        self.model_ratio: float | None = None
        self.counts = {"projected": 0, "added": 0}

    def running_sum(self, key: str, base: torch.Tensor,
                    experts: list[torch.Tensor]) -> tuple[torch.Tensor, list[float]]:
        """S_T for this tensor (float64) and each ‖τ_i‖² here, the experts taken in their given order."""
        project = is_projected(key, base, self.exclude)
        base64 = base.to(torch.float64)
        total, squares = None, []
        for expert in experts:
            tau = expert.to(torch.float64) - base64
            squares.append(squared_norm(tau))
            total = fold_in(total, tau, project=project, alpha=self.params.alpha,
                            zero_diagonal=self.params.zero_diagonal)
        return total, squares

    def observe(self, pass_index, key, base, experts):
        if is_running_statistic(key):       # BatchNorm statistics are averaged by the driver, not merged
            return
        total, squares = self.running_sum(key, base, experts)
        self.sum_squares += squared_norm(total)
        self.model_squares = [a + b for a, b in zip(self.model_squares, squares)]

    def end_pass(self, pass_index):
        mean_norm = sum(math.sqrt(s) for s in self.model_squares) / len(self.model_squares)
        self.model_ratio = length_ratio(mean_norm, math.sqrt(self.sum_squares))

    def merge_tensor(self, key, base, experts):
        total, squares = self.running_sum(key, base, experts)
        self.counts["projected" if is_projected(key, base, self.exclude) else "added"] += 1
        if self.params.scope == "tensor":
            mean_norm = sum(math.sqrt(s) for s in squares) / len(squares)
            ratio = length_ratio(mean_norm, math.sqrt(squared_norm(total)))
        elif self.model_ratio is None:
            raise RuntimeError("opcm with scope='model' needs its statistics pass (observe, end_pass) first")
        else:
            ratio = self.model_ratio
        return (base.to(torch.float64) + ratio * total).to(torch.float32)

    def summary(self):
        facts = {"scope": self.params.scope, "tensors": dict(self.counts),
                 "order": list(self.task_names)}
        if self.model_ratio:
            facts["lambda"] = 1.0 / self.model_ratio
        return facts
