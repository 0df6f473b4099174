"""The ensemble of experts, the reference a merge tries to reach without keeping every expert.

For task t the ensemble's output is the mean over experts i of task t's head applied to expert i's
backbone: (1/T) Σ_i head_t(backbone_i(x)) — the uniform-weight ensemble of NeuLig's paper, whose
merged model aims to match it. Each expert's backbone is loaded in turn into task t's own model
(its head kept), so only one model is in memory at a time.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from layermerge.data.collate import length_grouped_batches, row_lengths
from layermerge.data.models import forward_logits, load_model
from layermerge.data.sources import load_split
from layermerge.data.tasks import get_task
from layermerge.errors import DataError
from layermerge.eval.evaluate import TaskResult, collator_for, load_adapter_model, score_predictions
from layermerge.experts import ExpertSet
from layermerge.io.lora import LoraReader, is_lora_adapter
from layermerge.io.reader import CheckpointReader


def _weights(folder: Path, base: str | Path) -> dict[str, torch.Tensor]:
    if is_lora_adapter(folder):              # a LoRA expert: its dense tensors, base + scale·B·A
        return LoraReader(folder, CheckpointReader(Path(base))).state_dict()
    state: dict[str, torch.Tensor] = {}
    for file in sorted(folder.glob("*.safetensors")):
        state.update(load_file(file))
    return state


@torch.inference_mode()
def _mean_logits(model: torch.nn.Module, data, collator, batch_size: int) -> torch.Tensor:
    model.eval()
    rows = []
    order = []
    for indices in length_grouped_batches(row_lengths(data), batch_size, shuffle=False):
        batch = collator([data[int(i)] for i in indices])
        rows.append(forward_logits(model, batch).float().reshape(len(indices), -1))
        order.extend(int(i) for i in indices)
    logits = torch.cat(rows)
    return logits[torch.argsort(torch.tensor(order))]


def evaluate_ensemble(base: str | Path, experts: dict[str, str | Path], task, *,
                      max_examples: int | None, max_length: int = 128, batch_size: int = 64,
                      data_dir: str | Path | None = None, seed: int = 0) -> TaskResult:
    """Score the experts' ensemble on ``task``'s test split (the same seeded subset as ``evaluate_task``)."""
    task_info = get_task(task)
    task = task_info.name
    if task_info.is_generation:
        raise DataError(f"task {task!r} is a generation task: the logit ensemble scores classifiers only")
    heads = set(ExpertSet(base, experts).report.head_keys.get(task, []))
    data = load_split(task_info, "test", data_dir=data_dir).take(max_examples, seed)
    if is_lora_adapter(Path(experts[task])):
        model, _ = load_adapter_model(experts[task], task_info)
    else:
        model = load_model(experts[task], task_info)
    collator = collator_for(experts[task], task_info, max_length=max_length)
    own = {name: value.clone() for name, value in model.state_dict().items()}
    started = time.perf_counter()
    total = None
    for name, folder in experts.items():
        state = own if name == task else _weights(Path(folder), base)
        backbone = {k: v for k, v in state.items() if k in own and k not in heads and v.shape == own[k].shape}
        model.load_state_dict({**own, **backbone})
        logits = _mean_logits(model, data, collator, batch_size)
        total = logits if total is None else total + logits
    mean = total / len(experts)
    predictions = mean[:, 0].numpy() if task_info.is_regression else mean.argmax(-1).numpy().astype(np.int64)
    return score_predictions(task_info, predictions, data, time.perf_counter() - started)
