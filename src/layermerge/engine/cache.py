"""A key-value store of activations that stays within a RAM budget and spills to disk beyond it.

Few-shot activations for every stream (merged + one per expert) can outgrow RAM on big models.
Tensors are kept in memory while the total stays within ``budget`` bytes; later ones are written
to files in a temporary folder and read back memory-mapped, so the OS pages them in on demand.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Hashable
from pathlib import Path

import torch


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


class ActivationCache:
    """``put``/``get``/``pop`` CPU tensors by key; RAM up to ``budget`` bytes, then memory-mapped files."""

    def __init__(self, budget: int, spill_dir: str | Path | None = None):
        if budget < 0:
            raise ValueError(f"cache budget must be >= 0 bytes, got {budget}")
        self.budget = int(budget)
        self._parent = Path(spill_dir) if spill_dir is not None else None
        self._dir: Path | None = None
        self._ram: dict[Hashable, torch.Tensor] = {}
        self._disk: dict[Hashable, tuple[Path, int]] = {}
        self._counter = 0
        self.ram_bytes = 0
        self.disk_bytes = 0
        self.peak_ram_bytes = 0
        self.spilled = 0          # tensors written to disk over the cache's life

    def __contains__(self, key: Hashable) -> bool:
        return key in self._ram or key in self._disk

    def __len__(self) -> int:
        return len(self._ram) + len(self._disk)

    def _spill_dir(self) -> Path:
        if self._dir is None:
            if self._parent is not None:
                self._parent.mkdir(parents=True, exist_ok=True)
            self._dir = Path(tempfile.mkdtemp(prefix="layermerge-cache-", dir=self._parent))
        return self._dir

    def put(self, key: Hashable, tensor: torch.Tensor) -> None:
        """Store ``tensor`` on the CPU under ``key`` (replacing any value there), in RAM or on disk."""
        self.pop(key)
        tensor = tensor.detach().to("cpu").contiguous()
        size = _nbytes(tensor)
        if self.ram_bytes + size <= self.budget:
            self._ram[key] = tensor
            self.ram_bytes += size
            self.peak_ram_bytes = max(self.peak_ram_bytes, self.ram_bytes)
            return
        if tensor.untyped_storage().nbytes() != size:
            tensor = tensor.clone()          # a view would save its whole base storage
        self._counter += 1
        path = self._spill_dir() / f"{self._counter:08d}.pt"
        torch.save(tensor, path)
        self._disk[key] = (path, size)
        self.disk_bytes += size
        self.spilled += 1

    def get(self, key: Hashable) -> torch.Tensor:
        if key in self._ram:
            return self._ram[key]
        if key in self._disk:
            return torch.load(self._disk[key][0], mmap=True, weights_only=True)
        raise KeyError(key)

    def pop(self, key: Hashable) -> None:
        """Forget ``key`` (no error when absent), freeing its RAM or deleting its file."""
        if key in self._ram:
            self.ram_bytes -= _nbytes(self._ram.pop(key))
        elif key in self._disk:
            path, size = self._disk.pop(key)
            self.disk_bytes -= size
            path.unlink(missing_ok=True)

    def rename(self, old: Hashable, new: Hashable) -> None:
        """Move a value to another key without copying it."""
        self.pop(new)
        if old in self._ram:
            self._ram[new] = self._ram.pop(old)
        elif old in self._disk:
            self._disk[new] = self._disk.pop(old)
        else:
            raise KeyError(old)

    def stats(self) -> dict:
        return {"budget_bytes": self.budget, "ram_bytes": self.ram_bytes,
                "peak_ram_bytes": self.peak_ram_bytes, "disk_bytes": self.disk_bytes,
                "spilled_tensors": self.spilled}

    def close(self) -> None:
        """Drop everything and delete the spill folder."""
        self._ram.clear()
        self._disk.clear()
        self.ram_bytes = self.disk_bytes = 0
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    def __enter__(self) -> ActivationCache:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
