"""`layermerge finetune BASE --task TASK`: fine-tune an expert (cached by a hash of all its inputs)."""

from __future__ import annotations

from layermerge.commands.common import add_threads_option, apply_threads


def add_parser(subparsers):
    parser = subparsers.add_parser(
        "finetune", help="fully fine-tune a base model on one task (cached)",
        description="Fine-tune BASE on TASK and print the output folder. TASK is a built-in task or a task spec "
                    "file (docs/TASKS.md). BASE is a Hugging Face model folder (a sequence classifier is "
                    "trained for classification and regression, the causal language model itself for "
                    "generation tasks) or vision:<name> (vision:efficientnet-lite0, vision:small-cnn) for "
                    "image tasks. "
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
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --output folder")
    parser.add_argument("--quiet", "-q", action="store_true", help="no progress bars")
    add_threads_option(parser)
    return parser


def run(args) -> int:
    from layermerge.finetune import finetune

    apply_threads(args.threads)
    result = finetune(args.base, args.task, output=args.output, cache_dir=args.cache_dir,
                      data_dir=args.data_dir, overwrite=args.overwrite, quiet=args.quiet,
                      epochs=args.epochs, lr=args.lr,
                      batch_size=args.batch_size, max_length=args.max_length,
                      max_train_examples=args.max_train_examples, warmup_ratio=args.warmup_ratio,
                      weight_decay=args.weight_decay, seed=args.seed, image_size=args.image_size)
    print(result.path)
    return 0
