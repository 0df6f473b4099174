"""A user's own tasks end to end from the command line: fine-tune, data-driven merge from YAML, eval.

Three tasks written by the tests as a new user would: a two-class task in JSONL with label names, a
regression task in CSV, and a prompt -> completion task for a tiny causal language model. Each goes
through ``layermerge finetune``, a ProDistill merge from a YAML config whose ``data:`` section names
the task (by file or inline), and ``layermerge eval``. The built-in GLUE tasks, now specs of the same
kind, must score exactly as before the change.
"""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path

import pytest
import torch
from tinytext import SENTENCES, build_tiny_causal_base, build_tiny_text_base, write_generation_task

from layermerge.cli import main

SHARED_DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
needs_data = pytest.mark.skipif(not (SHARED_DATA / "glue").is_dir(), reason="needs ../shared/data")

POSITIVE = ["a good film", "what a great cast", "fine acting", "lovely music"]
NEGATIVE = ["a bad film", "dull and slow", "poor script", "boring plot"]


def write_reviews(folder: Path, rows: int = 32) -> Path:
    """JSONL files with fields 'review' and 'sentiment' (label names), and their spec."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    for split in ("train", "test"):
        lines = []
        for i in range(rows):
            good = i % 2 == 0
            lines.append(json.dumps({"review": rng.choice(POSITIVE if good else NEGATIVE),
                                     "sentiment": "positive" if good else "negative"}))
        (folder / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    spec = folder / "task.yaml"
    spec.write_text("name: reviews\ntype: classification\ntext: review\nlabel: sentiment\n"
                    "labels: [negative, positive]\nmetric: accuracy\n"
                    "files: {train: train.jsonl, test: test.jsonl}\n")
    return spec


def write_ratings(folder: Path, rows: int = 32) -> dict:
    """A CSV regression task (score in [0, 5]); returns its spec as an inline mapping."""
    folder.mkdir(parents=True, exist_ok=True)
    for split in ("train", "test"):
        with open(folder / f"{split}.csv", "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["text", "score"])
            for i in range(rows):
                writer.writerow([SENTENCES[i % len(SENTENCES)], f"{(i % 6) * 0.9:.1f}"])
    return {"name": "ratings", "type": "regression", "text": "text", "label": "score", "range": [0, 5],
            "files": {"train": str(folder / "train.csv"), "test": str(folder / "test.csv")}}


def run_cli(args, capsys) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def marker(folder: Path) -> dict:
    return json.loads((folder / "layermerge_finetune.json").read_text())


@pytest.fixture(scope="module")
def text_setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("own_text")
    base = build_tiny_text_base(root / "base")
    reviews = write_reviews(root / "reviews")
    ratings = write_ratings(root / "ratings")
    ratings_spec = root / "ratings.yaml"
    ratings_spec.write_text(json.dumps(ratings))          # JSON is YAML
    return root, base, reviews, ratings, ratings_spec


def test_classification_and_regression_tasks_through_finetune_merge_and_eval(text_setup, capsys):
    root, base, reviews, ratings, ratings_spec = text_setup
    experts = {}
    for name, spec in (("reviews", reviews), ("ratings", ratings_spec)):
        code, out, err = run_cli(["finetune", base, "--task", spec, "-o", root / f"expert-{name}", "--epochs", 10,
                                  "--lr", "2e-3", "--batch-size", 8, "-q"], capsys)
        assert code == 0, err
        experts[name] = Path(out.strip())
        record = marker(experts[name])
        assert record["task"] == name and record["task_spec"]["name"] == name
    assert marker(experts["ratings"])["task_spec"]["type"] == "regression"
    # The expert learned its task: it beats the untouched base's head on the test split.
    code, out, err = run_cli(["eval", experts["reviews"], "-q", "-o", root / "report-reviews"], capsys)
    assert code == 0, err
    expert_score = json.loads((root / "report-reviews" / "report.json").read_text())["rows"][0]["scores"]["reviews"]
    assert expert_score >= 75.0

    config = root / "merge.yaml"
    config.write_text(
        f"base: {base}\nexperts: {{reviews: {experts['reviews']}, ratings: {experts['ratings']}}}\n"
        "method: prodistill\nparams: {epochs: 2}\n"
        f"data:\n  shots: 8\n  tasks:\n    reviews: reviews/task.yaml\n    ratings: {{task: {json.dumps(ratings)}}}\n")
    code, out, err = run_cli(["merge", config, "-o", root / "merged", "-q"], capsys)
    assert code == 0, err
    summary = json.loads((root / "merged" / "layermerge_summary.json").read_text())
    assert summary["method"] == "prodistill"
    # Without --tasks, each head is scored on the task the merge recorded for it.
    code, out, err = run_cli(["eval", root / "merged", "-q", "--experts",
                              f"reviews={experts['reviews']},ratings={experts['ratings']}",
                              "-o", root / "report-merged"], capsys)
    assert code == 0, err
    report = json.loads((root / "report-merged" / "report.json").read_text())
    assert report["metrics"] == {"reviews": "accuracy", "ratings": "pearson_spearman"}
    merged_row = report["rows"][-1]["scores"]
    assert set(merged_row) == {"reviews", "ratings"} and all(0 <= v <= 100 or v < 0 for v in merged_row.values())
    # Naming a head explicitly (HEAD=TASK) gives the same score as the recorded mapping.
    code, out, err = run_cli(["eval", root / "merged", "-q", "--task", f"reviews={reviews}",
                              "-o", root / "report-head"], capsys)
    assert code == 0, err
    again = json.loads((root / "report-head" / "report.json").read_text())["rows"][-1]["scores"]["reviews"]
    assert again == merged_row["reviews"]


def test_user_task_cache_key_follows_the_spec(text_setup, capsys, tmp_path):
    """Editing a spec (here the label order) must not return the expert trained on the old one."""
    root, base, reviews, _, _ = text_setup
    from layermerge.finetune import find_cached_expert, finetune

    first = finetune(base, reviews, cache_dir=tmp_path, quiet=True, epochs=1, batch_size=8)
    assert find_cached_expert(base, reviews, cache_dir=tmp_path, settings=None) is None  # other settings
    flipped = tmp_path / "flipped.yaml"
    flipped.write_text(reviews.read_text().replace("[negative, positive]", "[positive, negative]")
                       .replace("train.jsonl", str(reviews.parent / "train.jsonl"))
                       .replace("test.jsonl", str(reviews.parent / "test.jsonl")))
    second = finetune(base, flipped, cache_dir=tmp_path, quiet=True, epochs=1, batch_size=8)
    assert first.key != second.key and not second.cached


@pytest.fixture(scope="module")
def generation_setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("own_generation")
    base = build_tiny_causal_base(root / "base")
    specs = {"affirm": write_generation_task(root / "affirm", "affirm", "yes"),
             "deny": write_generation_task(root / "deny", "deny", "no")}
    return root, base, specs


def test_generation_task_through_finetune_merge_and_eval(generation_setup, capsys):
    root, base, specs = generation_setup
    experts = {}
    for name, spec in specs.items():
        code, out, err = run_cli(["finetune", base, "--task", spec, "-o", root / f"expert-{name}", "--epochs", 8,
                                  "--lr", "3e-3", "--batch-size", 8, "-q"], capsys)
        assert code == 0, err
        experts[name] = Path(out.strip())
    # Each expert learned to answer its task; the base cannot.
    code, out, err = run_cli(["eval", base, "--task", specs["affirm"], "-q", "-o", root / "report-base"], capsys)
    assert code == 0, err
    base_score = json.loads((root / "report-base" / "report.json").read_text())["rows"][0]["scores"]["affirm"]
    code, out, err = run_cli(["eval", experts["affirm"], "-q", "-o", root / "report-affirm"], capsys)
    assert code == 0, err
    report = json.loads((root / "report-affirm" / "report.json").read_text())
    assert report["metrics"] == {"affirm": "exact_match"}
    assert report["rows"][0]["scores"]["affirm"] >= 90.0 > base_score

    config = root / "merge.yaml"
    config.write_text(f"base: {base}\nexperts: {{affirm: {experts['affirm']}, deny: {experts['deny']}}}\n"
                      "method: prodistill\nparams: {epochs: 2}\n"
                      "data:\n  shots: 8\n  tasks:\n    affirm: affirm/affirm.yaml\n"
                      "    deny: {task: deny/deny.yaml, include_completion: false}\n")
    code, out, err = run_cli(["merge", config, "-o", root / "merged", "-q"], capsys)
    assert code == 0, err
    summary = json.loads((root / "merged" / "layermerge_summary.json").read_text())
    assert summary["method"] == "prodistill"
    code, out, err = run_cli(["eval", root / "merged", "--task", specs["affirm"], "--task", specs["deny"], "-q",
                              "-o", root / "report-merged"], capsys)
    assert code == 0, err
    scores = json.loads((root / "report-merged" / "report.json").read_text())["rows"][-1]["scores"]
    assert set(scores) == {"affirm", "deny"}


def test_generation_fine_tuning_loss_covers_the_completion_only(generation_setup):
    """The fine-tuning loss is next-token cross-entropy on the completion's tokens (and end-of-text): no
    gradient reaches the logits of prompt or padding positions, and its value is the hand-computed mean."""
    from layermerge.data import GenerationCollator, get_task, load_split
    from layermerge.data.models import load_tokenizer
    from layermerge.finetune import task_loss

    root, base, specs = generation_setup
    task = get_task(specs["affirm"])
    rows = [dict(row, question=row["question"] * (1 + i % 2))
            for i, row in enumerate(load_split(task, "train").rows[:4])]
    batch = GenerationCollator(load_tokenizer(base), task, 64, with_labels=True)(rows)
    ids, labels = batch["input_ids"], batch["labels"]
    logits = torch.randn(*ids.shape, 60, generator=torch.Generator().manual_seed(0), requires_grad=True)
    loss = task_loss(task, logits, labels)
    loss.backward()
    predicts_completion = torch.zeros_like(ids, dtype=torch.bool)
    predicts_completion[:, :-1] = labels[:, 1:] != -100
    touched = logits.grad.abs().sum(-1) > 0
    assert torch.equal(touched, predicts_completion)
    assert predicts_completion.sum() == 4 * len("yes<") and (labels[labels != -100] != 0).all()
    manual = torch.stack([torch.nn.functional.cross_entropy(logits[i, t].detach(), ids[i, t + 1])
                          for i, t in predicts_completion.nonzero().tolist()]).mean()
    assert loss.item() == pytest.approx(manual.item(), rel=1e-6)


def test_batched_left_padded_generation_equals_one_at_a_time(generation_setup):
    from layermerge.data import get_task, load_split
    from layermerge.data.models import load_hf_model, load_tokenizer
    from layermerge.eval.generation import generate_answers

    root, base, specs = generation_setup
    task = get_task(specs["affirm"])
    model = load_hf_model(base, "AutoModelForCausalLM", "causal LM", dtype=torch.float32).eval()
    tokenizer = load_tokenizer(base)
    data = load_split(task, "test").take(8, 0)
    # Prompts of different lengths, so left padding differs between rows of a batch.
    rows = [dict(row, question=row["question"] * (1 + i % 3)) for i, row in enumerate(data.rows)]
    data = type(data)(task, "test", rows, "test")
    batched = generate_answers(model, tokenizer, task, data, batch_size=8)
    single = generate_answers(model, tokenizer, task, data, batch_size=1)
    assert batched == single and any(batched)


@needs_data
def test_builtin_glue_tasks_score_as_before_the_change(tmp_path):
    """Scores of a seeded tiny classifier on 64 test examples, recorded with the code before tasks became
    specs (commit 574c627): same examples, same labels, same metric."""
    import shutil

    from conftest import make_config
    from transformers import BertForSequenceClassification

    from layermerge.eval.evaluate import evaluate_task

    recorded = {"sst2": 48.4375, "mrpc": 71.07886904761905, "stsb": -0.18659718112764456, "cola": 0.0,
                "mnli": 35.9375}
    base = build_tiny_text_base(tmp_path / "base")
    for task, labels in (("sst2", 2), ("mrpc", 2), ("stsb", 1), ("cola", 2), ("mnli", 3)):
        torch.manual_seed(1)
        model = BertForSequenceClassification(make_config("bert", num_labels=labels))
        if labels == 1:
            model.config.problem_type = "regression"
        model.save_pretrained(tmp_path / task)
        for file in base.iterdir():
            if "token" in file.name or "vocab" in file.name or "special" in file.name:
                shutil.copy(file, tmp_path / task / file.name)
        # STS-B's correlation of a random model's near-equal outputs moves with the CPU's float32 rounding
        # (recorded on an Intel host; an AMD EPYC gives -0.18725): the other metrics count labels
        tolerance = 5e-3 if task == "stsb" else 1e-9
        assert evaluate_task(tmp_path / task, task, "test", 64).score == pytest.approx(recorded[task], abs=tolerance)


def test_bench_track_with_a_spec_file_and_an_inline_spec(text_setup, capsys):
    """A track's tasks may be spec files (relative to the track file) and inline specs; the data-driven rows
    get those tasks in their merge configs."""
    import yaml

    root, base, reviews, ratings, _ = text_setup
    track = root / "own-track.yaml"
    track.write_text(yaml.safe_dump({
        "name": "own", "base": str(base), "tasks": ["reviews/task.yaml", ratings],
        "recipe": {"epochs": 2, "lr": 2e-3, "batch_size": 8, "max_length": 32},
        "eval_examples": 16, "max_length": 32, "shots": 4, "seeds": [0],
        "methods": ["task_arithmetic", "prodistill"], "method_params": {"prodistill": {"epochs": 1}}}))
    code, out, err = run_cli(["bench", track, "--cache-dir", root / "bench-cache", "--workdir", root / "bench-work",
                              "--report-dir", root / "bench-report", "--quiet"], capsys)
    assert code == 0, err
    results = json.loads((root / "bench-report" / "own.json").read_text())
    assert results["tasks"] == ["reviews", "ratings"]
    rows = {row["row"]: row for row in results["rows"]}
    assert set(rows) == {"task_arithmetic", "prodistill"} and not rows["prodistill"]["failures"]
    assert set(rows["prodistill"]["runs"][0]["scores"]) == {"reviews", "ratings"}
    assert results["metrics"] == {"reviews": "accuracy", "ratings": "pearson_spearman"}
    assert set(results["references"]["ensemble"]["scores"]) == {"reviews", "ratings"}
