"""NeuLig: router, offsets, alignment, the three model modes, and the merge through layermerge.merge.

The core tests run the method on tiny MLP experts fine-tuned from one base on synthetic clustered
tasks, through a hand-written stand-in for ModelContext; the end-to-end tests use tiny BERT experts.
Every expected value is computed here independently (by hand on the tensors, or by running the
saved model).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import build_family
from torch import nn
from torch.func import functional_call

import layermerge
import layermerge.methods.neulig as neulig
from layermerge.errors import DataError
from layermerge.methods.neulig import NeuLig, Portland

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# --------------------------------------------------------------------- a tiny multi-task setup
class PlainContext:
    """ModelContext's interface over plain modules: task model = Sequential(backbone, Linear head)."""

    def __init__(self, backbones, heads, batches, seed=0):
        self.tasks = list(batches)
        self.models = {t: nn.Sequential(b, h).eval() for t, b, h in zip(self.tasks, backbones, heads)}
        self.merge_keys = list(backbones[0].state_dict())
        self.device = torch.device("cpu")
        self.generator = torch.Generator().manual_seed(seed)
        self.quiet = True
        self._batches = batches

    def batches(self, task):
        return self._batches[task]

    def expert_state(self, task):
        return {k: v.detach().clone() for k, v in self.models[task][0].state_dict().items()}

    def logits(self, task, backbone, batch):
        return functional_call(self.models[task], {"0." + k: v for k, v in backbone.items()}, (batch["x"],))

    def features(self, task, backbone, batch):
        return functional_call(self.models[task][0], dict(backbone), (batch["x"],))

    def progress(self, iterable, desc, total=None):
        return iterable


def mlp():
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU())


def tiny_tasks(num_tasks=3, shots=64, seed=0, steps=150):
    """Experts fine-tuned from one random base, each on its own cluster of 2+t classes."""
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    base = mlp()
    centres = torch.randn(num_tasks, 8, generator=generator) * 3
    backbones, heads, batches = [], [], {}
    for t in range(num_tasks):
        classes = 2 + t
        prototypes = torch.randn(classes, 8, generator=generator)
        y = torch.randint(0, classes, (shots,), generator=generator)
        x = centres[t] + prototypes[y] + 0.5 * torch.randn(shots, 8, generator=generator)
        backbone, head = mlp(), nn.Linear(16, classes)
        backbone.load_state_dict(base.state_dict())
        optimizer = torch.optim.Adam([*backbone.parameters(), *head.parameters()], lr=1e-2)
        for _ in range(steps):
            loss = nn.functional.cross_entropy(head(backbone(x)), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        for p in [*backbone.parameters(), *head.parameters()]:
            p.requires_grad_(False)
        backbones.append(backbone)
        heads.append(head)
        half = shots // 2
        batches[f"t{t}"] = [{"x": x[:half], "labels": y[:half]}, {"x": x[half:], "labels": y[half:]}]
    return base, backbones, heads, batches


@pytest.fixture(scope="module")
def setup():
    return tiny_tasks()


def run(setup, **params):
    _, backbones, heads, batches = setup
    ctx = PlainContext(backbones, heads, batches)
    method = NeuLig(NeuLig.Params(**params), ctx.tasks)
    return ctx, method.merge_models(ctx)


def by_hand(states, weights):
    return {k: sum(float(w) * s[k] for w, s in zip(weights, states)) for k in states[0]}


# --------------------------------------------------------------------- the pieces
def test_offsets_match_the_direct_formula():
    generator = torch.Generator().manual_seed(1)
    states = [{"a": torch.randn(3, 4, generator=generator) + i, "b": torch.randn(5, generator=generator) * i}
              for i in range(4)]
    flat = np.stack([np.concatenate([s["a"].numpy().ravel(), s["b"].numpy().ravel()]) for s in states])
    xi = flat.astype(np.float64) - flat.astype(np.float64).mean(0)        # ξ_i = θ_i − mean_j θ_j
    sums = xi.sum(1)
    eps = (sums - sums.mean()) / np.std(sums)
    got = neulig.standardise(neulig.offset_sums(states, ["a", "b"]))
    np.testing.assert_allclose(neulig.offset_sums(states, ["a", "b"]).numpy(), sums, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(got.numpy(), eps, rtol=1e-9)
    assert abs(float(got.mean())) < 1e-12 and abs(float(got.std(unbiased=False)) - 1) < 1e-12
    assert torch.equal(neulig.standardise(torch.tensor([2.0])), torch.zeros(1))             # one expert
    assert torch.equal(neulig.standardise(torch.tensor([1.0, 1.0, 1.0])), torch.zeros(3))   # no spread


def test_router_rows_are_a_softmax_over_experts():
    router = Portland(3, 5, torch.Generator().manual_seed(0))
    features = torch.randn(7, 15)
    beta = router(features)
    assert beta.shape == (7, 3) and bool((beta > 0).all())
    torch.testing.assert_close(beta.sum(1), torch.ones(7))
    by_formula = torch.softmax(features @ router.linear.weight.T + router.linear.bias, dim=1)
    torch.testing.assert_close(beta, by_formula)
    zero = Portland(3, 5, init="zero")
    torch.testing.assert_close(zero(features), torch.full((7, 3), 1 / 3))
    rebuilt = Portland.from_artifacts({"router.weight": router.linear.weight, "router.bias": router.linear.bias})
    torch.testing.assert_close(rebuilt(features), beta)


def test_head_of_the_feature_ensemble_is_the_ensemble_of_logits():
    """METHODS.md: L_b reads the head applied to Σβ_i z_i; with an affine head and Σβ = 1 that is
    Σβ_i head(z_i), which the method computes from cached logits."""
    generator = torch.Generator().manual_seed(2)
    head = nn.Linear(6, 4)
    z = torch.randn(3, 5, 6, generator=generator)                    # T experts, N examples, d
    beta = torch.softmax(torch.randn(5, 3, generator=generator), 1)
    feature_ensemble = torch.einsum("nt,tnd->nd", beta, z)
    torch.testing.assert_close(neulig.ensemble_logits(beta, head(z)), head(feature_ensemble))


def test_losses_by_hand():
    logits = torch.tensor([[2.0, 0.0], [0.0, 0.0]])
    p = torch.softmax(logits, 1)
    entropy = float(-(p * p.log()).sum(1).mean())
    assert abs(float(neulig.boosting_loss(logits, None)) - entropy) < 1e-6
    ce = float(-(p[0, 0].log() + p[1, 1].log()) / 2)
    assert abs(float(neulig.boosting_loss(logits, torch.tensor([0, 1]))) - ce) < 1e-6
    beta = torch.tensor([[0.5, 0.25, 0.25], [0.1, 0.1, 0.8]])
    eps = torch.tensor([1.0, -2.0, 1.0])
    assert abs(float(neulig.alignment_loss(beta, eps)) - (0.25 ** 2 + 0.7 ** 2) / 2) < 1e-6
    assert torch.equal(neulig.batch_weights(beta, "first"), beta[0])
    torch.testing.assert_close(neulig.batch_weights(beta, "mean"), torch.tensor([0.3, 0.175, 0.525]))


def test_merging_weights_sum_to_one_equal_task_arithmetic_from_any_base(setup):
    base, backbones, _, _ = setup
    states = [b.state_dict() for b in backbones]
    base_state = base.state_dict()
    weights = torch.tensor([0.2, 0.5, 0.3])
    merged = neulig.merge_states(states, weights, list(base_state))
    for key, value in base_state.items():
        task_arithmetic = value + sum(float(w) * (s[key] - value) for w, s in zip(weights, states))
        torch.testing.assert_close(merged[key], task_arithmetic)


# --------------------------------------------------------------------- the method on the tiny setup
def test_alignment_loss_drives_beta_dot_epsilon_to_zero(setup):
    ctx, _ = PlainContext(*setup[1:]), None
    aligned = NeuLig(NeuLig.Params(align_weight=100.0, loss="cross_entropy", epochs=200)).fit(ctx)
    assert aligned.alignment_start > 0.05
    assert aligned.alignment_end < aligned.alignment_start / 100
    free = NeuLig(NeuLig.Params(align_weight=0.0, loss="cross_entropy", epochs=200)).fit(PlainContext(*setup[1:]))
    assert free.alignment_start == aligned.alignment_start          # same seeded router at the start
    assert free.alignment_end > 10 * aligned.alignment_end
    # β·ε by hand from the trained router, on all few-shot examples
    beta = torch.cat([aligned.router(d.features) for d in aligned.data.values()]).detach()
    by_hand_value = float(((beta.double() @ aligned.epsilon) ** 2).mean())
    assert abs(by_hand_value - aligned.alignment_end) < 1e-6


def test_per_task_mode_and_the_reported_gap(setup):
    ctx, result = run(setup, loss="cross_entropy", epochs=200)
    states = [ctx.expert_state(t) for t in ctx.tasks]
    stats = result.stats
    # the router's β̄ per task, by hand, and the models built from it
    router = Portland.from_artifacts(result.artifacts)
    for row, task in enumerate(ctx.tasks):
        features = torch.cat([torch.cat([ctx.features(e, {}, b) for e in ctx.tasks], 1) for b in ctx.batches(task)])
        with torch.no_grad():
            beta = router(features)
        torch.testing.assert_close(beta.sum(1), torch.ones(len(beta)))
        torch.testing.assert_close(result.artifacts["weights.per_task"][row], beta.mean(0))
        expected = by_hand(states, beta.mean(0))
        for key in ctx.merge_keys:
            torch.testing.assert_close(result.task_params[task][key], expected[key])
        # merged accuracy of this task's model, by running it
        with torch.no_grad():
            correct = sum(int((ctx.logits(task, expected, b).argmax(1) == b["labels"]).sum())
                          for b in ctx.batches(task))
        assert abs(stats["evaluation"]["modes"]["per_task"]["per_task"][task]["merged"] - correct / 64) < 1e-9
    global_w = result.artifacts["weights.per_task"].mean(0)
    torch.testing.assert_close(result.artifacts["weights.global"], global_w)
    expected_global = by_hand(states, global_w)
    for key in ctx.merge_keys:
        torch.testing.assert_close(result.params[key], expected_global[key])
    for mode, row in stats["evaluation"]["modes"].items():
        assert abs(row["gap"] - (row["ensemble_accuracy"] - row["merged_accuracy"])) < 1e-12, mode
        assert 0 <= row["agreement"] <= 1
    assert stats["merged_accuracy"] == stats["evaluation"]["modes"]["per_task"]["merged_accuracy"]
    assert stats["gap"] == stats["ensemble_accuracy"] - stats["merged_accuracy"]
    # the supervised router finds each input's expert: its ensemble is right on (nearly) every example,
    # and the per-task merge is close to it
    assert stats["ensemble_accuracy"] > 0.95 and stats["merged_accuracy"] > 0.9
    assert stats["loss_last_epoch"]["boosting"] < stats["loss_first_epoch"]["boosting"]
    json.dumps(stats)


def test_global_and_per_batch_modes_save_the_global_model(setup):
    for mode in ("global", "per_batch"):
        _, result = run(setup, model_mode=mode, epochs=20)
        assert result.task_params == {}
        assert set(result.artifacts) == {"router.weight", "router.bias", "epsilon", "weights.global",
                                         "weights.per_task"}
        assert result.stats["gap"] == result.stats["evaluation"]["modes"][mode]["gap"]


def test_per_batch_uses_each_batchs_first_example(setup):
    ctx, result = run(setup, model_mode="per_batch", epochs=20)
    router = Portland.from_artifacts(result.artifacts)
    states = [ctx.expert_state(t) for t in ctx.tasks]
    task = ctx.tasks[1]
    correct = 0
    with torch.no_grad():
        for batch in ctx.batches(task):
            beta = router(torch.cat([ctx.features(e, {}, batch) for e in ctx.tasks], 1))
            model = by_hand(states, beta[0])
            correct += int((ctx.logits(task, model, batch).argmax(1) == batch["labels"]).sum())
    assert abs(result.stats["evaluation"]["modes"]["per_batch"]["per_task"][task]["merged"] - correct / 64) < 1e-9


def test_uniform_router_without_training_is_weight_averaging(setup):
    ctx, result = run(setup, router_init="zero", epochs=0, model_mode="per_task")
    states = [ctx.expert_state(t) for t in ctx.tasks]
    for key in ctx.merge_keys:
        average = sum(s[key] for s in states) / 3
        torch.testing.assert_close(result.params[key], average)
        for task in ctx.tasks:
            torch.testing.assert_close(result.task_params[task][key], average)
    assert result.stats["alignment_start"] < 1e-12      # uniform β: Σβε = mean ε = 0


def test_one_expert_gives_that_expert(setup):
    _, backbones, heads, batches = setup
    ctx = PlainContext(backbones[:1], heads[:1], {"t0": batches["t0"]})
    result = NeuLig(NeuLig.Params(epochs=5)).merge_models(ctx)
    for key, value in backbones[0].state_dict().items():
        assert torch.equal(result.params[key], value)
        assert torch.equal(result.task_params["t0"][key], value)
    assert result.stats["gap"] == 0.0


def test_cross_entropy_without_labels_is_a_clear_error(setup):
    _, backbones, heads, batches = setup
    unlabelled = {t: [{"x": b["x"]} for b in bs] for t, bs in batches.items()}
    with pytest.raises(DataError, match="labels"):
        NeuLig(NeuLig.Params(loss="cross_entropy")).fit(PlainContext(backbones, heads, unlabelled))
    _, result = run((None, backbones, heads, unlabelled), epochs=5)       # entropy needs none
    assert result.stats["merged_accuracy"] is None and result.stats["gap"] is None
    assert 0 <= result.stats["agreement"] <= 1


def regression_setup(setup):
    """Task t0 becomes a regression task: a one-output head fitted to a float target on t0's inputs."""
    _, backbones, heads, batches = setup
    generator = torch.Generator().manual_seed(5)
    torch.manual_seed(5)
    head = nn.Linear(16, 1)
    inputs = torch.cat([b["x"] for b in batches["t0"]])
    targets = inputs[:, 0] - 0.5 * inputs[:, 1] + 0.1 * torch.randn(len(inputs), generator=generator)
    optimizer = torch.optim.Adam(head.parameters(), lr=1e-2)
    for _ in range(300):
        loss = nn.functional.mse_loss(head(backbones[0](inputs)).squeeze(-1), targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    head.requires_grad_(False)
    half = len(inputs) // 2
    regression = [{"x": inputs[:half], "labels": targets[:half]}, {"x": inputs[half:], "labels": targets[half:]}]
    return backbones, [head, *heads[1:]], {**batches, "t0": regression}


def test_boosting_loss_of_a_regression_head_is_the_squared_error():
    predictions = torch.tensor([[0.5], [2.0], [-1.0]], requires_grad=True)
    labels = torch.tensor([1.0, 1.0, 1.0])
    loss = neulig.boosting_loss(predictions, labels)
    assert float(loss.detach()) == pytest.approx((0.25 + 1.0 + 4.0) / 3)
    unlabelled = neulig.boosting_loss(predictions, None)        # no entropy of one output: no term
    unlabelled.backward()
    assert float(unlabelled.detach()) == 0.0 and torch.equal(predictions.grad, torch.zeros(3, 1))


@pytest.mark.parametrize("loss", ["cross_entropy", "entropy"])
def test_a_regression_expert_merges_beside_classifiers(setup, loss):
    backbones, heads, batches = regression_setup(setup)
    ctx = PlainContext(backbones, heads, batches)
    result = NeuLig(NeuLig.Params(epochs=40, loss=loss), ctx.tasks).merge_models(ctx)
    weights = result.artifacts["weights.per_task"]
    torch.testing.assert_close(weights.sum(1), torch.ones(3))
    # The regression task's in-sample score is the Pearson correlation of its merged model's predictions
    # with the float labels, computed here from the saved per-task weights.
    model = nn.Sequential(nn.Sequential(*mlp()), heads[0])
    model[0].load_state_dict(result.task_params["t0"])
    inputs = torch.cat([b["x"] for b in batches["t0"]])
    targets = torch.cat([b["labels"] for b in batches["t0"]])
    predictions = model(inputs).squeeze(-1).detach().double()
    expected = float(np.corrcoef(predictions.numpy(), targets.double().numpy())[0, 1])
    row = result.stats["evaluation"]["modes"]["per_task"]["per_task"]["t0"]
    assert row["merged"] == pytest.approx(expected, abs=1e-6)
    assert row["merged"] > 0.5                                  # the merged model still predicts the target


def test_supervised_regression_lowers_the_ensembles_squared_error(setup):
    """With labels the router learns to lower the squared error of t0's β-weighted prediction below the
    uniform start (router_init='zero'); computed here from the cached expert predictions."""
    backbones, heads, batches = regression_setup(setup)
    ctx = PlainContext(backbones, heads, batches)
    fit = NeuLig(NeuLig.Params(loss="cross_entropy", epochs=150, lr=1e-2, align_weight=0.0, router_init="zero"),
                 ctx.tasks).fit(ctx)
    data = fit.data["t0"]
    assert data.regression and data.labels.dtype == torch.float32

    def squared_error(beta):
        return float(((beta[:, :, None] * data.expert_logits.permute(1, 0, 2)).sum(1).squeeze(-1)
                      - data.labels).pow(2).mean())

    uniform = torch.full((len(data.labels), 3), 1 / 3)
    with torch.no_grad():
        trained = squared_error(fit.router(data.features))
    assert trained < 0.8 * squared_error(uniform)


# --------------------------------------------------------------------- end to end, tiny BERT experts
def bert_batches(num_tasks, generator):
    batches = {}
    for index in range(num_tasks):
        batches[f"task{index}"] = [
            {"input_ids": torch.randint(5, 99, (8, 12), generator=generator),
             "attention_mask": torch.ones(8, 12, dtype=torch.long),
             "labels": torch.randint(0, 2 + index, (8,), generator=generator)} for _ in range(2)]
    return batches


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    return build_family(tmp_path_factory.mktemp("neulig-bert"), "bert", n_experts=3)


def test_merge_end_to_end_per_task_output(bert, tmp_path):
    from safetensors.torch import load_file

    from layermerge.hf import load_task_model
    from layermerge.io import CheckpointReader

    base, experts = bert
    batches = bert_batches(3, torch.Generator().manual_seed(0))
    out = tmp_path / "merged"
    layermerge.merge(base, {k: str(v) for k, v in experts.items()}, "neulig", data=batches, output=out,
                     quiet=True, epochs=30, loss="cross_entropy")
    summary = json.loads((out / "layermerge_summary.json").read_text())["summary"]
    for key in ("merged_accuracy", "ensemble_accuracy", "gap", "evaluation", "epsilon"):
        assert key in summary
    assert summary["task_extras"] == "replace"
    artifacts = load_file(out / "neulig" / "artifacts.safetensors")
    weights = artifacts["weights.per_task"]
    torch.testing.assert_close(weights.sum(1), torch.ones(3))
    # task1's saved model = Σ β̄_i θ_i of the experts' backbones, and its accuracy is the reported one
    readers = [CheckpointReader(experts[f"task{i}"]) for i in range(3)]
    model = load_task_model(out, "task1")
    for name, tensor in model.bert.state_dict().items():
        if "position_ids" in name:
            continue
        expected = sum(float(w) * r.get("bert." + name).float() for w, r in zip(weights[1], readers))
        torch.testing.assert_close(tensor, expected, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        correct = sum(int((model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits.argmax(1)
                           == b["labels"]).sum()) for b in batches["task1"])
    reported = summary["evaluation"]["modes"]["per_task"]["per_task"]["task1"]["merged"]
    assert abs(reported - correct / 16) < 1e-9


def test_merge_end_to_end_one_expert_without_base(bert):
    from layermerge.io import CheckpointReader

    _, experts = bert
    batches = bert_batches(1, torch.Generator().manual_seed(1))
    merged = layermerge.merge(None, {"task0": str(experts["task0"])}, "neulig", data=batches, quiet=True,
                              epochs=3, model_mode="global")
    reader = CheckpointReader(experts["task0"])
    assert set(merged.state_dict) >= {k for k in reader.keys() if not k.startswith("classifier.")}
    for key, tensor in merged.state_dict.items():     # no base: the expert's own names are the merge keys
        assert torch.equal(tensor, reader.get(key)), key
    assert merged.summary["gap"] == 0.0


def test_merge_end_to_end_without_base_merges_the_experts_weights(bert):
    from layermerge.io import CheckpointReader

    _, experts = bert
    batches = bert_batches(3, torch.Generator().manual_seed(2))
    merged = layermerge.merge(None, {k: str(v) for k, v in experts.items()}, "neulig", data=batches, quiet=True,
                              epochs=5, model_mode="global", evaluate=False)
    weights = merged.artifacts["weights.global"]
    readers = [CheckpointReader(experts[f"task{i}"]) for i in range(3)]
    assert merged.state_dict and all(key.startswith("bert.") for key in merged.state_dict)
    for key, tensor in merged.state_dict.items():
        expected = sum(float(w) * r.get(key).float() for w, r in zip(weights, readers))
        torch.testing.assert_close(tensor, expected, rtol=1e-5, atol=1e-6)
    assert "evaluation" not in merged.summary and "epsilon" in merged.summary
