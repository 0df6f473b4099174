"""The precision block forwards run in: float32, or bfloat16 matmuls by autocast where that is faster.

Training (``methods.fitting``) runs the merged block's forward and backward in it, and the engine
computes the expert outputs (the targets) in whatever a method's ``expert_output_precision`` asks
for. ``auto`` picks bfloat16 where the device multiplies it natively and the block has no
convolutions.
"""

from __future__ import annotations

import contextlib
import functools

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from layermerge.engine.capture import has_convolutions

PRECISIONS = ("auto", "float32", "bfloat16")


@functools.cache
def native_bfloat16(device: torch.device) -> bool:
    """Whether ``device`` multiplies bfloat16 matrices in hardware: a CUDA GPU that says so, or a CPU
    with AMX-BF16 or AVX512-BF16 (Linux, read from /proc/cpuinfo). Elsewhere bfloat16 is emulated and
    slower than float32."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    try:
        with open("/proc/cpuinfo") as handle:
            flags = next((line for line in handle if line.startswith("flags")), "").split()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def resolve_precision(precision: str, device: torch.device, module: nn.Module | None = None) -> str:
    """``auto``: bfloat16 where the device has native bfloat16 matmuls and ``module`` (the block) has
    no convolutions, else float32. oneDNN's bfloat16 convolutions were slower than its float32 ones on
    this project's AMX CPU (docs/BENCHMARKS.md), while its bfloat16 matmuls were ten times faster."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "auto":
        convolutions = module is not None and has_convolutions(module)
        return "bfloat16" if native_bfloat16(device) and not convolutions else "float32"
    return precision


class Float32Attention(TorchFunctionMode):
    """``scaled_dot_product_attention`` in float32, outside autocast (CPU training under bfloat16).

    oneDNN's bfloat16 attention was the slowest way on this project's CPU: forward + backward of
    64 × 12 heads × 72 tokens took 87.7 ms by the matmul-softmax path and 263.4 ms by the fused
    kernel in bfloat16, 59.5 ms by the fused (flash) kernel in float32 (docs/BENCHMARKS.md). The
    block's linear layers stay in bfloat16; attention's inputs are cast up, its output goes on as
    float32 and the next matmul casts it down again.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not F.scaled_dot_product_attention:
            return func(*args, **kwargs)
        args = tuple(t.float() if isinstance(t, torch.Tensor) and t.is_floating_point() else t for t in args)
        kwargs = {key: value.float() if isinstance(value, torch.Tensor) and value.is_floating_point() else value
                  for key, value in kwargs.items()}
        with torch.autocast("cpu", enabled=False):
            return func(*args, **kwargs)


def matmul_precision(precision: str, device: torch.device):
    """A context for block forwards: float32 as is, or bfloat16 matmuls by autocast.

    Autocast keeps normalisation, softmax and reductions in float32 and hands float32 gradients back
    to λ. On the CPU the attention runs in float32 (``Float32Attention``): oneDNN's bfloat16 matmuls
    are fast (AMX), its bfloat16 attention is not (measured in docs/BENCHMARKS.md).
    """
    if resolve_precision(precision, device) == "float32":
        return contextlib.nullcontext()
    stack = contextlib.ExitStack()
    stack.enter_context(torch.autocast(device.type, dtype=torch.bfloat16))
    if device.type == "cpu":
        stack.enter_context(Float32Attention())
    return stack
