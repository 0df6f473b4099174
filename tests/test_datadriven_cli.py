"""`layermerge merge CONFIG.yaml` with a data: section: few-shot GLUE examples from the shared data,
a real SIGKILL in the middle of a run, and --resume ending with exactly the uninterrupted result."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from tinytext import build_tiny_text_base, save_text_experts

from layermerge.cli import main
from layermerge.data import find_data_dir
from layermerge.io.reader import CheckpointReader

pytestmark = [pytest.mark.skipif(find_data_dir() is None, reason="shared data not present"),
              pytest.mark.usefixtures("one_torch_thread")]

KILL_AT_BLOCK_1 = """
import os, signal, sys
import torch
torch.set_num_threads(1)
from layermerge.methods.prodistill import ProDistill
real = ProDistill.merge_block
def merge_block(self, ctx):
    if ctx.index == 1:
        os.kill(os.getpid(), signal.SIGKILL)      # no cleanup, no finally: a real crash
    return real(self, ctx)
ProDistill.merge_block = merge_block
from layermerge.cli import main
sys.exit(main(sys.argv[1:]))
"""


def build_glue_setup(root: Path) -> tuple[Path, Path]:
    """A tiny BERT base with a tokenizer, experts 'sst2' and 'rte', and a prodistill config using them."""
    root.mkdir(parents=True, exist_ok=True)
    save_text_experts(root, build_tiny_text_base(root / "base"))
    config = {"base": "base", "experts": {"sst2": "sst2", "rte": "rte"}, "method": "prodistill",
              "params": {"lr": 0.05, "epochs": 2, "batch_size": 4},
              "data": {"shots": 4, "max_length": 16, "batch_size": 2, "tasks": {"rte": {"shots": 6, "seed": 3}}},
              "engine": {"device": "cpu", "cache_budget": "20KB", "seed": 5}}
    return root, write_config(root, "merge.yaml", config)


@pytest.fixture(scope="module")
def glue_setup(tmp_path_factory):
    root, path = build_glue_setup(tmp_path_factory.mktemp("glue-experts"))
    return root, path, yaml.safe_load(path.read_text())


def write_config(root: Path, name: str, config: dict) -> Path:
    path = root / name
    path.write_text(yaml.safe_dump(config))
    return path


def test_kill_then_resume_equals_uninterrupted(glue_setup, tmp_path, capsys):
    root, config_path, _ = glue_setup
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert main(["merge", str(config_path), "--output", str(straight), "-q"]) == 0

    killed = subprocess.run([sys.executable, "-c", KILL_AT_BLOCK_1, "merge", str(config_path), "--output",
                             str(resumed), "-q"], capture_output=True, text=True, timeout=120)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    checkpoint = Path(str(resumed) + ".checkpoint")
    assert not resumed.exists() and json.loads((checkpoint / "run.json").read_text())["finished"] == 1

    assert main(["merge", str(config_path), "--output", str(resumed), "-q"]) == 2
    assert "--resume" in capsys.readouterr().err
    assert main(["merge", str(config_path), "--output", str(resumed), "-q", "--resume"]) == 0
    assert not checkpoint.exists()

    a, b = CheckpointReader(straight), CheckpointReader(resumed)
    assert a.keys() == b.keys()
    for key in a.keys():
        assert torch.equal(a.get(key), b.get(key)), key
    coefficients_a = load_file(str(straight / "prodistill" / "coefficients.safetensors"))
    coefficients_b = load_file(str(resumed / "prodistill" / "coefficients.safetensors"))
    assert coefficients_a.keys() == coefficients_b.keys()
    assert all(torch.equal(coefficients_a[k], coefficients_b[k]) for k in coefficients_a)
    blocks_a = json.loads((straight / "prodistill" / "blocks.json").read_text())["blocks"]
    blocks_b = json.loads((resumed / "prodistill" / "blocks.json").read_text())["blocks"]
    assert [x["stats"] for x in blocks_a] == [x["stats"] for x in blocks_b]
    summary = json.loads((resumed / "layermerge_summary.json").read_text())["summary"]
    assert summary["resumed_blocks"] == 1


def test_data_section_draws_the_configured_shots(glue_setup, tmp_path):
    root, config_path, config = glue_setup
    out = tmp_path / "merged"
    assert main(["merge", str(config_path), "--output", str(out), "-q", "--cache-budget", "0",
                 "--plot-coefficients"]) == 0
    summary = json.loads((out / "layermerge_summary.json").read_text())["summary"]
    assert summary["data"] == {"sst2": {"batches": 2, "examples": 4}, "rte": {"batches": 3, "examples": 6}}
    assert summary["cache"]["spilled_tensors"] > 0 and summary["cache"]["peak_ram_bytes"] == 0
    assert summary["device"] == "cpu" and summary["seed"] == 5
    record = yaml.safe_load((out / "layermerge.yaml").read_text())
    assert record["data"]["tasks"]["rte"] == {"shots": 6, "seed": 3} and record["params"]["epochs"] == 2
    assert (out / "prodistill" / "coefficients.png").is_file()
    assert (out / "tokenizer_config.json").is_file() or (out / "vocab.txt").is_file()


@pytest.mark.parametrize("change, message", [
    ({"data": None}, "needs a 'data' section"),
    ({"data": {"shot": 4}}, "unknown key 'data.shot' (allowed keys: tasks, shots"),
    ({"data": {"tasks": {"sst2": {"name": "sst2"}}}}, "allowed keys: task, split, shots"),
    ({"engine": {"devices": "cpu"}}, "allowed keys: cache_budget"),
    ({"engine": {"compute_dtype": "float16"}}, "engine.compute_dtype"),
    ({"method": "ties", "params": {}}, "data-free: remove the 'data' and 'engine' sections"),
    ({"experts": {"sst2": "sst2", "mystery": "rte"}, "data": {"shots": 2}}, "data.tasks.mystery.task"),
    ({"data": {"tasks": {"qnli": {}}}}, "data.tasks names ['qnli'], which are not experts"),
    ({"engine": {"cache_budget": "lots"}}, "engine.cache_budget"),
])
def test_config_errors_name_the_key(glue_setup, tmp_path, capsys, change, message):
    root, _, config = glue_setup
    path = write_config(root, "bad.yaml", {**config, **change})
    assert main(["merge", str(path), "--output", str(tmp_path / "out")]) == 2
    assert message in capsys.readouterr().err


def test_engine_flags_refused_for_data_free_methods(family_models, tmp_path, capsys):
    base, experts = family_models["bert"]
    path = write_config(tmp_path, "ta.yaml", {"base": str(base), "experts": {k: str(v) for k, v in experts.items()},
                                              "method": "task_arithmetic"})
    assert main(["merge", str(path), "--output", str(tmp_path / "out"), "--resume"]) == 2
    assert "--resume only applies to data-driven methods" in capsys.readouterr().err
    assert main(["merge", str(path), "--output", str(tmp_path / "out"), "-q"]) == 0
    assert "data" not in yaml.safe_load((tmp_path / "out" / "layermerge.yaml").read_text())
