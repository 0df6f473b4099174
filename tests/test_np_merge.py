"""NP Merge: known answers on tiny models, BatchNorm reset against a hand computation, the method through
``layermerge.merge`` (no base model), and the real-data claim on scikit-learn's digits: aligned NP Merge
of two MLPs trained from different seeds beats plain and aligned averaging on a held-out split.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import bn_net
from torch import nn

import layermerge
import layermerge.methods.np_merge  # noqa: F401  (registers the method)
from layermerge.align import ModuleRunner, align, discover_spec, permute_model, random_perms, reset_batchnorm
from layermerge.errors import ConfigError, DataError
from layermerge.methods.np_merge import np_merge_models

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _mlp(seed: int, width: int = 16) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(),
                         nn.Linear(width, 10)).eval()


def _labelled(count: int, seed: int, shape=(1, 4, 4), classes: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(count, *shape, generator=generator), torch.randint(0, classes, (count,), generator=generator)


# --------------------------------------------------------------------- known answers
def test_frozen_alpha_is_plain_interpolation():
    models = [_mlp(1), _mlp(2), _mlp(3)]
    batches = [(torch.randn(8, 64), torch.randint(0, 10, (8,)))]
    states = [m.state_dict() for m in models]
    merged, result = np_merge_models(models[:2], batches, align="none", epochs=0, init=0.3, reset_bn=False)
    for key, tensor in merged.state_dict().items():
        torch.testing.assert_close(tensor, 0.3 * states[0][key] + 0.7 * states[1][key])
    assert result.stats["steps"][0]["alpha_mean"] == [pytest.approx(0.3)]
    merged, _ = np_merge_models(models, batches, align="none", mode="softmax", epochs=0, reset_bn=False)
    for key, tensor in merged.state_dict().items():
        torch.testing.assert_close(tensor, sum(s[key] for s in states) / 3)
    # Successive pairwise merges with frozen α = ½: ((A + B)/2 + C)/2.
    merged, _ = np_merge_models(models, batches, align="none", epochs=0, reset_bn=False)
    for key, tensor in merged.state_dict().items():
        torch.testing.assert_close(tensor, (states[0][key] + states[1][key]) / 4 + states[2][key] / 2)


def test_first_adam_step_follows_the_hand_gradient():
    """One Adam step moves a by −lr·sign(∂L/∂a), with ∂L/∂a = ∂L/∂W ⊙ (W_A − W_B) ⊙ σ'(0) by hand."""
    torch.manual_seed(0)
    model_a, model_b = nn.Linear(4, 3), nn.Linear(4, 3)
    x, y = torch.randn(6, 4), torch.tensor([0, 1, 2, 0, 1, 2])
    weight = (model_a.weight + model_b.weight).detach() / 2
    bias = (model_a.bias + model_b.bias).detach() / 2
    probs = torch.softmax(x @ weight.T + bias, dim=1)
    dlogits = (probs - F.one_hot(y, 3).float()) / len(y)
    grad = (dlogits.T @ x) * (model_a.weight - model_b.weight).detach() * 0.25
    lr = 0.1
    _, result = np_merge_models([model_a, model_b], [(x, y)], align="none", lr=lr, epochs=1, reset_bn=False)
    alpha = result.alphas[0]["weight"]
    torch.testing.assert_close(alpha, torch.sigmoid(-lr * torch.sign(grad)), atol=1e-5, rtol=0)


def test_merging_a_model_with_its_permuted_copy_returns_the_model():
    model = bn_net(0)
    x, y = _labelled(16, 0)
    spec = discover_spec(model, x)
    twin = permute_model(model, spec, random_perms(spec, torch.Generator().manual_seed(4)))
    for method in ("weight", "activation"):
        merged, result = np_merge_models([model, twin], [(x, y)], align=method, epochs=0, reset_bn=False)
        for key, tensor in model.state_dict().items():
            torch.testing.assert_close(merged.state_dict()[key].to(tensor.dtype), tensor, msg=f"{method} {key}")
        assert result.stats["permutation_groups"] == 2


def test_batchnorm_reset_matches_a_hand_computation():
    model = bn_net(0)
    batches = [_labelled(12, seed) for seed in (1, 2)]
    before = copy.deepcopy(model.state_dict())
    state = reset_batchnorm(model.state_dict(), [(ModuleRunner(model), batches)])
    _assert_state_unchanged(model, before)             # the caller's tensors are never touched
    sums = {name: [0, 0] for name in ("bn1", "bn2")}
    for x, _ in batches:                               # BatchNorm in training mode, written out
        h1 = F.conv2d(x, model.conv1.weight, model.conv1.bias, padding=1)
        n1 = (h1 - h1.mean((0, 2, 3), keepdim=True)) / (h1.var((0, 2, 3), unbiased=False, keepdim=True)
                                                        + model.bn1.eps).sqrt()
        n1 = n1 * model.bn1.weight[:, None, None] + model.bn1.bias[:, None, None]
        h2 = F.conv2d(torch.relu(n1), model.conv2.weight, model.conv2.bias, padding=1)
        for name, h in (("bn1", h1), ("bn2", h2)):
            sums[name][0] = sums[name][0] + h.mean((0, 2, 3))
            sums[name][1] = sums[name][1] + h.var((0, 2, 3), unbiased=True)
    for name, (mean_sum, var_sum) in sums.items():
        torch.testing.assert_close(state[f"{name}.running_mean"], (mean_sum / 2).detach())
        torch.testing.assert_close(state[f"{name}.running_var"], (var_sum / 2).detach())
        assert not torch.allclose(state[f"{name}.running_mean"], before[f"{name}.running_mean"])
    assert int(state["bn1.num_batches_tracked"]) == 2
    torch.testing.assert_close(state["conv1.weight"], before["conv1.weight"])


def _assert_state_unchanged(model: nn.Module, before: dict) -> None:
    for key, tensor in model.state_dict().items():
        assert torch.equal(tensor, before[key]), key


def test_np_merge_resets_batchnorm_and_trains():
    models = [bn_net(0), bn_net(1)]
    x, y = _labelled(32, 3)
    merged, result = np_merge_models(models, [(x[:16], y[:16]), (x[16:], y[16:])], align="weight", lr=0.05,
                                     epochs=5)
    step = result.stats["steps"][0]
    assert step["loss_last_epoch"] < step["loss_first_epoch"]
    assert step["alpha_std"][0] > 0                               # α moved away from ½, element by element
    expected = reset_batchnorm(merged.state_dict(), [(ModuleRunner(merged), [(x[:16], y[:16]), (x[16:], y[16:])])])
    torch.testing.assert_close(merged.state_dict()["bn2.running_var"], expected["bn2.running_var"])
    # Without the reset the statistics are interpolated like the weights at the start, and training
    # (BatchNorm on batch statistics) touches neither them nor the input models.
    before = [copy.deepcopy(m.state_dict()) for m in models]
    merged, _ = np_merge_models(models, [(x, y)], align="none", epochs=3, reset_bn=False)
    for key in ("bn1.running_mean", "bn2.running_var"):
        torch.testing.assert_close(merged.state_dict()[key], (before[0][key] + before[1][key]) / 2)
    for model, state in zip(models, before):
        _assert_state_unchanged(model, state)


def test_running_batchnorm_trains_on_the_statistics_the_output_keeps():
    """batchnorm='running': BatchNorm stays in eval mode on the models' mean statistics, so the first
    epoch's loss is the eval-mode loss of the starting model (by hand), and the output keeps those
    statistics (also through successive pairwise merges, whose running mean weighs the merge so far)."""
    models = [bn_net(0), bn_net(1), bn_net(2)]
    states = [copy.deepcopy(m.state_dict()) for m in models]
    batches = [_labelled(8, 5), _labelled(8, 6)]
    start = copy.deepcopy(models[0])
    start.load_state_dict({k: (sum(s[k] for s in states) / 3 if v.is_floating_point() else v)
                           for k, v in states[0].items()})
    with torch.no_grad():
        eval_loss = sum(float(F.cross_entropy(start.eval()(x), y)) for x, y in batches) / 2
    for batchnorm in ("running", "batch"):
        _, result = np_merge_models(models, batches, align="none", mode="softmax", lr=1e-12, epochs=1,
                                    reset_bn=False, batchnorm=batchnorm)
        first = result.stats["steps"][0]["loss_first_epoch"]
        if batchnorm == "running":
            assert first == pytest.approx(eval_loss, rel=1e-5)
        else:                                                     # batch statistics: another loss
            assert abs(first - eval_loss) > 1e-3
    for mode in ("softmax", "pairwise"):
        merged, _ = np_merge_models(models, batches, align="none", mode=mode, lr=0.05, epochs=2, reset_bn=False,
                                    batchnorm="running")
        for key in ("bn1.running_mean", "bn2.running_var"):
            torch.testing.assert_close(merged.state_dict()[key], sum(s[key] for s in states) / 3, msg=f"{mode} {key}")
    for model, state in zip(models, states):
        _assert_state_unchanged(model, state)
    with pytest.raises(ConfigError, match="batchnorm"):
        np_merge_models(models, batches, align="none", batchnorm="frozen")


def test_errors():
    model = _mlp(0)
    with pytest.raises(ConfigError, match="at least two models"):
        np_merge_models([model], [(torch.randn(2, 64), torch.zeros(2, dtype=torch.long))])
    with pytest.raises(DataError, match="labels"):
        np_merge_models([model, _mlp(1)], [{"input": torch.randn(2, 64)}], align="none")
    with pytest.raises(ConfigError, match="strictly between 0 and 1"):
        np_merge_models([model, _mlp(1)], [(torch.randn(2, 64), torch.zeros(2, dtype=torch.long))], align="none",
                        init=1.0)
    with pytest.raises(ConfigError, match="align must be"):
        np_merge_models([model, _mlp(1)], [(torch.randn(2, 64), torch.zeros(2, dtype=torch.long))], align="magic")


# --------------------------------------------------------------------- through layermerge.merge, no base
def _save_small_cnn(model: nn.Module, folder):
    from layermerge.data.models import get_vision_factory, save_vision_model, spec_for

    return save_vision_model(model, spec_for(get_vision_factory("small-cnn"), 10), folder)


def test_registered_method_without_a_base(tmp_path):
    from layermerge.data.models import SmallCNN
    from layermerge.methods.registry import get_method

    info = get_method("np_merge")
    assert (info.kind, info.needs_base, info.needs_data) == ("model", False, True)
    torch.manual_seed(0)
    model = SmallCNN(10).eval()
    model.features[1].running_mean.normal_()
    model.features[1].running_var.uniform_(0.5, 2.0)
    x, y = _labelled(8, 5, shape=(3, 16, 16), classes=10)
    batches = [{"pixel_values": x, "labels": y}]
    spec = discover_spec(model, x)
    twin = permute_model(model, spec, random_perms(spec, torch.Generator().manual_seed(2)))
    folders = {"a": _save_small_cnn(model, tmp_path / "a"), "b": _save_small_cnn(twin, tmp_path / "b")}
    data = {"a": batches, "b": batches}
    merged = layermerge.merge(None, folders, "np_merge", data=data, epochs=0, reset_bn=False, quiet=True)
    for key, tensor in model.state_dict().items():
        if tensor.is_floating_point():
            torch.testing.assert_close(merged.state_dict[key].float(), tensor, msg=key)
    plain = layermerge.merge(None, folders, "np_merge", data=data, align="none", epochs=0, reset_bn=False,
                             quiet=True)
    torch.testing.assert_close(plain.state_dict["features.0.weight"],
                               (model.state_dict()["features.0.weight"] + twin.state_dict()["features.0.weight"]) / 2)
    trained = layermerge.merge(None, folders, "np_merge", data=data, epochs=2, lr=0.05, save_alpha=True, quiet=True)
    assert trained.summary["steps"][0]["loss_first_epoch"] is not None
    assert "0/features.0.weight" in trained.artifacts


def test_registered_method_on_text_experts(tmp_path):
    """Tiny BERT classifiers with different heads: the backbone is merged, heads stay per task; with α
    frozen at ½ and no alignment the result is the average; activation matching finds the layers' groups."""
    from conftest import build_family

    from layermerge.io.reader import CheckpointReader

    _, experts = build_family(tmp_path, "bert", n_experts=2)
    generator = torch.Generator().manual_seed(0)
    data = {task: [{"input_ids": torch.randint(5, 99, (4, 10), generator=generator),
                    "attention_mask": torch.ones(4, 10, dtype=torch.long), "labels": torch.tensor([0, 1, 1, 0])}]
            for task in experts}
    merged = layermerge.merge(None, experts, "np_merge", data=data, align="none", epochs=0, quiet=True)
    readers = [CheckpointReader(folder) for folder in experts.values()]
    assert merged.state_dict
    for key, tensor in merged.state_dict.items():
        if tensor.is_floating_point():
            torch.testing.assert_close(tensor, (readers[0].get(key) + readers[1].get(key)) / 2, msg=key)
    trained = layermerge.merge(None, experts, "np_merge", data=data, align="activation", epochs=2, quiet=True)
    assert trained.summary["permutation_groups"] == 4                 # 2 layers x (FFN units, heads)
    assert trained.summary["steps"][0]["loss_last_epoch"] is not None


# --------------------------------------------------------------------- real data: digits, two seeds
def _digits():
    from sklearn.datasets import load_digits

    images, labels = load_digits(return_X_y=True)
    x = torch.tensor(images / 16.0, dtype=torch.float32)
    y = torch.tensor(labels)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    return x[order[:1200]], y[order[:1200]], x[order[1200:]], y[order[1200:]]


def _train(model: nn.Module, x, y, seed: int, epochs: int = 20) -> nn.Module:
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=generator)
        for start in range(0, len(x), 32):
            index = order[start:start + 32]
            loss = F.cross_entropy(model(x[index]), y[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return model.eval()


def _accuracy(model, x, y) -> float:
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


def _average(models) -> nn.Module:
    merged = copy.deepcopy(models[0])
    merged.load_state_dict({k: sum(m.state_dict()[k] for m in models) / len(models) for k in merged.state_dict()})
    return merged


def test_digits_np_merge_beats_plain_and_aligned_averaging():
    x, y, x_test, y_test = _digits()
    models = [_train(_mlp(seed), x, y, seed) for seed in (1, 2)]
    labelled = [(x[i:i + 50], y[i:i + 50]) for i in range(0, 200, 50)]     # 200 labelled training examples
    plain = _accuracy(_average(models), x_test, y_test)
    aligned = {method: _accuracy(_average([models[0], align(models[0], models[1], method=method, example=x[:4],
                                                            batches=[x])[0]]), x_test, y_test)
               for method in ("weight", "activation")}
    merged, _ = np_merge_models(models, labelled, align="weight", lr=0.05, epochs=30)
    np_merge = _accuracy(merged, x_test, y_test)
    experts = [_accuracy(m, x_test, y_test) for m in models]
    print(f"digits: experts {experts}, plain {plain:.3f}, aligned {aligned}, NP Merge {np_merge:.3f}")
    assert min(experts) > 0.9
    assert np_merge > max(aligned.values()) > plain
