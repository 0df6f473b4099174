"""The demo pipeline on a tiny configuration; the real `make demo` run is marked slow."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tinytext import build_tiny_text_base

import layermerge.finetune
import layermerge.pipeline
from layermerge.data import find_data_dir
from layermerge.demo import DEMO_METHODS, DemoConfig, eligible_methods, run_demo
from layermerge.methods.registry import MethodInfo

pytestmark = pytest.mark.skipif(find_data_dir() is None, reason="shared data not present")
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_config(tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("demo")
    base = build_tiny_text_base(root / "tiny-bert")
    return DemoConfig(base=base, tasks=("sst2", "stsb"), train_examples=48, batch_size=16, max_length=32,
                      lr=1e-3, eval_examples=32, methods=["average", "task_arithmetic"],
                      cache_dir=root / "cache", quiet=True)


def test_tiny_demo_runs_end_to_end_then_reuses_its_caches(tiny_config, monkeypatch):
    first = run_demo(tiny_config)
    assert not first.failures
    names = [row.name for row in first.report.rows]
    assert names == ["experts", "average", "task_arithmetic"]
    md, js = first.report_paths
    assert md.parent == Path(tiny_config.cache_dir) / "demo" and md.is_file()
    data = json.loads(js.read_text())
    assert data["tasks"] == ["sst2", "stsb"] and data["settings"]["eval_examples"] == 32
    assert all(row["examples"] == {"sst2": 32, "stsb": 32} for row in data["rows"])
    evals = sorted((Path(tiny_config.cache_dir) / "evals").glob("*.json"))
    assert len(evals) == 2
    # No scratch merge folders are left behind.
    assert not list(Path(tiny_config.cache_dir).glob("merged-*"))

    def no_training(*args, **kwargs):
        raise AssertionError("the second run must not fine-tune again")

    merges = []
    real_merge = layermerge.pipeline.merge
    monkeypatch.setattr(layermerge.finetune, "train_model", no_training)
    monkeypatch.setattr(layermerge.pipeline, "merge", lambda *a, **k: merges.append(a[2]) or real_merge(*a, **k))
    second = run_demo(tiny_config)
    assert second.expert_paths == first.expert_paths and merges == []     # scores reused, nothing merged
    fresh = run_demo(DemoConfig(**{**tiny_config.__dict__, "reuse_results": False}))
    assert merges == ["average", "task_arithmetic"]
    for run in (second, fresh):
        for a, b in zip(first.report.rows, run.report.rows):
            assert a.name == b.name
            assert {t: r.score for t, r in a.results.items()} == {t: r.score for t, r in b.results.items()}


def test_default_methods_run_through_the_demo_including_prodistill(tiny_config):
    """The default method list (data-free ones and ProDistill on a few training examples) merges and
    evaluates on a real (tiny) model; ProDistill's scores are cached under its data settings too."""
    config = DemoConfig(**{**tiny_config.__dict__, "methods": None, "eval_examples": 16, "shots": 4,
                           "method_params": {"prodistill": {"epochs": 2}}})
    result = run_demo(config)
    assert result.failures == {}
    assert [row.name for row in result.report.rows] == ["experts", *DEMO_METHODS]
    assert "prodistill" in DEMO_METHODS
    cached = sorted(p.name for p in (Path(tiny_config.cache_dir) / "results").glob("prodistill-*.json"))
    assert len(cached) == 1
    # Other shots are other data: a different cache entry, not a reused score.
    more_shots = DemoConfig(**{**config.__dict__, "shots": 5, "methods": ["prodistill"]})
    assert run_demo(more_shots).failures == {}
    assert len(list((Path(tiny_config.cache_dir) / "results").glob("prodistill-*.json"))) == 2


def test_all_selects_every_method_that_fits_the_expert_count(monkeypatch):
    def info(name, **options):
        return MethodInfo(name, object, "", options.pop("needs_data", False), options.pop("kind", "tensor"),
                          **options)

    fake = {"a": info("a"), "pair": info("pair", min_experts=2, max_experts=2),
            "fisher": info("fisher", needs_data=True, kind="model"), "big": info("big", min_experts=5),
            "np": info("np", needs_data=True, kind="model", needs_base=False)}
    monkeypatch.setattr("layermerge.methods.registry.available_methods", lambda: fake)
    assert eligible_methods(4, ["all"]) == ["a", "fisher"]
    assert eligible_methods(2, ["all"]) == ["a", "pair", "fisher"]


@pytest.mark.slow
def test_make_demo_runs_offline_and_prints_the_table():
    """The real thing: MiniLM, 3 GLUE tasks (uses and fills the repository's .cache)."""
    run = subprocess.run([sys.executable, "-m", "layermerge", "demo", "--quiet"], cwd=REPO,
                         capture_output=True, text=True, timeout=1800)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "experts" in run.stdout and "norm.avg" in run.stdout
    assert all(method in run.stdout for method in DEMO_METHODS)
