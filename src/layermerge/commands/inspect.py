"""`layermerge inspect` (being written)."""


def add_parser(subparsers):
    return subparsers.add_parser("inspect", help="(being written)")


def run(args) -> int:
    raise NotImplementedError("inspect")
