"""BatchNorm running statistics merge as the experts' mean, in every kind of method.

Five experts whose running variances are a tenth of the base's: Task Arithmetic's θ0 + 0.3 Σ τ_i
would give 1 + 1.5 × (0.1 − 1) = −0.35 × the base's variance — negative, every output NaN (seen on
five EfficientNet-Lite0 experts in the vision5 benchmark).
"""

from __future__ import annotations

import pytest
import torch

import layermerge
from layermerge.data.models import build_vision_model, get_vision_factory, save_vision_model, spec_for
from layermerge.norm_stats import is_running_statistic, mean_of_experts

pytestmark = pytest.mark.usefixtures("one_torch_thread")
TASKS = ["a", "b", "c", "d", "e"]
PLAN = {"embedding": [], "blocks": "features", "head": []}      # SmallCNN: every layer of `features` a block


@pytest.fixture(scope="module")
def bn_experts(tmp_path_factory):
    from conftest import perturb_

    root = tmp_path_factory.mktemp("bn")
    factory = get_vision_factory("small-cnn")
    spec = spec_for(factory, 3, 16)
    torch.manual_seed(0)
    base_model = build_vision_model(spec, pretrained=False)
    with torch.no_grad():
        for name, buffer in base_model.named_buffers():
            if name.endswith("running_var"):
                buffer.fill_(4.0)
    base = save_vision_model(base_model, spec, root / "base")
    experts, states = {}, []
    for index, task in enumerate(TASKS):
        model = build_vision_model(spec, pretrained=False)
        model.load_state_dict(base_model.state_dict())
        perturb_(model, seed=index, scale=0.05)
        with torch.no_grad():
            for name, buffer in model.named_buffers():
                if name.endswith("running_var"):
                    buffer.fill_(0.4 + 0.01 * index)
                elif name.endswith("running_mean"):
                    buffer.add_(0.1 * (index + 1))
        states.append({k: v.clone() for k, v in model.state_dict().items()})
        experts[task] = save_vision_model(model, spec, root / task)
    means = {key: mean_of_experts([s[key] for s in states]) for key in states[0] if is_running_statistic(key)}
    generator = torch.Generator().manual_seed(0)
    data = {task: [{"pixel_values": torch.randn(4, 3, 16, 16, generator=generator),
                    "labels": torch.tensor([0, 1, 2, 0])}] for task in TASKS}
    return base, experts, means, data


def test_names_and_mean():
    assert is_running_statistic("features.1.running_var") and is_running_statistic("bn.running_mean")
    assert not is_running_statistic("features.1.weight") and not is_running_statistic("bn.num_batches_tracked")
    assert torch.equal(mean_of_experts([torch.tensor([1.0, 2.0]), torch.tensor([3.0, 6.0])]), torch.tensor([2.0, 4.0]))


@pytest.mark.parametrize("method,params", [
    ("task_arithmetic", {}), ("ties", {}), ("dare_linear", {}), ("emr", {}), ("magmax", {}),
    ("prodistill", {"epochs": 1, "block_plan": PLAN}), ("regmean", {"others": "task_arithmetic", "block_plan": PLAN}),
    ("adamerging", {"steps": 2}),
    ("localize_stitch", {"steps": 2}), ("fisher", {}),
])
def test_running_statistics_are_the_experts_mean(bn_experts, method, params):
    base, experts, means, data = bn_experts
    info = layermerge.available_methods()[method]
    extra = {"data": data, "device": "cpu"} if info.needs_data else {}
    merged = layermerge.merge(base, experts, method=method, quiet=True, **extra, **params)
    assert means
    for key, expected in means.items():
        torch.testing.assert_close(merged.state_dict[key].float(), expected, rtol=1e-6, atol=1e-6)
        if key.endswith("running_var"):
            assert (merged.state_dict[key] > 0).all()


@pytest.mark.parametrize("method,params", [("neulig", {"epochs": 2, "loss": "cross_entropy"}),
                                           ("np_merge", {"epochs": 2, "align": "none"})])
def test_convex_methods_keep_their_own_valid_statistics(bn_experts, method, params):
    base, experts, means, data = bn_experts
    merged = layermerge.merge(base, experts, method=method, data=data, quiet=True, device="cpu", **params)
    for key in means:
        if key.endswith("running_var"):
            assert (merged.state_dict[key] > 0).all()
