"""Every data-driven method from a YAML config through `layermerge merge`, on few-shot GLUE examples
from the shared data: the command succeeds, records what it did, and each task's model loads."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from test_datadriven_cli import build_glue_setup, write_config

import layermerge
from layermerge.cli import main
from layermerge.data import find_data_dir
from layermerge.methods.registry import available_methods

pytestmark = [pytest.mark.skipif(find_data_dir() is None, reason="shared data not present"),
              pytest.mark.usefixtures("one_torch_thread")]

# Small budgets: these tests check the plumbing; the methods' own tests check their numbers.
METHOD_PARAMS = {
    "prodistill": {"epochs": 1},
    "distillmerge": {"epochs": 1},
    "regmean": {},
    "regmean_plusplus": {},
    "fisher": {},
    "df_merge": {"init_points": 2, "iterations": 1},
    "fda": {"anchors": 4, "anchor_steps": 2, "merge_epochs": 1},
    "fda_block": {"anchors": 4, "anchor_steps": 2, "merge_epochs": 1},
    "adamerging": {"steps": 2},
    "localize_stitch": {"steps": 2},
    "neulig": {"epochs": 2, "loss": "cross_entropy"},
    "np_merge": {"epochs": 1},
    "pleas": {},
}


def test_every_data_driven_method_is_covered_here():
    data_driven = {name for name, info in available_methods().items() if info.needs_data}
    assert data_driven == set(METHOD_PARAMS)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root, _ = build_glue_setup(tmp_path_factory.mktemp("glue-methods"))
    return root


@pytest.mark.parametrize("method", sorted(METHOD_PARAMS))
def test_method_runs_from_a_yaml_config(method, setup, capsys):
    config = {"base": "base", "experts": {"sst2": "sst2", "rte": "rte"}, "method": method,
              "params": METHOD_PARAMS[method], "data": {"shots": 4, "max_length": 16, "batch_size": 2},
              "engine": {"device": "cpu", "seed": 1}}
    path = write_config(setup, f"{method}.yaml", config)
    output = setup / f"out-{method}"
    assert main(["merge", str(path), "--output", str(output), "--quiet"]) == 0
    record = yaml.safe_load((output / "layermerge.yaml").read_text())
    assert record["method"] == method and record["data"]["shots"] == 4
    assert set(METHOD_PARAMS[method].items()) <= set(record["params"].items())
    summary = json.loads((output / "layermerge_summary.json").read_text())
    assert summary["method"] == method
    for task in ("sst2", "rte"):
        model = layermerge.load_task_model(output, task)
        logits = model(input_ids=torch.tensor([[2, 10, 11, 3]])).logits
        assert logits.shape == (1, 2) and torch.isfinite(logits).all()


def test_model_methods_need_a_data_section(setup, capsys):
    path = write_config(setup, "no-data.yaml", {"base": "base", "experts": {"sst2": "sst2", "rte": "rte"},
                                                "method": "adamerging"})
    assert main(["merge", str(path), "--output", str(setup / "never")]) == 2
    assert "needs a 'data' section" in capsys.readouterr().err
    assert not (setup / "never").exists()
