"""`layermerge eval MODEL_DIR --tasks sst2,rte [--task reviews.yaml] [--experts sst2=DIR,...] [--output DIR]`.

MODEL_DIR is a merged output folder (each task is scored with the merged backbone plus that task's
own head) or a single fine-tuned model. A task is a built-in name or a task spec file; ``HEAD=TASK``
scores a merged folder's head HEAD on TASK. Without tasks, a merged folder's heads are scored on the
tasks its merge recorded (or the built-in tasks of their names), an expert on the task it was
fine-tuned on. With ``--experts`` each expert is scored on its own task too, and the report adds the
normalised score (model ÷ expert).
"""

from __future__ import annotations

import json
from pathlib import Path

from layermerge.commands.common import add_threads_option, apply_threads
from layermerge.errors import ConfigError, LayermergeError


def add_parser(subparsers):
    parser = subparsers.add_parser(
        "eval", help="evaluate a merged folder (or a model) per task; report as Markdown/JSON",
        description="Evaluate MODEL_DIR on each task's split and print a table: per-task metric, "
                    "average and, with --experts, the normalised score.")
    parser.add_argument("model", metavar="MODEL_DIR", help="merged output folder or fine-tuned model folder")
    parser.add_argument("--tasks", help="comma-separated tasks: built-in names or task spec files, each optionally "
                                        "HEAD=TASK (default: every head in a merged folder, or the task a "
                                        "layermerge-fine-tuned model was trained on)")
    parser.add_argument("--task", action="append", default=[], metavar="TASK",
                        help="one task (a built-in name or a task spec file, optionally HEAD=TASK); repeatable")
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


def parse_experts(text: str | None, tasks: dict) -> dict[str, str]:
    """``'sst2=a/,rte=b/'`` -> {'sst2': 'a/', 'rte': 'b/'}; names are the evaluated tasks' names."""
    if not text:
        return {}
    experts = {}
    for item in text.split(","):
        name, sep, folder = item.partition("=")
        if not sep or not name.strip() or not folder.strip():
            raise ConfigError(f"--experts entry {item!r} is not TASK=DIR (e.g. --experts sst2=experts/sst2)")
        task = _task_name(name.strip(), tasks)
        if task in experts:
            raise ConfigError(f"--experts names task {task!r} twice")
        experts[task] = folder.strip()
    return experts


def _task_name(name: str, tasks: dict) -> str:
    """A task named in --experts: one of the evaluated tasks (by name, or a built-in's other spelling)."""
    from layermerge.data.tasks import get_task

    if name in tasks:
        return name
    try:
        resolved = get_task(name).name
    except LayermergeError:
        resolved = None
    if resolved not in tasks:
        raise ConfigError(f"--experts names task {name!r}, which is not in --tasks/--task {list(tasks)}")
    return resolved


def parse_tasks(entries: list[str]) -> dict[str, tuple]:
    """``['sst2', 'head=reviews.yaml']`` -> {task name: (Task, head or None)}."""
    from layermerge.data.tasks import get_task

    tasks = {}
    for entry in entries:
        head, sep, reference = entry.partition("=")
        if not sep:
            head, reference = None, entry
        if not reference.strip() or (sep and not head.strip()):
            raise ConfigError(f"task entry {entry!r} is not TASK or HEAD=TASK (e.g. --task reviews.yaml)")
        task = get_task(reference.strip())
        if task.name in tasks:
            raise ConfigError(f"task {task.name!r} is given twice")
        tasks[task.name] = (task, head.strip() if head else None)
    return tasks


def default_tasks(folder: Path) -> dict[str, tuple]:
    """The tasks a folder is for: a merged folder's heads (on the tasks its merge recorded, else the built-in
    task of each head's name), or the task a layermerge-fine-tuned model was trained on."""
    from layermerge.data.tasks import get_task
    from layermerge.finetune import read_marker

    if (folder / "heads").is_dir():
        heads = sorted(p.name for p in (folder / "heads").iterdir() if p.is_dir())
        if heads:
            recorded = recorded_tasks(folder)
            tasks = {}
            for head in heads:
                try:
                    task = get_task(recorded.get(head) or head)
                except LayermergeError as exc:
                    raise ConfigError(f"head {head!r} of {folder}: {exc}. Pass --task {head}=TASK_SPEC") from None
                tasks[task.name] = (task, head)
            return tasks
    marker = read_marker(folder)
    if marker and (marker.get("task_spec") or marker.get("task")):
        task = get_task(marker.get("task_spec") or marker["task"])
        return {task.name: (task, None)}
    raise ConfigError(f"cannot tell which tasks {folder} is for; pass --tasks (e.g. --tasks sst2,rte) or "
                      "--task SPEC_FILE")


def recorded_tasks(folder: Path) -> dict:
    """head -> task spec, as a data-driven merge recorded them in layermerge_summary.json."""
    try:
        summary = json.loads((folder / "layermerge_summary.json").read_text())
    except (OSError, ValueError):
        return {}
    tasks = (summary.get("summary") or {}).get("task_specs") if isinstance(summary, dict) else None
    return {head: spec for head, spec in (tasks or {}).items() if isinstance(spec, dict)}


def model_label(folder: Path) -> str:
    """The merge method recorded in a merged folder, else the folder's name."""
    try:
        return json.loads((folder / "layermerge_summary.json").read_text())["method"]
    except (OSError, ValueError, KeyError):
        return folder.name


def run(args) -> int:
    from layermerge.errors import CheckpointError
    from layermerge.eval.evaluate import evaluate
    from layermerge.eval.report import new_report

    apply_threads(args.threads)
    folder = Path(args.model).expanduser()
    if not folder.is_dir():
        raise CheckpointError(f"model folder not found: {folder}")
    entries = [e.strip() for e in (args.tasks.split(",") if args.tasks else [])] + list(args.task)
    if args.tasks is not None and (not args.tasks.strip() or any(not e for e in entries)):
        raise ConfigError(f"bad task list {args.tasks!r}: give comma-separated task names or spec files")
    chosen = parse_tasks(entries) if entries else default_tasks(folder)
    tasks = {name: task for name, (task, _) in chosen.items()}
    heads = {name: head for name, (_, head) in chosen.items() if head is not None}
    experts = parse_experts(args.experts, tasks)
    options = dict(split=args.split, max_examples=args.max_examples, batch_size=args.batch_size,
                   max_length=args.max_length, tokenizer=args.tokenizer, data_dir=args.data_dir,
                   quiet=args.quiet)

    expert_results = {}
    if experts:
        if not args.quiet:
            print(f"evaluating {len(experts)} expert(s) on their own tasks")
        expert_results = evaluate({t: Path(d) for t, d in experts.items()}, [tasks[t] for t in experts], **options)
    if not args.quiet:
        print(f"evaluating {folder} on {', '.join(tasks)}")
    results = evaluate(folder, list(tasks.values()), heads=heads, **options)

    settings = {"split": args.split, "max_examples": args.max_examples, "max_length": args.max_length}
    report = new_report(list(tasks.values()), {t: r.score for t, r in expert_results.items()}, settings)
    if expert_results:
        report.add("experts", expert_results, note="each on its own task")
    report.add(model_label(folder), results)
    print(report.to_text(), end="")
    if args.output:
        md, js = report.write(args.output, title=f"Evaluation of {folder}")
        print(f"report written to {md} and {js}")
    return 0
