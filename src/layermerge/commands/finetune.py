"""`layermerge finetune BASE --task TASK [--lora-rank R]`: fine-tune an expert, fully or as a LoRA adapter
(cached by a hash of all its inputs)."""

from __future__ import annotations

from layermerge.commands.common import add_threads_option, apply_threads
from layermerge.errors import ConfigError


def add_parser(subparsers):
    parser = subparsers.add_parser(
        "finetune", help="fine-tune a base model on one task, fully or as a LoRA adapter (cached)",
        description="Fine-tune BASE on TASK and print the output folder. TASK is a built-in task or a task spec "
                    "file (docs/TASKS.md). BASE is a Hugging Face model folder (a sequence classifier is "
                    "trained for classification and regression, the causal language model itself for "
                    "generation tasks) or vision:<name> (vision:efficientnet-lite0, vision:small-cnn) for "
                    "image tasks. With --lora-rank the base stays frozen and a LoRA adapter is trained instead "
                    "(a PEFT adapter folder; text and generation tasks; needs the lora extra). "
                    "A run whose inputs and settings match a finished one returns that folder at once.")
    parser.add_argument("base", help="Hugging Face model folder, or vision:<registered vision model>")
    parser.add_argument("--task", required=True, metavar="FILE_OR_NAME",
                        help="a task spec file (YAML, docs/TASKS.md) or a built-in task (cola, sst2, mrpc, stsb, "
                             "qqp, mnli, qnli, rte, mnist, fashion_mnist, kmnist, cifar10, gtsrb)")
    parser.add_argument("--output", "-o",
                        help="output folder (default: <cache>/experts/<task>-<base>-<hash>)")
    parser.add_argument("--cache-dir", help="cache root (default: $LAYERMERGE_CACHE or ./.cache/layermerge)")
    parser.add_argument("--data-dir", help="local data folder of the built-in tasks, holding glue/ and vision/ "
                                           "(default: $LAYERMERGE_DATA or ../shared/data)")
    parser.add_argument("--epochs", type=int, help="passes over the data (default 1)")
    parser.add_argument("--lr", type=float, help="peak learning rate (default 5e-5)")
    parser.add_argument("--batch-size", type=int, help="batch size (default 32)")
    parser.add_argument("--max-length", type=int,
                        help="tokens per text example (default 128; 512 of prompt and completion for generation)")
    parser.add_argument("--max-train-examples", type=int,
                        help="train on a seeded subset of this size (default all)")
    parser.add_argument("--warmup-ratio", type=float, help="fraction of steps warming up (default 0.06)")
    parser.add_argument("--weight-decay", type=float, help="AdamW weight decay (default 0.01)")
    parser.add_argument("--seed", type=int, help="random seed (default 0)")
    parser.add_argument("--image-size", type=int,
                        help="image resolution for vision models (default: the model's)")
    lora = parser.add_argument_group("LoRA (train an adapter instead of every weight)")
    lora.add_argument("--lora-rank", type=int, metavar="R",
                      help="train a LoRA adapter of rank R (16 is a common choice); without it every weight trains")
    lora.add_argument("--lora-alpha", type=float, metavar="ALPHA",
                      help="LoRA scale: each update is (ALPHA/R)·B·A (default 2·R)")
    lora.add_argument("--lora-dropout", type=float, metavar="P", help="dropout on the LoRA branch (default 0.05)")
    lora.add_argument("--lora-targets", metavar="NAMES",
                      help="comma-separated module names that get LoRA, e.g. q_proj,v_proj (default: every "
                           "Linear layer of the base, not the output layer or a new head)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --output folder")
    parser.add_argument("--quiet", "-q", action="store_true", help="no progress bars")
    add_threads_option(parser)
    return parser


def lora_settings(args) -> dict | None:
    """The ``lora`` setting from the --lora-* flags: None (full fine-tuning) without --lora-rank."""
    given = {"--lora-alpha": args.lora_alpha, "--lora-dropout": args.lora_dropout,
             "--lora-targets": args.lora_targets}
    if args.lora_rank is None:
        extra = [flag for flag, value in given.items() if value is not None]
        if extra:
            raise ConfigError(f"{extra[0]} needs --lora-rank R: LoRA fine-tuning is on only with a rank")
        return None
    if args.lora_rank < 1:
        raise ConfigError(f"--lora-rank must be at least 1, got {args.lora_rank}")
    if args.lora_alpha is not None and not args.lora_alpha > 0:
        raise ConfigError(f"--lora-alpha must be positive, got {args.lora_alpha}")
    if args.lora_dropout is not None and not 0 <= args.lora_dropout < 1:
        raise ConfigError(f"--lora-dropout must be in [0, 1), got {args.lora_dropout}")
    lora = {"r": args.lora_rank, "alpha": args.lora_alpha, "dropout": args.lora_dropout}
    if args.lora_targets is not None:
        targets = [name.strip() for name in args.lora_targets.split(",")]
        if not all(targets):
            raise ConfigError(f"--lora-targets {args.lora_targets!r} is not a comma-separated list of module "
                              "names (e.g. q_proj,v_proj)")
        lora["target_modules"] = targets
    return {key: value for key, value in lora.items() if value is not None}


def run(args) -> int:
    from layermerge.finetune import finetune

    apply_threads(args.threads)
    lora = lora_settings(args)
    result = finetune(args.base, args.task, output=args.output, cache_dir=args.cache_dir,
                      data_dir=args.data_dir, overwrite=args.overwrite, quiet=args.quiet,
                      epochs=args.epochs, lr=args.lr,
                      batch_size=args.batch_size, max_length=args.max_length,
                      max_train_examples=args.max_train_examples, warmup_ratio=args.warmup_ratio,
                      weight_decay=args.weight_decay, seed=args.seed, image_size=args.image_size, lora=lora)
    print(result.path)
    return 0
