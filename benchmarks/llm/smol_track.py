"""A first LLM track (issue 18, partial): SmolLM2-135M-Instruct (its GGUF), three experts fully fine-tuned
on three reasoning-gym generators, merged data-free and by ProDistill, every model scored by greedy
decoding on the test split with reasoning-gym's scorers. One sampling seed; results as JSON.

    .venv/bin/python benchmarks/llm/smol_track.py --gguf PATH.gguf --tasks /tmp/llm_tasks \\
        --generators chain_sum,sentence_reordering,spell_backward --json benchmarks/results/llm_smol.json
"""

import argparse
import json
import time
from pathlib import Path

import layermerge
from layermerge.eval.evaluate import evaluate_task
from layermerge.finetune import finetune
from layermerge.io.inputs import open_input

RECIPE = {"epochs": 2, "lr": 1e-4, "batch_size": 8, "max_length": 256, "max_train_examples": 512, "seed": 0}
MERGES = {"task_arithmetic": {"scaling": 0.4}, "ties": {"density": 0.2}, "dare_ties": {"drop_rate": 0.8, "seed": 0},
          "prodistill": {"epochs": 10, "lr": 0.1, "init": 0.3}}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--gguf", required=True)
    parser.add_argument("--tasks", required=True, help="folder written by make_tasks.py")
    parser.add_argument("--generators", required=True)
    parser.add_argument("--test", type=int, default=200)
    parser.add_argument("--shots", type=int, default=32)
    parser.add_argument("--cache", default="/tmp/llm_cache")
    parser.add_argument("--json", required=True)
    parser.add_argument("--pair", help="two generators: also merge only those two experts (the paper's setting)")
    parser.add_argument("--prodistill-seeds", default="0",
                        help="sampling seeds of the ProDistill rows (seed 0 is the row 'prodistill')")
    args = parser.parse_args()
    out = Path(args.json)
    record = json.loads(out.read_text()) if out.is_file() else {}
    record.setdefault("scores", {})
    base = open_input(Path(args.gguf), "base model").folder
    specs = {g.replace("_", "-"): Path(args.tasks) / g / "task.yaml" for g in args.generators.split(",")}
    record.update({"base": str(args.gguf), "recipe": RECIPE, "test_examples": args.test, "shots": args.shots,
                   "merges": MERGES, "command": "benchmarks/llm/smol_track.py"})

    def save():
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(record, indent=1) + "\n")

    def score(label, folder):
        if label in record["scores"]:
            return
        started = time.time()
        record["scores"][label] = {t: evaluate_task(folder, spec, "test", args.test, batch_size=16).score
                                   for t, spec in specs.items()}
        record["scores"][label]["eval_s"] = round(time.time() - started, 1)
        print(label, record["scores"][label], flush=True)
        save()

    experts = {}
    for name, spec in specs.items():
        started = time.time()
        result = finetune(base, spec, cache_dir=args.cache, quiet=True, **RECIPE)
        experts[name] = result.path
        record.setdefault("finetune_s", {})[name] = result.record.get("seconds", round(time.time() - started, 1))
        print("expert", name, result.path, flush=True)
    score("base", base)
    for name, folder in experts.items():
        score(f"expert {name}", folder)
    data = {"shots": args.shots, "max_length": 256, "tasks": {n: str(s) for n, s in specs.items()}}
    runs = [(method, method, 0) for method in MERGES]
    runs += [(f"prodistill seed {seed}", "prodistill", int(seed)) for seed in args.prodistill_seeds.split(",")
             if int(seed) != 0]
    for label, method, seed in runs:
        if label in record["scores"]:
            continue
        started = time.time()
        kwargs = {"data": {**data, "seed": seed}, "seed": seed} if method == "prodistill" else {}
        merged = layermerge.merge(base, experts, method, output=Path(args.cache) / f"merged-{method}", overwrite=True,
                                  quiet=True, **kwargs, **MERGES[method])
        record.setdefault("merge_s", {})[label] = round(time.time() - started, 1)
        score(label, merged.path)
    if args.pair:
        pair = [g.replace("_", "-") for g in args.pair.split(",")]
        pair_data = {**data, "tasks": {n: data["tasks"][n] for n in pair}}
        for method in MERGES:
            label = f"pair {'+'.join(pair)}: {method}"
            if label in record["scores"]:
                continue
            params = {**MERGES[method], "init": 0.5} if method == "prodistill" else MERGES[method]
            started = time.time()
            merged = layermerge.merge(base, {n: experts[n] for n in pair}, method, quiet=True, overwrite=True,
                                      output=Path(args.cache) / f"merged-pair-{method}",
                                      **({"data": pair_data} if method == "prodistill" else {}), **params)
            record.setdefault("merge_s", {})[label] = round(time.time() - started, 1)
            started = time.time()
            record["scores"][label] = {t: evaluate_task(merged.path, specs[t], "test", args.test, batch_size=16).score
                                       for t in pair}
            record["scores"][label]["eval_s"] = round(time.time() - started, 1)
            print(label, record["scores"][label], flush=True)
            save()


if __name__ == "__main__":
    main()
