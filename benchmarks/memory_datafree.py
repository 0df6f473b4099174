"""Peak memory and wall time of data-free merging: layermerge against mergekit on a ~1B Llama.

Run with ``make bench-memory`` (or ``.venv/bin/python benchmarks/memory_datafree.py --help``).

What it does:

1. Generates (once; reused from ``--workdir``) a Llama-shaped bf16 checkpoint of about 1B
   parameters as sharded safetensors with a ``config.json``, plus experts derived from it
   (base + small seeded noise). Tensors are generated and streamed to disk one at a time, so
   generation itself needs about one tensor of memory. Inputs total ~10 GB.
2. Runs each merge in its own subprocess, so every peak is that run's alone: layermerge
   ``task_arithmetic`` and ``ties`` through ``layermerge merge CONFIG.yaml``, and mergekit's
   ``task_arithmetic`` and ``ties`` through ``mergekit-yaml`` on CPU, all with bf16 output and the
   same shard size. Peak RSS comes from the kernel (``ru_maxrss`` of the reaped child); a sampler
   also records the peak anonymous and file-backed parts from ``/proc/<pid>/status``.
3. Prints a table and writes ``benchmarks/results/memory_datafree.json``. Each run's output
   folder is deleted after it is measured; the inputs are kept for the next invocation.

Needs about 13 GB of free disk (inputs plus one output). On 2 shared cores the four runs take
about 20 minutes, half of it mergekit's TIES; ``--methods``/``--tools`` select a subset. Results
and their reading: docs/BENCHMARKS.md; the parameter correspondence: docs/MERGEKIT.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
import zlib
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_WORKDIR = Path("/tmp/layermerge-bench")
DEFAULT_JSON = REPO / "benchmarks" / "results" / "memory_datafree.json"
GiB = 2**30
GB = 10**9


# --------------------------------------------------------------------------- the synthetic model
@dataclass(frozen=True)
class LlamaShape:
    """A Llama decoder with grouped-query attention; defaults give 1,011,959,808 parameters."""

    hidden: int = 2048
    layers: int = 20
    intermediate: int = 5632
    vocab: int = 32000
    heads: int = 32
    kv_heads: int = 4

    def tensors(self) -> list[tuple[str, tuple[int, ...]]]:
        """(key, shape) of every tensor, in the order a LlamaForCausalLM state dict lists them."""
        head_dim = self.hidden // self.heads
        kv = self.kv_heads * head_dim
        specs = [("model.embed_tokens.weight", (self.vocab, self.hidden))]
        for i in range(self.layers):
            p = f"model.layers.{i}."
            specs += [
                (p + "self_attn.q_proj.weight", (self.hidden, self.hidden)),
                (p + "self_attn.k_proj.weight", (kv, self.hidden)),
                (p + "self_attn.v_proj.weight", (kv, self.hidden)),
                (p + "self_attn.o_proj.weight", (self.hidden, self.hidden)),
                (p + "mlp.gate_proj.weight", (self.intermediate, self.hidden)),
                (p + "mlp.up_proj.weight", (self.intermediate, self.hidden)),
                (p + "mlp.down_proj.weight", (self.hidden, self.intermediate)),
                (p + "input_layernorm.weight", (self.hidden,)),
                (p + "post_attention_layernorm.weight", (self.hidden,)),
            ]
        specs += [("model.norm.weight", (self.hidden,)), ("lm_head.weight", (self.vocab, self.hidden))]
        return specs

    def parameter_count(self) -> int:
        total = 0
        for _, shape in self.tensors():
            n = 1
            for size in shape:
                n *= size
            total += n
        return total

    def config(self) -> dict:
        return {
            "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": self.hidden,
            "intermediate_size": self.intermediate, "num_hidden_layers": self.layers,
            "num_attention_heads": self.heads, "num_key_value_heads": self.kv_heads,
            "vocab_size": self.vocab, "max_position_embeddings": 2048, "rms_norm_eps": 1e-5,
            "rope_theta": 10000.0, "hidden_act": "silu", "tie_word_embeddings": False,
            "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "bfloat16", "dtype": "bfloat16",
        }


def _seed(*parts) -> int:
    return zlib.crc32("/".join(str(p) for p in parts).encode())


def generate_inputs(workdir: Path, shape: LlamaShape, n_experts: int, shard_size: str, noise: float) -> dict:
    """Write base + experts under ``workdir/inputs`` unless an identical set is already there."""
    import torch

    from layermerge.io.writer import ShardedSafetensorsWriter, parse_size

    inputs = workdir / "inputs"
    names = ["base"] + [f"expert{i}" for i in range(n_experts)]
    recipe = {"shape": asdict(shape), "experts": n_experts, "shard_size": shard_size, "noise": noise,
              "version": 1}
    stamp = inputs / "recipe.json"
    if stamp.is_file() and json.loads(stamp.read_text()) == recipe:
        print(f"reusing inputs in {inputs}")
        return {name: inputs / name for name in names}
    shutil.rmtree(inputs, ignore_errors=True)
    started = time.perf_counter()
    print(f"generating {len(names)} checkpoints of {shape.parameter_count():,} bf16 parameters in {inputs}")
    writers = {}
    for name in names:
        folder = inputs / name
        folder.mkdir(parents=True)
        (folder / "config.json").write_text(json.dumps(shape.config(), indent=2) + "\n")
        writers[name] = ShardedSafetensorsWriter(folder, parse_size(shard_size))
    for key, size in shape.tensors():
        generator = torch.Generator().manual_seed(_seed("base", key))
        if len(size) == 1:  # RMSNorm weights sit around 1
            base = 1.0 + 0.1 * torch.randn(size, generator=generator)
        else:
            base = 0.02 * torch.randn(size, generator=generator)
        writers["base"].add(key, base.to(torch.bfloat16))
        for index in range(n_experts):
            generator.manual_seed(_seed(f"expert{index}", key))
            expert = torch.randn(size, generator=generator).mul_(noise).add_(base)
            writers[f"expert{index}"].add(key, expert.to(torch.bfloat16))
            del expert
        del base
    for writer in writers.values():
        writer.close()
    stamp.write_text(json.dumps(recipe, indent=2) + "\n")
    print(f"generated in {time.perf_counter() - started:.0f} s")
    return {name: inputs / name for name in names}


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def warm_page_cache(folders) -> None:
    """Read every input once so that no run pays for the first read from disk."""
    for folder in folders:
        for path in sorted(folder.glob("*.safetensors")):
            with open(path, "rb") as handle:
                while handle.read(1 << 24):
                    pass


# --------------------------------------------------------------------------- measuring a subprocess
def _status_kib(pid: int) -> dict[str, int]:
    values = {}
    try:
        with open(f"/proc/{pid}/status") as handle:
            for line in handle:
                name, _, rest = line.partition(":")
                if name in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
                    values[name] = int(rest.split()[0])
    except (FileNotFoundError, ProcessLookupError, ValueError):
        pass
    return values


def measure(command: list[str], log_path: Path, env: dict | None = None) -> dict:
    """Run ``command``; return wall seconds, peak RSS (kernel) and sampled peak anonymous/file RSS."""
    started = time.perf_counter()
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
        peaks = {"RssAnon": 0, "RssFile": 0, "VmHWM": 0}
        done = threading.Event()

        def sample():
            while not done.is_set():
                for name, value in _status_kib(process.pid).items():
                    if name in peaks:
                        peaks[name] = max(peaks[name], value)
                done.wait(0.05)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        _, status, usage = os.wait4(process.pid, 0)
        wall = time.perf_counter() - started
        done.set()
        sampler.join()
        process.returncode = os.waitstatus_to_exitcode(status)
    return {
        "wall_s": round(wall, 2), "peak_rss_gb": round(usage.ru_maxrss * 1024 / GB, 3),
        "peak_anon_gb_sampled": round(peaks["RssAnon"] * 1024 / GB, 3),
        "peak_file_gb_sampled": round(peaks["RssFile"] * 1024 / GB, 3),
        "user_s": round(usage.ru_utime, 1), "sys_s": round(usage.ru_stime, 1),
        "cpu_s": round(usage.ru_utime + usage.ru_stime, 1),
        "returncode": process.returncode,
    }


# --------------------------------------------------------------------------- the runs
LAYERMERGE_PARAMS = {
    "task_arithmetic": {"scaling": 0.3},
    "ties": {"density": 0.2, "scaling": 1.0, "trim": "tensor"},
}


def mergekit_params(method: str) -> tuple[dict, dict]:
    """(global parameters, per-model parameters) equivalent to LAYERMERGE_PARAMS (see docs/MERGEKIT.md)."""
    if method == "task_arithmetic":
        return {"lambda": LAYERMERGE_PARAMS[method]["scaling"]}, {"weight": 1.0}
    params = LAYERMERGE_PARAMS[method]
    return {"lambda": params["scaling"], "normalize": True}, {"weight": 1.0, "density": params["density"]}


def layermerge_command(method: str, paths: dict, out: Path, shard_size: str, run_dir: Path) -> list[str]:
    import yaml

    config = {
        "base": str(paths["base"]),
        "experts": {name: str(p) for name, p in paths.items() if name != "base"},
        "method": method, "params": LAYERMERGE_PARAMS[method], "dtype": "bfloat16",
        "max_shard_size": shard_size,
    }
    path = run_dir / f"layermerge-{method}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return [sys.executable, "-m", "layermerge", "merge", str(path), "--output", str(out), "--quiet"]


def mergekit_command(method: str, paths: dict, out: Path, shard_size: str, run_dir: Path,
                     compute_dtype: str) -> list[str]:
    import yaml

    global_params, model_params = mergekit_params(method)
    config = {
        "merge_method": method, "base_model": str(paths["base"]), "dtype": compute_dtype,
        "out_dtype": "bfloat16", "parameters": global_params,
        "models": [{"model": str(p), "parameters": model_params}
                   for name, p in paths.items() if name != "base"],
    }
    path = run_dir / f"mergekit-{method}-{compute_dtype}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    executable = shutil.which("mergekit-yaml", path=str(Path(sys.executable).parent)) or "mergekit-yaml"
    # mergekit's --out-shard-size counts bytes (TensorWriter compares numel * element_size), like ours.
    mergekit_size = str(_parse_bytes(shard_size))
    # Its lowest-memory CPU settings: synchronous writes, lazy unpickling (only matters for .bin
    # inputs), no tokenizer or model card work, arithmetic on the CPU.
    return [executable, str(path), str(out), "--device", "cpu", "--out-shard-size", mergekit_size,
            "--lazy-unpickle", "--no-async-write", "--no-copy-tokenizer", "--no-write-model-card", "--quiet"]


def _parse_bytes(size: str) -> int:
    from layermerge.io.writer import parse_size

    return parse_size(size)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR, help="inputs and scratch outputs")
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON, help="where to write the results")
    parser.add_argument("--experts", type=int, default=4)
    parser.add_argument("--layers", type=int, default=LlamaShape.layers)
    parser.add_argument("--hidden", type=int, default=LlamaShape.hidden)
    parser.add_argument("--intermediate", type=int, default=LlamaShape.intermediate)
    parser.add_argument("--vocab", type=int, default=LlamaShape.vocab)
    parser.add_argument("--noise", type=float, default=0.002,
                        help="std of each expert's offset from the base")
    parser.add_argument("--shard-size", default="1GB", help="input and output shard size (bytes, e.g. 1GB)")
    parser.add_argument("--methods", default="task_arithmetic,ties")
    parser.add_argument("--tools", default="layermerge,mergekit", help="comma list of layermerge, mergekit")
    parser.add_argument("--mergekit-dtype", default="float32",
                        help="mergekit compute dtypes, comma list: float32 computes like layermerge; "
                             "bfloat16 is mergekit's lowest-memory mode")
    parser.add_argument("--generate-only", action="store_true")
    args = parser.parse_args(argv)

    shape = LlamaShape(hidden=args.hidden, layers=args.layers, intermediate=args.intermediate,
                       vocab=args.vocab)
    args.workdir.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(args.workdir).free
    paths = generate_inputs(args.workdir, shape, args.experts, args.shard_size, args.noise)
    input_bytes = sum(folder_bytes(p) for p in paths.values())
    print(f"inputs: {len(paths)} checkpoints, {input_bytes / GB:.2f} GB; "
          f"{shape.parameter_count():,} parameters each")
    if args.generate_only:
        return 0
    if free < 3 * input_bytes / (args.experts + 1):
        print(f"warning: only {free / GB:.1f} GB free in {args.workdir}")
    warm_page_cache(paths.values())

    run_dir = args.workdir / "runs"
    run_dir.mkdir(exist_ok=True)
    env = dict(os.environ, PYTHONHASHSEED="0", TOKENIZERS_PARALLELISM="false")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO / "src"), env.get("PYTHONPATH")]))
    tools = args.tools.split(",")
    runs = []
    for method in args.methods.split(","):
        plans = []
        if "layermerge" in tools:
            plans.append(("layermerge", "float32", layermerge_command))
        if "mergekit" in tools:
            for compute in args.mergekit_dtype.split(","):
                plans.append(("mergekit", compute, mergekit_command))
        for tool, compute, build in plans:
            out = run_dir / f"out-{tool}-{method}"
            shutil.rmtree(out, ignore_errors=True)
            extra = (compute,) if tool == "mergekit" else ()
            command = build(method, paths, out, args.shard_size, run_dir, *extra)
            label = f"{tool} {method}" + (f" (compute {compute})" if tool == "mergekit" else "")
            print(f"running {label} ...", flush=True)
            result = measure(command, run_dir / f"{tool}-{method}-{compute}.log", env=env)
            result.update(tool=tool, method=method, compute_dtype=compute,
                          output_gb=round(folder_bytes(out) / GB, 3) if out.exists() else 0.0,
                          command=" ".join(command))
            if result["returncode"] != 0:
                log = (run_dir / f"{tool}-{method}-{compute}.log").read_text()[-3000:]
                print(f"  FAILED (exit {result['returncode']}):\n{log}")
            else:
                print(f"  {result['wall_s']:.1f} s, peak RSS {result['peak_rss_gb']:.2f} GB", flush=True)
            runs.append(result)
            shutil.rmtree(out, ignore_errors=True)

    for run in runs:
        reference = next((r for r in runs if r["tool"] == "mergekit" and r["method"] == run["method"]
                          and r["compute_dtype"] == "float32" and r["returncode"] == 0), None)
        if reference and run["returncode"] == 0:
            run["time_ratio_vs_mergekit_fp32"] = round(run["wall_s"] / reference["wall_s"], 3)
            run["rss_ratio_vs_mergekit_fp32"] = round(run["peak_rss_gb"] / reference["peak_rss_gb"], 3)
            run["cpu_ratio_vs_mergekit_fp32"] = round(run["cpu_s"] / reference["cpu_s"], 3)

    print()
    header = f"{'tool':<11}{'method':<17}{'compute':<9}{'wall s':>8}{'cpu s':>8}{'peak RSS GB':>13}" \
             f"{'anon GB':>9}{'time/mk':>9}{'cpu/mk':>8}{'RSS/mk':>8}"
    print(header)
    print("-" * len(header))
    for run in runs:
        ratio_t = run.get("time_ratio_vs_mergekit_fp32")
        ratio_m = run.get("rss_ratio_vs_mergekit_fp32")
        ratio_c = run.get("cpu_ratio_vs_mergekit_fp32")
        print(f"{run['tool']:<11}{run['method']:<17}{run['compute_dtype']:<9}{run['wall_s']:>8.1f}{run['cpu_s']:>8.1f}"
              f"{run['peak_rss_gb']:>13.2f}{run['peak_anon_gb_sampled']:>9.2f}"
              f"{(f'{ratio_t:.2f}' if ratio_t else '-'):>9}{(f'{ratio_c:.2f}' if ratio_c else '-'):>8}"
              f"{(f'{ratio_m:.2f}' if ratio_m else '-'):>8}")

    report = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "memory_gib": round(_total_memory() / GiB, 1),
                    "platform": platform.platform(), "python": platform.python_version()},
        "versions": _versions(),
        "model": {**asdict(shape), "parameters": shape.parameter_count(), "dtype": "bfloat16",
                  "experts": args.experts, "noise_std": args.noise},
        "input_gb": round(input_bytes / GB, 3), "shard_size": args.shard_size,
        "layermerge_params": LAYERMERGE_PARAMS,
        "mergekit_params": {m: dict(zip(("global", "per_model"), mergekit_params(m)))
                            for m in LAYERMERGE_PARAMS},
        "runs": runs,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {args.json}")
    return 0 if all(r["returncode"] == 0 for r in runs) else 1


def _total_memory() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in ("layermerge", "mergekit", "torch", "safetensors", "transformers"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = None
    return found


if __name__ == "__main__":
    sys.exit(main())
