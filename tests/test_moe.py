"""Mixture-of-experts models: transformers fuses each layer's per-expert matrices into one tensor at load
time, the checkpoints keep them apart. Reading assembles the module's tensors exactly as transformers
does, writing splits them back, and every method works on the checkpoint's own layout."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import save_with_experts
from safetensors.torch import load_file

import layermerge
from layermerge.engine import StateDictSource
from layermerge.engine.diagnostics import block_errors
from layermerge.engine.layouts import fused_layouts
from layermerge.errors import IncompatibleExpertsError

pytestmark = pytest.mark.usefixtures("one_torch_thread")

MOE = {
    "mixtral": dict(model_type="mixtral", vocab_size=99, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2),
    "qwen2_moe": dict(model_type="qwen2_moe", vocab_size=99, hidden_size=16, intermediate_size=24,
                      moe_intermediate_size=12, shared_expert_intermediate_size=20, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, num_experts=4, num_experts_per_tok=2),
}


@pytest.fixture(scope="module", params=sorted(MOE))
def moe(request, tmp_path_factory):
    """A tiny MoE causal LM and two experts saved in the checkpoint layout (per-expert matrices)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    family = request.param
    root = tmp_path_factory.mktemp(family)
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(AutoConfig.for_model(**MOE[family])).eval()
    experts, paths = save_with_experts(base, root)
    generator = torch.Generator().manual_seed(5)
    data = {task: [{"input_ids": torch.randint(0, 99, (3, 8), generator=generator)}] for task in paths}
    return family, root, base, experts, paths, data


def test_checkpoints_hold_per_expert_matrices_the_module_fuses(moe):
    family, root, base, *_ = moe
    disk = load_file(root / "base" / "model.safetensors")
    assert any(".experts.3." in key for key in disk)                  # the checkpoint's own layout
    assert "model.layers.0.mlp.experts.gate_up_proj" in base.state_dict()  # the module's


def test_layouts_assemble_the_module_tensors_and_split_them_back(moe):
    """Assembling the checkpoint's pieces gives what transformers' own loading gives; splitting gives the
    checkpoint's tensors back, bit for bit."""
    from transformers import AutoModel

    family, root, *_ = moe
    disk = load_file(root / "base" / "model.safetensors")
    model = AutoModel.from_pretrained(root / "base")
    state = model.state_dict()
    plain = {key for key in state if "model." + key in disk}
    layouts = fused_layouts(model, [key for key in state if key not in plain],
                            lambda key: tuple(disk[key].shape) if key in disk else None, checkpoint_prefix="model.")
    assert sorted(layouts) == sorted(k for k in state if k.endswith(("experts.gate_up_proj", "experts.down_proj")))
    for key, layout in layouts.items():
        assert torch.equal(layout.assemble(disk.__getitem__), state[key]), key
        pieces = layout.split(state[key])
        assert len(pieces) == (8 if key.endswith("gate_up_proj") else 4)
        for name, tensor in pieces.items():
            assert torch.equal(tensor, disk[name]), name
    covered = {name for layout in layouts.values() for name in layout.keys}
    assert covered == {key for key in disk if ".experts." in key and "shared_expert" not in key}


def test_a_conversion_that_computes_weights_is_refused():
    """A reverse conversion that does not move elements one to one (here it repeats some, or computes them)
    cannot be mapped."""
    from transformers import AutoConfig, AutoModel
    from transformers.core_model_loading import revert_weight_conversion

    model = AutoModel.from_config(AutoConfig.for_model(**MOE["mixtral"]))

    def repeating_revert(module, state):
        return {key: value - value % 2 if value.dtype == torch.int64 else value
                for key, value in revert_weight_conversion(module, state).items()}

    keys = ["layers.0.mlp.experts.down_proj"]
    with pytest.raises(IncompatibleExpertsError, match="exactly once"):
        fused_layouts(model, keys, lambda key: None, revert=repeating_revert)

    def float_revert(module, state):
        return {key: value.float() for key, value in revert_weight_conversion(module, state).items()}

    with pytest.raises(IncompatibleExpertsError, match="does not move weights one to one"):
        fused_layouts(model, keys, lambda key: None, revert=float_revert)


def test_data_free_merge_works_per_expert_matrix_as_stored(moe, tmp_path):
    family, root, base, experts, paths, _ = moe
    out = tmp_path / "ta"
    layermerge.merge(root / "base", paths, method="task_arithmetic", scaling=0.3, output=out, quiet=True)
    merged = load_file(out / "model.safetensors")
    disk = {name: load_file(path / "model.safetensors") for name, path in paths.items()}
    base_disk = load_file(root / "base" / "model.safetensors")
    assert merged.keys() == base_disk.keys()
    for key, tensor in base_disk.items():
        expected = tensor + 0.3 * sum(d[key] - tensor for d in disk.values())
        torch.testing.assert_close(merged[key], expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("method", ["prodistill", "regmean"])
def test_data_driven_merges_write_the_checkpoint_layout_and_beat_task_arithmetic(moe, tmp_path, method):
    """ProDistill learns coefficients for the fused expert tensors and the router; RegMean solves the router
    and attention and averages the experts. Both write per-expert matrices the family's class loads without
    missing or unexpected keys, and both lower every block's error below Task Arithmetic's."""
    from transformers import AutoModelForCausalLM

    family, root, base, experts, paths, data = moe
    out = tmp_path / method
    params = {"epochs": 10} if method == "prodistill" else {}
    layermerge.merge(root / "base", paths, method=method, data=data, output=out, quiet=True, **params)
    assert load_file(out / "model.safetensors").keys() == load_file(root / "base" / "model.safetensors").keys()
    model, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]

    source = StateDictSource.from_models(base.model, {task: expert.model for task, expert in experts.items()})
    state = base.model.state_dict()
    ta = {key: state[key] + 0.3 * sum(e.model.state_dict()[key] - state[key] for e in experts.values())
          for key in state}
    reference = block_errors(copy.deepcopy(base.model), source, data, ta)
    merged = block_errors(copy.deepcopy(base.model), source, data, model.model.state_dict())
    assert len(merged) == MOE[family]["num_hidden_layers"]
    assert all(m < r for m, r in zip(merged, reference)), (merged, reference)
    if method == "prodistill":      # coefficients were learned for the fused expert tensors too
        coefficients = load_file(out / "prodistill" / "coefficients.safetensors")
        assert any("experts.gate_up_proj" in key for key in coefficients)


def test_whole_model_methods_swap_fused_tensors_assembled_from_merge_keys(moe, tmp_path):
    """Whole-model methods (AdaMerging...) hand over merge keys (per-expert matrices); the module tensor they
    replace is assembled from them, differentiably, and equals what transformers loads."""
    from transformers import AutoModelForCausalLM

    from layermerge.pipeline.strategies.modelwise import fused_overrides

    family, root, base, experts, paths, data = moe
    disk = load_file(paths["t1"] / "model.safetensors")
    model = AutoModelForCausalLM.from_pretrained(paths["t0"])
    state = model.state_dict()
    plain = {key for key in state if key in disk}
    layouts = fused_layouts(model, [k for k in state if k not in plain],
                            lambda key: tuple(disk[key].shape) if key in disk else None)
    assert layouts
    pieces = {piece.key: disk[piece.key].clone().requires_grad_(True)
              for layout in layouts.values() for piece in layout.pieces}
    overrides = fused_overrides(model, layouts, pieces)
    loaded = AutoModelForCausalLM.from_pretrained(paths["t1"]).state_dict()
    for name, tensor in overrides.items():
        assert torch.equal(tensor.detach(), loaded[name]), name
    sum(t.sum() for t in overrides.values()).backward()
    assert all(torch.equal(p.grad, torch.ones_like(p)) for p in pieces.values())
    # A subset of pieces: the rest keep the model's own (t0's) values.
    name, layout = next(iter(layouts.items()))
    one = layout.pieces[0]
    partial = fused_overrides(model, {name: layout}, {one.key: disk[one.key]})[name]
    assert torch.equal(one.take(partial), disk[one.key])
    rest = torch.ones(partial.numel(), dtype=torch.bool)
    rest[one.index] = False
    assert torch.equal(partial.reshape(-1)[rest], state[name].reshape(-1)[rest])

    out = tmp_path / "adamerging"
    layermerge.merge(root / "base", paths, method="adamerging", data=data, output=out, quiet=True, steps=2)
    _, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
