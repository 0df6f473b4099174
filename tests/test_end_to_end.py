"""Every registered data-free method, end to end, on tiny BERT, RoBERTa, ViT, GPT-2 and Llama models.

Methods are read from the registry at collection time, so a newly registered method is tested here
without editing this file. BERT gets the full treatment (CLI, API in memory and to a folder, the
output's files, re-running its recorded config); the other families run every method through the
API and check the output loads and predicts.
"""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
import yaml
from conftest import tree_hashes

import layermerge
from layermerge.cli import main
from layermerge.config import load_config
from layermerge.io.reader import CheckpointReader

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TENSOR_METHODS = {name: info for name, info in layermerge.available_methods().items()
                  if info.kind == "tensor"}
OTHER_FAMILIES = ["roberta", "vit", "gpt2", "llama"]
AVAILABLE_EXPERTS = 3  # build_family's default


def experts_for(info, experts: dict) -> dict:
    """As many experts as the method takes, up to the three the fixture has."""
    count = min(AVAILABLE_EXPERTS, info.max_experts or AVAILABLE_EXPERTS)
    if count < info.min_experts:
        pytest.skip(f"{info.name} needs {info.min_experts} experts; the fixture has {AVAILABLE_EXPERTS}")
    return dict(list(experts.items())[:count])


def sample_inputs(family: str, batch: int = 2) -> dict:
    generator = torch.Generator().manual_seed(0)
    if family == "vit":
        return {"pixel_values": torch.randn(batch, 3, 16, 16, generator=generator)}
    ids = torch.randint(3, 99, (batch, 8), generator=generator)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def checkpoint_state(model, scratch) -> dict[str, torch.Tensor]:
    """A loaded model's weights under checkpoint key names (transformers 5 renames some modules, e.g.
    ViT's attention, in memory and renames them back on saving)."""
    model.save_pretrained(scratch)
    return read_folder(scratch)


def check_backbone_output(folder, family: str, base, merged: dict[str, torch.Tensor] | None = None,
                          scratch=None) -> None:
    """transformers loads the folder as completely as the base, with the merged weights, and predicts."""
    from transformers import AutoModel

    model, info = AutoModel.from_pretrained(folder, output_loading_info=True)
    _, base_info = AutoModel.from_pretrained(base, output_loading_info=True)
    # The fixture's ViT/RoBERTa bases have no pooler, which AutoModel adds: missing in both, not a bug.
    for kind in ("missing_keys", "unexpected_keys", "mismatched_keys"):
        assert set(info[kind]) == set(base_info[kind]), kind
    if merged is not None:
        loaded = checkpoint_state(model, scratch)
        for key, tensor in merged.items():
            assert torch.equal(loaded[key], tensor), key
    model.eval()
    with torch.no_grad():
        hidden = model(**sample_inputs(family)).last_hidden_state
    assert hidden.shape[0] == 2 and torch.isfinite(hidden).all()


def check_task_models(folder, family: str, experts: dict, merged: dict[str, torch.Tensor], scratch) -> None:
    """Each task model: the expert's own head, the merged backbone (unless the method stores per-task
    weights), and finite logits over that task's label count."""
    for index, (task, expert_dir) in enumerate(experts.items()):
        model = layermerge.load_task_model(folder, task)
        labels = 2 + index  # build_family gives task i 2 + i labels
        assert model.config.num_labels == labels
        if family in ("gpt2", "llama") and model.config.pad_token_id is None:  # picks the last non-pad token
            model.config.pad_token_id = 0
        state = checkpoint_state(model, scratch / task)
        expert = CheckpointReader(expert_dir)
        head_keys = json.loads((folder / "heads" / task / "layermerge_head.json").read_text())["keys"]
        assert head_keys
        for key in head_keys:
            assert torch.equal(state[key], expert.get(key)), key
        prefix = json.loads((folder / "heads" / task / "layermerge_head.json").read_text())["prefix"]
        if not (folder / "task_extras" / task).exists():
            for key, tensor in merged.items():
                assert torch.equal(state[prefix + key], tensor), key
        with torch.no_grad():
            logits = model(**sample_inputs(family)).logits
        assert logits.shape == (2, labels) and torch.isfinite(logits).all()


def check_output_files(folder, method: str, params: dict, inputs: list) -> None:
    """README model card (method, params, input hashes), a valid re-runnable config, per-task heads."""
    card = (folder / "README.md").read_text()
    assert method in card
    for name, value in params.items():
        assert f'"{name}": {json.dumps(value)}' in card, name
    for root in inputs:
        for weight_file in CheckpointReader(root).weight_files:
            assert hashlib.sha256(weight_file.read_bytes()).hexdigest() in card, weight_file
    config = load_config(folder / "layermerge.yaml")
    assert config.method == method and config.params == params
    summary = json.loads((folder / "layermerge_summary.json").read_text())
    assert summary["method"] == method
    for task in config.experts:
        head = folder / "heads" / task
        files = {p.name for p in head.iterdir()}
        assert {"model.safetensors", "config.json", "layermerge_head.json"} <= files


def read_folder(folder) -> dict[str, torch.Tensor]:
    return CheckpointReader(folder).state_dict()


@pytest.mark.parametrize("method", list(TENSOR_METHODS))
def test_method_end_to_end_on_bert(family_models, tmp_path, method):
    base, all_experts = family_models["bert"]
    info = TENSOR_METHODS[method]
    experts = experts_for(info, all_experts)
    inputs = [base, *experts.values()]
    before = tree_hashes(inputs)

    # Python API, in memory and to a folder: the same tensors.
    in_memory = layermerge.merge(base, experts, method, quiet=True)
    params = in_memory.params
    assert set(in_memory.state_dict) == set(CheckpointReader(base).keys())
    api_out = tmp_path / "api"
    written = layermerge.merge(base, experts, method, output=api_out, quiet=True)
    assert written.path == api_out.resolve() and written.params == params
    on_disk = read_folder(api_out)
    assert on_disk.keys() == in_memory.state_dict.keys()
    for key, tensor in in_memory.state_dict.items():
        assert torch.equal(on_disk[key], tensor), key
        assert tensor.dtype == torch.float32 and torch.isfinite(tensor).all(), key
    for task, extras in in_memory.task_extras.items():
        stored = read_folder(api_out / "task_extras" / task)
        assert stored.keys() == extras.keys() and all(torch.equal(stored[k], v) for k, v in extras.items())

    # CLI from a YAML config written by hand.
    config = tmp_path / "merge.yaml"
    config.write_text(yaml.safe_dump({"base": str(base), "experts": {k: str(v) for k, v in experts.items()},
                                      "method": method, "params": {}}))
    cli_out = tmp_path / "cli"
    assert main(["merge", str(config), "--output", str(cli_out), "--quiet"]) == 0
    cli_state = read_folder(cli_out)
    assert all(torch.equal(cli_state[k], v) for k, v in in_memory.state_dict.items())

    for folder in (api_out, cli_out):
        check_output_files(folder, method, params, inputs)
    check_backbone_output(api_out, "bert", base, in_memory.state_dict, tmp_path / "loaded")
    check_task_models(api_out, "bert", experts, in_memory.state_dict, tmp_path / "tasks")

    # The recorded config reproduces the merge.
    again = tmp_path / "again"
    assert main(["merge", str(api_out / "layermerge.yaml"), "--output", str(again), "--quiet"]) == 0
    again_state = read_folder(again)
    assert all(torch.equal(again_state[k], v) for k, v in in_memory.state_dict.items())
    assert tree_hashes(inputs) == before


@pytest.mark.parametrize("method", list(TENSOR_METHODS))
@pytest.mark.parametrize("family", OTHER_FAMILIES)
def test_method_on_other_families(family_models, tmp_path, family, method):
    base, all_experts = family_models[family]
    experts = experts_for(TENSOR_METHODS[method], all_experts)
    before = tree_hashes([base, *experts.values()])
    out = tmp_path / "out"
    layermerge.merge(base, experts, method, output=out, quiet=True)
    merged = read_folder(out)
    assert set(merged) == set(CheckpointReader(base).keys())
    check_backbone_output(out, family, base, merged, tmp_path / "loaded")
    check_task_models(out, family, experts, merged, tmp_path / "tasks")
    assert tree_hashes([base, *experts.values()]) == before


def test_sharded_output_and_dtype(family_models, tmp_path):
    """A small shard limit gives an indexed multi-file output that transformers loads; dtype is honoured."""
    base, experts = family_models["llama"]
    out = tmp_path / "out"
    merged = layermerge.merge(base, experts, "task_arithmetic", output=out, max_shard_size="20KB",
                              dtype="bfloat16", quiet=True)
    assert (out / "model.safetensors.index.json").is_file()
    assert len(list(out.glob("model-*-of-*.safetensors"))) > 1
    state = read_folder(out)
    assert {t.dtype for t in state.values()} == {torch.bfloat16}
    check_backbone_output(out, "llama", base)
    assert merged.path == out.resolve()
    assert yaml.safe_load((out / "layermerge.yaml").read_text())["dtype"] == "bfloat16"


def test_methods_agree_with_hand_computation(family_models):
    """Two methods with closed forms, checked by hand on the real tiny models."""
    base, experts = family_models["gpt2"]
    base_state = read_folder(base)
    expert_states = [{k.removeprefix("transformer."): v for k, v in read_folder(e).items()}
                     for e in experts.values()]
    average = layermerge.merge(base, experts, "average", quiet=True).state_dict
    arithmetic = layermerge.merge(base, experts, "task_arithmetic", scaling=0.5, quiet=True).state_dict
    for key, theta0 in base_state.items():
        thetas = [state[key] for state in expert_states]
        torch.testing.assert_close(average[key], sum(thetas) / 3, rtol=0, atol=1e-6)
        expected = theta0 + 0.5 * sum(t - theta0 for t in thetas)
        torch.testing.assert_close(arithmetic[key], expected, rtol=0, atol=1e-6)


def test_in_memory_result_saved_and_as_a_transformers_model(family_models, tmp_path):
    """``merge()`` without ``output``: the MergedModel converts to a transformers model and saves a folder."""
    base, experts = family_models["roberta"]
    merged = layermerge.merge(base, experts, "ties", quiet=True)
    model = merged.to_hf_model()
    with torch.no_grad():
        hidden = model(**sample_inputs("roberta")).last_hidden_state
    assert torch.isfinite(hidden).all()
    folder = merged.save(tmp_path / "saved")
    assert (folder / "README.md").is_file() and "ties" in (folder / "README.md").read_text()
    check_backbone_output(folder, "roberta", base, merged.state_dict, tmp_path / "loaded")
    check_task_models(folder, "roberta", experts, merged.state_dict, tmp_path / "tasks")
