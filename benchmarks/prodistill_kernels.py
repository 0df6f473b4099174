"""Pieces of a ProDistill step timed in isolation, to decide what to change next (issue 15).

    .venv/bin/python benchmarks/prodistill_kernels.py --threads 1 --json benchmarks/results/prodistill_kernels.json

* ``lambda``: the λ-sized work of one step for MiniLM's layer shapes and eight tasks: today's path
  (``coefficients.combine`` for W(λ), its backward from a given ∂L/∂W, fused Adam) against one
  ``torch.compile``d function doing τ ⊙ ∂L/∂W, Adam and the next W(λ) (static shapes; the first call's
  compilation time reported apart).
* ``attention``: ``scaled_dot_product_attention`` forward + backward on 64 × 12 heads × 72 tokens × 32
  with a padding mask, bfloat16 and float32, math path and flash kernel.
* ``depthwise``: forward + backward of each EfficientNet-Lite0 block (random weights, batch 16 at
  64 × 64, channels-last) with oneDNN's weight gradient and with ``methods.depthwise.faster_depthwise``.
* ``convnet``: where a training pass of all sixteen Lite0 blocks spends its time, by kind of operation
  (``torch.profiler``, each block's weights built from leaf tensors as W(λ) is, ``faster_depthwise``
  on), for 64 examples as four calls of 16 with the batch norms as they are (before stacking and
  folding) and as one call with them folded (now): convolution forward and backward, batch norm,
  ReLU6, the explicit zero padding the model does before each depthwise convolution ("same"
  padding), and the rest.
* ``stacking``: forward + backward of 64 examples through each Lite0 block as four calls of 16 and as
  stacked calls capped at 2, 4 and 8 MiB of input, and uncapped (``methods.stacking``).
* ``folding``: forward + backward of 64 examples in one call through each Lite0 block as it is and
  with its batch norms folded into the convolutions (``methods.folding``).
* ``padding``: the sixteen blocks' pass (64 examples, one call, batch norms folded) with the model's
  symmetric zero paddings as they are and moved into the depthwise convolutions (``fold_block``'s
  ``paddings``), alternating.
* ``allocator``: the same pass (everything folded) with glibc's malloc as it is, then inside
  ``layermerge.allocator.keep_freed_memory``, then after it: milliseconds and minor page faults
  per pass.
* ``calls``: what one more block call costs against one more token position, for a MiniLM-shaped BERT
  layer (random weights, W = θ + δ ⊙ τ built from leaves as W(λ) is) trained in bfloat16: a step of
  one call against eight calls of one 8-token example (ms per extra call), and 16 examples of 64
  against 16 of 32 tokens in one call (ms per extra position). The ratio is ``batching.CALL_COST``'s
  measure.

Median of repeated calls, milliseconds; the numbers vary with the machine's load, so compare only
within one run. ``--json`` keeps the parts of an earlier run that this run does not measure.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))


def median_ms(function, repeats: int = 12, warmup: int = 3) -> float:
    durations = []
    for call in range(repeats + warmup):
        started = time.perf_counter()
        function()
        if call >= warmup:
            durations.append(time.perf_counter() - started)
    return round(1000 * statistics.median(durations), 2)


def lambda_part(tasks: int = 8) -> dict:
    from layermerge.methods.coefficients import combine

    shapes = [(384, 384)] * 4 + [(384,)] * 6 + [(1536, 384), (1536,), (384, 1536), (384,)]
    generator = torch.Generator().manual_seed(0)
    vectors = [torch.randn(tasks, *shape, generator=generator) * 0.01 for shape in shapes]
    starts = [torch.randn(*shape, generator=generator) for shape in shapes]
    grads = [torch.randn(*shape, generator=generator) for shape in shapes]

    deltas = [torch.zeros(tasks, *shape, requires_grad=True) for shape in shapes]
    optimizer = torch.optim.Adam(deltas, lr=0.01, fused=True)

    def today():
        optimizer.zero_grad(set_to_none=True)
        weights = [combine(start, delta, vector) for start, delta, vector in zip(starts, deltas, vectors)]
        torch.autograd.backward(weights, grads)
        optimizer.step()

    def update(delta, first, second, vector, grad, start, lr, bias1, bias2_root):
        gradient = vector * grad
        first.mul_(0.9).add_(gradient, alpha=0.1)
        second.mul_(0.999).addcmul_(gradient, gradient, value=0.001)
        delta.addcdiv_(first, (second.sqrt() / bias2_root).add_(1e-8), value=-lr / bias1)
        return start + (delta * vector).sum(0)

    flat = [(torch.zeros(tasks, vector[0].numel()), vector.reshape(tasks, -1), grad.reshape(-1), start.reshape(-1))
            for vector, grad, start in zip(vectors, grads, starts)]
    moments = [(torch.zeros_like(delta), torch.zeros_like(delta)) for delta, *_ in flat]
    compiled = torch.compile(update, dynamic=False)
    step = [0]

    def fused():
        step[0] += 1
        bias1 = torch.tensor(1 - 0.9 ** step[0])
        bias2_root = torch.tensor((1 - 0.999 ** step[0]) ** 0.5)
        for (delta, vector, grad, start), (first, second) in zip(flat, moments):
            compiled(delta, first, second, vector, grad, start, 0.01, bias1, bias2_root)

    started = time.perf_counter()
    fused()
    compile_s = round(time.perf_counter() - started, 2)
    return {"tasks": tasks, "today_ms": median_ms(today), "compiled_ms": median_ms(fused),
            "compile_first_call_s": compile_s}


def attention_part(batch: int = 64, length: int = 72) -> dict:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    generator = torch.Generator().manual_seed(0)
    lengths = torch.randint(length // 2, length + 1, (batch,), generator=generator)
    mask = (torch.arange(length)[None] < lengths[:, None])[:, None, None, :].expand(batch, 1, length, length)
    out = {}
    for dtype in (torch.bfloat16, torch.float32):
        for name, backend in (("math", SDPBackend.MATH), ("flash", SDPBackend.FLASH_ATTENTION)):
            q, k, v = (torch.randn(batch, 12, length, 32, generator=generator, dtype=dtype).requires_grad_()
                       for _ in range(3))

            def call(q=q, k=k, v=v, backend=backend):
                with sdpa_kernel([backend]):
                    result = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
                result.float().pow(2).sum().backward()

            out[f"{str(dtype).replace('torch.', '')} {name}"] = median_ms(call)
    return {"shape": f"{batch} x 12 heads x {length} tokens x 32", "forward_backward_ms": out}


def lite0_inputs(batch: int):
    """EfficientNet-Lite0 (random weights, eval mode) and each block's input, channels-last."""
    from efficientnet_lite_pytorch import EfficientNet

    model = EfficientNet.from_name("efficientnet-lite0").eval()
    inputs, hidden = [], torch.randn(batch, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        hidden = model._swish(model._bn0(model._conv_stem(hidden)))
        for block in model._blocks:
            inputs.append(hidden.contiguous(memory_format=torch.channels_last))
            hidden = block(hidden)
    return model, inputs


def depthwise_part() -> dict:
    from layermerge.methods.depthwise import faster_depthwise

    model, inputs = lite0_inputs(16)
    per_block = {}
    for index, block in enumerate(model._blocks):
        params = {name: p.detach().clone().requires_grad_() for name, p in block.named_parameters()}
        times = {}
        for label, offset_sum in (("oneDNN", False), ("offset sum", True)):
            def call(block=block, params=params, hidden=inputs[index], offset_sum=offset_sum):
                with faster_depthwise(torch.device("cpu")) if offset_sum else torch.enable_grad():
                    output = torch.func.functional_call(block, params, (hidden,))
                output.pow(2).sum().backward()

            times[label] = median_ms(call, repeats=8, warmup=2)
        per_block[f"block {index} {tuple(inputs[index].shape)}"] = times
    totals = {label: round(sum(times[label] for times in per_block.values()), 1) for label in ("oneDNN", "offset sum")}
    return {"model": "EfficientNet-Lite0, batch 16 at 64x64, channels-last", "forward_backward_ms": per_block,
            "total_ms": totals}


def lite0_training_pass(block, params: dict, parts: list[torch.Tensor], folded=None):
    """One forward + backward of ``parts`` (separate calls) through ``block`` (or its folded form), the
    weights built from leaf tensors as W(λ) is, under ``faster_depthwise`` as in training."""
    from layermerge.methods.depthwise import faster_depthwise

    def call():
        weights = {name: leaf * 1.0 for name, leaf in params.items()}
        if folded is not None:
            weights = folded.weights(weights)
        with faster_depthwise(torch.device("cpu")):
            outputs = [folded.run(weights, part) if folded is not None
                       else torch.func.functional_call(block, weights, (part,)) for part in parts]
            loss = sum(output.pow(2).sum() for output in outputs)
        loss.backward()
    return call


def stacking_part(examples: int = 64, cached: int = 16) -> dict:
    model, inputs = lite0_inputs(examples)
    caps = {f"{examples // cached} x {cached}": 0, "2 MiB": 2 << 20, "4 MiB": 4 << 20, "8 MiB": 8 << 20,
            "one call": 1 << 62}
    per_block, totals = {}, dict.fromkeys(caps, 0.0)
    for index, block in enumerate(model._blocks):
        params = {name: p.detach().clone().requires_grad_() for name, p in block.named_parameters()}
        hidden, times = inputs[index], {}
        batch_bytes = hidden[:cached].numel() * hidden.element_size()
        for label, cap in caps.items():
            rows = cached
            while rows < examples and batch_bytes * (2 * rows // cached) <= cap:
                rows *= 2
            parts = [hidden[start:start + rows].contiguous(memory_format=torch.channels_last)
                     for start in range(0, examples, rows)]
            times[label] = median_ms(lite0_training_pass(block, params, parts), repeats=5, warmup=2)
            totals[label] += times[label]
        per_block[f"block {index} {tuple(hidden.shape)}"] = times
    return {"model": f"EfficientNet-Lite0, {examples} examples at 64x64 per step, cached batches of {cached}",
            "forward_backward_ms": per_block, "total_ms": {label: round(value, 1) for label, value in totals.items()}}


def folding_part(examples: int = 64) -> dict:
    from layermerge.methods.folding import fold_block

    model, inputs = lite0_inputs(examples)
    per_block, totals = {}, {"as is": 0.0, "folded": 0.0}
    for index, block in enumerate(model._blocks):
        params = {name: p.detach().clone().requires_grad_() for name, p in block.named_parameters()}
        folded = fold_block(block, ((), {}))
        hidden = [inputs[index]]
        times = {"as is": median_ms(lite0_training_pass(block, params, hidden), repeats=5, warmup=2),
                 "folded": median_ms(lite0_training_pass(block, params, hidden, folded), repeats=5, warmup=2),
                 "folds": len(folded.folds)}
        totals["as is"] += times["as is"]
        totals["folded"] += times["folded"]
        per_block[f"block {index} {tuple(inputs[index].shape)}"] = times
    return {"model": f"EfficientNet-Lite0, {examples} examples at 64x64 in one call", "forward_backward_ms": per_block,
            "total_ms": {label: round(value, 1) for label, value in totals.items()}}


def lite0_passes(examples: int, paddings: bool = True) -> list:
    """One training pass per Lite0 block (``lite0_training_pass``) over ``examples`` in one call, batch
    norms folded; symmetric zero paddings moved into the convolutions when ``paddings``."""
    from layermerge.methods.folding import fold_block

    model, inputs = lite0_inputs(examples)
    passes = []
    for block, hidden in zip(model._blocks, inputs):
        params = {name: p.detach().clone().requires_grad_() for name, p in block.named_parameters()}
        passes.append(lite0_training_pass(block, params, [hidden], fold_block(block, ((), {}), paddings=paddings)))
    return passes


def run_all(passes: list) -> tuple[float, int]:
    """Milliseconds and minor page faults of running every pass once."""
    import resource

    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    started = time.perf_counter()
    for one_pass in passes:
        one_pass()
    return 1000 * (time.perf_counter() - started), resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults


def padding_part(examples: int = 64, rounds: int = 9) -> dict:
    variants = {"paddings as they are": lite0_passes(examples, paddings=False),
                "paddings moved into the convolutions": lite0_passes(examples, paddings=True)}
    times = {label: [] for label in variants}
    for round_ in range(rounds + 2):
        for label, passes in variants.items():
            elapsed, _ = run_all(passes)
            if round_ >= 2:
                times[label].append(elapsed)
    return {"model": f"EfficientNet-Lite0, 16 blocks, {examples} examples at 64x64 in one call, batch norms folded",
            "pass_ms_median": {label: round(statistics.median(values), 1) for label, values in times.items()},
            "rounds": rounds}


def allocator_part(examples: int = 64, rounds: int = 9) -> dict:
    from layermerge.allocator import glibc, keep_freed_memory

    passes = lite0_passes(examples)

    def measure():
        runs = [run_all(passes) for _ in range(rounds + 2)][2:]
        return {"pass_ms_median": round(statistics.median(ms for ms, _ in runs), 1),
                "faults_per_pass_median": statistics.median(faults for _, faults in runs)}

    result = {"model": f"EfficientNet-Lite0, 16 blocks, {examples} examples at 64x64 in one call, all folded",
              "glibc": glibc() is not None, "glibc as it is": measure()}
    with keep_freed_memory():
        result["freed memory kept"] = measure()
    result["after (glibc's largest adaptive thresholds)"] = measure()
    return result


# Operations whose inclusive times never nest in one another, by kind (forward ATen ops, backward nodes).
CONVNET_KINDS = {
    "convolution forward": ("aten::convolution",),
    "convolution backward": ("ConvolutionBackward0", "DepthwiseConv2dBackward"),
    "batch norm forward": ("aten::batch_norm",),
    "batch norm backward": ("NativeBatchNormBackward0",),
    "ReLU6 forward": ("aten::hardtanh",),
    "ReLU6 backward": ("HardtanhBackward0",),
    "zero padding forward": ("aten::constant_pad_nd",),
    "zero padding backward": ("ConstantPadNdBackward0",),
}


def convnet_part(examples: int = 64, cached: int = 16, steps: int = 3) -> dict:
    """Where a training pass of Lite0's sixteen blocks spends its time, by kind of operation, before
    (four calls of 16, batch norms as they are) and now (one call of 64, batch norms folded)."""
    from torch.profiler import profile

    from layermerge.methods.folding import fold_block

    model, inputs = lite0_inputs(examples)
    result = {"model": f"EfficientNet-Lite0, 16 blocks, {examples} examples at 64x64 per step, channels-last, "
                       "float32"}
    for label, rows, fold in ((f"{examples // cached} calls of {cached}, as is", cached, False),
                              (f"one call of {examples}, folded", examples, True)):
        passes = []
        for block, hidden in zip(model._blocks, inputs):
            params = {name: p.detach().clone().requires_grad_() for name, p in block.named_parameters()}
            parts = [hidden[start:start + rows].contiguous(memory_format=torch.channels_last)
                     for start in range(0, examples, rows)]
            passes.append(lite0_training_pass(block, params, parts, fold_block(block, ((), {})) if fold else None))

        def step(passes=passes):
            for one_pass in passes:
                one_pass()

        for _ in range(2):
            step()
        with profile() as prof:
            started = time.perf_counter()
            for _ in range(steps):
                step()
            total_ms = 1000 * (time.perf_counter() - started) / steps
        inclusive = {event.key: event.cpu_time_total / 1000 / steps for event in prof.key_averages()}
        kinds = {kind: round(sum(inclusive.get(name, 0.0) for name in names), 1)
                 for kind, names in CONVNET_KINDS.items()}
        kinds["rest (W, loss, autograd, Python)"] = round(total_ms - sum(kinds.values()), 1)
        result[label] = {"step_ms_profiled": round(total_ms, 1), "by_kind_ms": kinds,
                         "share": {kind: round(value / total_ms, 3) for kind, value in kinds.items()}}
    return result


def calls_part(repeats: int = 15) -> dict:
    from torch.func import functional_call
    from transformers import BertConfig
    from transformers.models.bert.modeling_bert import BertLayer

    from layermerge.engine.precision import matmul_precision

    torch.manual_seed(0)
    layer = BertLayer(BertConfig(hidden_size=384, intermediate_size=1536, num_attention_heads=12,
                                 attn_implementation="sdpa")).eval()
    start = {name: tensor.detach() for name, tensor in layer.named_parameters()}
    vectors = {name: 0.01 * torch.randn_like(tensor) for name, tensor in start.items()}
    deltas = {name: torch.zeros_like(tensor, requires_grad=True) for name, tensor in start.items()}
    cpu = torch.device("cpu")
    generator = torch.Generator().manual_seed(1)

    def step(shapes):
        with matmul_precision("bfloat16", cpu):
            weights = {name: start[name] + deltas[name] * vectors[name] for name in start}
            loss = 0.0
            for examples, tokens in shapes:
                hidden = torch.randn(examples, tokens, 384, generator=generator)
                mask = torch.zeros(examples, 1, 1, tokens)
                output = functional_call(layer, weights, (hidden,), {"attention_mask": mask})
                output = output[0] if isinstance(output, tuple) else output
                loss = loss + output.float().pow(2).mean()
        loss.backward()

    one = median_ms(lambda: step([(1, 8)]), repeats)
    eight = median_ms(lambda: step([(1, 8)] * 8), repeats)
    short = median_ms(lambda: step([(16, 32)]), repeats)
    long = median_ms(lambda: step([(16, 64)]), repeats)
    out = {"ms per extra call": round((eight - one) / 7, 2),
           "ms per extra position": round((long - short) / (16 * 32), 4)}
    out["positions per call"] = round(out["ms per extra call"] / out["ms per extra position"], 1)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--parts",
                        default="lambda,attention,depthwise,convnet,stacking,folding,padding,allocator,calls")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    parts = {"lambda": lambda_part, "attention": attention_part, "depthwise": depthwise_part,
             "convnet": convnet_part, "stacking": stacking_part, "folding": folding_part, "padding": padding_part,
             "allocator": allocator_part, "calls": calls_part}
    result = {}
    if args.json is not None and args.json.exists():
        result = json.loads(args.json.read_text())
    result.update({"threads": args.threads, "torch": torch.__version__})
    for name in args.parts.split(","):
        result[name] = parts[name]()
        print(name, json.dumps(result[name], indent=1), flush=True)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
