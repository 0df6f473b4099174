"""Data parallelism over the few-shot examples with torch.distributed.

Under ``torchrun --nproc-per-node N -m layermerge merge CONFIG.yaml`` every rank reads the same
checkpoints and the same few-shot batches, but captures, caches and runs only the batches it owns
(batch ``n`` of the flattened ``(task, batch)`` list belongs to rank ``n mod N``). Coefficient
gradients are summed across ranks after each step, so every rank takes the same optimiser step
and holds the same coefficients; rank 0 alone writes checkpoints and the output. gloo on CPU,
NCCL on CUDA (each rank on ``cuda:LOCAL_RANK``).
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch

from layermerge.errors import ConfigError

ENV_WORLD = "WORLD_SIZE"
ENV_RANK = "RANK"
ENV_LOCAL_RANK = "LOCAL_RANK"
DEFAULT_TIMEOUT = datetime.timedelta(minutes=30)


@dataclass(frozen=True)
class DataParallel:
    """Who this process is among the data-parallel ranks; a single process is rank 0 of 1."""

    rank: int = 0
    world_size: int = 1

    @property
    def active(self) -> bool:
        return self.world_size > 1

    @property
    def is_writer(self) -> bool:
        """Rank 0 writes checkpoints and the output."""
        return self.rank == 0

    def owns(self, position: int) -> bool:
        """Whether batch number ``position`` (over all tasks, in order) is processed by this rank."""
        return position % self.world_size == self.rank

    def all_reduce_(self, tensors: list[torch.Tensor]) -> None:
        """Sum each tensor over all ranks, in place (a no-op for one process)."""
        if not self.active:
            return
        import torch.distributed as dist

        for tensor in tensors:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)

    def sum(self, value: float | torch.Tensor, device: torch.device | str = "cpu") -> float:
        """A number summed over all ranks."""
        if not self.active:
            return float(value)
        tensor = torch.tensor([float(value)], dtype=torch.float64, device=device)
        self.all_reduce_([tensor])
        return float(tensor.item())

    def broadcast_int(self, value: int, device: torch.device | str = "cpu") -> int:
        """Rank 0's ``value`` on every rank."""
        if not self.active:
            return int(value)
        import torch.distributed as dist

        tensor = torch.tensor([int(value)], dtype=torch.int64, device=device)
        dist.broadcast(tensor, src=0)
        return int(tensor.item())

    def barrier(self) -> None:
        if self.active:
            import torch.distributed as dist

            dist.barrier()


SINGLE = DataParallel()


def current() -> DataParallel:
    """The initialised process group as a DataParallel, or a single process."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return DataParallel(dist.get_rank(), dist.get_world_size())
    return SINGLE


def launched_distributed() -> bool:
    """True under torchrun (or any launcher that sets WORLD_SIZE > 1)."""
    return int(os.environ.get(ENV_WORLD, "1")) > 1


def resolve_device(device: str | torch.device, parallel: DataParallel = SINGLE) -> torch.device:
    """``cpu``, ``cuda``, ``cuda:N`` or ``auto`` (CUDA when present); under torchrun ``cuda`` means
    ``cuda:LOCAL_RANK``."""
    name = str(device)
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} asked for, but torch sees no CUDA device (torch "
                          f"{torch.__version__}); use device: cpu, or install a CUDA build of torch")
    if name == "cuda" and parallel.active:
        name = f"cuda:{int(os.environ.get(ENV_LOCAL_RANK, parallel.rank))}"
    try:
        return torch.device(name)
    except RuntimeError:
        raise ConfigError(f"unknown device {device!r}; use cpu, cuda, cuda:N or auto") from None


def init_from_environment(device: str | torch.device = "cpu",
                          timeout: datetime.timedelta = DEFAULT_TIMEOUT) -> DataParallel:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT).

    gloo when the blocks run on the CPU, NCCL on CUDA. Without a launcher this is a single process.
    """
    import torch.distributed as dist

    if not launched_distributed():
        return current()
    if not dist.is_available():
        raise ConfigError("this torch build has no torch.distributed; run without torchrun")
    if not dist.is_initialized():
        missing = [name for name in (ENV_RANK, "MASTER_ADDR", "MASTER_PORT") if name not in os.environ]
        if missing:
            raise ConfigError(f"WORLD_SIZE={os.environ[ENV_WORLD]} but {', '.join(missing)} is not set; "
                              "launch with torchrun --nproc-per-node N -m layermerge merge CONFIG.yaml")
        wants_cuda = str(device).startswith("cuda") or (str(device) == "auto" and torch.cuda.is_available())
        backend = "nccl" if wants_cuda else "gloo"
        if wants_cuda:
            torch.cuda.set_device(int(os.environ.get(ENV_LOCAL_RANK, os.environ[ENV_RANK])))
        dist.init_process_group(backend=backend, init_method="env://", timeout=timeout)
    return current()


def shutdown() -> None:
    """Leave the process group (if one was joined)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
