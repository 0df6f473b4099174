"""PLeaS: a model merged with its permuted copy is the model again; the least-squares step against
numpy's lstsq (full matching, partial matching with its blocked inputs, and the official code's
"ensemble" inputs); merged-model widths and compute under partial matching and a budget; on two
independently trained tiny MLPs the merged model's feature error is no larger than aligned
averaging's; parameter errors; and the registered method through ``layermerge.merge`` without a base.
"""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import bn_net
from torch import nn

import layermerge
from layermerge.align import align, discover_spec, permute_model, random_perms
from layermerge.errors import ConfigError, DataError
from layermerge.methods.pleas import pleas_models

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _mlp(seed: int, sizes=(8, 16, 12, 3), norm: bool = False) -> nn.Module:
    torch.manual_seed(seed)
    layers = []
    for index, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(n_in, n_out))
        if index < len(sizes) - 2:
            layers += [nn.LayerNorm(n_out), nn.ReLU()] if norm else [nn.ReLU()]
    return nn.Sequential(*layers).eval()


def _inputs(count: int, *shape, seed: int = 0) -> torch.Tensor:
    return torch.randn(count, *shape, generator=torch.Generator().manual_seed(seed))


def _twin(model: nn.Module, example: torch.Tensor, seed: int = 4) -> nn.Module:
    spec = discover_spec(model, example)
    return permute_model(model, spec, random_perms(spec, torch.Generator().manual_seed(seed)))


def _out(model, x):
    with torch.no_grad():
        return model(x)


# --------------------------------------------------------------------- known answers
@pytest.mark.parametrize("align_method", ["activation", "weight"])
def test_merging_a_model_with_its_permuted_copy_returns_the_model(align_method):
    """The permutation is found (every tensor equal again) and the least squares reproduces the layers,
    for an MLP with LayerNorm and for a CNN whose convolutions are fitted through their BatchNorms."""
    for model, x in ((_mlp(0, norm=True), _inputs(64, 8)), (bn_net(0), _inputs(24, 1, 4, 4))):
        twin = _twin(model, x[:4])
        merged, result = pleas_models([model, twin], [x[:32], x[32:]], align=align_method)
        for key, tensor in model.state_dict().items():
            torch.testing.assert_close(merged.state_dict()[key], tensor, atol=1e-5, rtol=1e-5, msg=key)
        torch.testing.assert_close(_out(merged, x), _out(model, x), atol=1e-5, rtol=1e-5)
        assert result.stats["fitted_layers"] == 3 and result.stats["compute_ratio"] == 1.0
    # Partial matching of identical units keeps the function too (A's and B's kept units coincide).
    model = _mlp(0)
    x = _inputs(64, 8)
    merged, result = pleas_models([model, _twin(model, x[:4])], [x], match_ratio=0.5)
    assert merged[0].out_features == 24
    torch.testing.assert_close(_out(merged, x), _out(model, x), atol=1e-4, rtol=1e-4)


class _StaticSameConv(nn.Conv2d):
    """EfficientNet's Conv2dStaticSamePadding: a fixed, possibly asymmetric ZeroPad2d before the conv."""

    def __init__(self, *args, pads=(0, 1, 0, 1), **kwargs):
        super().__init__(*args, **kwargs)
        self.static_padding = nn.ZeroPad2d(pads)

    def forward(self, x):
        return F.conv2d(self.static_padding(x), self.weight, self.bias, self.stride, self.padding, self.dilation,
                        self.groups)


class _Identity(nn.Module):
    """The efficientnet package's own identity (its 1×1 convolutions' "padding")."""

    def forward(self, x):
        return x


def _pointwise_static(channels: int) -> nn.Conv2d:
    conv = _StaticSameConv(channels, channels, 1)
    conv.static_padding = _Identity()
    return conv


class _DoubledConv(nn.Conv2d):
    """A Conv2d subclass whose output is not a zero-padded convolution of its input."""

    def forward(self, x):
        return 2 * super().forward(x)


def test_conv2d_subclasses_with_static_padding_are_fitted_others_averaged():
    """The stride-2 conv with asymmetric static padding is fitted exactly as numpy's lstsq on its padded
    patches; a subclass that does something else is averaged, with a note."""
    torch.manual_seed(0)
    nets = [nn.Sequential(_StaticSameConv(2, 3, 3, stride=2), nn.ReLU(), _pointwise_static(3), nn.ReLU(),
                          _DoubledConv(3, 2, 1)).eval() for _ in range(2)]
    x = _inputs(6, 2, 7, 7)
    merged, result = pleas_models(nets, [x], align="none", ridge=0.0)
    assert [layer["layer"] for layer in result.stats["layers"]] == ["0", "2"]
    assert any("'4' averaged" in note and "_DoubledConv" in note for note in result.stats["notes"])
    patches = F.unfold(F.pad(x, (0, 1, 0, 1)), 3, stride=2).transpose(1, 2).reshape(-1, 18).double().numpy()
    targets = [_out(net[0], x).movedim(1, -1).reshape(-1, 3).double().numpy() for net in nets]
    expected = _lstsq(np.vstack([patches, patches]), np.vstack(targets))
    actual = np.vstack([merged[0].weight.detach().double().reshape(3, -1).numpy().T,
                        merged[0].bias.detach().double().numpy()[None]])
    np.testing.assert_allclose(actual, expected, rtol=1e-4, atol=1e-5)
    average = (nets[0][4].weight + nets[1][4].weight) / 2
    torch.testing.assert_close(merged[4].weight, average.detach())


def _lstsq(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Least squares with a bias column, numpy's: (inputs + 1) × outputs."""
    return np.linalg.lstsq(np.hstack([x, np.ones((len(x), 1))]), y, rcond=None)[0]


def _layer(merged: nn.Module, index: int) -> np.ndarray:
    layer = merged[index]
    return np.vstack([layer.weight.detach().double().numpy().T, layer.bias.detach().double().numpy()[None]])


def test_one_linear_layer_is_numpy_lstsq_on_stacked_features():
    """Σ_m ‖X W − Y_m‖² over both models = lstsq of the stacked system [X; X] → [Y_A; Y_B]."""
    torch.manual_seed(0)
    model_a, model_b = nn.Linear(6, 3), nn.Linear(6, 3)
    x = _inputs(40, 6)
    merged, result = pleas_models([model_a, model_b], [x], align="none", ridge=0.0)
    xs = x.double().numpy()
    expected = _lstsq(np.vstack([xs, xs]), np.vstack([_out(model_a, x).double().numpy(),
                                                      _out(model_b, x).double().numpy()]))
    actual = np.vstack([merged.weight.detach().double().numpy().T, merged.bias.detach().double().numpy()[None]])
    np.testing.assert_allclose(actual, expected, rtol=1e-4, atol=1e-5)
    assert result.stats["layers"][0]["error_pleas"] <= result.stats["layers"][0]["error_average"]


def test_partial_matching_least_squares_by_blocks_equals_numpy():
    """Three layers, half of each hidden group matched: each output unit is fitted to the models owning
    it, and a unit kept from one model reads only merged units and that model's kept units."""
    sizes = (5, 6, 4, 3)
    model_a, model_b = _mlp(1, sizes), _mlp(2, sizes)
    x = _inputs(80, 5, seed=3)
    merged, result = pleas_models([model_a, model_b], [x], match_ratio=0.5, ridge=0.0)
    layout0, layout2 = result.layouts["0"], result.layouts["2"]
    assert (layout0.width, layout2.width) == (9, 6)

    def relu(v):
        return np.maximum(v, 0)

    xs = x.double().numpy()
    a, b = (m.double() for m in (copy.deepcopy(model_a), copy.deepcopy(model_b)))
    with torch.no_grad():                                  # B's units moved to A's order
        h_a = a[0](x.double()).numpy()
        h_b = b[0](x.double()).numpy()[:, result.perms["0"].numpy()]
        b2 = b[2].weight.numpy()[:, result.perms["0"].numpy()][result.perms["2"].numpy()]
        b2_bias = b[2].bias.numpy()[result.perms["2"].numpy()]
        z_a = relu(h_a) @ a[2].weight.numpy().T + a[2].bias.numpy()
        z_b = relu(h_b) @ b2.T + b2_bias
        y_avg = (a(x.double()).numpy() + b(x.double()).numpy()) / 2

    def laid(pair, layout):
        m, s = layout.merged.numpy(), layout.separate.numpy()
        return np.hstack([(pair[0][:, m] + pair[1][:, m]) / 2, pair[0][:, s], pair[1][:, s]])

    # layer 0: the input is the data, no block constraint
    np.testing.assert_allclose(_layer(merged, 0), _lstsq(xs, laid((h_a, h_b), layout0)), rtol=1e-4, atol=1e-5)
    # layer 2: the merged model's own hidden features; kept units read only their model's inputs
    h = relu(np.hstack([xs, np.ones((len(xs), 1))]) @ _layer(merged, 0))
    target = laid((z_a, z_b), layout2)
    k0, s0, k2, s2 = len(layout0.merged), len(layout0.separate), len(layout2.merged), len(layout2.separate)
    expected = np.zeros((10, 6))
    expected[:, :k2] = _lstsq(h, target[:, :k2])
    for columns, inputs in ((slice(k2, k2 + s2), list(range(k0 + s0))),
                            (slice(k2 + s2, k2 + 2 * s2), list(range(k0)) + list(range(k0 + s0, k0 + 2 * s0)))):
        solution = _lstsq(h[:, inputs], target[:, columns])
        expected[inputs + [9], columns] = solution
    np.testing.assert_allclose(_layer(merged, 2), expected, rtol=1e-4, atol=1e-5)
    # layer 4: reads the merged hidden features, fitted to the average of the models' outputs
    h2 = relu(np.hstack([h, np.ones((len(h), 1))]) @ _layer(merged, 2))
    np.testing.assert_allclose(_layer(merged, 4), _lstsq(h2, y_avg), rtol=1e-4, atol=1e-5)
    # The official code's inputs: the models' permuted features, averaged where merged.
    ensemble, _ = pleas_models([model_a, model_b], [x], match_ratio=0.5, ridge=0.0, inputs="ensemble")
    np.testing.assert_allclose(_layer(ensemble, 4), _lstsq(laid((relu(z_a), relu(z_b)), layout2), y_avg),
                               rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------- shapes and budget
def test_full_matching_keeps_one_models_shapes():
    model_a, model_b = bn_net(0), bn_net(1)
    x = _inputs(16, 1, 4, 4)
    for options in ({}, {"budget": 1.0}, {"match_ratio": 1.0, "align": "weight"}):
        merged, result = pleas_models([model_a, model_b], [x], **options)
        assert {k: v.shape for k, v in merged.state_dict().items()} == {k: v.shape for k, v in
                                                                        model_a.state_dict().items()}
        assert all(g["width"] == g["units"] for g in result.stats["groups"].values())


def test_partial_matching_widths_compute_and_the_ensemble_end():
    model_a, model_b = _mlp(1), _mlp(2)
    x = _inputs(64, 8)
    merged, result = pleas_models([model_a, model_b], [x], match_ratio=0.25)
    # 16 units, 4 merged: 4 + 2·12 = 28; 12 units, 3 merged: 3 + 2·9 = 21
    assert [(m.in_features, m.out_features) for m in merged if isinstance(m, nn.Linear)] == [(8, 28), (28, 21),
                                                                                              (21, 3)]
    assert result.stats["groups"] == {"0": {"units": 16, "merged": 4, "width": 28},
                                      "2": {"units": 12, "merged": 3, "width": 21}}
    # compute: layer 2 loses the blocks joining one model's kept units to the other's (2 · 12 · 9)
    expected = (8 * 28 + 21 * 28 - 2 * 9 * 12 + 3 * 21) / (8 * 16 + 12 * 16 + 3 * 12)
    assert result.stats["compute_ratio"] == pytest.approx(expected, abs=1e-6)
    # A budget picks the smallest uniform ratio whose compute fits.
    _, budgeted = pleas_models([model_a, model_b], [x], budget=1.5)
    assert 1.4 < budgeted.stats["compute_ratio"] <= 1.5
    # Nothing merged: both models side by side, and the fit reproduces the average of their outputs.
    ensemble, result = pleas_models([model_a, model_b], [x], match_ratio=0.0)
    assert result.stats["compute_ratio"] == pytest.approx(2.0)
    torch.testing.assert_close(_out(ensemble, x), (_out(model_a, x) + _out(model_b, x)) / 2, atol=1e-4, rtol=1e-4)


def test_partial_matching_keeps_the_units_that_disagree():
    model = _mlp(0)
    x = _inputs(64, 8)
    other = copy.deepcopy(model)
    changed = [2, 7, 11, 13]
    with torch.no_grad():
        other[0].weight[changed] = torch.randn(4, 8, generator=torch.Generator().manual_seed(9))
    twin = _twin(other, x[:4], seed=6)
    _, result = pleas_models([model, twin], [x], match_ratio={"0": 0.75, "2": 1.0})
    assert result.layouts["0"].separate.tolist() == changed
    assert result.layouts["2"].separate.numel() == 0


# --------------------------------------------------------------------- two trained models
def _toy_task():
    """The same task whatever ran before: the teacher's initialisation does not read the global RNG."""
    generator = torch.Generator().manual_seed(0)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        teacher = nn.Sequential(nn.Linear(10, 32), nn.Tanh(), nn.Linear(32, 4))
    x = torch.randn(448, 10, generator=generator)
    with torch.no_grad():
        return x, teacher(x).argmax(1)


def _trained(seed: int, x, y) -> nn.Module:
    model = _mlp(seed, (10, 24, 24, 4))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(150):
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


def test_feature_error_is_not_above_aligned_averaging():
    """NP Merge's starting point (activation-aligned average) against PLeaS with the same alignment:
    every layer's fit is no worse than the average's on the same inputs (a least-squares guarantee),
    and the merged model's outputs are closer to the two models' mean output on the few-shot data."""
    x, y = _toy_task()
    models = [_trained(seed, x[:384], y[:384]) for seed in (1, 2)]
    few = x[384:]
    aligned, _ = align(models[0], models[1], method="activation", batches=[few])
    average = copy.deepcopy(models[0])
    average.load_state_dict({k: (v + aligned.state_dict()[k]) / 2 for k, v in models[0].state_dict().items()})
    merged, result = pleas_models(models, [few])
    ensemble = (_out(models[0], few) + _out(models[1], few)) / 2

    def error(model):
        return float(((_out(model, few) - ensemble) ** 2).mean())

    print(f"few-shot output error: aligned average {error(average):.4f}, PLeaS {error(merged):.4f}")
    assert error(merged) < 0.5 * error(average)
    for layer in result.stats["layers"]:
        assert layer["error_pleas"] <= layer["error_average"] + 1e-9, layer
    # The first layer's fit is the average itself (one linear map of the shared input), so the second
    # layer's "average" error is the aligned average's own there, computed here by hand.
    assert result.stats["layers"][0]["error_average"] == pytest.approx(0, abs=1e-9)
    with torch.no_grad():
        target = (models[0][2](models[0][1](models[0][0](few))) + aligned[2](aligned[1](aligned[0](few)))) / 2
        residual = average[2](average[1](average[0](few))) - target
        by_hand = float((residual ** 2).sum() / (target ** 2).sum())
    assert by_hand > 0.01
    assert result.stats["layers"][1]["error_average"] == pytest.approx(by_hand, rel=1e-3)


# --------------------------------------------------------------------- errors
def test_parameters_are_validated():
    model_a, model_b = _mlp(1), _mlp(2)
    x = _inputs(16, 8)
    cases = [({"match_ratio": 1.5}, "match_ratio"), ({"budget": 2.5}, "budget"), ({"budget": 0.5}, "budget"),
             ({"budget": 1.5, "match_ratio": 0.5}, "not both"), ({"align": "magic"}, "align"),
             ({"inputs": "teacher"}, "inputs"), ({"ridge": -1.0}, "ridge"),
             ({"match_ratio": {"nope": 0.5}}, "nope"), ({"match_ratio": {"0": -0.1}}, "group '0'")]
    for options, message in cases:
        with pytest.raises(ConfigError, match=message):
            pleas_models([model_a, model_b], [x], **options)
    with pytest.raises(ConfigError, match="exactly two"):
        pleas_models([model_a, model_b, _mlp(3)], [x])
    with pytest.raises(DataError, match="few-shot"):
        pleas_models([model_a, model_b], [])
    depthwise = [nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3, groups=4), nn.Flatten(),
                               nn.Linear(4 * 2 * 2, 3)).eval() for _ in range(2)]
    with pytest.raises(ConfigError, match="only Linear, Conv2d"):
        pleas_models(depthwise, [_inputs(8, 1, 6, 6)], match_ratio=0.5)
    pleas_models(depthwise, [_inputs(8, 1, 6, 6)])            # full matching works on it


# --------------------------------------------------------------------- through layermerge.merge, no base
def _save_small_cnn(model: nn.Module, folder):
    from layermerge.data.models import get_vision_factory, save_vision_model, spec_for

    return save_vision_model(model, spec_for(get_vision_factory("small-cnn"), 10), folder)


def test_registered_method_without_a_base(tmp_path):
    from layermerge.data.models import SmallCNN, load_vision_model
    from layermerge.methods.registry import get_method

    info = get_method("pleas")
    assert (info.kind, info.needs_base, info.needs_data, info.min_experts, info.max_experts) == (
        "model", False, True, 2, 2)
    torch.manual_seed(0)
    model = SmallCNN(10).eval()
    model.features[1].running_mean.normal_()
    model.features[1].running_var.uniform_(0.5, 2.0)
    x = _inputs(16, 3, 16, 16, seed=5)
    batches = [{"pixel_values": x, "labels": torch.randint(0, 10, (16,))}]
    twin = _twin(model, x, seed=2)
    folders = {"a": _save_small_cnn(model, tmp_path / "a"), "b": _save_small_cnn(twin, tmp_path / "b")}
    data = {"a": batches, "b": batches}
    out = tmp_path / "merged"
    layermerge.merge(None, folders, method="pleas", data=data, output=out, quiet=True)
    loaded, _ = load_vision_model(out)
    torch.testing.assert_close(_out(loaded, x), _out(model, x), atol=1e-4, rtol=1e-4)
    summary = json.loads((out / "layermerge_summary.json").read_text())["summary"]
    assert summary["fitted_layers"] == 3 and summary["permutation_groups"] == 2
    # Two different networks: the output loads, and every layer's fit beats the aligned average's.
    torch.manual_seed(1)
    folders["b"] = _save_small_cnn(SmallCNN(10).eval(), tmp_path / "c")
    other = layermerge.merge(None, folders, method="pleas", data=data, output=tmp_path / "merged2", quiet=True)
    load_vision_model(tmp_path / "merged2")
    assert all(layer["error_pleas"] <= layer["error_average"] + 1e-9 for layer in other.summary["layers"])
    with pytest.raises(ConfigError, match="partial matching"):
        layermerge.merge(None, folders, method="pleas", data=data, match_ratio=0.5, quiet=True)
    with pytest.raises(ConfigError, match="parameter 'budget'"):
        layermerge.merge(None, folders, method="pleas", data=data, budget=3.0, quiet=True)
    torch.manual_seed(2)
    third = _save_small_cnn(SmallCNN(10).eval(), tmp_path / "d")
    with pytest.raises(ConfigError, match="exactly 2 experts"):
        layermerge.merge(None, {**folders, "d": third}, method="pleas", data={**data, "d": batches}, quiet=True)


def test_registered_method_on_text_experts(tmp_path):
    """Tiny BERT classifiers with their own heads: attention heads and feed-forward units are aligned,
    every Linear of the backbone is fitted on real (unpadded) tokens, and the output loads."""
    from conftest import build_family

    from layermerge.hf import load_task_model
    from layermerge.io.reader import CheckpointReader

    _, experts = build_family(tmp_path, "bert", n_experts=2)
    generator = torch.Generator().manual_seed(0)
    mask = torch.ones(4, 10, dtype=torch.long)
    mask[:, 8:] = 0
    data = {task: [{"input_ids": torch.randint(5, 99, (4, 10), generator=generator), "attention_mask": mask,
                    "labels": torch.tensor([0, 1, 1, 0])}] for task in experts}
    out = tmp_path / "merged"
    merged = layermerge.merge(None, experts, "pleas", data=data, output=out, quiet=True)
    summary = merged.summary
    assert summary["permutation_groups"] == 4 and summary["fitted_layers"] == 13    # 2 × 6 + pooler
    for layer in summary["layers"]:
        assert layer["error_pleas"] <= layer["error_average"] + 1e-9, layer
        if "encoder" in layer["layer"]:
            assert layer["rows"] == 2 * 4 * 8                     # both tasks' real tokens only
    model = load_task_model(out, "task1")                   # the merged backbone with task1's head
    batch = data["task1"][0]
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert logits.shape == (4, 3) and torch.isfinite(logits).all()
    encoder = "bert.encoder.layer.0.output.dense.weight"
    assert encoder in CheckpointReader(out).keys()
