"""Interrupted merges (issue 13, section 3): SIGTERM and SIGKILL during a data-free (TIES) merge and during a
ProDistill merge, at a block boundary and inside a block, each delivered from outside to a real process.

The merging process runs ``layermerge.cli.main`` under a small hook that pauses it at a chosen point (the
10th tensor of TIES, the start of ProDistill's block 1, a few Adam steps into block 1, or the instant the
temporary folder has been created), so that the signal always lands inside the merge, at the same point,
however loaded the machine is. Then:

* SIGTERM: the process exits with a status (not killed by the signal), one line on stderr, no traceback,
  no output and no ``.OUT.tmp-*`` folder; a rerun (``--resume`` for ProDistill) gives the reference result.
* SIGKILL: the temporary folder stays behind (nothing can remove it); the rerun (``--resume`` for
  ProDistill) succeeds, says it removed that stale folder, leaves no temporary folder, and every tensor of
  every safetensors file in its output equals the uninterrupted run's.

The ``slow`` test does the same without any hook: a model big enough that the merge lasts, killed as soon as
its temporary folder appears.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file
from tinytext import build_text_setup

from layermerge.cli import main

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# Run as ``python -c HOOK merge ...``: pauses the merge where LM_PAUSE says and writes LM_READY there.
HOOK = """
import os, sys, time
from pathlib import Path
import torch
torch.set_num_threads(1)
kind, number, steps = (os.environ["LM_PAUSE"].split(":") + ["0", "0"])[:3]
number, steps = int(number), int(steps)

def pause():
    Path(os.environ["LM_READY"]).write_text(str(os.getpid()))
    while True:
        time.sleep(0.02)

if kind == "created":                     # the instant the writer's hidden temporary folder exists, before
    import layermerge.io.writer as writer  # the writer has even recorded it (the folder is made with signals
    real_make = writer.make_temp_sibling   # held, so this is the first point a signal can land on)
    def make_temp_sibling(target):
        path = real_make(target)
        pause()
        return path
    writer.make_temp_sibling = make_temp_sibling
elif kind == "tensor":                    # the data-free merge, after `number` tensors were merged
    from layermerge.methods.ties import Ties
    real_tensor, seen = Ties.merge_tensor, [0]
    def merge_tensor(self, key, base, experts):
        seen[0] += 1
        if seen[0] == number:
            pause()
        return real_tensor(self, key, base, experts)
    Ties.merge_tensor = merge_tensor
else:                                     # ProDistill: at the start of block `number`, or `steps` Adam steps in
    from layermerge.methods.prodistill import ProDistill
    real_block, real_step, state = ProDistill.merge_block, torch.optim.Adam.step, {"block": -1, "steps": 0}
    def merge_block(self, ctx):
        state["block"], state["steps"] = ctx.index, 0
        if kind == "boundary" and ctx.index == number:
            pause()
        return real_block(self, ctx)
    def step(self, *args, **kwargs):
        result = real_step(self, *args, **kwargs)
        if kind == "inside" and state["block"] == number:
            state["steps"] += 1
            if state["steps"] == steps:
                pause()
        return result
    ProDistill.merge_block = merge_block
    torch.optim.Adam.step = step

from layermerge.cli import main
sys.exit(main(sys.argv[1:]))
"""


def write_config(folder: Path, config: dict) -> Path:
    path = folder / "merge.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def start_paused(config: Path, output: Path, pause: str, *flags: str) -> subprocess.Popen:
    """Start a merge in a process and return once the hook has paused it (inside the merge)."""
    ready = output.parent / f"ready-{pause.replace(':', '-')}"
    ready.unlink(missing_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "LM_PAUSE": pause, "LM_READY": str(ready)}
    process = subprocess.Popen([sys.executable, "-c", HOOK, "merge", str(config), "--output", str(output), "-q",
                                *flags], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 120
    while not ready.exists():
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            out, err = process.communicate()
            pytest.fail(f"the merge never reached {pause} (exit {process.returncode}):\n{err[-3000:]}")
        time.sleep(0.02)
    ready.unlink()
    return process


def send(process: subprocess.Popen, signum: int, timeout: float = 60) -> tuple[int, str, str]:
    """Signal the paused merge and wait for it; one that does not stop in time fails the test and is killed
    (a paused hook never ends by itself)."""
    process.send_signal(signum)
    try:
        out, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        out, err = process.communicate()
        pytest.fail(f"the merge did not stop within {timeout} s of signal {signum}:\n{err[-3000:]}")
    return process.returncode, out, err


def temp_siblings(output: Path) -> list[Path]:
    return sorted(output.parent.glob(f".{output.name}.tmp-*"))


def assert_terminated_cleanly(code: int, err: str, output: Path) -> None:
    """SIGTERM is handled like Ctrl-C: an exit status, one line, nothing half-written left behind."""
    assert code > 0, f"killed by the signal instead of exiting (status {code}): {err[-2000:]}"
    assert "Traceback" not in err, err[-3000:]
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("layermerge: "), lines
    assert not output.exists()
    assert temp_siblings(output) == []


def rerun(argv: list[str], capfd) -> str:
    capfd.readouterr()
    code = main(argv)
    err = capfd.readouterr().err
    assert code == 0, err
    return err


def assert_stale_removal_reported(err: str, stale: list[Path]) -> None:
    lines = [line for line in err.splitlines() if "remov" in line.lower()]
    for folder in stale:
        assert any(folder.name in line for line in lines), f"no word of removing {folder.name}: {err!r}"


def safetensors_files(folder: Path) -> dict[str, Path]:
    return {str(p.relative_to(folder)): p for p in sorted(folder.rglob("*.safetensors"))}


def assert_same_tensors(reference: Path, output: Path) -> None:
    """Bit-identical weights: every safetensors file, every tensor (not the bytes: metadata may differ)."""
    expected, actual = safetensors_files(reference), safetensors_files(output)
    assert expected and sorted(expected) == sorted(actual)
    for name, path in expected.items():
        a, b = load_file(str(path)), load_file(str(actual[name]))
        assert sorted(a) == sorted(b), name
        for key in a:
            assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), f"{name}: {key}"


# --------------------------------------------------------------------------- data-free: TIES
@pytest.fixture(scope="module")
def ties_setup(family_models, tmp_path_factory, one_torch_thread):
    """A TIES config on the tiny BERT family, and its uninterrupted output."""
    base, experts = family_models["bert"]
    root = tmp_path_factory.mktemp("ties")
    config = write_config(root, {"base": str(base), "experts": {k: str(v) for k, v in experts.items()},
                                 "method": "ties", "params": {"density": 0.3}})
    reference = root / "reference"
    assert main(["merge", str(config), "--output", str(reference), "-q"]) == 0
    return config, reference


def test_sigterm_during_a_data_free_merge(ties_setup, tmp_path, capfd):
    config, reference = ties_setup
    output = tmp_path / "out"
    code, _, err = send(start_paused(config, output, "tensor:10"), signal.SIGTERM)
    assert_terminated_cleanly(code, err, output)
    rerun(["merge", str(config), "--output", str(output), "-q"], capfd)
    assert_same_tensors(reference, output)


def test_sigterm_the_moment_the_temporary_folder_exists(ties_setup, tmp_path):
    """No window between creating the temporary folder and being ready to remove it."""
    config, _ = ties_setup
    output = tmp_path / "out"
    process = start_paused(config, output, "created")
    assert len(temp_siblings(output)) == 1
    code, _, err = send(process, signal.SIGTERM)
    assert_terminated_cleanly(code, err, output)


def test_sigkill_during_a_data_free_merge_then_rerun(ties_setup, tmp_path, capfd):
    config, reference = ties_setup
    output = tmp_path / "out"
    code, _, _ = send(start_paused(config, output, "tensor:10"), signal.SIGKILL)
    assert code == -signal.SIGKILL
    stale = temp_siblings(output)
    assert len(stale) == 1 and not output.exists()
    err = rerun(["merge", str(config), "--output", str(output), "-q"], capfd)
    assert_stale_removal_reported(err, stale)
    assert temp_siblings(output) == []
    assert_same_tensors(reference, output)


# --------------------------------------------------------------------------- data-driven: ProDistill
@pytest.fixture(scope="module")
def prodistill_setup(tmp_path_factory, one_torch_thread):
    """A ProDistill config on a tiny BERT with a tokenizer and local data, and its uninterrupted output."""
    root = tmp_path_factory.mktemp("prodistill")
    base, experts, data_dir = build_text_setup(root / "inputs")
    config = write_config(root, {
        "base": str(base), "experts": {k: str(v) for k, v in experts.items()}, "method": "prodistill",
        "params": {"lr": 0.05, "epochs": 3, "batch_size": 4},
        "data": {"shots": 4, "max_length": 16, "batch_size": 2, "data_dir": str(data_dir)},
        "engine": {"device": "cpu", "seed": 5}})
    reference = root / "reference"
    assert main(["merge", str(config), "--output", str(reference), "-q"]) == 0
    blocks = json.loads((reference / "prodistill" / "blocks.json").read_text())["blocks"]
    assert len(blocks) >= 2        # so that block 1 comes after a finished, checkpointed block 0
    return config, reference


def finished_blocks(output: Path) -> int:
    return json.loads((Path(f"{output}.checkpoint") / "run.json").read_text())["finished"]


# At a block boundary: block 0 is finished and checkpointed, block 1 has not started.
# Inside a block: block 1 has taken 2 Adam steps of its 6.
POINTS = {"boundary": "boundary:1", "inside": "inside:1:2"}


@pytest.mark.parametrize("point", POINTS)
def test_sigterm_during_prodistill_then_resume(prodistill_setup, tmp_path, capfd, point):
    config, reference = prodistill_setup
    output = tmp_path / "out"
    process = start_paused(config, output, POINTS[point])
    assert finished_blocks(output) == 1
    code, _, err = send(process, signal.SIGTERM)
    assert_terminated_cleanly(code, err, output)
    assert finished_blocks(output) == 1      # the finished block is kept for --resume
    rerun(["merge", str(config), "--output", str(output), "-q", "--resume"], capfd)
    assert temp_siblings(output) == [] and not Path(f"{output}.checkpoint").exists()
    assert_same_tensors(reference, output)


@pytest.mark.parametrize("point", POINTS)
def test_sigkill_during_prodistill_then_resume(prodistill_setup, tmp_path, capfd, point):
    config, reference = prodistill_setup
    output = tmp_path / "out"
    process = start_paused(config, output, POINTS[point])
    assert finished_blocks(output) == 1
    code, _, _ = send(process, signal.SIGKILL)
    assert code == -signal.SIGKILL
    stale = temp_siblings(output)
    assert len(stale) == 1 and not output.exists()
    err = rerun(["merge", str(config), "--output", str(output), "-q", "--resume"], capfd)
    assert_stale_removal_reported(err, stale)
    assert temp_siblings(output) == [] and not Path(f"{output}.checkpoint").exists()
    assert_same_tensors(reference, output)
    summary = json.loads((output / "layermerge_summary.json").read_text())["summary"]
    assert summary["resumed_blocks"] == 1


# --------------------------------------------------------------------------- without a hook
def build_many_tensors(root: Path, tensors: int = 400, shape=(96, 256)) -> Path:
    """A base and three experts as bare safetensors of many tensors: a merge that lasts a few seconds."""
    generator = torch.Generator().manual_seed(0)
    base = {f"layer{i}.weight": torch.randn(shape, generator=generator) for i in range(tensors)}
    save_file(base, str(root / "base.safetensors"))
    experts = {}
    for index in range(3):
        path = root / f"expert{index}.safetensors"
        save_file({k: v + 0.01 * torch.randn(shape, generator=generator) for k, v in base.items()}, str(path))
        experts[f"e{index}"] = str(path)
    return write_config(root, {"base": str(root / "base.safetensors"), "experts": experts, "method": "ties",
                               "params": {"density": 0.2}})


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_real_signal_as_soon_as_the_temporary_folder_appears(tmp_path, capfd, signum):
    config = build_many_tensors(tmp_path)
    reference, output = tmp_path / "reference", tmp_path / "out"
    assert main(["merge", str(config), "--output", str(reference), "-q"]) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([sys.executable, "-m", "layermerge", "merge", str(config), "--output", str(output),
                                "-q"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    while not temp_siblings(output):
        assert process.poll() is None, process.communicate()[1][-3000:]
        time.sleep(0.005)
    code, _, err = send(process, signum)
    if signum == signal.SIGTERM:
        assert_terminated_cleanly(code, err, output)
        rerun(["merge", str(config), "--output", str(output), "-q"], capfd)
    else:
        assert code == -signal.SIGKILL
        stale = temp_siblings(output)
        assert len(stale) == 1
        assert_stale_removal_reported(rerun(["merge", str(config), "--output", str(output), "-q"], capfd), stale)
    assert temp_siblings(output) == []
    assert_same_tensors(reference, output)
