"""Task specs: what a task's examples look like, where they live and how they are scored.

A task is data, not code. A spec names the task, its type (classification, regression or
generation), its files per split (or a Hugging Face dataset), the fields that hold the input and
the label, the label names or the regression range, and the metric. Specs come from a YAML file
(``layermerge finetune BASE --task reviews.yaml``), from a mapping inline in a merge or track
config, or from the built-in ones shipped in ``builtin_tasks.yaml`` (the 8 GLUE and 5 image tasks),
which go through exactly the same code. ``get_task`` turns any of these references into a ``Task``;
``docs/TASKS.md`` documents every field.
"""

from __future__ import annotations

import re
from functools import cache
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from layermerge.errors import DataError
from layermerge.names import expert_name_problem

TEXT_CLASSIFICATION = "text-classification"
TEXT_REGRESSION = "text-regression"
IMAGE_CLASSIFICATION = "image-classification"
TEXT_GENERATION = "text-generation"
KINDS = (TEXT_CLASSIFICATION, TEXT_REGRESSION, IMAGE_CLASSIFICATION, TEXT_GENERATION)

SPLITS = ("train", "validation", "test")
FORMATS = ("auto", "jsonl", "csv", "tsv", "parquet", "image_folder", "npz")
# Files of a spec whose ``directory`` is this are looked up in the local data folder (--data-dir,
# $LAYERMERGE_DATA, ../shared/data), as the built-in tasks' are.
DATA_FOLDER = "$LAYERMERGE_DATA"
BUILTIN_FILE = Path(__file__).with_name("builtin_tasks.yaml")
DEFAULT_METRICS = {"classification": "accuracy", "regression": "pearson_spearman", "generation": "exact_match"}
SCORER_PATTERN = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*")
SPEC_SUFFIXES = (".yaml", ".yml", ".json")
# The metric names a spec may use (computed in layermerge.eval.metrics and eval.generation).
LABEL_METRICS = ("accuracy", "f1", "macro_f1", "matthews", "accuracy_f1", "pearson", "spearman", "pearson_spearman")
GENERATION_METRICS = ("exact_match", "numeric_match")


class HubSource(BaseModel):
    """A Hugging Face ``datasets`` dataset (online only): ``load_dataset(path, name, split=...)``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    path: str = Field(description="dataset id on the Hub, e.g. 'stanfordnlp/imdb'")
    name: str | None = Field(None, description="dataset configuration, if it has several")
    splits: dict[str, str] = Field(description="our split -> the dataset's split, e.g. {train: train, test: test}")


class Task(BaseModel):
    """One task, as its spec describes it (see ``docs/TASKS.md``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(description="the task's name: letters, digits, '.', '_', '-'")
    type: Literal["classification", "regression", "generation"] = Field(
        "classification", description="classification (text or image), regression (text) or generation "
                                      "(prompt -> completion, causal language models)")
    files: dict[str, str] = Field(default_factory=dict, description="split (train, validation, test) -> file or "
                                                                     "image folder, relative to 'directory'")
    format: Literal["auto", "jsonl", "csv", "tsv", "parquet", "image_folder", "npz"] = Field(
        "auto", description="file format; auto: from each file's extension (a folder is an image folder)")
    hub: HubSource | None = Field(None, description="a Hugging Face datasets source, used for splits without files")
    text: str | list[str] | None = Field(None, description="the text field, or two fields for a text pair")
    image: str | None = Field(None, description="field holding an image path (relative to its data file) or "
                                                "image bytes; not needed for image folders and .npz files")
    prompt: str | None = Field(None, description="generation: the field holding the prompt")
    completion: str | None = Field(None, description="generation: the field holding the reference completion")
    label: str = Field("label", description="the field holding the label")
    labels: list[str] | int | None = Field(None, description="classification: the class names in id order (labels "
                                                             "in the files may be names or ids), or a count")
    range: tuple[float, float] | None = Field(None, description="regression: the allowed label range [low, high]")
    metric: str | None = Field(None, description="accuracy, f1, macro_f1, matthews, accuracy_f1, pearson, spearman, "
                                                 "pearson_spearman, exact_match, numeric_match, or module:function")
    image_size: int | None = Field(None, ge=1, description="resize images read from files to this square size")
    max_new_tokens: int = Field(64, ge=1, description="generation: tokens decoded per answer at evaluation")
    chat_template: bool = Field(True, description="generation: wrap prompts in the tokenizer's chat template "
                                                  "when it has one")
    directory: str | None = Field(None, description="where relative file paths start (default: the spec file's "
                                                    f"folder); '{DATA_FOLDER}' means the local data folder")
    fallback: str | None = Field(None, description="built-in tasks: public copy used when no local file exists "
                                                   "('glue' or 'torchvision:<dataset class>')")

    @field_validator("name")
    @classmethod
    def _safe_name(cls, name: str) -> str:
        problem = expert_name_problem(name)
        if problem:
            raise ValueError(problem.replace("expert name", "task name"))
        return name

    @field_validator("files")
    @classmethod
    def _known_splits(cls, files: dict[str, str]) -> dict[str, str]:
        unknown = sorted(set(files) - set(SPLITS))
        if unknown:
            raise ValueError(f"unknown split(s) {unknown}; splits are {', '.join(SPLITS)}")
        return files

    @field_validator("metric")
    @classmethod
    def _known_metric(cls, metric: str | None) -> str | None:
        if metric is not None and metric not in LABEL_METRICS and metric not in GENERATION_METRICS \
                and not SCORER_PATTERN.fullmatch(metric):
            known = ", ".join([*LABEL_METRICS, *GENERATION_METRICS])
            raise ValueError(f"unknown metric {metric!r}; use one of {known}, or a scorer 'module:function'")
        return metric

    @model_validator(mode="after")
    def _consistent(self) -> Task:
        if not self.files and self.hub is None and self.fallback is None:
            raise ValueError("give 'files' (split -> file) or 'hub' (a Hugging Face dataset)")
        image = self.image is not None or self.format in ("image_folder", "npz")
        if self.type == "generation":
            if self.prompt is None or self.completion is None:
                raise ValueError("a generation task names its 'prompt' and 'completion' fields")
            if self.text is not None or image:
                raise ValueError("a generation task reads 'prompt' and 'completion', not 'text' or images")
        elif image:
            if self.text is not None:
                raise ValueError("give either 'text' or an image input, not both")
            if self.type == "regression":
                raise ValueError("image tasks are classification tasks")
        elif self.text is None:
            raise ValueError("name the input: 'text' (one field or two), 'image' (a field of image paths), "
                             "'format: image_folder' (a folder with one subfolder per class), or for generation "
                             "'prompt' and 'completion'")
        elif isinstance(self.text, list) and not 1 <= len(self.text) <= 2:
            raise ValueError("'text' is one field or a pair of fields")
        if self.type == "classification" and self.labels is None:
            raise ValueError("a classification task lists its class names in 'labels' (or gives their count)")
        if self.type == "classification" and isinstance(self.labels, int) and self.labels < 2:
            raise ValueError("a classification task has at least 2 labels")
        if self.type == "classification" and isinstance(self.labels, list):
            if len(self.labels) < 2 or len(set(self.labels)) != len(self.labels):
                raise ValueError("'labels' lists at least two distinct class names")
        if self.type != "classification" and self.labels is not None:
            raise ValueError(f"'labels' is for classification tasks; a {self.type} task has none")
        if self.range is not None and (self.type != "regression" or self.range[0] >= self.range[1]):
            raise ValueError("'range' is [low, high] with low < high, for regression tasks")
        if self.type == "generation" and self.metric in LABEL_METRICS:
            raise ValueError(f"metric {self.metric!r} scores labels; a generation task uses exact_match, "
                             "numeric_match or a scorer 'module:function'")
        if self.type != "generation" and self.metric in GENERATION_METRICS:
            raise ValueError(f"metric {self.metric!r} scores generated text; use it with type: generation")
        return self

    def __hash__(self) -> int:        # loaded splits are cached per task
        return hash(self.model_dump_json())

    # ----------------------------------------------------------------- what the rest of layermerge asks
    @property
    def kind(self) -> str:
        if self.type == "generation":
            return TEXT_GENERATION
        if self.is_image:
            return IMAGE_CLASSIFICATION
        return TEXT_REGRESSION if self.type == "regression" else TEXT_CLASSIFICATION

    @property
    def is_image(self) -> bool:
        return self.image is not None or self.format in ("image_folder", "npz")

    @property
    def is_text(self) -> bool:
        """Text classification or regression (a sequence-classification model)."""
        return not self.is_image and self.type != "generation"

    @property
    def is_generation(self) -> bool:
        return self.type == "generation"

    @property
    def is_regression(self) -> bool:
        return self.type == "regression"

    @property
    def text_fields(self) -> tuple[str, ...]:
        if self.text is None:
            return ()
        return (self.text,) if isinstance(self.text, str) else tuple(self.text)

    @property
    def label_field(self) -> str:
        return self.label

    @property
    def label_names(self) -> tuple[str, ...]:
        return tuple(self.labels) if isinstance(self.labels, list) else ()

    @property
    def num_labels(self) -> int:
        if isinstance(self.labels, list):
            return len(self.labels)
        return self.labels if isinstance(self.labels, int) else 1

    @property
    def model_num_labels(self) -> int:
        """Outputs of the task head: 1 for regression, else the class count."""
        return 1 if self.is_regression else self.num_labels

    @property
    def score_metric(self) -> str:
        return self.metric or DEFAULT_METRICS[self.type]

    @property
    def is_builtin(self) -> bool:
        return BUILTIN_TASKS.get(self.name) == self

    @property
    def splits(self) -> tuple[str, ...]:
        """The splits this task has: its files, its hub splits, or its fallback's."""
        found = set(self.files) | set(self.hub.splits if self.hub else ())
        if self.fallback is not None:
            found |= {"train", "test"} | ({"validation"} if self.fallback == "glue" else set())
        return tuple(s for s in SPLITS if s in found)

    def record(self) -> dict:
        """The spec as a mapping (what is written into records and can be read back with ``get_task``)."""
        return self.model_dump(exclude_defaults=True, mode="json") | {"name": self.name}


# --------------------------------------------------------------------------- reading specs
def _problems(exc: ValidationError) -> str:
    parts = []
    for error in exc.errors():
        where = ".".join(str(p) for p in error["loc"])
        message = error["msg"].removeprefix("Value error, ")
        parts.append(f"{where}: {message}" if where else message)
    return "; ".join(parts)


def task_from_mapping(spec: dict, where: str, directory: Path | None = None) -> Task:
    """A Task from a spec mapping; relative files start at ``directory`` unless the spec names its own."""
    if not isinstance(spec, dict):
        raise DataError(f"{where}: a task spec is a mapping (name, type, files, text, label, labels ...), "
                        f"got {type(spec).__name__}")
    spec = dict(spec)
    if directory is not None and spec.get("directory") is None:
        spec["directory"] = str(directory)
    elif spec.get("directory") not in (None, DATA_FOLDER) and directory is not None \
            and not Path(str(spec["directory"])).expanduser().is_absolute():
        spec["directory"] = str((directory / str(spec["directory"])).resolve())
    try:
        return Task(**spec)
    except ValidationError as exc:
        raise DataError(f"{where}: {_problems(exc)}") from None
    except TypeError as exc:
        raise DataError(f"{where}: {exc}") from None


def task_from_file(path: str | Path) -> Task:
    """A Task from a spec file (YAML or JSON); its relative paths start at the file's folder."""
    path = Path(path).expanduser()
    if path.is_dir():
        path = path / "task.yaml"
    if not path.is_file():
        raise DataError(f"task spec file not found: {path}")
    try:
        spec = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if isinstance(spec, dict):
        spec.setdefault("name", path.parent.name if path.name == "task.yaml" else path.stem)
    return task_from_mapping(spec, str(path), path.parent.resolve())


@cache
def _builtin_tasks() -> dict[str, Task]:
    specs = yaml.safe_load(BUILTIN_FILE.read_text(encoding="utf-8"))
    return {spec["name"]: task_from_mapping(spec, str(BUILTIN_FILE)) for spec in specs["tasks"]}


BUILTIN_TASKS: dict[str, Task] = _builtin_tasks()
GLUE_TASKS: dict[str, Task] = {n: t for n, t in BUILTIN_TASKS.items() if t.fallback == "glue"}
VISION_TASKS: dict[str, Task] = {n: t for n, t in BUILTIN_TASKS.items() if t.is_image}
TASKS = BUILTIN_TASKS

# Spellings people type for the same built-in task.
_ALIASES = {"sst-2": "sst2", "sts-b": "stsb", "fashion-mnist": "fashion_mnist", "fashionmnist": "fashion_mnist"}


def looks_like_file(reference: str) -> bool:
    return reference.endswith(SPEC_SUFFIXES) or "/" in reference or "\\" in reference


def get_task(reference: str | Path | dict | Task, relative_to: str | Path | None = None) -> Task:
    """The task a reference means: a Task, a spec mapping, a built-in name ('sst2', 'SST-2'), or a spec
    file / a folder holding ``task.yaml`` (relative to ``relative_to``, default the working folder)."""
    if isinstance(reference, Task):
        return reference
    if isinstance(reference, dict):
        folder = Path(relative_to) if relative_to is not None else Path.cwd()
        return task_from_mapping(reference, f"task {reference.get('name', '(unnamed)')!r}", folder.resolve())
    text = str(reference).strip()
    key = _ALIASES.get(text.lower(), text.lower())
    if key in BUILTIN_TASKS and not isinstance(reference, Path):
        return BUILTIN_TASKS[key]
    path = Path(text).expanduser()
    if relative_to is not None and not path.is_absolute():
        path = Path(relative_to) / path
    if path.is_file() or (path.is_dir() and (path / "task.yaml").is_file()):
        return task_from_file(path)
    if looks_like_file(text):
        raise DataError(f"task spec file not found: {path}")
    raise DataError(f"unknown task {text!r}: not a built-in task ({', '.join(BUILTIN_TASKS)}) and no file "
                    f"{path}; describe your own task in a YAML spec (name, type, files, text, label, labels; "
                    "see docs/TASKS.md) and pass its path")


def parse_task_list(text: str, relative_to: str | Path | None = None) -> list[Task]:
    """``'sst2,reviews.yaml'`` -> [Task, Task]; an empty entry or a duplicate is an error."""
    names = [part.strip() for part in text.split(",")]
    if not text.strip() or any(not n for n in names):
        raise DataError(f"bad task list {text!r}: give comma-separated task names or spec files, e.g. sst2,rte")
    return unique_tasks([get_task(n, relative_to) for n in names], text)


def unique_tasks(tasks: list[Task], where: str) -> list[Task]:
    seen = set()
    for task in tasks:
        if task.name in seen:
            raise DataError(f"task {task.name!r} listed twice in {where!r}")
        seen.add(task.name)
    return tasks
