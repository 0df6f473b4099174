"""Per-block checkpoints: a killed run resumes from the last finished block with the same result.

After block l the folder holds each finished block's merged parameters (and the method's
artifacts, e.g. learned coefficients) plus ``run.json``, written last and atomically, naming how
many blocks are finished, how long each took to train (a resumed run reports those times, not
the seconds it spent reloading) and a fingerprint of the run. Activations are not saved: on resume they
are recomputed exactly by re-capturing the streams and pushing them through the finished blocks,
which costs forward passes only. Randomness is seeded per block from the run seed, so a resumed
block draws the same numbers as in an uninterrupted run. The fingerprint hashes the few-shot batches
as given, before the engine regroups them and cuts them into pieces (``engine.batching``), so a run
resumed with another ``call_cost`` goes on as a run with that cost would.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from layermerge.errors import OutputError

RUN_FILE = "run.json"
FORMAT = 1


def _atomic_json(path: Path, record: dict) -> None:
    temp = path.with_name(path.name + ".tmp")
    temp.write_text(json.dumps(record, indent=1, sort_keys=True))
    os.replace(temp, path)


def _atomic_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    temp = path.with_name(path.name + ".tmp")
    save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, str(temp))
    os.replace(temp, path)


class RunCheckpoint:
    """A checkpoint folder for one engine run, identified by a JSON-able fingerprint."""

    def __init__(self, folder: str | Path, fingerprint: dict):
        self.folder = Path(folder)
        self.fingerprint = json.loads(json.dumps(fingerprint, sort_keys=True, default=str))
        self.seconds: list[float | None] = []      # training seconds of each finished block

    def start(self, resume: bool) -> int:
        """Prepare the folder; return how many blocks a previous run finished (0 for a fresh run)."""
        run_file = self.folder / RUN_FILE
        if not run_file.exists():
            self.folder.mkdir(parents=True, exist_ok=True)
            _atomic_json(run_file, {"format": FORMAT, "fingerprint": self.fingerprint, "finished": 0})
            return 0
        try:
            record = json.loads(run_file.read_text())
        except (ValueError, UnicodeDecodeError) as exc:
            raise OutputError(f"checkpoint folder {self.folder} holds an unreadable {RUN_FILE} ({exc}); remove "
                              "the folder to start afresh, or choose another checkpoint folder") from None
        if not isinstance(record, dict) or not isinstance(record.get("finished"), int):
            raise OutputError(f"{run_file} is not a layermerge run record; remove the folder {self.folder} to "
                              "start afresh, or choose another checkpoint folder")
        if not resume:
            raise OutputError(
                f"checkpoint folder {self.folder} already holds a run ({record.get('finished', 0)} blocks "
                "finished). Pass resume=True (--resume) to continue it, or choose another checkpoint folder.")
        self.seconds = list(record.get("block_seconds") or [])      # absent in checkpoints of older versions
        if record.get("fingerprint") != self.fingerprint:
            differing = sorted(k for k in set(self.fingerprint) | set(record.get("fingerprint", {}))
                               if self.fingerprint.get(k) != record.get("fingerprint", {}).get(k))
            raise OutputError(
                f"cannot resume from {self.folder}: it was written by a different run (differs in: "
                f"{', '.join(differing)}). Use the same method, parameters, seed, data and models, or start "
                "fresh in another checkpoint folder.")
        return int(record["finished"])

    def _path(self, index: int, kind: str) -> Path:
        return self.folder / f"block_{index:04d}.{kind}"

    def save_block(self, index: int, params: dict[str, torch.Tensor], artifacts: dict[str, torch.Tensor],
                   stats: dict, seconds: float | None = None) -> None:
        _atomic_tensors(self._path(index, "params.safetensors"), params)
        if artifacts:
            _atomic_tensors(self._path(index, "artifacts.safetensors"), artifacts)
        _atomic_json(self._path(index, "stats.json"), stats)
        self.seconds = (self.seconds + [None] * index)[:index] + [seconds]
        _atomic_json(self.folder / RUN_FILE, {"format": FORMAT, "fingerprint": self.fingerprint,
                                              "finished": index + 1, "block_seconds": self.seconds})

    def block_seconds(self, index: int) -> float | None:
        """How long block ``index`` took to train when it was checkpointed (None: not recorded)."""
        return self.seconds[index] if index < len(self.seconds) else None

    def load_block(self, index: int) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict]:
        artifacts_path = self._path(index, "artifacts.safetensors")
        artifacts = load_file(str(artifacts_path)) if artifacts_path.exists() else {}
        stats = json.loads(self._path(index, "stats.json").read_text())
        return load_file(str(self._path(index, "params.safetensors"))), artifacts, stats
