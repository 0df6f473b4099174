"""Block methods (ProDistill, DistillMerge, RegMean) through the block-streaming engine.

A template of the base's architecture is built with its parameters on the meta device (no memory),
its module names are mapped to the checkpoints' names (transformers 5 renames some families' keys at
load time), and every finished block streams straight into the writer, so peak memory stays near
one block whatever the depth. Besides the backbone the output holds the learned coefficients in
``<method>/coefficients*.safetensors`` and their per-block summary in ``<method>/blocks.json``.
"""

from __future__ import annotations

import shutil
from contextlib import contextmanager
from pathlib import Path

import torch

from layermerge import distributed
from layermerge.coefficient_plot import BLOCKS_FILE, block_coefficient_stats, plot_coefficients
from layermerge.engine import DiscardingSink, ExpertSetSource, non_block_tensor, run_engine
from layermerge.engine.context import BlockResult
from layermerge.engine.template import build_template, checkpoint_key_map, fused_key_layouts
from layermerge.errors import ConfigError
from layermerge.experts import ExpertSet
from layermerge.fewshot import adapt_batches, data_record, describe, few_shot_inputs, task_records
from layermerge.pipeline.plan import cache_budget_bytes
from layermerge.pipeline.sink import NullWriter
from layermerge.pipeline.strategies.base import Outcome, Strategy


class OutputSink:
    """Receives finished weights from the engine and writes them under checkpoint names at once."""

    def __init__(self, writer, source: ExpertSetSource, expert_set: ExpertSet, out_dtype: torch.dtype | None,
                 method: str, tasks: list[str]):
        self.writer = writer
        self.source = source
        self.reference = expert_set.reference
        self.ref_prefix = expert_set.reference_prefix
        self.out_dtype = out_dtype
        self.method = method
        self.tasks = tasks
        self.written: set[str] = set()
        self.blocks: list[dict] = []
        self.coefficients = None

    def add(self, template_key: str, tensor: torch.Tensor) -> None:
        for key, part in self.source.checkpoint_tensors(template_key, tensor.detach().to("cpu")).items():
            dtype = self.out_dtype or self.reference.dtype(self.ref_prefix + key)
            self.writer.add_tensor(key, part.to(dtype))
            self.written.add(key)

    def non_block(self, tensors: dict[str, torch.Tensor]) -> None:
        for key, tensor in tensors.items():
            self.add(key, tensor)

    def block(self, index: int, prefix: str, result: BlockResult) -> None:
        for name, tensor in result.params.items():
            self.add(prefix + name, tensor)
        if result.artifacts:
            if self.coefficients is None:
                self.coefficients = self.writer.stream_writer(self.method, prefix="coefficients")
            for key, tensor in result.artifacts.items():
                task, _, name = key.partition("/")
                if name in result.params:
                    key = f"{task}/{self.source.checkpoint_key(prefix + name)}"
                else:
                    key = f"{prefix}{key}"
                self.coefficients.add(key, tensor.detach().to("cpu").contiguous())
        first = self.source.checkpoint_key(prefix + next(iter(result.params))) if result.params else ""
        self.blocks.append({"index": index, "module": prefix.rstrip("."), "first_key": first,
                            "stats": result.stats,
                            "coefficients": block_coefficient_stats(result.artifacts, self.tasks)})

    def write_leftovers(self, expert_set: ExpertSet, scaling: float) -> list[str]:
        """Merged keys the template does not hold (nothing runs them): Task Arithmetic, like non-block weights."""
        left = [key for key in expert_set.report.merge_keys if key not in self.written]
        for key in left:
            # One tensor at a time, each dropped as soon as it is used: an untied lm_head is vocabulary-sized
            # (0.9 GB in float32 for Qwen2.5-1.5B). map keeps no reference to an expert's original once its
            # float copy exists (a generator expression's loop variable would hold it until the next read).
            base = expert_set.base_tensor(key)
            as_float = (lambda t: t.float()) if base.is_floating_point() else (lambda t: t)
            base = as_float(base)
            merged = non_block_tensor(key, base, map(as_float, expert_set.each_expert_tensor(key)), scaling)
            del base
            dtype = self.out_dtype or self.reference.dtype(self.ref_prefix + key)
            self.writer.add_tensor(key, merged.to(dtype))
            self.written.add(key)
            del merged
        return left


class BlockStrategy(Strategy):
    @contextmanager
    def session(self):
        """A data-parallel group when launched under torchrun; torn down whatever happens."""
        launched = distributed.launched_distributed() and not distributed.current().active
        self.parallel = distributed.init_from_environment(self.plan.engine.device) \
            if distributed.launched_distributed() else distributed.current()
        self.is_writer = self.parallel.is_writer
        try:
            yield self
        except BaseException:
            if launched:        # no barrier: the other ranks may be waiting in a collective; torchrun stops them
                distributed.shutdown()
            raise
        finally:
            if launched and distributed.current().active:
                self.parallel.barrier()
                distributed.shutdown()

    def prepare(self) -> None:
        plan, expert_set, engine = self.plan, self.expert_set, self.plan.engine
        self.algorithm = plan.method.cls(plan.params, expert_set.names)
        network = callable(getattr(self.algorithm, "merge_network", None))
        # Non-block weights (embeddings, final norm) get Task Arithmetic at this λ: a method's own choice
        # (RegMean averages: 1/T) or its initial coefficient.
        if callable(getattr(self.algorithm, "non_block_scaling", None)):
            self.scaling = float(self.algorithm.non_block_scaling(len(expert_set.names)))
        else:
            self.scaling = float(getattr(plan.params, "init", 0.3))
        self.model = build_template(expert_set, plan.template)
        key_map = checkpoint_key_map(self.model, expert_set.report.merge_keys)
        self.source = ExpertSetSource(expert_set, key_map, fused_key_layouts(self.model, expert_set, key_map))
        self.batches = adapt_batches(self.model, few_shot_inputs(plan.data, expert_set))
        self.checkpoint_dir = checkpoint_folder(engine, plan.output, network)
        check_engine_folders(engine, self.checkpoint_dir, expert_set.input_paths())
        self.options = {"block_plan": engine.block_plan, "block_granularity": engine.block_granularity,
                        "scaling": self.scaling,
                        "cache_budget": cache_budget_bytes(engine.cache_budget), "spill_dir": engine.spill_dir,
                        "device": engine.device, "compute_dtype": engine.compute_dtype, "seed": engine.seed,
                        "regroup_by_length": engine.regroup_by_length, "call_cost": engine.call_cost,
                        "checkpoint_dir": self.checkpoint_dir, "resume": engine.resume and not network,
                        "quiet": plan.quiet or not self.parallel.is_writer, "parallel": self.parallel}

    def run(self, writer) -> Outcome:
        plan, expert_set, method = self.plan, self.expert_set, self.plan.name
        record = {"data": data_record(plan.data, self.batches), "engine": plan.engine.model_dump(exclude={"resume"})}
        if isinstance(writer, NullWriter):
            run_engine(self.model, self.source, self.batches, self.algorithm, sink=DiscardingSink(), **self.options)
            return Outcome({}, record)
        sink = OutputSink(writer, self.source, expert_set, plan.dtype, method, expert_set.names)
        result = run_engine(self.model, self.source, self.batches, self.algorithm, sink=sink, **self.options)
        leftovers = sink.write_leftovers(expert_set, self.scaling)
        seconds = result.summary.get("block_seconds") or []
        for block, took in zip(sink.blocks, seconds):
            block["seconds"] = took
        blocks = {"method": method, "init": self.scaling, "tasks": expert_set.names, "blocks": sink.blocks}
        writer.write_json(f"{method}/{BLOCKS_FILE}", blocks)
        if writer.temp is not None and plan.engine.plot_coefficients and any(b["coefficients"] for b in sink.blocks):
            plot_coefficients(blocks, writer.temp / method / "coefficients.png")
        summary = engine_summary(result, self.batches, leftovers)
        summary["task_specs"] = task_records(plan.data, expert_set.names)
        return Outcome(summary, record, blocks)

    def finished(self) -> None:
        if self.plan.output is not None and self.checkpoint_dir is not None and not self.plan.engine.keep_checkpoint:
            shutil.rmtree(self.checkpoint_dir, ignore_errors=True)


def checkpoint_folder(engine, output, network: bool) -> Path | None:
    """Where the per-block checkpoints go: ``checkpoint_dir``, else ``OUTPUT.checkpoint``, else none."""
    if network:
        if engine.resume or engine.checkpoint_dir:
            raise ConfigError("this method trains every block at once, so it has no per-block checkpoints: "
                              "drop resume / checkpoint_dir")
        return None
    if engine.checkpoint_dir:
        return Path(engine.checkpoint_dir)
    if output is not None and engine.checkpoint:
        return Path(str(Path(output).expanduser().resolve()) + ".checkpoint")
    if engine.resume:
        raise ConfigError("resume needs a checkpoint folder: give an output folder (its checkpoint is "
                          "OUTPUT.checkpoint) or checkpoint_dir")
    return None


def check_engine_folders(engine, checkpoint_dir: Path | None, inputs: list[Path]) -> None:
    """Before any work: the checkpoint folder (removed after success) must not overlap an input, and the
    spill folder must be a folder."""
    if checkpoint_dir is not None:
        folder = checkpoint_dir.expanduser().resolve()
        for source in inputs:       # a bare weights file only matters when the folder would hold it
            if source.is_relative_to(folder) or (source.is_dir() and folder.is_relative_to(source)):
                raise ConfigError(f"checkpoint folder {folder} overlaps the input {source}: inputs are never "
                                  "written to (and the checkpoint folder is removed after success); choose a "
                                  "checkpoint_dir (--checkpoint-dir) outside every input")
    if engine.spill_dir is not None and Path(engine.spill_dir).exists() and not Path(engine.spill_dir).is_dir():
        raise ConfigError(f"engine.spill_dir {engine.spill_dir} is a file, not a folder; name a folder for the "
                          "spilled activations (it is created when missing)")


def engine_summary(result, batches, leftovers: list[str]) -> dict:
    summary = {key: value for key, value in result.summary.items() if key not in ("plan", "block_seconds")}
    summary["block_plan"] = {"source": result.plan.source, "blocks": len(result.plan),
                             "first": result.plan.blocks[0], "last": result.plan.blocks[-1],
                             "stack_starts": list(result.plan.stack_starts)}
    summary["data"] = describe(batches)
    summary["loss_final_per_block"] = [stats.get("loss_final") for stats in result.block_stats]
    if leftovers:
        summary["task_arithmetic_keys_outside_the_template"] = len(leftovers)
    return summary
