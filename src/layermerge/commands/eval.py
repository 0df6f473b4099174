"""`layermerge eval MODEL_DIR --tasks sst2,rte [--experts sst2=DIR,...] [--output DIR]`.

MODEL_DIR is a merged output folder (each task is scored with the merged backbone plus that task's
own head) or a single fine-tuned model. With ``--experts`` each expert is scored on its own task
too, and the report adds the normalised score (model ÷ expert).
"""

from __future__ import annotations

import json
from pathlib import Path

from layermerge.commands.common import add_threads_option, apply_threads
from layermerge.errors import ConfigError


def add_parser(subparsers):
    parser = subparsers.add_parser(
        "eval", help="evaluate a merged folder (or a model) per task; report as Markdown/JSON",
        description="Evaluate MODEL_DIR on each task's split and print a table: per-task metric, "
                    "average and, with --experts, the normalised score.")
    parser.add_argument("model", metavar="MODEL_DIR", help="merged output folder or fine-tuned model folder")
    parser.add_argument("--tasks", help="comma-separated tasks (default: every head in a merged folder, or "
                                        "the task a layermerge-fine-tuned model was trained on)")
    parser.add_argument("--experts", help="TASK=DIR pairs, comma-separated: experts scored on their own task "
                                          "for the normalised score")
    parser.add_argument("--split", default="test", choices=["train", "validation", "test"],
                        help="data split (default test)")
    parser.add_argument("--max-examples", type=int,
                        help="score a seeded subset of this many examples per task")
    parser.add_argument("--batch-size", type=int, default=64, help="evaluation batch size (default 64)")
    parser.add_argument("--max-length", type=int,
                        help="tokens per text example (default 128, or the model's position limit when smaller)")
    parser.add_argument("--tokenizer", help="tokenizer folder (default: the one saved in MODEL_DIR)")
    parser.add_argument("--data-dir", help="local data folder (default: $LAYERMERGE_DATA or ../shared/data)")
    parser.add_argument("--output", "-o", help="write report.md and report.json into this folder")
    parser.add_argument("--quiet", "-q", action="store_true", help="no progress bars")
    add_threads_option(parser)
    return parser


def parse_experts(text: str | None) -> dict[str, str]:
    """``'sst2=a/,rte=b/'`` -> {'sst2': 'a/', 'rte': 'b/'}."""
    from layermerge.data.tasks import get_task

    if not text:
        return {}
    experts = {}
    for item in text.split(","):
        name, sep, folder = item.partition("=")
        if not sep or not name.strip() or not folder.strip():
            raise ConfigError(f"--experts entry {item!r} is not TASK=DIR (e.g. --experts sst2=experts/sst2)")
        task = get_task(name).name
        if task in experts:
            raise ConfigError(f"--experts names task {task!r} twice")
        experts[task] = folder.strip()
    return experts


def default_tasks(folder: Path) -> list[str]:
    from layermerge.finetune import read_marker

    if (folder / "heads").is_dir():
        tasks = sorted(p.name for p in (folder / "heads").iterdir() if p.is_dir())
        if tasks:
            return tasks
    marker = read_marker(folder)
    if marker and marker.get("task"):
        return [marker["task"]]
    raise ConfigError(f"cannot tell which tasks {folder} is for; pass --tasks (e.g. --tasks sst2,rte)")


def model_label(folder: Path) -> str:
    """The merge method recorded in a merged folder, else the folder's name."""
    try:
        return json.loads((folder / "layermerge_summary.json").read_text())["method"]
    except (OSError, ValueError, KeyError):
        return folder.name


def run(args) -> int:
    from layermerge.data.tasks import parse_task_list
    from layermerge.errors import CheckpointError
    from layermerge.eval.evaluate import evaluate
    from layermerge.eval.report import new_report

    apply_threads(args.threads)
    folder = Path(args.model).expanduser()
    if not folder.is_dir():
        raise CheckpointError(f"model folder not found: {folder}")
    tasks = [t.name for t in parse_task_list(args.tasks)] if args.tasks else default_tasks(folder)
    experts = parse_experts(args.experts)
    stray = [t for t in experts if t not in tasks]
    if stray:
        raise ConfigError(f"--experts names task(s) {stray} that are not in --tasks {tasks}")
    options = dict(split=args.split, max_examples=args.max_examples, batch_size=args.batch_size,
                   max_length=args.max_length, tokenizer=args.tokenizer, data_dir=args.data_dir,
                   quiet=args.quiet)

    expert_results = {}
    if experts:
        if not args.quiet:
            print(f"evaluating {len(experts)} expert(s) on their own tasks")
        expert_results = evaluate({t: Path(d) for t, d in experts.items()}, list(experts), **options)
    if not args.quiet:
        print(f"evaluating {folder} on {', '.join(tasks)}")
    results = evaluate(folder, tasks, **options)

    settings = {"split": args.split, "max_examples": args.max_examples, "max_length": args.max_length}
    report = new_report(tasks, {t: r.score for t, r in expert_results.items()}, settings)
    if expert_results:
        report.add("experts", expert_results, note="each on its own task")
    report.add(model_label(folder), results)
    print(report.to_text(), end="")
    if args.output:
        md, js = report.write(args.output, title=f"Evaluation of {folder}")
        print(f"report written to {md} and {js}")
    return 0
