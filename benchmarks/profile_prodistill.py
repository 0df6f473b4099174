"""ProDistill: an account of the time of one real merge (issue 15, part 1).

    .venv/bin/python benchmarks/profile_prodistill.py --cache /tmp/demo_run/cache --threads 1 \
        --json benchmarks/results/profile_prodistill.json

What it does:

1. Finds the demo's base (all-MiniLM-L6-v2, prepared by ``layermerge.demo.prepare_base``) and its
   three experts under ``--cache`` with layermerge's own functions (``finetune`` with the demo's
   settings: it returns at once when the expert is cached, and fine-tunes it otherwise).
2. Runs ONE ``layermerge.merge(base, experts, "prodistill", data=..., device="cpu")`` with the demo's
   settings (16 shots per task, max length 64, seed 0, 20 epochs per block) into a temporary folder,
   with library functions wrapped by monkeypatching (no library code is edited): every wrapper adds
   its *exclusive* ``time.perf_counter`` time (nested wrapped calls are subtracted) to one category.
3. Splits the merge's wall time into those categories; "rest" is the wall time no wrapper saw
   (Python overhead of the loops, autograd bookkeeping outside backward, pipeline glue).
4. Counts the matmul FLOPs of block training (per token of one BERT layer: Q,K,V,O 4·2·h², FFN
   2·2·h·i, attention scores and values 2·2·n·h; ×3 for forward + backward) over every training
   forward, and compares the FLOP/s with a plain ``torch.mm`` of the block's shapes measured in the
   same process, with the same thread count.
5. Reports the padding share of the few-shot batches (attention-mask zeros / positions) and the
   share of the training FLOPs spent on padding positions.

``--method distillmerge`` or ``--method regmean`` gives the same account of the other two
data-driven methods on the same inputs (issue 15 asks for all three), with each method's own defaults
(``--epochs`` lowers DistillMerge's 50). DistillMerge trains every block's λ at once through
``merge_network`` / ``NetworkContext.run_network`` (the same categories; its forward FLOPs count every
block of every step). RegMean has no training: its expert forwards run under no grad with forward
pre-hooks that accumulate the Gram matrices ("Gram accumulation": the hooks' masking and ``addmm_``),
then per block the normal equations are combined (G̃, G̃Wᵢ, sums) and solved by Cholesky
(``_solve``), and the other tensors averaged; its FLOP/s compares the expert forwards + Gram matmuls
with the same ``torch.mm`` peak. Categories that do not apply show 0.

Prints a table; ``--json PATH`` adds this run to PATH (one entry per method and thread count, others
kept: ProDistill's under ``threads_N``, the others under ``METHOD_threads_N``, or ``--label``).
``--set KEY=VALUE`` sets a method parameter (e.g. ``train_precision=bfloat16``, ``patience=2``) and
``--engine KEY=VALUE`` an engine option (e.g. ``regroup_by_length=false``); with bfloat16 training the
matmul peak is measured in bfloat16 too.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent


# --------------------------------------------------------------------- exclusive timers
class Profiler:
    """Exclusive time per category: a wrapped call's time minus the time of wrapped calls inside it."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self.calls: dict[str, int] = {}
        self.spans: dict[str, float] = {}        # inclusive spans (not part of the split)
        self._stack: list[list[float]] = []      # per open call: [child seconds]
        self.active = False
        self.region = "pipeline"                 # pipeline → engine → fit: where the time was spent
        self.by_region: dict[str, dict[str, float]] = {}

    def wrap(self, category: str, function):
        profiler = self

        def wrapper(*args, **kwargs):
            if not profiler.active:
                return function(*args, **kwargs)
            frame = [0.0]
            profiler._stack.append(frame)
            started = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                elapsed = time.perf_counter() - started
                profiler._stack.pop()
                profiler.seconds[category] = profiler.seconds.get(category, 0.0) + elapsed - frame[0]
                region = profiler.by_region.setdefault(profiler.region, {})
                region[category] = region.get(category, 0.0) + elapsed - frame[0]
                profiler.calls[category] = profiler.calls.get(category, 0) + 1
                if profiler._stack:
                    profiler._stack[-1][0] += elapsed

        wrapper.__wrapped__ = function
        return wrapper

    def span(self, name: str, function, region: str | None = None):
        """Inclusive time of ``function`` (for denominators), invisible to the exclusive split; with
        ``region``, the wrapped calls' categories are also booked under that region."""
        profiler = self

        def wrapper(*args, **kwargs):
            started = time.perf_counter()
            outer = profiler.region
            if region is not None:
                profiler.region = region
            try:
                return function(*args, **kwargs)
            finally:
                profiler.region = outer
                profiler.spans[name] = profiler.spans.get(name, 0.0) + time.perf_counter() - started

        return wrapper


def patch(owner, name: str, replacement) -> None:
    setattr(owner, name, replacement)


# --------------------------------------------------------------------- FLOP counting
def layer_flops(tokens: int, seq: int, hidden: int, intermediate: int) -> float:
    """Forward matmul FLOPs of one BERT layer for ``tokens`` positions of sequences of length ``seq``."""
    return tokens * (4 * 2 * hidden * hidden + 2 * 2 * hidden * intermediate + 2 * 2 * seq * hidden)


class FlopCounter:
    def __init__(self, hidden: int, intermediate: int):
        self.hidden, self.intermediate = hidden, intermediate
        self.train_flops = 0.0           # forward + backward (×3), padded positions included
        self.train_flops_real = 0.0      # the same on the real (unpadded) tokens only
        self.train_tokens = 0
        self.train_real_tokens = 0
        self.train_forwards = 0
        self.shapes: dict[str, int] = {}
        self.eval_flops = 0.0            # no-grad block forwards (final loss, RegMean's expert passes)
        self.eval_tokens = 0
        self.eval_forwards = 0
        self.gram_flops = 0.0            # RegMean: 2·rows·in² per XᵀX addmm_ (real tokens only)
        self.gram_calls = 0


def real_lengths(mask: torch.Tensor | None, batch: int, seq: int) -> list[int]:
    if mask is None:
        return [seq] * batch
    return [int(v) for v in mask.reshape(batch, -1).sum(1).tolist()]


# --------------------------------------------------------------------- matmul peak
def matmul_peak(tokens: int, hidden: int, intermediate: int, seconds: float = 1.5,
                dtype: torch.dtype = torch.float32) -> dict:
    """Best and median GFLOP/s of plain torch.mm of the block's shapes in ``dtype`` (the training's)."""
    generator = torch.Generator().manual_seed(0)
    out = {}
    for label, (m, k, n) in {"tokens_x_h @ h_x_i": (tokens, hidden, intermediate),
                             "tokens_x_h @ h_x_h": (tokens, hidden, hidden),
                             "tokens_x_i @ i_x_h": (tokens, intermediate, hidden)}.items():
        a = torch.randn(m, k, generator=generator).to(dtype)
        b = torch.randn(k, n, generator=generator).to(dtype)
        for _ in range(3):
            torch.mm(a, b)
        rates = []
        deadline = time.perf_counter() + seconds
        while time.perf_counter() < deadline or len(rates) < 5:
            started = time.perf_counter()
            torch.mm(a, b)
            rates.append(2 * m * k * n / (time.perf_counter() - started))
        rates.sort()
        out[label] = {"shape": [m, k, n], "best_gflops": round(rates[-1] / 1e9, 2),
                      "median_gflops": round(rates[len(rates) // 2] / 1e9, 2), "runs": len(rates)}
    return out


# --------------------------------------------------------------------- inputs
def demo_inputs(cache: Path, quiet: bool) -> tuple[Path, dict[str, Path], object]:
    """The demo's prepared base and experts (fine-tuned and cached by layermerge when absent)."""
    from layermerge.demo import DemoConfig, minilm_path, prepare_base
    from layermerge.finetune import cache_root, find_cached_expert, finetune

    config = DemoConfig(cache_dir=cache, quiet=quiet)
    root = cache_root(config.cache_dir)
    base = prepare_base(minilm_path(), root)
    experts = {}
    for task in config.tasks:
        found = find_cached_expert(base, task, cache_dir=root, settings=config.finetune_settings(),
                                   data_dir=config.data_dir)
        if found is None:
            print(f"fine-tuning the {task} expert (cached afterwards)", flush=True)
            found = finetune(base, task, cache_dir=root, settings=config.finetune_settings(),
                             data_dir=config.data_dir, quiet=quiet)
        experts[task] = found.path
    return base, experts, config


# --------------------------------------------------------------------- the run
CATEGORIES = [
    ("block_forward", "merged block forward (training, grad on)"),
    ("block_forward_eval", "merged block forward (final loss, no grad)"),
    ("loss", "squared error (forward of the loss)"),
    ("backward", "backward (loss.backward)"),
    ("weights", "building W(λ) (MergingCoefficients.weights)"),
    ("coefficients_init", "task vectors + λ init (MergingCoefficients.__init__)"),
    ("optimizer", "optimiser (Adam.step + zero_grad)"),
    ("expert_targets", "experts' targets (engine _expert_outputs)"),
    ("capture", "stream capture (embeddings → first block inputs)"),
    ("push", "stream push z_m/z_i (engine _push)"),
    ("moving", "moving cached activations (cache get/put/rename, .to)"),
    ("load_weights", "reading block weights (_block_params)"),
    ("few_shot_data", "few-shot data (sampling + tokenising)"),
]
# RegMean only (zero for the others, so left out of their tables)
REGMEAN_CATEGORIES = [
    ("gram", "Gram accumulation (hooks: mask rows, XᵀX addmm_)"),
    ("gram_combine", "normal equations (G̃ = αG + (1−α)diag G, G̃Wᵢ, sums)"),
    ("solve", "Cholesky solve + objective (RegMean._solve)"),
    ("other_tensors", "averaging the other tensors (biases, norms)"),
]
# labels that read differently for a method (same keys, same meaning in the split)
LABELS = {
    "distillmerge": {"block_forward": "merged block forward (training, grad on; all blocks per step)",
                     "expert_targets": "experts' outputs pushed through every block (engine)"},
    "regmean": {"block_forward_eval": "experts' block forward (no grad; the Gram hooks excluded)"},
}


def categories(method: str) -> list[tuple[str, str]]:
    rows = CATEGORIES + (REGMEAN_CATEGORIES if method == "regmean" else [])
    return [(key, LABELS.get(method, {}).get(key, label)) for key, label in rows]


def install(profiler: Profiler, flops: FlopCounter, holder: dict, method: str = "prodistill") -> None:
    import layermerge.engine.context as context
    import layermerge.engine.driver as driver
    import layermerge.fewshot as fewshot
    import layermerge.methods.coefficients as coefficients
    import layermerge.methods.distillmerge as distillmerge
    import layermerge.methods.prodistill as prodistill
    import layermerge.methods.regmean as regmean
    from layermerge.engine.cache import ActivationCache

    w = profiler.wrap
    # block forward: BlockContext.run → context.call_block (the driver's own call_block import is the
    # engine's stream work, timed under expert_targets / push)
    original_call_block = context.call_block
    timed_forward = w("block_forward", original_call_block)
    timed_eval = w("block_forward_eval", original_call_block)

    def call_block(block, params, hidden, extra, dtype=None):
        if not torch.is_grad_enabled():
            batch, seq = hidden.shape[0], hidden.shape[1]
            flops.eval_forwards += 1
            flops.eval_tokens += batch * seq
            flops.eval_flops += layer_flops(batch * seq, seq, flops.hidden, flops.intermediate)
            return timed_eval(block, params, hidden, extra, dtype)
        batch, seq = hidden.shape[0], hidden.shape[1]
        flops.train_forwards += 1
        key = f"{batch}x{seq}"
        flops.shapes[key] = flops.shapes.get(key, 0) + 1
        flops.train_tokens += batch * seq
        flops.train_flops += 3 * layer_flops(batch * seq, seq, flops.hidden, flops.intermediate)
        mask = holder.get("current_mask")
        for length in real_lengths(mask, batch, seq):
            flops.train_real_tokens += length
            flops.train_flops_real += 3 * layer_flops(length, length, flops.hidden, flops.intermediate)
        return timed_forward(block, params, hidden, extra, dtype)

    patch(context, "call_block", call_block)

    # the loss: remember the mask of the batch whose forward comes next (token_mask is called after
    # run in _error, so take it from the streams by ref instead)
    original_run = context.BlockContext.run

    def run(self, params, hidden, ref, stream="merged"):
        holder["current_mask"] = self._streams.masks.get((ref.task, ref.batch))
        return original_run(self, params, hidden, ref, stream)

    patch(context.BlockContext, "run", run)
    original_run_network = context.NetworkContext.run_network

    def run_network(self, params, ref):
        holder["current_mask"] = self._streams.masks.get((ref.task, ref.batch))
        return original_run_network(self, params, ref)

    patch(context.NetworkContext, "run_network", run_network)
    patch(prodistill, "squared_error", w("loss", prodistill.squared_error))
    patch(distillmerge, "squared_error", w("loss", distillmerge.squared_error))

    # backward
    patch(torch.Tensor, "backward", w("backward", torch.Tensor.backward))
    # W(λ) and the coefficients' set-up
    patch(coefficients.MergingCoefficients, "weights", w("weights", coefficients.MergingCoefficients.weights))
    patch(coefficients.MergingCoefficients, "__init__",
          w("coefficients_init", coefficients.MergingCoefficients.__init__))
    # optimiser (patched on the class before fit creates its Adam)
    patch(torch.optim.Adam, "step", w("optimizer", torch.optim.Adam.step))
    patch(torch.optim.Adam, "zero_grad", w("optimizer", torch.optim.Adam.zero_grad))
    # the engine's streams
    patch(driver.BlockEngine, "_expert_outputs", w("expert_targets", driver.BlockEngine._expert_outputs))
    patch(driver.BlockEngine, "capture", w("capture", driver.BlockEngine.capture))
    patch(driver.BlockEngine, "_push", w("push", driver.BlockEngine._push))
    patch(driver, "_block_params", w("load_weights", driver._block_params))
    # moving cached activations
    for name in ("get", "put", "rename"):
        patch(ActivationCache, name, w("moving", getattr(ActivationCache, name)))
    patch(context.StreamAccess, "_get", w("moving", context.StreamAccess._get))
    patch(context.StreamAccess, "token_mask", w("moving", context.StreamAccess.token_mask))
    patch(context.Streams, "extra", w("moving", context.Streams.extra))
    patch(context.Streams, "put_extras", w("moving", context.Streams.put_extras))
    # few-shot data
    patch(fewshot, "build_few_shot", w("few_shot_data", fewshot.build_few_shot))

    # inclusive spans: the engine, block training (merge_block), and keep the engine for its masks
    original_init = driver.BlockEngine.__init__

    def engine_init(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        holder["engine"] = self

    patch(driver.BlockEngine, "__init__", engine_init)
    patch(driver.BlockEngine, "run", profiler.span("engine_run", driver.BlockEngine.run, "engine"))
    patch(prodistill.ProDistill, "merge_block", profiler.span("merge_block", prodistill.ProDistill.merge_block))
    patch(prodistill, "fit", profiler.span("fit", prodistill.fit, "fit"))
    patch(distillmerge.DistillMerge, "merge_network",
          profiler.span("merge_block", distillmerge.DistillMerge.merge_network))
    patch(distillmerge, "fit", profiler.span("fit", distillmerge.fit, "fit"))

    # RegMean: the Gram hooks (registered inside _task_grams; wrapped while it runs), the per-task
    # combination in merge_block, the solve and the averaged other tensors
    if method == "regmean":
        from torch import nn

        timed_task_grams = w("gram", regmean.RegMean._task_grams)
        original_register = nn.Module.register_forward_pre_hook

        def register_forward_pre_hook(self, hook, *args, **kwargs):
            if holder.get("in_task_grams"):
                timed = w("gram", hook)

                def counted(module, inputs):
                    x = inputs[0]
                    mask = holder.get("current_mask")
                    rows = int(mask.sum()) if mask is not None and tuple(x.shape[:-1]) == tuple(mask.shape) \
                        else x.numel() // x.shape[-1]
                    flops.gram_flops += 2 * rows * x.shape[-1] ** 2
                    flops.gram_calls += 1
                    return timed(module, inputs)

                hook = counted
            return original_register(self, hook, *args, **kwargs)

        def task_grams(self, *args, **kwargs):
            holder["in_task_grams"] = True
            try:
                return timed_task_grams(self, *args, **kwargs)
            finally:
                holder["in_task_grams"] = False

        patch(nn.Module, "register_forward_pre_hook", register_forward_pre_hook)
        patch(regmean.RegMean, "_task_grams", task_grams)
        patch(regmean.RegMean, "merge_block",
              profiler.span("merge_block", w("gram_combine", regmean.RegMean.merge_block)))
        patch(regmean.RegMean, "_solve", w("solve", regmean.RegMean._solve))
        patch(regmean.RegMean, "_other", w("other_tensors", regmean.RegMean._other))


def padding_stats(engine) -> dict:
    zeros = total = 0
    per_task = {}
    lengths = []
    for (task, _batch), mask in engine.streams.masks.items():
        if mask is None:
            continue
        z, t = int((~mask).sum()), mask.numel()
        zeros += z
        total += t
        stats = per_task.setdefault(task, {"padding": 0, "positions": 0, "batches": 0, "padded_length": []})
        stats["padding"] += z
        stats["positions"] += t
        stats["batches"] += 1
        stats["padded_length"].append(int(mask.shape[1]))
        lengths.extend(int(v) for v in mask.sum(1).tolist())
    for stats in per_task.values():
        stats["fraction"] = round(stats["padding"] / stats["positions"], 4) if stats["positions"] else None
    return {"padding_positions": zeros, "positions": total,
            "fraction": round(zeros / total, 4) if total else None, "per_task": per_task,
            "real_length_min": min(lengths, default=None), "real_length_max": max(lengths, default=None),
            "real_length_mean": round(sum(lengths) / len(lengths), 2) if lengths else None}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache", type=Path, default=None,
                        help="layermerge cache folder holding the demo's base and experts (default: "
                             "$LAYERMERGE_CACHE or .cache/layermerge; missing experts are fine-tuned there)")
    parser.add_argument("--shots", type=int, default=None, help="few-shot examples per task (default: the demo's 16)")
    parser.add_argument("--method", choices=("prodistill", "distillmerge", "regmean"), default="prodistill",
                        help="which data-driven merge to profile (default prodistill)")
    parser.add_argument("--epochs", type=int, default=None,
                        help="epochs (ProDistill: per block, default the demo's 20; DistillMerge: its default 50)")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a method parameter (YAML value), e.g. --set train_precision=bfloat16; repeatable")
    parser.add_argument("--engine", action="append", default=[], metavar="KEY=VALUE",
                        help="an engine option (YAML value), e.g. --engine regroup_by_length=false; repeatable")
    parser.add_argument("--data", action="append", default=[], metavar="KEY=VALUE",
                        help="a data: option (YAML value), e.g. --data batch_size=4; repeatable")
    parser.add_argument("--label", default=None, help="JSON key of this run (default: by method and threads)")
    parser.add_argument("--json", type=Path, default=None, help="add this run to a JSON file (keyed by threads)")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    from layermerge import merge
    from layermerge.demo import few_shot_data

    base, experts, config = demo_inputs(args.cache, quiet=True)
    if args.shots is not None:
        config.shots = args.shots
    method = args.method
    params = dict(config.method_params.get(method, {}))
    if args.epochs is not None:
        if method == "regmean":
            parser.error("--epochs does not apply to regmean")
        params["epochs"] = args.epochs
    import yaml

    def pairs(items: list[str], option: str) -> dict:
        found = {}
        for item in items:
            key, sep, value = item.partition("=")
            if not sep:
                parser.error(f"{option} takes KEY=VALUE, got {item!r}")
            found[key] = yaml.safe_load(value)
        return found

    params.update(pairs(args.set, "--set"))
    engine_options = pairs(args.engine, "--engine")
    data = {**few_shot_data(config), **pairs(args.data, "--data")}

    from transformers import AutoConfig
    model_config = AutoConfig.from_pretrained(base)
    hidden, intermediate = model_config.hidden_size, model_config.intermediate_size

    profiler = Profiler()
    flops = FlopCounter(hidden, intermediate)
    holder: dict = {}
    install(profiler, flops, holder, method)

    with tempfile.TemporaryDirectory(prefix=f"profile-{method}-") as scratch:
        profiler.active = True
        started = time.perf_counter()
        merge(base, experts, method, data=data, output=Path(scratch) / "merged", device="cpu",
              quiet=True, seed=config.seed, **engine_options, **params)
        wall = time.perf_counter() - started
        profiler.active = False
    load_after = os.getloadavg()

    measured = sum(profiler.seconds.values())
    rows = [(key, label, profiler.seconds.get(key, 0.0), profiler.calls.get(key, 0))
            for key, label in categories(method)]
    rows.append(("rest", "rest (Python overhead, autograd glue, pipeline I/O)", wall - measured, 0))

    # the rest by region: fit (the Adam loop), engine outside fit, pipeline outside the engine
    fit_total = profiler.spans.get("fit", 0.0)
    engine_total = profiler.spans.get("engine_run", 0.0)
    region_wall = {"fit": fit_total, "engine": engine_total - fit_total, "pipeline": wall - engine_total}
    regions = {name: {"wall": round(total, 3),
                      "measured": {k: round(v, 3) for k, v in profiler.by_region.get(name, {}).items()},
                      "rest": round(total - sum(profiler.by_region.get(name, {}).values()), 3)}
               for name, total in region_wall.items()}

    padding = padding_stats(holder["engine"])
    steps = profiler.calls.get("optimizer", 0) // 2
    tokens_per_step = flops.train_tokens / max(1, steps)
    train_seconds = profiler.seconds.get("block_forward", 0.0) + profiler.seconds.get("backward", 0.0)
    fit_seconds = profiler.spans.get("fit", 0.0)
    # the torch.mm shapes: the tokens of one block forward (one per step for ProDistill; DistillMerge
    # runs every block per step, RegMean only no-grad forwards)
    if flops.train_forwards:
        tokens_per_forward = flops.train_tokens / flops.train_forwards
    else:
        tokens_per_forward = flops.eval_tokens / max(1, flops.eval_forwards)
    matmul_dtype = torch.float32
    if method in ("prodistill", "distillmerge"):        # the precision the merge trained in (auto resolved)
        from torch import nn

        from layermerge.engine.precision import resolve_precision
        from layermerge.methods.registry import get_method, validate_params

        chosen = validate_params(get_method(method), dict(params)).train_precision
        if resolve_precision(chosen, torch.device("cpu"), nn.Linear(1, 1)) == "bfloat16":
            matmul_dtype = torch.bfloat16
    peak = matmul_peak(max(1, round(tokens_per_forward)), hidden, intermediate, dtype=matmul_dtype)
    # the layer's matmul mix: FFN (h×i and i×h) and the projections (h×h), weighted by FLOPs
    mix = {"tokens_x_h @ h_x_i": 2, "tokens_x_i @ i_x_h": 2, "tokens_x_h @ h_x_h": 4 * hidden / intermediate}
    seconds_per_flop = sum(weight / (peak[k]["best_gflops"] * 1e9) for k, weight in mix.items()) / sum(mix.values())
    peak_gflops = 1 / seconds_per_flop / 1e9
    achieved_fwd_bwd = flops.train_flops / train_seconds / 1e9 if train_seconds else None
    achieved_fit = flops.train_flops / fit_seconds / 1e9 if fit_seconds else None
    # RegMean: the expert forwards (no grad, hooks excluded) and the Gram matmuls, over their own time
    gram_work_seconds = profiler.seconds.get("block_forward_eval", 0.0) + profiler.seconds.get("gram", 0.0)
    gram_work_flops = flops.eval_flops + flops.gram_flops
    achieved_gram = gram_work_flops / gram_work_seconds / 1e9 if method == "regmean" and gram_work_seconds else None

    result = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": "python benchmarks/profile_prodistill.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "threads": args.threads, "torch": torch.__version__, "python": platform.python_version(),
        "cpu_count": os.cpu_count(), "loadavg_before": [round(v, 2) for v in load_before],
        "loadavg_after": [round(v, 2) for v in load_after],
        "settings": {"shots": config.shots, "max_length": config.max_length, "seed": config.seed,
                     "tasks": list(experts), method: params, "data": data},
        "model": {"hidden": hidden, "intermediate": intermediate, "layers": model_config.num_hidden_layers},
        "wall_seconds": round(wall, 3),
        "spans": {k: round(v, 3) for k, v in profiler.spans.items()},
        "regions": regions,
        "categories": {key: {"label": label, "seconds": round(sec, 3), "share": round(sec / wall, 4),
                             "calls": calls} for key, label, sec, calls in rows},
        "padding": padding,
        "training": {"steps": steps, "forwards": flops.train_forwards, "tokens": flops.train_tokens,
                     "real_tokens": flops.train_real_tokens, "tokens_per_step": round(tokens_per_step, 1),
                     "forward_shapes": flops.shapes,
                     "flops": flops.train_flops, "flops_on_real_tokens": flops.train_flops_real,
                     "flop_share_on_padding": round(1 - flops.train_flops_real / flops.train_flops, 4)
                     if flops.train_flops else None,
                     "forward_backward_seconds": round(train_seconds, 3), "fit_seconds": round(fit_seconds, 3),
                     "achieved_gflops_forward_backward": round(achieved_fwd_bwd, 2) if achieved_fwd_bwd else None,
                     "achieved_gflops_fit": round(achieved_fit, 2) if achieved_fit else None},
        "matmul_peak": {"dtype": str(matmul_dtype).replace("torch.", ""), "per_shape": peak,
                        "layer_mix_gflops": round(peak_gflops, 2)},
        "ratio_to_peak": {"forward_backward": round(achieved_fwd_bwd / peak_gflops, 4) if achieved_fwd_bwd else None,
                          "fit": round(achieved_fit / peak_gflops, 4) if achieved_fit else None},
    }
    if method != "prodistill":
        result["method"] = method
        result["no_grad_forwards"] = {"forwards": flops.eval_forwards, "tokens": flops.eval_tokens,
                                      "flops": flops.eval_flops,
                                      "seconds": round(profiler.seconds.get("block_forward_eval", 0.0), 3)}
        result["training"]["tokens_per_forward"] = round(tokens_per_forward, 1)
    if method == "regmean":
        result["gram"] = {"addmm_calls": flops.gram_calls, "flops": flops.gram_flops,
                          "forward_plus_gram_flops": gram_work_flops,
                          "forward_plus_gram_seconds": round(gram_work_seconds, 3),
                          "achieved_gflops": round(achieved_gram, 2) if achieved_gram else None,
                          "ratio_to_peak": round(achieved_gram / peak_gflops, 4) if achieved_gram else None}

    title = {"prodistill": "ProDistill", "distillmerge": "DistillMerge", "regmean": "RegMean"}[method]
    print(f"{title} merge, {args.threads} thread(s): wall {wall:.2f} s  (load avg before "
          f"{load_before[0]:.2f}, after {load_after[0]:.2f})")
    print(f"{'category':<58} {'s':>8} {'share':>7} {'calls':>7}")
    for _key, label, sec, calls in rows:
        print(f"{label:<58} {sec:8.2f} {100 * sec / wall:6.1f}% {calls:7d}")
    print(f"{'total':<58} {wall:8.2f} {100.0:6.1f}%")
    print(f"spans: engine {profiler.spans.get('engine_run', 0):.2f} s, merge_block "
          f"{profiler.spans.get('merge_block', 0):.2f} s, fit {fit_seconds:.2f} s")
    print("rest by region: " + ", ".join(f"{name} {entry['rest']:.2f} s of {entry['wall']:.2f} s"
                                         for name, entry in regions.items()))
    on_padding = result["training"]["flop_share_on_padding"]
    print(f"padding: {padding['fraction']:.1%} of positions ({padding['padding_positions']}/{padding['positions']})"
          + (f"; {on_padding:.1%} of training FLOPs on padding" if on_padding is not None else ""))
    if achieved_fwd_bwd and achieved_fit:
        print(f"training: {steps} steps, {flops.train_forwards} block forwards, {flops.train_tokens} tokens "
              f"({tokens_per_step:.0f}/step), {flops.train_flops / 1e12:.3f} TFLOP")
        print(f"achieved: {achieved_fwd_bwd:.1f} GFLOP/s over forward+backward, {achieved_fit:.1f} GFLOP/s over "
              f"fit; torch.mm peak (layer mix) {peak_gflops:.1f} GFLOP/s → {achieved_fwd_bwd / peak_gflops:.1%} / "
              f"{achieved_fit / peak_gflops:.1%}")
    if achieved_gram:
        print(f"no-grad forwards: {flops.eval_forwards}, {flops.eval_tokens} tokens, {flops.eval_flops / 1e9:.2f} "
              f"GFLOP; Gram addmm_: {flops.gram_calls} calls, {flops.gram_flops / 1e9:.2f} GFLOP")
        print(f"achieved: {achieved_gram:.1f} GFLOP/s over forward + Gram time; torch.mm peak (layer mix) "
              f"{peak_gflops:.1f} GFLOP/s → {achieved_gram / peak_gflops:.1%}")
    for label, entry in peak.items():
        print(f"  mm {label} {entry['shape']}: best {entry['best_gflops']} median {entry['median_gflops']} GFLOP/s")

    if args.json is not None:
        existing = {}
        if args.json.is_file():
            try:
                existing = json.loads(args.json.read_text())
            except ValueError:
                existing = {}
        runs = existing.get("runs", {}) if isinstance(existing, dict) else {}
        default_key = f"threads_{args.threads}" if method == "prodistill" else f"{method}_threads_{args.threads}"
        key = args.label or default_key
        runs[key] = result
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"benchmark": "profile_prodistill", "runs": runs}, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
