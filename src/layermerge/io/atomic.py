"""Output folders that appear only when complete: written in a hidden sibling, then renamed into place.

The sibling is named ``.<target>.tmp-<pid>-<host>-<random>``: the id of the process writing it and a
tag of the machine it runs on. A run killed outright (``kill -9``, a power cut) cannot remove its
sibling, so every later run into the same target first removes the siblings whose process no longer
runs on this machine, and says so on stderr; a sibling whose process is alive, or that another machine
wrote, is never touched. Replacing an existing target moves it aside as ``.<target>.old-<pid>-...``
first; if a run died between the two renames, the next run puts the old target back.

Every temporary folder is also recorded in this process until it is renamed or removed, so whatever
line a Ctrl-C or SIGTERM lands on (even between creating the folder and entering the ``try`` that would
remove it) ``remove_unfinished`` finds it: the CLI calls it on every exit, and so does ``atexit``.

Folders are created as ``mkdir`` creates them (mode 0777 minus the umask), so a finished output is as
readable as any folder the user makes; ``tempfile.mkdtemp`` would make it private (0700).
"""

from __future__ import annotations

import atexit
import hashlib
import os
import re
import secrets
import shutil
import signal
import socket
import sys
import threading
from contextlib import contextmanager
from pathlib import Path

from layermerge.errors import OutputError

NAME_MAX = 255          # bytes in one file name on Linux and macOS file systems
TEMP, BACKUP = "tmp", "old"
# Temporary folders this process created and has neither renamed into place nor removed.
UNFINISHED: set[Path] = set()
SIBLING = re.compile(r"\.(?P<stem>.+)\.(?P<kind>tmp|old)-(?P<pid>\d+)-(?P<host>[0-9a-f]{8})-[0-9a-f]{8}")


def host_tag() -> str:
    """Eight hex digits naming this machine, so a process id is only ever judged where it was issued."""
    return hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]


def sibling_name(target: Path, kind: str = TEMP) -> str:
    """``.<target>.<kind>-<pid>-<host>-<random>``, the target's part shortened if the name would be too long."""
    suffix = f".{kind}-{os.getpid()}-{host_tag()}-{secrets.token_hex(4)}"
    stem = target.name
    while len(f".{stem}{suffix}".encode()) > NAME_MAX and len(stem) > 1:
        stem = stem[:-1]
    return f".{stem}{suffix}"


def make_temp_sibling(target: Path) -> Path:
    """Create the hidden folder ``target`` is written in (after removing stale ones), with normal permissions."""
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_siblings(target)
    while True:
        path = target.parent / sibling_name(target, TEMP)
        with signals_deferred():  # created and recorded as one step: no signal can land in between
            try:
                path.mkdir()  # mode 0o777 & ~umask, like mkdir(1)
            except FileExistsError:  # the random part collided: draw again
                continue
            UNFINISHED.add(path)
        return path


def discard_temp(temp: Path) -> None:
    """Remove an unfinished temporary folder (a failed or interrupted write)."""
    remove_path(temp)
    UNFINISHED.discard(temp)


def remove_unfinished() -> None:
    """Remove every temporary folder this process left unfinished: called on exit, however it exits."""
    for temp in list(UNFINISHED):
        discard_temp(temp)


atexit.register(remove_unfinished)


def replace_folder(temp: Path, target: Path) -> None:
    """Move the finished ``temp`` to ``target``; an existing target is moved aside first, then deleted."""
    backup = None
    with signals_deferred():  # an interrupt between the renames would leave neither folder at ``target``
        if target.exists() or target.is_symlink():
            backup = target.parent / sibling_name(target, BACKUP)
            os.replace(target, backup)
        os.replace(temp, target)
        UNFINISHED.discard(temp)
    if backup is not None:
        remove_path(backup)


@contextmanager
def signals_deferred():
    """Hold Ctrl-C and SIGTERM for the duration (main thread only, where Python runs its handlers)."""
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "pthread_sigmask"):
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def remove_path(path: Path) -> None:
    """Delete a folder tree or a file, ignoring what is already gone."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` of this machine still runs; a zombie (killed, not yet reaped) does not."""
    if pid == os.getpid() or os.name == "nt":  # os.kill(pid, 0) would terminate the process on Windows
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    except (OverflowError, ValueError):  # no process can have such an id
        return False
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state not in ("Z", "X")


def _stale_owner(entry: Path, target: Path) -> tuple[str, int] | None:
    """(kind, pid) if ``entry`` is a sibling of ``target`` left by a dead process of this machine."""
    match = SIBLING.fullmatch(entry.name)
    if match is None or match["host"] != host_tag():
        return None
    # A shortened stem (a very long target name) only ever belongs to a temporary folder.
    if match["stem"] != target.name and not (match["kind"] == TEMP and target.name.startswith(match["stem"])):
        return None
    pid = int(match["pid"])
    return None if process_alive(pid) else (match["kind"], pid)


def remove_stale_siblings(target: Path) -> list[Path]:
    """Remove the temporary siblings of ``target`` whose process died, saying so; returns what was removed.

    A target moved aside by a run that died before putting the new one in place is restored instead.
    """
    try:
        entries = sorted(target.parent.iterdir())
    except OSError:  # a missing or unreadable parent holds nothing to clean; writing reports the problem
        return []
    removed = []
    for entry in entries:
        owner = _stale_owner(entry, target)
        if owner is None:
            continue
        kind, pid = owner
        if kind == BACKUP and not (target.exists() or target.is_symlink()):
            try:
                os.replace(entry, target)
            except OSError:  # another run restored it first
                continue
            print(f"layermerge: restored {target} from {entry.name}, where process {pid} (no longer running) "
                  "had moved it while replacing it", file=sys.stderr)
            continue
        remove_path(entry)
        if entry.exists():  # not ours to delete after all (permissions): leave it, say nothing wrong
            continue
        what = "temporary folder" if kind == TEMP else "backup of a replaced output"
        print(f"layermerge: removed stale {what} {entry} left by process {pid} (no longer running)",
              file=sys.stderr)
        removed.append(entry)
    return removed


def check_writable_location(output: Path) -> None:
    """Fail before any work when ``output`` cannot be created: a name too long, a file in the way, no permission."""
    for part in output.parts:
        if len(part.encode()) > NAME_MAX:
            shown = part if len(part) <= 40 else part[:40] + "..."
            raise OutputError(f"cannot write '{output}': the name '{shown}' is {len(part.encode())} bytes long and "
                              f"file systems allow at most {NAME_MAX}; choose a shorter output name")
    ancestor = output.parent
    while not (ancestor.exists() or ancestor.is_symlink()) and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise OutputError(f"cannot create '{output}': '{ancestor}' is not a folder; "
                          "choose another output location")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        if _read_only(ancestor):
            reason = "it is on a read-only file system"
        else:
            reason = "permission denied"
        raise OutputError(f"cannot write the output '{output}' in '{ancestor}': {reason}; "
                          "choose another output location")


def _read_only(folder: Path) -> bool:
    try:
        return bool(os.statvfs(folder).f_flag & os.ST_RDONLY)
    except (OSError, AttributeError):
        return False
