"""`layermerge finetune` (being written)."""


def add_parser(subparsers):
    return subparsers.add_parser("finetune", help="(being written)")


def run(args) -> int:
    raise NotImplementedError("finetune")
