"""Batch norms folded into the convolutions before them (and zero paddings into the convolutions
after them), for training a CNN block's coefficients.

In eval mode a batch norm after a convolution is a per-channel affine map, so the pair is one
convolution with weight W·s and bias β − μ·s (+ b·s), s = γ / √(var + ε). Training λ through the
pair as written pays the batch norm's forward and backward over every activation at every call;
the folded form pays a weight-sized product once per step (``FoldedBlock.weights``) and nothing
per activation. On EfficientNet-Lite0 the batch norms were 13 % of a training pass, and folding
them took a forward + backward of its sixteen blocks from 551 to 432 ms (64 examples, one thread;
``benchmarks/prodistill_kernels.py``, docs/BENCHMARKS.md, "ProDistill, faster").

The block is traced with ``torch.fx`` for the extra arguments it is called with (non-tensor ones
only), and each batch norm (``nn.BatchNorm1d/2d/3d`` in eval mode with running statistics) whose
input is a convolution used by nothing else is folded into it; the folded weights enter the traced
graph under new names, so ``functional_call`` supplies them like any weight. A zero padding that
pads both sides of each spatial dimension equally (``nn.ZeroPad2d``, ``F.pad``) and feeds only a
convolution becomes that convolution's own padding: the same sums, without the padded copy of the
activations forward and its slice backward (EfficientNet-Lite0 pads explicitly before each depthwise
convolution; its stride-2 pads are one-sided and stay). ``fold_block`` returns
None when the block cannot be traced or has nothing to fold; the caller then checks the folded
block once against the block itself (``FoldedBlock.matches``) before training with it. The merged
weights themselves are never folded: only the training passes use this form.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx, nn

from layermerge.engine import call_block
from layermerge.engine.tree import leaves

BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
PADDINGS = (nn.ConstantPad1d, nn.ConstantPad2d, nn.ConstantPad3d)      # nn.ZeroPadNd are subclasses
CONVOLUTIONS = {nn.Conv1d: F.conv1d, nn.Conv2d: F.conv2d, nn.Conv3d: F.conv3d}
CONVOLUTION_FUNCTIONS = (F.conv1d, F.conv2d, F.conv3d)      # the same objects as torch.conv1d/2d/3d
MATCH_TOLERANCE = 1e-4          # largest |folded - block| relative to the largest |output| (float32)


@dataclass(frozen=True)
class Fold:
    """One convolution and the batch norm folded into it, by the block's tensor names."""

    weight: str                  # the convolution's weight
    bias: str | None             # its bias, if any
    norm: str                    # the batch norm's module path
    eps: float
    folded_weight: str           # the names the traced graph reads the folded tensors from
    folded_bias: str


class FoldedBlock:
    """A traced copy of a block with its conv → batch-norm pairs folded (see the module)."""

    def __init__(self, block: nn.Module, module: fx.GraphModule, folds: list[Fold], paddings: int = 0):
        self.block = block
        self.module = module
        self.folds = folds
        self.paddings = paddings          # zero paddings moved into the convolution after them
        self.own = {**dict(block.named_parameters()), **dict(block.named_buffers())}

    def weights(self, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``weights`` (the block's, by name; missing ones are the block's own) with the folded tensors
        added: differentiable in the convolution and batch-norm weights they come from."""
        def tensor(name):
            return weights[name] if name in weights else self.own[name]

        folded = dict(weights)
        for fold in self.folds:
            gamma, beta = tensor(f"{fold.norm}.weight"), tensor(f"{fold.norm}.bias")
            mean, var = tensor(f"{fold.norm}.running_mean"), tensor(f"{fold.norm}.running_var")
            scale = gamma * torch.rsqrt(var + fold.eps)
            weight = tensor(fold.weight)
            folded[fold.folded_weight] = weight * scale.reshape(-1, *([1] * (weight.dim() - 1)))
            shift = beta - mean * scale
            folded[fold.folded_bias] = shift if fold.bias is None else shift + tensor(fold.bias) * scale
        return folded

    def run(self, folded_weights: dict[str, torch.Tensor], hidden: torch.Tensor,
            dtype: torch.dtype | None = None) -> torch.Tensor:
        """The folded block's output (``folded_weights`` from ``weights``), in the block's own layout; the
        extra arguments it was traced for are part of it."""
        return call_block(self.module, folded_weights, hidden, ((), {}), dtype, layout_of=self.block)

    def matches(self, weights: dict[str, torch.Tensor], hidden: torch.Tensor, extra: tuple[tuple, dict],
                dtype: torch.dtype | None = None) -> bool:
        """Whether the folded block gives the block's output on ``hidden`` (no grad)."""
        with torch.no_grad():
            expected = call_block(self.block, weights, hidden, extra, dtype).float()
            folded = self.run(self.weights(weights), hidden, dtype).float()
        scale = expected.abs().max().clamp_min(1e-12)
        return bool((folded - expected).abs().max() <= MATCH_TOLERANCE * scale)


def fold_block(block: nn.Module, extra: tuple[tuple, dict], paddings: bool = True) -> FoldedBlock | None:
    """The block with its conv → batch-norm pairs folded (and, with ``paddings``, its symmetric zero
    paddings moved into the convolutions), traced for the extra arguments ``extra`` (positional,
    keyword) it is called with; None when there is nothing to fold, an extra argument is a tensor, or
    the block cannot be traced."""
    if not any(isinstance(module, BATCH_NORMS + PADDINGS) for module in block.modules()):
        return None
    if any(isinstance(leaf, torch.Tensor) for leaf in leaves(extra)):
        return None
    args, kwargs = extra
    try:
        bound = inspect.signature(block.forward).bind(None, *args, **kwargs)
        bound.apply_defaults()
        first = next(iter(bound.arguments))
        concrete = {name: value for name, value in bound.arguments.items() if name != first}
        traced = fx.symbolic_trace(block, concrete_args=concrete)
    except Exception:                       # noqa: BLE001 - any tracing failure means: train the block as is
        return None
    modules = dict(traced.named_modules())
    folds: list[Fold] = []
    graph = traced.graph
    for node in list(graph.nodes):
        fold = _fold_node(graph, node, modules, traced, len(folds))
        if fold is not None:
            folds.append(fold)
    moved = sum(_fold_padding(graph, node, modules) for node in list(graph.nodes)) if paddings else 0
    if not folds and not moved:
        return None
    for node in list(graph.nodes):
        _clamp_in_place(graph, node, modules)
    _drop_traced_arguments(graph)
    traced.recompile()
    return FoldedBlock(block, traced, folds, moved)


def _drop_traced_arguments(graph: fx.Graph) -> None:
    """Leave the hidden states as the traced block's only input: the extra arguments it was traced
    for are constants of the graph (``fx`` keeps a placeholder and an equality assertion for each;
    callers guarantee the values, ``ProDistill`` by checking every batch's arguments)."""
    for node in list(graph.nodes):
        if node.op == "call_function" and node.target is torch._assert:
            graph.erase_node(node)
    graph.eliminate_dead_code()
    placeholders = [node for node in graph.nodes if node.op == "placeholder"]
    for node in placeholders[1:]:
        if not node.users:
            graph.erase_node(node)


def _fold_node(graph: fx.Graph, node: fx.Node, modules: dict, traced: fx.GraphModule, number: int) -> Fold | None:
    """Fold the batch norm at ``node`` into the convolution feeding it, if that is a foldable pair."""
    if node.op != "call_module" or not isinstance(modules.get(node.target), BATCH_NORMS):
        return None
    norm = modules[node.target]
    if norm.training or not norm.affine or not norm.track_running_stats or norm.running_mean is None:
        return None
    if len(node.args) != 1 or node.kwargs or not isinstance(node.args[0], fx.Node):
        return None
    conv = node.args[0]
    if len(conv.users) != 1:
        return None
    call = _convolution_call(conv, modules)
    if call is None:
        return None
    function, hidden, weight, bias, options = call
    folded_weight, folded_bias = f"layermerge_fold{number}_weight", f"layermerge_fold{number}_bias"
    channels = norm.num_features
    traced.register_buffer(folded_weight, torch.empty(0), persistent=False)
    traced.register_buffer(folded_bias, torch.empty(channels), persistent=False)
    with graph.inserting_before(node):
        new = graph.call_function(function, (hidden, graph.get_attr(folded_weight), graph.get_attr(folded_bias),
                                             *options))
    node.replace_all_uses_with(new)
    graph.erase_node(node)
    graph.erase_node(conv)
    return Fold(weight, bias, node.target, norm.eps, folded_weight, folded_bias)


def _fold_padding(graph: fx.Graph, conv: fx.Node, modules: dict) -> bool:
    """Move a symmetric zero padding whose only user is the convolution at ``conv`` into the
    convolution's own padding (one pass over the input saved each way); whether it did."""
    call = _convolution_call(conv, modules)
    if call is None or not isinstance(call[1], fx.Node) or len(call[1].users) != 1:
        return False
    function, pad, weight, bias, (stride, padding, dilation, groups) = call
    spatial = {torch.conv1d: 1, torch.conv2d: 2, torch.conv3d: 3}[function]
    found = _symmetric_zero_padding(pad, modules, spatial)
    if found is None or isinstance(padding, str):
        return False
    source, widths = found
    own = [padding] * spatial if isinstance(padding, int) else list(padding)
    if len(own) != spatial:
        return False
    with graph.inserting_before(conv):
        new = graph.call_function(function, (source, graph.get_attr(weight),
                                             None if bias is None else graph.get_attr(bias), stride,
                                             tuple(o + w for o, w in zip(own, widths)), dilation, groups))
    conv.replace_all_uses_with(new)
    graph.erase_node(conv)
    graph.erase_node(pad)
    return True


def _clamp_in_place(graph: fx.Graph, node: fx.Node, modules: dict) -> None:
    """Make a ReLU or ReLU6 whose input is a convolution used by nothing else work in place: the
    convolution's backward does not read its output, the clamp's backward reads only its own output,
    so autograd gets the same gradients without a second activation-sized tensor."""
    bounds = _clamp_bounds(node, modules)
    if bounds is None or not isinstance(node.args[0], fx.Node) or len(node.args[0].users) != 1:
        return
    if _convolution_call(node.args[0], modules) is None:
        return
    with graph.inserting_before(node):
        new = graph.call_function(F.hardtanh_, (node.args[0], *bounds))
    node.replace_all_uses_with(new)
    graph.erase_node(node)


def _clamp_bounds(node: fx.Node, modules: dict) -> tuple[float, float] | None:
    """(low, high) of a ReLU / ReLU6 / Hardtanh node applied out of place to one input, else None."""
    if node.op == "call_module":
        module = modules.get(node.target)
        if type(module) is nn.ReLU6 and not module.inplace:
            bounds = (0.0, 6.0)
        elif type(module) is nn.Hardtanh and not module.inplace:
            bounds = (module.min_val, module.max_val)
        elif type(module) is nn.ReLU and not module.inplace:
            bounds = (0.0, float("inf"))
        else:
            return None
        return bounds if len(node.args) == 1 and not node.kwargs else None
    if node.op == "call_function" and node.target in (F.relu6, F.relu, torch.relu) and len(node.args) == 1:
        if node.kwargs.get("inplace", False):
            return None
        return (0.0, 6.0) if node.target is F.relu6 else (0.0, float("inf"))
    return None


def _symmetric_zero_padding(pad: fx.Node, modules: dict, spatial: int) -> tuple[fx.Node, list[int]] | None:
    """(the padded node, the widths per dimension, first spatial dimension first) of a zero padding
    node that pads both sides of each of the last ``spatial`` dimensions equally, else None."""
    if pad.op == "call_module" and isinstance(modules.get(pad.target), PADDINGS):
        module = modules[pad.target]
        widths, value, source = list(module.padding), module.value, pad.args
    elif pad.op == "call_function" and pad.target is F.pad:
        call = {"mode": "constant", "value": None, **dict(zip(("input", "pad", "mode", "value"), pad.args)),
                **pad.kwargs}
        if call["mode"] != "constant":
            return None
        widths, value, source = call["pad"], call["value"] or 0, (call["input"],)
    else:
        return None
    if (value != 0 or len(source) != 1 or not isinstance(source[0], fx.Node) or not isinstance(widths, (list, tuple))
            or len(widths) > 2 * spatial or len(widths) % 2):
        return None
    pairs = [tuple(widths[i:i + 2]) for i in range(0, len(widths), 2)]       # last dimension first
    if any(not isinstance(a, int) or a != b or a < 0 for a, b in pairs):
        return None
    return source[0], [0] * (spatial - len(pairs)) + [a for a, _ in reversed(pairs)]


def _convolution_call(conv: fx.Node, modules: dict):
    """(function, input, weight name, bias name or None, (stride, padding, dilation, groups)) of a
    convolution node whose weight (and bias) are the block's own tensors, else None."""
    if conv.op == "call_module":
        module = modules.get(conv.target)
        if type(module) not in CONVOLUTIONS or module.padding_mode != "zeros" or len(conv.args) != 1 or conv.kwargs:
            return None
        bias = f"{conv.target}.bias" if module.bias is not None else None
        return (CONVOLUTIONS[type(module)], conv.args[0], f"{conv.target}.weight", bias,
                (module.stride, module.padding, module.dilation, module.groups))
    if conv.op != "call_function" or conv.target not in CONVOLUTION_FUNCTIONS:
        return None
    names = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
    call = {"bias": None, "stride": 1, "padding": 0, "dilation": 1, "groups": 1, **dict(zip(names, conv.args)),
            **conv.kwargs}
    weight, bias = call["weight"], call["bias"]
    if not (isinstance(weight, fx.Node) and weight.op == "get_attr"):
        return None
    if bias is not None and not (isinstance(bias, fx.Node) and bias.op == "get_attr"):
        return None
    return (conv.target, call["input"], weight.target, None if bias is None else bias.target,
            (call["stride"], call["padding"], call["dilation"], call["groups"]))
