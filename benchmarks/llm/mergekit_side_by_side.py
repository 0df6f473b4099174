"""The LLM track's data-free merges by mergekit and by layermerge from the same mergekit YAML: wall time and
peak RSS of each (its own process, /usr/bin/time), and the largest difference between their tensors.

    .venv/bin/python benchmarks/llm/mergekit_side_by_side.py --base BASE_DIR --experts a=DIR,b=DIR,c=DIR \\
        --workdir /tmp/mk_side --json benchmarks/results/llm_smol_mergekit.json
"""

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch

from layermerge.io.reader import CheckpointReader

BIN = Path(sys.executable).parent
CONFIGS = {   # mergekit's parameters; layermerge converts the same file (docs/MERGEKIT.md)
    "task_arithmetic": ({"weight": 0.4}, {}),
    "ties": ({"weight": 1.0, "density": 0.2}, {"normalize": True}),
    "dare_ties": ({"weight": 1.0, "density": 0.2}, {"normalize": True}),
}


def timed(command: list[str], log: Path) -> dict:
    result = subprocess.run(["/usr/bin/time", "-f", "%e %M", *command], capture_output=True, text=True)
    log.write_text(result.stdout + result.stderr)
    wall, rss = result.stderr.strip().splitlines()[-1].split()
    return {"exit_code": result.returncode, "wall_s": float(wall), "peak_rss_mib": round(int(rss) / 1024, 1)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--base", required=True)
    parser.add_argument("--experts", required=True)
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--json", required=True)
    args = parser.parse_args()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    experts = dict(item.split("=", 1) for item in args.experts.split(","))
    results = {}
    for method, (model_params, global_params) in CONFIGS.items():
        config = {"merge_method": method, "base_model": args.base, "dtype": "float32",
                  "models": [{"model": path, "parameters": model_params} for path in experts.values()],
                  **({"parameters": global_params} if global_params else {})}
        yml = work / f"{method}.yml"
        yml.write_text(json.dumps(config))
        subprocess.run(["rm", "-rf", str(work / f"mk_{method}"), str(work / f"lm_{method}")], check=True)
        row = {"mergekit": timed([str(BIN / "mergekit-yaml"), str(yml), str(work / f"mk_{method}")],
                                 work / f"mk_{method}.log"),
               "layermerge": timed([str(BIN / "layermerge"), "merge", str(yml), "-o", str(work / f"lm_{method}"), "-q"],
                                   work / f"lm_{method}.log")}
        ours, theirs = CheckpointReader(work / f"lm_{method}"), CheckpointReader(work / f"mk_{method}")
        shared = sorted(set(ours.keys()) & set(theirs.keys()))
        row["keys"] = {"layermerge": len(ours.keys()), "mergekit": len(theirs.keys()), "shared": len(shared)}
        row["max_abs_diff"] = max((ours.get(k).float() - theirs.get(k).float()).abs().max().item() for k in shared)
        row["time_ratio"] = round(row["layermerge"]["wall_s"] / row["mergekit"]["wall_s"], 3)
        row["rss_ratio"] = round(row["layermerge"]["peak_rss_mib"] / row["mergekit"]["peak_rss_mib"], 3)
        results[method] = row
        print(method, json.dumps(row), flush=True)
    Path(args.json).write_text(json.dumps({"command": "benchmarks/llm/mergekit_side_by_side.py", "base": args.base,
                                           "results": results}, indent=1) + "\n")


if __name__ == "__main__":
    torch.set_num_threads(2)
    main()
