"""Options shared by the finetune, eval and demo subcommands."""

from __future__ import annotations

from layermerge.errors import ConfigError


def add_threads_option(parser) -> None:
    parser.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's own choice, "
                                                    "one per physical core)")


def apply_threads(threads: int | None) -> None:
    if threads is None:
        return
    if threads < 1:
        raise ConfigError(f"--threads must be at least 1, got {threads}")
    import torch

    torch.set_num_threads(threads)
