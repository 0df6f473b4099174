"""Reading task files into raw rows: JSONL, CSV/TSV, Parquet, image folders and .npz archives.

Each reader returns what the file holds, with where each row came from, and leaves the meaning of
the fields to ``layermerge.data.sources`` (which checks them against the task's spec). Images named
in a row (a path relative to the data file, or encoded bytes) are decoded with Pillow.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from layermerge.errors import DataError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
SUFFIX_FORMATS = {".jsonl": "jsonl", ".json": "jsonl", ".csv": "csv", ".tsv": "tsv", ".parquet": "parquet",
                  ".pq": "parquet", ".npz": "npz"}


@dataclass
class RawRows:
    """Rows of a table file and, per row, where it is in the file (for error messages)."""

    rows: list[dict]
    places: list[str]


def file_format(path: Path, declared: str) -> str:
    """The format of ``path``: the declared one, else from its extension (a folder is an image folder)."""
    if declared != "auto":
        return declared
    if path.is_dir():
        return "image_folder"
    found = SUFFIX_FORMATS.get(path.suffix.lower())
    if found is None:
        raise DataError(f"cannot tell the format of {path} from its extension; set format: (jsonl, csv, tsv, "
                        "parquet, image_folder or npz) in the task spec")
    return found


def read_table(path: Path, fmt: str) -> RawRows:
    """The rows of a JSONL, CSV, TSV or Parquet file."""
    if fmt == "jsonl":
        return _read_jsonl(path)
    if fmt in ("csv", "tsv"):
        return _read_delimited(path, "," if fmt == "csv" else "\t")
    if fmt == "parquet":
        return _read_parquet(path)
    raise DataError(f"{path}: format {fmt!r} is not a table of rows")


def _read_jsonl(path: Path) -> RawRows:
    rows, places = [], []
    with open(path, encoding="utf-8-sig") as handle:       # -sig: a byte-order mark is not part of the data
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{number}: not valid JSON ({exc.msg})") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}:{number}: each line must be a JSON object, got {type(row).__name__}")
            rows.append(row)
            places.append(f"{path}:{number}")
    return RawRows(rows, places)


def _read_delimited(path: Path, delimiter: str) -> RawRows:
    """CSV and TSV with the usual quoting (a field holding the delimiter is quoted, as pandas and Python's
    csv module write them)."""
    with open(path, encoding="utf-8-sig", newline="") as handle:   # Excel's "CSV UTF-8" starts with a BOM
        reader = csv.DictReader(handle, delimiter=delimiter)
        if reader.fieldnames is None:
            return RawRows([], [])
        rows, places = [], []
        columns = len(reader.fieldnames)
        for row in reader:
            if None in row:
                raise DataError(f"{path}:{reader.line_num}: more values than the header's {columns} columns")
            if any(value is None for value in row.values()):
                raise DataError(f"{path}:{reader.line_num}: fewer values than the header's {columns} columns")
            rows.append(row)
            places.append(f"{path}:{reader.line_num}")
    return RawRows(rows, places)


def _read_parquet(path: Path) -> RawRows:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"reading {path} needs pyarrow: pip install pyarrow (or convert the file to JSONL)") from None
    try:
        rows = pq.read_table(path).to_pylist()
    except Exception as exc:        # pyarrow raises several types for a damaged file
        raise DataError(f"cannot read {path} as Parquet: {exc}") from None
    return RawRows(rows, [f"{path} row {i + 1}" for i in range(len(rows))])


# --------------------------------------------------------------------------- images
def decode_image(value, relative_to: Path, where: str) -> np.ndarray:
    """A uint8 array (H×W gray or H×W×3 RGB) from a path, encoded bytes or a Pillow image."""
    from PIL import Image, UnidentifiedImageError

    if isinstance(value, dict):                 # Hugging Face datasets' Image feature: {bytes, path}
        value = value.get("bytes") or value.get("path")
    try:
        if isinstance(value, Image.Image):
            image = value
        elif isinstance(value, (bytes, bytearray)):
            image = Image.open(io.BytesIO(value))
        elif isinstance(value, str) and value:
            path = Path(value).expanduser()
            path = path if path.is_absolute() else relative_to / path
            if not path.is_file():
                raise DataError(f"{where}: image file not found: {path}")
            image = Image.open(path)
        else:
            raise DataError(f"{where}: the image field holds {type(value).__name__}, not a path or image bytes")
        image.load()
    except (UnidentifiedImageError, OSError) as exc:
        raise DataError(f"{where}: not a readable image ({exc})") from None
    gray = image.mode in ("1", "L", "I", "I;16", "F")
    return np.asarray(image.convert("L" if gray else "RGB"), dtype=np.uint8)


def stack_images(images: list[np.ndarray], size: int | None, where: str) -> np.ndarray:
    """One N×H×W(×3) uint8 array: resized to ``size`` if given; gray made RGB when colours are mixed."""
    from PIL import Image

    if any(image.ndim == 3 for image in images):
        images = [np.repeat(image[..., None], 3, axis=2) if image.ndim == 2 else image for image in images]
    if size is not None:
        images = [np.asarray(Image.fromarray(image).resize((size, size), Image.BILINEAR)) for image in images]
    shapes = sorted({image.shape for image in images})
    if len(shapes) > 1:
        raise DataError(f"{where}: images differ in size ({', '.join('×'.join(map(str, s)) for s in shapes[:3])}); "
                        "set image_size: N in the task spec to resize them to N×N")
    return np.stack(images)


def read_image_folder(folder: Path, class_names: list[str]) -> tuple[list[np.ndarray], list[int], list[str]]:
    """Images of a folder with one subfolder per class (named as the task's labels)."""
    subfolders = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    unknown = [name for name in subfolders if name not in class_names]
    if unknown:
        raise DataError(f"{folder}: subfolder(s) {unknown} are not among the task's labels {class_names}; "
                        "name each class folder after a label")
    images, labels, places = [], [], []
    for label, name in enumerate(class_names):
        if not (folder / name).is_dir():
            continue
        for path in sorted((folder / name).iterdir()):
            if path.suffix.lower() in IMAGE_SUFFIXES:
                images.append(decode_image(str(path), folder, str(path)))
                labels.append(label)
                places.append(str(path))
    return images, labels, places


def read_npz(path: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Arrays ``x_<split>`` (uint8 N×H×W or N×H×W×3) and ``y_<split>`` (class ids) of an .npz archive."""
    x_key, y_key = f"x_{split}", f"y_{split}"
    try:
        with np.load(path, allow_pickle=False) as archive:
            if x_key not in archive.files or y_key not in archive.files:
                raise DataError(f"{path} lacks arrays {x_key!r}/{y_key!r}; it holds {archive.files}")
            images, labels = archive[x_key], archive[y_key].astype(np.int64)
    except (OSError, ValueError) as exc:
        raise DataError(f"cannot read {path}: {exc}") from None
    if images.dtype != np.uint8 or images.ndim not in (3, 4):
        raise DataError(f"{path}: {x_key} must be uint8 N×H×W or N×H×W×3, got {images.dtype} {images.shape}")
    return images, labels
