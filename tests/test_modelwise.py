"""The ``kind="model"`` path (layermerge.pipeline.strategies.modelwise): each expert's whole task model run with any
backbone, the output folder, per-task replacement weights and the in-memory save."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tree_hashes
from safetensors.torch import load_file

import layermerge
from layermerge.errors import ConfigError, DataError
from layermerge.experts import ExpertSet
from layermerge.io.reader import CheckpointReader
from layermerge.methods.base import ModelMergeResult
from layermerge.methods.registry import _REGISTRY, MethodParams, register
from layermerge.pipeline.strategies.modelwise import ModelContext, final_linear

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def labelled(tasks, rows=3, width=6, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return {task: [{"input_ids": torch.randint(3, 99, (rows, width), generator=generator),
                    "attention_mask": torch.ones(rows, width, dtype=torch.long),
                    "labels": torch.zeros(rows, dtype=torch.long)}] for task in tasks}


class _Probe:
    """A test-only method: the average of the experts, plus task0's own weights as its per-task model,
    and a record of what the context showed it."""

    seen: dict = {}

    class Params(MethodParams):
        per_task: bool = False

    def __init__(self, params, task_names):
        self.params, self.name = params, "probe_model_method"

    def merge_models(self, ctx: ModelContext) -> ModelMergeResult:
        experts = {task: ctx.expert_state(task) for task in ctx.tasks}
        average = {key: sum(state[key] for state in experts.values()) / len(experts) for key in ctx.merge_keys}
        _Probe.seen = {"tasks": list(ctx.tasks), "labels": [b["labels"].shape for b in ctx.batches(ctx.tasks[0])]}
        task_params = {ctx.tasks[0]: experts[ctx.tasks[0]]} if self.params.per_task else {}
        return ModelMergeResult(average, {"marker": torch.arange(3.0)}, task_params, {"probe": 1})


@pytest.fixture(scope="module")
def probe_method():
    register("probe_model_method", summary="test only", needs_data=True, kind="model")(_Probe)
    yield "probe_model_method"
    _REGISTRY.pop("probe_model_method", None)


def test_context_runs_each_expert_with_any_backbone(family_models):
    base, experts = family_models["bert"]
    expert_set = ExpertSet(base, experts)
    data = labelled(expert_set.names)
    ctx = ModelContext(expert_set, data, torch.device("cpu"))
    batch = ctx.batches("task1")[0]
    model = ctx.task_model("task1")
    with torch.no_grad():
        own = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
        # The expert's own backbone reproduces its logits exactly.
        assert torch.equal(ctx.logits("task1", ctx.expert_state("task1"), batch), own)
        # The base's backbone changes them (the experts were perturbed) and the model is left unchanged after.
        with_base = ctx.logits("task1", ctx.base_state(), batch)
        assert not torch.allclose(with_base, own)
        assert torch.equal(model(**{k: v for k, v in batch.items() if k != "labels"}).logits, own)
        # Features are what the final classifier reads: applying it gives the logits back.
        features = ctx.features("task1", ctx.base_state(), batch)
        classifier = final_linear(model)
        assert torch.allclose(classifier(features), with_base, atol=1e-6)
    # Differentiable in the backbone weights.
    state = {k: v.clone().requires_grad_(True) for k, v in ctx.base_state().items()}
    ctx.logits("task1", state, batch).sum().backward()
    assert any(t.grad is not None and t.grad.abs().sum() > 0 for t in state.values())
    with pytest.raises(KeyError, match="not merge keys"):
        ctx.logits("task1", {"nope": torch.zeros(1)}, batch)


def test_output_folder_heads_artifacts_and_per_task_weights(family_models, probe_method, tmp_path):
    base, experts = family_models["bert"]
    before = tree_hashes([base, *experts.values()])
    out = tmp_path / "merged"
    layermerge.merge(base, experts, probe_method, data=labelled(experts), output=out, per_task=True, quiet=True)
    assert tree_hashes([base, *experts.values()]) == before
    assert _Probe.seen["tasks"] == list(experts) and _Probe.seen["labels"] == [torch.Size([3])]
    merged = CheckpointReader(out)
    readers = [CheckpointReader(p) for p in experts.values()]
    key = "encoder.layer.0.attention.self.query.weight"
    expected = sum(r.get("bert." + key) for r in readers) / len(readers)
    assert torch.allclose(merged.get(key), expected, atol=1e-6)
    assert torch.equal(load_file(str(out / probe_method / "artifacts.safetensors"))["marker"], torch.arange(3.0))
    summary = json.loads((out / "layermerge_summary.json").read_text())
    assert summary["summary"]["probe"] == 1 and summary["summary"]["task_extras"] == "replace"
    assert (out / "layermerge.yaml").is_file()
    # task0 loads with its own weights (the per-task replacement), task1 with the shared average.
    model0 = layermerge.load_task_model(out, "task0")
    model1 = layermerge.load_task_model(out, "task1")
    assert torch.equal(model0.state_dict()["bert." + key], readers[0].get("bert." + key))
    assert torch.allclose(model1.state_dict()["bert." + key], expected, atol=1e-6)


def test_in_memory_save_writes_the_same_side_files(family_models, probe_method, tmp_path):
    base, experts = family_models["bert"]
    merged = layermerge.merge(base, experts, probe_method, data=labelled(experts), quiet=True)
    out = merged.save(tmp_path / "saved")
    assert (out / "layermerge.yaml").is_file() and (out / probe_method / "artifacts.safetensors").is_file()
    card = (out / "README.md").read_text()
    assert f"- base: `{base.name}`" in card and str(base) not in card and "sha256" in card.lower()
    with pytest.raises(Exception, match="input"):
        merged.save(base, overwrite=True)          # never into an input folder


def test_clear_errors(family_models, probe_method):
    base, experts = family_models["bert"]
    with pytest.raises(ConfigError, match="data="):
        layermerge.merge(base, experts, probe_method, quiet=True)
    with pytest.raises(DataError, match="no few-shot batches"):
        layermerge.merge(base, experts, probe_method, data={"task0": labelled(["task0"])["task0"]}, quiet=True)
    with pytest.raises(ConfigError, match="per_task"):
        layermerge.merge(base, experts, probe_method, data=labelled(experts), per_task="maybe", quiet=True)


@pytest.mark.parametrize("method", ["adamerging", "localize_stitch", "fisher", "neulig", "np_merge"])
def test_whole_model_methods_handle_batchnorm_buffers(method, tmp_path):
    """BatchNorm running statistics are merge keys but take no gradient: every whole-model method
    must train on the parameters only (the EfficientNet bench once failed here)."""
    from conftest import perturb_

    from layermerge.data.models import build_vision_model, get_vision_factory, save_vision_model, spec_for

    factory = get_vision_factory("small-cnn")
    torch.manual_seed(0)
    base_model = build_vision_model(spec_for(factory, 3, 16), pretrained=False)
    base = save_vision_model(base_model, spec_for(factory, 3, 16), tmp_path / "base")
    experts = {}
    for index, task in enumerate(["a", "b"]):
        model = build_vision_model(spec_for(factory, 3, 16), pretrained=False)
        model.load_state_dict(base_model.state_dict())
        perturb_(model, seed=index, scale=0.05)
        with torch.no_grad():
            for buffer in model.buffers():
                if buffer.is_floating_point():
                    buffer.add_(0.1 * (index + 1))
        experts[task] = save_vision_model(model, spec_for(factory, 3, 16), tmp_path / task)
    generator = torch.Generator().manual_seed(0)
    data = {task: [{"pixel_values": torch.randn(4, 3, 16, 16, generator=generator),
                    "labels": torch.tensor([0, 1, 2, 0])}] for task in experts}
    params = {"adamerging": {"steps": 2}, "localize_stitch": {"steps": 2}, "fisher": {},
              "neulig": {"epochs": 2, "loss": "cross_entropy"}, "np_merge": {"epochs": 2}}[method]
    merged = layermerge.merge(base, experts, method=method, data=data, quiet=True, device="cpu", **params)
    stats = [key for key in merged.state_dict if key.endswith(("running_mean", "running_var"))]
    assert stats and all(torch.isfinite(merged.state_dict[key]).all() for key in stats)
