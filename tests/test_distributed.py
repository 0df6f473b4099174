"""Data parallelism over the few-shot examples: two CPU processes (gloo on 127.0.0.1) learn the same
coefficients as one process, and every rank holds identical ones. The torchrun CLI run is slow."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
import yaml

from layermerge.engine import StateDictSource, run_engine
from layermerge.methods.distillmerge import DistillMerge
from layermerge.methods.prodistill import ProDistill

pytestmark = pytest.mark.usefixtures("one_torch_thread")
TOY_PARAMS = {"lr": 0.05, "epochs": 15, "batch_size": 8}


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def toy_runs(parallel=None) -> dict:
    """ProDistill and DistillMerge on the toy model of test_prodistill (three batches per task: the
    two ranks hold different numbers of batches, and some steps have none on one rank)."""
    from test_prodistill import setup_toy, subspace_data

    base, experts, _ = setup_toy()
    data = {task: subspace_data(task, batches=3, size=3) for task in experts}
    source = StateDictSource.from_models(base, experts)
    options = {"seed": 4, "parallel": parallel} if parallel is not None else {"seed": 4}
    import copy

    out = {}
    # Stacking runs each rank's own batches in one call, so its sums round differently from one process's
    # (15 epochs of Adam on the toy amplify that to 1e-3): the equivalence is checked batch by batch.
    for name, method in (("prodistill", ProDistill(ProDistill.Params(**TOY_PARAMS, stack_batches=False))),
                         ("distillmerge", DistillMerge(DistillMerge.Params(**TOY_PARAMS)))):
        result = run_engine(copy.deepcopy(base), source, data, method, **options)
        out[name] = {"state": result.state_dict, "artifacts": result.artifacts, "stats": result.block_stats}
    return out


def _worker(rank: int, world: int, port: int, folder: str) -> None:
    import torch.distributed as dist

    from layermerge import distributed

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        torch.save(toy_runs(distributed.current()), Path(folder) / f"rank{rank}.pt")
    finally:
        distributed.shutdown()


def test_two_processes_match_one(tmp_path):
    mp.spawn(_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    single = toy_runs()
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    for name in ("prodistill", "distillmerge"):
        for key, tensor in single[name]["state"].items():
            assert torch.equal(ranks[0][name]["state"][key], ranks[1][name]["state"][key]), key  # same steps
            torch.testing.assert_close(ranks[0][name]["state"][key], tensor, rtol=1e-5, atol=1e-6)
        for block, artifacts in single[name]["artifacts"].items():
            for key, value in artifacts.items():
                torch.testing.assert_close(ranks[0][name]["artifacts"][block][key], value, rtol=1e-5, atol=1e-6)
                assert not torch.all(value == 0.3)                      # it did learn something
        for mine, theirs in zip(ranks[0][name]["stats"], single[name]["stats"]):
            assert mine.keys() == theirs.keys()
            if "loss_final" in mine:        # DistillMerge reports its one end-to-end loss on the last block
                assert mine["loss_final"] == pytest.approx(theirs["loss_final"], rel=1e-5)   # summed over ranks


@pytest.mark.slow
def test_torchrun_cli_matches_single_process(tmp_path):
    """`torchrun --nproc-per-node 2 -m layermerge merge` on the tiny GLUE setup of test_datadriven_cli."""
    from test_datadriven_cli import build_glue_setup

    from layermerge.data import find_data_dir

    if find_data_dir() is None:
        pytest.skip("shared data not present")
    _, config_path = build_glue_setup(tmp_path / "setup")
    # float32 training: the comparison is to float32 rounding. Under bfloat16 matmuls (train_precision
    # auto on a CPU with AMX) each λ's gradient carries bfloat16 rounding, which Adam magnifies on
    # near-zero gradients; that the split is right does not depend on the precision.
    config = yaml.safe_load(config_path.read_text())
    config["params"]["train_precision"] = "float32"
    config_path.write_text(yaml.safe_dump(config))
    from layermerge.cli import main

    assert main(["merge", str(config_path), "--output", str(tmp_path / "single"), "-q"]) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1"}
    torchrun = Path(sys.executable).with_name("torchrun")
    run = subprocess.run([str(torchrun), "--nproc-per-node", "2", "--master-addr", "127.0.0.1", "--master-port",
                          str(free_port()), "-m", "layermerge", "merge", str(config_path), "--output",
                          str(tmp_path / "parallel"), "-q"], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    from safetensors.torch import load_file

    single = load_file(str(tmp_path / "single" / "prodistill" / "coefficients.safetensors"))
    parallel = load_file(str(tmp_path / "parallel" / "prodistill" / "coefficients.safetensors"))
    assert single.keys() == parallel.keys()
    # Summing gradients over ranks changes their rounding; Adam divides by √v, which magnifies that on
    # near-zero gradients, so allow 2% of one Adam step (lr 0.05), far below what a wrong split would give.
    for key, value in single.items():
        torch.testing.assert_close(parallel[key], value, rtol=0, atol=1e-3)
    single_stats = json.loads((tmp_path / "single" / "prodistill" / "blocks.json").read_text())["blocks"]
    parallel_stats = json.loads((tmp_path / "parallel" / "prodistill" / "blocks.json").read_text())["blocks"]
    for one, two in zip(single_stats, parallel_stats):
        assert two["stats"]["loss_first_epoch"] == pytest.approx(one["stats"]["loss_first_epoch"], rel=1e-5)
    summary = json.loads((tmp_path / "parallel" / "layermerge_summary.json").read_text())["summary"]
    assert summary["world_size"] == 2
