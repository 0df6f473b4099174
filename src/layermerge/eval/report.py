"""Evaluation reports: a table of per-task scores, their average and the normalised score.

The normalised score of a model on a task is its score divided by that task's expert score (×100),
the measure merging papers use to compare across tasks of different difficulty. It is left empty
where no expert score is known or the expert scored ≤ 0 (a Matthews correlation can), since a ratio
to a non-positive number means nothing. Scores are percentages throughout.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from layermerge.eval.evaluate import TaskResult

METRIC_LABELS = {"accuracy": "acc", "matthews": "mcc", "accuracy_f1": "acc/F1",
                 "pearson_spearman": "P/S corr"}


def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


@dataclass
class ReportRow:
    """One model's line: ``results`` per task (missing tasks are simply absent)."""

    name: str
    results: dict[str, TaskResult]
    note: str = ""

    def score(self, task: str) -> float | None:
        result = self.results.get(task)
        return None if result is None else result.score


@dataclass
class Report:
    tasks: list[str]
    metrics: dict[str, str]
    rows: list[ReportRow] = field(default_factory=list)
    expert_scores: dict[str, float] = field(default_factory=dict)
    settings: dict = field(default_factory=dict)

    def add(self, name: str, results: Mapping[str, TaskResult], note: str = "") -> ReportRow:
        row = ReportRow(name, dict(results), note)
        self.rows.append(row)
        return row

    # ----------------------------------------------------------------- derived numbers
    def normalised(self, row: ReportRow, task: str) -> float | None:
        score, expert = row.score(task), self.expert_scores.get(task)
        if score is None or expert is None or expert <= 0:
            return None
        return 100.0 * score / expert

    def average(self, row: ReportRow) -> float | None:
        """Mean over the report's tasks; None unless the row has every task (a partial mean misleads)."""
        scores = [row.score(t) for t in self.tasks]
        return None if any(s is None for s in scores) else _mean(scores)

    def normalised_average(self, row: ReportRow) -> float | None:
        values = [self.normalised(row, t) for t in self.tasks]
        return None if any(v is None for v in values) else _mean(values)

    # ----------------------------------------------------------------- output
    def to_dict(self) -> dict:
        return {
            "tasks": self.tasks,
            "metrics": self.metrics,
            "expert_scores": self.expert_scores,
            "settings": self.settings,
            "rows": [{
                "name": row.name,
                "note": row.note,
                "scores": {t: row.score(t) for t in self.tasks if row.score(t) is not None},
                "parts": {t: r.parts for t, r in row.results.items()},
                "examples": {t: r.examples for t, r in row.results.items()},
                "average": self.average(row),
                "normalised": {t: self.normalised(row, t) for t in self.tasks
                               if self.normalised(row, t) is not None},
                "normalised_average": self.normalised_average(row),
            } for row in self.rows],
        }

    def to_markdown(self, title: str | None = None) -> str:
        labels = [f"{t} ({METRIC_LABELS.get(self.metrics[t], self.metrics[t])})" for t in self.tasks]
        header = ["model", *labels, "avg", "norm. avg"]
        lines = [f"## {title}", ""] if title else []
        lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for row in self.rows:
            cells = [row.name + (f" ({row.note})" if row.note else "")]
            cells += [_fmt(row.score(t)) for t in self.tasks]
            cells += [_fmt(self.average(row)), _fmt(self.normalised_average(row))]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
        lines.append("Scores in percent: accuracy, Matthews correlation (CoLA), mean of accuracy and F1 "
                     "(MRPC, QQP), mean of Pearson and Spearman (STS-B). Normalised = score ÷ the task's "
                     "expert score × 100.")
        if self.settings:
            lines.append("Settings: " + ", ".join(f"{k}={v}" for k, v in self.settings.items()) + ".")
        return "\n".join(lines) + "\n"

    def to_text(self) -> str:
        """A fixed-width table for the terminal."""
        header = ["model", *self.tasks, "avg", "norm.avg"]
        body = [[row.name + (f" [{row.note}]" if row.note else ""), *[_fmt(row.score(t)) for t in self.tasks],
                 _fmt(self.average(row)), _fmt(self.normalised_average(row))] for row in self.rows]
        widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]
        fmt_row = lambda cells: "  ".join(c.ljust(w) if i == 0 else c.rjust(w)  # noqa: E731
                                          for i, (c, w) in enumerate(zip(cells, widths)))
        return "\n".join([fmt_row(header), "  ".join("-" * w for w in widths), *map(fmt_row, body)]) + "\n"

    def write(self, folder: str | Path, stem: str = "report", title: str | None = None) -> tuple[Path, Path]:
        """``<stem>.md`` and ``<stem>.json`` in ``folder`` (created if needed)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        md, js = folder / f"{stem}.md", folder / f"{stem}.json"
        md.write_text(self.to_markdown(title))
        js.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return md, js


def _fmt(value: float | None) -> str:
    return "—" if value is None else f"{value:.1f}"


def new_report(tasks: Sequence, expert_scores: Mapping[str, float] | None = None,
               settings: Mapping | None = None) -> Report:
    from layermerge.data.tasks import get_task

    resolved = [get_task(t) for t in tasks]
    return Report([t.name for t in resolved], {t.name: t.score_metric for t in resolved},
                  expert_scores=dict(expert_scores or {}), settings=dict(settings or {}))
