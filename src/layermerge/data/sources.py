"""Loading a task's split: the files its spec names, its Hugging Face dataset, or a public copy.

A user's task names its files (relative to its spec file); they are read by format
(``layermerge.data.readers``) and every row is checked against the spec as it is read: the fields
exist, class labels are declared names or ids (names become ids), regression labels are numbers in
range. Built-in tasks name files inside the local data folder, found in this order: an explicit
``data_dir`` argument; the ``LAYERMERGE_DATA`` environment variable; ``../shared/data`` relative to
the working directory and to the repository root. Without a local copy they come from their public
source (GLUE from Hugging Face ``nyu-mll/glue``, image tasks from torchvision; both imported only
then, and a missing package or an offline machine is a DataError that says what to do).

Public fallback splits (so they keep the local files' meaning): ``test`` is GLUE's validation split
(``validation_matched`` for MNLI); ``validation`` is a seeded holdout of min(1000, 10%) examples of
GLUE's train split and ``train`` is the rest of it.
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path

import numpy as np

from layermerge.data.readers import decode_image, file_format, read_image_folder, read_npz, read_table, stack_images
from layermerge.data.tasks import DATA_FOLDER, Task, get_task
from layermerge.errors import DataError
from layermerge.io.paths import missing_path_message

ENV_VAR = "LAYERMERGE_DATA"
GLUE_SOURCE = "nyu-mll/glue"
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
        """Class ids, regression targets, or (generation) the reference completions as text."""
        if self.task.is_generation:
            return np.array([str(row[self.task.completion]) for row in self.rows], dtype=object)
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


def split_file(task: Task, split: str, data_dir: str | Path | None) -> Path | None:
    """The file (or image folder) of ``task``'s ``split``, or None when the spec gives none. Files of
    built-in tasks (directory $LAYERMERGE_DATA) are looked up in the local data folder; None there too
    when no local data folder exists, so the public copy is used."""
    name = task.files.get(split)
    if name is None:
        return None
    path = Path(name).expanduser()
    if path.is_absolute():
        return path
    if task.directory == DATA_FOLDER:
        root = find_data_dir(data_dir)
        return None if root is None else root / path
    return Path(task.directory or Path.cwd()) / path


def load_split(task: str | Task, split: str = "train", data_dir: str | Path | None = None) -> TaskData:
    """One split of a task: from its file when there is one, else from its Hugging Face dataset or (built-in
    tasks) its public source. Every row is checked against the spec (fields, labels) as it is read."""
    task = get_task(task)
    if split not in task.splits:
        given = ", ".join(task.splits) or "none"
        raise DataError(f"task {task.name!r} has no {split} split (its spec gives: {given}); add "
                        f"'{split}: FILE' under files: in its spec")
    path = split_file(task, split, data_dir)
    explicit = data_dir is not None or bool(os.environ.get(ENV_VAR))
    if path is not None:
        if path.exists():
            # Images live in other files than the one named (class folders, paths in a table), so a changed
            # image would not change the key: image tasks other than .npz archives are read afresh.
            load = _load_file.__wrapped__ if task.is_image and task.format != "npz" and path.suffix != ".npz" \
                else _load_file
            data = load(task, split, str(path), path.stat().st_mtime_ns)
            if len(data) == 0:
                raise DataError(f"{path} holds no examples for task {task.name!r} (split {split})")
            return data
        if task.fallback is None or explicit or task.directory != DATA_FOLDER:
            raise DataError(_missing_file(task, split, path))
    if task.hub is not None and split in task.hub.splits:
        return _load_hub(task, split)
    if task.fallback == "glue":
        return _load_glue_hub(task, split)
    if task.fallback is not None and task.fallback.startswith("torchvision:"):
        return _load_torchvision(task, split)
    raise DataError(f"task {task.name!r} has no file for its {split} split")


def _missing_file(task: Task, split: str, path: Path) -> str:
    if task.directory == DATA_FOLDER and task.fallback is not None:
        return (f"no local data for {task.name}/{split}: expected {path}. Put the file there, or unset "
                f"{ENV_VAR}/--data-dir to use the public source")
    return missing_path_message(f"data file of task {task.name!r} ({split} split)", path)


@lru_cache(maxsize=64)
def _load_file(task: Task, split: str, path: str, mtime_ns: int) -> TaskData:
    """Cached per (task, file, modification time): repeated loads in one process are free."""
    path = Path(path)
    fmt = file_format(path, task.format)
    if fmt == "npz":
        images, labels = read_npz(path, split)
        _check_class_ids(task, labels, f"{path}: y_{split}")
        return ImageData(task, split, images, labels, str(path))
    if fmt == "image_folder":
        if not path.is_dir():
            raise DataError(f"{path} is not a folder; an image_folder task names a folder with one subfolder per "
                            "class")
        images, labels, _ = read_image_folder(path, list(task.label_names))
        if not images:
            raise DataError(f"{path} holds no images (.png, .jpg ...) in subfolders named after the labels "
                            f"{list(task.label_names)}")
        return ImageData(task, split, stack_images(images, task.image_size, str(path)),
                         np.array(labels, dtype=np.int64), str(path))
    table = read_table(path, fmt)
    return rows_to_data(task, split, table.rows, table.places, str(path), path.parent)


def rows_to_data(task: Task, split: str, rows: list[dict], places: list[str], origin: str,
                 folder: Path) -> TaskData:
    """Check each row against the spec and return the split: text rows, or decoded images with labels."""
    if not rows:
        raise DataError(f"{origin} holds no examples for task {task.name!r} (split {split})")
    needed = _needed_fields(task)
    checked = []
    for row, place in zip(rows, places):
        missing = [f for f in needed if f not in row]
        if missing:
            raise DataError(f"{place}: no field {missing[0]!r} (task {task.name!r} reads {', '.join(needed)}); "
                            f"the row has fields: {', '.join(map(str, row)) or 'none'}")
        checked.append(_checked_row(task, row, place))
    if task.is_image:
        images = [decode_image(row[task.image], folder, place) for row, place in zip(checked, places)]
        labels = np.array([row[task.label] for row in checked], dtype=np.int64)
        return ImageData(task, split, stack_images(images, task.image_size, origin), labels, origin)
    return TextData(task, split, checked, origin)


def _needed_fields(task: Task) -> tuple[str, ...]:
    if task.is_generation:
        return (task.prompt, task.completion)
    if task.is_image:
        return (task.image, task.label)
    return (*task.text_fields, task.label)


def _checked_row(task: Task, row: dict, place: str) -> dict:
    """The row with its label as a class id (classification) or a float (regression)."""
    if task.is_generation:
        for field in (task.prompt, task.completion):
            if not isinstance(row[field], (str, int, float)) or isinstance(row[field], bool):
                raise DataError(f"{place}: field {field!r} holds {type(row[field]).__name__}, not text")
        return row
    for field in task.text_fields:
        if not isinstance(row[field], str):
            raise DataError(f"{place}: text field {field!r} holds {type(row[field]).__name__}, not text")
    value = row[task.label]
    label = _regression_label(task, value, place) if task.is_regression else _class_id(task, value, place)
    return row if label is value else {**row, task.label: label}


def _class_id(task: Task, value, place: str) -> int:
    names = task.label_names
    if isinstance(value, str) and value in names:
        return names.index(value)
    number = value
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        number = int(value.strip())
    elif isinstance(value, float) and value.is_integer():
        number = int(value)
    if isinstance(number, int) and not isinstance(number, bool) and 0 <= number < task.num_labels:
        return number
    declared = f"the declared labels {list(names)} or their ids 0..{len(names) - 1}" if names else \
        f"the class ids 0..{task.num_labels - 1}"
    raise DataError(f"{place}: label {value!r} is not one of {declared} (task {task.name!r})")


def _regression_label(task: Task, value, place: str) -> float:
    try:
        number = float(value) if not isinstance(value, bool) else None
    except (TypeError, ValueError):
        number = None
    if number is None or number != number:
        raise DataError(f"{place}: label {value!r} is not a number (task {task.name!r} is a regression)")
    if task.range is not None and not task.range[0] <= number <= task.range[1]:
        raise DataError(f"{place}: label {number} is outside the task's range [{task.range[0]}, {task.range[1]}]")
    return value if isinstance(value, (int, float)) else number


def _check_class_ids(task: Task, labels: np.ndarray, where: str) -> None:
    if len(labels) and (labels.min() < 0 or labels.max() >= task.num_labels):
        raise DataError(f"{where} has labels outside 0..{task.num_labels - 1} (task {task.name!r})")


# --------------------------------------------------------------------------- public sources
def _holdout(n: int, seed: int = 0) -> np.ndarray:
    size = min(1000, n // 10)
    return np.sort(np.random.default_rng(seed).choice(n, size=size, replace=False))


def _import_datasets(task: Task, split: str):
    try:
        import datasets
    except ImportError:
        raise DataError(f"task {task.name!r} ({split}) comes from the Hugging Face Hub, but the 'datasets' package "
                        "is not installed: pip install datasets, or give local files under files:") from None
    return datasets


@lru_cache(maxsize=16)
def _load_hub(task: Task, split: str) -> TaskData:
    datasets = _import_datasets(task, split)
    hub_split = task.hub.splits[split]
    try:
        dataset = datasets.load_dataset(task.hub.path, task.hub.name, split=hub_split)
    except Exception as exc:  # network errors come in many types; all mean the same to the user
        raise DataError(f"cannot load {task.hub.path} ({hub_split}) from the Hugging Face Hub for task "
                        f"{task.name!r}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}. "
                        "Offline? Download it elsewhere and give local files under files:") from None
    rows = [dict(row) for row in dataset]
    origin = f"hf:{task.hub.path}{'/' + task.hub.name if task.hub.name else ''}:{hub_split}"
    return rows_to_data(task, split, rows, [f"{origin} row {i + 1}" for i in range(len(rows))], origin, Path.cwd())


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
        dataset = datasets.load_dataset(GLUE_SOURCE, task.name, split=hub_split)
    except Exception as exc:  # network errors come in many types; all mean the same to the user
        raise DataError(f"cannot load {GLUE_SOURCE}/{task.name} ({hub_split}) from the Hugging Face Hub: "
                        f"{exc}. Offline? Set LAYERMERGE_DATA or --data-dir to a local copy") from None
    rows = [dict(row) for row in dataset]
    if split != "test":
        held = set(_holdout(len(rows)).tolist())
        rows = [r for i, r in enumerate(rows) if (i in held) == (split == "validation")]
    return TextData(task, split, rows, f"hf:{GLUE_SOURCE}/{task.name}:{hub_split}")


@lru_cache(maxsize=16)
def _load_torchvision(task: Task, split: str) -> ImageData:
    try:
        import torchvision
    except ImportError:
        raise DataError(f"no local copy of {task.name} (looked in {ENV_VAR} and "
                        f"{', '.join(map(str, candidate_data_dirs()))}) and torchvision is not installed: "
                        "pip install torchvision, or set LAYERMERGE_DATA / --data-dir") from None
    root = Path(os.environ.get("LAYERMERGE_CACHE", Path.home() / ".cache" / "layermerge")) / "torchvision"
    source = task.fallback.removeprefix("torchvision:")
    cls = getattr(torchvision.datasets, source)
    try:
        if source == "GTSRB":
            dataset = cls(root=str(root), split=split, download=True)
        else:
            dataset = cls(root=str(root), train=(split == "train"), download=True)
    except Exception as exc:
        raise DataError(f"cannot download {source} with torchvision: {exc}. Offline? Set "
                        "LAYERMERGE_DATA or --data-dir to a local copy") from None
    images, labels = [], []
    for image, label in dataset:
        if task.name == "gtsrb":
            image = image.resize((32, 32))
        images.append(np.asarray(image, dtype=np.uint8))
        labels.append(int(label))
    return ImageData(task, split, np.stack(images), np.array(labels, dtype=np.int64),
                     task.fallback)
