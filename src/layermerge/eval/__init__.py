"""Evaluation: hand-written metrics, per-task evaluation of models and merged folders, reports."""

from layermerge.eval.evaluate import TaskResult, evaluate, evaluate_task, predict
from layermerge.eval.metrics import (
    accuracy,
    f1_binary,
    matthews_corrcoef,
    pearson,
    rank_with_ties,
    spearman,
    task_score,
)
from layermerge.eval.report import Report, ReportRow, new_report

__all__ = [
    "Report", "ReportRow", "TaskResult", "accuracy", "evaluate", "evaluate_task", "f1_binary",
    "matthews_corrcoef", "new_report", "pearson", "predict", "rank_with_ties", "spearman", "task_score",
]
