"""NeuLig on a small real multi-task setup: merged vs ensemble accuracy, per model mode, with and
without the alignment loss.

    .venv/bin/python benchmarks/neulig_gap.py                 # ~2 min on 2 shared CPU cores

What it does:

1. Tasks: MNIST, Fashion-MNIST, KMNIST and CIFAR-10 (grey, centre 28×28 crop) from
   ``../shared/data/vision``, as 784-pixel vectors in [0, 1].
2. One base MLP (784→256→128, ReLU) is pretrained on all four tasks at once (a 40-way head, 2,000
   training images per task, 3 epochs); each expert is the base fine-tuned with a fresh 10-way head on
   its task (3,000 other training images, 5 epochs, Adam 1e-3). Task vectors are the differences.
3. Few-shot data: 64 training images per task that neither the base nor the expert saw, seeded.
   NeuLig (``layermerge.methods.neulig``, the method code itself, through a ModelContext stand-in for
   plain modules) trains its router on them; evaluation is on 1,000 test images per task in batches
   of 64 (the per-batch mode recomputes β per test batch).
4. Configurations: boosting loss entropy (unlabelled) or cross-entropy (labels), alignment weight
   1/100 (paper) or 0; three few-shot seeds each. Baselines: each expert on its own task, weight
   averaging and Task Arithmetic (λ = 0.3), each task read by its own head.
5. Prints a table and writes ``benchmarks/results/neulig_gap.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from statistics import mean, stdev

import numpy as np
import torch
from torch import nn
from torch.func import functional_call

REPO = Path(__file__).resolve().parent.parent
DEFAULT_DATA = REPO.parent / "shared" / "data" / "vision"
DEFAULT_JSON = REPO / "benchmarks" / "results" / "neulig_gap.json"
TASKS = ("mnist", "fashion_mnist", "kmnist", "cifar10")


# --------------------------------------------------------------------- data and models
def load_task(folder: Path, name: str) -> dict[str, torch.Tensor]:
    """784-pixel float vectors in [0, 1]: grey images as they are, colour ones averaged and cropped."""
    arrays = np.load(folder / f"{name}.npz")
    out = {}
    for split in ("train", "test"):
        x = arrays[f"x_{split}"].astype(np.float32) / 255.0
        if x.ndim == 4:                                   # N×H×W×3 → grey, centre 28×28
            x = x.mean(-1)
            top = (x.shape[1] - 28) // 2
            x = x[:, top:top + 28, top:top + 28]
        out[f"x_{split}"] = torch.from_numpy(x.reshape(len(x), -1).copy())
        out[f"y_{split}"] = torch.from_numpy(arrays[f"y_{split}"].astype(np.int64))
    return out


def backbone() -> nn.Module:
    return nn.Sequential(nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 128), nn.ReLU())


def train(modules: list[nn.Module], x: torch.Tensor, y: torch.Tensor, epochs: int, generator: torch.Generator,
          batch: int = 64, lr: float = 1e-3) -> None:
    model = nn.Sequential(*modules)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(epochs):
        for index in torch.randperm(len(x), generator=generator).split(batch):
            loss = nn.functional.cross_entropy(model(x[index]), y[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()


class PlainContext:
    """The part of ``layermerge.pipeline.strategies.modelwise.ModelContext`` NeuLig uses, over plain modules: the task
    model is Sequential(backbone, head) and the features are the backbone's output."""

    def __init__(self, models: dict[str, nn.Sequential], batches: dict[str, list[dict]], seed: int):
        self.tasks = list(models)
        self.models = models
        self.merge_keys = list(next(iter(models.values()))[0].state_dict())
        self.device = torch.device("cpu")
        self.generator = torch.Generator().manual_seed(seed)
        self.quiet = True
        self._batches = batches

    def batches(self, task):
        return self._batches[task]

    def expert_state(self, task):
        return {k: v.detach().clone() for k, v in self.models[task][0].state_dict().items()}

    def logits(self, task, backbone_state, batch):
        return functional_call(self.models[task], {"0." + k: v for k, v in backbone_state.items()}, (batch["x"],))

    def features(self, task, backbone_state, batch):
        return functional_call(self.models[task][0], dict(backbone_state), (batch["x"],))

    def progress(self, iterable, desc, total=None):
        return iterable


def batched(x, y, size):
    return [{"x": x[i:i + size], "labels": y[i:i + size]} for i in range(0, len(x), size)]


def build_experts(data, args):
    generator = torch.Generator().manual_seed(args.seed)
    torch.manual_seed(args.seed)
    base = backbone()
    pre_x, pre_y, used = [], [], {}
    for offset, task in enumerate(TASKS):
        order = torch.randperm(len(data[task]["x_train"]), generator=generator)
        used[task] = order
        pick = order[:args.pretrain_per_task]
        pre_x.append(data[task]["x_train"][pick])
        pre_y.append(data[task]["y_train"][pick] + 10 * offset)
    train([base, nn.Linear(128, 10 * len(TASKS))], torch.cat(pre_x), torch.cat(pre_y), args.pretrain_epochs,
          generator)
    models, fewshot_pool = {}, {}
    for task in TASKS:
        order = used[task]
        pick = order[args.pretrain_per_task:args.pretrain_per_task + args.finetune_per_task]
        expert = backbone()
        expert.load_state_dict(base.state_dict())
        head = nn.Linear(128, 10)
        train([expert, head], data[task]["x_train"][pick], data[task]["y_train"][pick], args.finetune_epochs,
              generator)
        model = nn.Sequential(expert, head).eval()
        for p in model.parameters():
            p.requires_grad_(False)
        models[task] = model
        fewshot_pool[task] = order[args.pretrain_per_task + args.finetune_per_task:]
    return base, models, fewshot_pool


# --------------------------------------------------------------------- evaluation
def accuracy_with(models, state, batches_by_task) -> dict[str, float]:
    """Each task's accuracy when its head reads the backbone ``state`` (None: the expert's own)."""
    out = {}
    with torch.no_grad():
        for task, batches in batches_by_task.items():
            model = models[task]
            correct = total = 0
            for b in batches:
                logits = model(b["x"]) if state is None else functional_call(
                    model, {"0." + k: v for k, v in state.items()}, (b["x"],))
                correct += int((logits.argmax(1) == b["labels"]).sum())
                total += len(b["labels"])
            out[task] = correct / total
    return out


def summarise(runs: list[float]) -> dict:
    return {"mean": mean(runs), "std": stdev(runs) if len(runs) > 1 else 0.0, "runs": runs}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON)
    parser.add_argument("--seed", type=int, default=0, help="seed of the base and experts")
    parser.add_argument("--fewshot-seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--shots", type=int, default=64)
    parser.add_argument("--test-per-task", type=int, default=1000)
    parser.add_argument("--test-batch", type=int, default=64)
    parser.add_argument("--pretrain-per-task", type=int, default=2000)
    parser.add_argument("--pretrain-epochs", type=int, default=3)
    parser.add_argument("--finetune-per-task", type=int, default=3000)
    parser.add_argument("--finetune-epochs", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=300, help="NeuLig router epochs")
    parser.add_argument("--losses", nargs="+", default=["entropy", "cross_entropy"])
    parser.add_argument("--align-weights", type=float, nargs="+", default=[0.01, 0.0, 1.0])
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    sys.path.insert(0, str(REPO / "src"))
    from layermerge.methods.neulig import NeuLig, collect, evaluate, merge_states

    started = time.perf_counter()
    data = {task: load_task(args.data, task) for task in TASKS}
    base, models, pool = build_experts(data, args)
    test = {t: batched(data[t]["x_test"][:args.test_per_task], data[t]["y_test"][:args.test_per_task],
                       args.test_batch) for t in TASKS}
    states = [models[t][0].state_dict() for t in TASKS]
    base_state = base.state_dict()
    keys = list(base_state)
    baselines = {
        "experts": accuracy_with(models, None, test),
        "weight_averaging": accuracy_with(models, merge_states(states, torch.full((4,), 0.25), keys), test),
        "task_arithmetic_0.3": accuracy_with(models, {k: base_state[k] + 0.3 * sum(s[k] - base_state[k]
                                                                                  for s in states) for k in keys},
                                             test),
    }
    baselines = {name: {"mean": mean(acc.values()), "per_task": acc} for name, acc in baselines.items()}
    print(f"experts and baselines built in {time.perf_counter() - started:.1f} s")
    for name, row in baselines.items():
        print(f"  {name:22s} {100 * row['mean']:.2f}")

    configs = [(loss, weight) for loss in args.losses for weight in args.align_weights]
    results = []
    for loss, weight in configs:
        per_seed = []
        for seed in args.fewshot_seeds:
            generator = torch.Generator().manual_seed(1000 + seed)
            fewshot = {}
            for t in TASKS:
                pick = pool[t][torch.randperm(len(pool[t]), generator=generator)[:args.shots]]
                fewshot[t] = batched(data[t]["x_train"][pick], data[t]["y_train"][pick], 16)
            method = NeuLig(NeuLig.Params(loss=loss, align_weight=weight, epochs=args.epochs), list(TASKS))
            t0 = time.perf_counter()
            fit = method.fit(PlainContext(models, fewshot, seed))
            fit_seconds = time.perf_counter() - t0
            test_ctx = PlainContext(models, test, seed)
            test_data = {t: collect(test_ctx, t, fit.states) for t in TASKS}
            row = {"seed": seed, "fit_seconds": fit_seconds, "alignment_start": fit.alignment_start,
                   "alignment_end": fit.alignment_end, "global_weights": [float(w) for w in fit.global_weights],
                   "task_weights": {t: [float(w) for w in fit.task_weights[t]] for t in TASKS}}
            for how in ("first", "mean"):
                report = evaluate(test_ctx, fit, test_data, how)
                row[f"test_{how}"] = report
            per_seed.append(row)
        summary = {}
        ensemble = [r["test_first"]["modes"]["global"]["ensemble_accuracy"] for r in per_seed]
        summary["ensemble"] = summarise(ensemble)
        for mode, how in (("per_batch", "first"), ("per_batch", "mean"), ("per_task", "first"), ("global", "first")):
            name = mode if mode != "per_batch" else f"per_batch_{how}"
            modes = [r[f"test_{how}"]["modes"][mode] for r in per_seed]
            summary[name] = {"merged": summarise([m["merged_accuracy"] for m in modes]),
                             "gap": summarise([m["gap"] for m in modes]),
                             "ensemble_same_weights": summarise([m["ensemble_same_weights_accuracy"] for m in modes]),
                             "agreement": summarise([m["agreement"] for m in modes])}
        summary["alignment_end"] = summarise([r["alignment_end"] for r in per_seed])
        summary["alignment_start"] = summarise([r["alignment_start"] for r in per_seed])
        results.append({"loss": loss, "align_weight": weight, "summary": summary, "seeds": per_seed})
        print(f"\nloss={loss} align_weight={weight}: ensemble {100 * summary['ensemble']['mean']:.2f}, "
              f"(β·ε)² {summary['alignment_start']['mean']:.3g} → {summary['alignment_end']['mean']:.3g}")
        for name in ("per_batch_first", "per_batch_mean", "per_task", "global"):
            s = summary[name]
            print(f"  {name:16s} merged {100 * s['merged']['mean']:6.2f} ± {100 * s['merged']['std']:.2f}  "
                  f"gap {100 * s['gap']['mean']:6.2f}  same-weight ensemble "
                  f"{100 * s['ensemble_same_weights']['mean']:6.2f}  agreement {100 * s['agreement']['mean']:.1f}")

    command = " ".join([".venv/bin/python benchmarks/neulig_gap.py", *(argv or sys.argv[1:])])
    record = {"benchmark": "neulig_gap", "command": command,
              "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
              "tasks": list(TASKS), "baselines": baselines, "results": results,
              "seconds": time.perf_counter() - started, "python": platform.python_version(),
              "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
              "date": datetime.now(timezone.utc).strftime("%Y-%m-%d")}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(record, indent=1))
    print(f"\nwrote {args.json} ({record['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
