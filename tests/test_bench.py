"""`layermerge bench` on a tiny track: experts, references, every stage, caching, report and plots."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from tinytext import build_tiny_text_base

import layermerge.bench.runner as runner
from layermerge.bench.results import normalised_average, summary
from layermerge.bench.tracks import BUILTIN_TRACKS, PRODISTILL_BUDGET, load_track
from layermerge.cli import main as cli_main
from layermerge.data import find_data_dir
from layermerge.demo import DEMO_METHOD_PARAMS
from layermerge.errors import ConfigError

pytestmark = pytest.mark.skipif(find_data_dir() is None, reason="shared data not present")

TINY_TRACK = {
    "name": "tiny",
    "description": "tiny BERT on two GLUE tasks",
    "tasks": ["sst2", "rte"],
    "recipe": {"max_train_examples": 48, "epochs": 1, "lr": 1e-3, "batch_size": 16, "max_length": 32},
    "eval_examples": 24, "max_length": 32, "shots": 4, "seeds": [0, 1],
    "methods": ["task_arithmetic", "ties", "dare_ties", "prodistill"],
    "method_params": {"prodistill": {"epochs": 2}},
    "ablations": {"shots": [{"label": "shots=2", "shots": 2}, {"label": "shots=4", "shots": 4}]},
    "ablation_seeds": [0],
}


@pytest.fixture(scope="module")
def tiny_bench(tmp_path_factory):
    """The tiny track run once through the CLI; later tests read its outputs."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("bench")
    base = build_tiny_text_base(root / "tiny-bert")
    track_file = root / "tiny.yaml"
    track_file.write_text(yaml.safe_dump({**TINY_TRACK, "base": str(base)}))
    args = ["bench", str(track_file), "--cache-dir", str(root / "cache"), "--workdir", str(root / "work"),
            "--report-dir", str(root / "report"), "--quiet"]
    code = cli_main(args)
    return {"root": root, "args": args, "code": code, "track_file": track_file,
            "results": json.loads((root / "report" / "tiny.json").read_text())}


def test_every_row_and_seed_is_run_and_reported(tiny_bench):
    assert tiny_bench["code"] == 0
    results = tiny_bench["results"]
    rows = {(r["study"], r["row"]): r for r in results["rows"]}
    assert set(rows) == {("main", "task_arithmetic"), ("main", "ties"), ("main", "dare_ties"),
                         ("main", "prodistill"), ("shots", "shots=2"), ("shots", "shots=4")}
    # Deterministic data-free methods run once; DARE (random) and data-driven methods once per seed.
    assert rows["main", "ties"]["seeds"] == [None]
    assert rows["main", "dare_ties"]["seeds"] == [0, 1] and rows["main", "dare_ties"]["params"]["seed"] in (0, 1)
    assert rows["main", "prodistill"]["seeds"] == [0, 1] and rows["main", "prodistill"]["shots"] == 4
    assert rows["shots", "shots=2"]["seeds"] == [0] and rows["shots", "shots=2"]["shots"] == 2
    assert results["eval_examples"] == {"sst2": 24, "rte": 24}
    for row in results["rows"]:
        assert not row["failures"]
        for run in row["runs"]:
            cost = run["cost"]
            assert cost["exit_code"] == 0 and cost["wall_s"] > 0 and cost["peak_rss_mib"] > 50
            assert cost["rss_vs_task_arithmetic"] > 0 and cost["time_vs_task_arithmetic"] > 0
    records = [json.loads(p.read_text()) for p in (tiny_bench["root"] / "work" / "runs").glob("prodistill-*.json")]
    assert records and all("blocks" in r["merge_summary"] or "omitted" in r["merge_summary"] for r in records)


def test_averages_and_normalised_scores_match_a_hand_computation(tiny_bench):
    results = tiny_bench["results"]
    experts = results["references"]["experts"]["scores"]
    for row in results["rows"]:
        for run in row["runs"]:
            by_hand = [100 * run["scores"][t] / experts[t] for t in results["tasks"] if experts[t] > 0]
            assert run["normalised"] == pytest.approx(sum(by_hand) / len(by_hand))
            assert run["average"] == pytest.approx(sum(run["scores"].values()) / 2)
        values = [run["normalised"] for run in row["runs"]]
        assert row["normalised"]["mean"] == pytest.approx(sum(values) / len(values), abs=1e-3)
    assert summary([1.0, 3.0]) == {"mean": 2.0, "std": pytest.approx(1.41421, abs=1e-3), "n": 2}
    # An expert at or below zero (a Matthews correlation can be) gives no ratio.
    assert normalised_average({"a": 50.0, "b": 10.0}, {"a": 100.0, "b": 0.0}) == 50.0


def test_ensemble_matches_logits_averaged_by_hand(tiny_bench):
    """The ensemble reference against an independent computation with transformers directly."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from layermerge.data.sources import load_split
    from layermerge.eval.metrics import task_score

    results = tiny_bench["results"]
    experts = results["meta"]["experts"]
    task = "sst2"
    data = load_split(task, "test").take(24, 0)
    tokenizer = AutoTokenizer.from_pretrained(experts[task])
    own = AutoModelForSequenceClassification.from_pretrained(experts[task]).eval()
    total = 0
    for name in ("sst2", "rte"):
        model = AutoModelForSequenceClassification.from_pretrained(experts[task]).eval()
        other = AutoModelForSequenceClassification.from_pretrained(experts[name])
        model.bert.load_state_dict(other.bert.state_dict())
        assert torch.equal(model.classifier.weight, own.classifier.weight)
        with torch.no_grad():
            rows = [data[i] for i in range(len(data))]
            batch = tokenizer([r["sentence"] for r in rows], padding=True, truncation=True, max_length=32,
                              return_tensors="pt")
            total = total + model(**batch).logits
    score, _ = task_score("accuracy", (total / 2).argmax(-1).numpy(), data.labels)
    assert results["references"]["ensemble"]["scores"][task] == pytest.approx(score, abs=1e-6)


def test_report_has_every_table_and_plot(tiny_bench):
    report = tiny_bench["root"] / "report"
    text = (report / "tiny.md").read_text()
    for heading in ("#### Every method", "#### ProDistill ablations", "#### Cost of the data-driven methods",
                    "*experts*", "*ensemble*", "shots=2", "- ProDistill: normalised average"):
        assert heading in text
    # "avg ÷ experts": the row's average over the experts' average (the published GLUE-8 normalisation)
    results = tiny_bench["results"]
    row = next(r for r in results["rows"] if r["row"] == "task_arithmetic")
    line = next(line for line in text.splitlines() if line.startswith("| task_arithmetic |"))
    divided = 100 * row["average"]["mean"] / results["references"]["experts"]["average"]
    assert line.split("|")[-3].strip() == f"{divided:.1f}"
    for kind in ("methods", "shots", "cost"):
        png = report / f"tiny-{kind}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"(tiny-{kind}.png)" in text


def test_splice_puts_the_tables_between_the_markers(tiny_bench, tmp_path):
    document = tmp_path / "docs" / "BENCH.md"
    document.parent.mkdir()
    document.write_text("# Benchmarks\n\nintro\n<!-- bench:tiny -->\nold table\n<!-- /bench:tiny -->\nafter\n")
    args = [*tiny_bench["args"], "--splice", str(document)]
    assert cli_main(args) == 0
    text = document.read_text()
    assert text.startswith("# Benchmarks\n\nintro\n<!-- bench:tiny -->\n### Track `tiny`")
    assert "old table" not in text and text.endswith("<!-- /bench:tiny -->\nafter\n")
    relative = Path(os.path.relpath(tiny_bench["root"] / "report", document.parent))
    assert f"]({relative}/tiny-methods.png)" in text
    document.write_text("no markers here\n")
    assert cli_main(args) == 2 and document.read_text() == "no markers here\n"


def test_a_rerun_reuses_every_record_and_rerun_recomputes_one_row(tiny_bench, monkeypatch, capsys):
    merged = []
    real = runner.measured_merge
    monkeypatch.setattr(runner, "measured_merge", lambda ctx, config, name: merged.append(config["method"])
                        or real(ctx, config, name))
    assert cli_main(tiny_bench["args"]) == 0
    assert merged == []                       # experts, references and every run came from the caches
    again = json.loads((tiny_bench["root"] / "report" / "tiny.json").read_text())
    assert [r["normalised"] for r in again["rows"]] == [r["normalised"] for r in tiny_bench["results"]["rows"]]
    assert cli_main([*tiny_bench["args"], "--rerun", "ties", "--only", "ties"]) == 0
    assert merged == ["task_arithmetic", "ties"]       # the same-invocation baseline, then the row itself


def test_seeds_runs_only_those_sampling_seeds(tiny_bench, monkeypatch):
    merged = []
    real = runner.measured_merge
    monkeypatch.setattr(runner, "measured_merge", lambda ctx, config, name: merged.append(
        (config["method"], config.get("data", {}).get("seed"))) or real(ctx, config, name))
    assert cli_main([*tiny_bench["args"], "--only", "prodistill", "--rerun", "prodistill", "--seeds", "1"]) == 0
    assert merged == [("task_arithmetic", None), ("prodistill", 1)]
    again = json.loads((tiny_bench["root"] / "report" / "tiny.json").read_text())
    prodistill = next(r for r in again["rows"] if r["row"] == "prodistill")
    assert prodistill["seeds"] == [0, 1]            # seed 0 still reported, from its record
    assert cli_main([*tiny_bench["args"], "--seeds", "one"]) == 2


def test_report_only_merges_nothing_and_leaves_missing_runs_out(tiny_bench, monkeypatch):
    monkeypatch.setattr(runner, "measured_merge", lambda *a: pytest.fail("--report-only must not merge"))
    work = tiny_bench["root"] / "work"
    shutil.copytree(work, tiny_bench["root"] / "work-partial")
    record = next(p for p in (tiny_bench["root"] / "work-partial" / "runs").glob("dare_ties-*.json"))
    record.unlink()
    args = [a if a != str(work) else str(tiny_bench["root"] / "work-partial") for a in tiny_bench["args"]]
    assert cli_main([*args, "--report-only", "--report-dir", str(tiny_bench["root"] / "partial")]) == 0
    results = json.loads((tiny_bench["root"] / "partial" / "tiny.json").read_text())
    dare = next(r for r in results["rows"] if r["row"] == "dare_ties")
    assert len(dare["seeds"]) == 1 and dare["normalised"]["n"] == 1
    assert f"| {dare['seeds'][0]} |" in (tiny_bench["root"] / "partial" / "tiny.md").read_text()


def test_earlier_results_fill_the_rows_without_records_and_are_marked(tiny_bench, monkeypatch, capsys):
    """`--earlier`: a row with no record here comes whole from an earlier results file, marked with its
    date; rows with records are this version's; only the reported studies are carried."""
    monkeypatch.setattr(runner, "measured_merge", lambda *a: pytest.fail("--report-only must not merge"))
    root = tiny_bench["root"]
    work = root / "work-earlier"
    shutil.copytree(root / "work", work)
    for pattern in ("ties-*.json", "prodistill-*.json"):     # main-table ties, and every ProDistill run
        for record in (work / "runs").glob(pattern):
            record.unlink()
    earlier = dict(tiny_bench["results"])
    earlier["meta"] = {**earlier["meta"], "date": "2026-01-02T03:04:05+00:00", "command": "layermerge bench tiny"}
    experts = earlier["references"]["experts"]
    earlier["references"] = {**earlier["references"],
                             "experts": {**experts, "scores": {**experts["scores"], "rte": 12.5}}}
    earlier_file = root / "earlier.json"
    earlier_file.write_text(json.dumps(earlier))
    args = [a if a != str(root / "work") else str(work) for a in tiny_bench["args"]]
    args = [*args, "--report-only", "--report-dir", str(root / "carried"), "--earlier", str(earlier_file)]
    assert cli_main(args) == 0
    results = json.loads((root / "carried" / "tiny.json").read_text())
    rows = {(r["study"], r["row"]): r for r in results["rows"]}
    before = {(r["study"], r["row"]): r for r in tiny_bench["results"]["rows"]}
    assert list(rows) == list(before)          # carried rows sit where the plan puts them, not at the end
    carried = {key for key, row in rows.items() if "carried" in row}
    assert carried == {("main", "ties"), ("main", "prodistill"), ("shots", "shots=2"), ("shots", "shots=4")}
    for key in carried:
        assert rows[key]["normalised"] == before[key]["normalised"] and rows[key]["runs"] == before[key]["runs"]
        assert rows[key]["carried"]["file"] == str(earlier_file)
    assert results["carried_from"][0]["rows"] == ["ties", "prodistill", "shots: shots=2", "shots: shots=4"]
    text = (root / "carried" / "tiny.md").read_text()
    now = tiny_bench["results"]["references"]["experts"]["scores"]["rte"]
    assert "| ties (2026-01-02) | data-free |" in text and "| task_arithmetic | data-free |" in text
    assert "| shots=2 (2026-01-02) | prodistill" in text
    assert f"- Rows marked (2026-01-02) are carried from `{earlier_file}` (`layermerge bench tiny`)" in text
    assert f"rte 12.5 (now {now:.1f}) on test" in text and "sst2" not in text.split("Rows marked")[1].split("\n")[0]
    # Only the studies being reported are carried: main alone leaves the ablation rows out.
    assert cli_main([*args, "--stages", "main"]) == 0
    results = json.loads((root / "carried" / "tiny.json").read_text())
    assert {(r["study"], r["row"]) for r in results["rows"] if "carried" in r} == {("main", "ties"),
                                                                                   ("main", "prodistill")}
    # Carrying from a report that itself carried rows keeps their first mark (where and when measured).
    second = root / "second.json"
    shutil.copy(root / "carried" / "tiny.json", second)
    for record in (work / "runs").glob("task_arithmetic-*.json"):
        record.unlink()
    assert cli_main([*args[:-1], str(second), "--stages", "main"]) == 0
    results = json.loads((root / "carried" / "tiny.json").read_text())
    marks = {r["row"]: r["carried"] for r in results["rows"] if "carried" in r}
    assert marks["ties"]["file"] == marks["prodistill"]["file"] == str(earlier_file)
    assert marks["task_arithmetic"]["file"] == str(second)
    assert [(entry["file"], entry["rows"]) for entry in results["carried_from"]] == [
        (str(second), ["task_arithmetic"]), (str(earlier_file), ["ties", "prodistill"])]
    assert "| task_arithmetic (20" in (root / "carried" / "tiny.md").read_text()


@pytest.mark.parametrize("content, message", [
    (None, "cannot read it"),
    ("{not json", "not JSON"),
    ('{"rows": []}', "not a `layermerge bench` results file"),
    ('{"track": [], "tasks": [], "rows": [], "meta": {}, "references": {}}', "not a `layermerge bench` results"),
    ('{"track": {"name": "other"}, "tasks": [], "rows": [], "meta": {}, "references": {}}',
     "holds results of track 'other', not 'tiny'"),
    ('{"track": {"name": "tiny"}, "tasks": ["rte"], "rows": [], "meta": {}, "references": {}}',
     "scored the tasks ['rte']"),
])
def test_a_bad_earlier_file_is_one_line_and_merges_nothing(tiny_bench, monkeypatch, capsys, tmp_path,
                                                            content, message):
    monkeypatch.setattr(runner, "measured_merge", lambda *a: pytest.fail("a bad --earlier must stop first"))
    earlier = tmp_path / "earlier.json"
    if content is not None:
        earlier.write_text(content)
    assert cli_main([*tiny_bench["args"], "--rerun", "ties", "--earlier", str(earlier)]) == 2
    error = capsys.readouterr().err.strip()
    assert message in error and len(error.splitlines()) == 1 and "Traceback" not in error


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA for the merge to fail")
def test_a_failing_merge_is_reported_and_not_cached(tiny_bench, capsys):
    """A merge that fails in its own process (no CUDA here) makes the row a failure, exit code 1."""
    runs = tiny_bench["root"] / "work" / "runs"
    before = {p.name: p.read_text() for p in runs.glob("*.json")}
    assert cli_main([*tiny_bench["args"], "--device", "cuda", "--only", "shots=2", "--rerun", "shots=2",
                     "--report-dir", str(tiny_bench["root"] / "failed")]) == 1
    results = json.loads((tiny_bench["root"] / "failed" / "tiny.json").read_text())
    failed = {r["row"]: r for r in results["rows"] if r["failures"]}
    assert set(failed) == {"shots=2"} and failed["shots=2"]["runs"] == []
    assert "cuda" in failed["shots=2"]["failures"][0].lower()
    assert "failed rows: shots=2" in capsys.readouterr().out
    # Rows outside --only still come from their records.
    assert {r["row"] for r in results["rows"]} >= {"ties", "prodistill"}
    assert {p.name: p.read_text() for p in runs.glob("*.json")} == before    # nothing cached or overwritten
    assert "| shots=2 | prodistill" in (tiny_bench["root"] / "failed" / "tiny.md").read_text()


def _tree(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in folder.rglob("*")} if folder.exists() else {}


def test_dry_run_marks_each_run_and_writes_nothing(tiny_bench, capsys):
    root = tiny_bench["root"]
    before = _tree(root)
    capsys.readouterr()
    assert cli_main([*tiny_bench["args"], "--dry-run", "--only", "ties,prodistill", "--seeds", "1",
                     "--rerun", "ties"]) == 0
    plan = capsys.readouterr().out
    assert "ties: ties {}  [to rerun]" in plan                       # selected and cached, but --rerun
    assert "prodistill seed 1: prodistill {'epochs': 2}, 4 shots  [cached]" in plan
    assert "prodistill seed 0: prodistill {'epochs': 2}, 4 shots  [not selected, cached]" in plan
    assert "task_arithmetic: task_arithmetic {}  [not selected, cached]" in plan
    assert plan.count("[") == 8 and "8 runs: " in plan and "stale" not in plan and "match no" not in plan
    assert _tree(root) == before
    # A fresh cache: experts unknown, every run still to make, and the cache is not created.
    fresh = root / "fresh-cache"
    args = [a if a != str(root / "cache") else str(fresh) for a in tiny_bench["args"]]
    assert cli_main([*args, "--workdir", str(root / "fresh-work"), "--dry-run"]) == 0
    plan = capsys.readouterr().out
    assert "experts: not all fine-tuned yet" in plan and "8 runs: 8 to run" in plan
    assert not fresh.exists() and not (root / "fresh-work").exists()
    assert cli_main([*args, "--workdir", str(root / "fresh-work"), "--prune"]) == 2
    assert "--stages experts" in capsys.readouterr().err


def test_prune_removes_only_records_no_planned_run_reads(tiny_bench, capsys):
    runs = tiny_bench["root"] / "work" / "runs"
    kept = {p.name: p.read_text() for p in runs.glob("*.json")}
    stale = runs / "ties-0123456789abcdef.json"          # as a run made with other settings would leave
    stale.write_text(next(iter(kept.values())))
    capsys.readouterr()
    assert cli_main([*tiny_bench["args"], "--dry-run"]) == 0
    assert f"1 record(s) in {runs} match no planned run" in capsys.readouterr().out and stale.is_file()
    assert cli_main([*tiny_bench["args"], "--prune"]) == 0
    assert f"removed {stale}" in capsys.readouterr().out
    assert {p.name: p.read_text() for p in runs.glob("*.json")} == kept


def test_track_errors_are_clear(tmp_path):
    with pytest.raises(ConfigError, match="unknown track 'glue9'.*glue8-minilm"):
        load_track("glue9")
    bad = tmp_path / "t.yaml"
    bad.write_text(yaml.safe_dump({"base": "x", "tasks": ["sst2"], "recipe": {}, "shotz": 3}))
    with pytest.raises(ConfigError, match="shotz"):
        load_track(bad)
    assert cli_main(["bench", "glue8-minilm", "--stages", "nonsense", "--dry-run"]) == 2


def test_builtin_tracks_follow_the_protocol(capsys):
    glue, vision = BUILTIN_TRACKS["glue8-minilm"], BUILTIN_TRACKS["vision5-effnet"]
    assert glue.tasks == ["cola", "sst2", "mrpc", "stsb", "qqp", "mnli", "qnli", "rte"]
    assert vision.tasks == ["mnist", "fashion_mnist", "kmnist", "cifar10", "gtsrb"]
    for track in (glue, vision):
        assert track.shots == 64 and track.seeds == [0, 1, 2]
        assert [row.shots for row in track.ablations["shots"]] == [1, 4, 16, 64]
    assert cli_main(["bench", "glue8-minilm", "--dry-run"]) == 0
    plan = capsys.readouterr().out
    assert "prodistill seed 2: prodistill" in plan and "emr: emr" in plan and "multislerp: multislerp" in plan
    # the two-expert methods are left out of the eight-expert main study and run on pairs of experts
    main_rows = [line for line in plan.splitlines() if line.strip().startswith("main ")]
    assert main_rows and not any(" slerp: " in line or " nuslerp: " in line or " pleas" in line for line in main_rows)
    assert "pairs  cola+sst2: pleas seed 0: pleas {}, 64 shots, experts cola+sst2" in plan
    assert "pairs  qnli+rte: pleas (align=none) seed 0: pleas {'align': 'none'}" in plan
    assert "pairs  qnli+rte: nuslerp: nuslerp {}, experts qnli+rte" in plan
    assert "distillation  DistillMerge (end to end) seed 0: distillmerge" in plan
    # a departure from a paper's setting is stated in the track's notes (they go into the report)
    assert glue.method_params["np_merge"]["mode"] == "softmax" and "softmax" in glue.notes["np_merge"]
    assert vision.method_params["np_merge"].get("mode", "pairwise") == "pairwise"
    assert "softmax" not in vision.notes["np_merge"]
    # ProDistill's budget is one setting: both tracks and the demo run it, and the notes name it
    for track in (glue, vision):
        assert track.method_params["prodistill"] == PRODISTILL_BUDGET == {"epochs": 12, "lr": 0.04}
        assert "12 epochs" in track.notes["prodistill"] and "lr 0.04" in track.notes["prodistill"]
    assert DEMO_METHOD_PARAMS["prodistill"] == PRODISTILL_BUDGET


def test_measure_records_the_commands_own_peak(tmp_path):
    from layermerge.bench.measure import main as measure_main
    from layermerge.bench.measure import peak_rss_mib

    before = peak_rss_mib()
    result = tmp_path / "m.json"
    assert measure_main([str(result), "--", "methods", "--json"]) == 0
    record = json.loads(result.read_text())
    assert record["exit_code"] == 0 and record["peak_rss_mib"] >= before * 0.99 and record["wall_s"] >= 0
    assert measure_main([str(result)]) == 2
    assert Path(result).is_file()


def test_per_task_methods_are_kept_apart_from_single_merges():
    from layermerge.bench.results import best_data_free, per_task_models

    assert per_task_models("emr", {}) and per_task_models("neulig", {})
    assert not per_task_models("neulig", {"model_mode": "global"}) and not per_task_models("ties", {})
    rows = [{"study": "main", "row": m, "needs_data": False, "per_task_models": per_task_models(m, {}),
             "normalised": {"mean": score}} for m, score in (("emr", 72.0), ("magmax", 51.0), ("ties", 40.0))]
    results = {"rows": rows}
    assert best_data_free(results)["row"] == "emr"
    assert best_data_free(results, single_model=True)["row"] == "magmax"
