"""Task-vector statistics of an expert set, computed by streaming one tensor at a time.

Before merging it helps to know how the experts relate: how far each moved from the base, whether
their task vectors point the same way, and how often they disagree in sign (the interference TIES
and EMR resolve). Everything here is accumulated per tensor, in chunks, so a model of any size is
inspected with the memory of one tensor per checkpoint.

Definitions, over every merged (backbone) tensor, with τ_i = θ_i − θ_0 flattened and concatenated
(for ``vocab_policy='base_rows'`` only the base's vocabulary rows enter):

* ``norm_i = ‖τ_i‖₂``; ``base_norm = ‖θ_0‖₂`` over the same tensors.
* ``cosine_ij = ⟨τ_i, τ_j⟩ / (‖τ_i‖ ‖τ_j‖)``; undefined (``None``) when either vector is zero.
* ``both_nonzero_ij`` = number of entries where τ_i ≠ 0 and τ_j ≠ 0 (exact zeros, in float32).
* ``sign_conflict_ij`` = (entries where τ_i ≠ 0, τ_j ≠ 0 and sign τ_i ≠ sign τ_j) / ``both_nonzero_ij``:
  the rate of sign disagreement among the entries both tasks changed; ``None`` when no entry is
  changed by both. Multiply by ``both_nonzero_ij / numel`` for the rate over all entries. Two
  independent random task vectors give about 0.5; 0 means the experts never pull against each other.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from layermerge.errors import IncompatibleExpertsError, OutputWriteError, os_error_message
from layermerge.experts import ExpertSet
from layermerge.progress import progress

CHUNK = 1 << 22  # entries per chunk: bounds the T×chunk float64 temporaries to ~32 MiB per task
MAX_LISTED = 5


@dataclass
class NonFinite:
    """One tensor holding NaN or Inf values."""

    checkpoint: str  # "base" or the task name
    key: str
    count: int


@dataclass
class TaskVectorStats:
    """Norms, cosine similarities and sign-conflict rates of the task vectors (see the module doc)."""

    names: list[str]
    tensors: int
    numel: int
    norms: list[float]
    base_norm: float
    cosine: list[list[float | None]]
    sign_conflict: list[list[float | None]]
    both_nonzero: list[list[int]]
    nonfinite: list[NonFinite] = field(default_factory=list)
    checked_finite: bool = True

    def to_dict(self) -> dict:
        """JSON-able; undefined values (and NaN, when NaN/Inf was not checked) are ``None``."""
        return {
            "tasks": self.names, "tensors": self.tensors, "numel": self.numel,
            "norms": dict(zip(self.names, map(_finite, self.norms))), "base_norm": _finite(self.base_norm),
            "relative_norms": dict(zip(self.names, map(_finite, self.relative_norms()))),
            "cosine": [[_finite(v) for v in row] for row in self.cosine],
            "sign_conflict": [[_finite(v) for v in row] for row in self.sign_conflict],
            "both_nonzero": self.both_nonzero,
            "checked_finite": self.checked_finite,
            "nonfinite": [vars(item) for item in self.nonfinite],
        }

    def relative_norms(self) -> list[float | None]:
        return [n / self.base_norm if self.base_norm > 0 else None for n in self.norms]

    def table_lines(self) -> list[str]:
        """A plain-text report: per-task norms, then the two pairwise matrices."""
        width = max(8, *(len(name) for name in self.names)) + 2
        lines = [f"task vectors over {self.tensors} merged tensors ({self.numel:,} entries each):",
                 f"  {'task':<{width}}{'|tau|':>12}{'|tau|/|theta0|':>16}"]
        for name, norm, rel in zip(self.names, self.norms, self.relative_norms()):
            lines.append(f"  {name:<{width}}{norm:>12.5g}{_fmt(rel, 16, '.4g')}")
        for title, matrix in (("cosine similarity of task vectors", self.cosine),
                              ("sign-conflict rate (among entries both tasks changed)", self.sign_conflict)):
            lines.append(f"{title}:")
            lines.append("  " + " " * width + "".join(f"{name:>{width}}" for name in self.names))
            for name, row in zip(self.names, matrix):
                lines.append(f"  {name:<{width}}" + "".join(_fmt(value, width, '.3f') for value in row))
        if self.checked_finite and not self.nonfinite:
            lines.append("finite: every tensor of the base and the experts is free of NaN/Inf")
        return lines


def _finite(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


def _fmt(value: float | None, width: int, spec: str) -> str:
    return f"{'n/a':>{width}}" if value is None else f"{value:>{width}{spec}}"


def _nonfinite_count(tensor: torch.Tensor) -> int:
    if not tensor.is_floating_point():
        return 0
    return int((~torch.isfinite(tensor)).sum())


def task_vector_stats(expert_set: ExpertSet, check_finite: bool = True, quiet: bool = True,
                      chunk: int = CHUNK) -> TaskVectorStats:
    """Stream every merged tensor once and accumulate the statistics of the module doc.

    With ``check_finite`` every tensor (backbone of base and experts, and the experts' heads) is
    scanned for NaN/Inf; offenders are collected, not raised, so a report can list them all.
    """
    if expert_set.base is None:
        raise IncompatibleExpertsError("task-vector statistics need a base model: τ_i = θ_i − θ_0")
    names = expert_set.names
    count = len(names)
    gram = torch.zeros(count, count, dtype=torch.float64)      # Σ ⟨τ_i, τ_j⟩
    both = torch.zeros(count, count, dtype=torch.float64)      # Σ [τ_i ≠ 0][τ_j ≠ 0]
    agree_minus = torch.zeros(count, count, dtype=torch.float64)  # Σ sign τ_i · sign τ_j
    base_sq = torch.zeros((), dtype=torch.float64)
    numel = 0
    nonfinite: list[NonFinite] = []
    keys = expert_set.report.merge_keys
    for key, base, experts in progress(expert_set.iter_merge_tensors(check_finite=False), total=len(keys),
                                       disable=quiet, desc="inspect", unit="tensor"):
        if check_finite:
            for name, tensor in zip(["base", *names], [base, *experts]):
                bad = _nonfinite_count(tensor)
                if bad:
                    nonfinite.append(NonFinite(name, key, bad))
        flat_base = base.reshape(-1)
        flat_experts = [expert.reshape(-1) for expert in experts]
        numel += flat_base.numel()
        for start in range(0, flat_base.numel(), chunk):
            part = flat_base[start:start + chunk]
            vectors = torch.stack([e[start:start + chunk] - part for e in flat_experts]).double()
            gram += vectors @ vectors.T
            base_sq += part.double().square().sum()
            signs = torch.sign(vectors)
            changed = (vectors != 0).double()
            both += changed @ changed.T
            agree_minus += signs @ signs.T
        del base, experts, flat_base, flat_experts
    if check_finite:
        for task in names:
            for key, tensor in expert_set.head_state(task).items():
                bad = _nonfinite_count(tensor)
                if bad:
                    nonfinite.append(NonFinite(task, key, bad))

    # On entries both tasks changed, sign·sign is +1 (agree) or −1 (conflict):
    # agree − conflict = agree_minus and agree + conflict = both, so conflict = (both − agree_minus) / 2.
    conflicts = (both - agree_minus) / 2
    norms = gram.diagonal().clamp_min(0).sqrt()
    cosine = [[_ratio(gram[i, j].item(), (norms[i] * norms[j]).item()) for j in range(count)]
              for i in range(count)]
    conflict_rate = [[_ratio(conflicts[i, j].item(), both[i, j].item()) for j in range(count)]
                     for i in range(count)]
    return TaskVectorStats(
        names=names, tensors=len(keys), numel=numel, norms=[float(n) for n in norms],
        base_norm=math.sqrt(float(base_sq)), cosine=cosine, sign_conflict=conflict_rate,
        both_nonzero=[[int(round(v)) for v in row] for row in both.tolist()],
        nonfinite=nonfinite, checked_finite=check_finite,
    )


def _ratio(numerator: float, denominator: float) -> float | None:
    if denominator <= 0 or not math.isfinite(denominator):
        return None
    return numerator / denominator


def nonfinite_error(stats: TaskVectorStats) -> IncompatibleExpertsError:
    """One error naming the first offending tensors, as the merge would raise."""
    items = stats.nonfinite
    shown = ", ".join(f"'{i.checkpoint}' {i.key!r} ({i.count} values)" for i in items[:MAX_LISTED])
    more = f" (and {len(items) - MAX_LISTED} more tensors)" if len(items) > MAX_LISTED else ""
    return IncompatibleExpertsError(
        f"{len(stats.nonfinite)} tensors hold NaN/Inf values: {shown}{more}. A diverged fine-tune cannot be "
        "merged; re-train that expert or drop it from the set."
    )


def save_heatmap(stats: TaskVectorStats, path: str | Path) -> Path:
    """Cosine-similarity and sign-conflict matrices side by side, values annotated, as a PNG."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    count = len(stats.names)
    side = max(3.5, 0.9 * count + 1.5)
    figure = Figure(figsize=(2 * side + 1.5, side), dpi=100)
    FigureCanvasAgg(figure)
    panels = (("cosine similarity of task vectors", stats.cosine, "RdBu_r", -1.0, 1.0),
              ("sign-conflict rate", stats.sign_conflict, "viridis", 0.0, 1.0))
    for index, (title, matrix, cmap, low, high) in enumerate(panels):
        axes = figure.add_subplot(1, 2, index + 1)
        values = [[math.nan if v is None else v for v in row] for row in matrix]
        image = axes.imshow(values, cmap=cmap, vmin=low, vmax=high)
        figure.colorbar(image, ax=axes, fraction=0.046, pad=0.04)
        axes.set_title(title, fontsize=10)
        axes.set_xticks(range(count), labels=stats.names, rotation=45, ha="right")
        axes.set_yticks(range(count), labels=stats.names)
        for i in range(count):
            for j in range(count):
                value = matrix[i][j]
                position = 0.5 if value is None else (value - low) / (high - low)
                dark = position < 0.35 or (cmap == "RdBu_r" and position > 0.65)
                axes.text(j, i, "n/a" if value is None else f"{value:.2f}", ha="center", va="center",
                          fontsize=9, color="white" if dark else "black")
    figure.tight_layout()
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(path, format="png")
    except OSError as exc:  # no permission, a file where a folder should be, disk full...
        raise OutputWriteError(os_error_message(exc, "write the heatmap", path)) from exc
    return path
