"""One ProDistill step, piece by piece: what each change of issue 15 saves on a real block.

    .venv/bin/python benchmarks/prodistill_step.py --threads 1 --tasks 8 \
        --json benchmarks/results/prodistill_step.json

Part 1 (encoder): layer 0 of all-MiniLM-L6-v2 (from its PyPI package), ``--tasks`` random task vectors
(scale 0.01), one batch of 16 × 128 tokens. Each variant runs warm-up steps, then times the pieces of
a step (median of ``--steps``): W(λ), forward, backward, optimiser.

* ``before``: W(λ) by autograd through a loop of ``addcmul`` and Adam one tensor at a time (the code
  before issue 15);
* ``after, float32``: ``layermerge.methods.coefficients.combine`` and fused Adam;
* ``after, bfloat16 (fused attention)`` / ``after, bfloat16 (math attention)``: the same under bfloat16
  autocast, with the CPU's fused SDPA kernel or the plain matmul-softmax path (what
  ``matmul_precision`` (then ``training_precision``) used before it ran the attention in float32; that comparison is in
  ``benchmarks/prodistill_kernels.py``).

Part 3 (``--compile``): ``torch.compile(dynamic=True)`` of the same layer's forward + loss through
``functional_call``, against eager, on batches of 16 × 40...64 tokens (lengths vary after regrouping):
the first call (compilation) and the median of the rest.

Part 2 (convolutions): EfficientNet-Lite0 blocks 1, 5 and 12 (random weights, 64 × 64 inputs as in
the vision track, batch 16): forward + backward in float32 / bfloat16 autocast, NCHW / channels-last.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))


def loop_weights(start, deltas, vectors, names, tasks):
    weights = {}
    for name in names:
        merged = start[name]
        for position in range(tasks):
            merged = torch.addcmul(merged, deltas[name][position], vectors[name][position])
        weights[name] = merged
    return weights


def encoder_part(tasks: int, steps: int) -> dict:
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from transformers import AutoModel

    from layermerge.demo import minilm_path
    from layermerge.methods.coefficients import combine

    layer = AutoModel.from_pretrained(minilm_path()).encoder.layer[0]
    generator = torch.Generator().manual_seed(0)
    names = [name for name, _ in layer.named_parameters()]
    base = {name: p.detach().clone() for name, p in layer.named_parameters()}
    vectors = {name: torch.randn(tasks, *p.shape, generator=generator) * 0.01 for name, p in base.items()}
    start = {name: base[name] + 0.3 * vectors[name].sum(0) for name in names}
    hidden = torch.randn(16, 128, base[names[0]].shape[-1], generator=generator)
    target = torch.randn(hidden.shape, generator=generator)

    def run(variant: str) -> dict:
        deltas = {name: torch.zeros(tasks, *p.shape, requires_grad=True) for name, p in base.items()}
        leaves = list(deltas.values())
        before = variant == "before"
        optimizer = torch.optim.Adam(leaves, lr=0.01, **({"foreach": False} if before else {"fused": True}))
        half = "bfloat16" in variant
        backend = SDPBackend.MATH if "math" in variant else SDPBackend.FLASH_ATTENTION
        times = {"W(λ)": [], "forward": [], "backward": [], "optimiser": []}
        for step in range(steps + 2):
            marks = [time.perf_counter()]
            optimizer.zero_grad(set_to_none=True)
            weights = (loop_weights(start, deltas, vectors, names, tasks) if before else
                       {name: combine(start[name], deltas[name], vectors[name]) for name in names})
            marks.append(time.perf_counter())
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=half), sdpa_kernel([backend]):
                out = torch.func.functional_call(layer, weights, (hidden,))
                out = out[0] if isinstance(out, tuple) else out
            loss = (out.float() - target).pow(2).sum()
            marks.append(time.perf_counter())
            loss.backward()
            marks.append(time.perf_counter())
            optimizer.step()
            marks.append(time.perf_counter())
            if step >= 2:
                for key, a, b in zip(times, marks, marks[1:]):
                    times[key].append(b - a)
        result = {key: round(1000 * statistics.median(values), 2) for key, values in times.items()}
        result["step"] = round(sum(result.values()), 2)
        return result

    variants = ["before", "after, float32", "after, bfloat16 (fused attention)", "after, bfloat16 (math attention)"]
    return {"block": "all-MiniLM-L6-v2 layer 0", "tasks": tasks, "tokens": "16 x 128",
            "ms": {variant: run(variant) for variant in variants}}


def convolution_part(steps: int) -> dict:
    from efficientnet_lite_pytorch import EfficientNet

    model = EfficientNet.from_name("efficientnet-lite0").eval()
    inputs, hidden = [], torch.randn(16, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        hidden = model._swish(model._bn0(model._conv_stem(hidden)))     # the stem, as the model runs it
        for block in model._blocks:
            inputs.append(hidden)
            hidden = block(hidden)
    out = {}
    for index in (1, 5, 12):
        block, x = model._blocks[index], inputs[index]
        params = {name: p.detach().clone().requires_grad_() for name, p in block.named_parameters()}
        for layout in ("NCHW", "channels-last"):
            for precision in ("float32", "bfloat16"):
                xi = x.contiguous(memory_format=torch.channels_last) if layout != "NCHW" else x
                durations = []
                for step in range(steps + 3):
                    started = time.perf_counter()
                    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bfloat16"):
                        y = torch.func.functional_call(block, params, (xi,))
                    y.float().pow(2).sum().backward()
                    if step >= 3:
                        durations.append(time.perf_counter() - started)
                out[f"block {index} {tuple(x.shape)} {layout} {precision}"] = round(
                    1000 * statistics.median(durations), 2)
    return {"model": "EfficientNet-Lite0 (random weights), batch 16 at 64x64", "forward_backward_ms": out}


def compile_part(steps: int) -> dict:
    from transformers import AutoModel

    from layermerge.demo import minilm_path

    layer = AutoModel.from_pretrained(minilm_path()).encoder.layer[0]
    params = {name: p.detach().clone().requires_grad_() for name, p in layer.named_parameters()}

    def loss(params, x):
        out = torch.func.functional_call(layer, params, (x,))
        return (out[0] if isinstance(out, tuple) else out).pow(2).sum()

    generator = torch.Generator().manual_seed(0)
    lengths = [40 + (8 * i) % 25 for i in range(steps + 1)]
    out = {}
    for label, function in (("eager", loss), ("compiled", torch.compile(loss, dynamic=True))):
        durations = []
        for length in lengths:
            x = torch.randn(16, length, 384, generator=generator)
            started = time.perf_counter()
            function(params, x).backward()
            durations.append(time.perf_counter() - started)
        out[label] = {"first_call_s": round(durations[0], 2),
                      "median_ms_after": round(1000 * statistics.median(durations[1:]), 1)}
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--tasks", type=int, default=8)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--compile", action="store_true", help="also time torch.compile (about a minute)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    result = {"threads": args.threads, "torch": torch.__version__, "encoder": encoder_part(args.tasks, args.steps),
              "convolutions": convolution_part(args.steps)}
    if args.compile:
        result["compile"] = compile_part(args.steps)
        print("torch.compile:", result["compile"])
    for variant, ms in result["encoder"]["ms"].items():
        print(f"{variant:<36} " + "  ".join(f"{k} {v:7.1f} ms" for k, v in ms.items()))
    for label, ms in result["convolutions"]["forward_backward_ms"].items():
        print(f"{label:<48} {ms:7.1f} ms")
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
