"""`layermerge demo` (being written)."""


def add_parser(subparsers):
    return subparsers.add_parser("demo", help="(being written)")


def run(args) -> int:
    raise NotImplementedError("demo")
