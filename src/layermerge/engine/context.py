"""What a data-driven method sees: the cached streams and, per block or for the whole stack, the
weights and a differentiable way to run the blocks on them.

A method works with ``PairRef``s (one cached batch of one task). Under data parallelism every rank
knows every ref (so all ranks agree on shuffles and loss scales) but holds the activations of the
refs it owns only; ``is_local`` says which, and ``all_reduce_`` / ``sum`` combine per-rank
gradients and losses. In a single process every ref is local and both are no-ops.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from layermerge.distributed import SINGLE, DataParallel
from layermerge.engine.cache import ActivationCache
from layermerge.engine.capture import call_block, call_block_outputs, hidden_of, outputs_at
from layermerge.engine.tree import carried_positions, fill_carried, fill_tensors, map_tensors, split_tensors
from layermerge.progress import progress


@dataclass
class BlockResult:
    """A method's answer for one block: merged weights (block-relative names), optional artifacts
    (tensors saved with the output, e.g. learned coefficients) and JSON-able stats (losses...).

    ``loss_weights`` (per task) asks the engine for the block's final loss: as it pushes the merged
    stream through the merged block, it measures each task's Σ‖Block(W; z_m) − Block(θ_i; z_i)‖²
    (padding left out) and records Σ_task weight × error, summed over ranks, as ``stats["loss_final"]``
    — the same number a method would get from one more forward pass over every batch, for free.
    """

    params: dict[str, torch.Tensor]
    artifacts: dict[str, torch.Tensor] = field(default_factory=dict)
    stats: dict = field(default_factory=dict)
    loss_weights: dict[str, float] | None = None


@dataclass(frozen=True)
class PairRef:
    """One cached batch of a task: ``size`` examples, ``batch`` its position in the task's list,
    ``unit`` the batches that belong in one optimiser step together (pieces of one regrouped batch,
    ``engine.batching``; a batch of its own when None)."""

    task: str
    batch: int
    size: int
    unit: int | None = None


class Streams:
    """The cached activations of every stream, addressed by (kind, task, batch).

    ``refs`` lists every batch of every task (on every rank); ``local`` the ones this rank holds.
    """

    def __init__(self, cache: ActivationCache):
        self.cache = cache
        self.refs: dict[str, list[PairRef]] = {}
        self.local: set[tuple[str, int]] = set()
        self.masks: dict[tuple[str, int], torch.Tensor | None] = {}
        self._extras: dict[tuple[str, str, int], tuple[Any, list[int], int, int]] = {}

    def local_refs(self, task: str) -> list[PairRef]:
        return [ref for ref in self.refs[task] if (ref.task, ref.batch) in self.local]

    def put_extras(self, stream: str, task: str, batch: int, extras: list, extra_index: list[int],
                   first_block: int = 0) -> None:
        """The extra arguments of blocks ``first_block, first_block + 1, ...`` (one stack), replacing the
        previous stack's."""
        skeleton, tensors = split_tensors(extras)
        previous = self._extras.get((stream, task, batch))
        for position in range(len(tensors), previous[2] if previous else 0):
            self.cache.pop(("extra", stream, task, batch, position))
        for position, tensor in enumerate(tensors):
            self.cache.put(("extra", stream, task, batch, position), tensor)
        self._extras[(stream, task, batch)] = (skeleton, extra_index, len(tensors), first_block)

    def extra(self, stream: str, task: str, batch: int, block: int, device,
              carried: dict[int, torch.Tensor] | None = None) -> tuple[tuple, dict]:
        """Block ``block``'s extra arguments on ``stream``; outputs the previous block hands on (``Carried``
        placeholders) come from ``carried`` or, by default, from what the engine stored for the stream."""
        skeleton, extra_index, count, first_block = self._extras[(stream, task, batch)]
        tensors = [self.cache.get(("extra", stream, task, batch, i)) for i in range(count)]
        extras = fill_tensors(skeleton, tensors)[extra_index[block - first_block]]
        positions = carried_positions(extras)
        if positions:
            if carried is None:
                carried = {position: self.cache.get(("carry", stream, task, batch, position))
                           for position in positions}
            extras = fill_carried(extras, carried)
        return map_tensors(extras, lambda t: t.to(device))

    def put_carried(self, stream: str, task: str, batch: int, outputs: dict[int, torch.Tensor],
                    pending: bool = False) -> None:
        """Store a block's handed-on outputs for the next block of ``stream`` (``pending``: only once the
        current block is finished, see ``commit_carried``)."""
        kind = "carry_next" if pending else "carry"
        for position, tensor in outputs.items():
            self.cache.put((kind, stream, task, batch, position), tensor.detach())

    def commit_carried(self, stream: str, task: str, batch: int, positions) -> None:
        for position in positions:
            self.cache.rename(("carry_next", stream, task, batch, position), ("carry", stream, task, batch, position))


class StreamAccess:
    """Access to the cached pairs shared by the per-block and the whole-network contexts."""

    quiet = True            # the engine sets its own: whether a method's long loops show progress bars

    def __init__(self, tasks: list[str], streams: Streams, device: torch.device, generator: torch.Generator,
                 dtype: torch.dtype | None, parallel: DataParallel):
        self.tasks = list(tasks)
        self.device = device
        self.generator = generator
        self.dtype = dtype                 # block compute dtype; None: the weights' own (fp32)
        self.parallel = parallel
        self._streams = streams

    def progress(self, iterable, desc: str):
        """A progress bar over a method's inner loop (epochs), on the writing rank only; it disappears
        when done, so the engine's blocks bar stays the one line left."""
        return progress(iterable, desc=desc, disable=self.quiet or not self.parallel.is_writer, leave=False)

    # ----------------------------------------------------------------- which pairs
    def pairs(self, task: str | None = None) -> list[PairRef]:
        """Every cached batch of ``task`` (all tasks when None), in a fixed order, on every rank."""
        tasks = [task] if task is not None else self.tasks
        return [ref for name in tasks for ref in self._streams.refs[name]]

    def is_local(self, ref: PairRef) -> bool:
        """Whether this rank holds ``ref``'s activations (always, in a single process)."""
        return (ref.task, ref.batch) in self._streams.local

    def local_pairs(self, task: str | None = None) -> list[PairRef]:
        return [ref for ref in self.pairs(task) if self.is_local(ref)]

    def num_examples(self, task: str) -> int:
        """Examples of ``task`` over all ranks."""
        return sum(ref.size for ref in self._streams.refs[task])

    # ----------------------------------------------------------------- combining ranks
    @property
    def rank(self) -> int:
        return self.parallel.rank

    @property
    def world_size(self) -> int:
        return self.parallel.world_size

    def all_reduce_(self, tensors: list[torch.Tensor]) -> None:
        """Sum ``tensors`` (e.g. gradients) over ranks in place; a no-op in a single process."""
        self.parallel.all_reduce_(tensors)

    def sum(self, value: float | torch.Tensor) -> float:
        """A number (e.g. a loss) summed over ranks."""
        return self.parallel.sum(value, self.device)

    # ----------------------------------------------------------------- cached tensors
    def _get(self, kind: str, ref: PairRef) -> torch.Tensor:
        if not self.is_local(ref):
            raise RuntimeError(f"batch {ref.batch} of task '{ref.task}' is held by another rank "
                               f"(this is rank {self.rank} of {self.world_size}); iterate over "
                               "local_pairs() and combine ranks with all_reduce_/sum")
        return self._streams.cache.get((kind, ref.task, ref.batch)).to(self.device)

    def token_mask(self, ref: PairRef) -> torch.Tensor | None:
        """Bool (batch, tokens) mask of real tokens, or None when the batch has no padding mask."""
        mask = self._streams.masks[(ref.task, ref.batch)]
        return None if mask is None else mask.to(self.device)


class BlockContext(StreamAccess):
    """Everything a method may use to merge one block: its module, weights and cached streams."""

    def __init__(self, index: int, name: str, module: nn.Module, base: dict[str, torch.Tensor],
                 experts: dict[str, dict[str, torch.Tensor]], streams: Streams, device: torch.device,
                 generator: torch.Generator, num_blocks: int, dtype: torch.dtype | None = None,
                 parallel: DataParallel = SINGLE):
        super().__init__(list(experts), streams, device, generator, dtype, parallel)
        self.index = index
        self.name = name
        self.module = module
        self.base = base
        self.experts = experts
        self.num_blocks = num_blocks

    def merged_input(self, ref: PairRef) -> torch.Tensor:
        """z_m: this block's input in the merged model built so far."""
        return self._get("zm", ref)

    def expert_input(self, ref: PairRef) -> torch.Tensor:
        """z_i: this block's input in the task's expert."""
        return self._get("zi", ref)

    def expert_output(self, ref: PairRef) -> torch.Tensor:
        """Block(θ_i; z_i), computed once per block by the engine (it does not depend on the merge)."""
        return self._get("yi", ref)

    def extra(self, ref: PairRef, stream: str = "merged") -> tuple[tuple, dict]:
        """The extra block arguments (masks, positions...) of the ``merged`` or ``expert`` stream."""
        return self._streams.extra(stream, ref.task, ref.batch, self.index, self.device)

    def run(self, params: dict[str, torch.Tensor] | None, hidden: torch.Tensor, ref: PairRef,
            stream: str = "merged") -> torch.Tensor:
        """This block's output on ``hidden`` with weights ``params`` (differentiable in them)."""
        return call_block(self.module, params, hidden, self.extra(ref, stream), self.dtype)

    def run_expert(self, task: str, hidden: torch.Tensor, ref: PairRef,
                   stream: str = "expert") -> torch.Tensor:
        return self.run(self.experts[task], hidden, ref, stream)


class NetworkContext(StreamAccess):
    """Every block at once, for methods trained end to end (DistillMerge).

    ``modules[l]``, ``base[l]`` and ``experts[l][task]`` are block ``l``'s template module and
    weights; ``merged_input`` is the merged model's first-block input (Task-Arithmetic embedding
    stage) and ``expert_features`` the output of the expert's last block on its own stream.
    """

    def __init__(self, names: list[str], modules: list[nn.Module], base: list[dict[str, torch.Tensor]],
                 experts: list[dict[str, dict[str, torch.Tensor]]], tasks: list[str], streams: Streams,
                 device: torch.device, generator: torch.Generator, dtype: torch.dtype | None = None,
                 parallel: DataParallel = SINGLE):
        super().__init__(tasks, streams, device, generator, dtype, parallel)
        self.names = names
        self.modules = modules
        self.base = base
        self.experts = experts
        self.num_blocks = len(modules)
        self.carried: tuple[int, ...] = ()      # the block outputs each block hands on to the next

    def merged_input(self, ref: PairRef) -> torch.Tensor:
        return self._get("zm", ref)

    def expert_features(self, ref: PairRef) -> torch.Tensor:
        """The output of the task's expert's last block (its final features before the head stage)."""
        return self._get("zi", ref)

    def run_network(self, params: list[dict[str, torch.Tensor]], ref: PairRef) -> torch.Tensor:
        """All blocks in order on the merged stream's input, block ``l`` with ``params[l]``
        (differentiable in every block's weights)."""
        hidden = self.merged_input(ref)
        carried: dict[int, torch.Tensor] = {}
        for index, module in enumerate(self.modules):
            extra = self._streams.extra("merged", ref.task, ref.batch, index, self.device, carried)
            output = call_block_outputs(module, params[index], hidden, extra, self.dtype)
            hidden = hidden_of(output)
            if self.carried:
                carried = outputs_at(output, self.carried)
        return hidden
