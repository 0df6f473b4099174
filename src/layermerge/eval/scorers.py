"""Scoring generated answers, and loading a task's own scorer given as ``module:function``.

Built-in answer metrics compare each generated completion with the reference completion:

- ``exact_match``: equal after ``normalise_answer`` (lowercase, Unicode NFKC, surrounding whitespace
  and punctuation stripped, inner whitespace collapsed to one space).
- ``numeric_match``: the last number in the answer equals the number in the reference (commas as
  thousands separators allowed; equal to a relative tolerance of 1e-6).

A user scorer for a generation task is ``f(answer: str, example: dict) -> float`` in [0, 1] (the
example is the whole row, so a scorer may read any field); for a classification or regression task
it is ``f(predictions: ndarray, labels: ndarray) -> float`` in [0, 1]. Scores are reported in percent.
The module is looked up beside the task's spec file first, then on the usual import path.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import math
import re
import string
import sys
import unicodedata
from collections.abc import Callable, Sequence
from pathlib import Path

from layermerge.data.tasks import DATA_FOLDER, Task
from layermerge.errors import DataError

NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")
PUNCTUATION = string.punctuation + "“”‘’«»…"


def normalise_answer(text: str) -> str:
    text = unicodedata.normalize("NFKC", str(text)).lower()
    text = " ".join(text.split())
    return text.strip(PUNCTUATION + " ")


def exact_match(answer: str, reference: str) -> float:
    return float(normalise_answer(answer) == normalise_answer(reference))


def last_number(text: str) -> float | None:
    found = NUMBER.findall(str(text))
    if not found:
        return None
    try:
        return float(found[-1].replace(",", ""))
    except ValueError:
        return None


def numeric_match(answer: str, reference: str) -> float:
    got, want = last_number(answer), last_number(reference)
    if got is None or want is None:
        return 0.0
    return float(math.isclose(got, want, rel_tol=1e-6, abs_tol=1e-9))


ANSWER_METRICS: dict[str, Callable[[str, str], float]] = {"exact_match": exact_match, "numeric_match": numeric_match}


def load_scorer(task: Task) -> Callable:
    """The callable a task's ``metric: module:function`` names (ImportError and the like become one line)."""
    reference = task.score_metric
    module_name, _, function_name = reference.partition(":")
    folder = Path(task.directory) if task.directory not in (None, DATA_FOLDER) else None
    beside = folder / (module_name.replace(".", "/") + ".py") if folder is not None else None
    try:
        if beside is not None and beside.is_file():
            module = _module_from_file(beside)
        else:
            module = importlib.import_module(module_name)
    except Exception as exc:     # a user's module can fail in any way on import
        raise DataError(f"cannot import the scorer {reference!r} of task {task.name!r}: {type(exc).__name__}: "
                        f"{exc}. Put {module_name}.py beside the task spec or on PYTHONPATH") from None
    scorer = getattr(module, function_name, None)
    if not callable(scorer):
        where = Path(getattr(module, "__file__", "") or module_name)
        raise DataError(f"the scorer {reference!r} of task {task.name!r}: {where} has no function {function_name!r}")
    return scorer


def _module_from_file(path: Path):
    """The module in ``path``, under a name of its own: two specs' ``scorer.py`` files stay two modules."""
    name = f"layermerge_scorer_{hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:16]}"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


def check_scorer(task: Task) -> None:
    """Import a task's own scorer now, so a broken one fails before any model work."""
    if ":" in task.score_metric:
        load_scorer(task)


def score_answers(task: Task, answers: Sequence[str], rows: Sequence[dict]) -> tuple[float, dict[str, float]]:
    """(score, parts) in percent for generated ``answers`` to the task's ``rows``."""
    if len(answers) != len(rows) or not rows:
        raise DataError(f"{len(answers)} answers for {len(rows)} examples: cannot score")
    metric = task.score_metric
    if metric in ANSWER_METRICS:
        compare = ANSWER_METRICS[metric]
        values = [compare(answer, str(row[task.completion])) for answer, row in zip(answers, rows)]
    else:
        scorer = load_scorer(task)
        values = []
        for answer, row in zip(answers, rows):
            try:
                value = float(scorer(answer, dict(row)))
            except Exception as exc:     # the user's code: say whose it is
                raise DataError(f"the scorer {metric!r} of task {task.name!r} failed: {type(exc).__name__}: "
                                f"{exc}") from None
            if not 0.0 <= value <= 1.0:
                raise DataError(f"the scorer {metric!r} of task {task.name!r} returned {value}; a scorer returns "
                                "a number in [0, 1]")
            values.append(value)
    score = 100.0 * sum(values) / len(values)
    return score, {"exact_match" if metric == "exact_match" else metric.split(":")[-1]: score}
