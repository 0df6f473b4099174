"""Stage 4, the sink: where merged tensors go, and the one place that writes what surrounds them.

A strategy writes through a writer with one interface: ``CheckpointWriter`` (an atomic Hugging Face
folder, ``layermerge.io.writer``), ``MemoryWriter`` (the API without an output folder) or
``NullWriter`` (data-parallel ranks other than the writer). ``write_side_files`` writes the heads,
per-task extras, the base's config and tokenizer files, the summary, the model card and the
resolved config, the same way for every kind of method.
"""

from __future__ import annotations

import json

import torch
import yaml

from layermerge.experts import ExpertSet
from layermerge.hf import HEAD_META
from layermerge.io.writer import CheckpointWriter
from layermerge.model_card import model_card_text
from layermerge.pipeline.plan import MergePlan
from layermerge.pipeline.source import given_paths

SUMMARY_FILE = "layermerge_summary.json"
RECORD_FILE = "layermerge.yaml"


class MemoryStream:
    """One side stream (``task_extras/<task>``, ``<method>/coefficients``) of a MemoryWriter."""

    def __init__(self):
        self.tensors: dict[str, torch.Tensor] = {}

    def add(self, key: str, tensor: torch.Tensor) -> None:
        self.tensors[key] = tensor


class MemoryWriter:
    """CheckpointWriter's interface, keeping everything in memory: tensors, side streams, JSON files."""

    temp = None
    tensor_hook = None          # as CheckpointWriter's

    def __init__(self):
        self.tensors: dict[str, torch.Tensor] = {}
        self.streams: dict[tuple[str, str], MemoryStream] = {}
        self.json: dict[str, object] = {}

    def add_tensor(self, key: str, tensor: torch.Tensor) -> None:
        if self.tensor_hook is not None:
            tensor = self.tensor_hook(key, tensor)
        self.tensors[key] = tensor

    def stream_writer(self, relative_folder: str, prefix: str = "model") -> MemoryStream:
        return self.streams.setdefault((relative_folder, prefix), MemoryStream())

    def write_state_dict(self, relative_folder: str, tensors: dict[str, torch.Tensor], prefix: str = "model") -> None:
        stream = self.stream_writer(relative_folder, prefix)
        for key, tensor in tensors.items():
            stream.add(key, tensor)

    def write_json(self, relative_path: str, data) -> None:
        self.json[relative_path] = json.loads(json.dumps(data, default=str))

    def write_text(self, relative_path: str, text: str) -> None:
        """Text files (model card, config record) only exist in folders."""

    def side(self, relative_folder: str, prefix: str = "model") -> dict[str, torch.Tensor]:
        stream = self.streams.get((relative_folder, prefix))
        return dict(stream.tensors) if stream is not None else {}

    def task_extras(self) -> dict[str, dict[str, torch.Tensor]]:
        return {folder.split("/", 1)[1]: dict(stream.tensors) for (folder, prefix), stream in self.streams.items()
                if folder.startswith("task_extras/") and prefix == "model" and stream.tensors}


class NullWriter(MemoryWriter):
    """Writes nothing: a data-parallel rank that is not the writer still runs the engine."""

    def add_tensor(self, key: str, tensor: torch.Tensor) -> None:
        pass

    def write_json(self, relative_path: str, data) -> None:
        pass


def open_writer(plan: MergePlan, expert_set: ExpertSet, is_writer: bool = True):
    """The writer for this plan: an atomic folder, memory, or nothing (a non-writing rank). When the output
    vocabulary grows (``vocab_policy: union``, ``tokenizer_source``), its embedding rows are added as the
    merged tensors are written, whatever the strategy."""
    if plan.output is None:
        writer = MemoryWriter()
    elif not is_writer:
        return NullWriter()
    else:
        writer = CheckpointWriter(plan.output, inputs=expert_set.input_paths(), overwrite=plan.overwrite,
                                  max_shard_size=plan.max_shard_size)
    if expert_set.vocabulary is not None:
        writer.tensor_hook = expert_set.vocabulary_rows
    return writer


def write_side_files(writer, *, heads: dict, head_meta: dict, task_extras: dict, config, base_folder, method: str,
                     params: dict, summary: dict, inputs: dict, roles: dict | None = None,
                     card_paths: str = "name", vocabulary=None) -> None:
    """Everything around the merged backbone: base files, heads, per-task extras, summary, model card;
    with a grown ``vocabulary`` (layermerge.vocab), its tokenizer and the config's new vocab_size."""
    copied = writer.copy_base_files(base_folder)
    if vocabulary is not None and writer.temp is not None:
        config = vocabulary.write(writer.temp, config)
        copied = [name for name in copied if name != "config.json"]
    if config is not None and "config.json" not in copied:
        writer.write_json("config.json", config)
    for task, head in heads.items():
        if head:
            writer.write_state_dict(f"heads/{task}", head)
        meta = head_meta.get(task, {})
        if meta.get("config") is not None:
            writer.write_json(f"heads/{task}/config.json", meta["config"])
        writer.write_json(f"heads/{task}/{HEAD_META}", {"prefix": meta.get("prefix", ""), "keys": sorted(head)})
    for task, extras in task_extras.items():
        writer.write_state_dict(f"task_extras/{task}", extras)
    writer.write_json(SUMMARY_FILE, {"method": method, "params": params, "summary": summary})
    writer.write_text("README.md", model_card_text(method, params, inputs, summary, roles, card_paths))


def write_record(writer, record: dict) -> None:
    writer.write_text(RECORD_FILE, yaml.safe_dump(record, sort_keys=False))


def merge_record(plan: MergePlan, expert_set: ExpertSet, **extra) -> dict:
    """What layermerge.yaml records: the config as given (with the effective parameters), or for an API
    call the inputs as named, the method, its parameters and the output options; ``extra``: the data
    and engine sections of data-driven methods."""
    if plan.config_record:
        return {**plan.config_record, "params": plan.param_record}
    base, experts = given_paths(plan, expert_set)
    return {"base": base, "experts": experts, "method": plan.name, "params": plan.param_record,
            "dtype": plan.dtype_name, "max_shard_size": plan.max_shard_size, "vocab_policy": expert_set.vocab_policy,
            "head_keys": list(expert_set.extra_head_patterns), **extra}
