"""`layermerge inspect BASE EXPERT...`: can these experts be merged, and how do their task vectors relate?

Prints the compatibility report (what a merge would do with every key), then per-task norms, the
pairwise cosine similarity and the sign-conflict rate of the task vectors (defined in
``layermerge.inspect``), streamed tensor by tensor. An incompatibility or a NaN/Inf value is a
one-line error with exit status 2, as for ``merge``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from layermerge.errors import ConfigError, OutputError, OutputWriteError, os_error_message
from layermerge.io.atomic import check_writable_location


def add_parser(subparsers):
    parser = subparsers.add_parser(
        "inspect", help="check experts against a base and show task-vector statistics",
        description="Check that the experts can be merged with the base, then print each task vector's norm, "
                    "the pairwise cosine similarity and the pairwise sign-conflict rate (the fraction of "
                    "entries changed by both tasks whose signs differ).")
    parser.add_argument("base", help="base (pretrained) model folder or weights file")
    parser.add_argument("experts", nargs="+", metavar="EXPERT",
                        help="expert folder or weights file, optionally as NAME=PATH")
    parser.add_argument("--names",
                        help="comma-separated task names, one per expert (default: NAME= or the folder name)")
    parser.add_argument("--heatmap", metavar="PNG",
                        help="save the cosine and sign-conflict matrices as a PNG")
    parser.add_argument("--json", metavar="FILE", help="save the report and statistics as JSON")
    parser.add_argument("--check-finite", action=argparse.BooleanOptionalAction, default=True,
                        help="scan every tensor for NaN/Inf (default: on)")
    parser.add_argument("--vocab-policy", choices=["error", "base", "base_rows", "union"], default="error",
                        help="when experts added tokens: stop, or compare only the base's rows")
    parser.add_argument("--head-key", action="append", default=[], metavar="SUBSTRING", dest="head_keys",
                        help="key substring kept per task instead of merged (repeatable)")
    parser.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    return parser


def parse_expert_args(specs: list[str], names: str | None) -> dict[str, str]:
    """``['a=path', 'other/path']`` (+ optional ``--names``) -> ``{task: path}`` with unique names."""
    pairs: list[tuple[str | None, str]] = []
    for spec in specs:
        name, sep, path = spec.partition("=")
        # NAME=PATH unless the whole argument is itself an existing path containing '='.
        if sep and name and path and "/" not in name and not Path(spec).exists():
            pairs.append((name, path))
        else:
            pairs.append((None, spec))
    if names is not None:
        given = [n.strip() for n in names.split(",")]
        if len(given) != len(pairs) or not all(given):
            raise ConfigError(f"--names lists {len(given)} names ({names!r}) but {len(pairs)} experts were "
                              "given; give one non-empty name per expert")
        pairs = [(name, path) for name, (_, path) in zip(given, pairs)]
    result: dict[str, str] = {}
    for name, path in pairs:
        name = name or _default_name(path)
        if name in result:
            raise ConfigError(f"two experts are named {name!r} ({result[name]} and {path}); "
                              "name them with NAME=PATH or --names a,b,c")
        result[name] = path
    return result


def check_output_file(flag: str, path: Path) -> None:
    """Before the statistics are computed: refuse a target that cannot be written (a folder, no permission...)."""
    if path.is_dir():
        raise OutputError(f"{flag} {path} is a folder; give a file name, e.g. {path / 'report'}"
                          f"{'.png' if flag == '--heatmap' else '.json'}")
    check_writable_location(path.expanduser().absolute())


def _default_name(path: str) -> str:
    candidate = Path(path.rstrip("/"))
    return candidate.stem if candidate.suffix in (".safetensors", ".pt", ".pth", ".bin") else candidate.name


def run(args) -> int:
    from layermerge.experts import ExpertSet
    from layermerge.inspect import nonfinite_error, save_heatmap, task_vector_stats

    experts = parse_expert_args(args.experts, args.names)
    for flag, target in (("--heatmap", args.heatmap), ("--json", args.json)):
        if target:
            check_output_file(flag, Path(target))
    expert_set = ExpertSet(args.base, experts, vocab_policy=args.vocab_policy, head_keys=args.head_keys)
    print(f"base: {expert_set.base.path} (model_type: {expert_set.base.model_type or 'unknown'})")
    for expert in expert_set.experts:
        prefix = f", key prefix {expert.prefix!r}" if expert.prefix else ""
        print(f"expert '{expert.name}': {expert.reader.path}{prefix}")
    print("compatibility: OK")
    for line in expert_set.report.summary_lines():
        print(f"  {line}")

    stats = task_vector_stats(expert_set, check_finite=args.check_finite, quiet=args.quiet)
    if args.json:
        report = expert_set.report
        record = {
            "base": str(expert_set.base.path),
            "experts": {e.name: {"path": str(e.reader.path), "prefix": e.prefix} for e in expert_set.experts},
            "report": {"merge_keys": len(report.merge_keys), "head_keys": report.head_keys,
                       "vocab_keys": report.vocab_keys, "notes": report.notes},
            "statistics": stats.to_dict(),
        }
        try:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps(record, indent=2) + "\n")
        except OSError as exc:
            raise OutputWriteError(os_error_message(exc, "write the --json file", args.json)) from exc
    if stats.nonfinite:
        raise nonfinite_error(stats)
    for line in stats.table_lines():
        print(line)
    if args.heatmap:
        print(f"heatmap: {save_heatmap(stats, args.heatmap)}")
    if args.json:
        print(f"json: {Path(args.json).resolve()}")
    return 0
