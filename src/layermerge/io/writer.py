"""Atomic, streaming writing of a merged model as a Hugging Face folder.

Tensors are added one at a time and flushed to a safetensors shard whenever the shard reaches its
size limit, so writing never holds more than one shard. Everything goes to a temporary folder beside
the target, which is renamed into place only when complete: a crash never leaves a half-written
model where a user expects a finished one.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from layermerge.errors import OutputError

# Files copied verbatim from the base folder so the output loads like the base.
COPIED_FILE_PATTERNS = (
    "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
    "special_tokens_map.json", "vocab.txt", "vocab.json", "merges.txt", "tokenizer.model",
    "added_tokens.json", "spiece.model", "sentencepiece.bpe.model", "preprocessor_config.json",
    "chat_template.jinja", "chat_template.json",
)

SIZE_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(size: str | int) -> int:
    """'5GB' -> 5_000_000_000; integers are bytes."""
    if isinstance(size, int):
        return size
    text = size.strip().upper().replace(" ", "")
    for unit in sorted(SIZE_UNITS, key=len, reverse=True):
        if text.endswith(unit):
            number = text[: -len(unit)]
            try:
                return int(float(number) * SIZE_UNITS[unit])
            except ValueError:
                break
    try:
        return int(text)
    except ValueError:
        raise OutputError(f"cannot parse size {size!r}: use bytes or a number with B, KB, MB, GB, MiB, GiB") from None


def check_output_location(output: Path, inputs: list[Path], overwrite: bool) -> None:
    """Refuse to write into (or over) any input, and refuse to replace an existing output silently."""
    output = output.expanduser().resolve()
    for source in inputs:
        source = source.expanduser().resolve()
        folder = source if source.is_dir() else source.parent
        if output == folder or folder in output.parents or output in folder.parents or output == source:
            raise OutputError(
                f"refusing to write the output to {output}: it overlaps the input {source}. "
                "Choose an output folder outside every input."
            )
    if output.exists() and not overwrite:
        raise OutputError(f"output {output} already exists; pass --overwrite (overwrite=True) to replace it")
    if output.exists() and not output.is_dir():
        raise OutputError(f"output {output} exists and is not a folder")


class ShardedSafetensorsWriter:
    """Accumulates tensors and writes them as ``model-XXXXX-of-YYYYY.safetensors`` shards with an index."""

    def __init__(self, folder: Path, max_shard_bytes: int, prefix: str = "model", metadata: dict | None = None):
        self.folder = folder
        self.max_shard_bytes = max_shard_bytes
        self.prefix = prefix
        self.metadata = {"format": "pt", **(metadata or {})}
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._shards: list[tuple[str, list[str]]] = []  # temp file name, keys
        self.total_bytes = 0

    def add(self, key: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self._pending and self._pending_bytes + size > self.max_shard_bytes:
            self._flush()
        # clone() detaches from shared storage (tied weights) which safetensors refuses to save.
        self._pending[key] = tensor.detach().to("cpu").contiguous().clone()
        self._pending_bytes += size
        self.total_bytes += size

    def _flush(self) -> None:
        if not self._pending:
            return
        temp_name = f"{self.prefix}-part{len(self._shards):05d}.safetensors"
        save_file(self._pending, str(self.folder / temp_name), metadata=self.metadata)
        self._shards.append((temp_name, list(self._pending)))
        self._pending = {}
        self._pending_bytes = 0

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
        self.output.parent.mkdir(parents=True, exist_ok=True)
        self.temp = Path(tempfile.mkdtemp(prefix=f".{self.output.name}.tmp-", dir=self.output.parent))
        self._model = ShardedSafetensorsWriter(self.temp, self.max_shard_bytes)
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            shutil.rmtree(self.temp, ignore_errors=True)
            return
        self._model.close()
        for stream in self._streams:
            stream.close()
        if self.output.exists():
            backup = self.output.with_name(f".{self.output.name}.old-{os.getpid()}")
            os.replace(self.output, backup)
            os.replace(self.temp, self.output)
            shutil.rmtree(backup, ignore_errors=True)
        else:
            os.replace(self.temp, self.output)

    # ----------------------------------------------------------------- content
    def add_tensor(self, key: str, tensor: torch.Tensor) -> None:
        self._model.add(key, tensor)

    def stream_writer(self, relative_folder: str, prefix: str = "model") -> ShardedSafetensorsWriter:
        """A second streaming writer for per-tensor side outputs (EMR masks...), closed with the folder."""
        folder = self.temp / relative_folder
        folder.mkdir(parents=True, exist_ok=True)
        stream = ShardedSafetensorsWriter(folder, self.max_shard_bytes, prefix=prefix)
        self._streams.append(stream)
        return stream

    def write_state_dict(self, relative_folder: str, tensors: dict[str, torch.Tensor], prefix: str = "model") -> None:
        """A small extra state dict (a task head, EMR masks...) in a sub-folder of the output."""
        folder = self.temp / relative_folder
        folder.mkdir(parents=True, exist_ok=True)
        writer = ShardedSafetensorsWriter(folder, self.max_shard_bytes, prefix=prefix)
        for key, tensor in tensors.items():
            writer.add(key, tensor)
        writer.close()

    def write_text(self, relative_path: str, text: str) -> None:
        path = self.temp / relative_path
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)

    def write_json(self, relative_path: str, data) -> None:
        self.write_text(relative_path, json.dumps(data, indent=2, default=str) + "\n")

    def copy_base_files(self, base_folder: Path | None, relative_folder: str = "") -> list[str]:
        """Copy config, tokenizer and generation files so the output loads like the base."""
        if base_folder is None:
            return []
        target = self.temp / relative_folder
        target.mkdir(parents=True, exist_ok=True)
        copied = []
        for name in COPIED_FILE_PATTERNS:
            source = base_folder / name
            if source.is_file():
                shutil.copy2(source, target / name)
                copied.append(name)
        return copied
