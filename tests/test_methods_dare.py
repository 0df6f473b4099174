"""DARE: drop-and-rescale values, seeding (reproducible, seed-dependent, order-free), TA and TIES merges."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from layermerge.errors import ConfigError
from layermerge.methods.registry import get_method, validate_params


def make(method: str, tasks: list[str], **params):
    info = get_method(method)
    return info.cls(validate_params(info, params), tasks)


def sparse_vector(task: str, key: str, base: torch.Tensor, expert: torch.Tensor, **params) -> torch.Tensor:
    """τ̃ of one task: dare_linear with that expert alone and λ=1 returns θ0 + τ̃."""
    return make("dare_linear", [task], scaling=1.0, **params).merge_tensor(key, base, [expert]) - base


@pytest.fixture
def tensors():
    generator = torch.Generator().manual_seed(0)
    base = torch.randn(40, 25, generator=generator)
    experts = [base + 0.1 * torch.randn(40, 25, generator=generator) for _ in range(3)]
    return base, experts


def test_survivors_are_rescaled_and_the_rest_dropped(tensors):
    base, experts = tensors
    tau = experts[0] - base
    sparse = sparse_vector("a", "w", base, experts[0], drop_rate=0.75)
    kept = sparse != 0
    torch.testing.assert_close(sparse[kept], tau[kept] / 0.25, rtol=1e-6, atol=0)
    # 1000 entries, p = 0.75: the kept count is Binomial(1000, 0.25), mean 250, sd ≈ 13.7
    assert 180 < int(kept.sum()) < 320


def test_same_seed_same_mask_and_different_seed_different_mask(tensors):
    base, experts = tensors
    first = sparse_vector("a", "w", base, experts[0], drop_rate=0.5, seed=3)
    again = sparse_vector("a", "w", base, experts[0], drop_rate=0.5, seed=3)
    other = sparse_vector("a", "w", base, experts[0], drop_rate=0.5, seed=4)
    assert torch.equal(first, again)
    assert not torch.equal(first != 0, other != 0)


def test_mask_depends_on_key_and_task_not_on_visiting_order(tensors):
    base, experts = tensors
    keys = ["layer.0.w", "layer.1.w", "layer.2.w"]
    tasks = ["a", "b", "c"]

    forward = make("dare_linear", tasks, drop_rate=0.6, scaling=1.0)
    results_forward = {k: forward.merge_tensor(k, base, experts) for k in keys}
    backward = make("dare_linear", tasks, drop_rate=0.6, scaling=1.0)
    results_backward = {k: backward.merge_tensor(k, base, experts) for k in reversed(keys)}
    for k in keys:
        assert torch.equal(results_forward[k], results_backward[k])

    # Each (key, task) has its own mask: the same tensor under another name or task gets another one.
    assert not torch.equal(sparse_vector("a", keys[0], base, experts[0], drop_rate=0.6) != 0,
                           sparse_vector("a", keys[1], base, experts[0], drop_rate=0.6) != 0)
    assert not torch.equal(sparse_vector("a", keys[0], base, experts[0], drop_rate=0.6) != 0,
                           sparse_vector("b", keys[0], base, experts[0], drop_rate=0.6) != 0)

    # Expert order does not matter either: the masks follow the task names.
    swapped = make("dare_linear", ["c", "a", "b"], drop_rate=0.6, scaling=1.0)
    merged = swapped.merge_tensor(keys[0], base, [experts[2], experts[0], experts[1]])
    torch.testing.assert_close(merged, results_forward[keys[0]], rtol=0, atol=1e-6)


def test_dare_linear_is_task_arithmetic_of_sparse_vectors(tensors):
    base, experts = tensors
    tasks = ["a", "b", "c"]
    merged = make("dare_linear", tasks, drop_rate=0.9, seed=1, scaling=0.3).merge_tensor("w", base, experts)
    sparse = [sparse_vector(t, "w", base, e, drop_rate=0.9, seed=1) for t, e in zip(tasks, experts)]
    expected = base.numpy().astype(np.float64) + 0.3 * sum(s.numpy().astype(np.float64) for s in sparse)
    np.testing.assert_allclose(merged.numpy(), expected, atol=1e-6, rtol=0)


def test_drop_rate_zero_is_task_arithmetic(tensors):
    base, experts = tensors
    merged = make("dare_linear", ["a", "b", "c"], drop_rate=0.0, scaling=0.3).merge_tensor("w", base, experts)
    torch.testing.assert_close(merged, base + 0.3 * sum(e - base for e in experts), rtol=0, atol=1e-6)


def test_dare_ties_is_ties_merge_of_sparse_vectors(tensors):
    base, experts = tensors
    tasks = ["a", "b", "c"]
    merged = make("dare_ties", tasks, drop_rate=0.5, seed=2, scaling=0.8).merge_tensor("w", base, experts)
    sparse = [sparse_vector(t, "w", base, e, drop_rate=0.5, seed=2).numpy().reshape(-1) for t, e in
              zip(tasks, experts)]
    flat_base = base.numpy().reshape(-1)
    expected = np.empty(flat_base.size)
    for j in range(flat_base.size):
        values = [float(s[j]) for s in sparse]
        sign = 1.0 if sum(values) >= 0 else -1.0
        agreeing = [v for v in values if v != 0 and np.sign(v) == sign]
        expected[j] = flat_base[j] + 0.8 * (sum(agreeing) / len(agreeing) if agreeing else 0.0)
    np.testing.assert_allclose(merged.numpy().reshape(-1), expected, atol=1e-6, rtol=0)


def test_all_zero_task_vectors_return_base(tensors):
    base, _ = tensors
    for method in ("dare_linear", "dare_ties"):
        merged = make(method, ["a", "b"]).merge_tensor("w", base, [base.clone(), base.clone()])
        assert torch.equal(merged, base)


def test_drop_rate_one_is_refused():
    with pytest.raises(ConfigError, match="drop_rate"):
        validate_params(get_method("dare_linear"), {"drop_rate": 1.0})
