"""The model a block engine runs: the base's architecture with its parameters on the meta device.

Building the template costs no memory (parameters are never materialised; the engine loads one
block's weights at a time), and its module names are mapped to the names the checkpoints use, since
transformers 5 renames some families' keys at load time.
"""

from __future__ import annotations

import sys
from contextlib import contextmanager

import torch
from torch import nn

from layermerge.engine.layouts import FusedLayout, fused_layouts
from layermerge.errors import ConfigError
from layermerge.experts import ExpertSet, detect_prefix


@contextmanager
def parameters_on_meta():
    """Create every ``nn.Parameter`` on the meta device while buffers stay real.

    Parameters cost neither memory nor initialisation time; buffers that are not in checkpoints
    (rotary frequencies, position ids) keep the values the model's constructor computes.
    """
    register = nn.Module.register_parameter

    def on_meta(module, name, param):
        if param is not None and not param.is_meta:
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register(module, name, param)

    nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def build_template(expert_set: ExpertSet, template: nn.Module | None = None) -> nn.Module:
    """A module of the base's architecture with its parameters on the meta device.

    Hugging Face configs build ``AutoModel``; layermerge vision folders their registered factory;
    anything else needs ``template`` (a module, or a callable returning one).
    """
    if template is not None:
        model = template if isinstance(template, nn.Module) else template()
        return model.eval()
    reference = expert_set.reference
    config = expert_set.output_config()      # the reference's, with a grown vocabulary's size
    if not config:
        raise ConfigError(f"{reference.path} has no config.json, so the model's architecture is unknown; "
                          "pass template=<an nn.Module of the architecture> to layermerge.merge")
    from layermerge.data.models import VISION_KEY, VisionSpec, build_vision_model, quiet_transformers

    if VISION_KEY in config:
        spec = VisionSpec.from_config(config, str(reference.folder))
        with parameters_on_meta():
            model = build_vision_model(spec, pretrained=False)
        return model.eval()
    from transformers import AutoConfig, AutoModel

    try:
        hf_config = AutoConfig.for_model(**config)
    except Exception as exc:       # any mistake in a user's config.json: no model_type, a field of the wrong type...
        cause = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ConfigError(f"cannot build a model from {reference.folder}/config.json ({cause}); fix that file "
                          "(e.g. re-save it with save_pretrained) or pass template=<an nn.Module of the "
                          "architecture>") from None
    with parameters_on_meta(), quiet_transformers():
        model = AutoModel.from_config(hf_config, dtype=torch.float32)
    return model.eval()


def transformers_names(model: nn.Module) -> dict[str, str]:
    """Template name -> the name transformers writes to disk (they differ where it renames keys)."""
    keys = list(model.state_dict())
    if "transformers" not in sys.modules:            # then it cannot be a transformers model (and the import
        return {key: key for key in keys}            # costs seconds)
    try:
        from transformers import PreTrainedModel
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:
        return {key: key for key in keys}
    if not isinstance(model, PreTrainedModel):
        return {key: key for key in keys}
    # Distinct placeholder tensors (tied weights share one) let us follow each key through the renaming.
    fake = {key: torch.empty(tensor.shape, dtype=tensor.dtype, device="meta")
            for key, tensor in model.state_dict().items()}
    reverted = revert_weight_conversion(model, dict(fake))
    by_id = {id(tensor): key for key, tensor in fake.items()}
    return {by_id[id(tensor)]: name for name, tensor in reverted.items() if id(tensor) in by_id}


def checkpoint_key_map(model: nn.Module, checkpoint_keys: list[str]) -> dict[str, str]:
    """Template state-dict name -> checkpoint (base) key, for every template key the checkpoints hold."""
    names = transformers_names(model)
    available = set(checkpoint_keys)
    prefix = detect_prefix(set(names.values()), checkpoint_keys)     # a task-model base: 'bert.' etc.
    return {key: prefix + name for key, name in names.items() if prefix + name in available}


def fused_key_layouts(model: nn.Module, expert_set: ExpertSet, key_map: dict[str, str]) -> dict[str, FusedLayout]:
    """Template keys that transformers fuses from several checkpoint tensors (MoE experts), with where their
    elements are stored (``layermerge.engine.layouts``); empty for models without such conversions."""
    if "transformers" not in sys.modules:
        return {}
    from transformers import PreTrainedModel

    if not isinstance(model, PreTrainedModel):
        return {}
    merge_keys = list(expert_set.report.merge_keys)
    available = set(merge_keys)
    reference, reference_prefix = expert_set.reference, expert_set.reference_prefix
    mapped = set(key_map)
    candidates = [key for key in model.state_dict() if key not in mapped]
    if not candidates:
        return {}
    names = transformers_names(model)
    prefix = detect_prefix(set(names.values()), merge_keys)

    def checkpoint_shape(key: str):
        return tuple(reference.shape(reference_prefix + key)) if key in available else None

    return fused_layouts(model, candidates, checkpoint_shape, checkpoint_prefix=prefix)
