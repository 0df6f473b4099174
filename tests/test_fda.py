"""Functional Dual Anchors: the anchor objective raises the gradient/task-vector cosine (measured here
with plain autograd), a linear model where construction and fit have answers worked out by hand,
zero fitting steps give the documented start, determinism per seed, parameter checks, and whole
merges of tiny BERT and CNN experts through layermerge.merge."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn
from torch.func import functional_call

import layermerge
from layermerge.errors import ConfigError
from layermerge.io.reader import CheckpointReader
from layermerge.methods.fda import (
    MergedBackbone,
    alignment_loss,
    anchor_space,
    construct_anchors,
    fit_anchors,
    gaussian_anchors,
    task_arithmetic_start,
    weight_row_anchors,
)
from layermerge.methods.registry import get_method, validate_params
from layermerge.methods.simple import TaskArithmetic

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ------------------------------------------------------------------ a tiny non-linear backbone
def backbone_module() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 6), nn.LayerNorm(6)).eval().requires_grad_(False)


def toy(tasks=("a", "b"), scale=0.3, seed=1):
    """The module, θ0, expert backbones (θ0 + noise) and a represent() running any backbone."""
    module = backbone_module()
    base = {key: value.detach().clone() for key, value in module.state_dict().items()}
    generator = torch.Generator().manual_seed(seed)
    experts = {task: {key: value + scale * torch.randn(value.shape, generator=generator) for key, value in base.items()}
               for task in tasks}

    def represent(task, backbone, anchors):
        return functional_call(module, dict(backbone), (anchors,))
    return module, base, experts, represent


def plain_gradient_cosine(base, expert, anchors) -> tuple[float, float]:
    """Independently of fda.py: cos(−∇θ D, τ) at θ0 with D the mean cosine distance between the base's
    and the expert's outputs, over all parameters at once and as the mean over tensors."""
    model = backbone_module().requires_grad_(True)
    model.load_state_dict(base)
    reference = backbone_module()
    reference.load_state_dict(expert)
    gap = (1 - F.cosine_similarity(model(anchors), reference(anchors), dim=1)).mean()
    names = [name for name, _ in model.named_parameters()]
    grads = torch.autograd.grad(gap, list(model.parameters()))
    descent = torch.cat([-g.reshape(-1) for g in grads])
    tau = torch.cat([(expert[name] - base[name]).reshape(-1) for name in names])
    per_tensor = [float(F.cosine_similarity(-g.reshape(-1), (expert[n] - base[n]).reshape(-1), dim=0))
                  for g, n in zip(grads, names)]
    return float(F.cosine_similarity(descent, tau, dim=0)), sum(per_tensor) / len(per_tensor)


def test_construction_raises_the_gradient_cosine_measured_with_plain_autograd():
    _, base, experts, represent = toy()
    expert = experts["a"]
    vectors = {key: expert[key] - base[key] for key in base}
    init = gaussian_anchors(16, (5,), 0.01, torch.Generator().manual_seed(0))

    def objective(anchors, create_graph):
        return alignment_loss(represent, "a", anchors, base, expert, vectors, create_graph=create_graph)[0]

    found, record = construct_anchors(objective, init, steps=150, lr=0.05)
    before_global, before_mean = plain_gradient_cosine(base, expert, init)
    after_global, after_mean = plain_gradient_cosine(base, expert, found)
    assert record["first"] == pytest.approx(1 - before_mean, abs=1e-5)      # the objective is what it says
    assert record["best"] == pytest.approx(1 - after_mean, abs=1e-5)
    assert after_mean > before_mean + 0.15         # the objective: the mean over tensors
    assert after_global > before_global + 0.1      # and the cosine over all parameters at once
    assert record["best"] <= min(record["first"], record["last"])


# ------------------------------------------------------------------ one nn.Linear: answers by hand
def linear_setup(d=4, q=3, seed=0):
    """W0 and a rank-one task vector ΔW = s u vᵀ (unit u, v); represent is x ↦ W x."""
    generator = torch.Generator().manual_seed(seed)
    layer = nn.Linear(d, q, bias=False).requires_grad_(False)
    w0 = torch.randn(q, d, generator=generator)
    u = F.normalize(torch.randn(q, generator=generator), dim=0)
    v = F.normalize(torch.randn(d, generator=generator), dim=0)
    w1 = w0 + 2.0 * torch.outer(u, v)

    def represent(task, backbone, anchors):
        return functional_call(layer, dict(backbone), (anchors,))
    return {"weight": w0}, {"weight": w1}, v, represent


def test_linear_anchor_converges_to_the_task_vectors_right_singular_vector():
    """With Dist = ½‖W x − W1 x‖²-like mse, −∇_W D at W0 ∝ ΔW x xᵀ, whose cosine with ΔW = s u vᵀ is
    |vᵀx| / ‖x‖ (worked out by hand): the objective is 1 − |cos(x, v)|, minimised by x ∥ ±v."""
    base, expert, v, represent = linear_setup()
    vectors = {"weight": expert["weight"] - base["weight"]}
    init = gaussian_anchors(1, (4,), 0.01, torch.Generator().manual_seed(3))

    def objective(anchors, create_graph):
        return alignment_loss(represent, "t", anchors, base, expert, vectors, distance="mse",
                              create_graph=create_graph)[0]

    by_hand = 1 - abs(float(F.cosine_similarity(init[0], v, dim=0)))
    assert float(objective(init, False)) == pytest.approx(by_hand, abs=1e-6)
    found, record = construct_anchors(objective, init, steps=300, lr=0.01)
    assert abs(float(F.cosine_similarity(found[0], v, dim=0))) > 0.999
    assert record["best"] < 1e-3 < record["first"]


def test_linear_fit_recovers_the_single_expert():
    """One expert, fitted from W0 with mse: zero loss means W x_j = W1 x_j on every anchor. With d
    independent anchors that fixes W = W1; with fewer, W agrees with W1 on their span only."""
    base, expert, _, represent = linear_setup()
    generator = torch.Generator().manual_seed(5)
    orthonormal, _ = torch.linalg.qr(torch.randn(4, 4, generator=generator))   # well conditioned anchors
    for count in (4, 2):
        anchors = {"t": orthonormal[:count].contiguous()}
        targets = {"t": anchors["t"] @ expert["weight"].T}
        merged = MergedBackbone(base, ["weight"])
        history = fit_anchors(merged, represent, anchors, targets, lr=0.02, epochs=800, batch_size=4,
                              distance="mse", generator=generator)
        weight = merged.weights()["weight"].detach()
        assert history[-1] < 1e-8 < 0.1 < history[0]
        torch.testing.assert_close(anchors["t"] @ weight.T, targets["t"], atol=1e-4, rtol=0)
        if count == 4:
            torch.testing.assert_close(weight, expert["weight"], atol=1e-4, rtol=0)
        else:
            assert not torch.allclose(weight, expert["weight"], atol=0.1)
    assert torch.equal(base["weight"], linear_setup()[0]["weight"])          # the start was copied, not trained


# ------------------------------------------------------------------ the start, determinism, parameters
def test_no_fitting_steps_leave_the_documented_start():
    _, base, experts, represent = toy(tasks=("a", "b", "c"))
    tasks = list(experts)
    stacked = {key: torch.stack([experts[t][key] - base[key] for t in tasks]) for key in base}
    anchors = {t: torch.randn(3, 5) for t in tasks}
    targets = {t: represent(t, experts[t], anchors[t]) for t in tasks}
    plain = MergedBackbone(base, list(base))
    refined = MergedBackbone(task_arithmetic_start(base, stacked, 0.3), list(base), stacked)
    for merged in (plain, refined):
        assert fit_anchors(merged, represent, anchors, targets, lr=0.1, epochs=0, batch_size=4, distance="cosine",
                           generator=torch.Generator()) == []
    reference = TaskArithmetic(TaskArithmetic.Params(scaling=0.3), tasks)
    for key in base:
        assert torch.equal(plain.weights()[key], base[key])
        expected = reference.merge_tensor(key, base[key], [experts[t][key] for t in tasks])
        assert torch.equal(refined.weights()[key], expected), key


def run_core(seed: int):
    _, base, experts, represent = toy()
    generator = torch.Generator().manual_seed(seed)
    anchors, targets = {}, {}
    for task, expert in experts.items():
        vectors = {key: expert[key] - base[key] for key in base}
        init = gaussian_anchors(4, (5,), 0.01, generator)
        anchors[task], _ = construct_anchors(
            lambda x, graph, e=expert, v=vectors, t=task: alignment_loss(represent, t, x, base, e, v,
                                                                        create_graph=graph)[0],
            init, steps=5, lr=0.01)
        targets[task] = represent(task, expert, anchors[task]).detach()
    merged = MergedBackbone(base, list(base))
    fit_anchors(merged, represent, anchors, targets, lr=0.01, epochs=3, batch_size=3, distance="cosine",
                generator=generator)
    return anchors, merged.weights()


def test_deterministic_for_a_seed():
    first, again, other = run_core(0), run_core(0), run_core(1)
    for task in first[0]:
        assert torch.equal(first[0][task], again[0][task])
        assert not torch.equal(first[0][task], other[0][task])
    for key in first[1]:
        assert torch.equal(first[1][key], again[1][key])
    assert any(not torch.equal(first[1][key], other[1][key]) for key in first[1])


@pytest.mark.parametrize("params, words", [
    ({"anchors": 0}, "parameter 'anchors'"), ({"init_scale": 0}, "parameter 'init_scale'"),
    ({"anchor_lr": -1}, "parameter 'anchor_lr'"), ({"merge_lr": 0}, "parameter 'merge_lr'"),
    ({"merge_batch_size": 0}, "parameter 'merge_batch_size'"), ({"start": "ties"}, "parameter 'start'"),
    ({"init": "data"}, "parameter 'init'"), ({"steps": 3}, "unknown parameter 'steps'"),
])
def test_parameters_are_validated(params, words):
    with pytest.raises(ConfigError, match=words):
        validate_params(get_method("fda"), params)
    defaults = validate_params(get_method("fda"), {})
    paper = {"anchors": 64, "tokens": 5, "init": "gaussian", "init_scale": 0.01, "anchor_steps": 1200,
             "anchor_lr": 0.01, "merge_epochs": 100, "merge_batch_size": 128, "start": "base", "merge_lr": None}
    assert {name: getattr(defaults, name) for name in paper} == paper


def test_unsupported_inputs_are_refused_in_one_line():
    with pytest.raises(ConfigError, match="fda: expert 'x' \\(Sequential\\)") as error:
        anchor_space(backbone_module(), {"x": torch.zeros(2, 5)}, 5, "x")
    assert "\n" not in str(error.value)
    assert anchor_space(backbone_module(), {"pixel_values": torch.zeros(2, 3, 8, 8)}, 5, "x") == ("pixels", (3, 8, 8))


def test_weight_initialisation_draws_real_rows():
    state = {"a": torch.randn(6, 4), "b": torch.randn(3, 4), "c": torch.randn(5, 7), "d": torch.randn(4)}
    anchors = weight_row_anchors(2, (3, 4), state, torch.Generator().manual_seed(0))
    rows = torch.cat([state["a"], state["b"]])
    assert anchors.shape == (2, 3, 4)
    matches = [(rows == token).all(dim=1).nonzero().flatten().tolist() for token in anchors.reshape(-1, 4)]
    assert all(len(m) == 1 for m in matches) and len({m[0] for m in matches}) == 6     # without replacement
    with pytest.raises(ConfigError, match="needs 12 weight rows"):
        weight_row_anchors(4, (3, 4), {"a": torch.randn(6, 4)}, torch.Generator())


# ------------------------------------------------------------------ end to end
@pytest.fixture(scope="module")
def bert_family(tmp_path_factory):
    from conftest import build_family

    return build_family(tmp_path_factory.mktemp("fda"), "bert", n_experts=2)


def text_batches(tasks, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return {task: [{"input_ids": torch.randint(5, 99, (3, 5), generator=generator),
                    "attention_mask": torch.ones(3, 5, dtype=torch.long), "labels": torch.tensor([0, 1, 0])}]
            for task in tasks}


QUICK = {"anchors": 6, "tokens": 4, "anchor_steps": 12, "merge_epochs": 6, "merge_batch_size": 4}


def test_end_to_end_on_tiny_bert(bert_family, tmp_path):
    base, experts = bert_family
    out = tmp_path / "fda"
    layermerge.merge(base, experts, method="fda", data=text_batches(experts), output=out, quiet=True, device="cpu",
                     merge_lr=1e-3, save_anchors=True, **QUICK)
    summary = json.loads((out / "layermerge_summary.json").read_text())["summary"]
    assert summary["input_space"] == "text" and summary["task_data_used"] == "none"
    for task in experts:
        assert summary["alignment"][task]["cosine_best"] > summary["alignment"][task]["cosine_first"] + 0.05
    assert summary["merge"]["loss_final"] < 0.5 * summary["merge"]["loss_start"]
    assert summary["merge"]["steps"] == 6 * 3
    assert summary["unreached_keys"] == ["embeddings.word_embeddings.weight"]   # inputs_embeds bypass it
    artifacts = load_file(str(out / "fda" / "artifacts.safetensors"))
    assert artifacts["task0/anchors"].shape == (6, 4, 32) and artifacts["task1/targets"].shape == (6, 32)
    merged, reference = CheckpointReader(out), CheckpointReader(base)
    assert sorted(merged.keys()) == sorted(reference.keys())
    assert torch.equal(merged.get("embeddings.word_embeddings.weight"),
                       reference.get("embeddings.word_embeddings.weight"))       # untrained: still the base's
    assert not torch.equal(merged.get("encoder.layer.0.attention.self.query.weight"),
                           reference.get("encoder.layer.0.attention.self.query.weight"))
    model = layermerge.load_task_model(out, "task1")
    batch = text_batches(["task1"])["task1"][0]
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert logits.shape == (3, 3) and torch.isfinite(logits).all()


@pytest.mark.parametrize("start, reference", [("task_arithmetic", {"scaling": 0.3}), ("base", {"scaling": 0.0})])
def test_end_to_end_without_fitting_is_the_start(bert_family, tmp_path, start, reference):
    base, experts = bert_family
    layermerge.merge(base, experts, method="fda", data=text_batches(experts), output=tmp_path / "fda", quiet=True,
                     device="cpu", start=start, anchors=2, anchor_steps=1, merge_epochs=0)
    layermerge.merge(base, experts, "task_arithmetic", output=tmp_path / "ta", quiet=True, **reference)
    merged, expected = CheckpointReader(tmp_path / "fda"), CheckpointReader(tmp_path / "ta")
    for key in expected.keys():
        assert torch.equal(merged.get(key), expected.get(key)), key


def test_end_to_end_is_deterministic_per_seed(bert_family, tmp_path):
    base, experts = bert_family
    small = {**QUICK, "anchor_steps": 3, "merge_epochs": 2}
    for name, seed in (("one", 0), ("again", 0), ("other", 1)):
        layermerge.merge(base, experts, method="fda", data=text_batches(experts), output=tmp_path / name, quiet=True,
                         device="cpu", seed=seed, merge_lr=1e-3, **small)
    one, again, other = (CheckpointReader(tmp_path / name) for name in ("one", "again", "other"))
    key = "encoder.layer.1.output.dense.weight"
    assert all(torch.equal(one.get(k), again.get(k)) for k in one.keys())
    assert not torch.equal(one.get(key), other.get(key))


def test_end_to_end_on_image_models(tmp_path):
    from conftest import perturb_

    from layermerge.data.models import build_vision_model, get_vision_factory, save_vision_model, spec_for

    spec = spec_for(get_vision_factory("small-cnn"), 3, 16)
    torch.manual_seed(0)
    base_model = build_vision_model(spec, pretrained=False)
    base = save_vision_model(base_model, spec, tmp_path / "base")
    experts = {}
    for index, task in enumerate(["a", "b"]):
        model = build_vision_model(spec, pretrained=False)
        model.load_state_dict(base_model.state_dict())
        experts[task] = save_vision_model(perturb_(model, seed=index, scale=0.05), spec, tmp_path / task)
    data = {task: [{"pixel_values": torch.randn(2, 3, 16, 16), "labels": torch.tensor([0, 1])}] for task in experts}
    with pytest.raises(ConfigError, match="init 'weight'.*text models only"):
        layermerge.merge(base, experts, method="fda", data=data, quiet=True, device="cpu", init="weight")
    layermerge.merge(base, experts, method="fda", data=data, output=tmp_path / "out", quiet=True, device="cpu",
                     anchors=4, anchor_steps=8, merge_epochs=3, save_anchors=True)
    summary = json.loads((tmp_path / "out" / "layermerge_summary.json").read_text())["summary"]
    assert summary["input_space"] == "pixels" and summary["anchor_shape"] == [3, 16, 16]
    assert summary["merge"]["lr"] == 1e-5 and summary["unreached_keys"] == []
    assert all(summary["alignment"][t]["cosine_best"] >= summary["alignment"][t]["cosine_first"] for t in experts)
    assert load_file(str(tmp_path / "out" / "fda" / "artifacts.safetensors"))["a/anchors"].shape == (4, 3, 16, 16)
    merged = CheckpointReader(tmp_path / "out")
    assert all(torch.isfinite(merged.get(key)).all() for key in merged.keys() if merged.dtype(key).is_floating_point)
