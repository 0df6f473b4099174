"""Capturing what each block receives: its hidden-state input and every extra argument.

One forward pass of the model per batch, with every block temporarily replaced by a recorder that
stores its arguments and hands its hidden-state input straight back (shaped like the block's real
output). The embedding stage runs for real; no block computes anything, so the pass costs about
as much as the embedding stage, whatever the depth. Extra arguments (attention masks, position
ids, rotary tables) are built by the model itself, so every family gets exactly what its blocks
expect, including per-layer differences (sliding-window layers get their own mask).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from layermerge.blocks import BlockPlan, BlockPlanError
from layermerge.engine.tree import trees_equal


class _StopForward(Exception):
    """Raised by the last block's recorder: nothing after the blocks needs to run."""


@dataclass
class BlockInputs:
    """What block calls receive for one batch: the first block's hidden states and per-block extras.

    ``extras`` holds the distinct ``(args, kwargs)`` pairs (without the hidden states);
    ``extra_index[l]`` says which one block ``l`` receives; most models pass all blocks the same.
    ``output_format`` says how a block returns its hidden states: ``None`` for a bare tensor, or the
    length of the tuple whose first item it is.
    """

    hidden: torch.Tensor
    extras: list[tuple[tuple, dict]]
    extra_index: list[int]
    output_format: int | None


def hidden_of(output: Any) -> torch.Tensor:
    """The hidden states in a block's output (a tensor, or the first item of a tuple/list/ModelOutput)."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    if hasattr(output, "to_tuple"):
        return hidden_of(output.to_tuple())
    raise BlockPlanError(
        f"a block returned {type(output).__name__}, not a tensor or a tuple starting with one; the engine "
        "streams the first output of each block into the next. Choose blocks whose output is the hidden "
        "state (a block_plan override).")


def hidden_parameter(forward) -> str | None:
    """The name of a block's first input (its hidden states), read from the forward's signature.

    Models call blocks with the hidden states positionally or by keyword, under whatever name the block
    declares (``hidden_states``, ``x``, ``hidden``...); the signature says which, so the engine depends
    on no library's keyword names.
    """
    try:
        parameters = list(inspect.signature(forward).parameters.values())
    except (TypeError, ValueError):
        return None
    for parameter in parameters:
        if parameter.kind in (parameter.POSITIONAL_ONLY, parameter.POSITIONAL_OR_KEYWORD):
            return parameter.name
        break
    return None


def split_hidden(args: tuple, kwargs: dict, hidden_name: str | None = None) -> tuple[torch.Tensor, tuple, dict]:
    """``(hidden, other_args, other_kwargs)`` from a block call; ``hidden_name`` is the first parameter's name."""
    if args:
        hidden, rest = args[0], tuple(args[1:])
        other = dict(kwargs)
    elif hidden_name is not None and hidden_name in kwargs:
        other = dict(kwargs)
        hidden, rest = other.pop(hidden_name), ()
    else:
        raise BlockPlanError(f"a block was called without positional arguments or its first parameter "
                             f"'{hidden_name}=' (kwargs: {sorted(kwargs)}); the engine cannot tell which input "
                             "is the hidden state")
    if not isinstance(hidden, torch.Tensor):
        raise BlockPlanError(f"a block's first input is a {type(hidden).__name__}, not a tensor of hidden "
                             "states")
    return hidden, rest, other


def call_block(block: nn.Module, params: dict[str, torch.Tensor] | None, hidden: torch.Tensor,
               extra: tuple[tuple, dict], dtype: torch.dtype | None = None):
    """Run ``block`` on ``hidden`` with its extra arguments, with ``params`` in place of its own weights.

    With ``dtype`` the floating weights are cast to it first (bf16 block compute); the cast is part of
    the autograd graph, so coefficients behind ``params`` still receive fp32 gradients. A 4-D input of
    a block with convolutions goes in channels-last, the layout oneDNN's convolutions run fastest
    on (1.3-2.2x for EfficientNet blocks here, docs/BENCHMARKS.md); the values are the same.
    """
    args, kwargs = extra
    if hidden.dim() == 4 and has_convolutions(block):
        hidden = hidden.contiguous(memory_format=torch.channels_last)
    if params is None:
        return hidden_of(block(hidden, *args, **kwargs))
    if dtype is not None:
        params = {name: t.to(dtype) if t.is_floating_point() else t for name, t in params.items()}
    return hidden_of(torch.func.functional_call(block, params, (hidden, *args), kwargs, strict=False))


CONVOLUTIONS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def has_convolutions(block: nn.Module) -> bool:
    """Whether ``block`` holds a convolution (its 4-D activations then go in channels-last, and
    ``train_precision: auto`` keeps it in float32)."""
    return any(isinstance(module, CONVOLUTIONS) for module in block.modules())


def model_call_options(model: nn.Module) -> dict:
    """Keyword arguments that switch off caches for models whose forward accepts them."""
    try:
        names = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return {}
    return {"use_cache": False} if "use_cache" in names else {}


def capture_block_inputs(model: nn.Module, plan: BlockPlan, batch: dict[str, Any],
                         first_block_params: dict[str, torch.Tensor] | None = None) -> BlockInputs:
    """Run ``model(**batch)`` with recorders in place of the blocks; return what the blocks received.

    ``first_block_params`` are weights for the one real call of the first block (which teaches the
    recorders the blocks' output format); pass them when the template's blocks live on the meta device.
    """
    blocks = [model.get_submodule(path) for path in plan.blocks]
    calls: list[tuple[int, torch.Tensor, tuple, dict]] = []
    output_format: list[int | None] = []

    def recorder(index: int, block: nn.Module):
        real_forward = block.forward
        hidden_name = hidden_parameter(real_forward)

        def record(*args, **kwargs):
            hidden, rest, other = split_hidden(args, kwargs, hidden_name)
            calls.append((index, hidden, rest, other))
            if not output_format:
                # Learn the output format once from a real call (its values are not used).
                if first_block_params is None:
                    real = real_forward(*args, **kwargs)
                else:
                    del block.forward          # functional_call must reach the real forward, not us
                    try:
                        real = torch.func.functional_call(block, first_block_params, args, kwargs, strict=False)
                    finally:
                        block.forward = record
                output_format.append(None if isinstance(real, torch.Tensor) else len(tuple(real)))
                fmt_source = real
            else:
                fmt_source = None
            if index == len(blocks) - 1:
                raise _StopForward
            if output_format[0] is None:
                return hidden
            rest_out = tuple(fmt_source)[1:] if fmt_source is not None else (None,) * (output_format[0] - 1)
            return (hidden, *rest_out)

        return record

    for index, block in enumerate(blocks):
        block.forward = recorder(index, block)
    try:
        with torch.no_grad():
            model(**batch, **model_call_options(model))
    except _StopForward:
        pass
    finally:
        for block in blocks:
            del block.forward
    order = [index for index, *_ in calls]
    if order != list(range(len(blocks))):
        raise BlockPlanError(
            f"{type(model).__name__}'s blocks were not called once each in plan order (calls: "
            f"{order[:12]} for {len(blocks)} blocks): the engine needs blocks that run one after another, "
            "each output feeding the next. Correct the block list with a block_plan override.")
    extras: list[tuple[tuple, dict]] = []
    extra_index = []
    for _, _, rest, other in calls:
        for position, known in enumerate(extras):
            if trees_equal(known, (rest, other)):
                extra_index.append(position)
                break
        else:
            extras.append((rest, other))
            extra_index.append(len(extras) - 1)
    return BlockInputs(calls[0][1], extras, extra_index, output_format[0])
