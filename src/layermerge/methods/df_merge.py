"""DF-Merge (Lee et al., NAACL 2025, arXiv 2504.18992): Fisher-weighted merging whose per-expert scales
λ are chosen by Bayesian optimisation on the merged model's few-shot score.

    θ(λ) = θ0 + T · Σ_i (F_i(λ_i) + ε) λ_i τ_i / Σ_i (F_i(λ_i) + ε),      τ_i = θ_i − θ0

F_i(λ_i) is the diagonal Fisher of expert i's task model (its own head) *at the scaled weights*
θ0 + λ_i τ_i, on up to ``fisher_examples`` of its task's few-shot examples — the "Fisher conditioned by
the coefficients" of the paper, recomputed for every λ tried. The factor T (the number of experts) is
the released code's: with equal Fishers θ(λ) is Task Arithmetic with one λ per expert, and at λ_i = 1/T
it is Fisher merging (with the Fishers taken at θ0 + τ_i/T). λ lies in [lambda_min, lambda_max]^T
(the code: [0, 1]); a Gaussian-process optimiser (``layermerge.methods.bayes_opt``) proposes λ to
maximise the mean over tasks of the merged model's accuracy (or minus its loss) on all the few-shot
data, starting from ``init`` and returning the best λ it evaluated.

The Fisher and the objective read the same few-shot data, unsplit: the released code too draws its 30
Fisher examples from the validation set it scores, a Fisher only weighs parameters (λ is what is
fitted to the score), and halving 16–64 shots per task would make both noisier.

Cost: every evaluation runs T Fisher passes (one backward per example, per class with ``expected``)
and a forward pass over all the few-shot data; ``fisher_at="expert"`` computes the Fishers once at the
experts instead (a static-Fisher variant, far cheaper). Memory: the experts' task models (all kept,
every evaluation uses each) plus about nine backbone-sized fp32 buffers (T more with
``fisher_at="expert"``, which keeps every Fisher). See docs/METHODS_DF_MERGE.md.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Literal

import numpy as np
import torch
from pydantic import Field, field_validator, model_validator

from layermerge.errors import ConfigError, DataError
from layermerge.methods.base import DataDrivenMethod
from layermerge.methods.bayes_opt import maximize
from layermerge.methods.fisher import FisherAverage, diagonal_fisher, single_examples
from layermerge.methods.registry import MethodParams, register
from layermerge.methods.supervision import correct_count, predicts_next_token, supervised_loss_sum
from layermerge.norm_stats import experts_mean_statistics, is_running_statistic


def fisher_examples_of(batches: Sequence[Mapping], limit: int | None) -> list[dict]:
    """The first ``limit`` examples of a task's batches, one per batch (``diagonal_fisher`` takes batches)."""
    examples = [example for batch in batches for example in single_examples(batch)]
    return examples if limit is None else examples[:limit]


def task_score(logits: torch.Tensor, labels: torch.Tensor, objective: str, shift: bool = False) -> tuple[float, int]:
    """Summed correct predictions (``accuracy``) or summed loss (``loss``: cross-entropy, squared error
    for a one-output head) over a batch, and the number of labelled predictions (−100 is ignored): one
    per example for a classification head, one per labelled token for a language model (``shift``: the
    labels follow the input tokens, ``layermerge.methods.supervision``)."""
    if objective == "loss":
        total, count = supervised_loss_sum(logits, labels, shift=shift)
        return float(total), count
    return correct_count(logits, labels, shift=shift)


@register("df_merge", summary="Fisher-weighted merge of scaled task vectors whose per-expert scales are chosen by "
                              "Bayesian optimisation on the few-shot accuracy, Fishers recomputed at each scale "
                              "(DF-Merge, Lee et al. 2025)", needs_data=True, kind="model")
class DFMerge(DataDrivenMethod):
    artifact_name = "lambdas"

    class Params(MethodParams):
        init_points: int = Field(10, ge=1, description="evaluations before the Gaussian process guides the search: "
                                                       "the start point `init`, then seeded uniform points (the "
                                                       "released code: 10 random points)")
        iterations: int = Field(50, ge=0, description="evaluations chosen by expected improvement after those (the "
                                                      "released code: 50); 0 with init_points 1 merges at `init`")
        init: list[float] | None = Field(
            None, description="the first λ evaluated: one value for every expert (a number or a one-value list) "
                              "or one per expert in expert order; default 1/T each (Fisher merging's weights), "
                              "moved into the bounds")
        lambda_min: float = Field(0.0, description="lower bound of every λ (the released code: 0)")
        lambda_max: float = Field(1.0, description="upper bound of every λ (the released code: 1)")
        objective: Literal["accuracy", "loss"] = Field(
            "accuracy", description="what λ maximises: the mean over tasks of the merged model's accuracy on the "
                                    "few-shot data (the paper), or minus its mean loss (cross-entropy; squared "
                                    "error for one-output heads)")
        fisher_at: Literal["scaled", "expert"] = Field(
            "scaled", description="where each expert's Fisher is taken: at θ0 + λ_i τ_i, recomputed for every λ "
                                  "(DF-Merge), or once at the expert (cheaper; not the paper's)")
        fisher_labels: Literal["true", "sampled", "expected"] = Field(
            "expected", description="y in the Fisher's log p(y|x): the data's labels, one label sampled from the "
                                    "model's prediction (seeded), or the exact expectation over labels (the "
                                    "released code; one backward pass per class)")
        fisher_examples: int | None = Field(30, ge=1, description="Fisher examples per task: the first n few-shot "
                                                                  "examples (the released code: 30); null = all")
        epsilon: float = Field(1e-8, gt=0, description="ε added to every Fisher; elements no example reaches get "
                                                       "Task Arithmetic Σ λ_i τ_i")
        xi: float = Field(0.01, ge=0, description="expected improvement's exploration margin, in the objective's "
                                                  "units (the released code: 0.01)")

        @field_validator("fisher_labels", mode="before")
        @classmethod
        def _yaml_true(cls, value):
            """YAML reads an unquoted ``true`` as a boolean; it means the true labels here."""
            return "true" if value is True else value

        @field_validator("init", mode="before")
        @classmethod
        def _one_number(cls, value):
            """A single number means that λ for every expert."""
            return [value] if isinstance(value, (int, float)) and not isinstance(value, bool) else value

        @model_validator(mode="after")
        def _bounds(self):
            if not (math.isfinite(self.lambda_min) and math.isfinite(self.lambda_max)
                    and self.lambda_min < self.lambda_max):
                raise ValueError(f"need finite lambda_min < lambda_max, got {self.lambda_min} and {self.lambda_max}")
            if self.init is not None and not self.init:
                raise ValueError("init must hold at least one value")
            if any(not self.lambda_min <= value <= self.lambda_max for value in self.init or []):
                raise ValueError(f"init {self.init} must lie within [lambda_min, lambda_max] = "
                                 f"[{self.lambda_min}, {self.lambda_max}]")
            return self

    def start_point(self, count: int) -> list[float]:
        """λ evaluated first, one per expert (see ``init``)."""
        p = self.params
        if p.init is None:
            return [min(max(1.0 / count, p.lambda_min), p.lambda_max)] * count
        if len(p.init) == 1:
            return list(p.init) * count
        if len(p.init) != count:
            raise ConfigError(f"df_merge: init has {len(p.init)} values but there are {count} experts; give one "
                              "value, or one per expert in expert order")
        return list(p.init)

    # ----------------------------------------------------------------- the merge
    def merge_models(self, ctx):
        from layermerge.methods.base import ModelMergeResult

        p = self.params
        tasks = ctx.tasks
        start = self.start_point(len(tasks))
        seed = int(torch.randint(0, 2 ** 31 - 1, (), generator=ctx.generator))   # from the engine seed
        base = ctx.base_state()
        # λ combines the float weights; running statistics are the experts' mean (layermerge.norm_stats).
        keys = [key for key, tensor in base.items() if tensor.is_floating_point() and not is_running_statistic(key)]
        statistics = experts_mean_statistics(ctx, base)
        examples = {task: self._fisher_examples(task, ctx.batches(task)) for task in tasks}
        shifts = {task: predicts_next_token(ctx.task_model(task)) for task in tasks}
        self._check_objective(ctx, shifts)
        fixed_fishers: dict[str, dict[str, torch.Tensor]] = {}

        def fisher(task: str, weights: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            names = [key for key in ctx.parameter_keys(task) if key in weights]
            result, count = diagonal_fisher(lambda backbone, batch: ctx.logits(task, backbone, batch),
                                            {key: weights[key] for key in names}, examples[task],
                                            p.fisher_labels, ctx.generator, shift=shifts[task])
            if count == 0:
                raise DataError(f"df_merge: task '{task}' has no usable Fisher example (all labels ignored?)")
            return result

        def merged(lambdas: Sequence[float]) -> dict[str, torch.Tensor]:
            average = FisherAverage(p.epsilon)
            for task, lam in zip(tasks, lambdas):
                expert = ctx.expert_state(task)
                vector = {key: expert[key] - base[key] for key in keys}
                if p.fisher_at == "expert":
                    if task not in fixed_fishers:
                        fixed_fishers[task] = fisher(task, expert)
                    weights = fixed_fishers[task]
                else:
                    weights = fisher(task, {key: base[key] + lam * vector[key] for key in keys})
                del expert
                with torch.no_grad():
                    average.add({key: tensor.mul_(lam) for key, tensor in vector.items()}, weights)
                del vector, weights
            with torch.no_grad():
                combined = average.result()
                state = dict(base)
                for key in keys:
                    state[key] = combined.pop(key).mul_(len(tasks)).add_(base[key])
                state.update(statistics)
            return state

        history: list[dict] = []
        best: dict = {"value": -math.inf, "state": None}

        def evaluate(point: np.ndarray) -> float:
            lambdas = [float(value) for value in point]
            state = merged(lambdas)
            value, per_task = self._score(ctx, state, shifts)
            history.append({"lambdas": dict(zip(tasks, lambdas)), "objective": value, "per_task": per_task})
            if value > best["value"]:                 # strictly: the first of equal scores is kept, as argmax
                best.update(value=value, state=state)
            return value

        result = maximize(evaluate, [p.lambda_min] * len(tasks), [p.lambda_max] * len(tasks), start=start,
                          init_points=p.init_points, iterations=p.iterations, seed=seed, xi=p.xi,
                          progress=lambda steps: ctx.progress(steps, "df_merge: evaluations"))
        chosen = history[result.best_index]
        stats = {
            "objective": p.objective, "fisher_at": p.fisher_at, "fisher_labels": p.fisher_labels,
            "fisher_examples": {task: len(examples[task]) for task in tasks}, "epsilon": p.epsilon,
            "bounds": [p.lambda_min, p.lambda_max], "seed": seed, "evaluations": history,
            "best_evaluation": result.best_index, "lambdas": chosen["lambdas"],
            "objective_start": history[0]["objective"], "objective_best": chosen["objective"],
        }
        artifacts = {task: torch.tensor(value) for task, value in chosen["lambdas"].items()}
        return ModelMergeResult(best["state"], artifacts=artifacts, stats=stats)

    # ----------------------------------------------------------------- data and scores
    def _fisher_examples(self, task: str, batches: list[Mapping]) -> list[dict]:
        for batch in batches:
            if "labels" not in batch:
                raise DataError(f"df_merge scores every candidate merge on labelled few-shot data, but a batch of "
                                f"'{task}' has no 'labels' (keys: {sorted(batch)}); give labelled batches or a "
                                "data: section naming a labelled task")
        return fisher_examples_of(batches, self.params.fisher_examples)

    def _check_objective(self, ctx, shifts: Mapping[str, bool]) -> None:
        """Refuse heads the objective cannot score, before any Fisher is computed."""
        for task in ctx.tasks:
            batch = ctx.batches(task)[0]
            with torch.no_grad():
                logits = ctx.logits(task, {}, batch)
            if logits.dim() not in (2, 3):
                raise ConfigError(f"df_merge: the head of '{task}' returned logits of shape {tuple(logits.shape)}; "
                                  "DF-Merge supports heads with one prediction per example (batch, classes) and "
                                  "language models (batch, positions, vocabulary)")
            if logits.dim() == 3 and self.params.fisher_labels == "expected":
                raise ConfigError(f"df_merge: '{task}' is a language model, whose Fisher cannot sum over every "
                                  "token of the vocabulary at every position; use fisher_labels: true (the "
                                  "completions' tokens) or sampled")
            if logits.shape[-1] == 1 and self.params.objective == "accuracy":
                raise ConfigError(f"df_merge: '{task}' has a one-output (regression) head, whose accuracy is "
                                  "undefined; use objective: loss")
            task_score(logits, batch["labels"], self.params.objective, shifts[task])   # refuses misaligned labels

    def _score(self, ctx, state: Mapping[str, torch.Tensor], shifts: Mapping[str, bool]
               ) -> tuple[float, dict[str, float]]:
        """The objective (to maximise) and each task's accuracy or mean loss, on all the few-shot data."""
        per_task = {}
        with torch.no_grad():
            for task in ctx.tasks:
                total, count = 0.0, 0
                for batch in ctx.batches(task):
                    value, rows = task_score(ctx.logits(task, state, batch), batch["labels"], self.params.objective,
                                              shifts[task])
                    total, count = total + value, count + rows
                if count == 0:
                    raise DataError(f"df_merge: task '{task}' has no labelled example to score (all labels -100?)")
                per_task[task] = total / count
        mean = sum(per_task.values()) / len(per_task)
        return (mean if self.params.objective == "accuracy" else -mean), per_task


__all__ = ["DFMerge", "fisher_examples_of", "task_score"]
