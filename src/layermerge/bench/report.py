"""The results document as Markdown tables and PNG plots.

Tables: the main table (per-task means, average and normalised average, mean ± std over seeds,
with the experts and their ensemble as references), one table per ablation study, and the cost of
each data-driven method (merge wall time and peak RSS, and their ratios to Task Arithmetic measured
in the same invocation). Plots: the methods' normalised averages as bars, ProDistill's score against
shots per task, and accuracy against merge time.
"""

from __future__ import annotations

import json
from pathlib import Path

from layermerge.bench.results import best_data_free, is_carried, main_rows
from layermerge.errors import ConfigError


def _pm(stat: dict, digits: int = 1) -> str:
    if stat is None or stat.get("mean") is None:
        return "—"
    if stat.get("n", 0) > 1:
        return f"{stat['mean']:.{digits}f} ± {stat['std']:.{digits}f}"
    return f"{stat['mean']:.{digits}f}"


def _num(value, digits: int = 1) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def _label(row: dict) -> str:
    """The row's name; a row carried from an earlier results file shows the date it was measured."""
    if is_carried(row):
        return f"{row['row']} ({(row['carried'].get('date') or 'earlier')[:10]})"
    return row["row"]


def _params(row: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in row["params"].items()) or "defaults"


def main_table(results: dict) -> str:
    """Per-task means and two normalisations: ``normalised`` is the mean of per-task ratios (merged ÷
    expert, every task weighs the same); ``avg ÷ experts`` divides the averages, as the published GLUE-8
    table in METHODS.md does (0.766 / 0.853 = 0.90), so a weak expert's task weighs less."""
    tasks = results["tasks"]
    lines = [f"| method | kind | {' | '.join(tasks)} | average | normalised | avg ÷ experts | seeds |",
             "|---|---|" + "---:|" * (len(tasks) + 3) + "---|"]
    refs = results["references"]
    experts_average = refs["experts"]["average"] if "experts" in refs else None
    for name, note in (("base", "reference: the base model before fine-tuning"),
                       ("experts", "reference: each expert on its own task"),
                       ("ensemble", "reference: mean of all experts' logits")):
        if name in refs:
            ref = refs[name]
            lines.append(f"| *{name}* | {note} | " + " | ".join(_num(ref["scores"][t]) for t in tasks)
                         + f" | {_num(ref['average'])} | {_num(ref['normalised'])} | "
                         f"{_num(ratio_of_averages(ref['average'], experts_average))} | |")
    rows = sorted(main_rows(results), key=lambda r: (r["needs_data"], -(r["normalised"]["mean"] or -1e9)))
    for row in rows:
        kind = "data-driven" + (", labelled" if row["uses_labels"] else "") if row["needs_data"] else "data-free"
        if row.get("per_task_models"):
            kind += ", per-task models"
        if not row["runs"]:
            lines.append(f"| {_label(row)} | {kind} | failed: {row['failures'][0] if row['failures'] else '?'} |")
            continue
        cells = " | ".join(_num(row["scores"][t]["mean"]) for t in tasks)
        seeds = ", ".join("—" if s is None else str(s) for s in row["seeds"])
        divided = _num(ratio_of_averages(row["average"]["mean"], experts_average))
        lines.append(f"| {_label(row)} | {kind} | {cells} | {_pm(row['average'])} | {_pm(row['normalised'])} | "
                     f"{divided} | {seeds} |")
    return "\n".join(lines)


def carried_note(entry: dict) -> str:
    """Where the rows marked with a date come from, and whether the experts have changed since."""
    note = (f"- Rows marked ({(entry.get('date') or 'earlier')[:10]}) are carried from `{entry['file']}` "
            f"(`{entry.get('command')}`): neither this invocation nor this version's run records had them.")
    changed = entry.get("experts_changed") or {}
    if changed:
        note += (" Its experts scored " + ", ".join(f"{t} {then:.1f} (now {now:.1f})" for t, (then, now)
                                                     in changed.items())
                 + " on test: those rows' normalised averages are against the experts of then.")
    return note


def ratio_of_averages(average: float | None, experts_average: float | None) -> float | None:
    if average is None or not experts_average or experts_average <= 0:
        return None
    return 100 * average / experts_average


def ablation_tables(results: dict) -> str:
    studies: dict[str, list[dict]] = {}
    for row in results["rows"]:
        if row["study"] != "main":
            studies.setdefault(row["study"], []).append(row)
    parts = []
    for study, rows in studies.items():
        subsets = any(row.get("experts") for row in rows)     # pairwise merges: say which tasks, and each score
        extra = " per task |" if subsets else ""
        lines = [f"**{study}**", "", f"| row | method | shots | seeds |{extra} average | normalised | merge wall s |",
                 "|---|---|---:|---|" + ("---|" if subsets else "") + "---:|---:|---:|"]
        for row in rows:
            cell = ""
            if subsets:
                cell = " " + ", ".join(f"{t} {_num(stat['mean'])}" for t, stat in row["scores"].items()) + " |"
            seeds = ",".join("—" if seed is None else str(seed) for seed in row["seeds"]) or "—"
            lines.append(f"| {_label(row)} | {row['method']} ({_params(row)}) | {row['shots'] or '—'} | {seeds} |"
                         f"{cell} {_pm(row['average'])} | {_pm(row['normalised'])} | {_pm(row['wall_s'], 0)} |")
        parts.append("\n".join(lines))
    return "\n\n".join(parts)


def cost_table(results: dict) -> str:
    lines = ["| method | merge wall s | peak RSS MiB | time ÷ TA | RSS ÷ TA | normalised |",
             "|---|---:|---:|---:|---:|---:|"]
    rows = [r for r in main_rows(results) if r["runs"] and (r["needs_data"] or r["method"] == "task_arithmetic")]
    for row in sorted(rows, key=lambda r: r["wall_s"]["mean"] or 0):
        lines.append(f"| {_label(row)} | {_pm(row['wall_s'], 1)} | {_pm(row['peak_rss_mib'], 0)} | "
                     f"{_pm(row['time_vs_task_arithmetic'], 2)} | {_pm(row['rss_vs_task_arithmetic'], 2)} | "
                     f"{_pm(row['normalised'])} |")
    return "\n".join(lines)


def headline(results: dict) -> str:
    """The seed papers' claims in numbers: ProDistill against the best data-free method, NeuLig against
    the ensemble it imitates, NP Merge against plain weight averaging."""
    rows = {r["method"]: r for r in main_rows(results) if r["runs"]}
    lines = []
    best, single = best_data_free(results), best_data_free(results, single_model=True)
    if "prodistill" in rows and best is not None:
        prodistill = rows["prodistill"]
        gaps = [f"best data-free method {best['row']} {_pm(best['normalised'])} "
                f"(gap {prodistill['normalised']['mean'] - best['normalised']['mean']:+.1f} points)"]
        if single is not None and single is not best:
            gaps.append(f"best data-free single model {single['row']} {_pm(single['normalised'])} "
                        f"(gap {prodistill['normalised']['mean'] - single['normalised']['mean']:+.1f})")
        lines.append(f"- ProDistill: normalised average {_pm(prodistill['normalised'])} "
                     f"({prodistill['normalised']['mean'] / 100:.3f} of the experts); " + "; ".join(gaps) + ".")
    ensemble = results["references"].get("ensemble")
    if "neulig" in rows and ensemble is not None:
        lines.append(f"- NeuLig: average {_pm(rows['neulig']['average'])} against the ensemble of experts' "
                     f"{ensemble['average']:.1f} ({rows['neulig']['params'].get('model_mode', 'per_task')} models).")
    if "np_merge" in rows and "average" in rows:
        lines.append(f"- NP Merge: average {_pm(rows['np_merge']['average'])} against weight averaging's "
                     f"{_pm(rows['average']['average'])}.")
    return "\n".join(lines)


def render_markdown(results: dict, plots: dict[str, str] | None = None) -> str:
    track, meta = results["track"], results["meta"]
    examples = "/".join(str(n) for n in sorted(set(results["eval_examples"].values())))
    parts = [
        f"### Track `{track['name']}`",
        "",
        track["description"],
        "",
        f"- Command: `{meta.get('command', '')}`; started {meta.get('date')}; {meta.get('seconds')} s in this "
        f"invocation; merges on `{meta.get('device')}`.",
        f"- Machine: {json.dumps(meta.get('machine'))}.",
        f"- Experts: `{track['base']}` fine-tuned with {json.dumps(track['recipe'])}.",
        f"- Protocol: {track['shots']} training examples per task (stratified, seeded) for every data-driven "
        f"method, the same shots for all of them; seeds {track['seeds']} (ablations: "
        f"{track['ablation_seeds'] or track['seeds']}); test scores on {examples} examples per task "
        "(seeded subset); data-free methods at their papers' settings (`layermerge methods`).",
    ]
    parts += [carried_note(entry) for entry in results.get("carried_from", [])]
    notes = track.get("notes") or {}
    if notes:
        parts.append("- Departures from the papers: " + "; ".join(f"{m}: {n}" for m, n in notes.items()) + ".")
    line = headline(results)
    if line:
        parts += ["", line]
    parts += ["", "#### Every method", "", main_table(results)]
    if plots and "methods" in plots:
        parts += ["", f"![normalised average per method]({plots['methods']})"]
    ablations = ablation_tables(results)
    if ablations:
        parts += ["", "#### ProDistill ablations", "", ablations]
    if plots and "shots" in plots:
        parts += ["", f"![normalised average against shots per task]({plots['shots']})"]
    parts += ["", "#### Cost of the data-driven methods", "", cost_table(results)]
    if plots and "cost" in plots:
        parts += ["", f"![normalised average against merge time]({plots['cost']})"]
    return "\n".join(parts) + "\n"


# --------------------------------------------------------------------------- plots
def write_plots(results: dict, folder: Path, stem: str) -> dict[str, str]:
    """PNG files in ``folder``; returns {kind: file name} for the ones there was data for."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    written: dict[str, str] = {}
    rows = [r for r in main_rows(results) if r["runs"]]
    if rows:
        rows = sorted(rows, key=lambda r: r["normalised"]["mean"])
        fig, ax = plt.subplots(figsize=(7, 0.32 * len(rows) + 1.4))
        colours = ["tab:orange" if r["needs_data"] else "tab:blue" for r in rows]
        ax.barh([r["row"] for r in rows], [r["normalised"]["mean"] for r in rows],
                xerr=[r["normalised"]["std"] for r in rows], color=colours)
        ensemble = results["references"].get("ensemble")
        if ensemble and ensemble["normalised"] is not None:
            ax.axvline(ensemble["normalised"], color="black", linestyle="--", label="ensemble of experts")
        ax.axvline(100, color="grey", linestyle=":", label="experts")
        ax.set_xlabel("normalised average (% of each expert's score); orange: data-driven")
        ax.set_title(f"{results['track']['name']}: every method")
        ax.legend(loc="lower right", fontsize=8)
        fig.tight_layout()
        written["methods"] = _save(fig, folder / f"{stem}-methods.png")
    shots = sorted((r for r in results["rows"] if r["study"] == "shots" and r["runs"]), key=lambda r: r["shots"])
    if shots:
        fig, ax = plt.subplots(figsize=(5.5, 3.6))
        ax.errorbar([r["shots"] for r in shots], [r["normalised"]["mean"] for r in shots],
                    yerr=[r["normalised"]["std"] for r in shots], marker="o", label="ProDistill")
        # ProDistill returns one model: its yardstick is the best data-free method that does too; a
        # per-task-models method (EMR) above it is drawn apart, dotted.
        single, best = best_data_free(results, single_model=True), best_data_free(results)
        if single is not None:
            ax.axhline(single["normalised"]["mean"], color="tab:blue", linestyle="--",
                       label=f"best data-free single model ({single['row']})")
        if best is not None and best is not single:
            ax.axhline(best["normalised"]["mean"], color="tab:grey", linestyle=":",
                       label=f"best data-free, per-task models ({best['row']})")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("unlabelled shots per task")
        ax.set_ylabel("normalised average")
        ax.set_title(f"{results['track']['name']}: ProDistill against shots")
        ax.legend(fontsize=8)
        fig.tight_layout()
        written["shots"] = _save(fig, folder / f"{stem}-shots.png")
    costly = [r for r in rows if r["needs_data"] or r["method"] == "task_arithmetic"]
    if costly:
        fig, ax = plt.subplots(figsize=(6, 4))
        for row in costly:
            ax.scatter(row["wall_s"]["mean"], row["normalised"]["mean"],
                       color="tab:orange" if row["needs_data"] else "tab:blue")
            ax.annotate(row["row"], (row["wall_s"]["mean"], row["normalised"]["mean"]), fontsize=7,
                        xytext=(3, 3), textcoords="offset points")
        ax.set_xscale("log")
        ax.set_xlabel("merge wall time, s (log)")
        ax.set_ylabel("normalised average")
        ax.set_title(f"{results['track']['name']}: accuracy against cost")
        fig.tight_layout()
        written["cost"] = _save(fig, folder / f"{stem}-cost.png")
    return written


def _save(fig, path: Path) -> str:
    import matplotlib.pyplot as plt

    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path.name


def write_report(results: dict, folder: Path, stem: str, json_path: Path | None = None) -> dict[str, Path]:
    """``<stem>.md``, the PNGs and the JSON (at ``json_path`` or ``<folder>/<stem>.json``)."""
    folder.mkdir(parents=True, exist_ok=True)
    plots = write_plots(results, folder, stem)
    markdown = folder / f"{stem}.md"
    markdown.write_text(render_markdown(results, plots))
    json_path = json_path or folder / f"{stem}.json"
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(results, indent=2, default=str) + "\n")
    return {"markdown": markdown, "json": json_path, **{k: folder / v for k, v in plots.items()}}


def splice_into(document: Path, track: str, markdown: str, image_folder: str) -> None:
    """Replace the text between ``<!-- bench:TRACK -->`` and ``<!-- /bench:TRACK -->`` in ``document``
    with ``markdown`` (its image links prefixed with ``image_folder``), so the published page always
    holds the latest tables; the markers must already be there."""
    begin, end = f"<!-- bench:{track} -->", f"<!-- /bench:{track} -->"
    text = document.read_text()
    if begin not in text or end not in text or text.index(begin) > text.index(end):
        raise ConfigError(f"{document} has no '{begin}' ... '{end}' section to fill; add the two markers "
                          "where the track's tables should go")
    body = markdown.replace("](", f"]({image_folder.rstrip('/')}/") if image_folder else markdown
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    document.write_text(f"{head}{begin}\n{body}{end}{tail}")
