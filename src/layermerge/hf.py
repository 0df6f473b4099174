"""Bridges to transformers: build models from merged state dicts and rebuild per-task models."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from layermerge.errors import CheckpointError
from layermerge.io.reader import CheckpointReader

HEAD_META = "layermerge_head.json"


def backbone_from_state_dict(config: dict | None, state_dict: dict[str, torch.Tensor]):
    """Instantiate the base architecture from its config dict and load the merged weights."""
    from transformers import AutoConfig, AutoModel

    if config is None:
        raise CheckpointError("the base has no config.json, so no transformers model can be built; "
                              "use the state dict directly")
    hf_config = AutoConfig.for_model(**config)
    return _from_state_dict(AutoModel.from_config(hf_config).__class__, hf_config, state_dict)


def _from_state_dict(model_cls, config, state_dict: dict[str, torch.Tensor]):
    """``from_pretrained`` on an in-memory state dict, so transformers' own key renaming applies."""
    import transformers

    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        model = model_cls.from_pretrained(None, config=config, state_dict=state_dict)
    finally:
        transformers.logging.set_verbosity(verbosity)
    return model.eval()


def load_task_model(folder: str | Path, task: str, dtype: torch.dtype = torch.float32):
    """The merged backbone plus task ``task``'s own head, as the expert's transformers class.

    The expert's config (with its label set) is stored in ``heads/<task>/config.json`` and the
    key prefix of its backbone (``bert.``...) in ``heads/<task>/layermerge_head.json``.
    """
    from transformers import AutoConfig

    import transformers

    folder = Path(folder)
    head_dir = folder / "heads" / task
    if not (head_dir / HEAD_META).is_file():
        available = sorted(p.name for p in (folder / "heads").iterdir()) if (folder / "heads").is_dir() else []
        raise CheckpointError(f"no head for task {task!r} in {folder}; heads present: {available}")
    meta = json.loads((head_dir / HEAD_META).read_text())
    config = AutoConfig.from_pretrained(head_dir)
    architecture = (config.architectures or [None])[0]
    if architecture is None or not hasattr(transformers, architecture):
        raise CheckpointError(f"{head_dir}/config.json names no known transformers architecture")
    prefix = meta.get("prefix", "")
    state = {prefix + k: v for k, v in CheckpointReader(folder).state_dict().items()}
    if (head_dir / "model.safetensors").exists() or (head_dir / "model.safetensors.index.json").exists():
        state.update(CheckpointReader(head_dir).state_dict())
    return _from_state_dict(getattr(transformers, architecture), config, state).to(dtype)
