"""Paths a user gives that cannot be followed: a symbolic link that loops or points at nothing.

``Path.exists()`` and ``is_file()`` answer False for both, which would make the error say "not found"
about a path the user can see in ``ls``; this says what is really wrong with it.
"""

from __future__ import annotations

import errno
from pathlib import Path


def broken_link_reason(path: Path) -> str | None:
    """Why ``path`` (or a link on the way to it) cannot be followed, or None when it can or is not a link."""
    try:
        path.resolve(strict=True)
    except RuntimeError:            # Python < 3.13 reports a loop as RuntimeError("Symlink loop from ...")
        return "it is a symbolic link loop (a link that leads back to itself)"
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return "it is a symbolic link loop (a link that leads back to itself)"
        if path.is_symlink():
            return f"it is a symbolic link to {Path(path).readlink()}, which does not exist"
    return None


def missing_path_message(what: str, path: Path) -> str:
    """'<what> not found: PATH', or the reason a link there cannot be followed."""
    reason = broken_link_reason(path)
    if reason is None:
        return f"{what} not found: {path}"
    return f"{what} {path} cannot be opened: {reason}; point it at a real file or folder"


def relative_to_config(path: str | None, config_folder: Path) -> str | None:
    """A path from a config file, made absolute: relative paths are relative to the config's folder."""
    if path is None:
        return None
    candidate = Path(path).expanduser()
    return str(candidate if candidate.is_absolute() else (config_folder / candidate).resolve())
