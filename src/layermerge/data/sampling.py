"""The seeded K-shot sampler every data-driven method shares.

``sample_few_shot(task, k, seed)`` draws ``k`` examples **in total** from the task's **train** split
(never validation or test, so few-shot merging cannot leak evaluation data). For classification it
is stratified and balanced: every class gets ⌊k/C⌋ examples and the remaining k mod C go to classes
picked in a seeded random order; a class with too few examples gives its unfilled share to the
others. Regression tasks (STS-B), generation tasks and ``stratified=False`` draw uniformly without
replacement. The
same (task, k, seed) always yields the same examples, returned in their train-file order.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from layermerge.data.sources import TaskData, load_split
from layermerge.data.tasks import Task, get_task
from layermerge.errors import DataError


def balanced_quotas(counts: dict[int, int], k: int, rng: np.random.Generator) -> dict[int, int]:
    """How many examples each class gets: as equal as possible, capped by what each class has."""
    classes = [c for c in rng.permutation(sorted(counts)).tolist() if counts[c] > 0]
    quotas = {c: 0 for c in counts}
    remaining = k
    while remaining > 0:
        open_classes = [c for c in classes if quotas[c] < counts[c]]
        if not open_classes:
            break
        share, extra = divmod(remaining, len(open_classes))
        for position, c in enumerate(open_classes):
            want = share + (1 if position < extra else 0)
            got = min(want, counts[c] - quotas[c])
            quotas[c] += got
            remaining -= got
    return quotas


def few_shot_indices(labels: np.ndarray, k: int, seed: int, stratified: bool, regression: bool) -> np.ndarray:
    """Sorted train-row indices of the K-shot sample (the pure part of ``sample_few_shot``)."""
    rng = np.random.default_rng(seed)
    if not stratified or regression:
        return np.sort(rng.choice(len(labels), size=k, replace=False))
    values, counts = np.unique(labels, return_counts=True)
    quotas = balanced_quotas(dict(zip(values.tolist(), counts.tolist())), k, rng)
    chosen = []
    for label in sorted(quotas):
        members = np.flatnonzero(labels == label)
        chosen.append(rng.choice(members, size=quotas[label], replace=False))
    return np.sort(np.concatenate(chosen))


def sample_few_shot(task: str | Task, k: int, seed: int = 0, *, stratified: bool = True,
                    data_dir: str | Path | None = None) -> TaskData:
    """``k`` seeded examples from the train split of ``task`` (see the module docstring)."""
    task = get_task(task)
    train = load_split(task, "train", data_dir=data_dir)
    if not isinstance(k, int) or k <= 0:
        raise DataError(f"few-shot size k must be a positive integer, got {k!r}")
    if k > len(train):
        raise DataError(f"asked for {k} examples of {task.name} but its train split has only {len(train)}; "
                        f"ask for {len(train)} or fewer (shots)")
    indices = few_shot_indices(train.labels, k, seed, stratified, task.type != "classification")
    return train.subset(indices)
