"""Capturing what each block receives: its hidden-state input and every extra argument.

One forward pass of the model per batch, with every block temporarily replaced by a recorder that
stores its arguments and hands its hidden-state input straight back (shaped like the block's real
output). The embedding stage runs for real; no block computes anything, so the pass costs about
as much as the embedding stage, whatever the depth. Extra arguments (attention masks, position
ids, rotary tables) are built by the model itself, so every family gets exactly what its blocks
expect, including per-layer differences (sliding-window layers get their own mask).

A model with several stacks (an encoder and a decoder) is captured one stack at a time. For stack
``k`` the blocks of the stacks before it are replayers: none computes anything, and the last block
of each returns that stack's final hidden states on the stream being captured (the merged model's
encoder output for the merged stream, the expert's own for its stream), so whatever the model
builds from them (the decoder's cross-attention inputs) is the stream's own. Within a stack every
block must receive the previous block's output unchanged; a plan whose blocks do not chain (one
list over an encoder and a decoder) is refused, never trained.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from layermerge.blocks import BlockPlan, BlockPlanError
from layermerge.engine.tree import carried_positions, replace_carried, trees_equal


class _StopForward(Exception):
    """Raised by the last block's recorder: nothing after the blocks needs to run."""


@dataclass
class BlockInputs:
    """What block calls receive for one batch: the first block's hidden states and per-block extras.

    ``extras`` holds the distinct ``(args, kwargs)`` pairs (without the hidden states);
    ``extra_index[l]`` says which one block ``l`` receives; most models pass all blocks the same.
    ``output_format`` says how a block returns its hidden states: ``None`` for a bare tensor, or the
    length of the tuple whose first item it is. ``carried`` lists the positions of the block outputs
    (after the hidden states, counted from 1) that the next block receives as arguments; in ``extras``
    those arguments are ``Carried`` placeholders, filled per stream while streaming.
    """

    hidden: torch.Tensor
    extras: list[tuple[tuple, dict]]
    extra_index: list[int]
    output_format: int | None
    carried: tuple[int, ...] = ()


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
               extra: tuple[tuple, dict], dtype: torch.dtype | None = None, layout_of: nn.Module | None = None):
    """The hidden states ``block`` outputs (see ``call_block_outputs``)."""
    return hidden_of(call_block_outputs(block, params, hidden, extra, dtype, layout_of))


def outputs_at(output: Any, positions: tuple[int, ...]) -> dict[int, torch.Tensor]:
    """The block outputs at ``positions`` (1 = the first after the hidden states)."""
    items = output.to_tuple() if hasattr(output, "to_tuple") else tuple(output)
    return {position: items[position] for position in positions}


def with_hidden_dtype(output: Any, dtype: torch.dtype) -> Any:
    """``output`` with its hidden states (the first output) in ``dtype``: a block run under bfloat16
    autocast may return them in bfloat16 while the streams and the losses keep float32."""
    hidden = hidden_of(output)
    if hidden.dtype == dtype:
        return output
    if isinstance(output, torch.Tensor):
        return output.to(dtype)
    items = output.to_tuple() if hasattr(output, "to_tuple") else tuple(output)
    return (items[0].to(dtype), *items[1:])


def call_block_outputs(block: nn.Module, params: dict[str, torch.Tensor] | None, hidden: torch.Tensor,
                       extra: tuple[tuple, dict], dtype: torch.dtype | None = None,
                       layout_of: nn.Module | None = None):
    """Run ``block`` on ``hidden`` with its extra arguments, with ``params`` in place of its own weights;
    its whole output (the hidden states, or a tuple starting with them).

    With ``dtype`` the floating weights are cast to it first (bf16 block compute); the cast is part of
    the autograd graph, so coefficients behind ``params`` still receive fp32 gradients. A 4-D input of
    a block with convolutions goes in channels-last, the layout oneDNN's convolutions run fastest
    on (1.3-2.2x for EfficientNet blocks here, docs/BENCHMARKS.md); the values are the same.
    ``layout_of`` is the module whose layers decide that layout when ``block`` is a rewritten copy of
    it (``methods.folding``).
    """
    args, kwargs = extra
    layout_of = block if layout_of is None else layout_of
    if hidden.dim() == 4 and has_convolutions(layout_of) and not has_group_norm(layout_of):
        hidden = hidden.contiguous(memory_format=torch.channels_last)
    if params is None:
        return block(hidden, *args, **kwargs)
    if dtype is not None:
        params = {name: t.to(dtype) if t.is_floating_point() else t for name, t in params.items()}
    return torch.func.functional_call(block, params, (hidden, *args), kwargs, strict=False)


CONVOLUTIONS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def has_convolutions(block: nn.Module) -> bool:
    """Whether ``block`` holds a convolution (its 4-D activations then go in channels-last, and
    ``train_precision: auto`` keeps it in float32)."""
    return any(isinstance(module, CONVOLUTIONS) for module in block.modules())


def check_chain(model: nn.Module, plan: BlockPlan, indices: range, inputs: list[torch.Tensor]) -> None:
    """Every block of a stack must receive the previous block's output as it was returned.

    The recorders return their input, so block ``l + 1`` must receive exactly what block ``l``
    received. Anything else means the model does something between the two (another stack's
    embedding, a pooling step) that the engine's streams would skip: refused, never trained.
    """
    for position in range(1, len(inputs)):
        before, after = inputs[position - 1], inputs[position]
        if after is before or (after.shape == before.shape and torch.equal(after, before)):
            continue
        first, second = plan.blocks[indices[position - 1]], plan.blocks[indices[position]]
        raise BlockPlanError(
            f"{type(model).__name__}: block {second!r} does not receive block {first!r}'s output (input "
            f"{tuple(after.shape)} after output {tuple(before.shape)}): the two do not form one stream, e.g. "
            "an encoder's last block and a decoder's first. List each stack separately "
            "(block_plan: {stacks: [encoder.layers, decoder.layers]}), or list only blocks that run one "
            "after another, each output feeding the next.")


def is_cache(value: Any) -> bool:
    """A key/value cache object (transformers' ``Cache`` classes): stateful, it grows at every call."""
    return any(cls.__name__ == "Cache" for cls in type(value).__mro__) and callable(getattr(value, "update", None))


def without_caches(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """A block call's extra arguments with key/value caches replaced by None. A model may build one even
    with ``use_cache=False`` (Switch Transformers' decoder); replayed on every call it would append the
    keys again and again."""
    return (tuple(None if is_cache(value) else value for value in args),
            {key: None if is_cache(value) else value for key, value in kwargs.items()})


def has_group_norm(block: nn.Module) -> bool:
    """Whether ``block`` holds a GroupNorm: its inputs stay in the default layout, because torch 2.13's CPU
    GroupNorm backward crashes (a segmentation fault) on a channels-last input that takes no gradient."""
    return any(isinstance(module, nn.GroupNorm) for module in block.modules())


def model_call_options(model: nn.Module) -> dict:
    """Keyword arguments that switch off caches for models whose forward accepts them."""
    try:
        names = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return {}
    return {"use_cache": False} if "use_cache" in names else {}


def replayer(block: nn.Module, output: torch.Tensor | None, output_format: int | None):
    """A stand-in for ``block`` of an earlier stack: returns its input, or ``output`` (that stack's final
    hidden states) when given, in the block's output format; computes nothing."""
    hidden_name = hidden_parameter(block.forward)

    def replay(*args, **kwargs):
        hidden, _, _ = split_hidden(args, kwargs, hidden_name)
        result = hidden if output is None else output
        return result if output_format is None else (result, *([None] * (output_format - 1)))

    return replay


def capture_block_inputs(model: nn.Module, plan: BlockPlan, batch: dict[str, Any],
                         first_block_params: dict[str, torch.Tensor] | None = None, *, stack: int = 0,
                         replay: dict[int, torch.Tensor] | None = None,
                         replay_formats: dict[int, int | None] | None = None,
                         run_to_end: bool = False, known_format: int | None | str = "unknown") -> BlockInputs:
    """Run ``model(**batch)`` with recorders in place of the blocks of ``stack``; return what they received.

    ``first_block_params`` are weights for the one real call of the stack's first block (which teaches
    the recorders the blocks' output format); pass them when the template's blocks live on the meta
    device. For ``stack > 0``, ``replay[j]`` is stack ``j``'s final hidden states for this batch and
    stream and ``replay_formats[j]`` its blocks' output format.

    The pass stops at the stack's last block, unless ``run_to_end`` (for the last stack, once per run):
    then the model runs on to its end, so a block it calls again (ALBERT's one shared layer, run once
    per layer) is seen and refused instead of being merged as if it ran once.

    ``known_format`` is the blocks' output format an earlier batch taught (``BlockInputs.output_format``).
    When it says the block returns its hidden states alone (a tensor or a 1-tuple), the real call is
    skipped: it would hand on nothing and cost one block forward per batch and stream (2.6 s of a
    glue8-minilm merge). Blocks with more outputs are still called, since what they hand on (T5's
    position bias) depends on the batch.
    """
    indices = plan.stack_blocks(stack)
    blocks = [model.get_submodule(plan.blocks[index]) for index in indices]
    earlier = []
    for previous in range(stack):
        for index in plan.stack_blocks(previous):
            module = model.get_submodule(plan.blocks[index])
            last = index == plan.stack_blocks(previous)[-1]
            module.forward = replayer(module, replay[previous] if last else None, replay_formats[previous])
            earlier.append(module)
    calls: list[tuple[int, torch.Tensor, tuple, dict]] = []
    output_format: list[int | None] = []
    first_outputs: list[Any] = []          # the first block's outputs after the hidden states
    reached_end: list[bool] = []           # run_to_end: the last block was called

    def recorder(index: int, block: nn.Module):
        real_forward = block.forward
        hidden_name = hidden_parameter(real_forward)

        def record(*args, **kwargs):
            hidden, rest, other = split_hidden(args, kwargs, hidden_name)
            calls.append((index, hidden, *without_caches(rest, other)))
            if not output_format and known_format in (None, 1):
                output_format.append(known_format)
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
                if isinstance(real, Mapping):
                    raise BlockPlanError(
                        f"{type(block).__name__} returns a dict ({sorted(real)[:4]}), not its hidden states or a "
                        "tuple starting with them; the engine streams each block's first output into the next, "
                        "so this family's blocks cannot be streamed (data-free methods merge it)")
                output_format.append(None if isinstance(real, torch.Tensor) else len(tuple(real)))
                first_outputs.extend(tuple(real)[1:] if output_format[0] is not None else ())
            if reached_end:
                raise _StopForward           # a block called again after the last: refused below
            if index == len(blocks) - 1:
                if not run_to_end:
                    raise _StopForward
                reached_end.append(True)
            if output_format[0] is None:
                return hidden
            # Every later block hands on the first block's extra outputs, as blocks that pass on what
            # they received do (T5's position bias); the engine refreshes them per stream.
            return (hidden, *first_outputs)

        return record

    for index, block in enumerate(blocks):
        block.forward = recorder(index, block)
    try:
        with torch.no_grad():
            model(**batch, **model_call_options(model))
    except _StopForward:
        pass
    except Exception:
        if not reached_end:
            raise
        # What follows the last block ran on recorded (not computed) hidden states and may fail on them;
        # only whether a block was called again matters here.
    finally:
        for block in [*blocks, *earlier]:
            del block.forward
    order = [index for index, *_ in calls]
    if order != list(range(len(blocks))):
        raise BlockPlanError(
            f"{type(model).__name__}'s blocks were not called once each in plan order (calls: "
            f"{order[:12]} for {len(blocks)} blocks): the engine needs blocks that run one after another, "
            "each output feeding the next. Correct the block list with a block_plan override.")
    check_chain(model, plan, indices, [hidden for _, hidden, _, _ in calls])
    handed_on = {position + 1: item for position, item in enumerate(first_outputs) if isinstance(item, torch.Tensor)}
    calls = [(index, hidden, *replace_carried((rest, other), handed_on if index > 0 else {}))
             for index, hidden, rest, other in calls]
    carried = sorted(set().union(*(carried_positions((rest, other)) for _, _, rest, other in calls)))
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
    return BlockInputs(calls[0][1], extras, extra_index, output_format[0], tuple(carried))
