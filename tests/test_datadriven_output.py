"""ProDistill through layermerge.merge: a normal Hugging Face output folder, Task Arithmetic at lr 0
bit for bit, checkpoint key names (also where transformers renames them), coefficients and their
plot, a meta-device template, and the few-shot input adaptation."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tree_hashes
from safetensors.torch import load_file

import layermerge
from layermerge.engine.template import build_template, checkpoint_key_map
from layermerge.errors import ConfigError, DataError
from layermerge.fewshot import adapt_batches
from layermerge.io.reader import CheckpointReader

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def text_data(tasks, seed=0, rows=2, width=5):
    generator = torch.Generator().manual_seed(seed)
    mask = torch.tensor([[1] * width] + [[1] * (width - 2) + [0, 0]] * (rows - 1))
    return {task: [{"input_ids": torch.randint(3, 99, (rows, width), generator=generator) * mask,
                    "attention_mask": mask, "labels": torch.zeros(rows, dtype=torch.long)}] for task in tasks}


def image_data(tasks, seed=0, size=16):
    generator = torch.Generator().manual_seed(seed)
    return {task: [{"pixel_values": torch.randn(2, 3, size, size, generator=generator)}] for task in tasks}


@pytest.mark.parametrize("family", ["bert", "gpt2", "llama", "vit"])
def test_lr_zero_output_folder_equals_task_arithmetic(family, family_models, tmp_path):
    from transformers import AutoModel

    base, experts = family_models[family]
    before = tree_hashes([base, *experts.values()])
    data = image_data(experts) if family == "vit" else text_data(experts)
    out = tmp_path / "prodistill"
    layermerge.merge(base, experts, method="prodistill", data=data, output=out, lr=0.0, epochs=2, quiet=True,
                     device="cpu")
    layermerge.merge(base, experts, method="task_arithmetic", scaling=0.3, output=tmp_path / "ta", quiet=True)
    merged, reference = CheckpointReader(out), CheckpointReader(tmp_path / "ta")
    base_keys = CheckpointReader(base).keys()
    assert sorted(merged.keys()) == sorted(reference.keys()) == sorted(base_keys)   # checkpoint names
    for key in reference.keys():
        assert merged.dtype(key) == reference.dtype(key)
        assert torch.equal(merged.get(key), reference.get(key)), key
    assert tree_hashes([base, *experts.values()]) == before                        # inputs untouched
    assert not (tmp_path / "prodistill.checkpoint").exists()                          # removed after success

    AutoModel.from_pretrained(out)
    for index, task in enumerate(experts):
        assert layermerge.load_task_model(out, task).config.num_labels == 2 + index   # conftest's label counts
    # Coefficients: λ per task and block tensor, named by the checkpoint key, all at init when lr = 0.
    coefficients = load_file(str(out / "prodistill" / "coefficients.safetensors"))
    block_keys = [k for k in base_keys if CheckpointReader(base).shape(k) and (".layer." in k or ".h." in k
                                                                              or "layers." in k)]
    assert {f"task0/{k}" for k in block_keys} <= set(coefficients)
    for key, value in coefficients.items():
        task, checkpoint_key = key.split("/", 1)
        assert value.shape == merged.shape(checkpoint_key) and torch.all(value == 0.3)
    blocks = json.loads((out / "prodistill" / "blocks.json").read_text())
    assert len(blocks["blocks"]) == 2 and blocks["init"] == 0.3
    assert blocks["blocks"][0]["coefficients"]["task1"]["q50"] == pytest.approx(0.3)
    record = json.loads((out / "layermerge_summary.json").read_text())
    assert record["method"] == "prodistill" and record["summary"]["data"]["task0"]["examples"] == 2
    card = (out / "README.md").read_text()
    assert "prodistill" in card                                              # inputs' sha256 in the model card
    assert all(digest in card for path, digest in before.items() if path.endswith(".safetensors"))


def test_training_changes_blocks_only_and_plots(family_models, tmp_path):
    base, experts = family_models["bert"]
    out = tmp_path / "trained"
    layermerge.merge(base, experts, method="prodistill", data=text_data(experts), output=out, lr=0.05, epochs=3,
                     quiet=True, device="cpu", plot_coefficients=True, seed=1)
    ta = layermerge.merge(base, experts, method="task_arithmetic", quiet=True).state_dict
    merged = CheckpointReader(out)
    for key, tensor in ta.items():
        changed = not torch.equal(merged.get(key), tensor)
        assert changed == key.startswith("encoder.layer."), key          # non-block weights: Task Arithmetic
    png = out / "prodistill" / "coefficients.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    second = layermerge.coefficient_plot.plot_coefficients(out, tmp_path / "again.png")
    assert second.stat().st_size > 1000
    stats = json.loads((out / "prodistill" / "blocks.json").read_text())["blocks"]
    assert all(b["stats"]["loss_last_epoch"] < b["stats"]["loss_first_epoch"] for b in stats)


def test_in_memory_result_and_save(family_models, tmp_path):
    base, experts = family_models["llama"]
    merged = layermerge.merge(base, experts, method="prodistill", data=text_data(experts), lr=0.0, epochs=1,
                              quiet=True, device="cpu")
    reference = layermerge.merge(base, experts, method="task_arithmetic", quiet=True)
    assert list(merged.state_dict) == list(reference.state_dict)
    assert all(torch.equal(merged.state_dict[k], v) for k, v in reference.state_dict.items())
    assert merged.coefficients["task2/layers.1.mlp.up_proj.weight"].shape == (48, 32)
    folder = merged.save(tmp_path / "saved")
    assert (folder / "prodistill" / "coefficients.safetensors").is_file()
    assert (folder / "heads" / "task0" / "config.json").is_file()


def test_template_stays_on_meta_device(family_models):
    """Only non-block weights are ever materialised: block weights reach the blocks via functional_call."""
    base, experts = family_models["gpt2"]
    expert_set = layermerge.ExpertSet(base, experts)
    template = build_template(expert_set)
    assert all(p.is_meta for p in template.parameters())
    from layermerge.engine import ExpertSetSource
    from layermerge.methods.prodistill import prodistill_merge

    source = ExpertSetSource(expert_set, checkpoint_key_map(template, expert_set.report.merge_keys))
    result = prodistill_merge(template, source, adapt_batches(template, text_data(experts)), lr=0.01, epochs=1,
                              engine_options={"device": "cpu"})
    assert all(p.is_meta for p in template.h.parameters())
    assert not template.wte.weight.is_meta and torch.equal(template.wte.weight, result.state_dict["wte.weight"])


def test_vit_keys_map_to_the_checkpoint_names(family_models):
    base, experts = family_models["vit"]
    expert_set = layermerge.ExpertSet(base, experts)
    key_map = checkpoint_key_map(build_template(expert_set), expert_set.report.merge_keys)
    assert key_map["layers.0.attention.q_proj.weight"] == "encoder.layer.0.attention.attention.query.weight"
    assert key_map["embeddings.cls_token"] == "embeddings.cls_token"
    assert sorted(key_map.values()) == sorted(expert_set.report.merge_keys)


def test_bfloat16_compute_keeps_fp32_weights(family_models):
    base, experts = family_models["llama"]
    data = text_data(experts)
    fp32 = layermerge.merge(base, experts, method="prodistill", data=data, lr=0.0, epochs=1, quiet=True,
                            device="cpu")
    bf16 = layermerge.merge(base, experts, method="prodistill", data=data, lr=0.0, epochs=1, quiet=True,
                            device="cpu", compute_dtype="bfloat16")
    for key, tensor in fp32.state_dict.items():                 # the merge itself is float32 Task Arithmetic
        assert bf16.state_dict[key].dtype == torch.float32 and torch.equal(bf16.state_dict[key], tensor)
    losses32 = [b["stats"]["loss_final"] for b in fp32.blocks["blocks"]]
    losses16 = [b["stats"]["loss_final"] for b in bf16.blocks["blocks"]]
    assert losses16 == pytest.approx(losses32, rel=0.1)           # the same distillation errors, in bf16
    assert bf16.summary["compute_dtype"] == "bfloat16"


def test_adapting_batches_to_the_forward():
    from torch import nn

    class Net(nn.Module):
        def forward(self, inputs):
            return inputs

    class Text(nn.Module):
        def forward(self, input_ids, attention_mask=None):
            return input_ids

    x = torch.zeros(2, 3, 4, 4)
    assert list(adapt_batches(Net(), {"a": [{"pixel_values": x, "labels": torch.ones(2)}]})["a"][0]) == ["inputs"]
    one = adapt_batches(Text(), {"a": {"input_ids": torch.ones(2, 3, dtype=torch.long),
                                       "token_type_ids": torch.zeros(2, 3), "labels": torch.ones(2)}})
    assert list(one["a"][0]) == ["input_ids"]                      # a single dict is one batch
    with pytest.raises(DataError, match="no input the model takes"):
        adapt_batches(Text(), {"a": [{"labels": torch.ones(2), "pixels": x}]})
    with pytest.raises(DataError, match="list of input batches"):
        adapt_batches(Text(), {"a": "text"})


def test_api_errors(family_models, tmp_path):
    base, experts = family_models["bert"]
    with pytest.raises(ConfigError, match="pass data="):
        layermerge.merge(base, experts, method="prodistill", quiet=True)
    with pytest.raises(ConfigError, match="data-free"):
        layermerge.merge(base, experts, method="ties", data=text_data(experts), quiet=True)
    with pytest.raises(ConfigError, match="cache_budget"):
        layermerge.merge(base, experts, method="prodistill", data=text_data(experts), cache_budget=[1],
                         quiet=True)
    with pytest.raises(ConfigError, match="unknown parameter 'learning_rate'"):
        layermerge.merge(base, experts, method="prodistill", data=text_data(experts), learning_rate=1,
                         quiet=True)
    with pytest.raises(ConfigError, match="shot: Extra inputs.*keyed by the experts' names"):
        layermerge.merge(base, experts, method="prodistill", data={"shot": 4}, quiet=True)
    with pytest.raises(ConfigError, match="resume needs a checkpoint folder"):
        layermerge.merge(base, experts, method="prodistill", data=text_data(experts), resume=True, quiet=True)


def save_vision_family(root, factory_name: str, image_size: int, pretrained: bool):
    """A layermerge vision base (its own 10-class head) and two experts with 3 and 4 classes."""
    from conftest import perturb_

    from layermerge.data.models import build_vision_model, get_vision_factory, save_vision_model, spec_for

    factory = get_vision_factory(factory_name)
    base_spec = spec_for(factory, 10, image_size)
    torch.manual_seed(0)
    base_model = build_vision_model(base_spec, pretrained=pretrained)
    base = save_vision_model(base_model, base_spec, root / "base")
    head = factory.head_prefix
    backbone = {k: v for k, v in base_model.state_dict().items() if not k.startswith(head)}
    experts = {}
    for index, task in enumerate(["a", "b"]):
        spec = spec_for(factory, 3 + index, image_size)
        model = build_vision_model(spec, pretrained=False)
        model.load_state_dict(backbone, strict=False)
        perturb_(model, seed=index, scale=0.01)
        experts[task] = save_vision_model(model, spec, root / task)
    return base, experts


def test_vision_model_with_block_plan_override(tmp_path):
    """A plain nn.Module from a layermerge vision folder (built on the meta device from its config),
    its Sequential stages as blocks through the override, BatchNorm statistics by Task Arithmetic."""
    base, experts = save_vision_family(tmp_path, "small-cnn", 16, pretrained=True)
    data = image_data(experts)
    out = tmp_path / "merged"
    layermerge.merge(base, experts, method="prodistill", data=data, output=out, lr=0.0, epochs=1, quiet=True,
                     device="cpu", block_plan={"blocks": "features"})
    reference = layermerge.merge(base, experts, method="task_arithmetic", quiet=True).state_dict
    merged = CheckpointReader(out)
    assert sorted(merged.keys()) == sorted(reference)
    assert all(torch.equal(merged.get(k), v) for k, v in reference.items())
    blocks = json.loads((out / "prodistill" / "blocks.json").read_text())["blocks"]
    assert [b["module"] for b in blocks] == [f"features.{i}" for i in range(8)]
    with pytest.raises(layermerge.blocks.BlockPlanError, match="block_plan"):
        layermerge.merge(base, experts, method="prodistill", data=data, quiet=True, device="cpu")


def test_efficientnet_lite0_merges_its_stages(tmp_path):
    """EfficientNet-Lite0 (forward(inputs): pixel_values are routed to it), 16 MBConv blocks."""
    pytest.importorskip("efficientnet_lite_pytorch")
    base, experts = save_vision_family(tmp_path, "efficientnet-lite0", 32, pretrained=False)
    out = tmp_path / "merged"
    layermerge.merge(base, experts, method="prodistill", data=image_data(experts, size=32), output=out, lr=0.0,
                     epochs=1, quiet=True, device="cpu")
    reference = layermerge.merge(base, experts, method="task_arithmetic", quiet=True).state_dict
    merged = CheckpointReader(out)
    assert all(torch.equal(merged.get(k), v) for k, v in reference.items())
    assert len(json.loads((out / "prodistill" / "blocks.json").read_text())["blocks"]) == 16


def test_data_section_for_image_tasks_uses_each_experts_preprocessing(tmp_path):
    from layermerge.data import find_data_dir
    from layermerge.fewshot import DataConfig, build_few_shot

    if find_data_dir() is None:
        pytest.skip("shared data not present")
    base, experts = save_vision_family(tmp_path, "small-cnn", 16, pretrained=True)
    expert_set = layermerge.ExpertSet(base, experts)
    config = DataConfig(shots=5, batch_size=3, tasks={"a": {"task": "mnist"}, "b": {"task": "cifar10", "shots": 2}})
    batches = build_few_shot(config, expert_set)
    assert [b["pixel_values"].shape for b in batches["a"]] == [(3, 3, 16, 16), (2, 3, 16, 16)]
    assert [b["pixel_values"].shape for b in batches["b"]] == [(2, 3, 16, 16)]
    assert batches["a"][0]["pixel_values"].min() >= -1 and batches["a"][0]["pixel_values"].max() <= 1
    merged = layermerge.merge(base, experts, method="prodistill", data=config, lr=0.01, epochs=2, quiet=True,
                              device="cpu", block_plan={"blocks": "features"})
    assert merged.summary["data"] == {"a": {"batches": 2, "examples": 5}, "b": {"batches": 1, "examples": 2}}


def test_coefficient_summaries_against_numpy():
    import numpy as np

    from layermerge.coefficient_plot import EXACT_QUANTILES, summarise

    values = torch.randn(999, generator=torch.Generator().manual_seed(0))
    record = summarise(values)
    expected = np.quantile(values.double().numpy(), [0.05, 0.25, 0.5, 0.75, 0.95])
    got = [record[k] for k in ("q05", "q25", "q50", "q75", "q95")]
    assert got == pytest.approx(expected.tolist(), abs=1e-12)
    assert record["std"] == pytest.approx(float(values.double().std(unbiased=False)))
    assert record["min"] == float(values.min()) and record["count"] == 999
    big = summarise(torch.linspace(0, 1, 3 * EXACT_QUANTILES))          # sampled quantiles for big blocks
    assert big["quantiles_from"] <= EXACT_QUANTILES and big["q50"] == pytest.approx(0.5, abs=1e-3)
    assert big["max"] == 1.0 and big["mean"] == pytest.approx(0.5)
