"""Fisher merging: the diagonal Fisher of a linear-softmax model against its closed form, the
regression (Gaussian) case, the weighted average's known answers, and a whole merge of tiny BERT
experts against a second implementation (plain backward passes on each expert's own model)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import layermerge
from layermerge.errors import ConfigError, DataError
from layermerge.io.reader import CheckpointReader
from layermerge.methods.fisher import (
    FisherMerging,
    diagonal_fisher,
    fisher_weighted_average,
    single_examples,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def linear_model(classes=3, features=4, seed=0):
    generator = torch.Generator().manual_seed(seed)
    params = {"W": torch.randn(classes, features, generator=generator, dtype=torch.float64),
              "b": torch.randn(classes, generator=generator, dtype=torch.float64)}

    def logits_fn(p, example):
        return example["x"] @ p["W"].T + p["b"]
    return params, logits_fn


def batch_of(rows=5, features=4, classes=3, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return {"x": torch.randn(rows, features, generator=generator, dtype=torch.float64),
            "labels": torch.randint(0, classes, (rows,), generator=generator)}


def closed_form(params, batch, mode):
    """By hand: ∂ log softmax(Wx+b)_y / ∂W = (e_y − p) xᵀ, / ∂b = e_y − p."""
    W, b = params["W"].numpy(), params["b"].numpy()
    fW, fb = np.zeros_like(W), np.zeros_like(b)
    xs, ys = batch["x"].numpy(), batch["labels"].numpy()
    for x, y in zip(xs, ys):
        z = W @ x + b
        p = np.exp(z - z.max())
        p /= p.sum()
        terms = [(1.0, y)] if mode == "true" else [(pc, c) for c, pc in enumerate(p)]
        for weight, c in terms:
            r = np.eye(len(b))[c] - p
            fW += weight * np.outer(r, x) ** 2
            fb += weight * r ** 2
    return fW / len(xs), fb / len(xs)


@pytest.mark.parametrize("mode", ["true", "expected"])
def test_linear_softmax_fisher_matches_closed_form(mode):
    params, logits_fn = linear_model()
    batch = batch_of()
    fisher, count = diagonal_fisher(logits_fn, params, [batch, batch_of(seed=2)], mode)
    fW1, fb1 = closed_form(params, batch, mode)
    fW2, fb2 = closed_form(params, batch_of(seed=2), mode)
    assert count == 10
    np.testing.assert_allclose(fisher["W"].numpy(), (fW1 + fW2) / 2, rtol=1e-10)
    np.testing.assert_allclose(fisher["b"].numpy(), (fb1 + fb2) / 2, rtol=1e-10)
    assert not params["W"].requires_grad                   # the caller's tensors are left alone


def test_sampled_labels_are_seeded_and_average_to_the_expected_fisher():
    params, logits_fn = linear_model()
    small = batch_of(rows=3)
    many = {"x": small["x"].repeat(1000, 1)}                 # no labels needed when sampling
    first, _ = diagonal_fisher(logits_fn, params, [many], "sampled", torch.Generator().manual_seed(5))
    again, _ = diagonal_fisher(logits_fn, params, [many], "sampled", torch.Generator().manual_seed(5))
    assert torch.equal(first["W"], again["W"])
    expected_W, expected_b = closed_form(params, small, "expected")
    # a Monte-Carlo estimate from 3000 draws: the totals within 5%, every element within 30%
    assert float(first["W"].sum()) == pytest.approx(expected_W.sum(), rel=0.05)
    assert float(first["b"].sum()) == pytest.approx(expected_b.sum(), rel=0.05)
    np.testing.assert_allclose(first["W"].numpy(), expected_W, rtol=0.3)
    np.testing.assert_allclose(first["b"].numpy(), expected_b, rtol=0.3)


def test_regression_head_uses_the_gaussian_likelihood():
    """One output f = w·x + c: ∂ log N(y; f, 1)/∂w = (y − f) x, and its expectation over y is x²."""
    generator = torch.Generator().manual_seed(3)
    params = {"w": torch.randn(1, 4, generator=generator, dtype=torch.float64),
              "c": torch.randn(1, generator=generator, dtype=torch.float64)}
    x = torch.randn(6, 4, generator=generator, dtype=torch.float64)
    y = torch.randn(6, generator=generator, dtype=torch.float64)

    def logits_fn(p, example):
        return example["x"] @ p["w"].T + p["c"]
    fisher, _ = diagonal_fisher(logits_fn, params, [{"x": x, "labels": y}], "true")
    residual = (y - (x @ params["w"].T + params["c"])[:, 0]).numpy()
    np.testing.assert_allclose(fisher["w"].numpy()[0], ((residual[:, None] * x.numpy()) ** 2).mean(0))
    np.testing.assert_allclose(fisher["c"].numpy(), [(residual ** 2).mean()])
    expected, _ = diagonal_fisher(logits_fn, params, [{"x": x}], "expected")
    np.testing.assert_allclose(expected["w"].numpy()[0], (x.numpy() ** 2).mean(0))


def test_ignored_labels_missing_labels_and_unsupported_heads():
    params, logits_fn = linear_model()
    batch = batch_of(rows=4)
    batch["labels"][1] = -100
    _, count = diagonal_fisher(logits_fn, params, [batch], "true")
    assert count == 3
    with pytest.raises(DataError, match="needs labels"):
        diagonal_fisher(logits_fn, params, [{"x": batch["x"]}], "true")
    with pytest.raises(ConfigError, match="one prediction per example"):
        diagonal_fisher(lambda p, e: logits_fn(p, e)[:, None, None, :], params, [batch], "expected")
    with pytest.raises(DataError, match="first dimensions"):
        list(single_examples({"x": torch.zeros(3, 2), "labels": torch.zeros(2)}))


def test_single_examples_trim_trailing_padding():
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [0, 0, 1, 1]])      # the last row is left-padded
    batch = {"input_ids": torch.arange(12).reshape(3, 4), "attention_mask": mask, "labels": torch.tensor([0, 1, 2]),
             "flag": "kept"}
    rows = list(single_examples(batch))
    assert [row["input_ids"].tolist() for row in rows] == [[[0, 1, 2, 3]], [[4, 5]], [[8, 9, 10, 11]]]
    assert rows[1]["attention_mask"].tolist() == [[1, 1]] and rows[1]["labels"].tolist() == [1]
    assert rows[2]["flag"] == "kept"


def test_weighted_average_known_answers():
    generator = torch.Generator().manual_seed(4)
    states = [{"a": torch.randn(3, 2, generator=generator), "step": torch.tensor(7)} for _ in range(3)]
    average = torch.stack([s["a"] for s in states]).mean(0)
    equal = torch.rand(3, 2, generator=generator) + 0.1
    merged = fisher_weighted_average(states, [{"a": equal}] * 3)
    torch.testing.assert_close(merged["a"], average)                    # equal Fishers: the average
    assert torch.equal(merged["step"], torch.tensor(7))                  # non-float: the first expert's
    zero = fisher_weighted_average(states, [{}] * 3)                    # no signal: ε alone, the average
    torch.testing.assert_close(zero["a"], average)
    fishers = [{"a": torch.rand(3, 2, generator=generator)} for _ in range(3)]
    by_hand = sum((f["a"] + 1e-3) * s["a"] for f, s in zip(fishers, states)) / sum(f["a"] + 1e-3 for f in fishers)
    torch.testing.assert_close(fisher_weighted_average(states, fishers, 1e-3)["a"], by_hand)
    dominant = [{"a": torch.full((3, 2), 1e6)}, {"a": torch.zeros(3, 2)}, {"a": torch.zeros(3, 2)}]
    torch.testing.assert_close(fisher_weighted_average(states, dominant)["a"], states[0]["a"])


def test_auto_label_mode():
    method = FisherMerging(FisherMerging.Params())
    assert method._mode("t", [{"labels": 1}], False) == "true"
    assert method._mode("t", [{"x": 1}], False) == "expected"
    assert method._mode("t", [{"x": 1}], True) == "sampled"           # a language model without labels
    assert method._mode("t", [{"labels": 1}], True) == "true"
    with pytest.raises(DataError, match="without labels"):
        FisherMerging(FisherMerging.Params(fisher_labels="true"))._mode("t", [{"x": 1}], False)


# --------------------------------------------------------------------- end to end on tiny BERT
def labelled_batches(tasks, seed=0):
    generator = torch.Generator().manual_seed(seed)
    data = {}
    for task in tasks:
        mask = torch.ones(3, 6, dtype=torch.long)
        mask[1:, 4:] = 0
        data[task] = [{"input_ids": torch.randint(3, 99, (3, 6), generator=generator) * mask,
                       "attention_mask": mask, "labels": torch.tensor([0, 1, 1])}]
    return data


def independent_fisher_merge(experts: dict, data: dict, mode: str, epsilon: float) -> dict[str, torch.Tensor]:
    """A second implementation: ordinary .backward() per example (and per class for 'expected') on
    each expert's own sequence classifier; backbone ('bert.') parameters only."""
    from transformers import AutoModelForSequenceClassification

    numerator, denominator = {}, {}
    for task, folder in experts.items():
        model = AutoModelForSequenceClassification.from_pretrained(folder).eval().double()
        params = {name[len("bert."):]: p for name, p in model.named_parameters() if name.startswith("bert.")}
        fisher = {key: torch.zeros_like(p) for key, p in params.items()}
        count = 0
        for batch in data[task]:
            for row in range(batch["input_ids"].shape[0]):
                log_probs = torch.log_softmax(model(input_ids=batch["input_ids"][row:row + 1],
                                                    attention_mask=batch["attention_mask"][row:row + 1]).logits[0], -1)
                classes = [(1.0, int(batch["labels"][row]))] if mode == "true" else \
                    [(float(p), c) for c, p in enumerate(log_probs.detach().exp())]
                for weight, c in classes:
                    model.zero_grad()
                    log_probs[c].backward(retain_graph=True)
                    for key, p in params.items():
                        fisher[key] += weight * p.grad ** 2
                count += 1
        for key, p in params.items():
            f = fisher[key] / count + epsilon
            numerator[key] = numerator.get(key, 0) + f * p.detach()
            denominator[key] = denominator.get(key, 0) + f
    return {key: (numerator[key] / denominator[key]).float() for key in numerator}


@pytest.mark.parametrize("mode", ["true", "expected"])
def test_merge_tiny_bert_matches_a_second_implementation(mode, family_models, tmp_path):
    from transformers import AutoModel

    base, experts = family_models["bert"]
    data = labelled_batches(experts)
    out = tmp_path / "fisher"
    layermerge.merge(base, experts, method="fisher", data=data, output=out, quiet=True, device="cpu",
                     fisher_labels=mode, epsilon=1e-6)
    merged = CheckpointReader(out)
    expected = independent_fisher_merge(experts, data, mode, 1e-6)
    assert set(merged.keys()) == set(expected)
    readers = [CheckpointReader(folder) for folder in experts.values()]
    differs = 0
    for key, value in expected.items():
        torch.testing.assert_close(merged.get(key), value, rtol=1e-4, atol=1e-6, msg=key)
        average = torch.stack([r.get("bert." + key) for r in readers]).mean(0)
        differs += not torch.allclose(merged.get(key), average, atol=1e-5)
    assert differs > len(expected) // 2                                   # Fisher weighting is not averaging
    summary = json.loads((out / "layermerge_summary.json").read_text())["summary"]
    assert summary["fisher_labels"] == {task: mode for task in experts}
    assert summary["examples"] == {task: 3 for task in experts}
    model = AutoModel.from_pretrained(out).eval()
    with torch.no_grad():
        batch = {k: v for k, v in data["task0"][0].items() if k != "labels"}
        assert torch.isfinite(model(**batch).last_hidden_state).all()


def test_merge_one_expert_is_that_expert_and_saves_fishers(family_models):
    base, experts = family_models["bert"]
    one = {"task2": experts["task2"]}
    merged = layermerge.merge(None, one, method="fisher", data=labelled_batches(one), quiet=True, device="cpu",
                              fisher_labels="sampled", save_fishers=True, normalize=True)
    reader = CheckpointReader(experts["task2"])
    for key, tensor in merged.state_dict.items():
        torch.testing.assert_close(tensor, reader.get(key), rtol=1e-5, atol=1e-6, msg=key)   # no base: own names
    fishers = merged.artifacts
    assert {f"task2/{key}" for key in merged.state_dict} >= set(fishers) and fishers
    norm = sum(float(t.double().square().sum()) for t in fishers.values()) ** 0.5
    assert norm == pytest.approx(1.0)                                    # normalize=True: unit L2 norm


def test_vision_model_buffers_are_averaged(tmp_path):
    """A layermerge small CNN with BatchNorm: running statistics get no gradient (Fisher 0, so ε alone:
    the average); trainable weights are Fisher-weighted."""
    from conftest import perturb_

    from layermerge.data.models import build_vision_model, get_vision_factory, save_vision_model, spec_for

    factory = get_vision_factory("small-cnn")
    torch.manual_seed(0)
    base_model = build_vision_model(spec_for(factory, 10, 16), pretrained=False)
    backbone = {k: v for k, v in base_model.state_dict().items() if not k.startswith(factory.head_prefix)}
    experts = {}
    for index, task in enumerate(["a", "b"]):
        spec = spec_for(factory, 3 + index, 16)
        model = build_vision_model(spec, pretrained=False)
        model.load_state_dict(backbone, strict=False)
        perturb_(model, seed=index, scale=0.05)
        with torch.no_grad():
            for buffer in model.buffers():
                if buffer.is_floating_point():
                    buffer.add_(torch.rand(buffer.shape) * 0.1 * (index + 1))
        experts[task] = save_vision_model(model, spec, tmp_path / task)
    generator = torch.Generator().manual_seed(0)
    data = {task: [{"pixel_values": torch.randn(3, 3, 16, 16, generator=generator),
                    "labels": torch.tensor([0, 1, 2])}] for task in experts}
    merged = layermerge.merge(None, experts, method="fisher", data=data, quiet=True, device="cpu").state_dict
    readers = [CheckpointReader(folder) for folder in experts.values()]
    stats = [key for key in merged if key.endswith(("running_mean", "running_var"))]
    assert stats
    for key in stats:
        torch.testing.assert_close(merged[key], (readers[0].get(key) + readers[1].get(key)) / 2)
    weights = [key for key in merged if key.endswith(".weight") and merged[key].dim() == 4]
    assert any(not torch.allclose(merged[k], (readers[0].get(k) + readers[1].get(k)) / 2) for k in weights)


def test_yaml_boolean_true_means_true_labels():
    from layermerge.methods.fisher import FisherMerging

    assert FisherMerging.Params(fisher_labels=True).fisher_labels == "true"
    with pytest.raises(ValueError):
        FisherMerging.Params(fisher_labels=False)
