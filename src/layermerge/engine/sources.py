"""Where the engine reads weights from: the base and expert tensors, named as in the template model.

The engine addresses weights by the template model's own state-dict names (``encoder.layer.3...``).
A source maps those names to tensors one key at a time, so only a block's worth of weights is ever
loaded: an ``ExpertSet`` (lazy checkpoint readers) or plain state dicts (tests, small models, or
models whose checkpoint names transformers renames at load time).
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import nn

from layermerge.errors import IncompatibleExpertsError


class WeightSource(Protocol):
    """Base and expert tensors by template-model key, as fp32."""

    tasks: list[str]

    def keys(self) -> list[str]: ...

    def base(self, key: str) -> torch.Tensor: ...

    def experts(self, key: str) -> list[torch.Tensor]: ...


def _as_float(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.float() if tensor.is_floating_point() else tensor


class StateDictSource:
    """A base state dict and one state dict per task, all keyed like the template model."""

    def __init__(self, base: dict[str, torch.Tensor], experts: dict[str, dict[str, torch.Tensor]]):
        if not experts:
            raise IncompatibleExpertsError("no experts given: pass at least one expert state dict")
        self._base = base
        self._experts = experts
        self.tasks = list(experts)
        for task, state in experts.items():
            missing = [k for k in base if k not in state]
            if missing:
                raise IncompatibleExpertsError(
                    f"expert '{task}' lacks {len(missing)} base keys, e.g. {missing[:3]}; pass the expert's "
                    "backbone state dict (model.base_model.state_dict() for a task model)")

    @classmethod
    def from_models(cls, base: nn.Module, experts: dict[str, nn.Module]) -> StateDictSource:
        """From loaded modules (their backbones: pass ``model.base_model`` for task models)."""
        return cls(base.state_dict(), {task: model.state_dict() for task, model in experts.items()})

    def keys(self) -> list[str]:
        return list(self._base)

    def base(self, key: str) -> torch.Tensor:
        return _as_float(self._base[key])

    def experts(self, key: str) -> list[torch.Tensor]:
        return [_as_float(state[key]) for state in self._experts.values()]


class ExpertSetSource:
    """An ExpertSet read lazily, addressed by template-model names.

    Without ``key_map`` the set's (prefix-stripped) base key names must be the template's names.
    ``key_map`` maps template names to checkpoint names where they differ (transformers 5 renames
    some families' keys at load time, e.g. ViT's ``encoder.layer.0.attention.attention.query`` is the
    module's ``layers.0.attention.q_proj``); only template names with a checkpoint key are listed.
    """

    def __init__(self, expert_set, key_map: dict[str, str] | None = None, layouts: dict | None = None):
        self.expert_set = expert_set
        self.tasks = list(expert_set.names)
        merge_keys = list(expert_set.report.merge_keys)
        if key_map is None:
            self._to_checkpoint = {key: key for key in merge_keys}
        else:
            available = set(merge_keys)
            self._to_checkpoint = {name: key for name, key in key_map.items() if key in available}
        # Template keys fused from several checkpoint tensors (layermerge.engine.layouts.FusedLayout).
        self.layouts = {key: layout for key, layout in (layouts or {}).items() if key not in self._to_checkpoint}
        self._keys = list(self._to_checkpoint) + list(self.layouts)

    def keys(self) -> list[str]:
        return self._keys

    def checkpoint_key(self, key: str) -> str:
        """The checkpoint (base) name of template key ``key`` (a fused key keeps its template name)."""
        return self._to_checkpoint.get(key, key)

    def checkpoint_tensors(self, key: str, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
        """{checkpoint key: tensor} of a template tensor: itself under its checkpoint name, or its pieces."""
        if key in self.layouts:
            return self.layouts[key].split(tensor)
        return {self._to_checkpoint[key]: tensor}

    def _grown(self, checkpoint_key: str) -> bool:
        """A vocabulary tensor of an output vocabulary that grew: read in the output's rows."""
        expert_set = self.expert_set
        return expert_set.vocabulary is not None and checkpoint_key in expert_set.report.vocab_keys

    def base(self, key: str) -> torch.Tensor:
        if key in self.layouts:
            return _as_float(self.layouts[key].assemble(self.expert_set.base_tensor))
        if self._grown(self._to_checkpoint[key]):
            return _as_float(self.expert_set.vocabulary_view(self._to_checkpoint[key]))
        return _as_float(self.expert_set.base_tensor(self._to_checkpoint[key]))

    def experts(self, key: str) -> list[torch.Tensor]:
        if key in self.layouts or self._grown(self._to_checkpoint[key]):
            return [self.expert(key, position) for position in range(len(self.expert_set.experts))]
        return [_as_float(t) for t in self.expert_set.expert_tensors(self._to_checkpoint[key])]

    def expert(self, key: str, position: int) -> torch.Tensor:
        """Only expert ``position``'s tensor (reading one expert at a time keeps memory down)."""
        if key in self.layouts:
            reader = self.expert_set.experts[position]
            return _as_float(self.layouts[key].assemble(reader.get))
        if self._grown(self._to_checkpoint[key]):
            return _as_float(self.expert_set.vocabulary_view(self._to_checkpoint[key], position))
        expert = self.expert_set.experts[position]
        tensor = expert.get(self._to_checkpoint[key])
        checkpoint_key = self._to_checkpoint[key]
        if checkpoint_key in self.expert_set.report.vocab_keys:
            tensor = tensor[:self.expert_set.reference.shape(self.expert_set.reference_prefix + checkpoint_key)[0]]
        return _as_float(tensor)

    def fingerprint(self) -> dict:
        """What identifies the weights: the checkpoint paths (their contents are hashed in the output)."""
        readers = ([self.expert_set.base] if self.expert_set.base is not None else []) + [
            expert.reader for expert in self.expert_set.experts]
        files = {}
        for reader in readers:
            for path in reader.weight_files:
                stat = path.stat()
                files[str(path)] = [stat.st_size, stat.st_mtime_ns]
        return {"files": files, "tasks": self.tasks}


def expert_tensor(source: WeightSource, key: str, position: int) -> torch.Tensor:
    """Expert ``position``'s tensor for ``key``, reading only that expert when the source allows it."""
    single = getattr(source, "expert", None)
    if callable(single):
        return single(key, position)
    return source.experts(key)[position]


def as_source(weights) -> WeightSource:
    """Accept a WeightSource or an ExpertSet."""
    from layermerge.experts import ExpertSet

    if isinstance(weights, ExpertSet):
        return ExpertSetSource(weights)
    return weights
