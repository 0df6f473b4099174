"""Per-task evaluation of a model, an expert folder, or a merged output folder.

A merged folder is evaluated task by task: for each task the merged backbone is joined with that
task's own head (``load_model``), exactly as a user would deploy it. A LoRA adapter folder (one that
``layermerge finetune --lora-rank`` wrote, or any PEFT LoRA adapter) is evaluated as the dense expert
it stands for, its base plus scale·B·A (``load_adapter_model``). Rows are batched by length so
dynamic padding costs little; predictions are put back in data order before scoring.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from layermerge.data.collate import GenerationCollator, TextCollator, length_grouped_batches, row_lengths
from layermerge.data.models import (
    TOKENIZER_FILES,
    check_outputs,
    check_text_model,
    fitted_length,
    forward_logits,
    image_collator_for,
    load_model,
    load_tokenizer,
    quiet_transformers,
    vision_spec_of,
)
from layermerge.data.sources import TaskData, load_split
from layermerge.data.tasks import Task, get_task
from layermerge.errors import CheckpointError, DataError
from layermerge.eval.generation import generate_answers
from layermerge.eval.metrics import task_score
from layermerge.eval.scorers import check_scorer, load_scorer, score_answers
from layermerge.io.lora import is_lora_adapter
from layermerge.progress import progress

DEFAULT_MAX_LENGTH = 128      # tokens per text example, unless the model's positions allow fewer
DEFAULT_PROMPT_LENGTH = 512   # tokens of a generation prompt (its end is kept), likewise

ModelSource = str | Path | nn.Module


@dataclass
class TaskResult:
    """One task's score (percent), its parts (accuracy, F1...), and how it was obtained."""

    task: str
    metric: str
    score: float
    parts: dict[str, float]
    examples: int
    split: str
    seconds: float = 0.0
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, record: dict) -> TaskResult:
        return cls(**record)


@torch.inference_mode()
def predict(model: nn.Module, task: Task, data: TaskData, collator: Callable, batch_size: int = 64,
            quiet: bool = True, desc: str | None = None) -> np.ndarray:
    """Class ids (or regression values) for every row of ``data``, in data order."""
    model.eval()
    predictions = np.zeros(len(data), dtype=np.float32 if task.is_regression else np.int64)
    batches = length_grouped_batches(row_lengths(data), batch_size, shuffle=False)
    for indices in progress(batches, disable=quiet, desc=desc or task.name, unit="batch", leave=False):
        batch = collator([data[int(i)] for i in indices])
        logits = forward_logits(model, batch).float()
        if task.is_regression:
            predictions[indices] = logits.reshape(len(indices), -1)[:, 0].numpy()
        else:
            predictions[indices] = logits.argmax(dim=-1).numpy()
    return predictions


# The transformers class a LoRA expert's dense model is built as, by the kind of task it was trained for.
ADAPTER_MODEL_TABLES = {True: "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES",
                        False: "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES"}


def load_adapter_model(folder: str | Path, task: Task) -> tuple[nn.Module, Path]:
    """A LoRA adapter as the dense task model base + scale·B·A, and its base folder. The tensors come from
    io/lora.py (equal to peft's merge_and_unload to 1e-6), so peft is not needed to evaluate."""
    import transformers
    from transformers.models.auto import modeling_auto

    from layermerge.io.inputs import open_input
    from layermerge.io.lora import ADAPTER_CONFIG, LoraReader

    folder = Path(folder)
    config_path = folder / ADAPTER_CONFIG
    try:
        named = json.loads(config_path.read_text()).get("base_model_name_or_path")
    except (OSError, ValueError, AttributeError):
        LoraReader(folder, None)     # raises the reader's one line on what is wrong with the file
        raise
    if not named:
        raise CheckpointError(f"the LoRA adapter {folder} names no base model (base_model_name_or_path in "
                              f"{ADAPTER_CONFIG}); set it to the folder of the model the adapter was trained on")
    base = open_input(named, "base model")
    if base.folder is None:
        raise CheckpointError(f"the base {named!r} that {config_path} names is not a model folder")
    reader = LoraReader(folder, base, "adapter")
    config = reader.config or {}
    table = getattr(modeling_auto, ADAPTER_MODEL_TABLES[task.is_generation])
    class_name = table.get(config.get("model_type"))
    class_name = class_name[0] if isinstance(class_name, (list, tuple)) else class_name
    if class_name is None or not hasattr(transformers, class_name):
        kind = "causal language model" if task.is_generation else "sequence classifier"
        raise CheckpointError(f"cannot build a {kind} from the LoRA adapter {folder}: transformers has none for "
                              f"model type {config.get('model_type')!r} (base {base.folder})")
    hf_config = transformers.AutoConfig.for_model(**config)
    with quiet_transformers():
        model = getattr(transformers, class_name).from_pretrained(None, config=hf_config,
                                                                  state_dict=reader.state_dict(),
                                                                  dtype=torch.float32)
    check_outputs(model, task, folder)
    return model.eval(), base.folder


def score_predictions(task: Task, predictions: np.ndarray, data: TaskData,
                      seconds: float = 0.0) -> TaskResult:
    metric = task.score_metric
    score, parts = task_score(load_scorer(task) if ":" in metric else metric, predictions, data.labels)
    return TaskResult(task.name, metric, score, parts, len(data), data.split, round(seconds, 3))


def collator_for(source: ModelSource, task: Task, tokenizer=None, max_length: int = 128,
                 image_collator: Callable | None = None, head: str | None = None) -> Callable:
    """Tokenise with the given tokenizer (or the folder's own); preprocess images as the model's spec says."""
    if not task.is_image:
        if tokenizer is None:
            if not isinstance(source, (str, Path)):
                raise DataError(f"task {task.name!r} is a text task: pass tokenizer= with an in-memory model")
            tokenizer = source
        if isinstance(tokenizer, (str, Path)):
            tokenizer = load_tokenizer(tokenizer)
        if task.is_generation:
            return GenerationCollator(tokenizer, task, max_length, include_completion=False)
        return TextCollator(tokenizer, task, max_length)
    if image_collator is not None:
        return image_collator
    spec = vision_spec_of(source, head or task.name) if isinstance(source, (str, Path)) else None
    if spec is None:
        raise DataError(f"task {task.name!r} is an image task: pass image_collator= (an ImageCollator) "
                        "or a saved layermerge vision model folder")
    return image_collator_for(spec)


def evaluate_task(source: ModelSource, task: str | Task, split: str = "test",
                  max_examples: int | None = None, *, batch_size: int = 64, max_length: int | None = None,
                  tokenizer=None, image_collator=None,
                  data_dir: str | Path | None = None, seed: int = 0, quiet: bool = True,
                  desc: str | None = None, head: str | None = None) -> TaskResult:
    """Score one task. ``source`` is a folder (expert, LoRA adapter or merged) or an in-memory model; in a
    merged folder the task's head is ``head`` (default: the task's name). ``max_length`` defaults to 128
    tokens (512 of prompt for generation tasks), or the model's position limit when that is smaller."""
    task = get_task(task)
    check_scorer(task)
    data = load_split(task, split, data_dir=data_dir).take(max_examples, seed)
    named_tokenizer = tokenizer is not None
    checked_folder = Path(source) if isinstance(source, (str, Path)) else None   # the config and tokenizer
    if checked_folder is not None and is_lora_adapter(checked_folder):
        model, base_folder = load_adapter_model(checked_folder, task)
        if tokenizer is None and not any((checked_folder / name).is_file() for name in TOKENIZER_FILES):
            tokenizer = base_folder      # an adapter saved without a tokenizer: the base's
        checked_folder = base_folder
    elif checked_folder is not None:
        model = load_model(source, task, head)
    else:
        model = source
    if max_length is None:
        config = getattr(model, "config", None)
        default = DEFAULT_PROMPT_LENGTH if task.is_generation else DEFAULT_MAX_LENGTH
        max_length = fitted_length(default, config.to_dict() if hasattr(config, "to_dict") else None)
    collator = collator_for(source, task, tokenizer, max_length, image_collator, head)
    if checked_folder is not None and not task.is_image:     # before any prediction
        check_text_model(checked_folder, collator.tokenizer, max_length, "max_length (--max-length)",
                         "Name the model's tokenizer with --tokenizer DIR (tokenizer= in Python)",
                         named=named_tokenizer)
    started = time.perf_counter()
    if task.is_generation:
        answers = generate_answers(model, collator.tokenizer, task, data, batch_size=batch_size,
                                   max_length=max_length, quiet=quiet, desc=desc)
        score, parts = score_answers(task, answers, data.rows)
        return TaskResult(task.name, task.score_metric, score, parts, len(data), data.split,
                          round(time.perf_counter() - started, 3), extra={"answers": answers[:5]})
    predictions = predict(model, task, data, collator, batch_size, quiet=quiet, desc=desc)
    return score_predictions(task, predictions, data, time.perf_counter() - started)


def evaluate(model_or_folder: ModelSource | Mapping[str, ModelSource], tasks: Sequence[str | Task] | str,
             split: str = "test", max_examples: int | None = None, *, batch_size: int = 64,
             max_length: int | None = None, tokenizer=None, image_collator=None,
             data_dir: str | Path | None = None, seed: int = 0,
             quiet: bool = False, heads: Mapping[str, str] | None = None) -> dict[str, TaskResult]:
    """Evaluate on each task's ``split`` (at most ``max_examples`` rows, a seeded subset).

    ``model_or_folder``: a merged output folder (each task uses the merged backbone + its own head;
    ``heads`` maps a task to a head of another name), an expert folder or in-memory model (used for every
    task), or ``{task: folder_or_model}``. Tasks are built-in names, spec files or Task objects.
    """
    if isinstance(tasks, str):
        tasks = [t for t in tasks.split(",") if t.strip()]
    resolved = [get_task(t) for t in tasks]
    if not resolved:
        raise DataError("no tasks to evaluate: give at least one task name")
    results = {}
    for task in progress(resolved, disable=quiet or len(resolved) < 2, desc="tasks", unit="task"):
        if isinstance(model_or_folder, Mapping):
            if task.name not in model_or_folder:
                raise DataError(f"no model given for task {task.name!r}; models were given for "
                                f"{', '.join(model_or_folder)}")
            source = model_or_folder[task.name]
        else:
            source = model_or_folder
        results[task.name] = evaluate_task(source, task, split, max_examples, batch_size=batch_size,
                                           max_length=max_length, tokenizer=tokenizer,
                                           image_collator=image_collator, data_dir=data_dir, seed=seed,
                                           quiet=quiet, head=(heads or {}).get(task.name))
    return results
