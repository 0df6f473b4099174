"""Lazy, per-tensor reading of checkpoints.

A data-free merge must never hold a whole expert in memory, so a reader only records where each
tensor lives and loads one tensor when asked. Supported inputs:

* a Hugging Face folder: ``config.json`` plus ``model.safetensors``, a sharded
  ``model.safetensors.index.json``, ``pytorch_model.bin`` or a sharded ``pytorch_model.bin.index.json``;
* a bare ``.safetensors`` file, or a bare ``.pt``/``.bin``/``.pth`` state dict.

Pickled files are loaded with ``torch.load(weights_only=True, mmap=True)`` so no code runs and the
storage is paged in lazily by the operating system.
"""

from __future__ import annotations

import hashlib
import json
import pickle
import pickletools
import re
import warnings
from collections.abc import Iterator
from functools import cached_property
from pathlib import Path

import torch
from safetensors import safe_open

from layermerge.errors import CheckpointError
from layermerge.io.paths import broken_link_reason, missing_path_message

SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_SINGLE = "model.safetensors"
BIN_INDEX = "pytorch_model.bin.index.json"
BIN_SINGLE = "pytorch_model.bin"
PICKLE_SUFFIXES = (".pt", ".pth", ".bin")

SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": getattr(torch, "float8_e4m3fn", None),
    "F8_E5M2": getattr(torch, "float8_e5m2", None),
}


def sha256_of_file(path: Path, chunk: int = 1 << 22) -> str:
    """Hash a weight file in chunks (inputs can be many GB)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


class _ReadAlongHash:
    """sha256 of one safetensors file, computed from the tensors as they are read.

    Hashing the inputs for the model card used to read every file a second time, which doubles the
    I/O of a merge when the inputs do not stay in the page cache. A merge reads nearly every byte
    of every input anyway, usually in file order, so the digest is fed from those reads: each
    tensor's bytes extend the digest when they are the next bytes of the file; a tensor further on
    first pulls the bytes in between from disk; a tensor already behind the hashed prefix adds
    nothing. ``hexdigest`` reads whatever the merge never asked for. The result is exactly
    ``sha256_of_file``, at no extra I/O when the reads come in file order, and at worst one extra
    pass, as before.
    """

    def __init__(self, path: Path):
        self.path = path
        self.digest = hashlib.sha256()
        with open(path, "rb") as handle:
            prefix = handle.read(8)
            header = handle.read(int.from_bytes(prefix, "little")) if len(prefix) == 8 else b""
        try:
            entries = json.loads(header)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise CheckpointError(f"cannot read the safetensors header of {path}: {exc}") from exc
        data_start = 8 + len(header)
        self.ranges = {key: (data_start + entry["data_offsets"][0], data_start + entry["data_offsets"][1])
                       for key, entry in entries.items() if key != "__metadata__"}
        self.digest.update(prefix + header)
        self.hashed = data_start          # bytes [0, hashed) are in the digest
        self.result: str | None = None

    def _pull(self, stop: int) -> None:
        """Hash bytes [hashed, stop) straight from the file."""
        with open(self.path, "rb") as handle:
            handle.seek(self.hashed)
            while self.hashed < stop:
                block = handle.read(min(stop - self.hashed, 1 << 24))
                if not block:
                    break
                self.digest.update(block)
                self.hashed += len(block)

    def observe(self, key: str, tensor: torch.Tensor) -> None:
        if self.result is not None or key not in self.ranges:
            return
        start, stop = self.ranges[key]
        if stop <= self.hashed or stop - start != tensor.numel() * tensor.element_size():
            return
        if start > self.hashed:
            self._pull(start)
        if start == self.hashed:
            if stop > start:
                self.digest.update(tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy().data)
            self.hashed = stop

    def hexdigest(self) -> str:
        if self.result is None:
            self._pull(self.path.stat().st_size)
            self.result = self.digest.hexdigest()
        return self.result


def _one_line(exc: Exception) -> str:
    """torch.load's errors span many lines with terminal escapes; keep the line that says what failed."""
    lines = [" ".join(re.sub(r"\x1b\[[0-9;]*m", "", line).split()) for line in str(exc).splitlines()]
    lines = [line for line in lines if line]
    reason = next((line for line in lines if "WeightsUnpickler error" in line), lines[0] if lines else "")
    return reason or type(exc).__name__


# Globals a tensor pickle imports: not evidence of code, so the scan looks past them.
TENSOR_GLOBALS = ("torch.", "collections.OrderedDict")


def scan_pickle(file_path: Path) -> str | None:
    """Read a plain pickle's opcodes without executing any: the first global it would import besides
    torch's tensor rebuilders (``os.system``...), or None. Raises ValueError when the stream is
    truncated or not a pickle."""
    strings: list[str] = []
    with open(file_path, "rb") as handle:
        for opcode, arg, _ in pickletools.genops(handle):
            name = None
            if opcode.name in ("GLOBAL", "INST"):
                name = str(arg).replace(" ", ".")
            elif opcode.name == "STACK_GLOBAL":
                name = ".".join(strings[-2:])
            elif isinstance(arg, str):
                strings.append(arg)
            if name is not None and not name.startswith(TENSOR_GLOBALS):
                return name
    return None


def pickle_error_message(file_path: Path, exc: Exception) -> str:
    """One line for a pickle that was not loaded: code-executing content and a corrupt file need
    different fixes, so they get different messages (and never torch's advice to file an issue)."""
    text = str(exc)
    if isinstance(exc, pickle.UnpicklingError) and "Weights only load failed" in text:
        found = re.search(r"GLOBAL ([\w.]+)", text)
        if found:
            return _unsafe_pickle_message(file_path, found.group(1), "torch.load({source!r}, weights_only=False)")
        try:                # a plain pickle (pickle.dump): torch's unpickler stopped at its framing
            name = scan_pickle(file_path)
        except (ValueError, EOFError, OSError, pickle.PickleError) as error:
            return _corrupt_pickle_message(file_path, f"truncated or malformed pickle: {error}")
        if name:
            return _unsafe_pickle_message(file_path, name, "pickle.load(open({source!r}, 'rb'))")
        return _corrupt_pickle_message(file_path, "a plain pickle written by pickle.dump, not torch.save")
    cause = _one_line(exc).split(". ")[0][:160]
    cause = type(exc).__name__ if cause == type(exc).__name__ else f"{type(exc).__name__}: {cause}"
    return _corrupt_pickle_message(file_path, cause)


def _corrupt_pickle_message(file_path: Path, cause: str) -> str:
    return (f"cannot load {file_path}: it is not a readable PyTorch state dict; the file is corrupt, truncated "
            f"or of another format ({cause}). Re-download or re-save it, ideally as .safetensors")


def _unsafe_pickle_message(file_path: Path, name: str, loader: str) -> str:
    # In a model folder, model.safetensors is read before pytorch_model.bin, so the converted file is used.
    target = file_path.with_name(SAFETENSORS_SINGLE) if file_path.name == BIN_SINGLE else \
        file_path.with_suffix(".safetensors")
    load = loader.format(source=str(file_path))
    return (f"{file_path} holds pickle data that can execute code when loaded (it imports {name}), so it was "
            "not loaded: layermerge reads pickles with torch.load(weights_only=True), which accepts tensors "
            "only. If you trust the file, convert it to safetensors: python -c \"import pickle, torch; from "
            f"safetensors.torch import save_file; save_file({load}, '{target}')\" and merge that file instead")


class CheckpointReader:
    """Read-only, lazy view of one checkpoint: key names, shapes and dtypes up front, tensors on demand."""

    def __init__(self, path: str | Path, role: str | None = None):
        given = Path(path).expanduser()
        if broken_link_reason(given) is not None or not given.exists():
            # role: what the caller calls it, e.g. "base model", "expert 'sst2'"
            raise CheckpointError(missing_path_message(role or "model", given.absolute()))
        self.path = given.resolve()
        self.folder: Path | None = self.path if self.path.is_dir() else None
        # Set before discovery, which already loads (memory-maps) a bare pickle to list its keys.
        self._pickle_cache: dict[Path, dict[str, torch.Tensor]] = {}
        self._hashers: dict[Path, _ReadAlongHash] = {}
        self._key_to_file: dict[str, Path] = self._locate_tensors()
        if not self._key_to_file:
            raise CheckpointError(f"checkpoint {self.path} contains no tensors")

    # ----------------------------------------------------------------- discovery
    def _locate_tensors(self) -> dict[str, Path]:
        if self.folder is None:
            return self._keys_of_file(self.path)
        for index_name in (SAFETENSORS_INDEX, BIN_INDEX):
            index_path = self.folder / index_name
            if index_path.is_file():
                return self._keys_from_index(index_path)
        for single in (SAFETENSORS_SINGLE, BIN_SINGLE):
            if (self.folder / single).is_file():
                return self._keys_of_file(self.folder / single)
        for name in (SAFETENSORS_INDEX, BIN_INDEX, SAFETENSORS_SINGLE, BIN_SINGLE):
            if broken_link_reason(self.folder / name) is not None:
                raise CheckpointError(missing_path_message("weights file", self.folder / name))
        found = sorted(p.name for p in self.folder.iterdir())
        raise CheckpointError(
            f"no weights found in folder {self.folder}: expected one of {SAFETENSORS_SINGLE}, "
            f"{SAFETENSORS_INDEX}, {BIN_SINGLE}, {BIN_INDEX}; the folder holds {found[:10]}"
        )

    def _keys_from_index(self, index_path: Path) -> dict[str, Path]:
        try:
            weight_map = json.loads(index_path.read_text())["weight_map"]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as exc:
            raise CheckpointError(f"malformed index file {index_path}: {exc}") from exc
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise CheckpointError(f"malformed index file {index_path}: 'weight_map' must map each tensor name to "
                                  "its shard file name; re-save the model")
        mapping = {}
        for key, file_name in weight_map.items():
            file_path = index_path.parent / file_name
            if not file_path.is_file():
                raise CheckpointError(f"{index_path} lists shard {file_name} for key {key!r}, but it is missing")
            mapping[key] = file_path
        return mapping

    def _keys_of_file(self, file_path: Path) -> dict[str, Path]:
        if file_path.suffix == ".safetensors":
            try:
                with safe_open(str(file_path), framework="pt") as handle:
                    return {key: file_path for key in handle.keys()}
            except Exception as exc:  # safetensors raises its own error types
                raise CheckpointError(f"cannot read safetensors file {file_path}: {exc}") from exc
        if file_path.suffix in PICKLE_SUFFIXES:
            return {key: file_path for key in self._load_pickle(file_path)}
        raise CheckpointError(
            f"unsupported checkpoint file {file_path}: use a .safetensors file, a .pt/.bin state dict, "
            "or a Hugging Face model folder"
        )

    def _load_pickle(self, file_path: Path) -> dict[str, torch.Tensor]:
        cache = getattr(self, "_pickle_cache", None)
        if cache is None:
            cache = self._pickle_cache = {}
        if file_path not in cache:
            try:
                try:
                    state = torch.load(file_path, map_location="cpu", weights_only=True, mmap=True)
                except RuntimeError as exc:
                    if "mmap" not in str(exc):
                        raise
                    # Old (non-zip) serialisation cannot be memory-mapped; it is loaded eagerly instead.
                    with warnings.catch_warnings():     # a plain pickle's protocol: the error below says it all
                        warnings.filterwarnings("ignore", message="Detected pickle protocol")
                        state = torch.load(file_path, map_location="cpu", weights_only=True)
            except Exception as exc:
                raise CheckpointError(pickle_error_message(file_path, exc)) from exc
            if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
                state = state["state_dict"]
            if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
                raise CheckpointError(f"{file_path} is not a state dict of tensors")
            cache[file_path] = state
        return cache[file_path]

    # ----------------------------------------------------------------- queries
    def keys(self) -> list[str]:
        return list(self._key_to_file)

    def __contains__(self, key: str) -> bool:
        return key in self._key_to_file

    def __len__(self) -> int:
        return len(self._key_to_file)

    def _file_of(self, key: str) -> Path:
        try:
            return self._key_to_file[key]
        except KeyError:
            raise CheckpointError(f"key {key!r} not found in checkpoint {self.path}") from None

    def shape(self, key: str) -> tuple[int, ...]:
        return self._meta[key][0]

    def dtype(self, key: str) -> torch.dtype:
        return self._meta[key][1]

    def numel(self, key: str) -> int:
        n = 1
        for size in self.shape(key):
            n *= size
        return n

    @cached_property
    def _meta(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        meta: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
        by_file: dict[Path, list[str]] = {}
        for key, file_path in self._key_to_file.items():
            by_file.setdefault(file_path, []).append(key)
        for file_path, keys in by_file.items():
            if file_path.suffix == ".safetensors":
                try:
                    handle = safe_open(str(file_path), framework="pt")
                except Exception as exc:  # safetensors raises its own error types
                    raise CheckpointError(f"cannot read safetensors file {file_path}: {exc}; the file is "
                                          "corrupt or truncated: re-download or re-save it") from None
                with handle:
                    present = set(handle.keys())
                    for key in keys:
                        if key not in present:
                            raise CheckpointError(f"the index of {self.path} puts {key!r} in {file_path.name}, "
                                                  "which does not hold it; re-save the model")
                        sl = handle.get_slice(key)
                        meta[key] = (tuple(sl.get_shape()), SAFETENSORS_DTYPES[sl.get_dtype()])
            else:
                state = self._load_pickle(file_path)
                for key in keys:
                    meta[key] = (tuple(state[key].shape), state[key].dtype)
        return meta

    def get(self, key: str) -> torch.Tensor:
        """Load one tensor (a fresh CPU tensor; safe to modify)."""
        file_path = self._file_of(key)
        if file_path.suffix == ".safetensors":
            with safe_open(str(file_path), framework="pt") as handle:
                tensor = handle.get_tensor(key)
            self._hasher(file_path).observe(key, tensor)
            return tensor
        return self._load_pickle(file_path)[key].clone()

    def _hasher(self, file_path: Path) -> _ReadAlongHash:
        if file_path not in self._hashers:
            self._hashers[file_path] = _ReadAlongHash(file_path)
        return self._hashers[file_path]

    def iter_tensors(self, keys: list[str] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        for key in keys if keys is not None else self.keys():
            yield key, self.get(key)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Everything in memory at once: only for small models and tests."""
        return dict(self.iter_tensors())

    # ----------------------------------------------------------------- metadata
    @cached_property
    def config(self) -> dict | None:
        """The Hugging Face ``config.json`` beside the weights, if any."""
        config_dir = self.folder if self.folder is not None else self.path.parent
        config_path = config_dir / "config.json"
        if not config_path.is_file():
            return None
        try:
            config = json.loads(config_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise CheckpointError(f"malformed {config_path}: {exc}") from exc
        if not isinstance(config, dict):
            raise CheckpointError(f"malformed {config_path}: a model config is a JSON object ({{...}}), this one "
                                  f"is a {type(config).__name__}")
        return config

    @property
    def model_type(self) -> str | None:
        return (self.config or {}).get("model_type")

    @property
    def weight_files(self) -> list[Path]:
        return sorted(set(self._key_to_file.values()))

    def file_hashes(self) -> dict[str, str]:
        """sha256 of every weight file, for the model card.

        Safetensors files are hashed along with the tensor reads (see ``_ReadAlongHash``), so
        calling this after a merge costs only the bytes the merge did not read.
        """
        return {str(p): self._hasher(p).hexdigest() if p.suffix == ".safetensors" else sha256_of_file(p)
                for p in self.weight_files}

    def __repr__(self) -> str:
        return f"CheckpointReader({str(self.path)!r}, {len(self)} tensors)"


def open_checkpoint(path: str | Path | CheckpointReader, role: str | None = None) -> CheckpointReader:
    return path if isinstance(path, CheckpointReader) else CheckpointReader(path, role)
