"""Fisher merging (Matena & Raffel, NeurIPS 2022): a per-parameter weighted average of the experts,
each weighted by its diagonal Fisher information on its own task.

F_i = (1/N) Σ_n E_y[(∂ log p_i(y | x_n) / ∂θ)²], one backward pass per example (and per label when the
expectation over labels is exact), through expert i's full task model (its own head) on its task's
few-shot examples. Merged θ = Σ_i (F_i + ε) θ_i / Σ_i (F_i + ε): ε smooths elements no example
reaches towards the plain average. y is the true label, a label sampled from the expert's own
prediction (seeded), or the exact expectation over all labels (the authors' code); one-output
(regression) heads use a unit-variance Gaussian likelihood; for a causal language model y is the
sequence of an example's labelled tokens (the completion, ``layermerge.methods.supervision``).
Memory: the experts' task models (one in use at a time) plus five backbone-sized fp32 buffers at
peak (its weights, one gradient, its Fisher, the two running sums) — a ``kind="model"``
method, see docs/REGMEAN_FISHER.md.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Literal

import torch
from pydantic import Field, field_validator

from layermerge.errors import ConfigError, DataError
from layermerge.methods.base import DataDrivenMethod
from layermerge.methods.registry import MethodParams, register
from layermerge.methods.supervision import IGNORE_INDEX, predicted_labels, prediction_targets, predicts_next_token

LogitsFn = Callable[[dict[str, torch.Tensor], dict[str, torch.Tensor]], torch.Tensor]


# --------------------------------------------------------------------- the pure core
def single_examples(batch: Mapping[str, object]) -> Iterator[dict[str, object]]:
    """The examples of a batch one at a time (tensors sliced to a batch of one, the rest kept)."""
    sizes = {int(v.shape[0]) for v in batch.values() if isinstance(v, torch.Tensor) and v.dim() >= 1}
    if len(sizes) != 1:
        raise DataError(f"cannot split a few-shot batch into examples: its tensors have first dimensions "
                        f"{sorted(sizes)} (keys {sorted(batch)}); every tensor must share the batch dimension")
    for index in range(sizes.pop()):
        yield trim_padding({key: value[index:index + 1] if isinstance(value, torch.Tensor) and value.dim() >= 1
                            else value for key, value in batch.items()})


def trim_padding(example: dict[str, object]) -> dict[str, object]:
    """Cut a one-example text batch after its last real token (``attention_mask``): the batch was padded
    to its longest row, and padding only costs time (masked tokens do not change the real ones)."""
    mask = example.get("attention_mask")
    if not isinstance(mask, torch.Tensor) or mask.dim() != 2 or mask.shape[0] != 1:
        return example
    real = mask[0].nonzero()
    width = mask.shape[1]
    end = int(real[-1]) + 1 if real.numel() else width
    if end == width:
        return example
    return {key: value[:, :end] if isinstance(value, torch.Tensor) and value.dim() >= 2 and value.shape[1] == width
            else value for key, value in example.items()}


def _likelihood_terms(logits: torch.Tensor, labels, mode: str, generator: torch.Generator, shift: bool
                      ) -> list[tuple[float, torch.Tensor]]:
    """(weight, differentiable scalar) pairs whose weighted squared gradients sum to one example's
    Fisher contribution (``labels``: the example's label tensor, None when none is read)."""
    if logits.dim() == 3 and logits.shape[0] == 1:
        return _sequence_terms(logits, labels, mode, generator, shift)
    if logits.dim() != 2 or logits.shape[0] != 1:
        raise ConfigError(f"fisher: the task head returned logits of shape {tuple(logits.shape)}; Fisher merging "
                          "supports heads with one prediction per example (batch, classes), such as sequence or "
                          "image classification, and language models (batch, positions, vocabulary)")
    label = None if labels is None else labels.reshape(-1)[0]
    if logits.shape[1] == 1:
        # Regression, unit-variance Gaussian: ∂ log p / ∂θ = (y − f) ∂f/∂θ.
        prediction = logits[0, 0]
        if mode == "true":
            residual = float(label) - float(prediction.detach())
        elif mode == "sampled":
            residual = float(torch.randn((), generator=generator))
        else:                                             # E[(y − f)²] = 1
            residual = 1.0
        return [(residual * residual, prediction)]
    log_probs = torch.log_softmax(logits[0], dim=-1)
    if mode == "true":
        return [(1.0, log_probs[int(label)])]
    probs = log_probs.detach().exp().cpu().double()
    if mode == "sampled":
        drawn = int(torch.multinomial(probs, 1, generator=generator))
        return [(1.0, log_probs[drawn])]
    return [(float(p), log_probs[c]) for c, p in enumerate(probs) if p > 0]


def _sequence_terms(logits: torch.Tensor, labels, mode: str, generator: torch.Generator, shift: bool
                    ) -> list[tuple[float, torch.Tensor]]:
    """A language model's one term: log p(y | x) = Σ_t log p(y_t | x, y_<t) over the labelled positions
    (every position without labels), y_t the label (``true``) or drawn from the model's prediction at t
    given the real prefix (``sampled``: its per-position draws are independent, so the diagonal is the
    sum of the positions' own Fishers)."""
    if mode == "expected":
        raise ConfigError("fisher: fisher_labels='expected' sums over every class, which for a language model is "
                          "one backward pass per vocabulary entry and position; use 'true' (the completions' "
                          "tokens) or 'sampled'")
    if labels is None:                          # nothing says which positions count: all of them
        flat, _ = prediction_targets(logits, torch.zeros(logits.shape[:2], dtype=torch.long), shift=shift)
        targets, keep = None, torch.arange(flat.shape[0], device=logits.device)
    else:
        flat, targets = prediction_targets(logits, labels, shift=shift)
        keep = (targets != IGNORE_INDEX).nonzero().reshape(-1)
    picked = flat[keep]
    log_probs = torch.log_softmax(picked.float() if picked.dtype in (torch.float16, torch.bfloat16) else picked, -1)
    if mode == "true":
        chosen = targets[keep].long()
    else:
        chosen = torch.multinomial(log_probs.detach().exp().cpu().double(), 1, generator=generator).reshape(-1)
    return [(1.0, log_probs[torch.arange(len(keep), device=logits.device), chosen.to(logits.device)].sum())]


def diagonal_fisher(logits_fn: LogitsFn, params: Mapping[str, torch.Tensor], batches: Iterable[Mapping],
                    labels: Literal["true", "sampled", "expected"] = "true",
                    generator: torch.Generator | None = None,
                    progress: Callable[[Iterable], Iterable] | None = None,
                    shift: bool = False) -> tuple[dict[str, torch.Tensor], int]:
    """Diagonal Fisher of ``params`` (mean over examples of squared per-example gradients of log p(y|x)).

    ``logits_fn(params, example)`` returns the logits of one example with ``params`` in place of the
    model's: (1, classes), or (1, positions, vocabulary) for a language model, whose y is the sequence
    of its labelled tokens (``_sequence_terms``; ``shift``: labels follow the input tokens, see
    ``layermerge.methods.supervision``). ``labels``: the true ``labels`` of each batch, labels sampled
    from the model's prediction with ``generator``, or the exact expectation over labels. Returns
    (Fisher with the keys of ``params``, number of examples used; examples whose true labels are all
    -100 are skipped).
    """
    generator = generator or torch.Generator().manual_seed(0)
    leaves = {key: value.detach().requires_grad_(True) for key, value in params.items()}  # no copy
    names = list(leaves)
    fisher = {key: torch.zeros_like(value) for key, value in leaves.items()}
    examples = [example for batch in batches for example in single_examples(batch)]
    count = 0
    for example in (progress(examples) if progress is not None else examples):
        label = example.get("labels") if labels != "expected" else None
        if labels == "true":
            if label is None:
                raise DataError("fisher_labels='true' needs labels in every few-shot batch; give labelled data "
                                "or choose fisher_labels='sampled' or 'expected'")
            if not label.is_floating_point() and not bool((predicted_labels(label, shift) != IGNORE_INDEX).any()):
                continue
        inputs = {key: value for key, value in example.items() if key != "labels"}
        logits = logits_fn(leaves, inputs)
        terms = _likelihood_terms(logits, label, labels, generator, shift)
        for position, (weight, value) in enumerate(terms):
            grads = torch.autograd.grad(value, [leaves[k] for k in names], retain_graph=position < len(terms) - 1,
                                        allow_unused=True)
            for key, grad in zip(names, grads):
                if grad is not None:
                    fisher[key].addcmul_(grad, grad, value=weight)
        count += 1
    if count:
        for tensor in fisher.values():
            tensor.div_(count)
    return fisher, count


class FisherAverage:
    """Running Σ_i (F_i + ε) θ_i and Σ_i (F_i + ε), one expert at a time (two backbone-sized buffers)."""

    def __init__(self, epsilon: float):
        if not epsilon > 0:
            raise ConfigError(f"fisher: epsilon must be > 0 (it keeps the denominator positive), got {epsilon}")
        self.epsilon = epsilon
        self.numerator: dict[str, torch.Tensor] = {}
        self.denominator: dict[str, torch.Tensor] = {}
        self.first: dict[str, torch.Tensor] = {}

    def add(self, state: Mapping[str, torch.Tensor], fisher: Mapping[str, torch.Tensor]) -> None:
        for key, theta in state.items():
            if not theta.is_floating_point():
                self.first.setdefault(key, theta)
                continue
            weight = fisher[key] + self.epsilon if key in fisher else torch.full_like(theta, self.epsilon)
            if key in self.numerator:
                self.numerator[key].addcmul_(weight, theta)
                self.denominator[key].add_(weight)
            else:
                self.numerator[key] = weight * theta
                self.denominator[key] = weight

    def result(self) -> dict[str, torch.Tensor]:
        merged = {key: self.numerator[key] / self.denominator[key] for key in self.numerator}
        merged.update(self.first)
        return merged


def fisher_weighted_average(states: list[Mapping[str, torch.Tensor]], fishers: list[Mapping[str, torch.Tensor]],
                            epsilon: float = 1e-8) -> dict[str, torch.Tensor]:
    """θ = Σ_i (F_i + ε) θ_i / Σ_i (F_i + ε) per element (keys missing from a Fisher count as zero;
    non-float tensors are taken from the first state)."""
    average = FisherAverage(epsilon)
    for state, fisher in zip(states, fishers, strict=True):
        average.add(state, fisher)
    return average.result()


def fisher_norm(fisher: Mapping[str, torch.Tensor]) -> float:
    """‖F‖₂ over every element of every tensor."""
    return float(sum(float(t.double().square().sum()) for t in fisher.values())) ** 0.5


# --------------------------------------------------------------------- the model method
@register("fisher", summary="per-parameter average weighted by each expert's diagonal Fisher on its own task's "
                            "few-shot data (Matena & Raffel 2022)", needs_data=True, kind="model", needs_base=False)
class FisherMerging(DataDrivenMethod):
    artifact_name = "fishers"

    class Params(MethodParams):
        fisher_labels: Literal["auto", "true", "sampled", "expected"] = Field(
            "auto", description="y in log p(y|x): the data's true labels, one label sampled from the expert's "
                                "prediction (seeded), or the exact expectation over labels (the authors' code; "
                                "one backward pass per class; not for language models); auto = true when every "
                                "batch has labels, else expected (sampled for a causal language model)")
        epsilon: float = Field(1e-8, gt=0, description="ε added to every Fisher: θ = Σ(F_i+ε)θ_i / Σ(F_i+ε); "
                                                       "elements with no signal fall back to the average")
        normalize: bool = Field(False, description="divide each expert's Fisher by its L2 norm first so that no "
                                                   "task dominates by scale (as the authors' code does by "
                                                   "default; the paper's formula does not)")
        save_fishers: bool = Field(False, description="save every expert's Fisher (backbone-sized per expert) as "
                                                      "fisher/artifacts.safetensors, keys '<task>/<tensor>'")

        @field_validator("fisher_labels", mode="before")
        @classmethod
        def _yaml_true(cls, value):
            """YAML reads an unquoted ``true`` as a boolean; it means the true labels here."""
            return "true" if value is True else value



    def merge_models(self, ctx):
        from layermerge.methods.base import ModelMergeResult

        p = self.params
        average = FisherAverage(p.epsilon)
        artifacts: dict[str, torch.Tensor] = {}
        stats: dict = {"fisher_labels": {}, "examples": {}, "fisher_norm": {}, "zero_fraction": {},
                       "epsilon": p.epsilon, "normalize": p.normalize}
        for task in ctx.tasks:
            batches = ctx.batches(task)
            shift = predicts_next_token(ctx.task_model(task))
            mode = self._mode(task, batches, shift)
            state = ctx.expert_state(task)
            # Buffers (BatchNorm statistics) take no gradient: Fisher 0, so they are averaged.
            keys = [key for key in ctx.parameter_keys(task) if state[key].is_floating_point()]
            fisher, count = diagonal_fisher(
                lambda backbone, batch, task=task: ctx.logits(task, backbone, batch), {k: state[k] for k in keys},
                batches, mode, ctx.generator, lambda items, task=task: ctx.progress(items, f"fisher: {task}"),
                shift=shift)
            if count == 0:
                raise DataError(f"fisher: task '{task}' has no usable example (all labels ignored?)")
            norm = fisher_norm(fisher)
            if p.normalize and norm > 0:
                for tensor in fisher.values():
                    tensor.div_(norm)
            elements = sum(t.numel() for t in fisher.values())
            stats["fisher_labels"][task] = mode
            stats["examples"][task] = count
            stats["fisher_norm"][task] = norm
            stats["zero_fraction"][task] = sum(int((t == 0).sum()) for t in fisher.values()) / max(elements, 1)
            if p.save_fishers:
                artifacts.update({f"{task}/{key}": t.detach().cpu() for key, t in fisher.items()})
            average.add(state, fisher)
            del state, fisher
            ctx.release(task)           # one expert's model in memory at a time
        return ModelMergeResult(average.result(), artifacts, {}, stats)

    def _mode(self, task: str, batches: list[Mapping], language_model: bool) -> str:
        mode = self.params.fisher_labels
        labelled = all("labels" in batch for batch in batches)
        if mode == "auto":
            return "true" if labelled else ("sampled" if language_model else "expected")
        if mode == "true" and not labelled:
            raise DataError(f"fisher: fisher_labels='true' but task '{task}' has batches without labels; give "
                            "labelled data or use fisher_labels='sampled' or 'expected'")
        return mode


__all__ = ["FisherAverage", "FisherMerging", "diagonal_fisher", "fisher_norm", "fisher_weighted_average",
           "single_examples", "trim_padding"]
