"""A markdown table of chosen rows of a `layermerge bench` results JSON: score and cost side by side.

The bench report's own tables give every row's scores, and its cost table only the data-driven rows;
this prints, for the rows named (all main-study rows by default), the normalised average, the merge
time and peak RSS, and both as ratios to Task Arithmetic in the same invocation, best first. With
``--pairs`` it pivots a study of pairwise rows (labels "<a>+<b>: <method>") into one line per method
and one column per pair, with the mean over the pairs.

    python benchmarks/rows_table.py benchmarks/results/bench_glue8-minilm_issue20.json --rows tsv_m,iso_c
    python benchmarks/rows_table.py benchmarks/results/bench_glue8-minilm_issue20.json --study pairs --pairs
"""

from __future__ import annotations

import argparse
import json
import sys


def stat(value: dict | None, digits: int = 1) -> str:
    if not value:
        return "—"
    text = f"{value['mean']:.{digits}f}"
    return text + (f" ± {value['std']:.{digits}f}" if value.get("n", 1) > 1 else "")


def table(results: dict, rows: list[str] | None, study: str) -> str:
    chosen = [r for r in results["rows"] if r["study"] == study and (rows is None or r["row"] in rows)]
    missing = sorted(set(rows or []) - {r["row"] for r in chosen})
    if missing:
        raise SystemExit(f"rows_table: no {study} row named {', '.join(missing)} in the JSON")
    chosen.sort(key=lambda r: -(r.get("normalised") or {"mean": float("-inf")})["mean"])
    lines = ["| method | kind | normalised | merge wall s | peak RSS MiB | time ÷ TA | RSS ÷ TA | seeds |",
             "|---|---|---:|---:|---:|---:|---:|---|"]
    for r in chosen:
        kind = "data-driven" if r["needs_data"] else "data-free"
        seeds = ", ".join(str(s) for s in r["seeds"] if s is not None) or "—"
        lines.append(f"| {r['row']} | {kind} | {stat(r.get('normalised'))} | {stat(r.get('wall_s'))} | "
                     f"{stat(r.get('peak_rss_mib'), 0)} | {stat(r.get('time_vs_task_arithmetic'), 2)} | "
                     f"{stat(r.get('rss_vs_task_arithmetic'), 2)} | {seeds} |")
    return "\n".join(lines)


def pair_table(results: dict, study: str) -> str:
    """Normalised average of every "<pair>: <method>" row of ``study``: methods down, pairs across."""
    cells: dict[str, dict[str, dict]] = {}
    pairs: list[str] = []
    for r in results["rows"]:
        if r["study"] != study or ": " not in r["row"]:
            continue
        pair, method = r["row"].split(": ", 1)
        if pair not in pairs:
            pairs.append(pair)
        cells.setdefault(method, {})[pair] = r.get("normalised")
    if not cells:
        raise SystemExit(f"rows_table: no pairwise rows ('<a>+<b>: <method>') in study {study!r}")

    def mean(method: str) -> float:
        values = [cells[method][p]["mean"] for p in pairs if cells[method].get(p)]
        return sum(values) / len(values) if len(values) == len(pairs) else float("-inf")

    lines = ["| method | " + " | ".join(pairs) + " | mean |", "|---|" + "---:|" * (len(pairs) + 1)]
    for method in sorted(cells, key=lambda m: -mean(m)):
        average = mean(method)
        tail = f" | {average:.1f} |" if average > float("-inf") else " | — |"
        lines.append(f"| {method} | " + " | ".join(stat(cells[method].get(p)) for p in pairs) + tail)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json", help="a results JSON written by `layermerge bench --json`")
    parser.add_argument("--rows", help="comma-separated row names (default: every row of the study)")
    parser.add_argument("--study", default="main", help="main (default) or an ablation study's name")
    parser.add_argument("--pairs", action="store_true", help="pivot pairwise rows: methods down, pairs across")
    args = parser.parse_args(argv)
    with open(args.json) as handle:
        results = json.load(handle)
    if args.pairs:
        print(pair_table(results, args.study))
        return 0
    rows = [r.strip() for r in args.rows.split(",")] if args.rows else None
    print(table(results, rows, args.study))
    return 0


if __name__ == "__main__":
    sys.exit(main())
