"""DF-Merge: the Bayesian optimiser on known functions (maximum found, deterministic per seed, never
worse than its start), and the method on tiny BERT experts — fixed λ against a second, plain
implementation of the dynamic Fisher merge and of its objective, one expert, parameter checks, and a
search end to end whose output loads and whose summary records every evaluated point."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

import layermerge
from layermerge.errors import ConfigError, DataError
from layermerge.io.reader import CheckpointReader
from layermerge.methods.bayes_opt import GaussianProcess, expected_improvement, maximize
from layermerge.methods.registry import get_method, validate_params

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# --------------------------------------------------------------------- the optimiser on known functions
def bumpy_1d(x):
    return float(-(x[0] - 0.37) ** 2 + 0.05 * math.sin(20 * x[0]))


BUMPY_1D_ARGMAX = 0.39063           # by a 100,001-point grid over [0, 1]


def two_bumps(x):
    """A global bump at (0.7, 0.25) (value ≈ 1) and a lower one at (0.2, 0.8) (value ≈ 0.5)."""
    return float(np.exp(-((x[0] - 0.7) ** 2 + (x[1] - 0.25) ** 2) / 0.05)
                 + 0.5 * np.exp(-((x[0] - 0.2) ** 2 + (x[1] - 0.8) ** 2) / 0.02))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_finds_the_maximum_of_known_functions_within_the_budget(seed):
    one = maximize(bumpy_1d, [0.0], [1.0], init_points=3, iterations=12, seed=seed)
    assert len(one.values) == 15
    assert abs(one.best_point[0] - BUMPY_1D_ARGMAX) < 0.02
    two = maximize(two_bumps, [0.0, 0.0], [1.0, 1.0], init_points=5, iterations=25, seed=seed)
    assert len(two.values) == 30
    assert np.abs(two.best_point - [0.7, 0.25]).max() < 0.03 and two.best_value > 0.99
    shifted = maximize(lambda x: two_bumps((x - 1.0) / 2.0), [1.0, 1.0], [3.0, 3.0], init_points=5,
                       iterations=25, seed=seed)                      # the box is not the unit square
    assert np.abs(shifted.best_point - [2.4, 1.5]).max() < 0.06


def test_deterministic_per_seed():
    first = maximize(two_bumps, [0.0, 0.0], [1.0, 1.0], init_points=4, iterations=6, seed=7)
    again = maximize(two_bumps, [0.0, 0.0], [1.0, 1.0], init_points=4, iterations=6, seed=7)
    other = maximize(two_bumps, [0.0, 0.0], [1.0, 1.0], init_points=4, iterations=6, seed=8)
    assert np.array_equal(first.points, again.points) and np.array_equal(first.values, again.values)
    assert not np.array_equal(first.points, other.points)


def test_returns_the_best_evaluated_point_never_worse_than_the_start():
    start = [0.42, 0.61]
    peak = maximize(lambda x: -float(np.abs(x - start).sum()), [0.0, 0.0], [1.0, 1.0], start=start,
                    init_points=4, iterations=8, seed=0)
    assert peak.best_index == 0 and peak.best_point.tolist() == start           # nothing beats the start
    flat = maximize(lambda x: 0.5, [0.0], [1.0], start=[0.3], init_points=3, iterations=3, seed=0)
    assert flat.best_index == 0 and flat.best_point.tolist() == [0.3]            # ties keep the first
    calls = []
    only = maximize(lambda x: calls.append(x.tolist()) or 1.0, [0.0], [1.0], start=[0.2], init_points=1,
                    iterations=0)
    assert calls == [[0.2]] and only.best_point.tolist() == [0.2]
    search = maximize(two_bumps, [0.0, 0.0], [1.0, 1.0], start=[0.5, 0.5], init_points=3, iterations=5, seed=3)
    assert search.points[0].tolist() == [0.5, 0.5] and search.best_value == search.values.max() >= search.values[0]
    assert ((search.points >= 0) & (search.points <= 1)).all()


def test_optimiser_refuses_bad_arguments():
    with pytest.raises(ValueError, match="below its upper bound"):
        maximize(bumpy_1d, [1.0], [0.0])
    with pytest.raises(ValueError, match="not inside the box"):
        maximize(bumpy_1d, [0.0], [1.0], start=[1.5])
    with pytest.raises(ValueError, match="init_points >= 1"):
        maximize(bumpy_1d, [0.0], [1.0], init_points=0)
    with pytest.raises(ValueError, match="must be finite"):
        maximize(lambda x: float("nan"), [0.0], [1.0], init_points=2)


def test_gaussian_process_and_expected_improvement():
    x = np.linspace(0, 1, 7)[:, None]
    y = np.sin(4 * x[:, 0])
    process = GaussianProcess(x, y)
    mean, std = process.predict(x)
    np.testing.assert_allclose(mean, y, atol=0.05)                              # it interpolates its data
    _, far = process.predict(np.array([[0.5 / 6], [3.0]]))
    assert std.max() < far[0] < far[1]                                          # and is unsure away from it
    sigma = 0.3
    assert expected_improvement(np.array([1.0]), np.array([sigma]), 1.0)[0] == pytest.approx(
        sigma / math.sqrt(2 * math.pi))                                         # mean at the best: σ φ(0)
    draws = np.random.default_rng(0).normal(0.2, 0.5, 400_000)
    monte_carlo = np.maximum(draws - 0.1 - 0.05, 0).mean()
    assert expected_improvement(np.array([0.2]), np.array([0.5]), 0.1, xi=0.05)[0] == pytest.approx(
        monte_carlo, rel=1e-2)


# --------------------------------------------------------------------- the method on tiny BERT experts
@pytest.fixture(scope="module")
def bert_family(tmp_path_factory):
    from conftest import build_family

    return build_family(tmp_path_factory.mktemp("dfmerge"), "bert", n_experts=3)


def text_batches(tasks, seed=0):
    generator = torch.Generator().manual_seed(seed)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 1, 1, 0]])
    return {task: [{"input_ids": torch.randint(5, 99, (3, 5), generator=generator) * mask, "attention_mask": mask,
                    "labels": torch.tensor([0, 1, 0])} for _ in range(2)] for task in tasks}


def classifier(folder, backbone=None):
    """An expert's sequence classifier in float64, its 'bert.' weights replaced by ``backbone``."""
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(folder).eval().double()
    if backbone is not None:
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name.startswith("bert."):
                    param.copy_(backbone[name[len("bert."):]])
    return model


def independent_df_merge(base_dir, experts, data, lambdas, *, fisher_at, labels, examples, epsilon):
    """A second implementation: float64, ordinary .backward() per example (and per class for
    'expected') on each expert's classifier with its backbone set to θ0 + λ_i τ_i (or left at the
    expert), then θ0 + T Σ (F_i + ε) λ_i τ_i / Σ (F_i + ε)."""
    reader = CheckpointReader(base_dir)
    theta0 = {key: reader.get(key).double() for key in reader.keys() if reader.dtype(key).is_floating_point}
    numerator, denominator = {}, {}
    for lam, (task, folder) in zip(lambdas, experts.items()):
        expert = CheckpointReader(folder)
        tau = {key: expert.get("bert." + key).double() - theta0[key] for key in theta0}
        model = classifier(folder, {key: theta0[key] + lam * tau[key] for key in theta0}
                           if fisher_at == "scaled" else None)
        params = {name[len("bert."):]: p for name, p in model.named_parameters() if name.startswith("bert.")}
        fisher = {key: torch.zeros_like(p) for key, p in params.items()}
        rows = [(batch, row) for batch in data[task] for row in range(batch["input_ids"].shape[0])][:examples]
        for batch, row in rows:
            log_probs = torch.log_softmax(model(input_ids=batch["input_ids"][row:row + 1],
                                                attention_mask=batch["attention_mask"][row:row + 1]).logits[0], -1)
            classes = [(1.0, int(batch["labels"][row]))] if labels == "true" else \
                [(float(p), c) for c, p in enumerate(log_probs.detach().exp())]
            for weight, c in classes:
                model.zero_grad()
                log_probs[c].backward(retain_graph=True)
                for key, p in params.items():
                    fisher[key] += weight * p.grad ** 2
        for key in theta0:
            f = fisher[key] / len(rows) + epsilon
            numerator[key] = numerator.get(key, 0) + f * lam * tau[key]
            denominator[key] = denominator.get(key, 0) + f
    return {key: theta0[key] + len(experts) * numerator[key] / denominator[key] for key in theta0}


def independent_objective(experts, data, backbone, objective):
    """Each task's accuracy or mean cross-entropy with ``backbone`` in its own classifier (float64)."""
    scores = {}
    for task, folder in experts.items():
        model = classifier(folder, backbone)
        with torch.no_grad():
            logits = torch.cat([model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
                                for b in data[task]])
        target = torch.cat([b["labels"] for b in data[task]])
        scores[task] = float((logits.argmax(-1) == target).double().mean()) if objective == "accuracy" else \
            float(torch.nn.functional.cross_entropy(logits, target))
    return scores


@pytest.mark.parametrize("fisher_at,labels,objective", [("scaled", "true", "accuracy"),
                                                        ("scaled", "expected", "loss"),
                                                        ("expert", "expected", "accuracy")])
def test_fixed_lambdas_equal_an_independent_dynamic_fisher_merge(bert_family, fisher_at, labels, objective):
    base, experts = bert_family
    data = text_batches(experts)
    lambdas = [0.2, 0.55, 0.9]
    merged = layermerge.merge(base, experts, "df_merge", data=data, quiet=True, device="cpu", init=lambdas,
                              init_points=1, iterations=0, fisher_at=fisher_at, fisher_labels=labels,
                              objective=objective, fisher_examples=4, epsilon=1e-6)
    expected = independent_df_merge(base, experts, data, lambdas, fisher_at=fisher_at, labels=labels,
                                     examples=4, epsilon=1e-6)
    float_keys = [key for key, tensor in merged.state_dict.items() if tensor.is_floating_point()]
    assert set(float_keys) == set(expected)
    readers = [CheckpointReader(folder) for folder in experts.values()]
    arithmetic = 0
    for key in float_keys:
        torch.testing.assert_close(merged.state_dict[key], expected[key].float(), rtol=1e-4, atol=1e-6, msg=key)
        plain = CheckpointReader(base).get(key) + sum(lam * (r.get("bert." + key) - CheckpointReader(base).get(key))
                                                      for lam, r in zip(lambdas, readers))
        arithmetic += torch.allclose(merged.state_dict[key], plain, atol=1e-5)
    assert arithmetic < len(float_keys) // 2                # the Fishers weigh: it is not Task Arithmetic
    summary = merged.summary
    assert summary["fisher_examples"] == {task: 4 for task in experts}
    assert [list(e["lambdas"].values()) for e in summary["evaluations"]] == [lambdas]
    assert summary["lambdas"] == dict(zip(experts, lambdas))
    scores = independent_objective(experts, data, expected, objective)
    per_task = summary["evaluations"][0]["per_task"]
    assert per_task == pytest.approx(scores, rel=1e-4)
    mean = sum(scores.values()) / len(scores)
    assert summary["objective_best"] == pytest.approx(mean if objective == "accuracy" else -mean, rel=1e-4)


def test_one_expert_is_the_scaled_expert(bert_family):
    base, experts = bert_family
    one = {"task1": experts["task1"]}
    data = text_batches(one)
    fixed = layermerge.merge(base, one, "df_merge", data=data, quiet=True, device="cpu", init=1.0, init_points=1,
                             iterations=0, fisher_labels="true")
    searched = layermerge.merge(base, one, "df_merge", data=data, quiet=True, device="cpu", init_points=2,
                                iterations=2, objective="loss", fisher_labels="true")
    lam = searched.summary["lambdas"]["task1"]
    assert len(searched.summary["evaluations"]) == 4 and searched.summary["evaluations"][0]["lambdas"] == {"task1": 1.0}
    expert, reader = CheckpointReader(experts["task1"]), CheckpointReader(base)
    for key, tensor in fixed.state_dict.items():
        if tensor.is_floating_point():
            torch.testing.assert_close(tensor, expert.get("bert." + key), msg=key)          # θ0 + 1·τ = θ1
            scaled = reader.get(key) + lam * (expert.get("bert." + key) - reader.get(key))
            torch.testing.assert_close(searched.state_dict[key], scaled, rtol=1e-5, atol=1e-6, msg=key)


def test_search_end_to_end_records_every_point_and_returns_the_best(bert_family, tmp_path):
    base, experts = bert_family
    data = text_batches(experts, seed=3)
    options = dict(data=data, quiet=True, device="cpu", init_points=3, iterations=4, objective="loss",
                   fisher_labels="true", seed=5)
    out = tmp_path / "dfm"
    layermerge.merge(base, experts, "df_merge", output=out, **options)
    summary = json.loads((out / "layermerge_summary.json").read_text())["summary"]
    history = summary["evaluations"]
    assert len(history) == 7
    assert history[0]["lambdas"] == {task: 1 / 3 for task in experts}             # the start: 1/T each
    for evaluation in history:
        assert set(evaluation["lambdas"]) == set(experts) == set(evaluation["per_task"])
        assert all(0.0 <= lam <= 1.0 for lam in evaluation["lambdas"].values())
        mean_loss = sum(evaluation["per_task"].values()) / 3
        assert evaluation["objective"] == pytest.approx(-mean_loss)
    objectives = [evaluation["objective"] for evaluation in history]
    assert summary["best_evaluation"] == objectives.index(max(objectives))
    assert summary["objective_best"] == max(objectives) >= summary["objective_start"] == objectives[0]
    assert summary["lambdas"] == history[summary["best_evaluation"]]["lambdas"]
    assert len({tuple(e["lambdas"].values()) for e in history}) == 7                # seven distinct points
    from safetensors.torch import load_file

    saved = load_file(str(out / "df_merge" / "artifacts.safetensors"))
    assert {task: float(value) for task, value in saved.items()} == pytest.approx(summary["lambdas"])
    for task in experts:
        model = layermerge.load_task_model(out, task)
        with torch.no_grad():
            logits = model(input_ids=data[task][0]["input_ids"], attention_mask=data[task][0]["attention_mask"]).logits
        assert logits.shape == (3, model.config.num_labels) and torch.isfinite(logits).all()

    # The output is the merge at the recorded λ, and the same seed repeats the same search.
    merged = CheckpointReader(out)
    again = layermerge.merge(base, experts, "df_merge", **{**options, "init_points": 1, "iterations": 0},
                             init=list(summary["lambdas"].values()))
    for key in merged.keys():
        assert torch.equal(merged.get(key), again.state_dict[key]), key
    repeat = layermerge.merge(base, experts, "df_merge", **options)
    assert repeat.summary["evaluations"] == history


@pytest.mark.parametrize("params,words", [
    ({"lambda_min": 1.0, "lambda_max": 0.5}, "lambda_min < lambda_max"),
    ({"lambda_max": float("inf")}, "lambda_min < lambda_max"),
    ({"init": 1.5}, "within [lambda_min, lambda_max]"),
    ({"init": [0.2, -0.1]}, "within [lambda_min, lambda_max]"),
    ({"init": []}, "at least one value"),
    ({"init": "half"}, "parameter 'init'"),
    ({"init_points": 0}, "parameter 'init_points'"),
    ({"iterations": -1}, "parameter 'iterations'"),
    ({"epsilon": 0.0}, "parameter 'epsilon'"),
    ({"fisher_examples": 0}, "parameter 'fisher_examples'"),
    ({"xi": -0.1}, "parameter 'xi'"),
    ({"objective": "f1"}, "parameter 'objective'"),
    ({"fisher_at": "merged"}, "parameter 'fisher_at'"),
    ({"fisher_labels": False}, "parameter 'fisher_labels'"),
    ({"budget": 5}, "unknown parameter 'budget'"),
])
def test_bad_parameters_are_refused(params, words):
    with pytest.raises(ConfigError, match="df_merge") as error:
        validate_params(get_method("df_merge"), params)
    assert words in str(error.value)


def test_defaults_and_runtime_checks(bert_family):
    info = get_method("df_merge")
    assert (info.kind, info.needs_data, info.needs_base) == ("model", True, True)
    params = validate_params(info, {"fisher_labels": True})
    assert params.fisher_labels == "true"                            # YAML's unquoted true
    defaults = validate_params(info, {})
    assert (defaults.init_points, defaults.iterations, defaults.fisher_examples) == (10, 50, 30)
    assert (defaults.lambda_min, defaults.lambda_max, defaults.xi, defaults.fisher_labels) == (0.0, 1.0, 0.01,
                                                                                                "expected")
    base, experts = bert_family
    data = text_batches(experts)
    with pytest.raises(ConfigError, match="init has 2 values but there are 3 experts"):
        layermerge.merge(base, experts, "df_merge", data=data, quiet=True, device="cpu", init=[0.1, 0.2])
    unlabelled = {task: [{k: v for k, v in batch.items() if k != "labels"} for batch in batches]
                  for task, batches in data.items()}
    with pytest.raises(DataError, match="no 'labels'"):
        layermerge.merge(base, experts, "df_merge", data=unlabelled, quiet=True, device="cpu")
