"""Every kind of input a user names, opened as one reader with CheckpointReader's interface.

``open_input`` decides what a base or expert reference is, in this order: a reader already (returned
as is); a Hugging Face hub id ``org/name[@revision]`` that is not a local path (``io/hub.py``: resolved
into the hub cache, offline only from it); a PEFT/LoRA adapter folder (``io/lora.py``: the base plus
scale·B·A, formed tensor by tensor, so it needs the base reader); a ``.gguf`` file or a folder holding
one (``io/gguf.py``); otherwise a safetensors/PyTorch checkpoint (``io/reader.py``). Every strategy
reads through the readers this returns, so every method accepts every input kind.
"""

from __future__ import annotations

from pathlib import Path

from layermerge.io import gguf, hub, lora
from layermerge.io.reader import CheckpointReader


def open_input(source: str | Path | CheckpointReader, role: str | None = None,
               base: CheckpointReader | None = None) -> CheckpointReader:
    """The reader for ``source``; ``role`` names it in errors ("base model", "expert 'sst2'"); ``base`` is
    the base's reader, which a LoRA adapter is applied to."""
    if isinstance(source, CheckpointReader):
        return source
    path = Path(source).expanduser()
    if hub.looks_like_hub_id(str(source)) and not path.exists():
        resolved = hub.resolve(str(source), role)        # the snapshot folder, opened as any other input
        reader = open_input(resolved.folder, role, base)
        reader.hub_input = resolved                      # the id and commit, for the model card
        return reader
    if lora.is_lora_adapter(path):
        return lora.LoraReader(path, base, role)
    if gguf.is_gguf(path):
        return gguf.GgufReader(path, role)
    return CheckpointReader(path, role)
