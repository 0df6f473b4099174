"""ProDistill: peak memory and wall time against depth, and what computing expert outputs once saves.

    .venv/bin/python benchmarks/prodistill_depth.py              # 4, 8 and 16 blocks at hidden 1024

What it does:

1. Generates (once; reused from ``--workdir``) Llama-shaped float32 checkpoints of one width at each
   depth: a base and ``--experts`` experts (base + small seeded noise), written one tensor at a time.
   The vocabulary is small, so the blocks hold almost all the weights and the model grows with depth.
2. Runs ``layermerge.merge(method="prodistill", ...)`` on each depth in its own subprocess (writing a
   normal output folder, with the default per-block checkpoints), on the CPU, and records the
   child's peak RSS (``ru_maxrss``), its RSS after imports (the fixed cost of Python, torch and
   transformers) and the wall time of the merge.
3. On the smallest depth, in one more subprocess, it trains every block twice, once with the expert
   outputs computed once per block (the engine's cache) and once with ``recompute_expert_outputs=True``
   (recomputed at every Adam step), alternating which goes first, and reports the median time per
   block of each: interleaving block by block keeps a shared machine's load changes out of the ratio.
4. Prints a table and writes ``benchmarks/results/prodistill_depth.json``. Output folders are
   deleted after each run; the generated inputs are kept for the next invocation.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from statistics import median

REPO = Path(__file__).resolve().parent.parent
DEFAULT_WORKDIR = Path("/tmp/layermerge-prodistill-bench")
DEFAULT_JSON = REPO / "benchmarks" / "results" / "prodistill_depth.json"
MiB = 2**20


def llama_config(args, depth: int):
    from transformers import AutoConfig

    return AutoConfig.for_model("llama", vocab_size=args.vocab, hidden_size=args.hidden, num_hidden_layers=depth,
                                intermediate_size=args.intermediate, num_attention_heads=args.heads,
                                num_key_value_heads=args.heads, max_position_embeddings=max(64, args.tokens),
                                tie_word_embeddings=False)


def tensor_specs(config) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every weight of the model, read off a meta-device instance (no memory)."""
    import torch
    from transformers import AutoModel

    from layermerge.engine.template import parameters_on_meta

    with parameters_on_meta():
        model = AutoModel.from_config(config, dtype=torch.float32)
    return [(name, tuple(t.shape)) for name, t in model.state_dict().items()]


def generate(args, depth: int) -> Path:
    """``<workdir>/depth-N/{base,expert0,...}``: float32 safetensors + config.json, streamed to disk."""
    import torch

    from layermerge.io.writer import ShardedSafetensorsWriter

    root = args.workdir / f"depth-{depth}"
    names = ["base"] + [f"expert{i}" for i in range(args.experts)]
    if all((root / name / "config.json").is_file() for name in names):
        return root
    config = llama_config(args, depth)
    specs = tensor_specs(config)
    for model_index, name in enumerate(names):
        folder = root / name
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        writer = ShardedSafetensorsWriter(folder, 2 * 10**9)
        for key_index, (key, shape) in enumerate(specs):
            base_gen = torch.Generator().manual_seed(key_index)
            if key.endswith("norm.weight"):
                tensor = torch.ones(shape)
            else:
                tensor = torch.randn(shape, generator=base_gen) * 0.02
            if model_index:       # an expert: the base plus its own small perturbation
                noise = torch.Generator().manual_seed(1000 * model_index + key_index)
                tensor += torch.randn(shape, generator=noise) * 0.002
            writer.add(key, tensor)
        writer.close()
        config.save_pretrained(folder)
    return root


def few_shot(args, tasks: list[str]) -> dict:
    import torch

    generator = torch.Generator().manual_seed(0)
    data = {}
    for task in tasks:
        batches = []
        for start in range(0, args.shots, args.batch):
            size = min(args.batch, args.shots - start)
            mask = torch.ones(size, args.tokens, dtype=torch.long)
            mask[::2, -args.tokens // 4:] = 0          # some padding, as in real batches
            batches.append({"input_ids": torch.randint(3, args.vocab, (size, args.tokens), generator=generator),
                            "attention_mask": mask})
        data[task] = batches
    return data


def rss_mib() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def child(args) -> None:
    """One measured merge; prints a JSON line."""
    import torch

    import layermerge

    torch.set_num_threads(args.threads)
    root = args.workdir / f"depth-{args.child}"
    experts = {f"task{i}": root / f"expert{i}" for i in range(args.experts)}
    data = few_shot(args, list(experts))
    output = args.workdir / f"out-{args.child}"
    shutil.rmtree(output, ignore_errors=True)
    after_imports = rss_mib()
    started = time.perf_counter()
    merged = layermerge.merge(root / "base", experts, method="prodistill", data=data, output=output, quiet=True,
                              device="cpu", lr=0.01, epochs=args.epochs, batch_size=args.batch, overwrite=True)
    wall = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    blocks = json.loads((output / "prodistill" / "blocks.json").read_text())["blocks"]
    shutil.rmtree(output, ignore_errors=True)
    print(json.dumps({"depth": args.child, "peak_rss_mib": round(peak, 1),
                      "rss_after_imports_mib": round(after_imports, 1), "wall_s": round(wall, 2),
                      "capture_s": merged.summary.get("capture_seconds"),
                      "block_s": [b.get("seconds") for b in blocks]}))


class _Interleaved:
    """A BlockMerger that trains each block with both settings, timing each, and keeps the first result."""

    name = "prodistill"

    def __init__(self, params: dict, tasks: list[str]):
        from layermerge.methods.prodistill import ProDistill

        self.once = ProDistill(ProDistill.Params(**params, recompute_expert_outputs=False), tasks)
        self.every_step = ProDistill(ProDistill.Params(**params, recompute_expert_outputs=True), tasks)
        self.seconds = {"once": [], "every_step": []}

    def merge_block(self, ctx):
        order = [("once", self.once), ("every_step", self.every_step)]
        if ctx.index % 2:
            order.reverse()
        results = {}
        for label, method in order:
            started = time.perf_counter()
            results[label] = method.merge_block(ctx)
            self.seconds[label].append(round(time.perf_counter() - started, 3))
        return results["once"]


def child_compare(args) -> None:
    """Expert outputs once per block vs at every step, interleaved block by block; prints a JSON line."""
    import torch

    import layermerge
    from layermerge.engine import ExpertSetSource, run_engine
    from layermerge.engine.template import build_template, checkpoint_key_map
    from layermerge.fewshot import adapt_batches

    torch.set_num_threads(args.threads)
    root = args.workdir / f"depth-{args.child_compare}"
    expert_set = layermerge.ExpertSet(root / "base", {f"task{i}": root / f"expert{i}" for i in range(args.experts)})
    template = build_template(expert_set)
    source = ExpertSetSource(expert_set, checkpoint_key_map(template, expert_set.report.merge_keys))
    data = adapt_batches(template, few_shot(args, expert_set.names))
    merger = _Interleaved({"lr": 0.01, "epochs": args.epochs, "batch_size": args.batch}, expert_set.names)
    run_engine(template, source, data, merger, device="cpu")
    print(json.dumps({"depth": args.child_compare, "seconds": merger.seconds}))


def model_mib(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors")) / MiB


def run_child(args, depth: int, compare: bool = False) -> dict:
    command = [sys.executable, __file__, "--child-compare" if compare else "--child", str(depth), *forwarded(args)]
    done = subprocess.run(command, capture_output=True, text=True, check=False,
                          env={**os.environ, "OMP_NUM_THREADS": str(args.threads)})
    if done.returncode != 0:
        raise SystemExit(f"run at depth {depth} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def forwarded(args) -> list[str]:
    return ["--workdir", str(args.workdir), "--hidden", str(args.hidden), "--intermediate", str(args.intermediate),
            "--heads", str(args.heads), "--vocab", str(args.vocab), "--experts", str(args.experts),
            "--shots", str(args.shots), "--batch", str(args.batch), "--tokens", str(args.tokens),
            "--epochs", str(args.epochs), "--threads", str(args.threads)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR)
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON)
    parser.add_argument("--depths", type=int, nargs="+", default=[4, 8, 16])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--intermediate", type=int, default=2816)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--vocab", type=int, default=1024)
    parser.add_argument("--experts", type=int, default=2)
    parser.add_argument("--shots", type=int, default=16, help="few-shot examples per task")
    parser.add_argument("--batch", type=int, default=8, help="examples per batch and per Adam step")
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: steadiest on a shared machine)")
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--child-compare", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        child(args)
        return
    if args.child_compare is not None:
        child_compare(args)
        return

    rows = []
    for depth in args.depths:
        root = generate(args, depth)
        row = run_child(args, depth)
        row["model_mib"] = round(model_mib(root / "base"), 1)
        rows.append(row)
        print(f"depth {depth:3d}: model {row['model_mib']:8.1f} MiB  peak RSS {row['peak_rss_mib']:8.1f} MiB  "
              f"(after imports {row['rss_after_imports_mib']:.1f})  wall {row['wall_s']:.1f} s", flush=True)
    compare = run_child(args, args.depths[0], compare=True)
    once, every_step = compare["seconds"]["once"], compare["seconds"]["every_step"]
    ratios = sorted(a / b for a, b in zip(once, every_step))
    first, last = rows[0], rows[-1]
    result = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                     if k not in ("child", "child_compare")},
        "rows": rows,
        "peak_rss_ratio_last_over_first": round(last["peak_rss_mib"] / first["peak_rss_mib"], 3),
        "model_ratio_last_over_first": round(last["model_mib"] / first["model_mib"], 3),
        "expert_outputs": {"depth": compare["depth"], "seconds_per_block_once": once,
                           "seconds_per_block_every_step": every_step,
                           "median_once_s": round(median(once), 3), "median_every_step_s": round(median(every_step), 3),
                           "median_ratio_once_over_every_step": round(median(ratios), 3),
                           "saved_fraction": round(1 - median(ratios), 3)},
    }
    saved = result["expert_outputs"]
    print(f"peak RSS {last['depth']} / {first['depth']} blocks: {result['peak_rss_ratio_last_over_first']} "
          f"(model x{result['model_ratio_last_over_first']})")
    print(f"depth {compare['depth']}: median {saved['median_once_s']:.2f} s/block with expert outputs once per "
          f"block, {saved['median_every_step_s']:.2f} s/block recomputing them every step "
          f"({100 * saved['saved_fraction']:.0f}% saved, median of per-block ratios)")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
