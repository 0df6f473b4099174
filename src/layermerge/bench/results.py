"""From run records to the results document: per-row means and standard deviations over seeds.

A row's numbers for one seed: each task's score, their plain average, and the normalised average
(mean over tasks of 100 × score ÷ the expert's score; tasks whose expert scored ≤ 0 are left out, as
in ``layermerge.eval.report``). Across seeds: mean and sample standard deviation (0 with one seed).
Rows may also be carried whole from an earlier results file (``bench --earlier``), marked as such.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from layermerge.bench.tracks import TrackConfig
from layermerge.errors import ConfigError

# Methods that read the few-shot labels (the others see inputs only).
LABELLED = {"fisher": "true labels (fisher_labels=auto with labelled shots)",
            "localize_stitch": "labelled shots train the masks",
            "np_merge": "labelled shots train α"}


def uses_labels(method: str, params: dict) -> bool:
    if method == "neulig":
        return params.get("loss") == "cross_entropy"
    return method in LABELLED


def per_task_models(method: str, params: dict) -> bool:
    """Methods whose output is one model per task (task-specific masks or weights, so the task must be
    known at inference), not one merged model: compare them with the ensemble, not with single merges."""
    if method == "neulig":
        return params.get("model_mode", "per_task") == "per_task"
    return method == "emr"


def summary(values: list[float]) -> dict:
    values = [v for v in values if v is not None]
    if not values:
        return {"mean": None, "std": None, "n": 0}
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return {"mean": round(statistics.fmean(values), 3), "std": round(std, 3), "n": len(values)}


def normalised_average(scores: dict[str, float], experts: dict[str, float]) -> float | None:
    ratios = [100 * scores[t] / experts[t] for t in scores if experts.get(t) is not None and experts[t] > 0]
    return sum(ratios) / len(ratios) if ratios else None


def _row(records: list[dict], tasks: list[str], experts: dict[str, float]) -> dict:
    from layermerge.methods.registry import get_method

    first = records[0]
    tasks = first.get("experts") or tasks          # a pairwise row is scored on its own experts' tasks
    good = [r for r in records if r.get("scores")]
    runs = []
    for record in good:
        scores = {t: record["scores"][t]["score"] for t in tasks}
        runs.append({"seed": record["seed"], "scores": scores, "average": sum(scores.values()) / len(tasks),
                     "normalised": normalised_average(scores, experts), "cost": record["cost"],
                     "invocation": record.get("invocation")})
    costs = [run["cost"] for run in runs]
    return {
        "row": first["row"], "study": first["study"], "method": first["method"], "params": first["params"],
        "needs_data": get_method(first["method"]).needs_data, "shots": first["shots"],
        "uses_labels": uses_labels(first["method"], first["params"]),
        "per_task_models": per_task_models(first["method"], first["params"]),
        "experts": first.get("experts"), "seeds": [run["seed"] for run in runs],
        "scores": {t: summary([run["scores"][t] for run in runs]) for t in tasks},
        "average": summary([run["average"] for run in runs]),
        "normalised": summary([run["normalised"] for run in runs]),
        "wall_s": summary([c.get("wall_s") for c in costs]),
        "peak_rss_mib": summary([c.get("peak_rss_mib") for c in costs]),
        "time_vs_task_arithmetic": summary([c.get("time_vs_task_arithmetic") for c in costs]),
        "rss_vs_task_arithmetic": summary([c.get("rss_vs_task_arithmetic") for c in costs]),
        "failures": [r["cost"].get("error") for r in records if not r.get("scores")],
        "runs": runs,
    }


def build_results(track: TrackConfig, records: list[dict], expert_scores: dict[str, dict],
                  ensemble_scores: dict[str, dict], meta: dict, base_scores: dict[str, dict] | None = None) -> dict:
    """The document ``bench`` writes as JSON and renders as Markdown and plots."""
    tasks = track.task_names()
    experts = {t: expert_scores[t]["score"] for t in tasks}
    grouped: dict[tuple[str, str], list[dict]] = {}
    for record in records:
        grouped.setdefault((record["study"], record["row"]), []).append(record)
    rows = [_row(group, tasks, experts) for group in grouped.values()]
    ensemble = {t: ensemble_scores[t]["score"] for t in tasks} if ensemble_scores else None
    references = {"experts": {"scores": experts, "average": sum(experts.values()) / len(tasks),
                              "normalised": 100.0}}
    if ensemble is not None:
        references["ensemble"] = {"scores": ensemble, "average": sum(ensemble.values()) / len(tasks),
                                  "normalised": normalised_average(ensemble, experts)}
    if base_scores:
        base = {t: base_scores[t]["score"] for t in tasks}
        references["base"] = {"scores": base, "average": sum(base.values()) / len(tasks),
                              "normalised": normalised_average(base, experts)}
    return {"track": track.model_dump(), "meta": meta, "tasks": tasks,
            "metrics": {t: expert_scores[t]["metric"] for t in tasks},
            "eval_examples": {t: expert_scores[t]["examples"] for t in tasks},
            "references": references, "rows": rows}


def main_rows(results: dict) -> list[dict]:
    return [r for r in results["rows"] if r["study"] == "main"]


def best_data_free(results: dict, single_model: bool = False) -> dict | None:
    """The data-free row with the highest normalised average (``single_model``: among those that give one
    merged model, leaving out EMR's per-task models)."""
    candidates = [r for r in main_rows(results) if not r["needs_data"] and r["normalised"]["mean"] is not None
                  and not (single_model and r.get("per_task_models"))]
    return max(candidates, key=lambda r: r["normalised"]["mean"], default=None)


# --------------------------------------------------------------------------- rows carried from earlier results
def load_results_file(path: str | Path, track: TrackConfig) -> dict:
    """An earlier results JSON of this track (``bench --earlier``); one clear error line when it is not one."""
    path = Path(path)
    try:
        earlier = json.loads(path.read_text())
    except OSError as error:
        raise ConfigError(f"--earlier {path}: cannot read it ({error.strerror or error}); give the results "
                          "JSON an earlier `layermerge bench` wrote (its --json)") from None
    except ValueError:
        raise ConfigError(f"--earlier {path}: not JSON; give the results JSON an earlier `layermerge bench` "
                          "wrote (its --json)") from None
    shape = {"track": dict, "tasks": list, "rows": list, "meta": dict, "references": dict}
    if not isinstance(earlier, dict) or not all(isinstance(earlier.get(k), t) for k, t in shape.items()):
        raise ConfigError(f"--earlier {path}: not a `layermerge bench` results file (it needs track, tasks, "
                          "rows, meta and references)")
    name = earlier["track"].get("name")
    if name != track.name:
        raise ConfigError(f"--earlier {path} holds results of track {name!r}, not {track.name!r}")
    if earlier["tasks"] != track.task_names():
        raise ConfigError(f"--earlier {path} scored the tasks {earlier['tasks']}, this track has "
                          f"{track.task_names()}: its rows cannot share a table")
    return earlier


def carry_earlier_rows(results: dict, earlier: dict, source: str, studies: set[str]) -> None:
    """Add the rows of ``earlier`` that ``results`` lacks (no record in this invocation or this version's
    cache), each marked ``carried`` with where and when it was measured and its experts' scores then, so a
    report keeps a whole table while one method is rerun. A row ``earlier`` itself carried keeps its first
    mark. Only rows of the studies this invocation reports ("main", an ablation's name, or "ablations"
    for all) are carried; ``results["carried_from"]`` lists them by source."""
    present = {(row["study"], row["row"]) for row in results["rows"]}
    mark = {"file": source, "date": earlier["meta"].get("date"), "command": earlier["meta"].get("command"),
            "experts": earlier["references"].get("experts", {}).get("scores", {})}
    for row in earlier["rows"]:
        study = row["study"]
        wanted = study in studies or (study != "main" and "ablations" in studies)
        if wanted and (study, row["row"]) not in present and row.get("runs"):
            results["rows"].append({**row, "carried": row.get("carried") or mark})
    results["carried_from"] = carried_sources(results)


def row_label(row: dict) -> str:
    return row["row"] if row["study"] == "main" else f"{row['study']}: {row['row']}"


def carried_sources(results: dict) -> list[dict]:
    """One entry per file the carried rows came from: its date and command, the rows, and the tasks whose
    expert scored differently then (those rows' normalised averages are against the experts of then)."""
    now = results["references"]["experts"]["scores"]
    sources: dict[tuple, dict] = {}
    for row in results["rows"]:
        if not is_carried(row):
            continue
        mark = row["carried"]
        then = mark.get("experts") or {}
        entry = sources.setdefault((mark["file"], mark.get("date")), {
            "file": mark["file"], "date": mark.get("date"), "command": mark.get("command"), "rows": [],
            "experts_changed": {t: [then[t], now[t]] for t in now
                                if t in then and round(then[t], 6) != round(now[t], 6)}})
        entry["rows"].append(row_label(row))
    return list(sources.values())


def is_carried(row: dict) -> bool:
    return "carried" in row


def order_rows(results: dict, planned: list[tuple[str, str]]) -> None:
    """Put the rows in the plan's order (study by study, row by row), rows outside the plan after their
    study's planned ones: carried rows land where a full run would have put them."""
    position = {key: number for number, key in enumerate(dict.fromkeys(planned))}
    studies = {study: number for number, study in enumerate(dict.fromkeys(study for study, _ in planned))}
    results["rows"] = sorted(results["rows"], key=lambda row: (
        studies.get(row["study"], len(studies)), position.get((row["study"], row["row"]), len(position))))
