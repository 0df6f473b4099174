"""`layermerge demo`: fine-tune MiniLM experts (cached), merge them with several data-free methods and
ProDistill, evaluate, and print the table. No arguments needed; the options only shrink or redirect it."""

from __future__ import annotations

from layermerge.commands.common import add_threads_option, apply_threads
from layermerge.demo import DEMO_METHODS, DEMO_TASKS


def add_parser(subparsers):
    parser = subparsers.add_parser(
        "demo", help="end-to-end demo: fine-tune MiniLM experts, merge them with several methods, evaluate",
        description="Runs offline. The first run fine-tunes one expert per task (a few minutes on 2 "
                    "cores, cached in ./.cache/layermerge or $LAYERMERGE_CACHE); later runs only merge "
                    "and evaluate.")
    parser.add_argument("--tasks", help=f"comma-separated GLUE tasks (default {','.join(DEMO_TASKS)})")
    parser.add_argument("--methods",
                        help=f"comma-separated methods, or 'all' for every registered method that fits "
                             f"(default {','.join(DEMO_METHODS)})")
    parser.add_argument("--shots", type=int, help="few-shot training examples per task for data-driven "
                                                  "methods (default 16)")
    parser.add_argument("--train-examples", type=int, help="training examples per expert (default 2000)")
    parser.add_argument("--eval-examples", type=int, help="test examples per task (default 250)")
    parser.add_argument("--cache-dir", help="cache root (default: $LAYERMERGE_CACHE or ./.cache/layermerge)")
    parser.add_argument("--fresh", action="store_true",
                        help="merge and evaluate every method again, even when cached scores match")
    parser.add_argument("--quiet", "-q", action="store_true", help="no progress bars or step messages")
    add_threads_option(parser)
    return parser


def run(args) -> int:
    from layermerge.data.tasks import parse_task_list
    from layermerge.demo import DemoConfig, run_demo

    apply_threads(args.threads)
    config = DemoConfig(quiet=args.quiet, cache_dir=args.cache_dir, reuse_results=not args.fresh)
    if args.tasks:
        config.tasks = tuple(t.name for t in parse_task_list(args.tasks))
    if args.methods:
        config.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if args.train_examples is not None:
        config.train_examples = args.train_examples
    if args.eval_examples is not None:
        config.eval_examples = args.eval_examples
    if args.shots is not None:
        config.shots = args.shots
    result = run_demo(config)
    print()
    print(result.report.to_text(), end="")
    print(f"\nscores in percent on {config.eval_examples} test examples per task; norm.avg = mean of "
          "score ÷ expert score")
    print(f"report: {result.report_paths[0]} and {result.report_paths[1]}; total {result.seconds:.0f} s")
    print(f"base: {result.base}")       # what a user merges their own experts with (README, "Your own data")
    for task, folder in result.expert_paths.items():
        print(f"expert {task}: {folder}")
    for name, message in result.failures.items():
        print(f"method {name} failed: {message}")
    return 1 if result.failures else 0
