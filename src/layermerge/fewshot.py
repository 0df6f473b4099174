"""Few-shot inputs for data-driven merges: the config's ``data:`` section, or batches built by hand.

The engine wants ``{task: [batch, ...]}`` with each batch a dict of model inputs. From a config,
each expert's examples are drawn with ``layermerge.data.sample_few_shot`` (seeded, stratified,
train split only) and collated with the data package's collators (the base's tokenizer for text, or,
when experts' added tokens enter the output vocabulary, each expert's own tokenizer with its ids
mapped into the output's; the expert's preprocessing for images). Batches carry labels (class ids; a
generation task's completion tokens when completions are included) for the methods that read them
(Fisher, DF-Merge, NeuLig...); the block engine and the unsupervised methods drop them.
Hand-built batches go through the same adaptation to the template's ``forward`` (``labels`` and
inputs the model does not take are dropped; ``pixel_values`` goes to a model whose first argument
has another name, e.g. EfficientNet's ``inputs``).
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from layermerge.data.models import check_length, position_limit, tokenizer_misfit
from layermerge.errors import ConfigError, DataError
from layermerge.io.paths import relative_to_config

LABEL_KEYS = ("labels", "label")


class TaskDataConfig(BaseModel):
    """Where one expert's few-shot examples come from; unset fields take the ``data:`` defaults.
    ``data.tasks.<expert>: reviews.yaml`` is short for ``data.tasks.<expert>: {task: reviews.yaml}``."""

    model_config = ConfigDict(extra="forbid")

    task: str | dict | None = Field(None, description="the expert's task: a built-in name (default: the expert's "
                                                      "name), a task spec file, or an inline spec mapping")
    split: Literal["train", "validation"] | None = Field(None, description="split to draw from")
    shots: int | None = Field(None, ge=1, description="examples of this task")
    seed: int | None = Field(None, description="sampling seed")
    max_length: int | None = Field(None, ge=1, description="tokens per text example")
    include_completion: bool | None = Field(None, description="generation tasks: the prompt followed by its "
                                                              "completion (default) or the prompt alone")

    @model_validator(mode="before")
    @classmethod
    def _task_shorthand(cls, value):
        return {"task": value} if isinstance(value, str) else value


class DataConfig(BaseModel):
    """The ``data:`` section of a merge config."""

    model_config = ConfigDict(extra="forbid")

    tasks: dict[str, TaskDataConfig] = Field(
        default_factory=dict, description="expert name -> its data source; experts not listed use their own "
                                          "name as the task and the defaults below")
    shots: int = Field(16, ge=1, description="examples per task (K), drawn stratified from the train split")
    seed: int = Field(0, description="sampling seed")
    split: Literal["train", "validation"] = Field("train", description="split to draw from (never test)")
    max_length: int = Field(128, ge=1, description="tokens per text example (at most the model's position "
                                                 "limit; the default is lowered to it for shorter models)")
    batch_size: int = Field(16, ge=1, description="examples per cached batch (the methods' steps group "
                                                  "whole batches)")
    data_dir: str | None = Field(None, description="folder holding glue/ and vision/ (default: "
                                                   "$LAYERMERGE_DATA or ../shared/data)")
    tokenizer: str | None = Field(None, description="tokenizer folder (default: the base model's folder, whose "
                                                    "tokenizer must match the model's embedding)")
    include_completion: bool = Field(True, description="generation tasks: few-shot inputs are the prompt and its "
                                                       "completion (as ProDistill's code has it), or the prompt alone")

    def resolve_paths(self, relative_to: Path) -> DataConfig:
        def fix(path: str | None) -> str | None:
            return relative_to_config(path, relative_to)

        tasks = {name: spec.model_copy(update={"task": task_reference(spec.task, relative_to)})
                 for name, spec in self.tasks.items()}
        return self.model_copy(update={"data_dir": fix(self.data_dir), "tokenizer": fix(self.tokenizer),
                                       "tasks": tasks})


def task_reference(reference: str | dict | None, relative_to: Path) -> str | dict | None:
    """A task reference from a config file, with its paths made absolute: a spec file relative to the
    config's folder, an inline spec's files relative to it too (its ``directory``)."""
    from layermerge.data.tasks import BUILTIN_TASKS, looks_like_file

    if isinstance(reference, dict):
        if reference.get("directory") is None:
            return {**reference, "directory": str(relative_to)}
        return {**reference, "directory": relative_to_config(str(reference["directory"]), relative_to)} \
            if reference["directory"] != "$LAYERMERGE_DATA" else reference
    if reference is None or reference.strip().lower() in BUILTIN_TASKS:
        return reference
    candidate = relative_to_config(reference, relative_to)
    return candidate if looks_like_file(reference) or Path(candidate).exists() else reference


def build_few_shot(config: DataConfig | Mapping, expert_set) -> dict[str, list[dict]]:
    """``{expert name: [collated batch, ...]}`` as the ``data:`` section describes."""
    from layermerge.data import GenerationCollator, Seq2SeqCollator, TextCollator, load_split, sample_few_shot

    if not isinstance(config, DataConfig):
        config = DataConfig(**config)
    tasks = expert_tasks(config, expert_set.names)
    limit = check_max_length(config, expert_set.reference)
    decoder_start = seq2seq_decoder_start(expert_set.output_config() or {})
    tokenizer = None
    batches: dict[str, list[dict]] = {}
    for name in expert_set.names:
        spec = config.tasks.get(name) or TaskDataConfig()
        task = tasks[name]
        shots = spec.shots or config.shots
        seed = config.seed if spec.seed is None else spec.seed
        split = spec.split or config.split
        if split == "train":
            rows = sample_few_shot(task, shots, seed, data_dir=config.data_dir)
        else:
            rows = load_split(task, split, data_dir=config.data_dir).take(shots, seed)
        own_vocabulary = _grown_vocabulary(expert_set) is not None and config.tokenizer is None
        if not task.is_image:
            if own_vocabulary:          # each task in its expert's tokens, then in the merged vocabulary's ids
                from layermerge.vocab import load_input_tokenizer

                expert_tokenizer = load_input_tokenizer(expert_set.expert(name).reader, f"expert '{name}'",
                                                        expert_set.base)
            elif tokenizer is None:
                tokenizer = few_shot_tokenizer(config, expert_set.reference)
            use = expert_tokenizer if own_vocabulary else tokenizer
            length = spec.max_length or _default_length(config, limit)
            completion = config.include_completion if spec.include_completion is None else spec.include_completion
            if decoder_start is not None:
                collate = Seq2SeqCollator(use, task, decoder_start, length, include_completion=completion)
            elif task.is_generation:
                # labels (the completion's tokens) for the methods that read them; the others drop them
                collate = GenerationCollator(use, task, length, include_completion=completion, with_labels=completion)
            else:
                collate = TextCollator(use, task, length)
        else:
            collate = _image_collator(expert_set.expert(name).reader, name)
        batches[name] = [collate([rows[i] for i in range(start, min(start + config.batch_size, len(rows)))])
                         for start in range(0, len(rows), config.batch_size)]
        if own_vocabulary and not task.is_image:
            position = expert_set.names.index(name)
            for batch in batches[name]:
                for key in ("input_ids", "decoder_input_ids"):
                    if key in batch:
                        batch[key] = expert_set.vocabulary.output_ids(position, batch[key])
    return batches


def seq2seq_decoder_start(config: Mapping) -> int | None:
    """The decoder's start token of an encoder-decoder model's config (None for other models): few-shot
    batches then carry decoder inputs beginning with it."""
    if not config.get("is_encoder_decoder"):
        return None
    for key in ("decoder_start_token_id", "bos_token_id", "pad_token_id"):
        if isinstance(config.get(key), int):
            return config[key]
    raise ConfigError("this encoder-decoder model's config has no decoder_start_token_id (nor bos/pad token id), "
                      "so few-shot decoder inputs cannot start; set decoder_start_token_id in config.json or "
                      "pass hand-built batches with decoder_input_ids")


def _grown_vocabulary(expert_set):
    """The output vocabulary when experts' added tokens enter it (union, or an expert's tokenizer), else None."""
    vocabulary = getattr(expert_set, "vocabulary", None)
    return vocabulary if vocabulary is not None and vocabulary.added else None


def expert_tasks(config: DataConfig, experts: Sequence[str]) -> dict:
    """{expert: Task} as the data section names them (an expert not listed: the built-in task of its name)."""
    from layermerge.data import get_task

    unknown = sorted(set(config.tasks) - set(experts))
    if unknown:
        raise ConfigError(f"data.tasks names {unknown}, which are not experts; experts are {list(experts)}")
    tasks = {}
    for name in experts:
        spec = config.tasks.get(name) or TaskDataConfig()
        try:
            tasks[name] = get_task(spec.task or name)
        except DataError as exc:
            if spec.task is not None:
                raise ConfigError(f"data.tasks.{name}: {exc}") from None
            raise ConfigError(f"{exc}. Name the task of expert '{name}' with data.tasks.{name}.task: TASK (a "
                              f"built-in name, a task spec file or an inline spec; data.tasks.{name}: FILE for "
                              "short)") from None
    return tasks


def task_records(data, experts: Sequence[str]) -> dict:
    """{expert: its task's spec} for the merge summary, so ``layermerge eval`` finds each head's task
    wherever it runs; empty for hand-built batches."""
    if isinstance(data, Mapping) and not isinstance(data, DataConfig) and set(data) & set(experts):
        return {}
    config = data if isinstance(data, DataConfig) else DataConfig(**(data or {}))
    return {name: task.record() for name, task in expert_tasks(config, experts).items()}


def few_shot_inputs(data, expert_set) -> dict:
    """``{expert: batches}`` from what a data-driven merge was given: a DataConfig, a ``data:`` mapping
    (built with ``build_few_shot``) or hand-built batches keyed by the experts' names (returned as given)."""
    from pydantic import ValidationError

    if data is None:
        raise ConfigError("this method learns from a few examples per task: pass data= (a data config such as "
                          "{'shots': 16}, or {expert: [input batches]}), or a data: section in the YAML config")
    if isinstance(data, Mapping) and not isinstance(data, DataConfig) and not set(data) & set(expert_set.names):
        try:                       # not keyed by expert names: it must be a data section
            data = DataConfig(**data)
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
            raise ConfigError(f"data: {problems}. Give a data section (keys: {', '.join(DataConfig.model_fields)}) "
                              f"or input batches keyed by the experts' names {expert_set.names}") from None
    return build_few_shot(data, expert_set) if isinstance(data, DataConfig) else data


def check_max_length(config: DataConfig, reference) -> int | None:
    """Refuse a ``max_length`` beyond the base's position limit before any work (transformers would fail
    deep inside the first forward pass); return the limit (None: none declared)."""
    found = position_limit(reference.config)
    if found is None:
        return None
    explicit = {"data.max_length": config.max_length} if "max_length" in config.model_fields_set else {}
    explicit.update({f"data.tasks.{name}.max_length": spec.max_length for name, spec in config.tasks.items()
                     if spec.max_length is not None})
    for option, value in explicit.items():
        check_length(value, reference.config, option, config_file(reference))
    return found[0]


def _default_length(config: DataConfig, limit: int | None) -> int:
    """``data.max_length``; its default is lowered to the model's limit (tiny or short-context models)."""
    if limit is None or "max_length" in config.model_fields_set:
        return config.max_length
    return min(config.max_length, limit)


def few_shot_tokenizer(config: DataConfig, reference):
    """The tokenizer for text few-shot data: ``data.tokenizer``, else the base folder's, checked to fit
    the model's embedding (see ``layermerge.data.models.tokenizer_misfit``); a named one may be smaller."""
    from layermerge.data import load_tokenizer

    named = config.tokenizer is not None
    if not named and reference.folder is None:
        raise ConfigError(f"the base {reference.path} is a single weights file, so no tokenizer lies beside it "
                          "for the text few-shot data; set data.tokenizer: PATH (a folder with the base's "
                          "tokenizer files)")
    folder = config.tokenizer if named else reference.folder
    tokenizer = load_tokenizer(folder, hint="name another folder in data.tokenizer" if named else
                               "set data.tokenizer: PATH")
    problem = tokenizer_misfit(tokenizer, reference.config, folder, config_file(reference), named)
    if problem:
        fix = "name the base's tokenizer in data.tokenizer" if named else \
            "save the base's tokenizer there (tokenizer.save_pretrained) or set data.tokenizer: PATH"
        raise ConfigError(f"{problem}. {fix[0].upper()}{fix[1:]}")
    return tokenizer


def config_file(reference) -> Path:
    """The config.json a reader's settings come from (beside a bare weights file, or in its folder)."""
    return (reference.folder or reference.path.parent) / "config.json"


def _image_collator(reader, name: str):
    from layermerge.data.models import image_collator_for, vision_spec_of

    folder = reader.folder
    spec = vision_spec_of(folder) if folder is not None else None
    if spec is None:
        raise DataError(f"expert '{name}' ({reader.path}) has no layermerge vision config, so its image "
                        "preprocessing is unknown; pass pre-built pixel_values batches instead")
    return image_collator_for(spec)


def data_record(data, batches: Mapping[str, Sequence[Mapping]]) -> dict:
    """The ``data:`` section layermerge.yaml records: the section as resolved, or for hand-built batches
    their shape (they cannot be recorded)."""
    if isinstance(data, DataConfig):
        return data.model_dump(exclude_none=True)
    if isinstance(data, Mapping) and set(data) <= set(DataConfig.model_fields):
        return DataConfig(**data).model_dump(exclude_none=True)
    return {"in_memory_batches": describe(batches)}


def describe(data: Mapping[str, Sequence[Mapping]]) -> dict:
    """Examples and batches per task, for the output's records."""
    from layermerge.engine.driver import input_batch_size

    return {task: {"batches": len(batches),
                   "examples": sum(input_batch_size(batch, task, i) for i, batch in enumerate(batches))}
            for task, batches in data.items()}


def adapt_batches(model: torch.nn.Module, data: Mapping) -> dict[str, list[dict]]:
    """Validate hand-built or collated batches and fit them to ``model.forward``'s arguments."""
    if not isinstance(data, Mapping):
        raise DataError(f"data must map each expert's name to a list of input batches (dicts of tensors), "
                        f"got {type(data).__name__}")
    parameters = _forward_parameters(model)
    config = getattr(model, "config", None)
    config_dict = config.to_dict() if callable(getattr(config, "to_dict", None)) else None
    found = position_limit(config_dict)
    decoder_start = seq2seq_decoder_start(config_dict or {}) if "decoder_input_ids" in parameters else None
    adapted = {}
    for task, batches in data.items():
        if isinstance(batches, Mapping):
            batches = [batches]
        if not isinstance(batches, Sequence) or isinstance(batches, (str, bytes)):
            raise DataError(f"data['{task}'] must be a list of input batches (dicts of tensors), got "
                            f"{type(batches).__name__}")
        adapted[task] = [_adapt(dict(batch) if isinstance(batch, Mapping) else batch, parameters, task, i)
                         for i, batch in enumerate(batches)]
        if decoder_start is not None:
            adapted[task] = [with_decoder_start(batch, decoder_start) for batch in adapted[task]]
        if found is not None:
            _check_lengths(adapted[task], task, *found)
    return adapted


def with_decoder_start(batch: dict, decoder_start: int) -> dict:
    """An encoder-decoder batch without decoder inputs gets one decoder start token per example (the
    decoder's stream is then its first position, cross-attending to the encoder)."""
    if "decoder_input_ids" in batch or "decoder_inputs_embeds" in batch:
        return batch
    size = next((value.shape[0] for value in batch.values() if isinstance(value, torch.Tensor) and value.dim()), None)
    if size is None:
        return batch
    return {**batch, "decoder_input_ids": torch.full((size, 1), decoder_start, dtype=torch.long)}


def _check_lengths(batches: list[dict], task: str, limit: int, key: str) -> None:
    """Hand-built token batches longer than the model's positions would fail inside its first layer."""
    for position, batch in enumerate(batches):
        ids = batch.get("input_ids")
        if isinstance(ids, torch.Tensor) and ids.dim() >= 1 and ids.shape[-1] > limit:
            raise DataError(f"data['{task}'][{position}] has input_ids of length {ids.shape[-1]}, but the model "
                            f"takes at most {limit} tokens ({key} in its config); truncate the batches to {limit}")


def _forward_parameters(model: torch.nn.Module) -> list[str]:
    try:
        signature = inspect.signature(model.forward)
    except (TypeError, ValueError):
        return []
    return [name for name, p in signature.parameters.items()
            if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY, p.POSITIONAL_ONLY)]


def _adapt(batch, parameters: list[str], task: str, position: int) -> dict:
    if not isinstance(batch, dict) or not batch:
        raise DataError(f"data['{task}'][{position}] must be a non-empty dict of model inputs "
                        f"(e.g. {{'input_ids': ..., 'attention_mask': ...}}), got {type(batch).__name__}")
    if not parameters:
        return {k: v for k, v in batch.items() if k not in LABEL_KEYS}
    out = {}
    for key, value in batch.items():
        if key in LABEL_KEYS:
            continue
        if key in parameters:
            out[key] = value
        elif key == "pixel_values" and parameters[0] not in batch:
            out[parameters[0]] = value        # plain vision modules: forward(inputs) / forward(x)
    if not out:
        raise DataError(f"data['{task}'][{position}] has no input the model takes: keys {sorted(batch)}, "
                        f"the model's forward takes {parameters[:6]}")
    return out
