"""How labels line up with a model's predictions: one place for every method that reads labels.

A classification head gives (batch, classes) logits and one label per example. A causal language
model gives (batch, positions, vocabulary) logits, and its few-shot labels are laid out like its
``input_ids`` (the transformers convention: the completion's token ids, IGNORE_INDEX on the prompt and
padding), so position t predicts the label at t + 1: the logits drop their last position and the
labels their first. Per-token labels of any other model (an encoder-decoder's decoder targets, token
classification) already sit at the position that predicts them and are not shifted.
"""

from __future__ import annotations

import torch
from torch import nn

from layermerge.errors import ConfigError

IGNORE_INDEX = -100


def predicts_next_token(model: nn.Module) -> bool:
    """Whether ``model``'s labels are its input tokens shifted by one: a decoder-only generative model."""
    from transformers import GenerationMixin

    config = getattr(model, "config", None)
    return isinstance(model, GenerationMixin) and not getattr(config, "is_encoder_decoder", False)


def prediction_targets(logits: torch.Tensor, labels: torch.Tensor, *, shift: bool = False
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """(predictions × outputs logits, one target per prediction), IGNORE_INDEX entries kept (callers
    mask them). ``shift``: the labels follow the input tokens (``predicts_next_token``)."""
    labels = labels.to(logits.device)
    if logits.dim() == 2 and labels.numel() == logits.shape[0]:
        return logits, labels.reshape(-1)
    if logits.dim() == 3 and tuple(labels.shape) == tuple(logits.shape[:2]):
        if shift:
            logits, labels = logits[:, :-1], labels[:, 1:]
        return logits.reshape(-1, logits.shape[-1]), labels.reshape(-1)
    raise ConfigError(f"labels of shape {tuple(labels.shape)} do not line up with logits of shape "
                      f"{tuple(logits.shape)}: give one label per example for a classification head, or one per "
                      "input token (IGNORE_INDEX -100 where there is none) for a language model")


def predicted_labels(labels: torch.Tensor, shift: bool) -> torch.Tensor:
    """The labels some position predicts: a next-token model's per-token labels lose their first."""
    return labels[:, 1:] if shift and labels.dim() == 2 else labels


def supervised_loss_sum(logits: torch.Tensor, labels: torch.Tensor, *, shift: bool = False
                        ) -> tuple[torch.Tensor, int]:
    """Summed cross-entropy, or squared error for a one-output head, and the number of labelled
    predictions (IGNORE_INDEX skipped)."""
    logits, labels = prediction_targets(logits.float(), labels, shift=shift)
    if logits.shape[-1] == 1:
        flat = logits.reshape(-1)
        keep = labels != IGNORE_INDEX
        return (flat[keep] - labels[keep].to(flat.dtype)).pow(2).sum(), int(keep.sum())
    labels = labels.long()
    loss = torch.nn.functional.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="sum")
    return loss, int((labels != IGNORE_INDEX).sum())


def correct_count(logits: torch.Tensor, labels: torch.Tensor, *, shift: bool = False) -> tuple[int, int]:
    """(predictions whose argmax is the label, labelled predictions)."""
    logits, labels = prediction_targets(logits, labels, shift=shift)
    keep = labels != IGNORE_INDEX
    return int((logits.argmax(-1)[keep] == labels[keep]).sum()), int(keep.sum())


__all__ = ["IGNORE_INDEX", "correct_count", "predicted_labels", "prediction_targets", "predicts_next_token",
           "supervised_loss_sum"]
