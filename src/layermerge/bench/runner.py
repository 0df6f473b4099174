"""`layermerge bench TRACK`: experts → references → every method × seed → ablations → report.

Every stage is cached on disk and resumable: experts by the hash of their recipe (``finetune``'s
cache), scores of experts and the ensemble by expert key and evaluation settings, and each merge
run (method, parameters, shots, seed) as one JSON record under ``<workdir>/runs``. Stopping at any
point and rerunning continues where it stopped; ``rerun`` recomputes named rows.

Each merge runs as ``python -m layermerge.bench.measure ... -- merge CONFIG`` in its own process,
so its wall time and peak RSS are its own. Task Arithmetic's merge is re-measured once in every
invocation that runs merges, and every record stores its cost as a ratio to that same-invocation
baseline (the machine's speed drifts between invocations; ratios in one invocation do not).
"""

from __future__ import annotations

import codecs
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import yaml

from layermerge import __version__
from layermerge.bench.tracks import TrackConfig
from layermerge.errors import ConfigError

BASELINE = "task_arithmetic"


@dataclass
class Run:
    """One merge to make and score: a row of a table at one seed."""

    row: str                       # table row, e.g. "ties" or "shots=4"
    method: str
    params: dict
    shots: int | None              # None for data-free methods
    seed: int | None               # sampling seed (data-driven) or the method's own seed (DARE); None: neither
    study: str = "main"            # "main" or the ablation's name
    experts: list[str] | None = None   # a subset of the track's experts (pairwise rows); None: all


def scratch_name(pid: int) -> str:
    """``<host>-<pid>``: a workdir shared between machines never mistakes another host's live run for a dead one."""
    return f"{platform.node() or 'host'}-{pid}"


def remove_stale_scratch(workdir: Path) -> list[Path]:
    """Remove scratch folders that invocations on this host left behind when they were killed (a merged
    model each, hundreds of MiB); folders of live processes and of other hosts stay."""
    removed = []
    prefix = scratch_name(0)[:-1]
    for folder in sorted((workdir / "scratch").glob(f"{prefix}*")):
        pid = folder.name[len(prefix):]
        if folder.is_dir() and pid.isdigit() and not process_alive(int(pid)):
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    return removed


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:            # alive, owned by another user
        return True
    return True


@dataclass
class BenchContext:
    """What every stage needs: the track, where things go, the experts once trained."""

    track: TrackConfig
    workdir: Path
    cache_dir: Path
    quiet: bool = False
    device: str = "cpu"
    base: Path | None = None
    experts: dict[str, Path] = field(default_factory=dict)
    expert_keys: dict[str, str] = field(default_factory=dict)
    expert_scores: dict[str, dict] = field(default_factory=dict)
    ensemble_scores: dict[str, dict] = field(default_factory=dict)
    base_scores: dict[str, dict] = field(default_factory=dict)
    invocation: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))
    baseline_cost: dict | None = None

    @property
    def scratch(self) -> Path:
        """This invocation's own folder for configs and merged outputs: two invocations on one workdir
        (a report while a track runs) never remove each other's files."""
        return self.workdir / "scratch" / scratch_name(os.getpid())

    def say(self, message: str) -> None:
        if not self.quiet:
            print(message, flush=True)


# --------------------------------------------------------------------------- stage 1: experts
def model_folder(base: str, cache_dir: Path, convert: bool = True) -> Path | None:
    """The Hugging Face folder of a track's base: the folder itself, or a GGUF's cached conversion
    (made first when ``convert``; None when it is not there yet)."""
    from layermerge.bench.tracks import resolve_base_file
    from layermerge.io import gguf

    path = resolve_base_file(base)
    if not gguf.is_gguf(path):
        return path
    if convert:
        return gguf.GgufReader(path, "base model", cache_dir=cache_dir).folder
    target = gguf.cached_folder_for(path, gguf.gguf_sha256(path), cache_dir)
    return target if gguf.is_converted(target) else None


def prepare_experts(ctx: BenchContext) -> None:
    """Fine-tune (or find cached) one expert per task with the track's recipe."""
    from layermerge.finetune import finetune, make_settings, vision_base_folder

    track = ctx.track
    settings = make_settings(**track.recipe)
    if track.base == "minilm":
        from layermerge.demo import minilm_path, prepare_base

        ctx.base = prepare_base(minilm_path(), ctx.cache_dir)
        source: object = ctx.base
    elif track.base.startswith("vision:"):
        ctx.base = vision_base_folder(track.base.split(":", 1)[1], ctx.cache_dir, settings.image_size)
        source = track.base
    else:
        ctx.base = model_folder(track.base, ctx.cache_dir)
        source = ctx.base
    specs = track.task_specs()
    for number, spec in enumerate(specs, 1):
        ctx.say(f"[experts {number}/{len(specs)}] {spec.name}: fine-tuning (cached by recipe hash)")
        result = finetune(source, spec, cache_dir=ctx.cache_dir, settings=settings, data_dir=track.data_dir,
                          quiet=ctx.quiet)
        ctx.experts[spec.name], ctx.expert_keys[spec.name] = result.path, result.key


def _digest(record: dict) -> str:
    return hashlib.sha256(json.dumps(record, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _cached_json(path: Path, compute: Callable[[], dict]) -> dict:
    if path.is_file():
        try:
            return json.loads(path.read_text())
        except ValueError:
            pass            # a torn file from an interrupted run: recompute
    value = compute()
    _write_json(path, value)
    return value


def _write_json(path: Path, value: dict) -> None:
    """Write whole or not at all: a reader never sees half a record."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f".{path.name}.tmp")
    temp.write_text(json.dumps(value, indent=2, default=str) + "\n")
    os.replace(temp, path)


def eval_settings(track: TrackConfig) -> dict:
    return {"split": "test", "max_examples": track.eval_examples, "max_length": track.max_length, "seed": 0}


def locate_cached_experts(ctx: BenchContext) -> bool:
    """Fill in the experts from the cache without training or writing anything (for a dry run);
    False when some expert is not fine-tuned yet, so run records cannot be told apart."""
    from layermerge.finetune import find_cached_expert, make_settings

    track = ctx.track
    source: object = track.base           # "vision:<name>" or a model folder, as prepare_experts uses them
    if track.base == "minilm":
        from layermerge.demo import minilm_path, prepared_base_path

        source = prepared_base_path(minilm_path(), ctx.cache_dir)
        if not (source / "config.json").is_file():
            return False
    elif not track.base.startswith("vision:"):
        source = model_folder(track.base, ctx.cache_dir, convert=False)
        if source is None:
            return False
    settings = make_settings(**track.recipe)
    for spec in track.task_specs():
        found = find_cached_expert(source, spec, cache_dir=ctx.cache_dir, settings=settings,
                                   data_dir=track.data_dir)
        if found is None:
            return False
        ctx.experts[spec.name], ctx.expert_keys[spec.name] = found.path, found.key
    return True


# --------------------------------------------------------------------------- stage 2: references
def score_references(ctx: BenchContext) -> None:
    """Each expert on its own task, and the ensemble of all experts on every task (cached)."""
    from layermerge.bench.ensemble import evaluate_ensemble
    from layermerge.eval.evaluate import evaluate_task

    track, settings = ctx.track, eval_settings(ctx.track)
    specs = {spec.name: spec for spec in track.task_specs()}
    for task, spec in specs.items():
        key = _digest({"expert": ctx.expert_keys[task], **settings, "layermerge": __version__})
        ctx.expert_scores[task] = _cached_json(
            ctx.workdir / "references" / f"expert-{task}-{key}.json",
            lambda task=task, spec=spec: evaluate_task(ctx.experts[task], spec, "test", track.eval_examples,
                                                       max_length=track.max_length, data_dir=track.data_dir).to_dict())
        ctx.say(f"expert {task}: {ctx.expert_scores[task]['score']:.2f}")
    if track.base_reference:
        from layermerge.finetune import base_fingerprint

        base_key = base_fingerprint(ctx.base)
        for task, spec in specs.items():
            key = _digest({"base": base_key, "task": spec.record(), **settings, "layermerge": __version__})
            ctx.base_scores[task] = _cached_json(
                ctx.workdir / "references" / f"base-{task}-{key}.json",
                lambda spec=spec: evaluate_task(ctx.base, spec, "test", track.eval_examples,
                                                max_length=track.max_length, data_dir=track.data_dir).to_dict())
            ctx.say(f"base on {task}: {ctx.base_scores[task]['score']:.2f}")
    if not track.ensemble:
        return
    for task, spec in specs.items():
        if spec.is_generation:       # a logit ensemble scores classifiers; answers are decoded one model at a time
            continue
        key = _digest({"experts": ctx.expert_keys, "task": task, **settings, "layermerge": __version__})
        ctx.ensemble_scores[task] = _cached_json(
            ctx.workdir / "references" / f"ensemble-{task}-{key}.json",
            lambda spec=spec: evaluate_ensemble(ctx.base, ctx.experts, spec, max_examples=track.eval_examples,
                                                max_length=track.max_length, data_dir=track.data_dir).to_dict())
        ctx.say(f"ensemble on {task}: {ctx.ensemble_scores[task]['score']:.2f}")


# --------------------------------------------------------------------------- stage 3/4: plan the runs
def track_methods(track: TrackConfig) -> list[str]:
    """The methods of the main table: every eligible registered method for 'all'."""
    from layermerge.methods.registry import available_methods, get_method

    if track.methods != "all":
        return [get_method(name).name for name in track.methods]
    n = len(track.tasks)
    chosen = []
    for name, info in available_methods().items():
        if info.min_experts > n or (info.max_experts is not None and info.max_experts < n):
            continue           # SLERP takes exactly two models
        chosen.append(name)
    return chosen


def _has_seed_param(method: str) -> bool:
    from layermerge.methods.registry import get_method

    return "seed" in get_method(method).params_model.model_fields


def plan_runs(track: TrackConfig, studies: set[str]) -> list[Run]:
    """Every (row, seed) of the main table ("main" in ``studies``) and of the named ablations."""
    runs: list[Run] = []
    if "main" in studies:
        for method in track_methods(track):
            runs += row_runs(method, method, dict(track.method_params.get(method, {})), track.shots, track.seeds)
    seeds = track.ablation_seeds or track.seeds
    for study, rows in track.ablations.items():
        if study not in studies and "ablations" not in studies:
            continue
        for row in rows:
            params = {**track.method_params.get(row.method, {}), **row.params}
            runs += row_runs(row.label, row.method, params, row.shots or track.shots, row.seeds or seeds, study,
                             row.experts)
    return runs


def row_runs(row: str, method: str, params: dict, shots: int, seeds: list[int], study: str = "main",
             experts: list[str] | None = None) -> list[Run]:
    """A row's runs: one per sampling seed for data-driven methods, one per seed of a random data-free
    method (DARE), a single run otherwise."""
    from layermerge.methods.registry import get_method

    if get_method(method).needs_data:
        return [Run(row, method, params, shots, s, study, experts) for s in seeds]
    if _has_seed_param(method):
        return [Run(row, method, {**params, "seed": s}, None, s, study, experts) for s in seeds]
    return [Run(row, method, params, None, None, study, experts)]


# --------------------------------------------------------------------------- one run
def run_tasks(ctx: BenchContext, run: Run) -> list:
    """The task specs a run merges and is scored on: its experts' (pairwise rows), else all the track's."""
    return [spec for spec in ctx.track.task_specs() if run.experts is None or spec.name in run.experts]


def merge_config(ctx: BenchContext, run: Run) -> dict:
    names = [spec.name for spec in run_tasks(ctx, run)]
    config = {"base": str(ctx.base), "experts": {t: str(ctx.experts[t]) for t in names},
              "method": run.method, "params": run.params}
    if run.shots is not None:
        config["data"] = {"shots": run.shots, "seed": run.seed, "max_length": ctx.track.max_length}
        own = {spec.name: {"task": spec.record()} for spec in run_tasks(ctx, run) if not spec.is_builtin}
        if own:
            config["data"]["tasks"] = own
        if ctx.track.data_dir is not None:
            config["data"]["data_dir"] = ctx.track.data_dir
        config["engine"] = {"device": ctx.device, "seed": run.seed}
    return config


def run_key(ctx: BenchContext, run: Run) -> str:
    from layermerge.methods.registry import get_method, validate_params

    params = validate_params(get_method(run.method), dict(run.params)).model_dump()
    data = {"shots": run.shots, "seed": run.seed, "max_length": ctx.track.max_length} if run.shots else None
    experts = {t: ctx.expert_keys[t] for t in (run.experts or ctx.expert_keys)}
    return _digest({"experts": experts, "method": run.method, "params": params, "data": data,
                    "eval": eval_settings(ctx.track), "layermerge": __version__})


def record_path(ctx: BenchContext, run: Run) -> Path:
    return ctx.workdir / "runs" / f"{run.method}-{run_key(ctx, run)}.json"


def stderr_chunks(process: subprocess.Popen):
    """The child's stderr as text, each piece as soon as it is written: a buffered ``read(4096)`` waits
    for 4 KiB, which held a slow merge's progress bar back for many minutes."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    descriptor = process.stderr.fileno()
    while chunk := os.read(descriptor, 4096):
        if text := decoder.decode(chunk):
            yield text
    if text := decoder.decode(b"", final=True):
        yield text


def measured_merge(ctx: BenchContext, config: dict, name: str) -> tuple[dict, Path]:
    """``layermerge merge`` in its own process: its exit code, wall seconds and peak RSS (MiB)."""
    scratch = ctx.scratch
    scratch.mkdir(parents=True, exist_ok=True)
    config_path, output, result = scratch / f"{name}.yaml", scratch / name, scratch / f"{name}.measure.json"
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    result.unlink(missing_ok=True)
    command = [sys.executable, "-m", "layermerge.bench.measure", str(result), "--", "merge", str(config_path),
               "--output", str(output), "--overwrite"] + (["--quiet"] if ctx.quiet else [])
    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=None if not ctx.quiet else subprocess.DEVNULL,
                               stderr=subprocess.PIPE)
    tail = ""
    for chunk in stderr_chunks(process):
        if not ctx.quiet:              # progress bars pass through; the tail is kept for the error line
            sys.stderr.write(chunk)
            sys.stderr.flush()
        tail = (tail + chunk)[-8192:]
    returncode = process.wait()
    cost = json.loads(result.read_text()) if result.is_file() else {"exit_code": returncode}
    cost["process_wall_s"] = round(time.perf_counter() - started, 2)
    if returncode != 0:
        lines = [line for line in tail.replace("\r", "\n").splitlines() if line.strip()]
        cost["exit_code"] = returncode
        cost["error"] = lines[-1] if lines else f"exit code {returncode}"
    return cost, output


def ensure_baseline_cost(ctx: BenchContext) -> dict:
    """Task Arithmetic's merge, measured once per invocation: the yardstick of every cost ratio."""
    if ctx.baseline_cost is None:
        config = merge_config(ctx, Run(BASELINE, BASELINE, {}, None, None))
        cost, output = measured_merge(ctx, config, "baseline-task_arithmetic")
        shutil.rmtree(output, ignore_errors=True)
        if cost.get("exit_code") != 0:
            raise ConfigError(f"the Task Arithmetic baseline merge failed: {cost.get('error')}")
        ctx.baseline_cost = cost
    return ctx.baseline_cost


SUMMARY_LIMIT = 50_000     # characters of a method's summary kept in a run record


def merge_summary(output: Path) -> dict | None:
    """The method's own facts from ``layermerge_summary.json`` (learned λ, losses, kept fractions...),
    for reading the results later; dropped when too bulky for a record (per-block stats of deep models)."""
    try:
        summary = json.loads((output / "layermerge_summary.json").read_text()).get("summary")
    except (OSError, ValueError):
        return None
    text = json.dumps(summary, default=str)
    return summary if len(text) <= SUMMARY_LIMIT else {"omitted": f"{len(text)} characters"}


def execute(ctx: BenchContext, run: Run) -> dict:
    """Merge, evaluate on every task, and return the run's record (not yet written)."""
    from layermerge.eval.evaluate import evaluate_task

    baseline = ensure_baseline_cost(ctx)
    name = f"{run.method}-{run_key(ctx, run)}"
    cost, output = measured_merge(ctx, merge_config(ctx, run), name)
    record = {"row": run.row, "study": run.study, "method": run.method, "params": run.params,
              "shots": run.shots, "seed": run.seed, "key": run_key(ctx, run), "invocation": ctx.invocation,
              "experts": run.experts, "cost": cost, "baseline_cost": baseline}
    if cost.get("exit_code") == 0:
        track = ctx.track
        record["scores"] = {t.name: evaluate_task(output, t, "test", track.eval_examples, max_length=track.max_length,
                                                  data_dir=track.data_dir).to_dict() for t in run_tasks(ctx, run)}
        record["merge_summary"] = merge_summary(output)
        record["cost"]["rss_vs_task_arithmetic"] = round(cost["peak_rss_mib"] / baseline["peak_rss_mib"], 3)
        record["cost"]["time_vs_task_arithmetic"] = round(cost["wall_s"] / max(baseline["wall_s"], 1e-3), 3)
    shutil.rmtree(output, ignore_errors=True)
    return record


def is_selected(run: Run, only: set[str] | None, seeds: set[int] | None) -> bool:
    """Whether ``--only`` (rows or methods) and ``--seeds`` let this run be made."""
    if only is not None and run.row not in only and run.method not in only:
        return False
    return seeds is None or run.seed is None or run.seed in seeds


def run_all(ctx: BenchContext, runs: list[Run], rerun: set[str] = frozenset(),
            only: set[str] | None = None, seeds: set[int] | None = None) -> list[dict]:
    """Every run, from its cached record where one exists (unless its row or method is in ``rerun``);
    with ``only`` (rows or methods) or ``seeds``, runs outside them are taken from their records or
    left out."""
    records = []
    for number, run in enumerate(runs, 1):
        path = record_path(ctx, run)
        if not is_selected(run, only, seeds):
            if path.is_file():
                records.append({**json.loads(path.read_text()), "row": run.row, "study": run.study})
            continue
        label = f"[{run.study} {number}/{len(runs)}] {run.row}" + (f" seed {run.seed}" if run.seed is not None else "")
        if path.is_file() and run.row not in rerun and run.method not in rerun:
            try:
                record = json.loads(path.read_text())
                records.append({**record, "row": run.row, "study": run.study})
                ctx.say(f"{label}: cached")
                continue
            except ValueError:
                pass
        ctx.say(f"{label}: merging with {run.method} and evaluating")
        record = execute(ctx, run)
        if record["cost"].get("exit_code") == 0:
            _write_json(path, record)      # failures are reported, not cached: a fix reruns them
            ctx.say(f"  {run.row}: average {_average(record):.2f}, merge {record['cost']['wall_s']:.1f} s, "
                    f"peak RSS {record['cost']['peak_rss_mib']:.0f} MiB")
        else:
            ctx.say(f"  {run.row} failed: {record['cost'].get('error')}")
        records.append(record)
    return records


def _average(record: dict) -> float:
    scores = [r["score"] for r in record["scores"].values()]
    return sum(scores) / len(scores)


# --------------------------------------------------------------------------- the whole track
def machine() -> dict:
    import torch

    return {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
            "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def run_status(ctx: BenchContext | None, run: Run, rerun: set[str], only: set[str] | None,
               seeds: set[int] | None) -> str:
    """What an invocation would do with this run; ``ctx`` None: the experts are not fine-tuned yet."""
    cached = ctx is not None and record_path(ctx, run).is_file()
    if not is_selected(run, only, seeds):
        return "not selected, cached" if cached else "not selected, no record"
    if not cached:
        return "to run"
    return "to rerun" if run.row in rerun or run.method in rerun else "cached"


def describe_plan(runs: list[Run], statuses: list[str]) -> str:
    lines = []
    for run, status in zip(runs, statuses):
        seed = "" if run.seed is None else f" seed {run.seed}"
        shots = "" if run.shots is None else f", {run.shots} shots"
        experts = "" if run.experts is None else f", experts {'+'.join(run.experts)}"
        lines.append(f"{run.study:>12}  {run.row}{seed}: {run.method} {run.params}{shots}{experts}  [{status}]")
    counts = {status: statuses.count(status) for status in dict.fromkeys(statuses)}
    lines.append(f"{len(runs)} runs" + (": " + ", ".join(f"{n} {s}" for s, n in counts.items()) if runs else ""))
    return "\n".join(lines)


def orphaned_records(ctx: BenchContext) -> list[Path]:
    """Records under ``<workdir>/runs`` that no run of the track's full plan would read: made with other
    settings, seeds or an older layermerge (keys include all of them). They are never reported."""
    track = ctx.track
    planned = {record_path(ctx, run) for run in plan_runs(track, {"main", "ablations"})}
    return [path for path in sorted((ctx.workdir / "runs").glob("*.json")) if path not in planned]


def print_dry_run(ctx: BenchContext, runs: list[Run], rerun: set[str], only: set[str] | None,
                  seeds: set[int] | None) -> None:
    """Print each planned run with what this invocation would do with it, and the stale records."""
    known = locate_cached_experts(ctx)
    if not known:
        print("experts: not all fine-tuned yet (the first stage trains them); every run is still to make")
    statuses = [run_status(ctx if known else None, run, rerun, only, seeds) for run in runs]
    print(describe_plan(runs, statuses) if runs else "no runs planned (stages: experts only)")
    stale = orphaned_records(ctx) if known else []
    if stale:
        print(f"{len(stale)} record(s) in {ctx.workdir / 'runs'} match no planned run (other settings or an "
              "older layermerge) and are never reported; --prune removes them")


def prune_records(ctx: BenchContext) -> list[Path]:
    """Remove the orphaned records; refuses while an expert is missing (every record would look stale)."""
    if not locate_cached_experts(ctx):
        raise ConfigError(f"cannot tell stale records of {ctx.track.name} apart before its experts are "
                          "fine-tuned: run `layermerge bench TRACK --stages experts` first")
    stale = orphaned_records(ctx)
    for path in stale:                  # deleting files is reported even when quiet
        path.unlink()
        print(f"removed {path}")
    print(f"{len(stale)} stale record(s) removed")
    return stale


def run_track(track: TrackConfig, *, workdir: Path, cache_dir: Path, studies: set[str],
              rerun: set[str] = frozenset(), only: set[str] | None = None, seeds: set[int] | None = None,
              device: str = "cpu", quiet: bool = False, dry_run: bool = False, prune: bool = False,
              command: str = "") -> dict | None:
    """Run the stages and return the results document (see ``layermerge.bench.results``).

    ``only``: run just these rows (methods or ablation labels), ``seeds``: just these sampling seeds;
    the others still enter the results from their cached records. ``dry_run``: print the planned runs,
    each with what would happen to it, and return None. ``prune``: remove the stale records, return None.
    """
    from layermerge.bench.results import build_results

    runs = plan_runs(track, studies) if studies - {"experts"} else []
    ctx = BenchContext(track, workdir, cache_dir, quiet=quiet, device=device)
    if dry_run:
        print_dry_run(ctx, runs, rerun, only, seeds)
        return None
    if prune:
        prune_records(ctx)
        return None
    workdir.mkdir(parents=True, exist_ok=True)
    for folder in remove_stale_scratch(workdir):
        ctx.say(f"removed {folder} (left by a stopped run)")
    started = time.perf_counter()
    prepare_experts(ctx)
    score_references(ctx)
    records = run_all(ctx, runs, rerun, only, seeds)
    shutil.rmtree(ctx.scratch, ignore_errors=True)
    meta = {"command": command, "date": ctx.invocation, "machine": machine(),
            "seconds": round(time.perf_counter() - started, 1), "device": device,
            "experts": {t: str(p) for t, p in ctx.experts.items()}}
    return build_results(track, records, ctx.expert_scores, ctx.ensemble_scores, meta, base_scores=ctx.base_scores)
