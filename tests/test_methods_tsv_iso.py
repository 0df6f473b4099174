"""TSV-M, ISO-C and ISO-CTS: closed-form cases, NumPy float64 references of the released algorithms,
the non-matrix rule, parameter checks and a merge of tiny BERT models end to end."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import build_family
from safetensors.torch import load_file

import layermerge
from layermerge.errors import ConfigError
from layermerge.methods.iso import iso_cts_split
from layermerge.methods.registry import get_method, validate_params

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ATOL = 1e-5


def make(method: str, tasks: int, **params):
    info = get_method(method)
    return info.cls(validate_params(info, params), [f"t{i}" for i in range(tasks)])


def merge(method: str, base: np.ndarray, taus: list[np.ndarray], **params) -> np.ndarray:
    """Run a method on θ0 and experts θ0 + τ_i (float32 in, float64 out for comparisons)."""
    base32 = torch.as_tensor(base, dtype=torch.float32)
    experts = [base32 + torch.as_tensor(t, dtype=torch.float32) for t in taus]
    merged = make(method, len(taus), **params).merge_tensor("w", base32, experts)
    assert merged.dtype == torch.float32 and merged.shape == base32.shape
    return merged.double().numpy()


def task_vectors_of(base: np.ndarray, taus: list[np.ndarray]) -> list[np.ndarray]:
    """The task vectors exactly as the method sees them (after the float32 round trip)."""
    base32 = base.astype(np.float32)
    return [((base32 + t.astype(np.float32)).astype(np.float64) - base32.astype(np.float64)) for t in taus]


def random_case(seed: int, shape: tuple[int, int], tasks: int):
    rng = np.random.default_rng(seed)
    base = rng.normal(size=shape)
    return base, [rng.normal(scale=0.1, size=shape) for _ in range(tasks)]


# ------------------------------------------------------------------ NumPy references (float64)
# Written from the papers' algorithms as their released code lays them out: fixed-size buffers of
# r = min(m, n) slots filled block by block (unused slots stay zero), polar factors u·vh of the
# buffers' full SVDs, and the mean taken over all r slots.

def polar(a: np.ndarray) -> np.ndarray:
    u, _, vh = np.linalg.svd(a, full_matrices=False)
    return u @ vh


def reference_tsv(base, taus, alpha):
    r, count = min(base.shape), len(taus)
    k = int(r / count)
    U, S, Vh = np.zeros((base.shape[0], r)), np.zeros(r), np.zeros((r, base.shape[1]))
    for i, tau in enumerate(taus):
        u, s, vh = np.linalg.svd(tau, full_matrices=False)
        U[:, i * k:(i + 1) * k], S[i * k:(i + 1) * k], Vh[i * k:(i + 1) * k] = u[:, :k], s[:k], vh[:k]
    return base + alpha * polar(U) @ np.diag(S) @ polar(Vh)


def reference_iso_c(base, taus, alpha):
    u, s, vh = np.linalg.svd(sum(taus), full_matrices=False)
    return base + alpha * s.mean() * u @ vh


def reference_iso_cts(base, taus, alpha, fraction):
    r, count = min(base.shape), len(taus)
    common = int(r * fraction)
    common = r - round((r - common) / count) * count
    per_task = (r - common) // count
    u, s, vh = np.linalg.svd(sum(taus), full_matrices=False)
    U, S, Vh = np.zeros((base.shape[0], r)), np.zeros(r), np.zeros((r, base.shape[1]))
    U[:, :common], S[:common], Vh[:common] = u[:, :common], s[:common], vh[:common]
    for i, tau in enumerate(taus):
        ut, st, vt = np.linalg.svd(tau - u[:, :common] @ u[:, :common].T @ tau, full_matrices=False)
        block = slice(common + i * per_task, common + (i + 1) * per_task)
        U[:, block], S[block], Vh[block] = ut[:, :per_task], st[:per_task], vt[:per_task]
    return base + alpha * S.mean() * polar(U) @ polar(Vh)


# ------------------------------------------------------------------ TSV-M

@pytest.mark.parametrize("shape,tasks,alpha", [((12, 9), 3, 1.0), ((7, 16), 2, 0.8), ((20, 11), 4, 1.3),
                                               ((10, 10), 3, 1.0)])
def test_tsv_matches_the_reference(shape, tasks, alpha):
    base, taus = random_case(sum(shape) + tasks, shape, tasks)
    expected = reference_tsv(base.astype(np.float32).astype(np.float64), task_vectors_of(base, taus), alpha)
    np.testing.assert_allclose(merge("tsv_m", base, taus, scaling=alpha), expected, atol=ATOL, rtol=0)


def test_tsv_on_orthogonal_tasks_is_task_arithmetic():
    # τ_i = Q_m[:, block_i] diag(s_i) Q_n[:, block_i]ᵀ: mutually orthogonal row and column spaces of rank
    # 3 = ⌊9/3⌋, so each task keeps all of itself and the orthogonalisation has nothing to remove.
    rng = np.random.default_rng(0)
    left, _ = np.linalg.qr(rng.normal(size=(12, 12)))
    right, _ = np.linalg.qr(rng.normal(size=(9, 9)))
    taus = [left[:, 3 * i:3 * i + 3] @ np.diag(rng.uniform(0.5, 2.0, 3)) @ right[:, 3 * i:3 * i + 3].T
            for i in range(3)]
    base = rng.normal(size=(12, 9))
    exact = task_vectors_of(base, taus)
    for alpha in (1.0, 0.4):
        merged = merge("tsv_m", base, taus, scaling=alpha)
        np.testing.assert_allclose(merged, base.astype(np.float32) + alpha * sum(exact), atol=ATOL, rtol=0)


def test_tsv_one_expert_is_the_expert_scaled():
    base, (tau,) = random_case(3, (8, 5), 1)
    (exact,) = task_vectors_of(base, [tau])
    np.testing.assert_allclose(merge("tsv_m", base, [tau]), base.astype(np.float32) + exact, atol=ATOL, rtol=0)
    np.testing.assert_allclose(merge("tsv_m", base, [tau], scaling=0.5),
                               base.astype(np.float32) + 0.5 * exact, atol=ATOL, rtol=0)


def test_tsv_identical_experts_give_one_truncated_task_vector():
    # Three copies of τ: the gathered U = [A, A, A] is rank-deficient. Its unique polar factor on the
    # range, [A, A, A]/√3, makes U⊥ΣV⊥ᵀ = A S Bᵀ, the best rank-⌊r/T⌋ approximation of τ; an
    # arbitrary completion of the null space (the released code's SVD) would add a spurious N S Mᵀ.
    base, (tau,) = random_case(4, (9, 6), 1)
    (exact,) = task_vectors_of(base, [tau])
    u, s, vh = np.linalg.svd(exact, full_matrices=False)
    truncated = u[:, :2] @ np.diag(s[:2]) @ vh[:2]
    merged = merge("tsv_m", base, [tau, tau, tau])
    np.testing.assert_allclose(merged, base.astype(np.float32) + truncated, atol=ATOL, rtol=0)


def test_tsv_does_not_depend_on_expert_order():
    base, taus = random_case(5, (10, 8), 3)
    np.testing.assert_allclose(merge("tsv_m", base, taus), merge("tsv_m", base, taus[::-1]), atol=ATOL, rtol=0)


@pytest.mark.parametrize("method,params", [("tsv_m", {"scaling": 0.7}), ("iso_c", {"scaling": 1.2}),
                                           ("iso_cts", {"scaling": 0.9})])
def test_non_matrices_take_the_scaled_mean_task_vector(method, params):
    alpha = params["scaling"]
    for shape in [(7,), (3, 2, 2, 2), (), (1, 4, 6)]:
        base, taus = random_case(len(shape), shape, 3)
        expected = base.astype(np.float32) + alpha * np.mean(task_vectors_of(base, taus), axis=0)
        np.testing.assert_allclose(merge(method, np.asarray(base), taus, **params), expected, atol=ATOL, rtol=0)


def test_tsv_matrix_with_rank_below_the_task_count_takes_the_mean():
    base, taus = random_case(6, (2, 5), 3)     # r = 2 < T = 3: no task would keep a component
    expected = base.astype(np.float32) + np.mean(task_vectors_of(base, taus), axis=0)
    method = make("tsv_m", 3)
    base32 = torch.as_tensor(base, dtype=torch.float32)
    merged = method.merge_tensor("w", base32, [base32 + torch.as_tensor(t, dtype=torch.float32) for t in taus])
    np.testing.assert_allclose(merged.double().numpy(), expected, atol=ATOL, rtol=0)
    assert method.summary() == {"tensors": {"spectral": 0, "mean": 0, "mean_rank_below_tasks": 1}}


# ------------------------------------------------------------------ ISO-C

@pytest.mark.parametrize("shape,tasks", [((12, 9), 3), ((6, 15), 2), ((10, 10), 5), ((9, 4), 1)])
def test_iso_c_matches_the_reference(shape, tasks):
    base, taus = random_case(sum(shape) * tasks, shape, tasks)
    expected = reference_iso_c(base.astype(np.float32).astype(np.float64), task_vectors_of(base, taus), 1.5)
    np.testing.assert_allclose(merge("iso_c", base, taus), expected, atol=ATOL, rtol=0)


def test_iso_c_has_a_flat_spectrum_in_the_task_arithmetic_subspace():
    base, taus = random_case(7, (11, 7), 3)
    total = sum(task_vectors_of(base, taus))
    alpha = 0.6
    merged = (merge("iso_c", base, taus, scaling=alpha) - base.astype(np.float32)) / alpha
    sigma = np.linalg.svd(total, compute_uv=False)
    np.testing.assert_allclose(np.linalg.svd(merged, compute_uv=False), np.full(7, sigma.mean()), atol=ATOL, rtol=0)
    u, _, vh = np.linalg.svd(total, full_matrices=False)
    np.testing.assert_allclose(u @ u.T @ merged @ vh.T @ vh, merged, atol=ATOL, rtol=0)   # same column/row spaces
    # ... and the same singular vectors: merged = σ̄ · polar(M)
    np.testing.assert_allclose(merged, sigma.mean() * polar(total), atol=ATOL, rtol=0)


def test_iso_c_keeps_a_low_rank_sum_in_its_own_subspace():
    # Two rank-1 task vectors: M has rank 2, so only its two nonzero singular directions are flattened
    # (to their mean) — no arbitrary null-space directions appear, and one rank-1 expert comes back as is.
    rng = np.random.default_rng(8)
    base = rng.normal(size=(9, 6))
    taus = [np.outer(rng.normal(size=9), rng.normal(size=6)) * 0.05 for _ in range(2)]
    exact = task_vectors_of(base, taus)
    u, s, vh = np.linalg.svd(sum(exact), full_matrices=False)
    expected = base.astype(np.float32) + s[:2].mean() * u[:, :2] @ vh[:2]
    np.testing.assert_allclose(merge("iso_c", base, taus, scaling=1.0), expected, atol=ATOL, rtol=0)
    np.testing.assert_allclose(merge("iso_c", base, taus[:1], scaling=1.0), base.astype(np.float32) + exact[0],
                               atol=ATOL, rtol=0)
    zero = merge("iso_c", base, [np.zeros((9, 6))] * 2)                         # no change at all
    np.testing.assert_array_equal(zero, base.astype(np.float32))


# ------------------------------------------------------------------ ISO-CTS

@pytest.mark.parametrize("shape,tasks,fraction", [((12, 9), 3, 0.8), ((16, 10), 2, 0.5), ((10, 14), 4, 0.6),
                                                  ((20, 20), 3, 0.8), ((9, 12), 3, 0.0)])
def test_iso_cts_matches_the_reference(shape, tasks, fraction):
    base, taus = random_case(sum(shape) + tasks, shape, tasks)
    expected = reference_iso_cts(base.astype(np.float32).astype(np.float64), task_vectors_of(base, taus), 1.1,
                                 fraction)
    merged = merge("iso_cts", base, taus, scaling=1.1, common_space_fraction=fraction)
    np.testing.assert_allclose(merged, expected, atol=ATOL, rtol=0)


def test_iso_cts_with_a_full_common_space_is_iso_c():
    base, taus = random_case(9, (13, 10), 3)
    np.testing.assert_allclose(merge("iso_cts", base, taus, common_space_fraction=1.0), merge("iso_c", base, taus),
                               atol=ATOL, rtol=0)


@pytest.mark.parametrize("fraction", [0.0, 0.5, 0.8])
def test_iso_cts_with_one_expert_is_iso_c(fraction):
    # One task: its residual outside the common directions is the rest of its own spectrum, so the
    # gathered basis is its full SVD again.
    base, taus = random_case(10, (9, 7), 1)
    np.testing.assert_allclose(merge("iso_cts", base, taus, common_space_fraction=fraction),
                               merge("iso_c", base, taus), atol=ATOL, rtol=0)


def test_iso_cts_does_not_depend_on_expert_order():
    base, taus = random_case(11, (12, 12), 3)
    np.testing.assert_allclose(merge("iso_cts", base, taus), merge("iso_cts", base, taus[::-1]), atol=ATOL, rtol=0)


@pytest.mark.parametrize("rank,tasks,fraction,expected", [
    (768, 8, 0.8, (616, 19)),     # ⌊614.4⌋ = 614, 154/8 = 19.25 → 19 per task, the common space takes the rest
    (10, 3, 0.8, (7, 1)),
    (4, 8, 0.1, (4, 0)),          # 4/8 = 0.5 rounds half to even: no task-specific directions
    (10, 6, 0.1, (4, 1)),         # round(9/6) = 2 would need 12 > 10 directions: capped at ⌊10/6⌋
    (9, 3, 1.0, (9, 0)),
])
def test_iso_cts_split(rank, tasks, fraction, expected):
    assert iso_cts_split(rank, tasks, fraction) == expected


# ------------------------------------------------------------------ parameters

def test_parameters_and_defaults():
    assert make("tsv_m", 2).params.scaling == 1.0
    assert make("iso_c", 2).params.scaling == 1.5
    cts = make("iso_cts", 2).params
    assert (cts.scaling, cts.common_space_fraction) == (1.5, 0.8)
    for bad in (-0.1, 1.5):
        with pytest.raises(ConfigError, match="common_space_fraction"):
            make("iso_cts", 2, common_space_fraction=bad)
    with pytest.raises(ConfigError, match="scaling"):
        make("iso_c", 2, scaling="lots")
    with pytest.raises(ConfigError, match="unknown parameter 'common_space_fraction'"):
        make("iso_c", 2, common_space_fraction=0.5)
    with pytest.raises(ConfigError, match="unknown parameter 'density'"):
        make("tsv_m", 2, density=0.5)


# ------------------------------------------------------------------ end to end

@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    root = tmp_path_factory.mktemp("bert-spectral")
    base, experts = build_family(root, "bert", n_experts=3)
    return root, base, experts


@pytest.mark.parametrize("method", ["tsv_m", "iso_c", "iso_cts"])
def test_merge_tiny_bert_end_to_end(bert, method):
    from transformers import AutoModel

    root, base, experts = bert
    output = root / f"merged-{method}"
    layermerge.merge(base, experts, method=method, output=output, quiet=True)
    model = AutoModel.from_pretrained(output).eval()
    with torch.no_grad():
        hidden = model(input_ids=torch.tensor([[5, 17, 42, 3, 8]])).last_hidden_state
    assert torch.isfinite(hidden).all()
    assert layermerge.load_task_model(output, "task1").config.num_labels == 3

    merged = load_file(str(output / "model.safetensors"))
    base_weights = load_file(str(base / "model.safetensors"))
    expert_weights = [{k[len("bert."):]: v for k, v in load_file(str(folder / "model.safetensors")).items()
                       if k.startswith("bert.")} for folder in experts.values()]
    assert merged.keys() == base_weights.keys()
    # Every tensor is what the method computes from the checkpoints: a matrix, the 2 × 32 token-type
    # embedding (rank 2 < 3 tasks, the mean for TSV-M) and a bias.
    direct = make(method, len(experts))
    for key in ["encoder.layer.0.attention.self.query.weight", "embeddings.token_type_embeddings.weight",
                "encoder.layer.1.output.dense.bias"]:
        expected = direct.merge_tensor(key, base_weights[key].float(), [e[key].float() for e in expert_weights])
        torch.testing.assert_close(merged[key].float(), expected, atol=1e-6, rtol=0)
        assert not torch.equal(merged[key], base_weights[key])


@pytest.mark.parametrize("method,params", [("tsv_m", {}), ("iso_c", {}), ("iso_cts", {})])
def test_pointwise_convolutions_merge_as_their_matrix(method, params):
    """A 1×1 convolution's (out, in, 1, 1) weight is the (out, in) map at every pixel: merged as that
    matrix and reshaped back; a 3×3 kernel still takes the scaled mean."""
    base, taus = random_case(11, (6, 4), 2)
    as_matrix = merge(method, base, taus, **params)
    as_conv = merge(method, base.reshape(6, 4, 1, 1), [t.reshape(6, 4, 1, 1) for t in taus], **params)
    np.testing.assert_allclose(as_conv, as_matrix.reshape(6, 4, 1, 1), atol=1e-6, rtol=0)
    spatial = merge(method, base.reshape(6, 1, 2, 2), [t.reshape(6, 1, 2, 2) for t in taus], **params)
    alpha = make(method, 2, **params).params.scaling
    expected = base.astype(np.float32) + alpha * np.mean(task_vectors_of(base, taus), axis=0)
    np.testing.assert_allclose(spatial, expected.reshape(6, 1, 2, 2), atol=ATOL, rtol=0)
    assert not np.allclose(as_matrix, expected, atol=1e-3)          # the matrix path is not the mean
