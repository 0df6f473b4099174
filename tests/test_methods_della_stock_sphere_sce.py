"""DELLA, Model Stock, Karcher, NuSLERP, Multi-SLERP and SCE: hand-worked answers and known properties.

Agreement with mergekit on whole checkpoints is in test_mergekit_parity.py; here every method is
checked against numbers worked out by hand or against a property its formula guarantees.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from layermerge.errors import ConfigError
from layermerge.methods.della import magprune_drop_probability
from layermerge.methods.registry import get_method, validate_params


def make(method: str, tasks: list[str], **params):
    info = get_method(method)
    return info.cls(validate_params(info, params), tasks)


def random_experts(count: int, shape=(6, 5), seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=generator)
    return base, [base + 0.1 * torch.randn(shape, generator=generator) for _ in range(count)]


# ---------------------------------------------------------------- DELLA

def test_magprune_drop_probabilities_by_rank_within_each_row():
    # p = 0.3, ε = 0.1: the smallest |τ| of a row drops with 0.4, the largest with 0.2, linear between.
    tau = torch.tensor([[0.1, -0.3, 0.2], [5.0, 5.0, -1.0]])
    drop = magprune_drop_probability(tau, 0.3, 0.1)
    # row 2: |−1| ranks first; the two 5.0 tie and the lower column ranks lower (stable order).
    torch.testing.assert_close(drop, torch.tensor([[0.4, 0.2, 0.3], [0.3, 0.2, 0.4]]))
    torch.testing.assert_close(magprune_drop_probability(torch.tensor([7.0]), 0.3, 0.1), torch.tensor([0.3]))
    torch.testing.assert_close(magprune_drop_probability(torch.tensor([1.0, -3.0]), 0.5, 0.2),
                               torch.tensor([0.7, 0.3]))   # a 1-D tensor is one row


@pytest.mark.parametrize("della, dare", [("della_linear", "dare_linear"), ("della", "dare_ties")])
def test_della_without_a_window_is_dare(della, dare):
    base, experts = random_experts(3)
    tasks = ["a", "b", "c"]
    ours = make(della, tasks, drop_rate=0.6, epsilon=0.0, seed=4, scaling=0.7).merge_tensor("w", base, experts)
    theirs = make(dare, tasks, drop_rate=0.6, seed=4, scaling=0.7).merge_tensor("w", base, experts)
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=1e-6)


def test_della_keeps_large_entries_more_often_and_is_unbiased():
    """Over many seeds: kept fractions follow the window, and E[τ̃] = τ (survivors ÷ keep probability)."""
    generator = torch.Generator().manual_seed(1)
    base = torch.zeros(4, 50)
    tau = torch.randn(4, 50, generator=generator)
    drop = magprune_drop_probability(tau, 0.5, 0.3)
    seeds = 600
    total = torch.zeros_like(tau)
    kept = torch.zeros_like(tau)
    for seed in range(seeds):
        merged = make("della_linear", ["a"], drop_rate=0.5, epsilon=0.3, seed=seed, scaling=1.0).merge_tensor(
            "w", base, [tau])
        total += merged
        kept += merged != 0
    # the largest entry of each row survives with 0.8, the smallest with 0.2 (binomial, 600 draws)
    largest = tau.abs().argmax(dim=1)
    smallest = tau.abs().argmin(dim=1)
    rows = torch.arange(4)
    assert torch.all((kept[rows, largest] / seeds - 0.8).abs() < 0.08)
    assert torch.all((kept[rows, smallest] / seeds - 0.2).abs() < 0.08)
    # unbiased: the per-entry mean converges to τ; std of one draw ≤ |τ|·sqrt(1/0.2 − 1) = 2|τ|
    error = (total / seeds - tau).abs()
    assert torch.all(error <= 5 * 2 * tau.abs() / math.sqrt(seeds) + 1e-6)
    assert float(error.mean() / tau.abs().mean()) < 0.06
    assert float((1 - drop).mean()) == pytest.approx(0.5, abs=1e-6)


def test_della_l1_rescale_keeps_the_l1_norm_and_none_keeps_values():
    base, experts = random_experts(1)
    tau = experts[0] - base
    l1 = make("della_linear", ["a"], drop_rate=0.5, epsilon=0.2, rescale="l1", scaling=1.0)
    merged = l1.merge_tensor("w", base, experts) - base
    assert float(merged.abs().sum()) == pytest.approx(float(tau.abs().sum()), rel=1e-5)
    plain = make("della_linear", ["a"], drop_rate=0.5, epsilon=0.2, rescale="none", scaling=1.0)
    sparse = plain.merge_tensor("w", base, experts) - base
    survivors = sparse != 0
    torch.testing.assert_close(sparse[survivors], tau[survivors], atol=1e-6, rtol=0)   # survivors unscaled
    assert 0 < int(survivors.sum()) < tau.numel()
    assert 0 < plain.summary()["kept_fraction"]["a"] < 1


def test_della_is_deterministic_per_seed_tensor_and_task():
    base, experts = random_experts(2)
    first = make("della", ["a", "b"], seed=3).merge_tensor("w", base, experts)
    again = make("della", ["a", "b"], seed=3).merge_tensor("w", base, experts)
    other_seed = make("della", ["a", "b"], seed=4).merge_tensor("w", base, experts)
    other_key = make("della", ["a", "b"], seed=3).merge_tensor("v", base, experts)
    assert torch.equal(first, again)
    assert not torch.equal(first, other_seed) and not torch.equal(first, other_key)


@pytest.mark.parametrize("params", [{"drop_rate": 0.3, "epsilon": 0.3}, {"drop_rate": 0.9, "epsilon": 0.1},
                                    {"drop_rate": 1.0}, {"epsilon": -0.1}, {"rescale": "l2"}])
def test_della_refuses_windows_outside_the_unit_interval(params):
    with pytest.raises(ConfigError, match="della"):
        validate_params(get_method("della"), params)


# ---------------------------------------------------------------- Model Stock

def test_model_stock_hand_worked_sixty_degrees():
    # τ1 = [1, 0], τ2 = [½, √3/2]: cos θ = ½, N = 2 → t = 2·½ / (1 + ½) = 2/3; θ = θ0 + t·mean τ.
    base = torch.tensor([1.0, 1.0])
    tau1, tau2 = torch.tensor([1.0, 0.0]), torch.tensor([0.5, math.sqrt(3) / 2])
    merged = make("model_stock", ["a", "b"]).merge_tensor("w", base, [base + tau1, base + tau2])
    torch.testing.assert_close(merged, base + (2 / 3) * (tau1 + tau2) / 2)


def test_model_stock_limits_orthogonal_identical_and_opposite():
    base = torch.tensor([[2.0, -1.0, 0.5]])
    method = make("model_stock", ["a", "b", "c"])
    orthogonal = [base + torch.tensor([[1.0, 0, 0]]), base + torch.tensor([[0, 2.0, 0]]),
                  base + torch.tensor([[0, 0, 3.0]])]
    torch.testing.assert_close(method.merge_tensor("w", base, orthogonal), base)          # cos 0 → base
    same = [base + torch.tensor([[0.3, 0.1, -0.2]])] * 3
    torch.testing.assert_close(method.merge_tensor("w", base, same), same[0])              # cos 1 → average
    pair = make("model_stock", ["a", "b"])
    opposite = [base + torch.tensor([[1.0, 1, 1]]), base - torch.tensor([[1.0, 1, 1]])]   # 1 + cos = 0 → base
    torch.testing.assert_close(pair.merge_tensor("w", base, opposite), base)


def test_model_stock_filter_wise_uses_one_ratio_per_row():
    base = torch.zeros(2, 2)
    first = torch.tensor([[1.0, 0.0], [1.0, 2.0]])
    second = torch.tensor([[0.0, 1.0], [1.0, 2.0]])
    merged = make("model_stock", ["a", "b"], filter_wise=True).merge_tensor("w", base, [first, second])
    torch.testing.assert_close(merged, torch.tensor([[0.0, 0.0], [1.0, 2.0]]))   # row 0 orthogonal, row 1 equal
    whole = make("model_stock", ["a", "b"]).merge_tensor("w", base, [first, second])
    cos = 5 / 6                                       # whole tensors: one angle, (0 + 0 + 1 + 4) / (√6 · √6)
    t = 2 * cos / (1 + cos)
    torch.testing.assert_close(whole, t * (first + second) / 2)


# ---------------------------------------------------------------- Karcher

def test_karcher_on_a_circle_averages_the_angles_and_the_norms():
    """On S¹ the Karcher mean of points within a half circle is at their mean angle."""
    angles = [0.0, math.radians(30), math.radians(100)]
    norms = [1.0, 2.0, 3.0]
    experts = [torch.tensor([n * math.cos(a), n * math.sin(a)]) for n, a in zip(norms, angles)]
    merged = make("karcher", ["a", "b", "c"]).merge_tensor("w", None, experts)
    mean_angle = sum(angles) / 3
    torch.testing.assert_close(merged, torch.tensor([2.0 * math.cos(mean_angle), 2.0 * math.sin(mean_angle)]),
                               atol=1e-5, rtol=0)


def test_karcher_in_high_dimension_is_a_stationary_point():
    """At the Karcher mean the weighted log-maps of the directions sum to zero."""
    _, experts = random_experts(4, shape=(40,), seed=2)
    merged = make("karcher", list("abcd"), max_iter=100, tol=1e-9).merge_tensor("w", None, experts)
    m = (merged / merged.norm()).double()
    gradient = torch.zeros_like(m)
    for expert in experts:
        unit = (expert / expert.norm()).double()
        cos = float(torch.dot(m, unit).clamp(-1, 1))
        angle = math.acos(cos)
        gradient += angle / math.sin(angle) * (unit - cos * m) / 4
    assert float(gradient.norm()) < 1e-5
    assert float(merged.norm()) == pytest.approx(sum(float(e.norm()) for e in experts) / 4, rel=1e-5)


def test_karcher_two_experts_is_the_slerp_midpoint_and_one_expert_is_itself():
    a, b = torch.tensor([2.0, 0.0, 0.0]), torch.tensor([0.0, 4.0, 0.0])
    merged = make("karcher", ["a", "b"]).merge_tensor("w", None, [a, b])
    torch.testing.assert_close(merged, torch.tensor([3 / math.sqrt(2), 3 / math.sqrt(2), 0.0]))
    assert torch.equal(make("karcher", ["a"]).merge_tensor("w", None, [a]), a)
    zeros = make("karcher", ["a", "b"]).merge_tensor("w", None, [torch.zeros(3), torch.zeros(3)])
    assert torch.equal(zeros, torch.zeros(3))


# ---------------------------------------------------------------- NuSLERP and Multi-SLERP

def test_nuslerp_interpolates_task_vectors_on_their_arc():
    base = torch.tensor([[1.0, -2.0]])
    tau1, tau2 = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    halfway = make("nuslerp", ["a", "b"]).merge_tensor("w", base, [base + tau1, base + tau2])
    torch.testing.assert_close(halfway, base + torch.tensor([[math.sqrt(0.5), math.sqrt(0.5)]]))
    # weights [1, 3] put t = 3/4 of the way to the second: sin(¼·π/2)·τ1 + sin(¾·π/2)·τ2
    weighted = make("nuslerp", ["a", "b"], weights=[1.0, 3.0]).merge_tensor("w", base, [base + tau1, base + tau2])
    torch.testing.assert_close(weighted, base + torch.tensor([[math.sin(math.pi / 8), math.sin(3 * math.pi / 8)]]))


def test_nuslerp_slices_and_colinear_vectors():
    base = torch.zeros(2, 2)
    first = torch.tensor([[1.0, 0.0], [2.0, 0.0]])
    second = torch.tensor([[0.0, 1.0], [4.0, 0.0]])
    rows = make("nuslerp", ["a", "b"], flatten=False).merge_tensor("w", base, [first, second])
    # row 0 is a quarter circle (midpoint √½, √½); row 1 is colinear: linear midpoint 3.0
    torch.testing.assert_close(rows, torch.tensor([[math.sqrt(0.5), math.sqrt(0.5)], [3.0, 0.0]]))
    first, second = torch.tensor([[1.0, 3.0], [0.0, 1.0]]), torch.tensor([[0.0, 1.0], [1.0, 3.0]])
    columns = make("nuslerp", ["a", "b"], flatten=False, row_wise=True).merge_tensor("w", base, [first, second])
    expected = torch.stack([slerp_reference(0.5, first[:, j], second[:, j]) for j in range(2)], dim=1)
    torch.testing.assert_close(columns, expected)


def slerp_reference(t: float, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Textbook SLERP of two vectors (linear when they are colinear)."""
    cos = float(torch.dot(a, b) / (a.norm() * b.norm()))
    if abs(cos) > 1 - 1e-12:
        return (1 - t) * a + t * b
    omega = math.acos(cos)
    return (math.sin((1 - t) * omega) * a + math.sin(t * omega) * b) / math.sin(omega)


def test_nuslerp_without_a_base_is_slerp_of_the_weights():
    _, experts = random_experts(2, shape=(7,), seed=5)
    ours = make("nuslerp", ["a", "b"], weights=[2.0, 1.0]).merge_tensor("w", None, experts)
    torch.testing.assert_close(ours, slerp_reference(1 / 3, *experts), atol=1e-6, rtol=1e-6)


def test_multislerp_keeps_the_weighted_mean_norm_and_is_symmetric():
    base, experts = random_experts(3, shape=(30,), seed=6)
    method = make("multislerp", ["a", "b", "c"], weights=[1.0, 2.0, 3.0])
    merged = method.merge_tensor("w", base, experts) - base
    norms = [float((e - base).norm()) for e in experts]
    assert float(merged.norm()) == pytest.approx((norms[0] + 2 * norms[1] + 3 * norms[2]) / 6, rel=1e-5)
    equal = make("multislerp", ["a", "b", "c"])
    forward = equal.merge_tensor("w", base, experts)
    backward = equal.merge_tensor("w", base, experts[::-1])
    torch.testing.assert_close(forward, backward, atol=1e-6, rtol=0)


def test_multislerp_two_orthogonal_equal_vectors_meet_at_the_bisector():
    base = torch.zeros(2)
    merged = make("multislerp", ["a", "b"]).merge_tensor("w", base, [torch.tensor([2.0, 0]), torch.tensor([0, 2.0])])
    torch.testing.assert_close(merged, torch.tensor([math.sqrt(2), math.sqrt(2)]), atol=1e-6, rtol=0)


def test_multislerp_refuses_cancelling_directions_and_bad_weights():
    base = torch.zeros(2)
    experts = [torch.tensor([1.0, 0]), torch.tensor([-0.5, math.sqrt(3) / 2]), torch.tensor([-0.5, -math.sqrt(3) / 2])]
    with pytest.raises(ConfigError, match="cancel out"):
        make("multislerp", ["a", "b", "c"]).merge_tensor("w", base, experts)
    with pytest.raises(ConfigError, match="3 weights"):
        make("multislerp", ["a", "b", "c"], weights=[1.0, 2.0])
    with pytest.raises(ConfigError, match="sum to 0"):
        make("multislerp", ["a", "b"], weights=[1.0, -1.0])


# ---------------------------------------------------------------- SCE

def sce_reference(base: np.ndarray, experts: list[np.ndarray], topk: float) -> np.ndarray:
    """SCE entry by entry in float64, written from the paper's three steps."""
    taus = [e.astype(np.float64) - base for e in experts]
    n = base.size
    flat = np.stack([t.reshape(-1) for t in taus])
    if topk < 1:
        variance = flat.var(axis=0)
        count = int(np.count_nonzero(variance) * topk)
        order = sorted(range(n), key=lambda j: (-variance[j], j))
        selected = np.zeros(n, dtype=bool)
        selected[order[:count]] = True
        flat = flat * selected
    energy = (flat ** 2).mean(axis=1)
    weights = energy / energy.sum()
    out = np.zeros(n)
    for j in range(n):
        sign = 1.0 if flat[:, j].sum() >= 0 else -1.0
        agree = [i for i in range(len(taus)) if np.sign(flat[i, j]) == sign]
        denominator = max(sum(weights[i] for i in agree), 1e-6)
        out[j] = sum(weights[i] * flat[i, j] for i in agree) / denominator
    return base + out.reshape(base.shape)


@pytest.mark.parametrize("topk", [1.0, 0.5, 0.1])
def test_sce_matches_an_entrywise_reference(topk):
    base, experts = random_experts(3, shape=(8, 6), seed=7)
    ours = make("sce", ["a", "b", "c"], select_topk=topk).merge_tensor("w", base, experts)
    theirs = sce_reference(base.numpy(), [e.numpy() for e in experts], topk)
    np.testing.assert_allclose(ours.numpy(), theirs, atol=1e-6, rtol=0)


def test_sce_hand_worked():
    # τ1 = [2, −1], τ2 = [1, 1]: mean squares 2.5 and 1 → w = [5/7, 2/7]; signs: entry 0 both +,
    # entry 1 sums to 0 → + elected, only τ2 agrees → 1.
    base = torch.zeros(2)
    merged = make("sce", ["a", "b"]).merge_tensor("w", base, [torch.tensor([2.0, -1.0]), torch.tensor([1.0, 1.0])])
    torch.testing.assert_close(merged, torch.tensor([(5 / 7 * 2 + 2 / 7 * 1) / 1.0, 1.0]))


def test_multislerp_keeps_a_tensor_no_expert_changed():
    """LoRA experts leave the embeddings as the base has them: every task vector of that tensor is zero, and
    the merge is the base (it used to stop with 'directions cancel out'); antipodal ones still stop."""
    base = torch.tensor([[1.0, -2.0], [0.5, 3.0]])
    method = make("multislerp", ["a", "b", "c"])
    assert torch.equal(method.merge_tensor("embed", base, [base.clone(), base.clone(), base.clone()]), base)
    with pytest.raises(ConfigError, match="cancel out"):
        method = make("multislerp", ["a", "b", "c"], weights=[1.0, 1.0, 2.0])
        method.merge_tensor("w", torch.zeros(2), [torch.tensor([1.0, 0]), torch.tensor([1.0, 0]),
                                                  torch.tensor([-1.0, 0])])
