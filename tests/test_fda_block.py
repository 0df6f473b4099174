"""FDA block by block (methods/fda_block.py): the paper's own form on the block engine.

The anchor construction and the fit are fda.py's core, tested there against autograd and closed forms;
here: the anchors' extra arguments, the documented starting points, that construction aligns each
block's gradient with its task vector and fitting lowers the anchors' distance, token and image blocks,
determinism."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import perturbed
from torch import nn

from layermerge.engine import StateDictSource, run_engine, task_arithmetic_tensor
from layermerge.methods.fda_block import one_example_extras
from layermerge.methods.registry import get_method

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def llama_setup():
    from transformers import AutoConfig, AutoModel

    torch.manual_seed(0)
    config = AutoConfig.for_model(model_type="llama", vocab_size=99, hidden_size=32, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, intermediate_size=48)
    base = AutoModel.from_config(config).eval()
    experts = {task: perturbed(base, index + 1) for index, task in enumerate(("a", "b"))}
    data = {task: [{"input_ids": torch.randint(0, 99, (4, 12), generator=torch.Generator().manual_seed(index)),
                    "attention_mask": torch.tensor([[1] * 12, [1] * 12, [1] * 9 + [0] * 3, [1] * 6 + [0] * 6])}]
            for index, task in enumerate(experts)}
    return base, experts, data


def merge(base, experts, data, **params):
    info = get_method("fda_block")
    method = info.cls(info.params_model(**params), list(experts))
    return run_engine(copy.deepcopy(base), StateDictSource.from_models(base, experts), data, method,
                      scaling=method.non_block_scaling(len(experts)), seed=3)


def test_extras_are_cut_to_one_example_and_broadcast_over_anchors():
    mask = torch.arange(12).reshape(4, 1, 3)
    rotary = (torch.ones(4, 3, 2), torch.zeros(4, 3, 2))
    args, kwargs = one_example_extras(((mask, 7), {"position_embeddings": rotary, "shared": torch.ones(2, 2)}),
                                      size=4, example=2)
    assert torch.equal(args[0], mask[2:3]) and args[1] == 7
    assert kwargs["position_embeddings"][0].shape == (1, 3, 2) and kwargs["shared"].shape == (2, 2)


def test_no_fitting_leaves_the_documented_start():
    """merge_epochs 0: the base's weights everywhere (start base), or Task Arithmetic's bit for bit."""
    base, experts, data = llama_setup()
    from_base = merge(base, experts, data, anchors=4, anchor_steps=1, merge_epochs=0)
    for key, tensor in base.state_dict().items():
        assert torch.equal(from_base.state_dict[key], tensor.float()), key
    from_ta = merge(base, experts, data, anchors=4, anchor_steps=1, merge_epochs=0, start="task_arithmetic")
    states = [expert.state_dict() for expert in experts.values()]
    for key, tensor in base.state_dict().items():
        expected = task_arithmetic_tensor(tensor.float(), [s[key].float() for s in states], 0.3)
        assert torch.equal(from_ta.state_dict[key], expected), key


def test_anchors_align_the_gradient_with_the_task_vector_and_the_fit_follows_them():
    base, experts, data = llama_setup()
    result = merge(base, experts, data, anchors=8, anchor_steps=40, merge_epochs=20, start="task_arithmetic")
    assert len(result.block_stats) == 2
    for stats in result.block_stats:
        assert stats["anchor_shape"] == [12, 32]          # one example's tokens x width
        for record in stats["alignment"].values():
            assert record["cosine_best"] > record["cosine_first"] + 0.1, record
        assert stats["loss_final"] < 0.8 * stats["loss_start"], stats


class ConvNet(nn.Module):
    """A stem, then two blocks of conv (+ BatchNorm with ``norm``) and ReLU: the engine's blocks."""

    def __init__(self, norm: bool = False):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Conv2d(4, 4, 3, padding=1),
                                                  *([nn.BatchNorm2d(4)] if norm else []), nn.ReLU())
                                    for _ in range(2))

    def forward(self, x):
        x = self.stem(x)
        for block in self.blocks:
            x = block(x)
        return x


def test_image_blocks_take_feature_map_anchors():
    torch.manual_seed(0)
    base = ConvNet().eval()
    experts = {task: perturbed(base, index + 1) for index, task in enumerate(("a", "b"))}
    data = {task: [{"x": torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(index))}]
            for index, task in enumerate(experts)}
    result = merge(base, experts, data, anchors=4, anchor_steps=20, merge_epochs=5, start="task_arithmetic")
    assert result.block_stats[0]["anchor_shape"] == [4, 6, 6]
    assert result.block_stats[0]["merge_lr"] == 1e-2


def test_batchnorm_blocks_fit_weights_and_keep_the_experts_mean_statistics():
    """Running statistics are not weights: no gradient is aligned or fitted on them (torch refuses one),
    and the merged block keeps the experts' mean, as every other method's output does."""
    torch.manual_seed(0)
    base = ConvNet(norm=True).eval()
    experts = {task: perturbed(base, index + 1) for index, task in enumerate(("a", "b"))}
    for index, expert in enumerate(experts.values()):         # statistics the experts learned apart
        for module in expert.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.fill_(0.1 * (index + 1))
                module.running_var.fill_(1.0 + index)
    data = {task: [{"x": torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(index))}]
            for index, task in enumerate(experts)}
    result = merge(base, experts, data, anchors=4, anchor_steps=5, merge_epochs=3, init_scale=1.0)
    for block in range(2):
        stats = result.block_stats[block]
        assert stats["loss_final"] < stats["loss_start"]
        assert all(record["cosine_best"] > record["cosine_first"] for record in stats["alignment"].values())
        prefix = f"blocks.{block}.1."
        assert torch.allclose(result.state_dict[prefix + "running_mean"], torch.full((4,), 0.15))
        assert torch.allclose(result.state_dict[prefix + "running_var"], torch.full((4,), 1.5))
        weight = f"blocks.{block}.0.weight"
        assert not torch.equal(result.state_dict[weight], base.state_dict()[weight])


def test_deterministic_for_a_seed():
    base, experts, data = llama_setup()
    first = merge(base, experts, data, anchors=4, anchor_steps=5, merge_epochs=2)
    second = merge(base, experts, data, anchors=4, anchor_steps=5, merge_epochs=2)
    assert all(torch.equal(first.state_dict[k], second.state_dict[k]) for k in first.state_dict)
