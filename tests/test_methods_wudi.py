"""WUDI-Merging: exact properties, a closed-form minimiser, an autograd + torch.optim.Adam reference of
the released procedure, the rules for the other tensors, and a merge of tiny Llama models."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import make_config, perturb_

import layermerge
from layermerge.errors import ConfigError
from layermerge.methods.registry import get_method, validate_params
from layermerge.methods.wudi import wudi_task_vector

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def make(tasks: list[str], **params):
    info = get_method("wudi")
    return info.cls(validate_params(info, params), tasks)


def numpy_loss(merged: np.ndarray, taus: list[np.ndarray]) -> float:
    """Σ_i ‖(τ_m − τ_i) τ_iᵀ‖_F² / ‖τ_i‖_F², in float64, from the definition."""
    merged = np.asarray(merged, dtype=np.float64)
    return sum(np.linalg.norm((merged - t) @ t.T) ** 2 / np.linalg.norm(t) ** 2
               for t in (np.asarray(t, dtype=np.float64) for t in taus))


def closed_form(taus: list[np.ndarray]) -> np.ndarray:
    """The loss is quadratic: ∇ = 2 Σ_i w_i (X − τ_i) τ_iᵀτ_i = 0 gives X·G = C, G = Σ w_i τ_iᵀτ_i,
    C = Σ w_i τ_i τ_iᵀτ_i, w_i = 1/‖τ_i‖²; solved here by least squares on Gᵀ Xᵀ = Cᵀ."""
    taus = [np.asarray(t, dtype=np.float64) for t in taus]
    weights = [1.0 / np.linalg.norm(t) ** 2 for t in taus]
    gram = sum(w * t.T @ t for w, t in zip(weights, taus))
    target = sum(w * t @ t.T @ t for w, t in zip(weights, taus))
    return np.linalg.lstsq(gram.T, target.T, rcond=None)[0].T


def experts_from(base: torch.Tensor, taus) -> list[torch.Tensor]:
    return [base + torch.as_tensor(np.asarray(t), dtype=torch.float32) for t in taus]


def released_procedure(taus: torch.Tensor, lr: float, steps: int) -> torch.Tensor:
    """The paper's procedure as its code runs it: autograd on the loss as written, torch.optim.Adam
    (default betas and eps) on τ_m from Σ τ_i. Our version uses a closed-form gradient instead."""
    merged = torch.nn.Parameter(taus.sum(0).clone())
    optimizer = torch.optim.Adam([merged], lr=lr)
    weights = 1.0 / taus.flatten(1).pow(2).sum(1)
    for _ in range(steps):
        loss = (torch.matmul(merged.unsqueeze(0) - taus, taus.transpose(1, 2)).pow(2).sum((1, 2)) * weights).sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return merged.detach()


# ---------------------------------------------------------------- the optimisation

def test_single_expert_returns_its_own_task_vector():
    # L(τ_1) = 0 and the gradient there is exactly zero, so Adam never moves: θ = θ0 + τ_1 = θ_1.
    rng = np.random.default_rng(0)
    base = torch.as_tensor(rng.normal(size=(6, 4)).astype(np.float32))
    expert = base + torch.as_tensor(rng.normal(scale=0.01, size=(6, 4)).astype(np.float32))
    merged = make(["a"]).merge_tensor("layers.0.mlp.up_proj.weight", base, [expert])
    assert torch.equal(merged, base + (expert - base))
    _, losses = wudi_task_vector((expert - base)[None], 1e-5, 300)
    assert losses == [0.0] * 301


def test_orthogonal_row_spaces_keep_task_arithmetic():
    # Rows of τ_1 use input columns 0-2, rows of τ_2 columns 3-6: τ_1 τ_2ᵀ = 0, so L(τ_1 + τ_2) = 0.
    rng = np.random.default_rng(1)
    tau1, tau2 = np.zeros((5, 7)), np.zeros((5, 7))
    tau1[:, :3] = rng.normal(size=(5, 3))
    tau2[:, 3:] = rng.normal(size=(5, 4))
    np.testing.assert_allclose(closed_form([tau1, tau2]), tau1 + tau2, atol=1e-10)
    assert numpy_loss(tau1 + tau2, [tau1, tau2]) == 0.0
    base = torch.as_tensor(rng.normal(size=(5, 7)).astype(np.float32))
    experts = experts_from(base, [tau1, tau2])
    merged = make(["a", "b"]).merge_tensor("w", base, experts)
    assert torch.equal(merged, (experts[0] - base) + (experts[1] - base) + base)
    # The same with orthogonal row spaces in a rotated basis: the closed form is still τ_1 + τ_2.
    basis = np.linalg.qr(rng.normal(size=(7, 7)))[0]
    rotated = [tau1 @ basis.T, tau2 @ basis.T]
    np.testing.assert_allclose(closed_form(rotated), rotated[0] + rotated[1], atol=1e-10)


def test_converges_to_the_closed_form_minimiser():
    rng = np.random.default_rng(3)
    taus = rng.normal(size=(3, 8, 5))
    best = closed_form(list(taus))
    start_loss, best_loss = numpy_loss(taus.sum(0), list(taus)), numpy_loss(best, list(taus))
    assert best_loss < 0.5 * start_loss          # Task Arithmetic is far from optimal here
    merged, losses = wudi_task_vector(torch.as_tensor(taus, dtype=torch.float32), lr=1e-2, steps=2000)
    merged = merged.double().numpy()
    assert numpy_loss(merged, list(taus)) - best_loss <= 1e-6 * best_loss
    assert np.linalg.norm(merged - best) <= 1e-4 * np.linalg.norm(best)
    assert losses[0] == pytest.approx(start_loss, rel=1e-6)
    assert losses[-1] == pytest.approx(numpy_loss(merged, list(taus)), rel=1e-5)


@pytest.mark.parametrize("shape", [(12, 7), (4, 40), (9, 9)])   # (4, 40): the factored curvature path
def test_matches_the_released_procedure(shape):
    generator = torch.Generator().manual_seed(sum(shape))
    taus = torch.randn((3, *shape), generator=generator) * 1e-3
    ours, _ = wudi_task_vector(taus, lr=1e-5, steps=300)
    reference = released_procedure(taus, lr=1e-5, steps=300)
    moved = (reference - taus.sum(0)).abs().max()
    assert moved > 1e-3                       # 300 steps of 1e-5 moved it: the comparison is not vacuous
    torch.testing.assert_close(ours, reference, rtol=0, atol=1e-7)


def test_loss_decreases_from_task_arithmetic():
    generator = torch.Generator().manual_seed(5)
    taus = torch.randn((4, 16, 10), generator=generator) * 1e-3   # a fine-tune's scale; lr is absolute
    merged, losses = wudi_task_vector(taus, lr=1e-5, steps=300)
    as_numpy = [t.double().numpy() for t in taus]
    assert losses[0] == pytest.approx(numpy_loss(taus.sum(0).numpy(), as_numpy), rel=1e-6)
    assert losses[-1] == pytest.approx(numpy_loss(merged.numpy(), as_numpy), rel=1e-5)
    assert losses[-1] < 0.5 * losses[0]
    assert all(later <= earlier * (1 + 1e-6) for earlier, later in zip(losses, losses[1:]))


def test_zero_task_vectors_are_left_out():
    # An expert equal to the base has no row space (and 1/‖τ‖² is undefined): the result is the merge
    # of the other experts, and nothing is NaN.
    rng = np.random.default_rng(6)
    base = torch.as_tensor(rng.normal(size=(6, 5)).astype(np.float32))
    experts = experts_from(base, rng.normal(scale=0.01, size=(2, 6, 5)))
    with_zero = make(["a", "z", "b"]).merge_tensor("w", base, [experts[0], base.clone(), experts[1]])
    without = make(["a", "b"]).merge_tensor("w", base, experts)
    assert torch.equal(with_zero, without)
    all_zero = make(["z", "y"]).merge_tensor("w", base, [base.clone(), base.clone()])
    assert torch.equal(all_zero, base)


def test_deterministic_and_inputs_untouched():
    rng = np.random.default_rng(7)
    base = torch.as_tensor(rng.normal(size=(20, 12)).astype(np.float32))
    experts = experts_from(base, rng.normal(scale=0.01, size=(3, 20, 12)))
    copies = [e.clone() for e in experts]
    first = make(list("abc")).merge_tensor("w", base, experts)
    second = make(list("abc")).merge_tensor("w", base, experts)
    assert torch.equal(first, second)
    assert all(torch.equal(e, c) for e, c in zip(experts, copies))


# ---------------------------------------------------------------- which tensors, and how

@pytest.mark.parametrize("others", ["base", "average", "sum"])
def test_tensors_not_optimised_follow_others(others):
    rng = np.random.default_rng(8)
    method = make(["a", "b"], others=others)
    cases = {"layers.0.input_layernorm.weight": (8,), "conv.weight": (4, 3, 2, 2),
             "model.embed_tokens.weight": (11, 8), "lm_head.weight": (11, 8), "transformer.wte.weight": (11, 8)}
    for key, shape in cases.items():
        base = torch.as_tensor(rng.normal(size=shape).astype(np.float32))
        experts = experts_from(base, rng.normal(scale=0.1, size=(2, *shape)))
        taus = [e - base for e in experts]
        expected = {"base": base, "average": base + (taus[0] + taus[1]) / 2, "sum": base + taus[0] + taus[1]}
        torch.testing.assert_close(method.merge_tensor(key, base, experts), expected[others], rtol=0, atol=1e-6)
    assert method.summary()["other_tensors"] == len(cases) and method.summary()["optimised_tensors"] == 0


def test_exclude_and_transposed_choose_the_optimised_matrices():
    rng = np.random.default_rng(9)
    base = torch.as_tensor(rng.normal(size=(9, 6)).astype(np.float32))
    experts = experts_from(base, rng.normal(scale=0.1, size=(2, 9, 6)))
    taus = torch.stack([e - base for e in experts])
    optimised = wudi_task_vector(taus, 1e-5, 300)[0] + base
    # exclude=[] optimises the embedding too
    assert torch.equal(make(["a", "b"], exclude=[]).merge_tensor("embed_tokens.weight", base, experts), optimised)
    # a Conv1D-style (in, out) weight is optimised as its transpose
    flipped = wudi_task_vector(taus.transpose(1, 2).contiguous(), 1e-5, 300)[0].T + base
    method = make(["a", "b"], transposed=["c_proj", "c_attn"])
    merged = method.merge_tensor("h.0.attn.c_attn.weight", base, experts)
    assert torch.equal(merged, flipped) and not torch.allclose(merged, optimised, rtol=0, atol=1e-7)
    assert method.summary()["transposed_tensors"] == 1


def test_steps_zero_is_task_arithmetic_at_one():
    rng = np.random.default_rng(10)
    base = torch.as_tensor(rng.normal(size=(5, 5)).astype(np.float32))
    experts = experts_from(base, rng.normal(scale=0.1, size=(3, 5, 5)))
    merged = make(list("abc"), steps=0).merge_tensor("w", base, experts)
    torch.testing.assert_close(merged, base + sum(e - base for e in experts), rtol=0, atol=1e-6)


@pytest.mark.parametrize("params,where", [
    ({"lr": 0.0}, "lr"), ({"lr": -1e-5}, "lr"), ({"steps": -1}, "steps"), ({"steps": 1.5}, "steps"),
    ({"others": "mean"}, "others"), ({"exclude": ["embed("]}, "exclude"), ({"transposed": ["c_fc", "[c_attn"]},
                                                                             "transposed"),
    ({"exclude": "embed"}, "exclude"), ({"iterations": 300}, "iterations"),
])
def test_bad_parameters_are_refused(params, where):
    with pytest.raises(ConfigError, match=f"'{where}'"):
        validate_params(get_method("wudi"), params)


def test_defaults_are_the_released_codes():
    params = validate_params(get_method("wudi"), {})
    assert (params.lr, params.steps, params.others, params.exclude, params.transposed) == (1e-5, 300, "base", None,
                                                                                          None)


# ---------------------------------------------------------------- end to end

def test_merges_tiny_llama_models(tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(make_config("llama"))
    base.save_pretrained(tmp_path / "base")
    experts = {}
    for index in range(2):
        model = AutoModelForCausalLM.from_config(make_config("llama"))
        model.load_state_dict(base.state_dict())
        perturb_(model, seed=index)
        model.save_pretrained(tmp_path / f"e{index}")
        experts[f"t{index}"] = tmp_path / f"e{index}"

    out = tmp_path / "out"
    layermerge.merge(tmp_path / "base", experts, method="wudi", output=out, quiet=True)
    merged = load_file(out / "model.safetensors")
    theta0 = load_file(tmp_path / "base" / "model.safetensors")
    thetas = [load_file(path / "model.safetensors") for path in experts.values()]
    optimised = 0
    for key, value in merged.items():
        if value.dim() == 2 and "embed_tokens" not in key and "lm_head" not in key:
            taus = torch.stack([t[key] - theta0[key] for t in thetas])
            expected = wudi_task_vector(taus, 1e-5, 300)[0] + theta0[key]
            torch.testing.assert_close(value, expected, rtol=0, atol=1e-6)
            assert not torch.allclose(value, theta0[key] + taus.sum(0), rtol=0, atol=1e-6)
            optimised += 1
        else:                                   # norms, embeddings, LM head: θ0 (the paper's code)
            assert torch.equal(value, theta0[key]), key
    assert optimised == 2 * 7                   # q, k, v, o, gate, up, down in each of the 2 layers
    summary = json.loads((out / "layermerge_summary.json").read_text())["summary"]
    assert summary["optimised_tensors"] == optimised
    assert summary["loss_final_over_initial"]["max"] < 1.0

    loaded = AutoModelForCausalLM.from_pretrained(out)
    with torch.no_grad():
        logits = loaded(input_ids=torch.tensor([[1, 5, 9, 2]])).logits
    assert logits.shape == (1, 4, 99) and torch.isfinite(logits).all()


def test_pointwise_convolutions_are_optimised_as_their_matrix():
    """A 1×1 convolution's (out, in, 1, 1) weight is the (out, in) map at every pixel: optimised as
    that matrix and reshaped back, bit for bit; a 3×3 kernel follows ``others``."""
    rng = np.random.default_rng(12)
    base = torch.as_tensor(rng.normal(size=(6, 4)).astype(np.float32))
    experts = experts_from(base, rng.normal(scale=0.1, size=(2, 6, 4)))
    matrix = make(["a", "b"], lr=1e-2, steps=20).merge_tensor("block.project_conv.weight", base, experts)
    conv = make(["a", "b"], lr=1e-2, steps=20).merge_tensor(
        "block.project_conv.weight", base.reshape(6, 4, 1, 1), [e.reshape(6, 4, 1, 1) for e in experts])
    assert torch.equal(conv, matrix.reshape(6, 4, 1, 1))
    assert not torch.allclose(matrix, base + (experts[0] - base) + (experts[1] - base), atol=1e-4)
    spatial = make(["a", "b"]).merge_tensor("block.depthwise_conv.weight", base.reshape(6, 1, 2, 2),
                                            [e.reshape(6, 1, 2, 2) for e in experts])
    assert torch.equal(spatial, base.reshape(6, 1, 2, 2))           # others="base"
