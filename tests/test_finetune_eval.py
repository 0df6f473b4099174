"""Fine-tuning (with its cache), evaluation of experts and merged folders, reports, and the CLI."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tree_hashes
from sklearn.metrics import accuracy_score
from tinytext import build_tiny_text_base

import layermerge
from layermerge.cli import main
from layermerge.data import get_task, load_split, load_tokenizer
from layermerge.data.models import forward_logits, load_model
from layermerge.errors import ConfigError, OutputError
from layermerge.eval import evaluate, new_report
from layermerge.eval.evaluate import TaskResult
from layermerge.experts import ExpertSet
from layermerge.finetune import MARKER, find_cached_expert, finetune, make_settings, vision_base_folder
from layermerge.io.reader import CheckpointReader

pytestmark = pytest.mark.skipif(layermerge.data.find_data_dir() is None, reason="shared data not present")

TEXT = dict(max_train_examples=48, batch_size=16, max_length=32, lr=1e-3)
VISION = dict(max_train_examples=512, epochs=4, batch_size=16, lr=1e-2)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny BERT base and two experts (sst2: 2 labels, stsb: regression) plus two small-CNN experts."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("finetune")
    base = build_tiny_text_base(root / "tiny-bert")
    cache = root / "cache"
    experts = {task: finetune(base, task, cache_dir=cache, quiet=True, **TEXT) for task in ("sst2", "stsb")}
    vision = {task: finetune("vision:small-cnn", task, cache_dir=cache, quiet=True, **VISION)
              for task in ("mnist", "fashion_mnist")}
    return {"root": root, "base": base, "cache": cache, "experts": experts, "vision": vision}


# --------------------------------------------------------------------------- fine-tuning
def test_finetune_writes_a_loadable_expert_and_changes_every_backbone_tensor(tiny):
    result = tiny["experts"]["sst2"]
    folder = result.path
    assert not result.cached and folder.parent == tiny["cache"] / "experts"
    names = {p.name for p in folder.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", MARKER} <= names
    record = json.loads((folder / MARKER).read_text())
    assert record["key"] == result.key and record["train_examples"] == 48 and record["steps"] == 3
    config = json.loads((folder / "config.json").read_text())
    assert config["architectures"] == ["BertForSequenceClassification"]
    assert len(config["id2label"]) == 2
    base, expert = CheckpointReader(tiny["base"]), CheckpointReader(folder)
    changed = [k for k in base.keys() if not torch.equal(base.get(k), expert.get("bert." + k))]
    assert len(changed) == len(base.keys())          # full fine-tuning: no tensor is frozen
    stsb = json.loads((tiny["experts"]["stsb"].path / "config.json").read_text())
    assert len(stsb["id2label"]) == 1 and stsb["problem_type"] == "regression"


def test_second_call_is_a_cache_hit_and_settings_change_the_key(tiny):
    first = tiny["experts"]["sst2"]
    before = tree_hashes([first.path])
    mtime = (first.path / "model.safetensors").stat().st_mtime_ns
    again = finetune(tiny["base"], "sst2", cache_dir=tiny["cache"], quiet=True, **TEXT)
    assert again.cached and again.path == first.path and again.key == first.key
    assert tree_hashes([first.path]) == before
    assert (first.path / "model.safetensors").stat().st_mtime_ns == mtime
    other = finetune(tiny["base"], "sst2", cache_dir=tiny["cache"], quiet=True, **{**TEXT, "seed": 1})
    assert other.key != first.key and other.path != first.path and not other.cached


def test_find_cached_expert_looks_up_without_training_or_writing(tiny, tmp_path):
    first = tiny["experts"]["sst2"]
    found = find_cached_expert(tiny["base"], "sst2", cache_dir=tiny["cache"], settings=make_settings(**TEXT))
    assert found is not None and found.cached and (found.path, found.key) == (first.path, first.key)
    vision = find_cached_expert("vision:small-cnn", "mnist", cache_dir=tiny["cache"], settings=make_settings(**VISION))
    assert vision is not None and vision.key == tiny["vision"]["mnist"].key
    # other settings, or another cache: nothing found, and nothing created there
    assert find_cached_expert(tiny["base"], "sst2", cache_dir=tiny["cache"],
                              settings=make_settings(**{**TEXT, "lr": 5e-4})) is None
    empty = tmp_path / "empty"
    assert find_cached_expert(tiny["base"], "sst2", cache_dir=empty, settings=make_settings(**TEXT)) is None
    assert not empty.exists()
    with pytest.raises(ConfigError, match="needs a vision model"):
        find_cached_expert(tiny["base"], "mnist", cache_dir=tiny["cache"])


def test_finetune_is_deterministic(tiny, tmp_path):
    repeat = finetune(tiny["base"], "sst2", output=tmp_path / "again", quiet=True, **TEXT)
    a = CheckpointReader(tiny["experts"]["sst2"].path)
    b = CheckpointReader(repeat.path)
    assert all(torch.equal(a.get(k), b.get(k)) for k in a.keys())


def test_explicit_output_refuses_to_replace_a_foreign_folder(tiny, tmp_path):
    target = tmp_path / "taken"
    target.mkdir()
    (target / "notes.txt").write_text("mine")
    with pytest.raises(OutputError, match="--overwrite"):
        finetune(tiny["base"], "sst2", output=target, quiet=True, **TEXT)
    assert (target / "notes.txt").read_text() == "mine"
    with pytest.raises(ConfigError, match="lr"):
        finetune(tiny["base"], "sst2", output=tmp_path / "x", quiet=True, lr=-1.0)
    with pytest.raises(ConfigError, match="needs a vision model"):
        finetune(tiny["base"], "mnist", output=tmp_path / "y", quiet=True)


def test_vision_expert_learns_and_reloads(tiny):
    result = tiny["vision"]["mnist"]
    config = json.loads((result.path / "config.json").read_text())
    assert config["layermerge_vision"]["factory"] == "small-cnn" and config["num_labels"] == 10
    score = evaluate(result.path, ["mnist"], max_examples=300, quiet=True)["mnist"].score
    assert score > 60.0        # chance is 10%; the small CNN reaches ~85% from 512 images


# --------------------------------------------------------------------------- evaluation
def test_evaluate_matches_a_plain_one_by_one_computation(tiny):
    """Length-grouped batches with padding must give the predictions of unbatched inference."""
    folder = tiny["experts"]["sst2"].path
    model, tokenizer = load_model(folder, get_task("sst2")), load_tokenizer(folder)
    data = load_split("sst2", "test").take(40, seed=0)
    predictions = []
    with torch.no_grad():
        for row in data.rows:
            batch = dict(tokenizer(row["sentence"], truncation=True, max_length=32, return_tensors="pt"))
            predictions.append(int(forward_logits(model, batch).argmax(-1)))
    expected = 100 * accuracy_score(data.labels, predictions)
    result = evaluate(folder, ["sst2"], max_examples=40, max_length=32, batch_size=16, quiet=True)["sst2"]
    assert result.examples == 40 and result.score == pytest.approx(expected)


def test_merge_of_one_expert_at_scale_one_scores_like_the_expert(tiny, tmp_path):
    """task_arithmetic with λ=1 and one expert rebuilds the expert: merged and expert scores agree."""
    expert = tiny["experts"]["stsb"].path
    layermerge.merge(tiny["base"], {"stsb": expert}, "task_arithmetic", output=tmp_path / "m", quiet=True,
                     scaling=1.0)
    merged = evaluate(tmp_path / "m", ["stsb"], max_examples=60, max_length=32, quiet=True)["stsb"]
    alone = evaluate(expert, ["stsb"], max_examples=60, max_length=32, quiet=True)["stsb"]
    assert merged.score == pytest.approx(alone.score, abs=1e-3)
    assert set(merged.parts) == {"pearson", "spearman"}


@pytest.mark.parametrize("method", ["task_arithmetic", "emr"])
def test_vision_merge_evaluates_per_task_heads(tiny, tmp_path, method):
    if method not in layermerge.available_methods():
        pytest.skip(f"{method} is not registered")
    base = vision_base_folder("small-cnn", tiny["cache"])
    experts = {t: r.path for t, r in tiny["vision"].items()}
    # Both experts have ten classes: the head is found from the prefix their vision config records.
    expert_set = ExpertSet(base, experts)
    assert expert_set.head_prefixes == ["fc."]
    assert all(key.startswith("fc.") for keys in expert_set.report.head_keys.values() for key in keys)
    assert all(keys for keys in expert_set.report.head_keys.values())
    layermerge.merge(base, experts, method, output=tmp_path / "vm", quiet=True)
    heads = sorted(p.name for p in (tmp_path / "vm" / "heads").iterdir())
    assert heads == ["fashion_mnist", "mnist"]
    mnist_head = CheckpointReader(tmp_path / "vm" / "heads" / "mnist").state_dict()
    expert_head = CheckpointReader(experts["mnist"]).state_dict()
    assert mnist_head and all(torch.equal(t, expert_head[k]) for k, t in mnist_head.items())
    results = evaluate(tmp_path / "vm", ["mnist", "fashion_mnist"], max_examples=100, quiet=True)
    assert set(results) == {"mnist", "fashion_mnist"} and all(0 <= r.score <= 100 for r in results.values())
    if method == "emr":     # per-task masks and rescalers make each task's model its own
        mnist = load_model(tmp_path / "vm", get_task("mnist")).state_dict()
        fashion = load_model(tmp_path / "vm", get_task("fashion_mnist")).state_dict()
        assert not torch.equal(mnist["features.0.weight"], fashion["features.0.weight"])


def test_report_normalises_by_expert_scores_and_skips_non_positive_ones(tmp_path):
    def result(task, score):
        return TaskResult(task, get_task(task).metric, score, {}, 10, "test")

    report = new_report(["sst2", "cola"], {"sst2": 80.0, "cola": 0.0})
    row = report.add("merged", {"sst2": result("sst2", 60.0), "cola": result("cola", 10.0)})
    assert report.normalised(row, "sst2") == pytest.approx(75.0)
    assert report.normalised(row, "cola") is None and report.normalised_average(row) is None
    assert report.average(row) == pytest.approx(35.0)
    md, js = report.write(tmp_path)
    data = json.loads(js.read_text())
    assert data["rows"][0]["normalised"] == {"sst2": 75.0} and data["rows"][0]["average"] == 35.0
    assert "| merged | 60.0 | 10.0 | 35.0 | — |" in md.read_text()


# --------------------------------------------------------------------------- command line
def test_cli_eval_of_a_merged_folder_writes_reports(tiny, tmp_path, capsys):
    experts = {t: r.path for t, r in tiny["vision"].items()}
    base = vision_base_folder("small-cnn", tiny["cache"])
    layermerge.merge(base, experts, "average", output=tmp_path / "merged", head_keys=["fc."], quiet=True)
    inputs = tree_hashes([base, *experts.values()])
    pairs = ",".join(f"{t}={d}" for t, d in experts.items())
    code = main(["eval", str(tmp_path / "merged"), "--experts", pairs, "--max-examples", "200",
                 "--output", str(tmp_path / "rep"), "--quiet"])
    assert code == 0
    out = capsys.readouterr().out
    assert "experts" in out and "average" in out
    data = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert data["tasks"] == ["fashion_mnist", "mnist"]
    assert [r["name"] for r in data["rows"]] == ["experts", "average"]
    experts_row, merged_row = data["rows"]
    assert experts_row["normalised_average"] == pytest.approx(100.0)
    for task in data["tasks"]:
        assert experts_row["scores"][task] > 40      # both experts learned their task
        expected = 100 * merged_row["scores"][task] / experts_row["scores"][task]
        assert merged_row["normalised"][task] == pytest.approx(expected)
    assert merged_row["normalised_average"] == pytest.approx(sum(merged_row["normalised"].values()) / 2)
    assert (tmp_path / "rep" / "report.md").read_text().startswith("## Evaluation of")
    assert tree_hashes([base, *experts.values()]) == inputs


def test_cli_eval_of_a_merged_text_folder_defaults_to_its_heads(tiny, tmp_path, capsys):
    experts = {t: r.path for t, r in tiny["experts"].items()}
    layermerge.merge(tiny["base"], experts, "task_arithmetic", output=tmp_path / "merged", quiet=True)
    args = ["eval", str(tmp_path / "merged"), "--max-examples", "20", "--max-length", "32", "--quiet"]
    assert main(args) == 0
    header, _, row = capsys.readouterr().out.splitlines()[:3]
    assert header.split()[:3] == ["model", "sst2", "stsb"] and row.split()[0] == "task_arithmetic"


def test_cli_finetune_prints_the_folder_and_user_errors_exit_2(tiny, tmp_path, capsys):
    args = ["finetune", str(tiny["base"]), "--task", "sst2", "--cache-dir", str(tiny["cache"]), "--quiet",
            "--max-train-examples", "48", "--batch-size", "16", "--max-length", "32", "--lr", "1e-3"]
    assert main(args) == 0
    assert capsys.readouterr().out.strip() == str(tiny["experts"]["sst2"].path)
    for bad in (["finetune", str(tiny["base"]), "--task", "sst3"],
                ["finetune", str(tmp_path / "nope"), "--task", "sst2"],
                ["eval", str(tmp_path / "nope")],
                ["eval", str(tiny["experts"]["sst2"].path), "--experts", "sst2"],
                ["eval", str(tiny["experts"]["sst2"].path), "--tasks", "mnist"]):
        assert main(bad) == 2, bad
        err = capsys.readouterr().err
        assert err.startswith("layermerge: error: ") and err.count("\n") == 1, err


def test_cli_eval_of_an_expert_uses_its_recorded_task(tiny, capsys):
    folder = tiny["vision"]["mnist"].path
    assert main(["eval", str(folder), "--max-examples", "50", "--quiet"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:2] == ["model", "mnist"]


def test_threads_option_is_validated(capsys):
    assert main(["eval", ".", "--threads", "0"]) == 2
    assert "--threads" in capsys.readouterr().err
