"""A small Gaussian-process Bayesian optimiser over a box, for DF-Merge's merging coefficients.

DF-Merge (``layermerge.methods.df_merge``) maximises a black-box score — the merged model's few-shot
accuracy — over a handful of coefficients, with a budget of tens of evaluations, each of which
merges and runs the whole model. That is textbook Bayesian optimisation; the released DF-Merge code
uses the ``bayesian-optimization`` package, which is not a dependency here (scikit-learn is only a
test extra), so this module is a deliberately small replacement in numpy/scipy:

* **Surrogate**: a zero-mean Gaussian process on the standardised scores with a Matérn-5/2 kernel
  (``bayesian-optimization``'s default kernel) of unit signal variance. Its isotropic length scale and
  its noise variance are the pair, from a fixed grid, with the highest log marginal likelihood —
  a grid rather than a gradient optimiser, so a fit is deterministic and cannot fail to converge.
  The noise grid matters for few-shot accuracies, which are step functions of the coefficients.
* **Acquisition**: expected improvement with exploration margin ξ (in the score's own units, as in
  ``bayesian-optimization``), maximised over seeded random candidates: uniform ones over the box and
  Gaussian perturbations of the best point at two scales (to refine it). No gradient step, so a run
  is a pure function of the seed and the scores.
* **Design**: an optional start point, then uniform random points up to ``init_points``, then
  ``iterations`` points chosen by expected improvement. The best *evaluated* point is returned (the
  first one on ties), so the answer is never worse than the start point.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np

# Length scales in units of the box side (inputs are mapped onto [0, 1]^d) and noise variances
# relative to the standardised scores' unit variance.
LENGTH_SCALES = (0.05, 0.1, 0.2, 0.35, 0.5, 0.75, 1.0, 1.5, 2.5)
NOISES = (1e-6, 1e-4, 1e-2, 1e-1)
LOCAL_SCALES = (0.1, 0.02)


def matern52(a: np.ndarray, b: np.ndarray, length: float) -> np.ndarray:
    """Matérn-5/2 kernel matrix k(a_i, b_j) = (1 + s + s²/3) e^(−s), s = √5 ‖a_i − b_j‖ / length."""
    distance = np.sqrt(np.maximum(((a[:, None, :] - b[None, :, :]) ** 2).sum(-1), 0.0))
    s = math.sqrt(5.0) * distance / length
    return (1.0 + s + s * s / 3.0) * np.exp(-s)


class GaussianProcess:
    """GP regression of ``y`` on ``x`` (rows in the unit cube), hyper-parameters by grid marginal likelihood."""

    def __init__(self, x: np.ndarray, y: np.ndarray):
        self.x = np.asarray(x, dtype=np.float64)
        y = np.asarray(y, dtype=np.float64)
        self.mean, self.scale = float(y.mean()), float(y.std())
        if not self.scale > 0:
            self.scale = 1.0                    # all scores equal: a flat prior around them
        z = (y - self.mean) / self.scale
        best = None
        for length in LENGTH_SCALES:
            gram = matern52(self.x, self.x, length)
            for noise in NOISES:
                try:
                    chol = np.linalg.cholesky(gram + noise * np.eye(len(z)))
                except np.linalg.LinAlgError:
                    continue
                alpha = _solve_triangular(chol.T, _solve_triangular(chol, z, lower=True), lower=False)
                evidence = -0.5 * float(z @ alpha) - float(np.log(np.diag(chol)).sum())
                if best is None or evidence > best[0]:
                    best = (evidence, length, noise, chol, alpha)
        if best is None:
            raise np.linalg.LinAlgError("no kernel of the grid gives a positive-definite Gram matrix")
        self.log_evidence, self.length, self.noise, self._chol, self._alpha = best

    def predict(self, points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Posterior mean and standard deviation of the score (its own units) at ``points``."""
        cross = matern52(np.asarray(points, dtype=np.float64), self.x, self.length)
        mean = cross @ self._alpha
        v = _solve_triangular(self._chol, cross.T, lower=True)
        variance = np.maximum(1.0 - (v * v).sum(0), 1e-12)
        return self.mean + self.scale * mean, self.scale * np.sqrt(variance)


def _solve_triangular(matrix: np.ndarray, right: np.ndarray, lower: bool) -> np.ndarray:
    from scipy.linalg import solve_triangular  # on first use (see expected_improvement)

    return solve_triangular(matrix, right, lower=lower)


def expected_improvement(mean: np.ndarray, std: np.ndarray, best: float, xi: float = 0.0) -> np.ndarray:
    """E[max(f − best − ξ, 0)] for f ~ N(mean, std²): (mean − best − ξ) Φ(z) + std φ(z), z = (mean − best − ξ)/std."""
    from scipy.special import ndtr  # scipy on first use: importing it cost every merge process 0.3 s

    gain = mean - best - xi
    z = gain / std
    return gain * ndtr(z) + std * np.exp(-0.5 * z * z) / math.sqrt(2 * math.pi)


@dataclass
class SearchResult:
    """Every evaluated point (rows, in evaluation order) and its score."""

    points: np.ndarray
    values: np.ndarray

    @property
    def best_index(self) -> int:
        return int(np.argmax(self.values))        # the first of equal maxima

    @property
    def best_point(self) -> np.ndarray:
        return self.points[self.best_index]

    @property
    def best_value(self) -> float:
        return float(self.values[self.best_index])


def maximize(objective: Callable[[np.ndarray], float], lower: Sequence[float], upper: Sequence[float], *,
             start: Sequence[float] | None = None, init_points: int = 10, iterations: int = 50, seed: int = 0,
             candidates: int = 2048, xi: float = 0.01,
             progress: Callable[[Iterable], Iterable] | None = None) -> SearchResult:
    """Maximise ``objective`` over the box [lower, upper] with ``init_points + iterations`` evaluations.

    The first ``init_points`` are ``start`` (when given) and then seeded uniform points; each of the
    next ``iterations`` maximises expected improvement over ``candidates`` seeded random candidates.
    ``objective`` receives a copy of the point (float64, shape (d,)) and must return a finite float.
    """
    lower, upper = np.asarray(lower, dtype=np.float64), np.asarray(upper, dtype=np.float64)
    if lower.ndim != 1 or lower.shape != upper.shape or not lower.size:
        raise ValueError(f"bounds must be two vectors of one length, got shapes {lower.shape} and {upper.shape}")
    if not (np.isfinite(lower).all() and np.isfinite(upper).all() and (lower < upper).all()):
        raise ValueError(f"every lower bound must be finite and below its upper bound: {lower} .. {upper}")
    if init_points < 1 or iterations < 0 or candidates < 1:
        raise ValueError(f"need init_points >= 1, iterations >= 0, candidates >= 1; got {init_points}, "
                         f"{iterations}, {candidates}")
    if not xi >= 0:
        raise ValueError(f"xi must be >= 0, got {xi}")
    rng = np.random.default_rng(seed)
    initial = []
    if start is not None:
        start = np.asarray(start, dtype=np.float64)
        if start.shape != lower.shape or not ((lower <= start) & (start <= upper)).all():
            raise ValueError(f"start point {start.tolist()} is not inside the box {lower.tolist()} .. {upper.tolist()}")
        initial.append(start)
    width = upper - lower
    initial += list(lower + width * rng.random((init_points - len(initial), lower.size)))
    points: list[np.ndarray] = []
    values: list[float] = []
    for step in (progress or (lambda steps: steps))(range(init_points + iterations)):
        if step < len(initial):
            point = initial[step]
        else:
            unit = propose(np.stack([(p - lower) / width for p in points]), np.array(values), rng, candidates, xi)
            point = np.clip(lower + width * unit, lower, upper)
        value = float(objective(point.copy()))
        if not math.isfinite(value):
            raise ValueError(f"the objective returned {value} at {point.tolist()}; it must be finite")
        points.append(point)
        values.append(value)
    return SearchResult(np.stack(points), np.array(values))


def propose(unit_points: np.ndarray, values: np.ndarray, rng: np.random.Generator, candidates: int,
            xi: float) -> np.ndarray:
    """The candidate (unit cube) with the highest expected improvement under a GP fitted to the scores."""
    process = GaussianProcess(unit_points, values)
    incumbent = unit_points[int(np.argmax(values))]
    dims = unit_points.shape[1]
    local = candidates // (2 * len(LOCAL_SCALES))
    groups = [rng.random((candidates - local * len(LOCAL_SCALES), dims))]
    groups += [np.clip(incumbent + scale * rng.standard_normal((local, dims)), 0.0, 1.0) for scale in LOCAL_SCALES]
    pool = np.concatenate(groups)
    mean, std = process.predict(pool)
    return pool[int(np.argmax(expected_improvement(mean, std, float(values.max()), xi)))]


__all__ = ["GaussianProcess", "SearchResult", "expected_improvement", "matern52", "maximize", "propose"]
