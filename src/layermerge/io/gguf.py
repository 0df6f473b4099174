"""GGUF files as inputs. (Stub: filled in by issue 17.)"""

from __future__ import annotations

from pathlib import Path

from layermerge.io.reader import CheckpointReader


def is_gguf(path: Path) -> bool:
    return False


class GgufReader(CheckpointReader):
    def __init__(self, path: Path, role: str | None = None):
        raise NotImplementedError
