"""Progress reports: a tqdm bar on a terminal, plain periodic lines everywhere else.

tqdm redraws its bar with carriage returns and escape codes; in a log file, a pipe or a CI console
that becomes one long line of junk. ``progress`` therefore returns tqdm only when stderr is a
terminal (or in a notebook, where tqdm draws a widget), and otherwise a small stand-in with the part
of tqdm's interface layermerge uses (iteration, ``update``, ``set_postfix``, ``close``, context
manager) that prints a plain line at most every ``interval`` seconds and one at the end, e.g.
``prodistill: blocks 3/6 (50%) 12.3s``.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable

PLAIN_INTERVAL = 10.0      # seconds between two plain lines


def _interactive(stream) -> bool:
    """A terminal, or a Jupyter kernel (whose streams are not terminals but render tqdm's widget)."""
    isatty = getattr(stream, "isatty", None)
    try:
        if callable(isatty) and isatty():
            return True
    except (OSError, ValueError):          # a closed or detached stream
        return False
    return "ipykernel" in sys.modules and stream in (sys.stderr, sys.__stderr__)


def progress(iterable: Iterable | None = None, *, total: int | None = None, desc: str = "", unit: str = "it",
             disable: bool = False, leave: bool = True, interval: float | None = None, stream=None):
    """A progress report over ``iterable`` (or driven by ``update`` when it is None); see the module."""
    stream = sys.stderr if stream is None else stream
    interval = PLAIN_INTERVAL if interval is None else interval
    if not disable and _interactive(stream):
        from tqdm.auto import tqdm

        return tqdm(iterable, total=total, desc=desc, unit=unit, leave=leave, file=stream)
    return PlainProgress(iterable, total=total, desc=desc, unit=unit, disable=disable, leave=leave,
                         interval=interval, stream=stream)


class PlainProgress:
    """tqdm's interface as layermerge uses it, printing ``desc: n/total (p%) 12.3s`` lines."""

    def __init__(self, iterable: Iterable | None = None, *, total: int | None = None, desc: str = "",
                 unit: str = "it", disable: bool = False, leave: bool = True, interval: float = PLAIN_INTERVAL,
                 stream=None):
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)
        self.iterable, self.total, self.desc, self.unit = iterable, total, desc, unit
        self.disable, self.leave, self.interval = disable, leave, interval
        self.stream = sys.stderr if stream is None else stream
        self.n = 0
        self.postfix = ""
        self.started = self.last_print = time.monotonic()
        self.printed: int | None = None    # the count of the last line printed
        self.closed = False

    def __iter__(self):
        try:
            for item in self.iterable:
                yield item
                self.update(1)
        finally:
            self.close()

    def __len__(self) -> int:
        return self.total if self.total is not None else len(self.iterable)

    def __enter__(self) -> PlainProgress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if now - self.last_print >= self.interval:
            self._print(now)

    def set_postfix(self, ordered_dict: dict | None = None, refresh: bool = True, **values) -> None:
        values = {**(ordered_dict or {}), **values}
        self.postfix = ", ".join(f"{key}={value}" for key, value in values.items())

    def set_description(self, desc: str = "", refresh: bool = True) -> None:
        self.desc = desc

    def refresh(self) -> None:
        """Nothing to redraw: lines are printed by ``update`` and ``close``."""

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.leave and (self.n or self.total) and self.printed != self.n:
            self._print(time.monotonic())

    def line(self, now: float | None = None) -> str:
        """The report as one plain line."""
        elapsed = (time.monotonic() if now is None else now) - self.started
        if self.total:
            done = f"{self.n}/{self.total} ({100 * self.n // self.total}%)"
        else:
            done = f"{self.n} {self.unit}"
        label = f"{self.desc} " if self.desc else ""
        postfix = f", {self.postfix}" if self.postfix else ""
        return f"{label}{done} {elapsed:.1f}s{postfix}"

    def _print(self, now: float) -> None:
        self.last_print, self.printed = now, self.n
        if self.disable:
            return
        try:
            print(self.line(now), file=self.stream, flush=True)
        except (OSError, ValueError):      # a closed stream must not stop the work it reports on
            pass


__all__ = ["PLAIN_INTERVAL", "PlainProgress", "progress"]
