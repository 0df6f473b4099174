"""Atomic, streaming writing of a merged model as a Hugging Face folder.

Tensors are added one at a time and flushed to a safetensors shard whenever the shard reaches its
size limit, so writing never holds more than one shard. Everything goes to a temporary folder beside
the target, which is renamed into place only when complete: a crash never leaves a half-written
model where a user expects a finished one (see ``layermerge.io.atomic``: the temporary folder records
its owner's pid, so a later run removes one left by a killed process). Operating-system errors while
writing (disk full, no permission...) become one-line OutputErrors naming the output path.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import struct
from contextlib import contextmanager
from pathlib import Path

import torch

from layermerge.errors import OutputError, OutputWriteError, os_error_message
from layermerge.io.atomic import (
    check_writable_location,
    discard_temp,
    make_temp_sibling,
    remove_stale_siblings,
    replace_folder,
)
from layermerge.io.reader import SAFETENSORS_DTYPES

# Files copied verbatim from the base folder so the output loads like the base.
COPIED_FILE_PATTERNS = (
    "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
    "special_tokens_map.json", "vocab.txt", "vocab.json", "merges.txt", "tokenizer.model",
    "added_tokens.json", "spiece.model", "sentencepiece.bpe.model", "preprocessor_config.json",
    "chat_template.jinja", "chat_template.json",
)

_SAFETENSORS_NAMES = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items() if dtype is not None}

# Errors that only writing causes, so one without a file name still concerns the output.
WRITE_ONLY_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS)

SIZE_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(size: str | int) -> int:
    """'5GB' -> 5_000_000_000; integers are bytes."""
    if isinstance(size, int):
        return parse_size(str(size))
    text = size.strip().upper().replace(" ", "")
    for unit in sorted(SIZE_UNITS, key=len, reverse=True):
        if text.endswith(unit):
            number = text[: -len(unit)]
            try:
                text = str(int(float(number) * SIZE_UNITS[unit]))
            except ValueError:
                pass
            break
    try:
        value = int(text)
    except ValueError:
        raise OutputError(f"cannot parse size {size!r}: use bytes or a number with B, KB, MB, GB, MiB, GiB") from None
    if value <= 0:
        raise OutputError(f"size {size!r} must be positive, e.g. 500MB or 5GB")
    return value


def check_output_location(output: Path, inputs: list[Path], overwrite: bool) -> None:
    """Refuse to write into (or over) any input, to replace an existing output silently, or to start work
    whose output cannot be created (a file in the way, no permission, a name too long).

    Also removes the temporary folders that killed runs into the same output left beside it.
    """
    output = output.expanduser().resolve()
    for source in inputs:
        source = Path(source).expanduser().resolve()
        # A folder input is off limits inside and above; a bare weights file only itself and above it,
        # so ``models/merged`` beside ``models/w.safetensors`` is allowed.
        if source.is_dir():
            overlaps = output == source or source in output.parents or output in source.parents
        else:
            overlaps = output == source or output in source.parents
        if overlaps:
            raise OutputError(
                f"refusing to write the output to {output}: it overlaps the input {source}. "
                "Choose an output folder outside every input."
            )
    check_writable_location(output)
    remove_stale_siblings(output)
    if output.exists() and not overwrite:
        raise OutputError(f"output {output} already exists; pass --overwrite (overwrite=True) to replace it")
    if output.exists() and not output.is_dir():
        raise OutputError(f"output {output} exists and is not a folder")


class ShardedSafetensorsWriter:
    """Streams tensors into ``model-XXXXX-of-YYYYY.safetensors`` shards (plus an index when sharded).

    A safetensors file starts with a header listing every tensor's offsets, which is only known once
    the shard is complete. Rather than holding a whole shard in memory until then (up to
    ``max_shard_bytes``, gigabytes for a large model), each tensor's bytes go straight to a scratch
    data file; closing the shard writes the header and appends the data with an in-kernel copy.
    Memory use is therefore one tensor, whatever the shard size.
    """

    def __init__(self, folder: Path, max_shard_bytes: int, prefix: str = "model", metadata: dict | None = None):
        self.folder = folder
        self.max_shard_bytes = max_shard_bytes
        self.prefix = prefix
        self.metadata = {"format": "pt", **(metadata or {})}
        self._data = None            # open scratch file holding the current shard's tensor bytes
        self._entries: dict[str, dict] = {}
        self._offset = 0
        self._shards: list[tuple[str, list[str]]] = []  # temp file name, keys
        self._seen: set[str] = set()
        self.total_bytes = 0

    def add(self, key: str, tensor: torch.Tensor) -> None:
        if key in self._seen:
            raise OutputError(f"tensor {key!r} was written twice to {self.folder}")
        dtype_name = _SAFETENSORS_NAMES.get(tensor.dtype)
        if dtype_name is None:
            raise OutputError(f"cannot store tensor {key!r} of dtype {tensor.dtype} in safetensors")
        size = tensor.numel() * tensor.element_size()
        if self._entries and self._offset + size > self.max_shard_bytes:
            self._flush()
        if self._data is None:
            self._data = open(self.folder / f"{self.prefix}-part{len(self._shards):05d}.data", "wb")
        if size:
            flat = tensor.detach().to("cpu").contiguous().reshape(-1)
            self._data.write(flat.view(torch.uint8).numpy().data)
        self._entries[key] = {"dtype": dtype_name, "shape": list(tensor.shape),
                              "data_offsets": [self._offset, self._offset + size]}
        self._offset += size
        self._seen.add(key)
        self.total_bytes += size

    def _flush(self) -> None:
        if self._data is None:
            return
        data_path = Path(self._data.name)
        self._data.close()
        self._data = None
        temp_name = f"{self.prefix}-part{len(self._shards):05d}.safetensors"
        header = json.dumps({"__metadata__": self.metadata, **self._entries}, separators=(",", ":")).encode()
        header += b" " * (-len(header) % 8)  # data starts 8-byte aligned, as safetensors itself writes
        with open(self.folder / temp_name, "wb") as out, open(data_path, "rb") as data:
            out.write(struct.pack("<Q", len(header)))
            out.write(header)
            out.flush()
            _copy_file(data, out, self._offset)
        data_path.unlink()
        self._shards.append((temp_name, list(self._entries)))
        self._entries = {}
        self._offset = 0

    def close(self) -> list[str]:
        """Flush, give shards their final names, write the index when sharded. Returns file names."""
        self._flush()
        count = len(self._shards)
        if count == 0:
            return []
        if count == 1:
            final = f"{self.prefix}.safetensors"
            os.replace(self.folder / self._shards[0][0], self.folder / final)
            return [final]
        weight_map: dict[str, str] = {}
        names = []
        for number, (temp_name, keys) in enumerate(self._shards, start=1):
            final = f"{self.prefix}-{number:05d}-of-{count:05d}.safetensors"
            os.replace(self.folder / temp_name, self.folder / final)
            names.append(final)
            weight_map.update({key: final for key in keys})
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
        (self.folder / f"{self.prefix}.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        return names


def _copy_file(source, target, length: int) -> None:
    """Append ``length`` bytes of ``source`` to ``target``: in the kernel where possible, else in chunks."""
    remaining = length
    if hasattr(os, "copy_file_range"):
        try:
            while remaining > 0:
                copied = os.copy_file_range(source.fileno(), target.fileno(), remaining)
                if copied == 0:
                    break
                remaining -= copied
        except OSError:
            pass  # e.g. unsupported by this file system: continue below from where it stopped
    while remaining > 0:
        block = source.read(min(remaining, 1 << 24))
        if not block:
            raise OutputError(f"scratch file {source.name} ended {remaining} bytes early; {target.name} is incomplete")
        target.write(block)
        remaining -= len(block)


class CheckpointWriter:
    """Writes a complete output folder atomically. Use as a context manager.

    >>> with CheckpointWriter(out, inputs=[base_dir], overwrite=False) as w:
    ...     w.add_tensor("encoder.weight", t)
    ...     w.copy_base_files(base_dir)
    """

    def __init__(self, output: str | Path, inputs: list[Path] | None = None, overwrite: bool = False,
                 max_shard_size: str | int = "5GB"):
        self.output = Path(output).expanduser().resolve()
        check_output_location(self.output, list(inputs or []), overwrite)
        self.max_shard_bytes = parse_size(max_shard_size)
        self.temp: Path | None = None
        self._model: ShardedSafetensorsWriter | None = None
        self._streams: list[ShardedSafetensorsWriter] = []

    def __enter__(self) -> CheckpointWriter:
        with self._write_errors():
            self.temp = make_temp_sibling(self.output)
        self._model = ShardedSafetensorsWriter(self.temp, self.max_shard_bytes)
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            discard_temp(self.temp)
            if self._is_write_error(exc):  # e.g. disk full while writing a shard: one line, not a traceback
                raise self._write_error(exc) from exc
            return
        try:
            with self._write_errors():
                self._model.close()
                for stream in self._streams:
                    stream.close()
                replace_folder(self.temp, self.output)
        except BaseException:  # e.g. disk full while finishing a shard: leave nothing half-written behind
            discard_temp(self.temp)
            raise

    @contextmanager
    def _write_errors(self):
        """An OSError while writing becomes one line naming the output path and the cause."""
        try:
            yield
        except OSError as exc:
            raise self._write_error(exc) from exc

    def _write_error(self, exc: OSError) -> OutputWriteError:
        shown = self._shown(exc.filename)
        if shown is None:  # write() names no file (disk full...), and the error may not be the output's own disk
            return OutputWriteError(f"failed while writing '{self.output}': {os_error_message(exc)}")
        return OutputWriteError(os_error_message(exc, "write", shown))

    def _is_write_error(self, exc) -> bool:
        """An OSError about a file in the output, or one only a write can cause (a read error stays as it is)."""
        if not isinstance(exc, OSError):
            return False
        return self._in_temp(exc.filename) or (exc.filename is None and exc.errno in WRITE_ONLY_ERRNOS)

    def _in_temp(self, filename) -> bool:
        if not isinstance(filename, (str, bytes, os.PathLike)) or self.temp is None:
            return False
        return Path(os.fsdecode(filename)).is_relative_to(self.temp)

    def _shown(self, filename) -> str | None:
        """A path inside the temporary folder, as it would be called in the finished output."""
        if not isinstance(filename, (str, bytes, os.PathLike)):
            return None
        if self._in_temp(filename):
            return str(self.output / Path(os.fsdecode(filename)).relative_to(self.temp))
        return os.fsdecode(filename)

    def _inside(self, relative: str) -> Path:
        """``self.temp / relative``, refusing a path that would land outside the output (``heads/../../x``)."""
        if Path(relative).is_absolute() or ".." in Path(relative).parts:
            raise OutputError(f"refusing to write {relative!r}: it would land outside the output folder {self.output}")
        return self.temp / relative

    # ----------------------------------------------------------------- content
    # Set by the pipeline when the output vocabulary grows (layermerge.vocab): (key, tensor) -> tensor.
    tensor_hook = None

    def add_tensor(self, key: str, tensor: torch.Tensor) -> None:
        if self.tensor_hook is not None:
            tensor = self.tensor_hook(key, tensor)
        self._model.add(key, tensor)

    def stream_writer(self, relative_folder: str, prefix: str = "model") -> ShardedSafetensorsWriter:
        """A second streaming writer for per-tensor side outputs (EMR masks...), closed with the folder."""
        folder = self._inside(relative_folder)
        folder.mkdir(parents=True, exist_ok=True)
        stream = ShardedSafetensorsWriter(folder, self.max_shard_bytes, prefix=prefix)
        self._streams.append(stream)
        return stream

    def write_state_dict(self, relative_folder: str, tensors: dict[str, torch.Tensor], prefix: str = "model") -> None:
        """A small extra state dict (a task head, EMR masks...) in a sub-folder of the output."""
        folder = self._inside(relative_folder)
        folder.mkdir(parents=True, exist_ok=True)
        writer = ShardedSafetensorsWriter(folder, self.max_shard_bytes, prefix=prefix)
        for key, tensor in tensors.items():
            writer.add(key, tensor)
        writer.close()

    def write_text(self, relative_path: str, text: str) -> None:
        path = self._inside(relative_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)

    def write_json(self, relative_path: str, data) -> None:
        self.write_text(relative_path, json.dumps(data, indent=2, default=str) + "\n")

    def copy_base_files(self, base_folder: Path | None, relative_folder: str = "") -> list[str]:
        """Copy config, tokenizer and generation files so the output loads like the base."""
        if base_folder is None:
            return []
        target = self._inside(relative_folder)
        target.mkdir(parents=True, exist_ok=True)
        copied = []
        for name in COPIED_FILE_PATTERNS:
            source = base_folder / name
            if source.is_file():
                shutil.copy2(source, target / name)
                copied.append(name)
        return copied
