"""The block-streaming driver shared by every data-driven method.

For each task's few-shot batches the engine keeps two streams: the merged model's block inputs
(starting from the Task-Arithmetic embedding stage) and the task's own expert's block inputs.
Block by block it hands a method the base and expert weights of that block plus access to the
cached (merged input, expert input, expert output) triples, takes back the merged block weights,
pushes both streams through the block, hands the block to a sink (the output writer) and writes a
checkpoint. Only one block's weights are loaded at a time; activations live in an
``ActivationCache`` within a RAM budget; finished blocks leave memory through the sink.

A method plugs in with an object that has a ``name`` and ``merge_block(ctx) -> BlockResult``, or
``merge_network(ctx) -> [BlockResult...]`` for methods trained end to end over every block; it
sees modules and tensors only, never an architecture name. A method may also say in which precision
the engine computes a block's expert outputs (``expert_output_precision(device, module) -> "float32" |
"bfloat16"``; float32 when it does not). The merged stream is always pushed in float32: it runs the
learned weights, and a bfloat16 cast of them would turn differences at float32's last bits (a
data-parallel sum's order) into bfloat16-sized ones in every later block.

The template model may hold its parameters on the meta device (no memory): the engine assigns
real tensors to the non-block weights and runs blocks through ``torch.func.functional_call``.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
from torch import nn

from layermerge.blocks import BlockPlan
from layermerge.distributed import SINGLE, DataParallel, resolve_device
from layermerge.engine.batching import block_call_cost, group_by_length, padding_share
from layermerge.engine.block_error import squared_error
from layermerge.engine.cache import ActivationCache
from layermerge.engine.capture import (
    call_block_outputs,
    capture_block_inputs,
    hidden_of,
    outputs_at,
    with_hidden_dtype,
)
from layermerge.engine.checkpoint import RunCheckpoint
from layermerge.engine.context import BlockContext, BlockResult, NetworkContext, PairRef, Streams
from layermerge.engine.precision import matmul_precision
from layermerge.engine.sources import WeightSource, as_source, expert_tensor
from layermerge.engine.tree import map_tensors
from layermerge.errors import ConfigError, DataError, IncompatibleExpertsError, OutputError
from layermerge.norm_stats import is_running_statistic, mean_of_experts
from layermerge.progress import progress as progress_report

DEFAULT_CACHE_BUDGET = 2 * 1024**3
COMPUTE_DTYPES = {"float32": None, "fp32": None, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


class BlockMerger(Protocol):
    """What a data-driven method supplies to the engine."""

    name: str

    def merge_block(self, ctx: BlockContext) -> BlockResult | dict[str, torch.Tensor]: ...


class EngineSink(Protocol):
    """Where finished weights go: ``non_block`` once (Task-Arithmetic embedding/head weights, template
    names), then ``block`` for every block in order (``prefix`` + block-relative names)."""

    def non_block(self, tensors: dict[str, torch.Tensor]) -> None: ...

    def block(self, index: int, prefix: str, result: BlockResult) -> None: ...


class CollectingSink:
    """Keeps everything in memory (the default: tests, small models, the in-memory API)."""

    def __init__(self):
        self.state: dict[str, torch.Tensor] = {}
        self.artifacts: dict[int, dict[str, torch.Tensor]] = {}

    def non_block(self, tensors: dict[str, torch.Tensor]) -> None:
        self.state.update({key: t.detach().to("cpu") for key, t in tensors.items()})

    def block(self, index: int, prefix: str, result: BlockResult) -> None:
        self.state.update({prefix + name: t.detach().to("cpu") for name, t in result.params.items()})
        if result.artifacts:
            self.artifacts[index] = {k: v.detach().to("cpu") for k, v in result.artifacts.items()}


class DiscardingSink:
    """For data-parallel ranks other than 0: they compute everything but write nothing."""

    def non_block(self, tensors: dict[str, torch.Tensor]) -> None:
        pass

    def block(self, index: int, prefix: str, result: BlockResult) -> None:
        pass


@dataclass
class EngineResult:
    """The merged state dict (template-model names), per-block artifacts and stats, and run facts.

    With a sink other than the default, ``state_dict`` and ``artifacts`` are empty: the sink got them.
    """

    state_dict: dict[str, torch.Tensor]
    plan: BlockPlan
    artifacts: dict[int, dict[str, torch.Tensor]]
    block_stats: list[dict]
    summary: dict


def block_seed(seed: int, index: int) -> int:
    """The seed of block ``index``: fixed by the run seed alone, so a resumed block draws the same numbers."""
    return (seed * 1_000_003 + index * 7_919 + 17) % (2**63 - 1)


def resolve_compute_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """None (blocks run on fp32 weights) or torch.bfloat16."""
    if dtype is None or dtype == torch.float32:
        return None
    if isinstance(dtype, torch.dtype):
        if dtype == torch.bfloat16:
            return dtype
        raise ConfigError(f"compute_dtype {dtype} is not supported; use float32 or bfloat16")
    if dtype not in COMPUTE_DTYPES:
        raise ConfigError(f"unknown compute_dtype {dtype!r}; use float32 or bfloat16")
    return COMPUTE_DTYPES[dtype]


# --------------------------------------------------------------------- validation helpers
def _check_data(data: Mapping[str, Sequence[Mapping]], tasks: list[str]) -> None:
    if not isinstance(data, Mapping):
        raise DataError(f"few-shot data must map each task name to a list of model-input batches, got "
                        f"{type(data).__name__}")
    missing = [task for task in tasks if task not in data]
    extra = [task for task in data if task not in tasks]
    if missing or extra:
        raise DataError(f"few-shot data and experts name different tasks: experts {tasks}, data "
                        f"{list(data)}; give one list of batches per expert, under the expert's name")
    for task in tasks:
        batches = data[task]
        if not batches:
            raise DataError(f"task '{task}' has no few-shot batches; give at least one input batch")
        for position, batch in enumerate(batches):
            if not isinstance(batch, Mapping) or not batch:
                raise DataError(f"task '{task}' batch {position} must be a non-empty dict of model inputs "
                                f"(e.g. {{'input_ids': ..., 'attention_mask': ...}}), got "
                                f"{type(batch).__name__}")


def data_fingerprint(data: Mapping[str, Sequence[Mapping]]) -> str:
    """A hash of the few-shot inputs, so a checkpoint is never resumed with other data."""
    digest = hashlib.sha256()
    for task in sorted(data):
        digest.update(task.encode())
        for batch in data[task]:
            for key in sorted(batch):
                value = batch[key]
                digest.update(key.encode())
                if isinstance(value, torch.Tensor):
                    digest.update(str((tuple(value.shape), str(value.dtype))).encode())
                    digest.update(value.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
                else:
                    digest.update(repr(value).encode())
    return digest.hexdigest()


def _padding(data: Mapping[str, Sequence[Mapping]], tasks: list[str]) -> float | None:
    shares = [padding_share(data[task]) for task in tasks]
    if any(share is None for share in shares):
        return None
    positions = [sum(batch["attention_mask"].numel() for batch in data[task]) for task in tasks]
    return round(sum(share * count for share, count in zip(shares, positions)) / sum(positions), 4)


def input_batch_size(batch: Mapping, task: str, position: int) -> int:
    """Examples in a model-input batch: the first dimension of its first tensor with one."""
    for value in batch.values():
        if isinstance(value, torch.Tensor) and value.dim() >= 1:
            return int(value.shape[0])
    raise DataError(f"task '{task}' batch {position} holds no tensor with a batch dimension "
                    f"(keys: {sorted(batch)}); give model inputs such as input_ids or pixel_values")


def _token_mask(batch: Mapping, hidden: torch.Tensor, stack: int = 0) -> torch.Tensor | None:
    """The real-token mask of a stack's stream: ``attention_mask`` for the first stack (the encoder),
    ``decoder_attention_mask`` for a decoder stack; None when absent or of another shape."""
    mask = batch.get("attention_mask" if stack == 0 else "decoder_attention_mask")
    if isinstance(mask, torch.Tensor) and mask.dim() == 2 and tuple(mask.shape) == tuple(hidden.shape[:2]):
        return mask.detach().to("cpu").bool()
    return None


def _block_params(source: WeightSource, prefix: str, names: list[str], device,
                  experts: bool = True) -> tuple[dict, list[dict]]:
    """Base and (unless ``experts=False``) expert weights of one block, block-relative names, fp32."""
    base = {name: source.base(prefix + name).to(device) for name in names}
    expert_weights: list[dict] = [{} for _ in source.tasks]
    if experts:
        for name in names:
            for position, tensor in enumerate(source.experts(prefix + name)):
                expert_weights[position][name] = tensor.to(device)
    return base, expert_weights


def non_block_tensor(key: str, base: torch.Tensor, experts: Iterable[torch.Tensor], scaling: float) -> torch.Tensor:
    """A tensor outside the trained blocks: Task Arithmetic at ``scaling``, except normalisation running
    statistics, which are the experts' mean (see ``layermerge.norm_stats``). ``experts`` may be a
    generator that reads one expert at a time (see ``task_arithmetic_tensor``)."""
    if base.is_floating_point() and is_running_statistic(key):
        return mean_of_experts(list(experts)).to(base.dtype)
    return task_arithmetic_tensor(base, experts, scaling)


SUM_CHUNK = 1 << 22        # elements per slice when a task vector is added to the running sum


def task_arithmetic_tensor(base: torch.Tensor, experts: Iterable[torch.Tensor], scaling: float) -> torch.Tensor:
    """θ0 + λ Σ τ_i for float tensors, the base for integer buffers.

    The task vectors are summed one expert at a time, each added in slices of ``SUM_CHUNK``
    elements, so besides the inputs only the sum is held, not the stack of T task vectors and its
    temporaries. ``experts`` may be a generator that reads one expert at a time: then base, sum and
    one expert are held, 3 tensors, where the stacked form held 7 with two experts (for Qwen2.5-1.5B's
    151,936 × 1,536 float32 embedding 0.9 GB each; benchmarks/llm/scale_qwen.py). The operations and
    their order are those of ``base + λ · stack(τ).sum(0)`` and of the data-free Task Arithmetic, so
    results match both bit for bit.
    """
    if not base.is_floating_point():
        return base
    total = None
    for expert in experts:
        if total is None:
            total = (expert - base).contiguous()
        else:
            flat_total, flat_expert, flat_base = total.view(-1), expert.reshape(-1), base.reshape(-1)
            for start in range(0, flat_total.numel(), SUM_CHUNK):
                part = slice(start, start + SUM_CHUNK)
                flat_total[part] += flat_expert[part] - flat_base[part]
            del flat_expert
        del expert              # before a generator reads the next one
    if total is None:
        raise ValueError("task_arithmetic_tensor needs at least one expert tensor")
    return total.mul_(scaling).add_(base)


def tied_aliases(model: nn.Module) -> dict[str, list[str]]:
    """Parameter name -> the other names of the same tensor (tied embeddings: ``shared.weight``,
    ``encoder.embed_tokens.weight``...), whatever names the model gives them."""
    by_tensor: dict[int, list[str]] = {}
    for name, parameter in model.named_parameters(remove_duplicate=False):
        by_tensor.setdefault(id(parameter), []).append(name)
    return {name: [other for other in names if other != name]
            for names in by_tensor.values() if len(names) > 1 for name in names}


def retie(model: nn.Module, loaded: Mapping[str, torch.Tensor], aliases: Mapping[str, list[str]]) -> None:
    """After ``load_state_dict(assign=True)``, point every tied name at the tensor loaded under one of its
    names (assigning replaces the parameter under that name only, leaving its twins on the meta device)."""
    for name in loaded:
        if name not in aliases:
            continue
        parameter = model.get_parameter(name)
        for other in aliases[name]:
            if other in loaded:
                continue
            path, _, attribute = other.rpartition(".")
            setattr(model.get_submodule(path) if path else model, attribute, parameter)


# --------------------------------------------------------------------- the engine
class BlockEngine:
    """One run of a BlockMerger over a model; see ``run_engine`` for the arguments."""

    def __init__(self, model: nn.Module, weights, data: Mapping[str, Sequence[Mapping]],
                 merger: BlockMerger, *,
                 plan: BlockPlan | None = None, block_plan: Mapping | None = None,
                 block_granularity: str = "layer", scaling: float = 0.3,
                 cache_budget: int = DEFAULT_CACHE_BUDGET, spill_dir: str | Path | None = None,
                 device: str | torch.device = "cpu", seed: int = 0, checkpoint_dir: str | Path | None = None,
                 resume: bool = False, quiet: bool = True, compute_dtype: str | torch.dtype | None = None,
                 sink: EngineSink | None = None, parallel: DataParallel | None = None,
                 regroup_by_length: bool = True, call_cost: int | None = None,
                 non_block_weights: Mapping[str, torch.Tensor] | None = None):
        self.model = model
        self.source = as_source(weights)
        self.tasks = list(self.source.tasks)
        _check_data(data, self.tasks)
        self.parallel = parallel or SINGLE
        self.device = resolve_device(device, self.parallel)
        self.padding_given = _padding(data, self.tasks)
        self.data_given = data          # what a checkpoint's fingerprint hashes (the pieces depend on call_cost)
        self.units = {task: list(range(len(data[task]))) for task in self.tasks}
        if regroup_by_length:
            call_cost = block_call_cost(self.device) if call_cost is None else call_cost
            if call_cost is not None:                # every rank must cut the batches alike (rank 0's)
                call_cost = self.parallel.broadcast_int(call_cost, self.device)
            regrouped = {task: group_by_length(data[task], call_cost) for task in self.tasks}
            data = {task: batches for task, (batches, _) in regrouped.items()}
            self.units = {task: units for task, (_, units) in regrouped.items()}
        self.data = data
        self.padding = _padding(data, self.tasks)
        self.merger = merger
        self.network = callable(getattr(merger, "merge_network", None))
        self.plan = plan or BlockPlan.from_model(model, block_plan, block_granularity)
        self.scaling = float(scaling)
        self.dtype = resolve_compute_dtype(compute_dtype)
        self.seed = int(seed)
        self.quiet = quiet
        self.cache = ActivationCache(cache_budget, spill_dir)
        self.streams = Streams(self.cache)
        self.checkpoint_dir = checkpoint_dir
        self.resume = resume
        self.sink = sink
        self.non_block_weights = non_block_weights
        if self.network and self.plan.stacks > 1:
            raise ConfigError(f"{merger.name} trains every block at once along one stream, but this model has "
                              f"{self.plan.stacks} stacks (an encoder and a decoder); use a block-by-block method "
                              "(prodistill, regmean) for it")
        self.aliases = tied_aliases(model)
        self.output_formats: dict[int, int | None] = {}
        self.precision_fallbacks: dict[int, str] = {}   # block index -> why its expert outputs ran in float32
        self.carried: dict[int, tuple[int, ...]] = {}      # per stack: outputs each block hands on
        self._check_keys()
        self._index_batches()

    def _check_keys(self) -> None:
        source_keys = set(self.source.keys())
        self.block_names: list[list[str]] = []
        for index, path in enumerate(self.plan.blocks):
            names = list(self.model.get_submodule(path).state_dict())
            prefix = self.plan.prefix(index)
            missing = [prefix + n for n in names if prefix + n not in source_keys]
            if missing:
                raise IncompatibleExpertsError(
                    f"block {path!r} of {type(self.model).__name__} has {len(missing)} weights the "
                    f"checkpoints do not name, e.g. {missing[:3]}; checkpoint keys look like "
                    f"{sorted(source_keys)[:3]}. The template model and the checkpoints must use the same "
                    "parameter names: layermerge.merge maps keys transformers renames at load time, but not "
                    "tensors it fuses or splits; for those, load each model and pass "
                    "StateDictSource.from_models(base, experts) to run_engine.")
            self.block_names.append(names)
        module_keys = set(self.model.state_dict())
        self.non_block_keys = [k for k in self.plan.non_block_keys(self.source.keys()) if k in module_keys]

    def _index_batches(self) -> None:
        """Every (task, batch) pair, in order, with its size; this rank's share is ``streams.local``."""
        position = 0
        for task in self.tasks:
            self.streams.refs[task] = []
            for batch_index, batch in enumerate(self.data[task]):
                size = input_batch_size(batch, task, batch_index)
                self.streams.refs[task].append(PairRef(task, batch_index, size, self.units[task][batch_index]))
                if self.parallel.owns(position):
                    self.streams.local.add((task, batch_index))
                position += 1

    def fingerprint(self) -> dict:
        describe = getattr(self.merger, "config", None)
        source_id = getattr(self.source, "fingerprint", None)
        return {"method": self.merger.name, "method_config": describe() if callable(describe) else None,
                "tasks": self.tasks, "blocks": list(self.plan.blocks),
                "stack_starts": list(self.plan.stack_starts), "scaling": self.scaling,
                "seed": self.seed, "compute_dtype": str(self.dtype or torch.float32),
                "data": data_fingerprint(self.data_given), "weights": source_id() if callable(source_id) else None}

    # ----------------------------------------------------------------- capture
    def _prepare_model(self) -> None:
        """Eval mode, and the template's real tensors (buffers, materialised weights) on the device.
        Meta tensors stay where they are: blocks get their weights through functional_call."""
        self.model.eval()
        self.model._apply(lambda t: t if t.is_meta else t.to(self.device))

    def _load_non_block(self, state: dict[str, torch.Tensor]) -> None:
        """Assign (not copy: the template may be on the meta device) non-block weights to the template."""
        dtype = self.dtype
        placed = {k: v.to(self.device, dtype) if dtype is not None and v.is_floating_point() else v.to(self.device)
                  for k, v in state.items()}
        result = self.model.load_state_dict(placed, strict=False, assign=True)
        if result.unexpected_keys:
            raise IncompatibleExpertsError(f"weights {result.unexpected_keys[:3]} do not fit "
                                           f"{type(self.model).__name__}")
        retie(self.model, placed, self.aliases)

    def _check_embedding_materialised(self) -> None:
        for path in self.plan.embedding:
            module = self.model.get_submodule(path)
            for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
                if tensor.is_meta:
                    raise IncompatibleExpertsError(
                        f"the embedding stage weight '{path}.{name}' of {type(self.model).__name__} is in none "
                        "of the checkpoints, so the merged model's block inputs cannot be computed; the base "
                        "and experts must hold every weight the model runs before its first block")

    def _capture(self, stream: str, task: str, kind: str, first_block: dict[str, torch.Tensor],
                 stack: int = 0) -> None:
        for position, batch in enumerate(self.data[task]):
            if (task, position) not in self.streams.local:
                continue
            batch = map_tensors(dict(batch), lambda t: t.to(self.device))
            replay = {earlier: self.cache.get(("final", earlier, kind, task, position)).to(self.device)
                      for earlier in range(stack)}
            first_capture = stack == self.plan.stacks - 1 and stack not in self.output_formats
            inputs = capture_block_inputs(self.model, self.plan, batch, first_block, stack=stack, replay=replay,
                                          replay_formats=self.output_formats, run_to_end=first_capture,
                                          known_format=self.output_formats.get(stack, "unknown"))
            self.output_formats.setdefault(stack, inputs.output_format)
            self.carried[stack] = tuple(sorted(set(self.carried.get(stack, ())) | set(inputs.carried)))
            expected = self.streams.refs[task][position].size
            if inputs.hidden.dim() == 0 or inputs.hidden.shape[0] != expected:
                raise DataError(f"task '{task}' batch {position}: its inputs hold {expected} examples but the "
                                f"first block received hidden states of shape {tuple(inputs.hidden.shape)}; "
                                "give batches whose tensors all have the examples along dimension 0 (a model "
                                "that runs its blocks sequence-first, as XLNet does, cannot be streamed)")
            self.cache.put((kind, task, position), inputs.hidden)
            self.streams.put_extras(stream, task, position, inputs.extras, inputs.extra_index,
                                    self.plan.stack_starts[stack])
            if stream == "merged":
                self.streams.masks[(task, position)] = _token_mask(batch, inputs.hidden, stack)

    def capture(self) -> dict[str, torch.Tensor]:
        """Fill both streams with the first block's inputs; return the Task-Arithmetic non-block weights.

        Each expert's non-block weights are read and loaded one expert at a time.
        """
        merged_non_block = {key: self._merged_non_block(key) for key in self.non_block_keys}
        self._load_non_block(merged_non_block)
        self._check_embedding_materialised()
        self._capture_stack(0, merged_non_block)
        return merged_non_block

    def _capture_stack(self, stack: int, merged_non_block: dict[str, torch.Tensor]) -> None:
        """Both streams' inputs to the first block of ``stack``; the template holds the merged non-block
        weights before and after."""
        first = self.plan.stack_starts[stack]
        first_block, _ = _block_params(self.source, self.plan.prefix(first), self.block_names[first],
                                       self.device, experts=False)
        if self.dtype is not None:
            first_block = {k: v.to(self.dtype) if v.is_floating_point() else v for k, v in first_block.items()}
        for task in self.tasks:
            self._capture("merged", task, "zm", first_block, stack)
        for position, task in enumerate(self.tasks):
            self._load_non_block({key: expert_tensor(self.source, key, position) for key in self.non_block_keys})
            self._capture("expert", task, "zi", first_block, stack)
        self._load_non_block(merged_non_block)

    @torch.no_grad()
    def _next_stack(self, stack: int, merged_non_block: dict[str, torch.Tensor]) -> None:
        """Keep the finished stack's final hidden states (both streams) and capture the next stack's inputs,
        built from them: the decoder's cross-attention then reads each stream's own encoder output."""
        for task in self.tasks:
            for ref in self.streams.local_refs(task):
                for kind in ("zm", "zi"):
                    self.cache.rename((kind, task, ref.batch), ("final", stack - 1, kind, task, ref.batch))
        self._capture_stack(stack, merged_non_block)

    def _merged_non_block(self, key: str) -> torch.Tensor:
        """Task Arithmetic at the run's λ, or the weight given in ``non_block_weights``."""
        if self.non_block_weights is not None and key in self.non_block_weights:
            given = self.non_block_weights[key]
            base = self.source.base(key)
            return given.to(base.dtype) if given.is_floating_point() else given
        return non_block_tensor(key, self.source.base(key), self._each_expert(key), self.scaling)

    def _each_expert(self, key: str) -> Iterator[torch.Tensor]:
        """The experts' tensors for ``key``, read one at a time (a non-block tensor can be the vocabulary
        embedding: holding every expert's float32 copy at once would cost T of them)."""
        for position in range(len(self.tasks)):
            yield expert_tensor(self.source, key, position)

    # ----------------------------------------------------------------- streaming
    def _handed_on(self, index: int) -> tuple[int, ...]:
        """The outputs block ``index`` hands on to the next block of its stack (usually none)."""
        stack = self.plan.stack_of(index)
        last = self.plan.stack_blocks(stack)[-1]
        return self.carried.get(stack, ()) if index != last else ()

    def _expert_output_precision(self, module: nn.Module) -> str:
        """The precision the method asks the expert outputs to be computed in (float32 unless it says)."""
        choose = getattr(self.merger, "expert_output_precision", None)
        return choose(self.device, module) if callable(choose) else "float32"

    def _expert_call(self, index: int, module: nn.Module, params: dict[str, torch.Tensor],
                     hidden: torch.Tensor, extra: tuple[tuple, dict], precision: str):
        """``call_block_outputs`` for the expert stream, in ``precision``. The hidden states come
        back in the stream's dtype whatever computed them; a block that cannot run in bfloat16 (as
        training falls back: DeBERTa's attention, X-MOD's adapters) is computed in float32 and the first
        such failure is kept for the block's stats. Expert weights are the checkpoints', so the expert
        stream is the same bits whatever the merge does."""
        if precision != "float32":
            try:
                with matmul_precision(precision, self.device):
                    output = call_block_outputs(module, params, hidden, extra, self.dtype)
                return with_hidden_dtype(output, hidden.dtype)
            except RuntimeError as exc:
                self.precision_fallbacks.setdefault(index, str(exc).strip().splitlines()[0][:120])
        return call_block_outputs(module, params, hidden, extra, self.dtype)

    @torch.no_grad()
    def _expert_outputs(self, index: int, module: nn.Module, experts: dict[str, dict]) -> None:
        handed_on = self._handed_on(index)
        precision = self._expert_output_precision(module)
        for task in self.tasks:
            for ref in self.streams.local_refs(task):
                hidden = self.cache.get(("zi", task, ref.batch)).to(self.device)
                extra = self.streams.extra("expert", task, ref.batch, index, self.device)
                output = self._expert_call(index, module, experts[task], hidden, extra, precision)
                self.cache.put(("yi", task, ref.batch), hidden_of(output))
                if handed_on:      # the expert stream's own, used from the next block on
                    self.streams.put_carried("expert", task, ref.batch, outputs_at(output, handed_on), pending=True)

    @torch.no_grad()
    def _push(self, index: int, module: nn.Module, merged: dict[str, torch.Tensor] | None,
              loss_weights: Mapping[str, float] | None = None) -> float | None:
        """z_m ← Block(W*; z_m) and z_i ← Block(θ_i; z_i) (already computed as the expert outputs).

        With ``loss_weights`` (see ``BlockResult``), also returns Σ_task weight × Σ‖Block(W*; z_m) − y_i‖²
        over this rank's batches, measured on the outputs just pushed."""
        handed_on = self._handed_on(index)
        loss = 0.0 if loss_weights is not None and merged is not None else None
        for task in self.tasks:
            for ref in self.streams.local_refs(task):
                if merged is not None:
                    hidden = self.cache.get(("zm", task, ref.batch)).to(self.device)
                    extra = self.streams.extra("merged", task, ref.batch, index, self.device)
                    output = call_block_outputs(module, merged, hidden, extra, self.dtype)
                    if loss is not None:
                        mask = self.streams.masks[(task, ref.batch)]
                        target = self.cache.get(("yi", task, ref.batch)).to(self.device)
                        loss += loss_weights[task] * float(squared_error(
                            hidden_of(output), target, None if mask is None else mask.to(self.device)))
                    self.cache.put(("zm", task, ref.batch), hidden_of(output))
                    if handed_on:
                        self.streams.put_carried("merged", task, ref.batch, outputs_at(output, handed_on))
                self.cache.rename(("yi", task, ref.batch), ("zi", task, ref.batch))
                self.streams.commit_carried("expert", task, ref.batch, handed_on)
        return loss

    def _normalise(self, index: int, result) -> BlockResult:
        if isinstance(result, Mapping):
            result = BlockResult(dict(result))
        if not isinstance(result, BlockResult):
            raise TypeError(f"{self.merger.name} must return a BlockResult or a dict of tensors per block")
        expected, got = set(self.block_names[index]), set(result.params)
        if expected != got:
            raise RuntimeError(f"{self.merger.name} returned wrong weights for block "
                               f"{self.plan.blocks[index]!r}: missing {sorted(expected - got)[:3]}, "
                               f"unexpected {sorted(got - expected)[:3]}")
        return result

    def _start_checkpoint(self) -> tuple[RunCheckpoint | None, int]:
        """The checkpoint folder (rank 0 prepares it) and how many blocks a previous run finished."""
        if not self.checkpoint_dir:
            return None, 0
        checkpoint = RunCheckpoint(self.checkpoint_dir, self.fingerprint())
        if self.parallel.is_writer:
            try:
                finished = checkpoint.start(self.resume)
            except OutputError:
                self.parallel.broadcast_int(-1, self.device)
                raise
            return checkpoint, self.parallel.broadcast_int(finished, self.device)
        finished = self.parallel.broadcast_int(0, self.device)
        if finished < 0:
            raise OutputError(f"rank 0 refused the checkpoint folder {self.checkpoint_dir}; see its error")
        return checkpoint, finished

    def run(self) -> EngineResult:
        started = time.perf_counter()
        self._prepare_model()
        checkpoint, finished = self._start_checkpoint()
        sink = self.sink or CollectingSink()
        block_stats: list[dict] = []
        block_seconds: list[float] = []
        try:
            with torch.no_grad():
                merged_non_block = self.capture()
                sink.non_block(merged_non_block)
            capture_seconds = time.perf_counter() - started
            if self.network:
                block_stats = self._run_network(sink, block_seconds)
            else:
                progress = progress_report(range(len(self.plan)), disable=self.quiet,
                                           desc=f"{self.merger.name}: blocks", unit="block")
                for index in progress:
                    block_started = time.perf_counter()
                    if self.plan.starts_stack(index):
                        self._next_stack(self.plan.stack_of(index), merged_non_block)
                    result = self._block(index, checkpoint, finished, block_started)
                    sink.block(index, self.plan.prefix(index), result)
                    block_stats.append(result.stats)
                    del result          # written: free this block before the next one is loaded
                    trained = checkpoint.block_seconds(index) if index < finished else None
                    block_seconds.append(trained if trained is not None else
                                         round(time.perf_counter() - block_started, 4))
            cache_stats = self.cache.stats()
        finally:
            self.cache.close()
        summary = {"blocks": len(self.plan), "resumed_blocks": finished, "scaling_non_block": self.scaling,
                   "padding_share_given": self.padding_given, "padding_share": self.padding,
                   "seed": self.seed, "device": str(self.device),
                   "compute_dtype": str(self.dtype or torch.float32).replace("torch.", ""),
                   "world_size": self.parallel.world_size, "cache": cache_stats, "plan": self.plan.to_dict(),
                   "capture_seconds": round(capture_seconds, 4), "block_seconds": block_seconds,
                   "seconds": round(time.perf_counter() - started, 3)}
        if isinstance(sink, CollectingSink):
            ordered = {key: sink.state[key] for key in self.source.keys() if key in sink.state}
            return EngineResult(ordered, self.plan, sink.artifacts, block_stats, summary)
        return EngineResult({}, self.plan, {}, block_stats, summary)

    def _block_weights(self, index: int) -> tuple[nn.Module, dict, dict[str, dict]]:
        module = self.model.get_submodule(self.plan.blocks[index])
        base, expert_list = _block_params(self.source, self.plan.prefix(index), self.block_names[index],
                                          self.device)
        return module, base, dict(zip(self.tasks, expert_list))

    def _block(self, index: int, checkpoint: RunCheckpoint | None, finished: int, started: float) -> BlockResult:
        module, base, experts = self._block_weights(index)
        self._expert_outputs(index, module, experts)
        if index < finished:
            params, saved_artifacts, stats = checkpoint.load_block(index)
            result = BlockResult({k: v.to(self.device) for k, v in params.items()}, saved_artifacts, stats)
        else:
            seed = block_seed(self.seed, index)
            torch.manual_seed(seed)
            generator = torch.Generator().manual_seed(seed)
            ctx = BlockContext(index, self.plan.blocks[index], module, base, experts, self.streams,
                               self.device, generator, len(self.plan), self.dtype, self.parallel)
            ctx.quiet = self.quiet
            result = self._normalise(index, self.merger.merge_block(ctx))
        loss = self._push(index, module, {k: v.detach() for k, v in result.params.items()}, result.loss_weights)
        if loss is not None:
            result.stats["loss_final"] = self.parallel.sum(loss, self.device)
        result.stats["expert_output_precision"] = self._expert_output_precision(module)
        if index in self.precision_fallbacks:
            result.stats["expert_output_precision_fallback"] = (
                f"bfloat16 failed ({self.precision_fallbacks[index]}); expert outputs computed in float32")
        if index >= finished and checkpoint is not None and self.parallel.is_writer:   # with the time a
            checkpoint.save_block(index, result.params, result.artifacts, result.stats,   # resume reports
                                  round(time.perf_counter() - started, 4))
        return result

    def _run_network(self, sink: EngineSink, block_seconds: list[float]) -> list[dict]:
        """End-to-end methods: push the expert streams through every block (so they end at the experts'
        final features), hand the method every block at once, then pass its blocks to the sink."""
        modules, bases, experts_per_block = [], [], []
        for index in range(len(self.plan)):
            module, base, experts = self._block_weights(index)
            self._expert_outputs(index, module, experts)
            self._push(index, module, None)
            modules.append(module)
            bases.append(base)
            experts_per_block.append(experts)
        seed = block_seed(self.seed, len(self.plan))
        torch.manual_seed(seed)
        generator = torch.Generator().manual_seed(seed)
        ctx = NetworkContext(list(self.plan.blocks), modules, bases, experts_per_block, self.tasks, self.streams,
                             self.device, generator, self.dtype, self.parallel)
        ctx.carried = self.carried.get(0, ())
        ctx.quiet = self.quiet
        started = time.perf_counter()
        results = list(self.merger.merge_network(ctx))
        if len(results) != len(self.plan):
            raise RuntimeError(f"{self.merger.name}.merge_network returned {len(results)} blocks for a plan of "
                               f"{len(self.plan)}")
        stats = []
        for index, result in enumerate(results):
            result = self._normalise(index, result)
            sink.block(index, self.plan.prefix(index), result)
            stats.append(result.stats)
        block_seconds.append(round(time.perf_counter() - started, 4))
        return stats


def run_engine(model: nn.Module, weights, data: Mapping[str, Sequence[Mapping]], merger: BlockMerger,
               **options) -> EngineResult:
    """Merge block by block with ``merger``.

    ``model`` is a template of the architecture (its non-block weights are overwritten; its
    parameters may live on the meta device); ``weights`` an ExpertSet or WeightSource named like the
    template's state dict; ``data`` maps each task to a list of model-input batches (dicts passed as
    ``model(**batch)``). Options: ``plan`` or ``block_plan`` (override mapping), ``block_granularity``
    (``layer`` or ``stage`` for hierarchical models, see ``BlockPlan.from_model``), ``scaling`` (Task
    Arithmetic λ of the non-block weights), ``cache_budget`` (bytes of RAM for activations),
    ``spill_dir``, ``device`` (cpu, cuda, cuda:N, auto), ``compute_dtype`` (float32, bfloat16),
    ``seed``, ``checkpoint_dir`` and ``resume``, ``quiet``, ``sink`` (where finished weights go; by
    default they are collected into the result), ``parallel`` (a DataParallel rank),
    ``regroup_by_length`` (default True: right-padded token batches are regrouped by length and
    trimmed, ``layermerge.engine.batching``), ``call_cost`` (token positions one more block call
    costs, for cutting regrouped batches into pieces; default ``batching.block_call_cost``),
    ``non_block_weights`` (merged values for non-block
    weights, in place of Task Arithmetic: ``layermerge.engine.diagnostics.block_errors``).
    """
    if options.get("resume") and not options.get("checkpoint_dir"):
        raise ConfigError("resume=True needs checkpoint_dir: the folder the interrupted run wrote its "
                          "blocks to")
    if callable(getattr(merger, "merge_network", None)) and (options.get("checkpoint_dir") or options.get("resume")):
        raise ConfigError(f"{merger.name} trains every block at once, so it has no per-block checkpoints: "
                          "drop checkpoint_dir / resume for it")
    return BlockEngine(model, weights, data, merger, **options).run()
