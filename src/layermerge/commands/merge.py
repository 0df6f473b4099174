"""`layermerge merge CONFIG.yaml --output DIR`."""

from __future__ import annotations

from layermerge.config import load_config
from layermerge.errors import ConfigError


def add_parser(subparsers):
    parser = subparsers.add_parser("merge", help="merge experts as described by a YAML config")
    parser.add_argument("config", help="YAML file: base, experts, method, params (see README)")
    parser.add_argument("--output", "-o", help="output folder (overrides the config's output)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    parser.add_argument("--quiet", "-q", action="store_true", help="no progress bars")
    return parser


def run(args) -> int:
    from layermerge.merging import merge

    config = load_config(args.config)
    output = args.output or config.output
    if output is None:
        raise ConfigError(f"{args.config}: no output folder; pass --output DIR or set 'output' in the config")
    merged = merge(config.base, config.experts, config.method, output=output, overwrite=args.overwrite,
                   max_shard_size=config.max_shard_size, dtype=config.dtype, vocab_policy=config.vocab_policy,
                   head_keys=config.head_keys, quiet=args.quiet,
                   config_record=config.model_dump(exclude={"output"}), **config.params)
    if not args.quiet:
        print(f"merged {len(config.experts)} experts with {config.method} -> {merged.path}")
    return 0
