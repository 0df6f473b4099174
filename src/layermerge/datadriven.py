"""Data-driven merges end to end: an ExpertSet and few-shot inputs in, a Hugging Face folder out.

``merge_with_data`` (reached through ``layermerge.merge(..., method="prodistill", data=...)``)
builds a template of the base's architecture with its parameters on the meta device (no memory),
maps the template's module names to the checkpoints' names (transformers 5 renames some families'
keys at load time), runs the block engine and streams every finished block straight into the
output writer, so peak memory stays near one block whatever the depth. The output is laid out like
a data-free merge (sharded safetensors with the base's key names, ``heads/<task>/``, model card,
``layermerge.yaml``) plus the learned coefficients in ``<method>/coefficients*.safetensors`` and
their per-block summary in ``<method>/blocks.json``.
"""

from __future__ import annotations

import json
import shutil
import sys
from collections.abc import Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from torch import nn

from layermerge import distributed
from layermerge.coefficient_plot import BLOCKS_FILE, block_coefficient_stats, plot_coefficients
from layermerge.engine import DiscardingSink, ExpertSetSource, non_block_tensor, run_engine
from layermerge.engine.context import BlockResult
from layermerge.errors import ConfigError, LayermergeError
from layermerge.experts import ExpertSet, detect_prefix
from layermerge.fewshot import DataConfig, adapt_batches, build_few_shot, describe
from layermerge.io.writer import CheckpointWriter, check_output_location, parse_size
from layermerge.merging import (
    MergedModel,
    _write_side_files,
    check_card_paths,
    given_paths,
    hash_inputs,
    open_expert_set,
    resolve_dtype,
)
from layermerge.methods.registry import get_method, validate_params


class EngineConfig(BaseModel):
    """The ``engine:`` section of a merge config (and keyword options of the API)."""

    model_config = ConfigDict(extra="forbid")

    cache_budget: str | int = Field("2GB", description="RAM for cached activations; beyond it they spill to "
                                                       "memory-mapped files (e.g. 500MB, 2GB)")
    spill_dir: str | None = Field(None, description="folder for spilled activations (default: the system "
                                                    "temporary folder)")
    device: str = Field("auto", description="cpu, cuda, cuda:N or auto (CUDA when present)")
    compute_dtype: Literal["float32", "bfloat16"] = Field("float32", description="dtype of block compute; "
                                                          "coefficients and merged weights stay float32")
    seed: int = Field(0, description="seed of the per-block shuffles (data sampling has data.seed)")
    checkpoint: bool = Field(True, description="write a checkpoint after every block (needed for resume)")
    checkpoint_dir: str | None = Field(None, description="checkpoint folder (default: OUTPUT.checkpoint)")
    keep_checkpoint: bool = Field(False, description="keep the checkpoint folder after a successful run")
    resume: bool = Field(False, description="continue an interrupted run from its last finished block")
    block_plan: dict | None = Field(None, description="module paths {embedding, blocks, head} for models "
                                                      "the block plan introspection does not understand")
    plot_coefficients: bool = Field(False, description="also write <method>/coefficients.png")

    @field_validator("cache_budget")
    @classmethod
    def _size(cls, value: str | int) -> str | int:
        cache_budget_bytes(value)
        return value

    def resolve_paths(self, relative_to: Path) -> EngineConfig:
        def fix(path: str | None) -> str | None:
            if path is None:
                return None
            candidate = Path(path).expanduser()
            return str(candidate if candidate.is_absolute() else (relative_to / candidate).resolve())

        return self.model_copy(update={"spill_dir": fix(self.spill_dir), "checkpoint_dir": fix(self.checkpoint_dir)})


ENGINE_OPTIONS = tuple(EngineConfig.model_fields)


def cache_budget_bytes(value: str | int) -> int:
    """Bytes from ``2GB``, ``500MB``, ``0`` (spill everything) or an integer."""
    if isinstance(value, int) or str(value).strip() == "0":
        if int(value) < 0:
            raise ValueError(f"cache budget must be >= 0 bytes, got {value}")
        return int(value)
    try:
        return parse_size(value)
    except LayermergeError as exc:
        raise ValueError(str(exc)) from None


@dataclass
class DataDrivenMergedModel(MergedModel):
    """A MergedModel plus the learned coefficients (checkpoint key names) and per-block records."""

    coefficients: dict[str, torch.Tensor] = field(default_factory=dict)
    blocks: dict | None = None

    def save(self, output: str | Path, overwrite: bool = False, max_shard_size: str | int = "5GB") -> Path:
        """Write as a Hugging Face folder, with the coefficients and their per-block summary."""
        path = super().save(output, overwrite=overwrite, max_shard_size=max_shard_size)
        if self.coefficients or self.blocks:
            from safetensors.torch import save_file

            folder = path / self.method
            folder.mkdir(exist_ok=True)
            if self.coefficients:
                save_file({k: v.contiguous() for k, v in self.coefficients.items()},
                          str(folder / "coefficients.safetensors"), metadata={"format": "pt"})
            if self.blocks:
                (folder / BLOCKS_FILE).write_text(json.dumps(self.blocks, indent=2, default=str) + "\n")
        return path


# --------------------------------------------------------------------- the template
@contextmanager
def parameters_on_meta():
    """Create every ``nn.Parameter`` on the meta device while buffers stay real.

    Parameters cost neither memory nor initialisation time; buffers that are not in checkpoints
    (rotary frequencies, position ids) keep the values the model's constructor computes.
    """
    register = nn.Module.register_parameter

    def on_meta(module, name, param):
        if param is not None and not param.is_meta:
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register(module, name, param)

    nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def build_template(expert_set: ExpertSet, template: nn.Module | None = None) -> nn.Module:
    """A module of the base's architecture with its parameters on the meta device.

    Hugging Face configs build ``AutoModel``; layermerge vision folders their registered factory;
    anything else needs ``template`` (a module, or a callable returning one).
    """
    if template is not None:
        model = template if isinstance(template, nn.Module) else template()
        return model.eval()
    reference = expert_set.reference
    config = reference.config
    if not config:
        raise ConfigError(f"{reference.path} has no config.json, so the model's architecture is unknown; "
                          "pass template=<an nn.Module of the architecture> to layermerge.merge")
    from layermerge.data.models import VISION_KEY, VisionSpec, build_vision_model, quiet_transformers

    if VISION_KEY in config:
        spec = VisionSpec.from_config(config, str(reference.folder))
        with parameters_on_meta():
            model = build_vision_model(spec, pretrained=False)
        return model.eval()
    from transformers import AutoConfig, AutoModel

    try:
        hf_config = AutoConfig.for_model(**config)
    except Exception as exc:       # any mistake in a user's config.json: no model_type, a field of the wrong type...
        cause = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ConfigError(f"cannot build a model from {reference.folder}/config.json ({cause}); fix that file "
                          "(e.g. re-save it with save_pretrained) or pass template=<an nn.Module of the "
                          "architecture>") from None
    with parameters_on_meta(), quiet_transformers():
        model = AutoModel.from_config(hf_config, dtype=torch.float32)
    return model.eval()


def _transformers_names(model: nn.Module) -> dict[str, str]:
    """Template name -> the name transformers writes to disk (they differ where it renames keys)."""
    keys = list(model.state_dict())
    if "transformers" not in sys.modules:            # then it cannot be a transformers model (and the import
        return {key: key for key in keys}            # costs seconds)
    try:
        from transformers import PreTrainedModel
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:
        return {key: key for key in keys}
    if not isinstance(model, PreTrainedModel):
        return {key: key for key in keys}
    # Distinct placeholder tensors (tied weights share one) let us follow each key through the renaming.
    fake = {key: torch.empty(tensor.shape, dtype=tensor.dtype, device="meta")
            for key, tensor in model.state_dict().items()}
    reverted = revert_weight_conversion(model, dict(fake))
    by_id = {id(tensor): key for key, tensor in fake.items()}
    return {by_id[id(tensor)]: name for name, tensor in reverted.items() if id(tensor) in by_id}


def checkpoint_key_map(model: nn.Module, checkpoint_keys: list[str]) -> dict[str, str]:
    """Template state-dict name -> checkpoint (base) key, for every template key the checkpoints hold."""
    names = _transformers_names(model)
    available = set(checkpoint_keys)
    prefix = detect_prefix(set(names.values()), checkpoint_keys)     # a task-model base: 'bert.' etc.
    return {key: prefix + name for key, name in names.items() if prefix + name in available}


# --------------------------------------------------------------------- writing
class _MemoryWriter:
    """The CheckpointWriter calls the sink makes, kept in memory (the API without an output folder)."""

    def __init__(self):
        self.tensors: dict[str, torch.Tensor] = {}
        self.side: dict[str, torch.Tensor] = {}

    def add_tensor(self, key: str, tensor: torch.Tensor) -> None:
        self.tensors[key] = tensor

    def stream_writer(self, relative_folder: str, prefix: str = "model"):
        side = self.side

        class _Stream:
            def add(self, key: str, tensor: torch.Tensor) -> None:
                side[key] = tensor

        return _Stream()


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
        self._coefficients = None

    def add(self, template_key: str, tensor: torch.Tensor) -> None:
        key = self.source.checkpoint_key(template_key)
        dtype = self.out_dtype or self.reference.dtype(self.ref_prefix + key)
        self.writer.add_tensor(key, tensor.detach().to("cpu", dtype))
        self.written.add(key)

    def non_block(self, tensors: dict[str, torch.Tensor]) -> None:
        for key, tensor in tensors.items():
            self.add(key, tensor)

    def block(self, index: int, prefix: str, result: BlockResult) -> None:
        for name, tensor in result.params.items():
            self.add(prefix + name, tensor)
        if result.artifacts:
            if self._coefficients is None:
                self._coefficients = self.writer.stream_writer(self.method, prefix="coefficients")
            for key, tensor in result.artifacts.items():
                task, _, name = key.partition("/")
                if name in result.params:
                    key = f"{task}/{self.source.checkpoint_key(prefix + name)}"
                else:
                    key = f"{prefix}{key}"
                self._coefficients.add(key, tensor.detach().to("cpu").contiguous())
        first = self.source.checkpoint_key(prefix + next(iter(result.params))) if result.params else ""
        self.blocks.append({"index": index, "module": prefix.rstrip("."), "first_key": first,
                            "stats": result.stats,
                            "coefficients": block_coefficient_stats(result.artifacts, self.tasks)})

    def write_leftovers(self, expert_set: ExpertSet, scaling: float) -> list[str]:
        """Merged keys the template does not hold (nothing runs them): Task Arithmetic, like non-block weights."""
        left = [key for key in expert_set.report.merge_keys if key not in self.written]
        for key in left:
            base = expert_set.base_tensor(key)
            experts = expert_set.expert_tensors(key)
            as_float = (lambda t: t.float()) if base.is_floating_point() else (lambda t: t)
            merged = non_block_tensor(key, as_float(base), [as_float(t) for t in experts], scaling)
            dtype = self.out_dtype or self.reference.dtype(self.ref_prefix + key)
            self.writer.add_tensor(key, merged.to(dtype))
            self.written.add(key)
        return left


# --------------------------------------------------------------------- the entry point
def _engine_config(options: dict) -> EngineConfig:
    try:
        return EngineConfig(**options)
    except ValidationError as exc:
        problems = [f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()]
        raise ConfigError(f"engine options: {'; '.join(problems)} (allowed: {', '.join(ENGINE_OPTIONS)})") from None


def _few_shot(data, expert_set: ExpertSet, model: nn.Module) -> dict[str, list[dict]]:
    if data is None:
        raise ConfigError("this method learns from a few unlabelled examples per task: pass data= (a data "
                          "config such as {'shots': 16}, or {task: [input batches]}), or a data: section in "
                          "the YAML config")
    if isinstance(data, Mapping) and not isinstance(data, DataConfig) and not set(data) & set(expert_set.names):
        try:                       # not keyed by expert names: it must be a data section
            data = DataConfig(**data)
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
            raise ConfigError(f"data: {problems}. Give a data section (keys: {', '.join(DataConfig.model_fields)}) "
                              f"or input batches keyed by the experts' names {expert_set.names}") from None
    batches = build_few_shot(data, expert_set) if isinstance(data, DataConfig) else data
    return adapt_batches(model, batches)


def merge_with_data(base, experts, method: str, *, data=None, output: str | Path | None = None,
                    overwrite: bool = False, max_shard_size: str | int = "5GB", dtype: str | None = None,
                    vocab_policy: str = "error", head_keys: list[str] | None = None, quiet: bool = False,
                    config_record: dict | None = None, template: nn.Module | None = None,
                    card_paths: str = "name", **options) -> MergedModel:
    """Merge with a data-driven (``kind="block"``) method; see ``layermerge.merge``.

    ``data``: a DataConfig / ``data:`` mapping, or ``{task: [batch, ...]}`` of model inputs.
    ``options``: the method's parameters plus engine options (EngineConfig fields: cache_budget,
    device, compute_dtype, seed, checkpoint_dir, resume, block_plan, plot_coefficients, ...).
    """
    info = get_method(method)
    check_card_paths(card_paths)
    engine = _engine_config({k: options.pop(k) for k in ENGINE_OPTIONS if k in options})
    validated = validate_params(info, options)
    expert_set = open_expert_set(info, base, experts, vocab_policy, head_keys)
    algorithm = info.cls(validated, expert_set.names)
    network = callable(getattr(algorithm, "merge_network", None))
    # Non-block weights (embeddings, final norm) get Task Arithmetic at this λ: a method's own choice
    # (RegMean averages: 1/T) or its initial coefficient.
    if callable(getattr(algorithm, "non_block_scaling", None)):
        scaling = float(algorithm.non_block_scaling(len(expert_set.names)))
    else:
        scaling = float(getattr(validated, "init", 0.3))
    out_dtype = resolve_dtype(dtype)

    launched = distributed.launched_distributed() and not distributed.current().active
    parallel = distributed.init_from_environment(engine.device) if distributed.launched_distributed() \
        else distributed.current()
    try:
        model = build_template(expert_set, template)
        source = ExpertSetSource(expert_set, checkpoint_key_map(model, expert_set.report.merge_keys))
        batches = _few_shot(data, expert_set, model)
        checkpoint_dir = _checkpoint_dir(engine, output, network)
        _check_engine_folders(engine, checkpoint_dir, expert_set.input_paths())
        options = {"block_plan": engine.block_plan, "scaling": scaling,
                   "cache_budget": cache_budget_bytes(engine.cache_budget),
                   "spill_dir": engine.spill_dir, "device": engine.device, "compute_dtype": engine.compute_dtype,
                   "seed": engine.seed, "checkpoint_dir": checkpoint_dir, "resume": engine.resume and not network,
                   "quiet": quiet or not parallel.is_writer, "parallel": parallel}
        record = _record(config_record, given_paths(base, experts, expert_set), expert_set, method,
                         validated.model_dump(), dtype, max_shard_size, data, batches, engine)
        if output is None:
            return _merge_in_memory(model, source, batches, algorithm, expert_set, out_dtype, scaling, options,
                                    record, card_paths)
        check_output_location(Path(output), expert_set.input_paths(), overwrite)
        if not parallel.is_writer:
            run_engine(model, source, batches, algorithm, sink=DiscardingSink(), **options)
            return MergedModel(None, {}, {}, expert_set.reference.config, method, record["params"],
                               path=Path(output).resolve())
        merged = _merge_to_folder(model, source, batches, algorithm, expert_set, out_dtype, scaling, options,
                                  record, output, overwrite, max_shard_size, engine.plot_coefficients, card_paths)
        if checkpoint_dir is not None and not engine.keep_checkpoint:
            shutil.rmtree(checkpoint_dir, ignore_errors=True)
        return merged
    except BaseException:
        if launched:            # no barrier: the other ranks may be waiting in a collective; torchrun stops them
            distributed.shutdown()
        raise
    finally:
        if launched and distributed.current().active:
            parallel.barrier()
            distributed.shutdown()


def _checkpoint_dir(engine: EngineConfig, output, network: bool) -> Path | None:
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


def _check_engine_folders(engine: EngineConfig, checkpoint_dir: Path | None, inputs: list[Path]) -> None:
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


def _record(config_record, paths, expert_set, method, params, dtype, max_shard_size, data, batches, engine) -> dict:
    """What layermerge.yaml records: enough to run the merge again."""
    if config_record:
        return {**config_record, "params": params}
    if isinstance(data, DataConfig):
        data_record = data.model_dump(exclude_none=True)
    elif isinstance(data, Mapping) and set(data) <= set(DataConfig.model_fields):
        data_record = DataConfig(**data).model_dump(exclude_none=True)
    else:
        data_record = {"in_memory_batches": describe(batches)}
    return {"base": paths[0], "experts": paths[1], "method": method,
            "params": params, "dtype": str(dtype).replace("torch.", "") if dtype is not None else None,
            "max_shard_size": max_shard_size, "vocab_policy": expert_set.vocab_policy,
            "head_keys": list(expert_set.extra_head_patterns), "data": data_record,
            "engine": engine.model_dump(exclude={"resume"})}


def _blocks_record(method: str, scaling: float, tasks: list[str], sink: OutputSink, summary: dict) -> dict:
    seconds = summary.get("block_seconds") or []
    for block, took in zip(sink.blocks, seconds):
        block["seconds"] = took
    return {"method": method, "init": scaling, "tasks": tasks, "blocks": sink.blocks}


def _summary(result, batches, leftovers: list[str]) -> dict:
    summary = {key: value for key, value in result.summary.items() if key not in ("plan", "block_seconds")}
    summary["block_plan"] = {"source": result.plan.source, "blocks": len(result.plan),
                             "first": result.plan.blocks[0], "last": result.plan.blocks[-1]}
    summary["data"] = describe(batches)
    summary["loss_final_per_block"] = [stats.get("loss_final") for stats in result.block_stats]
    if leftovers:
        summary["task_arithmetic_keys_outside_the_template"] = len(leftovers)
    return summary


def _merge_in_memory(model, source, batches, algorithm, expert_set, out_dtype, scaling, options,
                     record, card_paths: str) -> DataDrivenMergedModel:
    memory = _MemoryWriter()
    sink = OutputSink(memory, source, expert_set, out_dtype, algorithm.name, expert_set.names)
    result = run_engine(model, source, batches, algorithm, sink=sink, **options)
    leftovers = sink.write_leftovers(expert_set, scaling)
    state = {key: memory.tensors[key] for key in expert_set.report.merge_keys}
    heads = {task: expert_set.head_state(task) for task in expert_set.names}
    head_meta = {e.name: {"prefix": e.prefix, "config": e.reader.config} for e in expert_set.experts}
    inputs, roles = hash_inputs(expert_set)
    return DataDrivenMergedModel(state, heads, head_meta, expert_set.reference.config, algorithm.name,
                                 record["params"], summary=_summary(result, batches, leftovers),
                                 base_folder=expert_set.reference.folder, coefficients=memory.side,
                                 inputs=inputs, input_roles=roles, card_paths=card_paths, record=record,
                                 blocks=_blocks_record(algorithm.name, scaling, expert_set.names, sink, result.summary))


def _merge_to_folder(model, source, batches, algorithm, expert_set, out_dtype, scaling, options, record, output,
                     overwrite, max_shard_size, plot: bool, card_paths: str) -> MergedModel:
    method = algorithm.name
    with CheckpointWriter(output, inputs=expert_set.input_paths(), overwrite=overwrite,
                          max_shard_size=max_shard_size) as writer:
        sink = OutputSink(writer, source, expert_set, out_dtype, method, expert_set.names)
        result = run_engine(model, source, batches, algorithm, sink=sink, **options)
        leftovers = sink.write_leftovers(expert_set, scaling)
        blocks = _blocks_record(method, scaling, expert_set.names, sink, result.summary)
        writer.write_json(f"{method}/{BLOCKS_FILE}", blocks)
        if plot and any(block["coefficients"] for block in blocks["blocks"]):
            plot_coefficients(blocks, writer.temp / method / "coefficients.png")
        heads = {task: expert_set.head_state(task) for task in expert_set.names}
        head_meta = {e.name: {"prefix": e.prefix, "config": e.reader.config} for e in expert_set.experts}
        summary = _summary(result, batches, leftovers)
        # After the merge, like data-free merges: the readers hash files along with the reads they served.
        inputs, roles = hash_inputs(expert_set)
        _write_side_files(writer, heads, head_meta, {}, expert_set.reference.config, expert_set.reference.folder,
                          method, record["params"], summary, inputs, roles, card_paths)
        writer.write_text("layermerge.yaml", yaml.safe_dump(record, sort_keys=False))
    return MergedModel(None, heads, head_meta, expert_set.reference.config, method, record["params"],
                       summary=summary, path=Path(output).resolve(), base_folder=expert_set.reference.folder)


__all__ = ["DataDrivenMergedModel", "EngineConfig", "OutputSink", "build_template", "checkpoint_key_map",
           "merge_with_data", "parameters_on_meta", "plot_coefficients"]
