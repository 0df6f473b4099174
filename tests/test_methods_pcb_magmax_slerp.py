"""PCB-Merging, MagMax and SLERP: hand-worked numbers and explicit-loop references."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from layermerge.methods.registry import get_method, validate_params


def make(method: str, tasks: list[str], **params):
    info = get_method(method)
    return info.cls(validate_params(info, params), tasks)


# ---------------------------------------------------------------- PCB

def test_pcb_hand_worked_two_entries():
    # τ1 = [1, 0], τ2 = [0, 1], T = 2, ratio 1 (keep all).
    # intra_1 = softmax(2·[1, 0]) = [e²/(e²+1), 1/(e²+1)]; norm(τ1⊙τ1) = [1, 0] → softmax [e/(e+1), 1/(e+1)];
    # τ1⊙τ2 = [0, 0] is constant → Norm 0 → softmax [½, ½]. So β1[0] = e²/(e²+1)·(e/(e+1) + ½) and, by
    # symmetry, β2[0] = 1/(e²+1)·(1/(e+1) + ½); merged[0] = β1[0]/(β1[0] + β2[0]) = merged[1].
    e = math.e
    b1 = e**2 / (e**2 + 1) * (e / (e + 1) + 0.5)
    b2 = 1 / (e**2 + 1) * (1 / (e + 1) + 0.5)
    first = b1 / (b1 + b2)
    base = torch.tensor([5.0, -5.0])
    merged = make("pcb", ["a", "b"], ratio=1.0, scaling=1.0).merge_tensor(
        "w", base, [base + torch.tensor([1.0, 0.0]), base + torch.tensor([0.0, 1.0])])
    torch.testing.assert_close(merged, base + torch.tensor([first, first]), atol=1e-6, rtol=0)


def reference_pcb(base: np.ndarray, experts: list[np.ndarray], ratio: float, scaling: float) -> np.ndarray:
    flat = base.reshape(-1).astype(np.float64)
    taus = [e.reshape(-1).astype(np.float64) - flat for e in experts]
    count, n = len(taus), flat.size

    def norm(x):
        span = x.max() - x.min()
        return np.zeros_like(x) if span <= 0 else (x - x.min()) / span

    def softmax(x):
        w = np.exp(x - x.max())
        return w / w.sum()

    scores = []
    for i in range(count):
        intra = softmax(count * norm(taus[i] * taus[i]))
        inter = sum(softmax(norm(taus[i] * taus[j])) for j in range(count))
        scores.append(intra * inter)
    masks = []
    for s in scores:
        threshold = np.sort(s)[min(n - 1, int((1 - ratio) * n))]
        masks.append(s >= threshold)
    out = np.empty(n)
    for j in range(n):
        weight = sum(scores[i][j] for i in range(count) if masks[i][j])
        total = sum(scores[i][j] * taus[i][j] for i in range(count) if masks[i][j])
        out[j] = flat[j] + scaling * (total / weight if weight > 0 else 0.0)
    return out.reshape(base.shape)


@pytest.mark.parametrize("ratio,scaling,count", [(0.1, 1.0, 3), (0.5, 0.8, 2), (1.0, 1.0, 4), (0.02, 1.2, 3)])
def test_pcb_matches_explicit_loops(ratio, scaling, count):
    rng = np.random.default_rng(int(ratio * 100) + count)
    base = rng.normal(size=(10, 13)).astype(np.float32)
    experts = [(base + rng.normal(scale=0.1, size=base.shape)).astype(np.float32) for _ in range(count)]
    merged = make("pcb", [f"t{i}" for i in range(count)], ratio=ratio, scaling=scaling).merge_tensor(
        "w", torch.as_tensor(base), [torch.as_tensor(e) for e in experts])
    expected = reference_pcb(base, experts, ratio, scaling)
    np.testing.assert_allclose(merged.numpy(), expected, atol=1e-5, rtol=0)


def test_pcb_keeps_about_ratio_per_task_and_handles_zeros():
    rng = np.random.default_rng(1)
    base = torch.as_tensor(rng.normal(size=200).astype(np.float32))
    # A single expert: the output is θ0 + τ on the kept entries only, about ratio·n of them.
    expert = base + torch.as_tensor(rng.normal(size=200).astype(np.float32))
    merged = make("pcb", ["a"], ratio=0.1).merge_tensor("w", base, [expert])
    changed = merged != base
    assert int(changed.sum()) == 20
    torch.testing.assert_close(merged[changed], expert[changed])
    assert torch.equal(make("pcb", ["a", "b"]).merge_tensor("w", base, [base.clone(), base.clone()]), base)


# ---------------------------------------------------------------- MagMax

def test_magmax_hand_worked():
    base = torch.tensor([1.0, 1.0, 1.0, 1.0])
    tau1 = torch.tensor([1.0, -3.0, 2.0, 0.0])
    tau2 = torch.tensor([-2.0, 1.0, -2.0, 0.0])
    # largest magnitudes: −2 (τ2), −3 (τ1), tie |2| = |−2| → the later expert's −2, 0
    merged = make("magmax", ["a", "b"]).merge_tensor("w", base, [base + tau1, base + tau2])
    torch.testing.assert_close(merged, base + 0.5 * torch.tensor([-2.0, -3.0, -2.0, 0.0]))
    full = make("magmax", ["a", "b"], scaling=1.0).merge_tensor("w", base, [base + tau1, base + tau2])
    torch.testing.assert_close(full, base + torch.tensor([-2.0, -3.0, -2.0, 0.0]))


def test_magmax_matches_explicit_loops():
    rng = np.random.default_rng(4)
    base = rng.normal(size=(7, 6)).astype(np.float32)
    experts = [(base + rng.normal(scale=0.1, size=base.shape)).astype(np.float32) for _ in range(4)]
    taus = [(e - base).reshape(-1) for e in experts]
    expected = base.reshape(-1).astype(np.float64).copy()
    for j in range(expected.size):
        best = 0.0
        for t in taus:
            if abs(t[j]) >= abs(best):
                best = float(t[j])
        expected[j] += 0.5 * best
    merged = make("magmax", list("abcd")).merge_tensor(
        "w", torch.as_tensor(base), [torch.as_tensor(e) for e in experts])
    np.testing.assert_allclose(merged.numpy().reshape(-1), expected, atol=1e-6, rtol=0)


# ---------------------------------------------------------------- SLERP

def slerp_of(a, b, t=0.5):
    return make("slerp", ["a", "b"], t=t).merge_tensor("w", torch.zeros_like(a), [a, b])


def test_slerp_hand_worked():
    a, b = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    half = math.sqrt(0.5)
    torch.testing.assert_close(slerp_of(a, b), torch.tensor([half, half]))
    # t = 1/3 of a right angle: 30° from a → [cos 30°, sin 30°]
    thirty_degrees = torch.tensor([math.cos(math.pi / 6), math.sin(math.pi / 6)])
    torch.testing.assert_close(slerp_of(a, b, 1 / 3), thirty_degrees)
    torch.testing.assert_close(slerp_of(a, b, 0.0), a)
    torch.testing.assert_close(slerp_of(a, b, 1.0), b)


def test_slerp_matches_formula_and_keeps_norm():
    rng = np.random.default_rng(2)
    a = rng.normal(size=(6, 4)).astype(np.float32)
    b = rng.normal(size=(6, 4)).astype(np.float32)
    b *= np.linalg.norm(a) / np.linalg.norm(b)
    for t in (0.2, 0.5, 0.9):
        x, y = a.reshape(-1).astype(np.float64), b.reshape(-1).astype(np.float64)
        omega = math.acos(float(x @ y / (np.linalg.norm(x) * np.linalg.norm(y))))
        expected = (math.sin((1 - t) * omega) * x + math.sin(t * omega) * y) / math.sin(omega)
        merged = slerp_of(torch.as_tensor(a), torch.as_tensor(b), t)
        np.testing.assert_allclose(merged.numpy().reshape(-1), expected, atol=1e-5, rtol=0)
        assert float(merged.norm()) == pytest.approx(float(np.linalg.norm(a)), rel=1e-5)


def test_slerp_falls_back_to_linear():
    a = torch.tensor([1.0, 2.0, 3.0])
    torch.testing.assert_close(slerp_of(a, 2 * a, 0.25), 0.75 * a + 0.25 * 2 * a)       # colinear
    torch.testing.assert_close(slerp_of(a, -a, 0.25), 0.75 * a - 0.25 * a)              # antipodal
    torch.testing.assert_close(slerp_of(torch.zeros(3), a, 0.25), 0.25 * a)             # zero tensor
    nearly = a + torch.tensor([0.0, 0.0, 0.01])                                          # cos ≈ 0.99999
    torch.testing.assert_close(slerp_of(a, nearly, 0.5), 0.5 * a + 0.5 * nearly)
