"""Nothing escapes the output folder: safe expert names, normal permissions, no temporary folder left
after SIGTERM or SIGKILL, and operating-system errors as one line naming the path (exit 2)."""

from __future__ import annotations

import errno
import os
import re
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import build_family, tree_hashes

import layermerge
from layermerge.cli import main
from layermerge.errors import ConfigError, OutputError, os_error_message
from layermerge.experts import ExpertSet
from layermerge.io import atomic
from layermerge.io.writer import CheckpointWriter, ShardedSafetensorsWriter
from layermerge.names import check_expert_name

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    base, experts = build_family(tmp_path_factory.mktemp("bert"), "bert", n_experts=2)
    return base, experts


def write_config(folder: Path, bert, experts: dict | None = None) -> str:
    base, default = bert
    experts = experts if experts is not None else default
    path = folder / "merge.yaml"
    path.write_text(yaml.safe_dump({"base": str(base), "experts": {k: str(v) for k, v in experts.items()},
                                    "method": "task_arithmetic"}))
    return str(path)


def one_line_error(capsys, argv) -> str:
    """Run the CLI in-process (quiet): exit 2 and a single ``layermerge: error:`` line, no traceback."""
    assert main([*argv, "-q"] if "-q" not in argv else argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("layermerge: error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err
    return err


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".tmp-" in p.name or ".old-" in p.name)


# --------------------------------------------------------------------------- expert names
@pytest.mark.parametrize("name", ["sst2", "task-1", "MNLI_m", "a.b", "0", "x" * 128])
def test_safe_expert_names_are_accepted(name):
    assert check_expert_name(name) == name


@pytest.mark.parametrize("name", ["../../evil", "a/b", "..", ".", ".hidden", "", "a b", "x" * 129, "/abs",
                                  "a\\b", "é", "-dash"])
def test_unsafe_expert_names_are_refused(name):
    with pytest.raises(ConfigError, match="is not allowed: use letters, digits"):
        check_expert_name(name)


def test_traversal_name_in_a_config_writes_nothing_outside(bert, tmp_path, capsys):
    base, experts = bert
    work = tmp_path / "a" / "b"
    work.mkdir(parents=True)
    config = write_config(tmp_path, bert, {"../../evil": experts["task0"], "task1": experts["task1"]})
    err = one_line_error(capsys, ["merge", config, "-o", str(work / "out"), "-q"])
    assert "expert name '../../evil' is not allowed" in err
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["a", "b", "merge.yaml"]


def test_expert_set_and_merge_refuse_a_name_with_a_slash(bert, tmp_path):
    base, experts = bert
    with pytest.raises(ConfigError, match="expert name 'a/b' is not allowed"):
        ExpertSet(base, {"a/b": experts["task0"]})
    with pytest.raises(ConfigError, match="expert name '../x' is not allowed"):
        layermerge.merge(base, {"../x": experts["task0"], "t": experts["task1"]}, output=tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_load_task_model_refuses_traversal(bert, tmp_path):
    base, experts = bert
    out = layermerge.merge(base, experts, output=tmp_path / "out", quiet=True).path
    with pytest.raises(ConfigError, match="expert name '../../heads/task0' is not allowed"):
        layermerge.load_task_model(out, "../../heads/task0")


def test_writer_refuses_relative_paths_that_leave_the_output(tmp_path):
    with pytest.raises(OutputError, match="outside the output folder"):
        with CheckpointWriter(tmp_path / "out") as writer:
            writer.write_json("heads/../../escaped.json", {})
    with pytest.raises(OutputError, match="outside the output folder"):
        with CheckpointWriter(tmp_path / "out") as writer:
            writer.write_state_dict("/tmp/abs", {})
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- permissions
@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_output_permissions_follow_the_umask(bert, tmp_path, umask):
    base, experts = bert
    previous = os.umask(umask)
    try:
        out = layermerge.merge(base, experts, output=tmp_path / "out", quiet=True).path
    finally:
        os.umask(previous)
    assert stat.S_IMODE(out.stat().st_mode) == 0o777 & ~umask
    assert stat.S_IMODE((out / "heads" / "task0").stat().st_mode) == 0o777 & ~umask
    assert stat.S_IMODE((out / "model.safetensors").stat().st_mode) == 0o666 & ~umask


def test_temp_sibling_is_named_by_its_owner_with_normal_permissions(tmp_path):
    previous = os.umask(0o022)
    try:
        temp = atomic.make_temp_sibling(tmp_path / "deep" / "target")
    finally:
        os.umask(previous)
    assert temp.parent == tmp_path / "deep"
    assert temp.name.startswith(f".target.tmp-{os.getpid()}-{atomic.host_tag()}-")
    assert stat.S_IMODE(temp.stat().st_mode) == 0o755


# --------------------------------------------------------------------------- stale temporary folders
def dead_pid() -> int:
    """The id of a process that has exited and been reaped."""
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def sibling(target: Path, kind: str, pid: int, host: str | None = None) -> Path:
    path = target.parent / f".{target.name}.{kind}-{pid}-{host or atomic.host_tag()}-0123abcd"
    path.mkdir()
    (path / "model.safetensors").write_bytes(b"partial")
    return path


def test_stale_siblings_of_dead_processes_are_removed_and_reported(tmp_path, capsys):
    target = tmp_path / "out"
    pid = dead_pid()
    stale = sibling(target, "tmp", pid)
    running = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    alive = sibling(target, "tmp", running.pid)
    other_host = sibling(target, "tmp", pid, host="ffffffff")
    other_target = sibling(tmp_path / "other", "tmp", pid)
    try:
        assert atomic.remove_stale_siblings(target) == [stale]
    finally:
        running.kill()
        running.wait()
    assert not stale.exists() and alive.exists() and other_host.exists() and other_target.exists()
    err = capsys.readouterr().err
    assert err == f"layermerge: removed stale temporary folder {stale} left by process {pid} (no longer running)\n"


def test_a_target_moved_aside_by_a_dead_run_is_restored(tmp_path, capsys):
    target = tmp_path / "out"
    backup = sibling(target, "old", dead_pid())
    atomic.remove_stale_siblings(target)
    assert (target / "model.safetensors").read_bytes() == b"partial" and not backup.exists()
    assert "restored" in capsys.readouterr().err


def test_replace_folder_leaves_only_the_new_target(tmp_path):
    target, temp = tmp_path / "out", tmp_path / "new"
    target.mkdir()
    (target / "old.txt").write_text("old")
    temp.mkdir()
    (temp / "new.txt").write_text("new")
    atomic.replace_folder(temp, target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert [p.name for p in target.iterdir()] == ["new.txt"]


# A merge whose writer stops after its first tensor until a signal arrives: a real process to kill.
SLOW_MERGE = """
import sys, time
from layermerge.io.writer import CheckpointWriter
original = CheckpointWriter.add_tensor
def slow(self, key, tensor):
    original(self, key, tensor)
    time.sleep(60)
CheckpointWriter.add_tensor = slow
from layermerge.cli import main
sys.exit(main(sys.argv[1:]))
"""


def start_slow_merge(config: str, out: Path) -> tuple[subprocess.Popen, Path]:
    """Start the merge and wait until its temporary folder has the first tensor's bytes."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([sys.executable, "-c", SLOW_MERGE, "merge", config, "-o", str(out), "-q"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and process.poll() is None:
        temps = [p for p in out.parent.glob(f".{out.name}.tmp-*") if any(p.glob("*.data"))]
        if temps:
            return process, temps[0]
        time.sleep(0.05)
    process.kill()
    raise AssertionError(f"no temporary folder appeared: {process.communicate()}")


def test_sigterm_mid_merge_removes_the_temporary_folder(bert, tmp_path):
    config = write_config(tmp_path, bert)
    process, temp = start_slow_merge(config, tmp_path / "out")
    assert temp.name.startswith(f".out.tmp-{process.pid}-")
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=60)
    assert process.returncode == 143
    assert stderr == "layermerge: terminated (SIGTERM); no output was written\n"
    assert leftovers(tmp_path) == [] and not (tmp_path / "out").exists()


def test_after_sigkill_the_next_run_removes_the_leftover_and_says_so(bert, tmp_path, capsys):
    config = write_config(tmp_path, bert)
    process, temp = start_slow_merge(config, tmp_path / "out")
    process.kill()
    process.communicate(timeout=60)
    assert temp.is_dir()                      # a killed process cannot clean up after itself
    assert main(["merge", config, "-o", str(tmp_path / "out"), "-q"]) == 0
    err = capsys.readouterr().err
    assert err == (f"layermerge: removed stale temporary folder {temp} left by process {process.pid} "
                   "(no longer running)\n")
    assert leftovers(tmp_path) == [] and (tmp_path / "out" / "model.safetensors").is_file()


# --------------------------------------------------------------------------- operating-system errors
def test_output_under_a_regular_file(bert, tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    err = one_line_error(capsys, ["merge", write_config(tmp_path, bert), "-o", str(tmp_path / "file" / "out")])
    assert f"cannot create '{tmp_path / 'file' / 'out'}': '{tmp_path / 'file'}' is not a folder" in err


def test_output_name_too_long(bert, tmp_path, capsys):
    out = tmp_path / ("x" * 300)
    err = one_line_error(capsys, ["merge", write_config(tmp_path, bert), "-o", str(out)])
    assert "is 300 bytes long and file systems allow at most 255" in err
    assert leftovers(tmp_path) == []


def test_a_long_but_legal_output_name_works(bert, tmp_path):
    """The temporary sibling's name is longer than the output's; it must not exceed the limit itself."""
    out = tmp_path / ("y" * 250)
    assert main(["merge", write_config(tmp_path, bert), "-o", str(out), "-q"]) == 0
    assert (out / "model.safetensors").is_file() and leftovers(tmp_path) == []


def test_symlink_loop_in_an_input_path(bert, tmp_path, capsys):
    base, experts = bert
    (tmp_path / "loop1").symlink_to(tmp_path / "loop2")
    (tmp_path / "loop2").symlink_to(tmp_path / "loop1")
    config = write_config(tmp_path, bert, {"task0": experts["task0"], "task1": tmp_path / "loop1"})
    err = one_line_error(capsys, ["merge", config, "-o", str(tmp_path / "out")])
    assert str(tmp_path / "loop1") in err and "symbolic link" in err
    assert not (tmp_path / "out").exists()


def test_unwritable_output_location_is_refused_before_any_work(bert, tmp_path, capsys, monkeypatch):
    """Tests run as root, for whom every folder is writable: the permission check is simulated."""
    locked = tmp_path / "locked"
    locked.mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode, **kw: Path(path) != locked and real_access(path, mode))
    monkeypatch.setattr(ShardedSafetensorsWriter, "add", lambda *a: pytest.fail("work started"))
    err = one_line_error(capsys, ["merge", write_config(tmp_path, bert), "-o", str(locked / "out")])
    assert f"cannot write the output '{locked / 'out'}' in '{locked}': permission denied" in err


@pytest.mark.parametrize("where", ["add", "close"])
def test_write_errors_name_the_output_and_remove_the_temporary_folder(bert, tmp_path, capsys, monkeypatch, where):
    """A full disk while streaming tensors (write() reports no file name), no permission while finishing."""
    def disk_full(self, *args):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def denied(self, *args):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(self.folder / "model.safetensors"))

    monkeypatch.setattr(ShardedSafetensorsWriter, where, disk_full if where == "add" else denied)
    before = tree_hashes([bert[0], *bert[1].values()])
    out = tmp_path / "out"
    err = one_line_error(capsys, ["merge", write_config(tmp_path, bert), "-o", str(out)])
    if where == "add":
        assert f"failed while writing '{out}': No space left on device (the disk is full" in err
    else:
        assert re.search(rf"cannot write '{re.escape(str(out))}/(heads/task0/)?model.safetensors': Permission denied",
                         err)
    assert leftovers(tmp_path) == [] and not out.exists()
    assert tree_hashes([bert[0], *bert[1].values()]) == before


def test_unwritable_heatmap_target_is_refused_before_the_statistics(bert, tmp_path, capsys):
    base, experts = bert
    (tmp_path / "file").write_text("x")
    args = ["inspect", str(base), *map(str, experts.values()), "-q", "--heatmap"]
    err = one_line_error(capsys, [*args, str(tmp_path / "file" / "h.png")])
    assert f"'{tmp_path / 'file'}' is not a folder" in err
    assert f"--heatmap {tmp_path} is a folder" in one_line_error(capsys, [*args, str(tmp_path)])


def test_os_error_message_names_both_paths_of_a_rename():
    exc = OSError(errno.EXDEV, os.strerror(errno.EXDEV), "/a", None, "/b")
    assert os_error_message(exc) == "'/a' -> '/b': Invalid cross-device link"
