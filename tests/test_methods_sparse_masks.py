"""Model Breadcrumbs and Consensus (TALL masks): hand-worked numbers, explicit-loop references, edge cases."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from layermerge.errors import ConfigError
from layermerge.methods.registry import get_method, validate_params


def make(method: str, tasks: list[str], **params):
    info = get_method(method)
    return info.cls(validate_params(info, params), tasks)


# ---------------------------------------------------------------- breadcrumbs

BASE = torch.arange(10, dtype=torch.float32)
TAU1 = torch.tensor([0.1, -0.9, 0.3, 0.05, -0.4, 0.6, -0.2, 0.7, 0.01, -0.5])
TAU2 = torch.tensor([0.8, 0.2, -0.3, 0.1, 0.05, -0.6, 0.4, 0.0, 0.5, -0.7])
# top_drop 0.1 / bottom_drop 0.5 of 10 entries: drop the largest 1 and smallest 5 magnitudes.
#   τ1 keeps indices 4, 5, 7, 9 → [0, 0, 0, 0, -0.4, 0.6, 0, 0.7, 0, -0.5]
#   τ2 keeps indices 5, 6, 8, 9 → [0, 0, 0, 0, 0, -0.6, 0.4, 0, 0.5, -0.7]
MASKED_SUM = torch.tensor([0, 0, 0, 0, -0.4, 0.0, 0.4, 0.7, 0.5, -1.2])
MASKED_TIES = torch.tensor([0, 0, 0, 0, -0.4, 0.6, 0.4, 0.7, 0.5, -0.6])  # index 5 sums to 0 → + elected


def test_breadcrumbs_hand_worked():
    merged = make("breadcrumbs", ["a", "b"], top_drop=0.1, bottom_drop=0.5).merge_tensor(
        "w", BASE, [BASE + TAU1, BASE + TAU2])
    torch.testing.assert_close(merged, BASE + 0.3 * MASKED_SUM, atol=1e-6, rtol=0)


def test_breadcrumbs_ties_hand_worked():
    merged = make("breadcrumbs_ties", ["a", "b"], top_drop=0.1, bottom_drop=0.5).merge_tensor(
        "w", BASE, [BASE + TAU1, BASE + TAU2])
    torch.testing.assert_close(merged, BASE + MASKED_TIES, atol=1e-6, rtol=0)


def reference_band(tau: np.ndarray, top: float, bottom: float) -> np.ndarray:
    n = tau.size
    n_top, n_bottom = int(top * n), int(bottom * n)
    ranked = sorted(range(n), key=lambda j: (abs(float(tau[j])), j))  # ascending, lower index first
    keep = set(ranked[n_bottom:n - n_top]) if n_top + n_bottom < n else set()
    return np.array([tau[j] if j in keep else 0.0 for j in range(n)], dtype=np.float64)


@pytest.mark.parametrize("top,bottom", [(0.01, 0.9), (0.05, 0.5), (0.0, 0.0), (0.2, 0.3)])
def test_breadcrumbs_match_explicit_loops(top, bottom):
    rng = np.random.default_rng(5)
    base = rng.normal(size=(12, 15)).astype(np.float32)
    experts = [(base + rng.normal(scale=0.1, size=base.shape)).astype(np.float32) for _ in range(3)]
    taus = [(e - base).reshape(-1) for e in experts]
    bands = [reference_band(t, top, bottom) for t in taus]
    flat = base.reshape(-1).astype(np.float64)
    expected_ta = flat + 0.3 * sum(bands)
    expected_ties = np.empty_like(flat)
    for j in range(flat.size):
        values = [b[j] for b in bands]
        sign = 1.0 if sum(values) >= 0 else -1.0
        agreeing = [v for v in values if v != 0 and np.sign(v) == sign]
        expected_ties[j] = flat[j] + 0.7 * (sum(agreeing) / len(agreeing) if agreeing else 0.0)
    tensors = torch.as_tensor(base), [torch.as_tensor(e) for e in experts]
    ta = make("breadcrumbs", ["a", "b", "c"], top_drop=top, bottom_drop=bottom).merge_tensor("w", *tensors)
    ties = make("breadcrumbs_ties", ["a", "b", "c"], top_drop=top, bottom_drop=bottom,
                scaling=0.7).merge_tensor("w", *tensors)
    np.testing.assert_allclose(ta.numpy().reshape(-1), expected_ta, atol=1e-6, rtol=0)
    np.testing.assert_allclose(ties.numpy().reshape(-1), expected_ties, atol=1e-6, rtol=0)


def test_breadcrumbs_edge_cases():
    base = torch.randn(8)
    experts = [base + torch.randn(8), base + torch.randn(8)]
    everything_dropped = make("breadcrumbs", ["a", "b"], top_drop=0.5, bottom_drop=0.5).merge_tensor(
        "w", base, experts)
    assert torch.equal(everything_dropped, base)
    for method in ("breadcrumbs", "breadcrumbs_ties"):
        merged = make(method, ["a", "b"]).merge_tensor("w", base, [base.clone(), base.clone()])
        assert torch.equal(merged, base)
    with pytest.raises(ConfigError, match="top_drop \\+ bottom_drop"):
        validate_params(get_method("breadcrumbs"), {"top_drop": 0.3, "bottom_drop": 0.8})


# ---------------------------------------------------------------- consensus (TALL masks)

C_TAUS = [torch.tensor([1.0, 0.1, 0.5, -1.0]), torch.tensor([1.0, 0.0, -0.5, 2.0]),
          torch.tensor([0.0, 0.0, 0.1, -1.0])]
# τ_MTL = [2, 0.1, 0.1, 0]; with λ = 0.5 the TALL masks |τ_t| ≥ 0.5·|τ_MTL − τ_t| are
#   entry 0: ✓ ✓ ✗ (2 tasks)   entry 1: ✓ ✗ ✗ (1)   entry 2: ✓ ✓ ✓ (3)   entry 3: ✓ ✓ ✓ (3)


def test_consensus_hand_worked():
    base = torch.tensor([10.0, 20.0, 30.0, 40.0])
    experts = [base + t for t in C_TAUS]
    two = make("consensus", ["a", "b", "c"], tall_lambda=0.5, min_agreement=2, scaling=1.0)
    torch.testing.assert_close(two.merge_tensor("w", base, experts), base + torch.tensor([2.0, 0, 0.1, 0]))
    three = make("consensus", ["a", "b", "c"], tall_lambda=0.5, min_agreement=3, scaling=0.5)
    expected = base + 0.5 * torch.tensor([0, 0, 0.1, 0])
    torch.testing.assert_close(three.merge_tensor("w", base, experts), expected)
    assert two.summary()["kept_fraction"] == pytest.approx(0.75)


def test_consensus_matches_explicit_loops():
    rng = np.random.default_rng(9)
    base = rng.normal(size=(9, 11)).astype(np.float32)
    experts = [(base + rng.normal(scale=0.1, size=base.shape)).astype(np.float32) for _ in range(4)]
    taus = [(e - base).reshape(-1).astype(np.float64) for e in experts]
    flat = base.reshape(-1).astype(np.float64)
    expected = np.empty_like(flat)
    for j in range(flat.size):
        multi = sum(t[j] for t in taus)
        votes = sum(1 for t in taus if abs(t[j]) >= 0.4 * abs(multi - t[j]))
        expected[j] = flat[j] + (0.3 * multi if votes >= 2 else 0.0)
    merged = make("consensus", ["a", "b", "c", "d"]).merge_tensor(
        "w", torch.as_tensor(base), [torch.as_tensor(e) for e in experts])
    np.testing.assert_allclose(merged.numpy().reshape(-1), expected, atol=1e-5, rtol=0)


def test_consensus_edge_cases():
    base = torch.randn(6)
    experts = [base + torch.randn(6) for _ in range(3)]
    no_filter = make("consensus", ["a", "b", "c"], min_agreement=0, scaling=0.3).merge_tensor(
        "w", base, experts)
    torch.testing.assert_close(no_filter, base + 0.3 * sum(e - base for e in experts))
    zeros = make("consensus", ["a", "b", "c"]).merge_tensor("w", base, [base.clone()] * 3)
    assert torch.equal(zeros, base)
    with pytest.raises(ConfigError, match="min_agreement=4"):
        make("consensus", ["a", "b", "c"], min_agreement=4)
