"""Bridges to transformers: build models from merged state dicts and rebuild per-task models."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from layermerge.errors import CheckpointError
from layermerge.io.reader import CheckpointReader
from layermerge.names import check_expert_name

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


def load_task_model(folder: str | Path, task: str, dtype: torch.dtype = torch.float32,
                    base: str | Path | None = None):
    """The merged backbone plus task ``task``'s own head, as the expert's transformers class.

    The expert's config (with its label set) is stored in ``heads/<task>/config.json`` and the
    key prefix of its backbone (``bert.``...) in ``heads/<task>/layermerge_head.json``.
    Outputs of methods with per-task weights (EMR) are rebuilt for ``task`` first; they need the
    base model, read from the path recorded in ``layermerge.yaml`` unless ``base`` is given.
    """
    import transformers
    from transformers import AutoConfig

    check_expert_name(task)  # a task name is a folder under heads/: never '../elsewhere'
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
    backbone = apply_task_extras(folder, task, CheckpointReader(folder).state_dict(), base)
    state = {prefix + k: v for k, v in backbone.items()}
    if (head_dir / "model.safetensors").exists() or (head_dir / "model.safetensors.index.json").exists():
        state.update(CheckpointReader(head_dir).state_dict())
    return _from_state_dict(getattr(transformers, architecture), config, state).to(dtype)


def apply_task_extras(folder: Path, task: str, merged: dict[str, torch.Tensor],
                       base: str | Path | None) -> dict[str, torch.Tensor]:
    """Turn the shared merged backbone into task ``task``'s weights for methods that store per-task parts.

    EMR stores θ0 + τ_uni as the main weights, a bool mask per task in ``task_extras/<task>/`` and
    the rescalers in ``layermerge_summary.json``; task t's weights are θ0 + λ_t · M_t ⊙ τ_uni.
    """
    summary_path = folder / "layermerge_summary.json"
    if not summary_path.is_file():
        return merged
    record = json.loads(summary_path.read_text())
    if (record.get("summary") or {}).get("task_extras") == "replace":
        return _replace_task_weights(folder, task, merged)
    if record.get("method") != "emr":
        return merged
    from layermerge.methods.emr import rebuild_task_weight

    rescalers = (record.get("summary") or {}).get("rescalers") or {}
    extras_dir = folder / "task_extras" / task
    if task not in rescalers or not extras_dir.is_dir():
        raise CheckpointError(f"{folder} is an EMR output without masks or a rescaler for task {task!r} "
                              f"(expected {extras_dir} and summary.rescalers in {summary_path}); "
                              "re-run the merge")
    base_reader = CheckpointReader(_emr_base_path(folder, base))
    masks = CheckpointReader(extras_dir)
    rebuilt = dict(merged)
    for key in masks.keys():
        if key not in merged or key not in base_reader:
            raise CheckpointError(f"EMR mask {key!r} in {extras_dir} has no matching tensor in "
                                  f"{'the merged weights' if key not in merged else base_reader.path}; "
                                  "pass the base the model was merged from (base=...)")
        weight = rebuild_task_weight(base_reader.get(key), merged[key], masks.get(key), rescalers[task])
        rebuilt[key] = weight.to(merged[key].dtype)
    return rebuilt


def _replace_task_weights(folder: Path, task: str, merged: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Methods with one model per task (NeuLig per task...) store that task's own tensors in
    ``task_extras/<task>/``; they replace the shared ones (tasks without a folder use the shared model)."""
    extras_dir = folder / "task_extras" / task
    if not extras_dir.is_dir():
        return merged
    rebuilt = dict(merged)
    own = CheckpointReader(extras_dir)
    for key in own.keys():
        if key not in merged:
            raise CheckpointError(f"{extras_dir} holds {key!r}, which the merged weights in {folder} lack; "
                                  "re-run the merge")
        rebuilt[key] = own.get(key).to(merged[key].dtype)
    return rebuilt


def _emr_base_path(folder: Path, base: str | Path | None) -> Path:
    """The base an EMR output was merged from: ``base`` if given, else the one in ``layermerge.yaml``."""
    import yaml

    if base is not None:
        return Path(base)
    record_path = folder / "layermerge.yaml"
    recorded = None
    if record_path.is_file():
        recorded = (yaml.safe_load(record_path.read_text()) or {}).get("base")
    if not recorded or not Path(recorded).exists():
        where = f"the base recorded in {record_path} ({recorded})" if recorded else "the base"
        raise CheckpointError(f"EMR task models are rebuilt from the base weights, but {where} is not "
                              "available; pass base='path/to/base' to load_task_model")
    return Path(recorded)
