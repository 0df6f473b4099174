"""ProDistill before and after (issue 15): wall time, peak RSS and quality of settings side by side,
with the code of an older commit measured in the same invocation.

    .venv/bin/python benchmarks/prodistill_speed.py --track glue8-minilm --seeds 0 --threads 2 \
        --run old@23e7634:epochs=20 --run new:epochs=20 --run new:patience=2,tolerance=0.01 \
        --split validation --json benchmarks/results/prodistill_speed_glue8.json

Each ``--run LABEL[@COMMIT]:KEY=VALUE,...`` is one ProDistill merge per seed, made exactly as
``layermerge bench`` makes its rows: ``layermerge merge CONFIG`` in a child process under
``layermerge.bench.measure`` (wall seconds and peak RSS of that process), with the track's experts,
shots, max length and seed (data.seed = engine.seed). ``@COMMIT`` runs the merge with that commit's
code (exported by ``git archive`` into a temporary folder and put first on PYTHONPATH); without it,
this checkout's code. Parameters are the method's (anything else ``name=value`` under ``engine.``,
e.g. ``engine.regroup_by_length=false``). The merged model is then scored with this checkout's
evaluation on ``--split`` (validation to choose settings; the track's seeded subset size), and
normalised by each expert's score on the same split. Runs alternate seed by seed, so slow drift of
the machine's load hits every setting alike. Experts must already be fine-tuned
(``layermerge bench TRACK --stages experts``).

Generation tracks keep their selection split in files of their own (a task spec's ``validation``
file would change the spec, hence the experts' cache keys): ``--score-tasks SPEC,...`` scores on
those specs instead (same task names), e.g. for the LLM track

    .venv/bin/python benchmarks/prodistill_speed.py --track benchmarks/tracks/llm-smol.yaml \
        --score-tasks benchmarks/llm/validation/chain_sum/task.yaml,... --split validation \
        --threads 1 --run paper:lr=0.1,init=0.3,epochs=10 --run lr01:lr=0.01,init=0.3,epochs=10

``--method regmean`` (or any data-driven method) measures that method instead, as a reference row.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent


def parse_run(text: str) -> dict:
    label, _, settings = text.partition(":")
    label, _, commit = label.partition("@")
    params, engine = {}, {}
    for item in filter(None, settings.split(",")):
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--run {text!r}: settings are KEY=VALUE separated by commas")
        (engine if key.startswith("engine.") else params)[key.removeprefix("engine.")] = yaml.safe_load(value)
    return {"label": label, "commit": commit or None, "params": params, "engine": engine}


def export_commit(commit: str, into: Path) -> Path:
    """The commit's tree under ``into``; returns its ``src`` folder (what PYTHONPATH needs)."""
    into.mkdir(parents=True, exist_ok=True)
    archive = into / "tree.tar"
    with archive.open("wb") as handle:
        subprocess.run(["git", "-C", str(REPO), "archive", commit], stdout=handle, check=True)
    with tarfile.open(archive) as tar:
        tar.extractall(into / "tree", filter="data")
    return into / "tree" / "src"


def measured_merge(config: dict, folder: Path, name: str, pythonpath: Path | None, threads: int) -> dict:
    config_path, output, result = folder / f"{name}.yaml", folder / name, folder / f"{name}.measure.json"
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    if pythonpath is not None:
        env["PYTHONPATH"] = str(pythonpath) + os.pathsep + env.get("PYTHONPATH", "")
    command = [sys.executable, "-m", "layermerge.bench.measure", str(result), "--", "merge", str(config_path),
               "--output", str(output), "--overwrite", "--quiet"]
    started = time.perf_counter()
    process = subprocess.run(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    cost = json.loads(result.read_text()) if result.is_file() else {}
    cost["process_wall_s"] = round(time.perf_counter() - started, 2)
    if process.returncode != 0:
        raise SystemExit(f"merge {name} failed: {process.stderr.strip().splitlines()[-1:]}")
    summary = json.loads((output / "layermerge_summary.json").read_text()).get("summary", {})
    blocks_file = output / "prodistill" / "blocks.json"
    blocks = json.loads(blocks_file.read_text())["blocks"] if blocks_file.is_file() else []
    cost["output"] = str(output)
    cost["epochs_run"] = [block["stats"].get("epochs_run") for block in blocks]
    cost["loss_final"] = [block["stats"].get("loss_final") for block in blocks]
    cost["epoch_losses"] = [block["stats"].get("epoch_losses") for block in blocks]
    cost["padding_share"] = summary.get("padding_share")
    return cost


def track_context(track_name: str, cache_dir: Path | None = None):
    """The bench context of a track whose experts are fine-tuned, with its base located."""
    from layermerge.bench.runner import BenchContext, locate_cached_experts, model_folder
    from layermerge.bench.tracks import load_track
    from layermerge.finetune import cache_root

    track = load_track(track_name)
    ctx = BenchContext(track, workdir=Path(tempfile.gettempdir()), cache_dir=cache_root(cache_dir), quiet=True)
    if not locate_cached_experts(ctx):
        raise SystemExit(f"the experts of {track.name} are not fine-tuned yet: run "
                         f"`layermerge bench {track.name} --stages experts` first")
    if ctx.base is None:
        from layermerge.demo import minilm_path, prepared_base_path
        from layermerge.finetune import make_settings, vision_base_folder

        if track.base == "minilm":
            ctx.base = prepared_base_path(minilm_path(), ctx.cache_dir)
        elif track.base.startswith("vision:"):
            ctx.base = vision_base_folder(track.base.split(":", 1)[1], ctx.cache_dir,
                                          make_settings(**track.recipe).image_size)
        else:
            ctx.base = model_folder(track.base, ctx.cache_dir)
    return ctx


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--track", default="glue8-minilm")
    parser.add_argument("--run", action="append", required=True, metavar="LABEL[@COMMIT]:KEY=VALUE,...")
    parser.add_argument("--seeds", default="0", help="comma-separated sampling seeds (default 0)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--split", default="validation", choices=("validation", "train", "test"),
                        help="where to score (image tasks have no validation split: train, a seeded subset "
                             "of which the 64 shots are a sliver, is the selection split there)")
    parser.add_argument("--cache-dir", type=Path, default=None)
    parser.add_argument("--method", default="prodistill", help="the data-driven method to run (default prodistill)")
    parser.add_argument("--score-tasks", default=None, metavar="SPEC,...",
                        help="task spec files to score on instead of the track's tasks (same names; for a "
                             "generation track's own validation files)")
    parser.add_argument("--json", type=Path, default=None, help="add the runs to this JSON file")
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    from layermerge.bench.runner import Run, merge_config
    from layermerge.eval.evaluate import evaluate_task
    from layermerge.methods.registry import get_method

    ctx = track_context(args.track, args.cache_dir)
    track = ctx.track
    runs = [parse_run(text) for text in args.run]
    seeds = [int(s) for s in args.seeds.split(",")]

    names = track.task_names()
    scored = dict(zip(names, track.tasks))
    if args.score_tasks:
        from layermerge.data.tasks import get_task

        scored = {get_task(spec).name: spec for spec in args.score_tasks.split(",")}
        if sorted(scored) != sorted(names):
            raise SystemExit(f"--score-tasks names {sorted(scored)}, the track's tasks are {sorted(names)}")

    def score(output: str) -> dict:
        return {name: evaluate_task(output, task, args.split, track.eval_examples, max_length=track.max_length,
                                    data_dir=track.data_dir).score for name, task in scored.items()}

    expert_scores = {name: evaluate_task(ctx.experts[name], task, args.split, track.eval_examples,
                                         max_length=track.max_length, data_dir=track.data_dir).score
                     for name, task in scored.items()}

    def save(path: Path, entries: list) -> None:
        """Add ``entries`` to the JSON file (with the experts' scores on this split)."""
        existing = json.loads(path.read_text()) if path.is_file() else {"runs": []}
        existing["runs"].extend({**r, "track": track.name, "split": args.split, "threads": args.threads,
                                 "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                                 "command": "python benchmarks/prodistill_speed.py " + " ".join(sys.argv[1:])}
                                for r in entries)
        existing["expert_scores"] = {**existing.get("expert_scores", {}),
                                     f"{track.name}/{args.split}": expert_scores}
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(existing, indent=2) + "\n")

    if args.json is not None:
        save(args.json, [])
    results = []
    with tempfile.TemporaryDirectory(prefix="prodistill-speed-") as scratch:
        scratch = Path(scratch)
        trees = {run["commit"]: export_commit(run["commit"], scratch / run["commit"])
                 for run in runs if run["commit"]}
        for seed in seeds:
            for run in runs:
                base_params = dict(track.method_params.get(args.method, {}))
                data_driven = get_method(args.method).needs_data    # a data-free method takes no data section
                config = merge_config(ctx, Run(row=run["label"], method=args.method,
                                               params={**base_params, **run["params"]},
                                               shots=track.shots if data_driven else None, seed=seed))
                if data_driven:
                    config["engine"] = {"device": "cpu", "seed": seed, **run["engine"]}
                name = f"{run['label']}-seed{seed}"
                print(f"[{datetime.now().strftime('%H:%M:%S')}] {name}: merging", flush=True)
                cost = measured_merge(config, scratch, name, trees.get(run["commit"]), args.threads)
                scores = score(cost.pop("output"))
                normalised = {t: 100 * scores[t] / expert_scores[t] for t in scored}
                entry = {"label": run["label"], "commit": run["commit"], "seed": seed, "method": args.method,
                         "params": config["params"],
                         "engine": run["engine"], "wall_s": cost.get("wall_s"),
                         "peak_rss_mib": cost.get("peak_rss_mib"),
                         "epochs_run": cost.get("epochs_run"), "padding_share": cost.get("padding_share"),
                         "loss_final": cost.get("loss_final"), "epoch_losses": cost.get("epoch_losses"),
                         "scores": scores, "normalised": normalised,
                         "normalised_average": sum(normalised.values()) / len(normalised)}
                results.append(entry)
                if args.json is not None:           # after every run: a long sweep that stops keeps its rows
                    save(args.json, [entry])
                print(f"    wall {entry['wall_s']} s, peak {entry['peak_rss_mib']} MiB, normalised "
                      f"{entry['normalised_average']:.2f}, epochs {entry['epochs_run']}", flush=True)
                shutil.rmtree(scratch / name, ignore_errors=True)

    print(f"\n{'run':<24} {'seeds':>5} {'wall s':>8} {'x vs first':>10} {'normalised':>10}")
    first = None
    for run in runs:
        rows = [r for r in results if r["label"] == run["label"]]
        wall = sum(r["wall_s"] for r in rows) / len(rows)
        quality = [r["normalised_average"] for r in rows]
        mean = sum(quality) / len(quality)
        spread = (sum((q - mean) ** 2 for q in quality) / (len(quality) - 1)) ** 0.5 if len(quality) > 1 else 0.0
        first = first or wall
        print(f"{run['label']:<24} {len(rows):>5} {wall:8.1f} {first / wall:10.2f} {mean:7.2f} ± {spread:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
