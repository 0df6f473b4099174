"""One test per compatibility error, with the message content checked, plus per-task heads and prefixes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import build_family, make_config, tree_hashes
from safetensors.torch import load_file, save_file

import layermerge
from layermerge.errors import IncompatibleExpertsError
from layermerge.experts import ExpertSet, detect_prefix
from layermerge.io.reader import CheckpointReader

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    """A tiny BERT base and two experts (2 and 3 labels)."""
    return build_family(tmp_path_factory.mktemp("bert"), "bert", n_experts=2)


def edited_copy(source: Path, target: Path, edit=None, config_edit=None) -> Path:
    """A copy of a checkpoint folder whose state dict (and config) were changed by ``edit``."""
    shutil.copytree(source, target)
    state = load_file(str(target / "model.safetensors"))
    if edit is not None:
        state = edit(state)
        save_file({k: v.contiguous() for k, v in state.items()}, str(target / "model.safetensors"),
                  metadata={"format": "pt"})
    if config_edit is not None:
        config = json.loads((target / "config.json").read_text())
        config_edit(config)
        (target / "config.json").write_text(json.dumps(config))
    return target


def expert_from_config(base_dir: Path, target: Path, num_labels: int = 2, seed: int = 0, **overrides) -> Path:
    """A BERT task model, maybe of another architecture, initialised from the base where shapes match."""
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(seed)
    config = make_config("bert", num_labels=num_labels, **overrides)
    model = AutoModelForSequenceClassification.from_config(config)
    base = CheckpointReader(base_dir).state_dict()
    own = model.bert.state_dict()
    model.bert.load_state_dict({k: base[k] if k in base and base[k].shape == v.shape else v
                                for k, v in own.items()})
    model.save_pretrained(target)
    return target


def incompatible(base, experts, **options) -> str:
    with pytest.raises(IncompatibleExpertsError) as info:
        ExpertSet(base, experts, **options)
    message = str(info.value)
    assert "\n" not in message
    return message


# --------------------------------------------------------------------------- errors
def test_missing_keys(bert, tmp_path):
    base, experts = bert
    key = "bert.encoder.layer.1.output.dense.weight"
    broken = edited_copy(experts["task1"], tmp_path / "e1",
                         edit=lambda s: {k: v for k, v in s.items() if k != key})
    message = incompatible(base, {"task0": experts["task0"], "task1": broken})
    assert "expert 'task1'" in message and str(broken) in message and str(base) in message
    assert "missing 1 keys" in message and "'encoder.layer.1.output.dense.weight'" in message


def test_extra_layer_inside_the_backbone(bert, tmp_path):
    base, experts = bert
    deeper = expert_from_config(base, tmp_path / "deeper", num_hidden_layers=3)
    message = incompatible(base, {"task0": experts["task0"], "deep": deeper})
    assert "expert 'deep'" in message and str(deeper) in message
    assert "extra keys inside the backbone" in message
    first_extra = [k for k in CheckpointReader(deeper).keys() if "layer.2." in k][0]
    assert "has 16 extra keys" in message and f"{first_extra!r}" in message
    assert "head_keys" in message
    # Declared as task-specific, the extra layer is kept per task instead.
    expert_set = ExpertSet(base, {"task0": experts["task0"], "deep": deeper}, head_keys=["encoder.layer.2."])
    assert "bert.encoder.layer.2.output.dense.weight" in expert_set.report.head_keys["deep"]
    assert not any("layer.2" in k for k in expert_set.report.merge_keys)


def test_shape_mismatch(bert, tmp_path):
    base, experts = bert
    wider = expert_from_config(base, tmp_path / "wider", intermediate_size=40)
    message = incompatible(base, {"task0": experts["task0"], "wider": wider})
    assert "shape mismatch for key 'encoder.layer.0.intermediate.dense.bias'" in message
    assert "(37,)" in message and "(40,)" in message and str(wider) in message and str(base) in message


def test_shape_mismatch_in_a_table_is_not_taken_for_a_head(bert, tmp_path):
    """A position table of another length differs only in its first dimension, like a head, but is not one."""
    base, experts = bert
    longer = expert_from_config(base, tmp_path / "longer", max_position_embeddings=70)
    message = incompatible(base, {"task0": experts["task0"], "longer": longer})
    assert "shape mismatch for key 'embeddings.position_embeddings.weight'" in message
    assert "(64, 32)" in message and "(70, 32)" in message


def test_dtype_mismatch(bert, tmp_path):
    base, experts = bert
    half = edited_copy(experts["task1"], tmp_path / "half",
                       edit=lambda s: {k: v.half() for k, v in s.items()})
    message = incompatible(base, {"task0": experts["task0"], "task1": half})
    first_key = CheckpointReader(base).keys()[0]
    assert f"dtype mismatch for key {first_key!r}" in message
    assert "torch.float32" in message and "torch.float16" in message and str(half) in message


def test_different_model_type(bert, tmp_path):
    base, experts = bert
    _, roberta = build_family(tmp_path, "roberta", n_experts=1)
    message = incompatible(base, {"task0": experts["task0"], "rob": roberta["task0"]})
    assert "different model_type" in message
    assert "'bert'" in message and "'roberta'" in message
    assert str(base) in message and str(roberta["task0"]) in message


@pytest.fixture(scope="module")
def bigger_vocab(bert, tmp_path_factory):
    """task1 fine-tuned after adding 6 tokens: its embedding table has 105 rows, the base's 99."""
    from transformers import AutoModelForSequenceClassification

    base, experts = bert
    model = AutoModelForSequenceClassification.from_pretrained(experts["task1"])
    model.resize_token_embeddings(105, mean_resizing=False)
    with torch.no_grad():
        model.bert.embeddings.word_embeddings.weight[99:] = 0.5
    target = tmp_path_factory.mktemp("vocab") / "task1-105"
    model.save_pretrained(target)
    return target


def test_vocabulary_mismatch_explains_base_rows(bert, bigger_vocab):
    base, experts = bert
    message = incompatible(base, {"task0": experts["task0"], "task1": bigger_vocab})
    assert "vocabulary size mismatch for 'embeddings.word_embeddings.weight'" in message
    assert "99 rows" in message and "'task1': 105" in message
    assert "added tokens" in message
    assert "vocab_policy: union" in message and "vocab_policy: base" in message
    assert "tokenizer_source: EXPERT" in message


def test_base_rows_merges_only_the_base_vocabulary(bert, bigger_vocab, tmp_path):
    from transformers import AutoModel

    base, experts = bert
    pair = {"task0": experts["task0"], "task1": bigger_vocab}
    before = tree_hashes([base, *pair.values()])
    merged = layermerge.merge(base, pair, "task_arithmetic", vocab_policy="base_rows", scaling=0.4,
                              quiet=True)
    base_state = CheckpointReader(base).state_dict()
    e0 = CheckpointReader(experts["task0"]).state_dict()
    e1 = CheckpointReader(bigger_vocab).state_dict()
    key = "embeddings.word_embeddings.weight"
    assert e1["bert." + key].shape == (105, 32)
    rows = e1["bert." + key][:99]  # only the base's 99 token rows of the grown table
    expected = base_state[key] + 0.4 * ((e0["bert." + key] - base_state[key]) + (rows - base_state[key]))
    assert merged.state_dict[key].shape == (99, 32)
    torch.testing.assert_close(merged.state_dict[key], expected, rtol=0, atol=1e-6)
    other = "encoder.layer.0.attention.self.value.bias"
    expected_other = base_state[other] + 0.4 * (e0["bert." + other] + e1["bert." + other]
                                                 - 2 * base_state[other])
    torch.testing.assert_close(merged.state_dict[other], expected_other, rtol=0, atol=1e-6)
    # Written out, it is the base's architecture (99 tokens) and loads as such.
    out = layermerge.merge(base, pair, "task_arithmetic", vocab_policy="base_rows", output=tmp_path / "out",
                           quiet=True)
    model = AutoModel.from_pretrained(out.path)
    assert model.config.vocab_size == 99
    assert "base_rows" in (out.path / "layermerge.yaml").read_text()
    assert tree_hashes([base, *pair.values()]) == before


def test_base_rows_refuses_a_smaller_vocabulary(tmp_path):
    from transformers import AutoModel

    torch.manual_seed(0)
    base = AutoModel.from_config(make_config("bert"))
    base.save_pretrained(tmp_path / "base")
    small = AutoModel.from_config(make_config("bert"))
    small.load_state_dict(base.state_dict())
    small.resize_token_embeddings(90, mean_resizing=False)
    small.save_pretrained(tmp_path / "small")
    message = incompatible(tmp_path / "base", {"small": tmp_path / "small"}, vocab_policy="base_rows")
    assert "fewer vocabulary rows" in message and "'small'" in message


@pytest.mark.parametrize("bad_value", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_non_finite_weight_stops_the_merge(bert, tmp_path, bad_value):
    base, experts = bert
    key = "bert.encoder.layer.1.attention.output.dense.weight"

    def poison(state):
        state[key] = state[key].clone()
        state[key][3, 5] = bad_value
        state[key][0, 0] = bad_value
        return state

    broken = edited_copy(experts["task1"], tmp_path / "inputs" / "broken", edit=poison)
    pair = {"task0": experts["task0"], "task1": broken}
    before = tree_hashes([base, *pair.values()])
    expert_set = ExpertSet(base, pair)  # metadata is fine: values are only seen while merging
    assert "encoder.layer.1.attention.output.dense.weight" in expert_set.report.merge_keys
    out = tmp_path / "outputs" / "merged"
    with pytest.raises(IncompatibleExpertsError) as info:
        layermerge.merge(base, pair, "task_arithmetic", output=out, quiet=True)
    message = str(info.value)
    assert "'task1'" in message and str(broken) in message
    assert "2 NaN/Inf values in 'encoder.layer.1.attention.output.dense.weight'" in message
    assert not out.exists()
    assert list((tmp_path / "outputs").iterdir()) == []  # no temp folder left either
    assert tree_hashes([base, *pair.values()]) == before


def test_expert_sharing_no_keys_with_the_base(bert, tmp_path):
    base, experts = bert
    (tmp_path / "other").mkdir()
    stranger = tmp_path / "other" / "weights.safetensors"
    save_file({"conv1.weight": torch.zeros(4, 3, 3, 3), "fc.bias": torch.zeros(10)}, str(stranger))
    message = incompatible(base, {"task0": experts["task0"], "stranger": stranger})
    assert "expert 'stranger'" in message and str(stranger) in message
    assert "shares no parameter names" in message
    assert "'conv1.weight'" in message and "'embeddings.word_embeddings.weight'" in message


def test_no_experts():
    with pytest.raises(IncompatibleExpertsError, match="no experts"):
        ExpertSet(None, {})


# --------------------------------------------------------------------------- heads and prefixes
def test_heads_are_kept_per_task_never_merged(bert):
    base, experts = bert
    expert_set = ExpertSet(base, experts)
    assert expert_set.report.head_keys == {t: ["classifier.bias", "classifier.weight"] for t in experts}
    assert not any("classifier" in k for k in expert_set.report.merge_keys)
    merged = layermerge.merge(base, experts, "task_arithmetic", quiet=True)
    assert not any("classifier" in k for k in merged.state_dict)
    for labels, (task, folder) in enumerate(experts.items(), start=2):
        own = CheckpointReader(folder)
        assert merged.heads[task]["classifier.weight"].shape == (labels, 32)
        for key, tensor in merged.heads[task].items():
            assert torch.equal(tensor, own.get(key))
        assert merged.head_meta[task]["prefix"] == "bert."


def test_heads_with_equal_label_counts_are_still_not_merged(bert, tmp_path):
    """Same shapes, so they could be averaged, but a head belongs to its task."""
    base, _ = bert
    experts = {f"t{i}": expert_from_config(base, tmp_path / f"t{i}", num_labels=2, seed=i) for i in range(2)}
    merged = layermerge.merge(base, experts, "average", quiet=True)
    heads = {t: CheckpointReader(p).get("classifier.weight") for t, p in experts.items()}
    assert not torch.equal(heads["t0"], heads["t1"])
    for task in experts:
        assert torch.equal(merged.heads[task]["classifier.weight"], heads[task])


def test_prefix_detection():
    base_keys = {"embeddings.weight", "encoder.0.weight", "encoder.1.weight"}
    prefixed = ["bert." + k for k in sorted(base_keys)] + ["classifier.weight"]
    assert detect_prefix(base_keys, prefixed) == "bert."
    assert detect_prefix(base_keys, sorted(base_keys) + ["classifier.weight"]) == ""
    assert detect_prefix(base_keys, ["x.y", "z"]) == ""


@pytest.mark.parametrize("family, prefix", [("bert", "bert."), ("gpt2", "transformer."), ("llama", "model."),
                                            ("vit", "vit.")])
def test_prefix_of_real_task_models(family_models, family, prefix):
    base, experts = family_models[family]
    expert_set = ExpertSet(base, experts)
    assert [e.prefix for e in expert_set.experts] == [prefix] * len(experts)
    assert len(expert_set.report.merge_keys) == len(CheckpointReader(base).keys())


def test_expert_without_a_prefix(bert, tmp_path):
    """An expert saved as the bare backbone (AutoModel) merges with prefixed ones."""
    from transformers import AutoModel

    base, experts = bert
    bare = AutoModel.from_pretrained(experts["task0"])
    bare.save_pretrained(tmp_path / "bare")
    expert_set = ExpertSet(base, {"bare": tmp_path / "bare", "task1": experts["task1"]})
    assert [e.prefix for e in expert_set.experts] == ["", "bert."]
    assert expert_set.report.head_keys["bare"] == []


def test_declared_head_keys_are_kept_per_task(bert, tmp_path):
    base, experts = bert
    merged = layermerge.merge(base, experts, "task_arithmetic", head_keys=["pooler."],
                              output=tmp_path / "out", quiet=True)
    out = CheckpointReader(tmp_path / "out")
    assert not any("pooler" in k for k in out.keys())
    assert "pooler.dense.weight" in CheckpointReader(base).keys()
    for task, folder in experts.items():
        head = CheckpointReader(tmp_path / "out" / "heads" / task)
        assert sorted(head.keys()) == ["bert.pooler.dense.bias", "bert.pooler.dense.weight",
                                       "classifier.bias", "classifier.weight"]
        own = CheckpointReader(folder)
        for key in head.keys():
            assert torch.equal(head.get(key), own.get(key))
        model = layermerge.load_task_model(merged.path, task)
        assert torch.equal(model.bert.pooler.dense.weight, own.get("bert.pooler.dense.weight"))
    assert "pooler." in (tmp_path / "out" / "layermerge.yaml").read_text()


def test_integer_buffers_only_the_base_stores_are_carried_from_the_base(tmp_path):
    """Older checkpoints store ``embeddings.position_ids``; experts saved by newer transformers do not.
    Such non-float buffers are kept as the base has them instead of failing as missing keys."""
    from safetensors.torch import save_file

    import layermerge

    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(4, 3, generator=generator)
    positions = torch.arange(6).unsqueeze(0)
    save_file({"w": weight, "embeddings.position_ids": positions}, str(tmp_path / "base.safetensors"))
    experts = {}
    for index in range(2):
        path = tmp_path / f"e{index}.safetensors"
        save_file({"w": weight + index + 1.0}, str(path))
        experts[f"e{index}"] = path
    expert_set = ExpertSet(tmp_path / "base.safetensors", experts)
    assert "embeddings.position_ids" in expert_set.report.merge_keys
    assert any("position_ids" in note for note in expert_set.report.notes)
    for method in ("task_arithmetic", "ties", "dare_ties"):
        merged = layermerge.merge(tmp_path / "base.safetensors", experts, method, quiet=True)
        assert torch.equal(merged.state_dict["embeddings.position_ids"], positions), method
    merged = layermerge.merge(tmp_path / "base.safetensors", experts, "task_arithmetic", scaling=0.5, quiet=True)
    assert torch.allclose(merged.state_dict["w"], weight + 1.5)
    # A float tensor missing from an expert is still an error.
    save_file({"w": weight, "b": torch.zeros(3)}, str(tmp_path / "base2.safetensors"))
    with pytest.raises(IncompatibleExpertsError, match="missing 1 keys"):
        ExpertSet(tmp_path / "base2.safetensors", experts)
