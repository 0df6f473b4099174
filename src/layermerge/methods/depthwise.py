"""A faster weight gradient for large depthwise convolutions on the CPU, while coefficients are trained.

oneDNN's weight gradient of a depthwise convolution with a 5 × 5 kernel took 2–8 ms per call on this
project's CPU where the forward took 0.2–0.3 ms, nearly whatever the spatial size (EfficientNet's late
blocks: docs/BENCHMARKS.md, "ProDistill, faster"). The gradient is a sum over the kernel's k² offsets of
the output gradient times the shifted input, which costs in proportion to the output positions: with
at most ``SMALL_OUTPUT`` of them per image it was 1.8–9× faster than oneDNN's, with more it was slower.
A 3 × 3 kernel over a 2 × 2 output (Lite0's last block, 1,152 channels, 64 images) took oneDNN 6.4 ms
and the offset sum 1.4 ms; over 4 × 4 oneDNN's was the faster (0.4 against 2.4 ms), hence
``TINY_OUTPUT`` for kernels below 5 × 5. ``faster_depthwise()`` routes exactly those convolutions
through ``DepthwiseConv2d`` (same forward; the input gradient still oneDNN's) and leaves every other
call alone. Deterministic: a fixed order of sums.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

SMALL_OUTPUT = 16          # output positions per image (e.g. 4 × 4) up to which the offset sum is used
LARGE_KERNEL = 25          # kernel positions (5 × 5) from which oneDNN's weight gradient was slow
TINY_OUTPUT = 4            # output positions (2 × 2) up to which it was slow for any kernel (3 × 3 too)


def _pair(value) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else tuple(value)


class DepthwiseConv2d(torch.autograd.Function):
    """``F.conv2d`` with ``groups == channels`` and one filter per channel, whose backward forms the
    weight gradient as Σ over kernel offsets of (output gradient × shifted input)."""

    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding, groups):
        ctx.save_for_backward(x, weight)
        ctx.stride, ctx.padding, ctx.groups, ctx.has_bias = stride, padding, groups, bias is not None
        return F.conv2d(x, weight, bias, stride, padding, 1, groups)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        stride, padding = ctx.stride, ctx.padding
        grad_x = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.ops.aten.convolution_backward(
                grad, x, weight, None, list(stride), list(padding), [1, 1], False, [0, 0], ctx.groups,
                [True, False, False])[0]
        if ctx.needs_input_grad[1]:
            padded = F.pad(x, (padding[1], padding[1], padding[0], padding[0])) if any(padding) else x
            rows, cols = grad.shape[-2:]
            height, width = weight.shape[-2:]
            grad_weight = torch.empty(weight.shape[0], height, width, dtype=grad.dtype, device=grad.device)
            for row in range(height):
                for col in range(width):
                    window = padded[:, :, row:row + stride[0] * (rows - 1) + 1:stride[0],
                                    col:col + stride[1] * (cols - 1) + 1:stride[1]]
                    grad_weight[:, row, col] = (grad * window).sum((0, 2, 3))
            grad_weight = grad_weight.reshape(weight.shape).to(weight.dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = grad.sum((0, 2, 3))
        return grad_x, grad_weight, grad_bias, None, None, None


def takes_offset_sum(x: torch.Tensor, weight: torch.Tensor, stride, padding, dilation, groups: int) -> bool:
    """Whether this ``conv2d`` call is one whose weight gradient the offset sum makes faster."""
    if x.dim() != 4 or x.dtype != torch.float32 or not weight.requires_grad or _pair(dilation) != (1, 1):
        return False
    if isinstance(padding, str) or groups != x.shape[1] or weight.shape[:2] != (groups, 1):
        return False
    height, width = weight.shape[-2:]
    (sh, sw), (ph, pw) = _pair(stride), _pair(padding)
    rows = (x.shape[2] + 2 * ph - height) // sh + 1
    cols = (x.shape[3] + 2 * pw - width) // sw + 1
    if height * width < LARGE_KERNEL:
        return height * width > 1 and rows * cols <= TINY_OUTPUT
    return rows * cols <= SMALL_OUTPUT


class _DepthwiseMode(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.conv2d or func is torch.conv2d:
            names = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
            call = dict(zip(names, args), **kwargs)
            call = {"bias": None, "stride": 1, "padding": 0, "dilation": 1, "groups": 1, **call}
            if takes_offset_sum(call["input"], call["weight"], call["stride"], call["padding"], call["dilation"],
                                call["groups"]):
                return DepthwiseConv2d.apply(call["input"], call["weight"], call["bias"], _pair(call["stride"]),
                                             _pair(call["padding"]), call["groups"])
        return func(*args, **kwargs)


def faster_depthwise(device: torch.device):
    """A context in which large depthwise convolutions with few output positions take the offset-sum
    weight gradient (CPU only; elsewhere, and for every other call, nothing changes)."""
    return _DepthwiseMode() if device.type == "cpu" else contextlib.nullcontext()
