"""The bench's process plumbing: live progress from a merge's child process, and scratch left by killed runs."""

from __future__ import annotations

import subprocess
import sys

import pytest

import layermerge.bench.runner as runner

# Writes a progress line (with a two-byte character), then waits for a line on stdin before exiting.
CHILD = "import sys; sys.stderr.write('steps: 1/100 é'); sys.stderr.flush(); sys.stdin.readline()"


@pytest.mark.timeout(60)
def test_progress_arrives_while_the_child_still_runs():
    """A buffered read(4096) would wait here for ever: the child writes 15 bytes and then blocks."""
    process = subprocess.Popen([sys.executable, "-c", CHILD], stdin=subprocess.PIPE, stderr=subprocess.PIPE)
    chunks = runner.stderr_chunks(process)
    received = ""
    while "é" not in received:
        received += next(chunks)
    assert process.poll() is None                      # the child has not finished yet
    process.stdin.write(b"\n")
    process.stdin.close()
    received += "".join(chunks)
    assert received == "steps: 1/100 é" and process.wait() == 0


def test_multibyte_characters_split_across_reads_are_decoded(monkeypatch):
    encoded = "█ 50%".encode()
    pieces = iter([encoded[:1], encoded[1:2], encoded[2:], b""])
    monkeypatch.setattr(runner.os, "read", lambda descriptor, size: next(pieces))

    class Process:
        class stderr:
            @staticmethod
            def fileno():
                return 99

    assert "".join(runner.stderr_chunks(Process())) == "█ 50%"


def test_scratch_of_dead_runs_on_this_host_is_removed(tmp_path):
    finished = subprocess.Popen([sys.executable, "-c", "pass"])
    finished.wait()
    scratch = tmp_path / "scratch"
    dead = scratch / runner.scratch_name(finished.pid)
    alive = scratch / runner.scratch_name(runner.os.getpid())
    other_host = scratch / f"another-machine-{finished.pid}"
    for folder in (dead, alive, other_host):
        (folder / "merged").mkdir(parents=True)
        (folder / "merged" / "model.safetensors").write_bytes(b"x")
    assert runner.remove_stale_scratch(tmp_path) == [dead]
    assert not dead.exists() and alive.is_dir() and other_host.is_dir()
    assert runner.remove_stale_scratch(tmp_path / "no-such-workdir") == []
