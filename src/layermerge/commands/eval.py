"""`layermerge eval` (being written)."""


def add_parser(subparsers):
    return subparsers.add_parser("eval", help="(being written)")


def run(args) -> int:
    raise NotImplementedError("eval")
