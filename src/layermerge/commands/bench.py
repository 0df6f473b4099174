"""`layermerge bench TRACK`: fine-tune a track's experts (cached), run every method over three seeds and
the ProDistill ablations (each run cached), and write the tables, plots and raw JSON."""

from __future__ import annotations

from pathlib import Path

from layermerge.commands.common import add_threads_option, apply_threads

STAGES = ("experts", "main", "ablations")


def add_parser(subparsers):
    from layermerge.bench.tracks import BUILTIN_TRACKS

    parser = subparsers.add_parser(
        "bench", help="benchmark track: every method on real experts, ablations, report and plots",
        description="Stages are cached and resumable: stop at any time and run the same command again. "
                    f"Built-in tracks: {', '.join(BUILTIN_TRACKS)}; or a track YAML file.")
    parser.add_argument("track", help="track name or YAML file")
    parser.add_argument("--stages", default="main,ablations",
                        help="comma-separated: experts (experts and references only), main (every method), "
                             "ablations (all studies) or one study's name, e.g. shots (default main,ablations)")
    parser.add_argument("--only", help="comma-separated rows (methods or ablation labels) to run; others are "
                                       "reported from their cached records if present")
    parser.add_argument("--seeds", help="comma-separated sampling seeds to run (default: the track's); runs with "
                                        "other seeds are reported from their cached records if present")
    parser.add_argument("--rerun", default="", help="comma-separated rows or methods to recompute even if cached")
    parser.add_argument("--workdir", help="run records and references (default <cache>/bench/<track>)")
    parser.add_argument("--cache-dir", help="cache root for bases and experts (default $LAYERMERGE_CACHE or "
                                            "./.cache/layermerge)")
    parser.add_argument("--report-dir", help="where <track>.md and the PNG plots go (default <workdir>/report)")
    parser.add_argument("--json", help="results JSON (default <report-dir>/<track>.json)")
    parser.add_argument("--splice", metavar="DOC.md",
                        help="also put the tables into DOC.md between <!-- bench:TRACK --> and "
                             "<!-- /bench:TRACK --> (image links made relative to DOC.md)")
    parser.add_argument("--earlier", action="append", default=[], metavar="RESULTS.json",
                        help="an earlier results JSON of this track (repeatable; the first that has a row wins): "
                             "rows this invocation has no record for are reported from it, marked with the date "
                             "they were measured, e.g. after rerunning one method")
    parser.add_argument("--device", default="cpu", help="device of the data-driven merges: cpu, cuda, auto")
    parser.add_argument("--dry-run", action="store_true",
                        help="list the planned runs, each marked cached, to run, to rerun or not selected, and "
                             "count stale records; run nothing")
    parser.add_argument("--prune", action="store_true",
                        help="remove run records that no planned run reads (made with other settings or an older "
                             "layermerge), then stop")
    parser.add_argument("--report-only", action="store_true",
                        help="write the report from the cached runs only; merge nothing (missing runs are left out)")
    parser.add_argument("--quiet", "-q", action="store_true", help="no progress bars or step messages")
    add_threads_option(parser)
    return parser


def run(args) -> int:
    import os
    import sys

    from layermerge.bench.report import splice_into, write_report
    from layermerge.bench.results import carry_earlier_rows, is_carried, load_results_file, order_rows
    from layermerge.bench.runner import plan_runs, run_track
    from layermerge.bench.tracks import load_track
    from layermerge.errors import ConfigError
    from layermerge.finetune import cache_root

    apply_threads(args.threads)
    if args.threads is not None:      # the merges run in child processes: they inherit this
        os.environ["OMP_NUM_THREADS"] = str(args.threads)
    track = load_track(args.track)
    earlier = [(path, load_results_file(path, track)) for path in args.earlier]    # checked before any merge
    stages = {s.strip() for s in args.stages.split(",") if s.strip()}
    known = set(STAGES) | set(track.ablations)
    unknown = stages - known
    if unknown:
        raise ConfigError(f"unknown stage(s) {sorted(unknown)}; choose from {', '.join(sorted(known))}")
    cache_dir = cache_root(args.cache_dir)
    workdir = Path(args.workdir) if args.workdir else cache_dir / "bench" / track.name
    only = {s.strip() for s in args.only.split(",")} if args.only else None
    if args.report_only:
        only = set()
    rerun = {s.strip() for s in args.rerun.split(",") if s.strip()}
    seeds = parse_seeds(args.seeds) if args.seeds else None
    results = run_track(track, workdir=workdir, cache_dir=cache_dir, studies=stages, rerun=rerun, only=only,
                        seeds=seeds,
                        device=args.device, quiet=args.quiet, dry_run=args.dry_run, prune=args.prune,
                        command="layermerge " + " ".join(sys.argv[1:]) if sys.argv[1:2] == ["bench"] else
                        f"layermerge bench {args.track}")
    if results is None:          # dry run or prune
        return 0
    for path, document in earlier:
        carry_earlier_rows(results, document, path, stages)
    if earlier:
        order_rows(results, [(run.study, run.row) for run in plan_runs(track, stages)])
    report_dir = Path(args.report_dir) if args.report_dir else workdir / "report"
    paths = write_report(results, report_dir, track.name, Path(args.json) if args.json else None)
    if args.splice:
        document = Path(args.splice)
        images = os.path.relpath(report_dir.resolve(), document.resolve().parent)
        splice_into(document, track.name, paths["markdown"].read_text(), "" if images == "." else images)
    failed = [r["row"] for r in results["rows"] if r["failures"] and not is_carried(r)]
    print(f"report: {paths['markdown']}; results: {paths['json']}")
    if failed:
        print(f"failed rows: {', '.join(failed)}")
    return 1 if failed else 0


def parse_seeds(text: str) -> set[int]:
    from layermerge.errors import ConfigError

    try:
        return {int(part) for part in text.split(",") if part.strip()}
    except ValueError:
        raise ConfigError(f"--seeds takes comma-separated integers such as 0,1, got {text!r}") from None
