"""Metrics against scipy/scikit-learn and against values worked out by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats
from sklearn import metrics as skm

from layermerge.errors import DataError
from layermerge.eval.metrics import (
    accuracy,
    f1_binary,
    matthews_corrcoef,
    pearson,
    rank_with_ties,
    spearman,
    task_score,
)


@pytest.mark.parametrize("seed", range(5))
def test_classification_metrics_match_sklearn(seed):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, size=200)
    predictions = np.where(rng.random(200) < 0.7, labels, 1 - labels)
    assert accuracy(predictions, labels) == pytest.approx(skm.accuracy_score(labels, predictions))
    assert f1_binary(predictions, labels) == pytest.approx(skm.f1_score(labels, predictions))
    assert matthews_corrcoef(predictions, labels) == pytest.approx(skm.matthews_corrcoef(labels, predictions))


@pytest.mark.parametrize("seed", range(3))
def test_multiclass_matthews_matches_sklearn(seed):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 3, size=300)
    predictions = np.where(rng.random(300) < 0.5, labels, rng.integers(0, 3, size=300))
    assert matthews_corrcoef(predictions, labels) == pytest.approx(skm.matthews_corrcoef(labels, predictions))


def test_hand_computed_values():
    # labels    1 1 1 0 0 0 1 0 ; predictions 1 1 0 0 1 0 1 0
    labels = np.array([1, 1, 1, 0, 0, 0, 1, 0])
    predictions = np.array([1, 1, 0, 0, 1, 0, 1, 0])
    # TP=3, FN=1, FP=1, TN=3 -> acc 6/8, F1 = 6/8, MCC = (9-1)/sqrt(4*4*4*4) = 0.5
    assert accuracy(predictions, labels) == 0.75
    assert f1_binary(predictions, labels) == 0.75
    assert matthews_corrcoef(predictions, labels) == pytest.approx(0.5)
    # Pearson of (1,2,3) vs (2,4,7): dx = (-1,0,1), dy = (-7/3,-1/3,8/3); dx·dy = 5, |dx|² = 2, |dy|² = 114/9
    assert pearson([1, 2, 3], [2, 4, 7]) == pytest.approx(5 / math.sqrt(2 * 114 / 9))
    # Spearman of a monotone but non-linear relation is exactly 1; of a reversal exactly -1.
    assert spearman([1, 2, 3, 4], [1, 8, 27, 64]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)


def test_ranks_average_ties_like_scipy():
    values = np.array([3.0, 1.0, 4.0, 1.0, 5.0, 9.0, 2.0, 6.0, 5.0, 3.0, 5.0])
    assert np.allclose(rank_with_ties(values), stats.rankdata(values))
    assert rank_with_ties([7, 7, 7]).tolist() == [2.0, 2.0, 2.0]


@pytest.mark.parametrize("seed", range(4))
def test_correlations_match_scipy_with_ties(seed):
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 6, size=150).astype(float)      # many ties, like STS-B's 0-5 scale
    y = x + rng.normal(0, 1.5, size=150)
    y[::7] = np.round(y[::7])
    assert pearson(x, y) == pytest.approx(stats.pearsonr(x, y)[0])
    assert spearman(x, y) == pytest.approx(stats.spearmanr(x, y)[0])


def test_degenerate_inputs():
    assert matthews_corrcoef([1, 1, 1], [0, 1, 0]) == 0.0          # constant prediction
    assert f1_binary([0, 0, 0], [0, 0, 0]) == 0.0                   # no positives at all
    assert math.isnan(pearson([1, 1, 1], [1, 2, 3]))
    with pytest.raises(DataError, match="zero examples"):
        accuracy([], [])
    with pytest.raises(DataError, match="equal length"):
        accuracy([1, 0], [1])


def test_task_scores_are_percent_means_of_their_parts():
    labels = np.array([1, 1, 1, 0, 0, 0, 1, 0])
    predictions = np.array([1, 1, 0, 0, 1, 0, 1, 0])
    score, parts = task_score("accuracy_f1", predictions, labels)
    assert parts == {"accuracy": 75.0, "f1": 75.0} and score == 75.0
    score, parts = task_score("matthews", predictions, labels)
    assert score == pytest.approx(50.0)
    x, y = np.array([0.0, 1.0, 2.5, 4.0, 5.0]), np.array([0.5, 1.5, 2.0, 4.5, 4.0])
    score, parts = task_score("pearson_spearman", x, y)
    assert parts["pearson"] == pytest.approx(100 * stats.pearsonr(x, y)[0])
    assert parts["spearman"] == pytest.approx(100 * stats.spearmanr(x, y)[0])
    assert score == pytest.approx((parts["pearson"] + parts["spearman"]) / 2)
    assert task_score("pearson_spearman", np.ones(5), y) == (0.0, {"pearson": 0.0, "spearman": 0.0})
    with pytest.raises(DataError, match="unknown metric"):
        task_score("bleu", x, y)
