"""`layermerge` command line. Each subcommand lives in ``layermerge.commands.<name>``.

A user error (LayermergeError) prints one line and exits with status 2, no traceback; so does an
operating-system error (no permission, disk full, a name too long, a symlink loop), naming the path.
SIGTERM unwinds like Ctrl-C, so temporary folders are removed either way.
"""

from __future__ import annotations

import argparse
import importlib
import signal
import sys
import threading
from contextlib import contextmanager

from layermerge import __version__
from layermerge.errors import LayermergeError, is_symlink_loop, os_error_message, warnings_as_lines
from layermerge.io.atomic import remove_unfinished

# Order shown in --help. Each module defines add_parser(subparsers) and run(args) -> int.
COMMANDS = ["merge", "methods", "inspect", "finetune", "eval", "demo", "bench", "extract-lora"]
EXIT_INTERRUPTED, EXIT_TERMINATED = 130, 143  # 128 + the signal's number, as shells report them


class Terminated(KeyboardInterrupt):
    """Raised on SIGTERM: a KeyboardInterrupt, so every cleanup that handles Ctrl-C handles it too."""


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage mistake is one line like every other error (argparse prints the whole usage
    block first); ``--help`` still shows the usage."""

    def error(self, message: str):
        command = self.prog.removeprefix("layermerge").strip()
        where = f"{command}: " if command else ""
        self.exit(2, f"layermerge: error: {where}{message}; see '{self.prog} --help'\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="layermerge", description="Merge fine-tuned experts into one model.")
    parser.add_argument("--version", action="version", version=f"layermerge {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        module = importlib.import_module(f"layermerge.commands.{name.replace('-', '_')}")
        sub = module.add_parser(subparsers)
        sub.set_defaults(handler=module.run)
    return parser


@contextmanager
def sigterm_as_interrupt():
    """Turn the first SIGTERM into ``Terminated``; later ones are ignored so the cleanup can finish.

    Yields a list that holds the signal once one arrived: an exception that a library made of the
    interrupt (native code may turn it into its own error) is then still reported as the termination.
    """
    received: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield received
        return

    def handler(signum, frame):
        if not received:
            received.append(signum)
            raise Terminated()

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield received
    finally:
        signal.signal(signal.SIGTERM, previous)


def _error(message: str) -> int:
    # One line, whatever the message: a multi-line error from a library is folded, not printed raw.
    message = " ".join(line.strip() for line in message.splitlines() if line.strip())
    print(f"layermerge: error: {message}", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    with sigterm_as_interrupt() as terminated, warnings_as_lines():
        try:
            return int(args.handler(args) or 0)
        except LayermergeError as exc:
            return _error(str(exc))
        except OSError as exc:
            return _error(os_error_message(exc))
        except Terminated:
            return _stopped(EXIT_TERMINATED)
        except KeyboardInterrupt:
            return _stopped(EXIT_INTERRUPTED)
        except RuntimeError as exc:
            if is_symlink_loop(exc):
                return _error(os_error_message(exc))
            if terminated:
                return _stopped(EXIT_TERMINATED)
            raise
        except Exception:
            if terminated:
                return _stopped(EXIT_TERMINATED)
            raise
        finally:
            remove_unfinished()   # a temporary folder an interrupt caught before its own cleanup could run


def _stopped(status: int) -> int:
    what = "terminated (SIGTERM)" if status == EXIT_TERMINATED else "interrupted"
    print(f"layermerge: {what}; no output was written", file=sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(main())
