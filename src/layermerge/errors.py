"""Errors a user can cause. The CLI prints their message and exits with status 2, no traceback."""

import contextlib
import errno
import sys
import warnings


class LayermergeError(Exception):
    """Base class: something in the user's input is wrong; the message says what and how to fix it."""


class ConfigError(LayermergeError):
    """The merge config or a method parameter is invalid."""


class CheckpointError(LayermergeError):
    """A checkpoint file or folder cannot be read."""


class IncompatibleExpertsError(LayermergeError):
    """The base and experts cannot be merged together (keys, shapes, dtypes, model types...)."""


class OutputError(LayermergeError):
    """The output location is unsafe or already exists."""


class DataError(LayermergeError):
    """A task's data cannot be found or is empty/malformed."""


class LayermergeWarning(UserWarning):
    """The inputs are probably not what the user meant, but the work can go on. The CLI prints these
    as one line, ``layermerge: warning: ...`` (see ``warnings_as_lines``)."""


class RedundantInputWarning(LayermergeWarning):
    """An expert adds nothing: it is identical to the base (a zero task vector) or to another expert."""


@contextlib.contextmanager
def warnings_as_lines(stream=None):
    """Show LayermergeWarnings as ``layermerge: warning: <message>`` on stderr, each one every time it
    happens; other warnings keep Python's format."""
    with warnings.catch_warnings():
        shown = warnings.showwarning
        warnings.simplefilter("always", LayermergeWarning)

        def show(message, category, filename, lineno, file=None, line=None):
            if issubclass(category, LayermergeWarning):
                print(f"layermerge: warning: {message}", file=stream or sys.stderr, flush=True)
            else:
                shown(message, category, filename, lineno, file, line)

        warnings.showwarning = show
        yield


class OutputWriteError(OutputError, OSError):
    """The operating system refused to write the output (disk full, no permission...). Still an OSError,
    so code that handled the raw error keeps working."""


# What to do about the operating-system errors a user can meet, by errno.
OS_ERROR_HINTS = {
    errno.EACCES: "check the permissions of that location or choose another one",
    errno.EPERM: "check the permissions of that location or choose another one",
    errno.EROFS: "the file system is read-only; choose another location",
    errno.ENOSPC: "the disk is full; free some space or choose a location on another disk",
    errno.EDQUOT: "the disk quota is exhausted; free some space or choose another location",
    errno.ENAMETOOLONG: "a name in that path is longer than the file system allows (usually 255 bytes); "
                        "choose a shorter one",
    errno.ELOOP: "a symbolic link in that path points back to itself; fix or remove the link",
    errno.ENOTDIR: "a part of that path is a file, not a folder; choose another location",
    errno.EISDIR: "that path is a folder; give a file name",
    errno.ENOENT: "check the path",
}


def os_error_message(exc: BaseException, action: str | None = None, path=None) -> str:
    """One line for an OSError (or pathlib's symlink-loop RuntimeError): the path, the cause, the fix.

    ``action`` ("write", "read") and ``path`` override what the error itself records.
    """
    if is_symlink_loop(exc):  # Python < 3.13: pathlib reports a loop as RuntimeError('Symlink loop from ...')
        cause, code = "Too many levels of symbolic links", errno.ELOOP
        path = path or str(exc).removeprefix("Symlink loop from ").strip("'\"")
    else:
        cause = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
        code = getattr(exc, "errno", None)
        path = path or getattr(exc, "filename", None)
    if path is not None:
        where = f"'{path}'"
        if getattr(exc, "filename2", None) is not None:
            where += f" -> '{exc.filename2}'"
        where = f"cannot {action} {where}" if action else where
    else:
        where = f"cannot {action}" if action else ""
    hint = OS_ERROR_HINTS.get(code)
    return (f"{where}: " if where else "") + cause + (f" ({hint})" if hint else "")


def is_symlink_loop(exc: BaseException) -> bool:
    """pathlib before Python 3.13 raises RuntimeError('Symlink loop from ...') instead of OSError(ELOOP)."""
    return isinstance(exc, RuntimeError) and str(exc).startswith("Symlink loop from")
