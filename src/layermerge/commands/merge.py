"""`layermerge merge CONFIG.yaml --output DIR`.

Data-driven methods (prodistill, distillmerge) take the config's ``data:`` and ``engine:`` sections;
the engine flags below override the latter. Under ``torchrun --nproc-per-node N -m layermerge merge``
they run data-parallel over the few-shot examples (rank 0 writes the output).
"""

from __future__ import annotations

import os
from pathlib import Path

from layermerge.config import load_config
from layermerge.errors import ConfigError


def add_parser(subparsers):
    parser = subparsers.add_parser("merge", help="merge experts as described by a YAML config")
    parser.add_argument("config", help="YAML file: base, experts, method, params (see README)")
    parser.add_argument("--output", "-o", help="output folder (overrides the config's output)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    parser.add_argument("--push-to-hub", metavar="REPO", help="then upload the output folder to this Hugging Face "
                                                              "hub repo (org/name; overrides the config's push_to_hub)")
    parser.add_argument("--quiet", "-q", action="store_true", help="no progress bars")
    engine = parser.add_argument_group("data-driven methods (override the config's engine section)")
    engine.add_argument("--resume", action="store_true",
                        help="continue an interrupted run from its last finished block")
    engine.add_argument("--cache-budget", metavar="SIZE", help="RAM for cached activations, e.g. 2GB; "
                                                               "beyond it they spill to disk")
    engine.add_argument("--device", help="cpu, cuda, cuda:N or auto (default: auto)")
    engine.add_argument("--compute-dtype", choices=["float32", "bfloat16"], help="dtype of block compute")
    engine.add_argument("--checkpoint-dir", metavar="DIR", help="per-block checkpoints (default: OUTPUT.checkpoint)")
    engine.add_argument("--plot-coefficients", action="store_true",
                        help="also write <method>/coefficients.png (learned coefficients per block)")
    return parser


# What layermerge.yaml records of the config: data-free records stay as they were before data sections.
RECORD_EXCLUDED = {False: {"output", "data", "engine", "push_to_hub"}, True: {"output", "push_to_hub"}}
ENGINE_FLAGS = {"resume": "resume", "cache_budget": "cache_budget", "device": "device",
                "compute_dtype": "compute_dtype", "checkpoint_dir": "checkpoint_dir",
                "plot_coefficients": "plot_coefficients"}


def _engine_overrides(args) -> dict:
    overrides = {}
    for flag, option in ENGINE_FLAGS.items():
        value = getattr(args, flag, None)
        if value not in (None, False):
            overrides[option] = value
    return overrides


def run(args) -> int:
    from layermerge.pipeline import merge

    given = load_config(args.config, resolve=False)      # layermerge.yaml records paths as written
    config = given.resolve_paths(Path(args.config).parent.resolve())
    output = args.output or config.output
    if output is None:
        raise ConfigError(f"{args.config}: no output folder; pass --output DIR or set 'output' in the config")
    overrides = _engine_overrides(args)
    extra = {}
    if config.data is not None:
        engine = {**(config.engine.model_dump(exclude_unset=True) if config.engine is not None else {}), **overrides}
        extra = {"data": config.data, **engine}
    elif overrides:
        flags = [f"--{k.replace('_', '-')}" for k in overrides]
        verb = "applies" if len(flags) == 1 else "apply"
        named = flags[0] if len(flags) == 1 else f"{', '.join(flags[:-1])} and {flags[-1]}"
        raise ConfigError(f"{named} only {verb} to data-driven methods; {config.method!r} is data-free: remove "
                          + ("it" if len(flags) == 1 else "them"))
    record = given.model_dump(exclude=RECORD_EXCLUDED[given.data is not None])
    if given.data is not None:
        record["data"] = given.data.model_dump(exclude_none=True)
        record["engine"] = given.engine.model_dump(exclude_none=True, exclude={"resume"}) if given.engine else {}
    merged = merge(config.base, config.experts, config.method, output=output, overwrite=args.overwrite,
                   max_shard_size=config.max_shard_size, dtype=config.dtype, vocab_policy=config.vocab_policy,
                   head_keys=config.head_keys, quiet=args.quiet, config_record=record, card_paths=config.card_paths,
                   tokenizer_source=config.tokenizer_source, chat_template=config.chat_template,
                   push_to_hub=args.push_to_hub or config.push_to_hub, **extra, **config.params)
    if not args.quiet and os.environ.get("RANK", "0") == "0":        # under torchrun only rank 0 reports
        print(f"merged {len(config.experts)} experts with {config.method} -> {merged.path}")
        if merged.hub_url:
            print(f"uploaded to {merged.hub_url}")
    return 0
