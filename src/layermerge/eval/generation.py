"""Greedy decoding of a causal language model's answers to a generation task's prompts.

Prompts are tokenised as fine-tuning and merging see them (``layermerge.data.collate.prompt_ids``:
the chat template when the tokenizer has one and the task allows it), batched by length and padded
on the left so every row's answer starts at the same position; each answer is decoded greedily up
to the task's ``max_new_tokens`` or the end-of-text token, and returned as text without special
tokens, in data order.
"""

from __future__ import annotations

import torch
from torch import nn

from layermerge.data.collate import length_grouped_batches, pad_token_id, prompt_ids, row_lengths
from layermerge.data.sources import TaskData
from layermerge.data.tasks import Task
from layermerge.progress import progress


def left_padded(prompts: list[list[int]], pad: int) -> dict[str, torch.Tensor]:
    """input_ids and attention_mask with every prompt flush right."""
    width = max(len(ids) for ids in prompts)
    input_ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    attention = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, ids in enumerate(prompts):
        if ids:
            input_ids[i, width - len(ids):] = torch.tensor(ids, dtype=torch.long)
            attention[i, width - len(ids):] = 1
    return {"input_ids": input_ids, "attention_mask": attention}


@torch.inference_mode()
def generate_answers(model: nn.Module, tokenizer, task: Task, data: TaskData, *, batch_size: int = 16,
                     max_length: int = 512, quiet: bool = True, desc: str | None = None) -> list[str]:
    """The model's greedy answer to every row's prompt (prompts keep their last ``max_length`` tokens)."""
    model.eval()
    pad = pad_token_id(tokenizer)
    eos = tokenizer.eos_token_id
    answers: list[str] = [""] * len(data)
    batches = length_grouped_batches(row_lengths(data), batch_size, shuffle=False)
    bar = progress(total=len(data), disable=quiet, desc=desc or f"generating {task.name}", unit="example",
                   leave=False)
    for indices in batches:
        prompts = [prompt_ids(tokenizer, task, data[int(i)][task.prompt])[-max_length:] for i in indices]
        batch = left_padded(prompts, pad)
        output = model.generate(**batch, max_new_tokens=task.max_new_tokens, do_sample=False, num_beams=1,
                                pad_token_id=pad, eos_token_id=eos)
        new_tokens = output[:, batch["input_ids"].shape[1]:]
        for row, tokens in zip(indices, new_tokens):
            answers[int(row)] = tokenizer.decode(tokens, skip_special_tokens=True).strip()
        bar.update(len(indices))
    bar.close()
    return answers
