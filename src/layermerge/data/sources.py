"""Loading a task's split: local JSONL/NPZ files first, the usual public source otherwise.

Where the local data lives, in order: an explicit ``data_dir`` argument; the ``LAYERMERGE_DATA``
environment variable; ``../shared/data`` relative to the working directory and to the repository
root. Text tasks are ``glue/<task>/{train,validation,test}.jsonl``, image tasks
``vision/<task>.npz`` (train and test only). When no local copy exists, text tasks come from
Hugging Face ``nyu-mll/glue`` and image tasks from torchvision; both are imported only then, and a
missing package or an offline machine is a DataError that says what to do.

Public fallback splits (so they keep the local files' meaning): ``test`` is GLUE's validation split
(``validation_matched`` for MNLI); ``validation`` is a seeded holdout of min(1000, 10%) examples of
GLUE's train split and ``train`` is the rest of it.
"""

from __future__ import annotations

import json
import os
from functools import lru_cache
from pathlib import Path

import numpy as np

from layermerge.data.tasks import Task, get_task
from layermerge.errors import DataError

ENV_VAR = "LAYERMERGE_DATA"
TEXT_SPLITS = ("train", "validation", "test")
IMAGE_SPLITS = ("train", "test")
REPO_ROOT = Path(__file__).resolve().parents[3]


class TaskData:
    """One split of one task: indexable rows plus the label array. Subclasses hold text or images."""

    task: Task
    split: str
    origin: str

    def __len__(self) -> int:
        raise NotImplementedError

    def __getitem__(self, index: int) -> dict:
        raise NotImplementedError

    @property
    def labels(self) -> np.ndarray:
        raise NotImplementedError

    def subset(self, indices) -> TaskData:
        raise NotImplementedError

    def take(self, n: int | None, seed: int = 0) -> TaskData:
        """A seeded uniform subset of ``n`` rows, in their original order (all rows if n is None or ≥ len)."""
        if n is None or n >= len(self):
            return self
        if n <= 0:
            raise DataError(f"{self.task.name}/{self.split}: asked for {n} examples; give a positive number")
        rng = np.random.default_rng(seed)
        return self.subset(np.sort(rng.choice(len(self), size=n, replace=False)))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.task.name}/{self.split}, {len(self)} rows from {self.origin})"


class TextData(TaskData):
    """Rows are dicts with the task's text fields and its label."""

    def __init__(self, task: Task, split: str, rows: list[dict], origin: str):
        self.task, self.split, self.rows, self.origin = task, split, rows, origin

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict:
        return self.rows[index]

    @property
    def labels(self) -> np.ndarray:
        dtype = np.float32 if self.task.is_regression else np.int64
        return np.array([row[self.task.label_field] for row in self.rows], dtype=dtype)

    def subset(self, indices) -> TextData:
        return TextData(self.task, self.split, [self.rows[int(i)] for i in indices], self.origin)


class ImageData(TaskData):
    """Images are uint8 arrays N×H×W (gray) or N×H×W×3 (RGB); rows are {"image", "label"}."""

    def __init__(self, task: Task, split: str, images: np.ndarray, labels: np.ndarray, origin: str):
        if len(images) != len(labels):
            raise DataError(f"{origin}: {len(images)} images but {len(labels)} labels in split {split!r}")
        self.task, self.split, self.images, self._labels, self.origin = task, split, images, labels, origin

    def __len__(self) -> int:
        return len(self._labels)

    def __getitem__(self, index: int) -> dict:
        return {"image": self.images[index], "label": int(self._labels[index])}

    @property
    def labels(self) -> np.ndarray:
        return self._labels

    def subset(self, indices) -> ImageData:
        indices = np.asarray(indices, dtype=np.int64)
        return ImageData(self.task, self.split, self.images[indices], self._labels[indices], self.origin)


# --------------------------------------------------------------------------- locating local data
def candidate_data_dirs() -> list[Path]:
    """Where ``../shared/data`` is looked for when neither an argument nor the env variable says."""
    return [Path.cwd() / ".." / "shared" / "data", REPO_ROOT / ".." / "shared" / "data"]


def find_data_dir(data_dir: str | Path | None = None) -> Path | None:
    """The local data folder, or None when there is no local copy (then the public source is used)."""
    if data_dir is not None:
        path = Path(data_dir).expanduser()
        if not path.is_dir():
            raise DataError(f"data folder {path} does not exist; pass an existing folder holding glue/ "
                            "and vision/")
        return path.resolve()
    env = os.environ.get(ENV_VAR)
    if env:
        path = Path(env).expanduser()
        if not path.is_dir():
            raise DataError(f"{ENV_VAR}={env} is not a folder; point it at the folder holding glue/ and "
                            "vision/, or unset it")
        return path.resolve()
    for path in candidate_data_dirs():
        if path.is_dir():
            return path.resolve()
    return None


def local_file(task: Task, split: str, root: Path) -> Path:
    if task.is_text:
        return root / "glue" / task.name / f"{split}.jsonl"
    return root / "vision" / f"{task.name}.npz"


def load_split(task: str | Task, split: str = "train", data_dir: str | Path | None = None) -> TaskData:
    """One split of a task, from the local copy when there is one, else from its public source."""
    task = get_task(task)
    splits = TEXT_SPLITS if task.is_text else IMAGE_SPLITS
    if split not in splits:
        raise DataError(f"task {task.name!r} has no split {split!r}; its splits are {', '.join(splits)}")
    root = find_data_dir(data_dir)
    explicit = data_dir is not None or bool(os.environ.get(ENV_VAR))
    if root is not None:
        path = local_file(task, split, root)
        if path.is_file():
            return _load_local(task, split, str(path), path.stat().st_mtime_ns)
        if explicit:
            raise DataError(f"no local data for {task.name}/{split}: expected {path}. Put the file there, "
                            f"or unset {ENV_VAR}/--data-dir to use the public source")
    if task.is_text:
        return _load_glue_hub(task, split)
    return _load_torchvision(task, split)


@lru_cache(maxsize=64)
def _load_local(task: Task, split: str, path: str, mtime_ns: int) -> TaskData:
    """Cached per (file, modification time): repeated loads in one process are free."""
    if task.is_text:
        return TextData(task, split, _read_jsonl(task, Path(path)), path)
    return _read_npz(task, split, Path(path))


def _read_jsonl(task: Task, path: Path) -> list[dict]:
    rows = []
    needed = (*task.text_fields, task.label_field)
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{number}: not valid JSON ({exc.msg})") from None
            missing = [f for f in needed if f not in row]
            if missing:
                raise DataError(f"{path}:{number}: missing field(s) {missing}; task {task.name!r} needs "
                                f"{list(needed)}")
            _check_label(task, row[task.label_field], f"{path}:{number}")
            rows.append(row)
    if not rows:
        raise DataError(f"{path} holds no examples")
    return rows


def _check_label(task: Task, label, where: str) -> None:
    if task.is_regression:
        if not isinstance(label, (int, float)):
            raise DataError(f"{where}: label {label!r} is not a number (task {task.name!r} is a regression)")
    elif not isinstance(label, int) or not 0 <= label < task.num_labels:
        raise DataError(f"{where}: label {label!r} is not a class id in 0..{task.num_labels - 1} "
                        f"(task {task.name!r})")


def _read_npz(task: Task, split: str, path: Path) -> ImageData:
    try:
        with np.load(path, allow_pickle=False) as archive:
            x_key, y_key = f"x_{split}", f"y_{split}"
            if x_key not in archive.files or y_key not in archive.files:
                raise DataError(f"{path} lacks arrays {x_key!r}/{y_key!r}; it holds {archive.files}")
            images, labels = archive[x_key], archive[y_key].astype(np.int64)
    except (OSError, ValueError) as exc:
        raise DataError(f"cannot read {path}: {exc}") from None
    if images.dtype != np.uint8 or images.ndim not in (3, 4):
        raise DataError(f"{path}: {x_key} must be uint8 N×H×W or N×H×W×3, got {images.dtype} {images.shape}")
    if len(labels) and (labels.min() < 0 or labels.max() >= task.num_labels):
        raise DataError(f"{path}: {y_key} has labels outside 0..{task.num_labels - 1}")
    return ImageData(task, split, images, labels, str(path))


# --------------------------------------------------------------------------- public sources
def _holdout(n: int, seed: int = 0) -> np.ndarray:
    size = min(1000, n // 10)
    return np.sort(np.random.default_rng(seed).choice(n, size=size, replace=False))


@lru_cache(maxsize=16)
def _load_glue_hub(task: Task, split: str) -> TextData:
    try:
        import datasets
    except ImportError:
        raise DataError(f"no local copy of {task.name}/{split} (looked in {ENV_VAR} and "
                        f"{', '.join(map(str, candidate_data_dirs()))}) and the 'datasets' package is not "
                        "installed: pip install datasets, or set LAYERMERGE_DATA / --data-dir") from None
    hub_split = "validation_matched" if task.name == "mnli" else "validation"
    hub_split = hub_split if split == "test" else "train"
    try:
        dataset = datasets.load_dataset(task.source, task.name, split=hub_split)
    except Exception as exc:  # network errors come in many types; all mean the same to the user
        raise DataError(f"cannot load {task.source}/{task.name} ({hub_split}) from the Hugging Face Hub: "
                        f"{exc}. Offline? Set LAYERMERGE_DATA or --data-dir to a local copy") from None
    rows = [dict(row) for row in dataset]
    if split != "test":
        held = set(_holdout(len(rows)).tolist())
        rows = [r for i, r in enumerate(rows) if (i in held) == (split == "validation")]
    return TextData(task, split, rows, f"hf:{task.source}/{task.name}:{hub_split}")


@lru_cache(maxsize=16)
def _load_torchvision(task: Task, split: str) -> ImageData:
    try:
        import torchvision
    except ImportError:
        raise DataError(f"no local copy of {task.name} (looked in {ENV_VAR} and "
                        f"{', '.join(map(str, candidate_data_dirs()))}) and torchvision is not installed: "
                        "pip install torchvision, or set LAYERMERGE_DATA / --data-dir") from None
    root = Path(os.environ.get("LAYERMERGE_CACHE", Path.home() / ".cache" / "layermerge")) / "torchvision"
    cls = getattr(torchvision.datasets, task.source)
    try:
        if task.source == "GTSRB":
            dataset = cls(root=str(root), split=split, download=True)
        else:
            dataset = cls(root=str(root), train=(split == "train"), download=True)
    except Exception as exc:
        raise DataError(f"cannot download {task.source} with torchvision: {exc}. Offline? Set "
                        "LAYERMERGE_DATA or --data-dir to a local copy") from None
    images, labels = [], []
    for image, label in dataset:
        if task.name == "gtsrb":
            image = image.resize((32, 32))
        images.append(np.asarray(image, dtype=np.uint8))
        labels.append(int(label))
    return ImageData(task, split, np.stack(images), np.array(labels, dtype=np.int64),
                     f"torchvision:{task.source}")
