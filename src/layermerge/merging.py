"""The data-free merge driver: stream every backbone tensor through a method, write or collect it.

Peak memory is one tensor from the base and each expert plus the output shard being filled, never
a whole model. Per-task heads are copied from their experts unchanged.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml

from layermerge.errors import ConfigError
from layermerge.experts import ExpertSet
from layermerge.hf import HEAD_META
from layermerge.io.writer import CheckpointWriter
from layermerge.methods.base import TensorResult
from layermerge.methods.registry import get_method, validate_params
from layermerge.model_card import CARD_PATHS, model_card_text
from layermerge.norm_stats import is_running_statistic, mean_of_experts
from layermerge.progress import progress

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def resolve_dtype(name: str | torch.dtype | None) -> torch.dtype | None:
    if name is None or isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise ConfigError(f"unknown dtype {name!r}; use one of {sorted(DTYPES)}")
    return DTYPES[name]


@dataclass
class MergedModel:
    """A merged backbone (in memory or in a folder), the per-task heads, and what produced it."""

    state_dict: dict[str, torch.Tensor] | None
    heads: dict[str, dict[str, torch.Tensor]]
    head_meta: dict[str, dict]
    config: dict | None
    method: str
    params: dict
    task_extras: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    summary: dict = field(default_factory=dict)
    path: Path | None = None
    base_folder: Path | None = None
    inputs: dict[str, dict[str, str]] = field(default_factory=dict)   # input path -> {file: sha256}
    record: dict | None = None                                         # what layermerge.yaml records
    artifacts: dict[str, torch.Tensor] = field(default_factory=dict)  # saved as <method>/artifacts.safetensors
    input_roles: dict[str, str] = field(default_factory=dict)          # input path -> "base", "expert sst2"
    card_paths: str = "name"                                            # model card: path names or "full" paths

    def save(self, output: str | Path, overwrite: bool = False, max_shard_size: str | int = "5GB") -> Path:
        """Write as a Hugging Face folder (atomically), with the same side files as ``merge(output=...)``:
        heads, model card with the inputs' hashes, ``layermerge.yaml``."""
        if self.state_dict is None:
            raise ConfigError(f"this merged model already lives in {self.path}; copy that folder instead")
        input_paths = [Path(p) for p in self.inputs]
        with CheckpointWriter(output, inputs=input_paths, overwrite=overwrite,
                              max_shard_size=max_shard_size) as writer:
            for key, tensor in self.state_dict.items():
                writer.add_tensor(key, tensor)
            if self.artifacts:
                writer.write_state_dict(self.method, self.artifacts, prefix="artifacts")
            _write_side_files(writer, self.heads, self.head_meta, self.task_extras, self.config, self.base_folder,
                              self.method, self.params, self.summary, inputs=self.inputs, roles=self.input_roles,
                              card_paths=self.card_paths)
            if self.record is not None:
                writer.write_text("layermerge.yaml", yaml.safe_dump(self.record, sort_keys=False))
        return Path(output).resolve()

    def to_hf_model(self):
        """The merged backbone as a transformers model built from the base's config."""
        from layermerge.hf import backbone_from_state_dict

        if self.state_dict is None:
            from transformers import AutoModel
            return AutoModel.from_pretrained(self.path)
        return backbone_from_state_dict(self.config, self.state_dict)


def _write_side_files(writer: CheckpointWriter, heads, head_meta, task_extras, config, base_folder, method,
                      params, summary, inputs: dict, roles: dict | None = None, card_paths: str = "name") -> None:
    copied = writer.copy_base_files(base_folder)
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
    record = {"method": method, "params": params, "summary": summary}
    writer.write_json("layermerge_summary.json", record)
    writer.write_text("README.md", model_card_text(method, params, inputs, summary, roles, card_paths))


def hash_inputs(expert_set: ExpertSet) -> tuple[dict[str, dict[str, str]], dict[str, str]]:
    """``{input path: {weight file: sha256}}`` and ``{input path: role}`` for the model card.

    Called after the merge: the readers hash each file along with the reads the merge made, so this
    costs almost no I/O; inputs whose files hash alike are reported (``RedundantInputWarning``).
    """
    inputs: dict[str, dict[str, str]] = {}
    roles: dict[str, str] = {}
    by_name = {}
    for name, reader in expert_set.input_readers():
        source = str(reader.path)
        by_name[name] = inputs[source] = reader.file_hashes()
        role = "base" if name is None else f"expert {name}"
        roles[source] = f"{roles[source]}, {role}" if source in roles else role
    expert_set.warn_identical_files(by_name)
    return inputs, roles


def check_card_paths(card_paths: str) -> str:
    if card_paths not in CARD_PATHS:
        raise ConfigError(f"card_paths must be one of {', '.join(CARD_PATHS)} (the model card shows each input's "
                          f"folder name, or its full path), got {card_paths!r}")
    return card_paths


def given_paths(base, experts, expert_set: ExpertSet) -> tuple[str | None, dict[str, str]]:
    """The inputs as the caller named them, for layermerge.yaml (paths as given, not resolved)."""
    def as_given(source, reader) -> str:
        return str(source) if isinstance(source, (str, os.PathLike)) else str(reader.path)

    named = experts if isinstance(experts, dict) else {}
    base_path = as_given(base, expert_set.base) if expert_set.base is not None else None
    return base_path, {e.name: as_given(named.get(e.name), e.reader) for e in expert_set.experts}


def open_expert_set(info, base, experts, vocab_policy: str, head_keys: list[str] | None) -> ExpertSet:
    """The checked expert set for method ``info``: a base when it needs one, an expert count it accepts."""
    expert_set = experts if isinstance(experts, ExpertSet) else ExpertSet(
        base, experts, vocab_policy=vocab_policy, head_keys=head_keys)
    if expert_set.base is None and info.needs_base:
        raise ConfigError(f"method {info.name!r} works on task vectors and needs a base model")
    count = len(expert_set.experts)
    if count < info.min_experts or (info.max_experts is not None and count > info.max_experts):
        if info.min_experts == info.max_experts:
            limit = f"exactly {info.min_experts}"
        else:
            limit = f"at least {info.min_experts}" + (
                f" and at most {info.max_experts}" if info.max_experts is not None else "")
        raise ConfigError(f"method {info.name!r} needs {limit} experts, got {count}")
    return expert_set


def merge(base: str | Path | None, experts: dict[str, str | Path], method: str = "task_arithmetic", *,
          output: str | Path | None = None, overwrite: bool = False, max_shard_size: str | int = "5GB",
          dtype: str | None = None, vocab_policy: str = "error", head_keys: list[str] | None = None,
          quiet: bool = False, config_record: dict | None = None, data=None, card_paths: str = "name",
          **params) -> MergedModel:
    """Merge ``experts`` (fine-tuned from ``base``) with a registered method.

    With ``output`` the result streams straight to a Hugging Face folder; without it, the merged
    state dict is returned in memory (fine for small models). Data-driven methods (ProDistill...)
    take few-shot ``data`` and engine options; see ``layermerge.datadriven.merge_with_data``.
    ``card_paths="full"`` writes the inputs' full paths into the model card (default: their names).
    """
    info = get_method(method)
    check_card_paths(card_paths)
    if info.kind == "model":
        from layermerge.modelwise import merge_with_models

        return merge_with_models(base, experts, method, data=data, output=output, overwrite=overwrite,
                                 max_shard_size=max_shard_size, dtype=dtype, vocab_policy=vocab_policy,
                                 head_keys=head_keys, quiet=quiet, config_record=config_record,
                                 card_paths=card_paths, **params)
    if info.kind == "block":
        from layermerge.datadriven import merge_with_data

        return merge_with_data(base, experts, method, data=data, output=output, overwrite=overwrite,
                               max_shard_size=max_shard_size, dtype=dtype, vocab_policy=vocab_policy,
                               head_keys=head_keys, quiet=quiet, config_record=config_record,
                               card_paths=card_paths, **params)
    if data is not None:
        raise ConfigError(f"method {method!r} is data-free and takes no data; drop data=, or choose a "
                          "data-driven method such as prodistill")
    if info.kind != "tensor":
        raise ConfigError(f"method {method!r} needs data; use the data-driven entry point for it")
    validated = validate_params(info, params)
    expert_set = open_expert_set(info, base, experts, vocab_policy, head_keys)
    algorithm = info.cls(validated, expert_set.names)
    algorithm.inputs_owned = True
    out_dtype = resolve_dtype(dtype)
    reference = expert_set.reference
    ref_prefix = expert_set.reference_prefix
    keys = expert_set.report.merge_keys
    started = time.perf_counter()

    for pass_index in range(algorithm.stat_passes):
        for key, base_t, expert_ts in progress(expert_set.iter_merge_tensors(), total=len(keys), disable=quiet,
                                               desc=f"{method}: statistics pass {pass_index + 1}", unit="tensor"):
            algorithm.observe(pass_index, key, base_t, expert_ts)
        algorithm.end_pass(pass_index)

    head_meta = {e.name: {"prefix": e.prefix, "config": e.reader.config} for e in expert_set.experts}
    config = reference.config
    base_folder = reference.folder
    param_record = validated.model_dump()

    def merged_tensors():
        for key, base_t, expert_ts in progress(expert_set.iter_merge_tensors(), total=len(keys), disable=quiet,
                                               desc=f"{method}: merging", unit="tensor"):
            if is_running_statistic(key):
                result = mean_of_experts(expert_ts)       # statistics, not weights (methods/statistics.py)
            else:
                result = algorithm.merge_tensor(key, base_t, expert_ts)
            del base_t, expert_ts  # free this key's inputs before the output is cast and written
            if not isinstance(result, TensorResult):
                result = TensorResult(result)
            target = out_dtype or reference.dtype(ref_prefix + key)
            yield key, result.merged.to(target), result.per_task

    if output is None:
        state, extras = {}, {task: {} for task in expert_set.names}
        for key, tensor, per_task in merged_tensors():
            state[key] = tensor
            for task, extra in per_task.items():
                extras[task][key] = extra
        heads = {task: expert_set.head_state(task) for task in expert_set.names}
        summary = {**algorithm.summary(), "seconds": round(time.perf_counter() - started, 3)}
        extras = {task: tensors for task, tensors in extras.items() if tensors}
        inputs, roles = hash_inputs(expert_set)
        return MergedModel(state, heads, head_meta, config, method, param_record, extras, summary,
                           base_folder=base_folder, inputs=inputs, input_roles=roles, card_paths=card_paths,
                           record=_merge_record(config_record, expert_set, method, param_record, dtype,
                                                max_shard_size, given_paths(base, experts, expert_set)))

    with CheckpointWriter(output, inputs=expert_set.input_paths(), overwrite=overwrite,
                          max_shard_size=max_shard_size) as writer:
        extra_writers = {}
        for key, tensor, per_task in merged_tensors():
            writer.add_tensor(key, tensor)
            for task, extra in per_task.items():
                if task not in extra_writers:
                    extra_writers[task] = writer.stream_writer(f"task_extras/{task}")
                extra_writers[task].add(key, extra)
        # Heads (usually at the end of an expert's file) and the input hashes come after the merge:
        # the readers hash each file along with the reads, so in this order hashing costs almost no I/O.
        heads = {task: expert_set.head_state(task) for task in expert_set.names}
        inputs, roles = hash_inputs(expert_set)
        summary = {**algorithm.summary(), "seconds": round(time.perf_counter() - started, 3)}
        _write_side_files(writer, heads, head_meta, {}, config, base_folder, method, param_record, summary,
                          inputs, roles, card_paths)
        record = _merge_record(config_record, expert_set, method, param_record, dtype, max_shard_size,
                               given_paths(base, experts, expert_set))
        writer.write_text("layermerge.yaml", yaml.safe_dump(record, sort_keys=False))
    return MergedModel(None, heads, head_meta, config, method, param_record, summary=summary,
                       path=Path(output).resolve(), base_folder=base_folder)


def _merge_record(config_record: dict | None, expert_set: ExpertSet, method: str, param_record: dict, dtype,
                  max_shard_size, paths: tuple[str | None, dict[str, str]]) -> dict:
    """What layermerge.yaml records. The effective parameters (defaults filled in) are recorded, so a
    re-run does not depend on this version's defaults; input paths as the caller gave them."""
    if config_record:
        return {**config_record, "params": param_record}
    return {
        "base": paths[0],
        "experts": paths[1],
        "method": method, "params": param_record,
        "dtype": str(dtype).replace("torch.", "") if dtype is not None else None,
        "max_shard_size": max_shard_size, "vocab_policy": expert_set.vocab_policy,
        "head_keys": list(expert_set.extra_head_patterns),
    }
