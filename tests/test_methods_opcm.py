"""OPCM: hand-worked cases, a NumPy float64 transcription of the released step-by-step update, the
arrival order, the non-matrix rule, SVD-sign invariance, parameter checks, the one-model-at-a-time
API and a merge of tiny BERT models end to end."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import build_family
from safetensors.torch import load_file

import layermerge
from layermerge.errors import ConfigError
from layermerge.methods.opcm import (
    ContinualMerge,
    project_out,
    project_task_matrix,
    protected_count,
)
from layermerge.methods.registry import get_method, validate_params
from layermerge.methods.spectral import thin_svd

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ATOL = 1e-5


def make(tasks: int, **params):
    info = get_method("opcm")
    return info.cls(validate_params(info, params), [f"t{i}" for i in range(tasks)])


def run_method(base: dict[str, np.ndarray], experts: list[dict[str, np.ndarray]], **params) -> dict[str, np.ndarray]:
    """The registered method as the driver runs it: statistics pass (if any), then each tensor."""
    method = make(len(experts), **params)
    tensors = {key: (torch.as_tensor(value, dtype=torch.float32),
                     [torch.as_tensor(expert[key], dtype=torch.float32) for expert in experts])
               for key, value in base.items()}
    for index in range(method.stat_passes):
        for key, (base_t, expert_ts) in tensors.items():
            method.observe(index, key, base_t, expert_ts)
        method.end_pass(index)
    merged = {}
    for key, (base_t, expert_ts) in tensors.items():
        out = method.merge_tensor(key, base_t, expert_ts)
        assert out.dtype == torch.float32 and out.shape == base_t.shape
        merged[key] = out.double().numpy()
    return merged


def as32(array: np.ndarray) -> np.ndarray:
    """The values the method sees (float32 inputs), back in float64 for the references."""
    return np.asarray(array, dtype=np.float32).astype(np.float64)


def random_model(seed: int, shapes: dict[str, tuple[int, ...]], tasks: int, scale: float = 0.1):
    rng = np.random.default_rng(seed)
    base = {key: as32(rng.normal(size=shape)) for key, shape in shapes.items()}
    experts = [{key: as32(base[key] + rng.normal(scale=scale, size=shape)) for key, shape in shapes.items()}
               for _ in range(tasks)]
    return base, experts


# ------------------------------------------------------------------ NumPy reference (float64)
# Written from the paper's algorithm as the released code lays it out (FusionBench
# fusion_bench/method/opcm/opcm.py): the merged model θ_t is stored, not the running sum; each step
# takes the full SVD of θ_{t−1} − θ0, zeroes the diagonal and the top-left split × split block of
# Uᵀ τ V, adds λ_{t−1}(θ_{t−1} − θ0), then rescales the whole model to the mean task-vector norm.

def model_norm(vectors: dict[str, np.ndarray]) -> float:
    return float(np.sqrt(sum((v ** 2).sum() for v in vectors.values())))


def reference_opcm(base, experts, alpha=0.5, zero_diagonal=True, projected=lambda key, value: value.ndim == 2):
    """θ_1, θ_2, …, θ_T (every intermediate merge), each a dict like ``base``."""
    merged = dict(experts[0])
    history = [merged]
    previous_lambda = 1.0
    norms = [model_norm({k: experts[0][k] - base[k] for k in base})]
    for expert in experts[1:]:
        norms.append(model_norm({k: expert[k] - base[k] for k in base}))
        raw = {}
        for key in base:
            previous = merged[key] - base[key]
            tau = expert[key] - base[key]
            if projected(key, previous):
                u, s, vh = np.linalg.svd(previous, full_matrices=True)
                split = int(np.argmax(np.cumsum(s) / s.sum() > alpha))
                coordinates = u.T @ tau @ vh.T
                if zero_diagonal:
                    np.fill_diagonal(coordinates, 0.0)
                coordinates[:split, :split] = 0.0
                tau = u @ coordinates @ vh
            raw[key] = previous_lambda * previous + tau
        lam = model_norm(raw) / np.mean(norms)
        merged = {key: base[key] + raw[key] / lam for key in base}
        history.append(merged)
        previous_lambda = lam
    return history


def close(actual: dict, expected: dict, atol: float = ATOL) -> None:
    assert actual.keys() == expected.keys()
    for key in expected:
        np.testing.assert_allclose(actual[key], expected[key], atol=atol, rtol=0, err_msg=key)


# ------------------------------------------------------------------ the projection

@pytest.mark.parametrize("alpha,expected", [(0.0, 0), (0.39, 0), (0.4, 1), (0.5, 1), (0.7, 2), (0.95, 3),
                                            (1.0, 4)])
def test_protected_count_by_hand(alpha, expected):
    # σ = 4, 3, 2, 1: cumulative shares of Σσ = 10 are 0.4, 0.7, 0.9, 1.0.
    assert protected_count(torch.tensor([4.0, 3.0, 2.0, 1.0], dtype=torch.float64), alpha) == expected


def test_projection_removes_the_protected_block_and_the_diagonal():
    # D = U diag(4, 3, 2, 1) Vᵀ: at α = 0.5 one direction is protected, so in D's basis the new task
    # vector loses its (1, 1) coordinate and, with zero_diagonal, (2, 2), (3, 3), (4, 4); every other
    # coordinate, and everything outside D's row and column spaces, is kept.
    rng = np.random.default_rng(1)
    left, _ = np.linalg.qr(rng.normal(size=(7, 7)))
    right, _ = np.linalg.qr(rng.normal(size=(5, 5)))
    merged_tv = left[:, :4] @ np.diag([4.0, 3.0, 2.0, 1.0]) @ right[:, :4].T
    tau = rng.normal(size=(7, 5))
    coordinates = left.T @ tau @ right
    for zero_diagonal, alpha, cleared in [(True, 0.5, [(0, 0), (1, 1), (2, 2), (3, 3)]),
                                          (False, 0.5, [(0, 0)]),
                                          (False, 0.75, [(0, 0), (0, 1), (1, 0), (1, 1)]),
                                          (True, 0.0, [(0, 0), (1, 1), (2, 2), (3, 3)])]:
        expected = coordinates.copy()
        for i, j in cleared:
            expected[i, j] = 0.0
        projected = project_task_matrix(torch.as_tensor(merged_tv), torch.as_tensor(tau), alpha, zero_diagonal)
        np.testing.assert_allclose(left.T @ projected.numpy() @ right, expected, atol=1e-12, rtol=0)


def test_projection_ignores_svd_signs_and_layout():
    # Flipping the signs of any singular pairs (u_j, v_j), as another LAPACK may, changes nothing;
    # nor does storing the matrices transposed (GPT-2's Conv1D keeps weights as (in, out)).
    rng = np.random.default_rng(2)
    merged_tv = torch.as_tensor(rng.normal(size=(9, 6)))
    tau = torch.as_tensor(rng.normal(size=(9, 6)))
    left, values, right = thin_svd(merged_tv)
    signs = torch.tensor([1.0, -1.0, -1.0, 1.0, -1.0, 1.0], dtype=torch.float64)
    for zero_diagonal in (True, False):
        plain = project_out(left, values, right, tau, 0.5, zero_diagonal)
        flipped = project_out(left * signs, values, signs[:, None] * right, tau, 0.5, zero_diagonal)
        torch.testing.assert_close(flipped, plain, atol=1e-12, rtol=0)
        transposed = project_task_matrix(merged_tv.T, tau.T, 0.5, zero_diagonal)
        torch.testing.assert_close(transposed.T, plain, atol=1e-12, rtol=0)
        assert torch.equal(project_task_matrix(merged_tv, tau, 0.5, zero_diagonal), plain)   # deterministic


def test_projection_of_a_low_rank_merge_uses_only_its_directions():
    # D of rank 2 in a 8 × 6 matrix: τ orthogonal to D's row and column spaces passes unchanged (the
    # null-space singular vectors are arbitrary, so their "diagonal" is not removed), and a zero D
    # (nothing merged in this tensor yet) protects nothing.
    rng = np.random.default_rng(3)
    left, _ = np.linalg.qr(rng.normal(size=(8, 8)))
    right, _ = np.linalg.qr(rng.normal(size=(6, 6)))
    merged_tv = torch.as_tensor(left[:, :2] @ np.diag([3.0, 1.0]) @ right[:, :2].T)
    tau = torch.as_tensor(left[:, 2:] @ rng.normal(size=(6, 4)) @ right[:, 2:].T)
    torch.testing.assert_close(project_task_matrix(merged_tv, tau, 1.0), tau, atol=1e-12, rtol=0)
    other = torch.as_tensor(rng.normal(size=(8, 6)))
    assert torch.equal(project_task_matrix(torch.zeros(8, 6, dtype=torch.float64), other), other)


# ------------------------------------------------------------------ the method

@pytest.mark.parametrize("scope", ["model", "tensor"])
def test_one_model_returns_that_model(scope):
    # The first model is taken as it is: θ_1 = θ0 + τ_1 (λ_1 = 1).
    base, experts = random_model(4, {"w": (8, 5), "b": (5,)}, 1)
    close(run_method(base, experts, scope=scope), experts[0])


def test_identical_models_return_that_model():
    # P(τ) = 0 against D = τ (its coordinates in D's own basis are all on the diagonal), so S stays τ
    # and the length rule keeps ‖τ‖: merging a model with copies of itself gives the model.
    base, experts = random_model(5, {"w": (7, 7)}, 1)
    close(run_method(base, experts * 3), experts[0])


@pytest.mark.parametrize("scope", ["model", "tensor"])
def test_orthogonal_task_vectors_give_the_scaled_sum(scope):
    # τ_i = Q_m[:, block_i] diag(s_i) Q_n[:, block_i]ᵀ: mutually orthogonal row and column spaces, so no
    # projection removes anything and S_3 = τ_1 + τ_2 + τ_3, with ‖S_3‖² = Σ‖τ_i‖². Norms 1, 2, 2:
    # λ_3 = ‖S_3‖ / mean ‖τ_i‖ = 3 / (5/3), so θ_3 = θ0 + (5/9)(τ_1 + τ_2 + τ_3).
    rng = np.random.default_rng(6)
    left, _ = np.linalg.qr(rng.normal(size=(12, 12)))
    right, _ = np.linalg.qr(rng.normal(size=(9, 9)))
    taus = []
    for index, norm in enumerate([1.0, 2.0, 2.0]):
        values = rng.uniform(0.5, 2.0, 3)
        values *= norm / np.linalg.norm(values)
        taus.append(left[:, 3 * index:3 * index + 3] @ np.diag(values) @ right[:, 3 * index:3 * index + 3].T)
    base = rng.normal(size=(12, 9))
    merged = run_method({"w": base}, [{"w": base + tau} for tau in taus], scope=scope, alpha=0.9)
    np.testing.assert_allclose(merged["w"], as32(base) + 5 / 9 * sum(taus), atol=ATOL, rtol=0)


@pytest.mark.parametrize("shape,tasks,alpha,zero_diagonal", [
    ((12, 9), 3, 0.5, True), ((7, 16), 2, 0.5, True), ((10, 10), 4, 0.2, True), ((20, 11), 4, 0.8, True),
    ((12, 9), 3, 0.5, False), ((10, 10), 4, 0.8, False),
])
def test_a_matrix_matches_the_reference(shape, tasks, alpha, zero_diagonal):
    base, experts = random_model(sum(shape) * tasks, {"w": shape}, tasks)
    expected = reference_opcm(base, experts, alpha, zero_diagonal)[-1]
    close(run_method(base, experts, alpha=alpha, zero_diagonal=zero_diagonal), expected)
    close(run_method(base, experts, alpha=alpha, zero_diagonal=zero_diagonal, scope="tensor"), expected)


MODEL_SHAPES = {"layer.0.query.weight": (10, 8), "layer.0.query.bias": (10,),
                "layer.0.output.weight": (8, 10), "norm.weight": (8,), "scale": (),
                "embeddings.word_embeddings.weight": (12, 8), "conv.weight": (4, 3, 2, 2)}


def projected_by_default(key: str, value: np.ndarray) -> bool:
    return value.ndim == 2 and "embed" not in key


def test_a_model_matches_the_reference():
    # scope "model": one λ for the whole model, from whole-model norms; matrices are projected,
    # everything else (biases, norms, a scalar, a conv kernel, the embedding table) is added as is.
    base, experts = random_model(7, MODEL_SHAPES, 4)
    expected = reference_opcm(base, experts, projected=projected_by_default)[-1]
    close(run_method(base, experts), expected)
    # exclude=[]: the embedding table is projected too.
    expected = reference_opcm(base, experts, projected=lambda key, value: value.ndim == 2)[-1]
    close(run_method(base, experts, exclude=[]), expected)


def test_tensors_not_projected_take_the_scaled_sum():
    # A bias, a norm weight, a scalar, a conv kernel and the (excluded) embedding table get
    # θ0 + (Σ_i τ_i) / λ with one λ for the whole model, chosen so that ‖θ − θ0‖ = mean_i ‖τ_i‖.
    base, experts = random_model(8, MODEL_SHAPES, 3)
    merged = run_method(base, experts)
    taus = [{k: e[k] - base[k] for k in base} for e in experts]
    total = {k: sum(tau[k] for tau in taus) for k in base}
    ratio = np.linalg.norm(merged["norm.weight"] - base["norm.weight"]) / np.linalg.norm(total["norm.weight"])
    for key in ["layer.0.query.bias", "norm.weight", "scale", "conv.weight", "embeddings.word_embeddings.weight"]:
        np.testing.assert_allclose(merged[key], base[key] + ratio * total[key], atol=ATOL, rtol=0, err_msg=key)
    mean_norm = np.mean([model_norm(tau) for tau in taus])
    assert model_norm({k: merged[k] - base[k] for k in base}) == pytest.approx(mean_norm, rel=1e-5)
    # scope "tensor": each tensor is its own model, λ from its own norms.
    per_tensor = run_method(base, experts, scope="tensor")
    bias = total["layer.0.query.bias"]
    own = np.mean([np.linalg.norm(tau["layer.0.query.bias"]) for tau in taus]) / np.linalg.norm(bias)
    np.testing.assert_allclose(per_tensor["layer.0.query.bias"], base["layer.0.query.bias"] + own * bias,
                               atol=ATOL, rtol=0)


def test_arrival_order_is_respected():
    base, experts = random_model(9, {"w": (10, 8), "b": (8,)}, 3)
    forward = run_method(base, experts)
    backward = run_method(base, experts[::-1])
    close(forward, reference_opcm(base, experts)[-1])
    close(backward, reference_opcm(base, experts[::-1])[-1])
    assert np.abs(forward["w"] - backward["w"]).max() > 1e-3


def test_the_model_scope_needs_its_statistics_pass():
    method = make(2)
    assert method.stat_passes == 1 and make(2, scope="tensor").stat_passes == 0
    with pytest.raises(RuntimeError, match="statistics pass"):
        method.merge_tensor("w", torch.zeros(3, 3), [torch.ones(3, 3), torch.eye(3)])


def test_experts_that_change_nothing_leave_the_base():
    base, _ = random_model(10, {"w": (5, 4), "b": (4,)}, 0)
    close(run_method(base, [base, base]), base, atol=0)


# ------------------------------------------------------------------ parameters

def test_parameters_and_defaults():
    params = make(2).params
    assert (params.alpha, params.zero_diagonal, params.scope, params.exclude) == (0.5, True, "model", None)
    for bad in (-0.1, 1.5, "lots"):
        with pytest.raises(ConfigError, match="alpha"):
            make(2, alpha=bad)
    with pytest.raises(ConfigError, match="scope"):
        make(2, scope="layer")
    with pytest.raises(ConfigError, match="zero_diagonal"):
        make(2, zero_diagonal="perhaps")
    with pytest.raises(ConfigError, match="exclude"):
        make(2, exclude=["("])
    with pytest.raises(ConfigError, match="unknown parameter 'scaling'"):
        make(2, scaling=0.3)


# ------------------------------------------------------------------ one model at a time

def test_continual_merge_matches_the_reference_after_every_arrival():
    base, experts = random_model(11, MODEL_SHAPES, 4)
    history = reference_opcm(base, experts, alpha=0.3, projected=projected_by_default)
    merger = ContinualMerge({k: torch.as_tensor(v) for k, v in base.items()}, alpha=0.3)
    for step, expert in enumerate(experts):
        merger.add({k: torch.as_tensor(v) for k, v in expert.items()})
        close({k: v.numpy() for k, v in merger.merged().items()}, history[step], atol=1e-9)
    assert merger.count == 4 and merger.lam > 1
    with pytest.raises(ValueError, match="base's tensors"):
        merger.add({"w": torch.zeros(2)})


def test_continual_merge_agrees_with_the_method_per_tensor():
    base, experts = random_model(12, MODEL_SHAPES, 3)
    merger = ContinualMerge({k: torch.as_tensor(v, dtype=torch.float32) for k, v in base.items()},
                            scope="tensor", alpha=0.7)
    for expert in experts:
        merger.add({k: torch.as_tensor(v, dtype=torch.float32) for k, v in expert.items()})
    merged = merger.merged()
    assert all(tensor.dtype == torch.float32 for tensor in merged.values())
    close({k: v.double().numpy() for k, v in merged.items()}, run_method(base, experts, scope="tensor", alpha=0.7))


# ------------------------------------------------------------------ end to end

@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    root = tmp_path_factory.mktemp("bert-opcm")
    base, experts = build_family(root, "bert", n_experts=3)
    return root, base, experts


def backbone(folder, prefix: str = "bert.") -> dict[str, torch.Tensor]:
    state = load_file(str(folder / "model.safetensors"))
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)} if prefix else state


def test_merge_tiny_bert_end_to_end(bert):
    from transformers import AutoModel

    root, base, experts = bert
    named = dict(zip("abc", experts.values()))
    output = root / "merged-opcm"
    written = layermerge.merge(base, named, method="opcm", output=output, quiet=True)
    model = AutoModel.from_pretrained(output).eval()
    with torch.no_grad():
        hidden = model(input_ids=torch.tensor([[5, 17, 42, 3, 8]])).last_hidden_state
    assert torch.isfinite(hidden).all()
    assert layermerge.load_task_model(output, "b").config.num_labels == 3
    assert written.summary["order"] == ["a", "b", "c"] and written.summary["lambda"] > 1

    # The streamed merge is the one-model-at-a-time merge of the same checkpoints, in the same order.
    merged = load_file(str(output / "model.safetensors"))
    base_weights = backbone(base, prefix="")
    expert_weights = [backbone(folder) for folder in experts.values()]
    merger = ContinualMerge(base_weights)
    for state in expert_weights:
        merger.add({k: state[k] for k in base_weights})
    expected = merger.merged()
    assert merged.keys() == expected.keys()
    for key, tensor in expected.items():
        torch.testing.assert_close(merged[key], tensor, atol=1e-6, rtol=0, msg=key)

    # Another arrival order, another merge.
    backward = layermerge.merge(base, dict(reversed(named.items())), method="opcm", quiet=True)
    key = "encoder.layer.0.attention.self.query.weight"
    assert (backward.state_dict[key] - merged[key]).abs().max() > 1e-5


def test_pointwise_convolutions_are_projected_as_their_matrix():
    """A 1×1 convolution's (out, in, 1, 1) weight is the (out, in) map at every pixel: projected as
    that matrix and reshaped back."""
    base, experts = random_model(21, {"w": (6, 4)}, 3)
    as_matrix = run_method(base, experts, scope="tensor")["w"]
    as_conv = run_method({"w": base["w"].reshape(6, 4, 1, 1)},
                         [{"w": e["w"].reshape(6, 4, 1, 1)} for e in experts], scope="tensor")["w"]
    np.testing.assert_allclose(as_conv, as_matrix.reshape(6, 4, 1, 1), atol=1e-6, rtol=0)
    summed = run_method({"w": base["w"].reshape(6, 1, 2, 2)},
                        [{"w": e["w"].reshape(6, 1, 2, 2)} for e in experts], scope="tensor")["w"]
    assert not np.allclose(summed.reshape(6, 4), as_matrix, atol=1e-4)   # a 3×3-like kernel is not projected
