"""`layermerge` command line. Each subcommand lives in ``layermerge.commands.<name>``.

A user error (LayermergeError) prints one line and exits with status 2, no traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from layermerge import __version__
from layermerge.errors import LayermergeError

# Order shown in --help. Each module defines add_parser(subparsers) and run(args) -> int.
COMMANDS = ["merge", "methods", "inspect", "finetune", "eval", "demo", "bench"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="layermerge", description="Merge fine-tuned experts into one model.")
    parser.add_argument("--version", action="version", version=f"layermerge {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        module = importlib.import_module(f"layermerge.commands.{name}")
        sub = module.add_parser(subparsers)
        sub.set_defaults(handler=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.handler(args) or 0)
    except LayermergeError as exc:
        # One line, whatever the message: a multi-line error from a library is folded, not printed raw.
        message = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())
        print(f"layermerge: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("layermerge: interrupted; no output was written", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
