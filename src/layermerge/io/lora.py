"""PEFT/LoRA adapter folders as experts. (Stub: filled in by issue 17.)"""

from __future__ import annotations

from pathlib import Path

from layermerge.io.reader import CheckpointReader


def is_lora_adapter(path: Path) -> bool:
    return False


class LoraReader(CheckpointReader):
    def __init__(self, path: Path, base: CheckpointReader | None, role: str | None = None):
        raise NotImplementedError
