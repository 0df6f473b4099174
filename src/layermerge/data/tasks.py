"""Task definitions: what a task's examples look like and how it is scored.

A task is data, not code: its name, its kind (text classification, text regression, image
classification), the fields that hold its input, the label field, the number of labels and the
metric the model-merging literature reports for it. Loaders, collators, fine-tuning and evaluation
all read this one declaration.
"""

from __future__ import annotations

from dataclasses import dataclass

from layermerge.errors import DataError

TEXT_CLASSIFICATION = "text-classification"
TEXT_REGRESSION = "text-regression"
IMAGE_CLASSIFICATION = "image-classification"
KINDS = (TEXT_CLASSIFICATION, TEXT_REGRESSION, IMAGE_CLASSIFICATION)


@dataclass(frozen=True)
class Task:
    """One task. ``text_fields`` has one entry (single sentence) or two (a sentence pair)."""

    name: str
    kind: str
    num_labels: int
    metric: str
    label_field: str = "label"
    text_fields: tuple[str, ...] = ()
    label_names: tuple[str, ...] = ()
    source: str = ""          # public source used when no local copy exists (HF id or torchvision class)

    @property
    def is_text(self) -> bool:
        return self.kind in (TEXT_CLASSIFICATION, TEXT_REGRESSION)

    @property
    def is_image(self) -> bool:
        return self.kind == IMAGE_CLASSIFICATION

    @property
    def is_regression(self) -> bool:
        return self.kind == TEXT_REGRESSION

    @property
    def model_num_labels(self) -> int:
        """Outputs of the task head: 1 for regression, else the class count."""
        return 1 if self.is_regression else self.num_labels


def _glue(name: str, fields: tuple[str, ...], labels: tuple[str, ...], metric: str) -> Task:
    kind = TEXT_REGRESSION if metric == "pearson_spearman" else TEXT_CLASSIFICATION
    return Task(name, kind, num_labels=max(len(labels), 1), metric=metric, text_fields=fields,
                label_names=labels, source="nyu-mll/glue")


# The 8 GLUE tasks with the metrics the merging literature reports (label ids as in nyu-mll/glue).
GLUE_TASKS: dict[str, Task] = {task.name: task for task in [
    _glue("cola", ("sentence",), ("unacceptable", "acceptable"), "matthews"),
    _glue("sst2", ("sentence",), ("negative", "positive"), "accuracy"),
    _glue("mrpc", ("sentence1", "sentence2"), ("not_equivalent", "equivalent"), "accuracy_f1"),
    _glue("stsb", ("sentence1", "sentence2"), (), "pearson_spearman"),
    _glue("qqp", ("question1", "question2"), ("not_duplicate", "duplicate"), "accuracy_f1"),
    _glue("mnli", ("premise", "hypothesis"), ("entailment", "neutral", "contradiction"), "accuracy"),
    _glue("qnli", ("question", "sentence"), ("entailment", "not_entailment"), "accuracy"),
    _glue("rte", ("sentence1", "sentence2"), ("entailment", "not_entailment"), "accuracy"),
]}


def _vision(name: str, num_labels: int, source: str) -> Task:
    return Task(name, IMAGE_CLASSIFICATION, num_labels=num_labels, metric="accuracy", label_field="label",
                source=source)


# Image tasks stored as ``vision/<name>.npz`` (x_train, y_train, x_test, y_test, classes).
VISION_TASKS: dict[str, Task] = {task.name: task for task in [
    _vision("mnist", 10, "MNIST"),
    _vision("fashion_mnist", 10, "FashionMNIST"),
    _vision("kmnist", 10, "KMNIST"),
    _vision("cifar10", 10, "CIFAR10"),
    _vision("gtsrb", 43, "GTSRB"),
]}

TASKS: dict[str, Task] = {**GLUE_TASKS, **VISION_TASKS}

# Spellings people type for the same task.
_ALIASES = {"sst-2": "sst2", "sts-b": "stsb", "fashion-mnist": "fashion_mnist",
            "fashionmnist": "fashion_mnist"}


def get_task(name: str | Task) -> Task:
    """The task called ``name`` (case-insensitive; 'sst-2' and 'sst2' are the same)."""
    if isinstance(name, Task):
        return name
    key = name.strip().lower()
    key = _ALIASES.get(key, key)
    if key not in TASKS:
        raise DataError(f"unknown task {name!r}; known tasks: {', '.join(TASKS)}")
    return TASKS[key]


def parse_task_list(text: str) -> list[Task]:
    """``'sst2,rte'`` -> [Task, Task]; an empty entry or a duplicate is an error."""
    names = [part.strip() for part in text.split(",")]
    if not text.strip() or any(not n for n in names):
        raise DataError(f"bad task list {text!r}: give comma-separated task names, e.g. sst2,rte")
    tasks = [get_task(n) for n in names]
    seen = set()
    for task in tasks:
        if task.name in seen:
            raise DataError(f"task {task.name!r} listed twice in {text!r}")
        seen.add(task.name)
    return tasks
