"""Partial matching for PLeaS: which aligned units are merged into one, which are kept from each model,
and where every tensor entry and feature sits in the (possibly wider) merged model.

After alignment unit i of model A corresponds to unit i of the aligned model B. PLeaS merges only the
``k`` best-matched pairs of a group of ``d`` units and keeps the other ``d - k`` units of *both* models,
so the merged group has ``k + 2(d - k)`` units, laid out as [merged | A's own | B's own]. With ``k = d``
(full matching) the merged model has one model's shapes; with ``k = 0`` it holds both models side by
side. See docs/METHODS_PLEAS.md.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from layermerge.align import PermutationSpec
from layermerge.align.spec import expand_index
from layermerge.errors import ConfigError

MODELS = (0, 1)          # model A, aligned model B


@dataclass(frozen=True)
class GroupLayout:
    """One permutation group in the merged model: the unit indices (A's order, which the aligned B
    shares) that are merged, and those kept separately from each model."""

    merged: torch.Tensor
    separate: torch.Tensor

    @property
    def size(self) -> int:
        return self.merged.numel() + self.separate.numel()

    @property
    def width(self) -> int:
        return self.merged.numel() + 2 * self.separate.numel()

    def sources(self, model: int) -> torch.Tensor:
        """For each unit of the merged model, the unit of ``model`` (0: A, 1: aligned B) it comes from;
        -1 where that model has none (the other model's own units)."""
        none = torch.full_like(self.separate, -1)
        parts = (self.merged, self.separate, none) if model == 0 else (self.merged, none, self.separate)
        return torch.cat(parts)


def full_layout(size: int) -> GroupLayout:
    """Every unit merged: the merged group has the models' width (plain alignment, then merging)."""
    return GroupLayout(torch.arange(size), torch.empty(0, dtype=torch.long))


def choose_layout(scores: torch.Tensor, matched: int) -> GroupLayout:
    """Merge the ``matched`` aligned pairs whose activations agree best (highest ``scores``); keep the
    rest from both models. Ties are broken by unit index, so the choice is deterministic."""
    order = torch.argsort(scores.cpu(), descending=True, stable=True)
    return GroupLayout(order[:matched].sort().values, order[matched:].sort().values)


def matched_count(ratio: float, size: int) -> int:
    """Units merged at a match ratio: ``ratio * size`` rounded half up."""
    return min(size, max(0, math.floor(ratio * size + 0.5)))


# --------------------------------------------------------------------- laying tensors out
@dataclass(frozen=True)
class LaidAxis:
    """A tensor axis indexed by a group's units (``unit`` entries each, ``segments`` repeats, as an
    ``Axis``) and the group's layout. ``reads`` marks the input axis of a Linear/Conv weight."""

    dim: int
    unit: int
    segments: int
    layout: GroupLayout
    reads: bool = False


def _owned(layout: GroupLayout, model: int, unit: int, segments: int) -> tuple[torch.Tensor, torch.Tensor]:
    sources = layout.sources(model)
    index = expand_index(sources.clamp_min(0), unit, segments)
    mask = (sources >= 0).repeat_interleave(unit).repeat(segments)
    return index, mask


def spread(tensors: Sequence[torch.Tensor], axes: Sequence[LaidAxis]) -> torch.Tensor:
    """Model A's and aligned model B's tensor laid out in the merged model.

    Each model's entries go to the positions of the units it owns (zero elsewhere); the sum is divided
    by the number of models owning the entry's *output* position. So a merged unit's bias or norm
    vector is the average, a kept unit's is its model's, and a weight reading a kept unit into a merged
    one carries half of that model's weight: the merged unit outputs the average of the two models'
    units, each computed from its own inputs (the rule of Git Re-Basin's average, extended to kept
    units). Features (activations) laid out this way are averaged where merged, copied where kept.
    """
    if not axes:
        return (tensors[0] + tensors[1]) / 2
    total, owners = 0, 0
    for model, tensor in zip(MODELS, tensors):
        own_output = 1
        for axis in axes:
            dim = axis.dim % tensor.dim()
            index, mask = _owned(axis.layout, model, axis.unit, axis.segments)
            shape = [1] * tensor.dim()
            shape[dim] = -1
            mask = mask.to(tensor.device, tensor.dtype).view(shape)
            tensor = tensor.index_select(dim, index.to(tensor.device)) * mask
            if not axis.reads:
                own_output = own_output * mask
        total = total + tensor
        owners = owners + own_output
    if isinstance(owners, int):
        return total / owners
    return total / owners.clamp_min(1)


def ownership(layout: GroupLayout | None, size: int, unit: int = 1, segments: int = 1) -> torch.Tensor:
    """(2, entries) booleans: which merged entries model A and model B own (all, for an axis no group
    reorders: ``layout`` None and ``size`` entries)."""
    if layout is None:
        return torch.ones(2, size, dtype=torch.bool)
    return torch.stack([_owned(layout, model, unit, segments)[1] for model in MODELS])


def spread_state(spec: PermutationSpec | None, layouts: Mapping[str, GroupLayout],
                 states: Sequence[Mapping[str, torch.Tensor]], reads: set[tuple[str, int]]) -> dict[str, torch.Tensor]:
    """The merged model's starting state: every tensor laid out by ``spread`` (the average of A and
    aligned B under full matching). ``reads``: (key, dim) of the input axes of Linear/Conv weights.
    Integer tensors (step counters) are A's."""
    axes_of = spec.param_axes() if spec is not None else {}
    merged = {}
    for key, first in states[0].items():
        if not first.is_floating_point():
            merged[key] = first.clone()
            continue
        axes = [LaidAxis(axis.dim, axis.unit, axis.segments, layouts[group], (key, axis.dim % first.dim()) in reads)
                for group, axis in axes_of.get(key, ()) if group in layouts]
        merged[key] = spread([states[0][key], states[1][key]], axes)
    return merged


# --------------------------------------------------------------------- compute budget
@dataclass(frozen=True)
class CostTerm:
    """Multiply-accumulates of one Linear/Conv2d layer on the example batch: ``coeff`` × (output
    entries × input entries, less the blocks that connect one model's kept units to the other's)."""

    coeff: float
    out_size: int
    in_size: int
    out_axis: tuple[str, int, int] | None        # (group, unit, segments)
    in_axis: tuple[str, int, int] | None


def term_cost(term: CostTerm, layouts: Mapping[str, GroupLayout]) -> float:
    def entries(axis, size):
        if axis is None or axis[0] not in layouts:
            return size, 0
        layout, scale = layouts[axis[0]], axis[1] * axis[2]
        return layout.width * scale, layout.separate.numel() * scale

    out_total, out_kept = entries(term.out_axis, term.out_size)
    in_total, in_kept = entries(term.in_axis, term.in_size)
    return term.coeff * (out_total * in_total - 2 * out_kept * in_kept)


def relative_cost(terms: Sequence[CostTerm], layouts: Mapping[str, GroupLayout],
                  sizes: Mapping[str, int]) -> float:
    """Compute of the merged model over one model's (1 under full matching, up to 2)."""
    one = sum(term_cost(t, {g: full_layout(n) for g, n in sizes.items()}) for t in terms)
    return sum(term_cost(t, layouts) for t in terms) / one if one else 1.0


def ratio_for_budget(terms: Sequence[CostTerm], sizes: Mapping[str, int], budget: float) -> float:
    """The smallest uniform match ratio (the widest merged model) whose compute is within ``budget``
    times one model's. Candidates are every k/d of every group; compute falls as the ratio grows."""
    candidates = sorted({k / size for size in sizes.values() for k in range(size + 1)} | {0.0, 1.0})
    for ratio in candidates:
        layouts = {g: _uniform_layout(n, ratio) for g, n in sizes.items()}
        if relative_cost(terms, layouts, sizes) <= budget + 1e-9:
            return ratio
    return 1.0


def _uniform_layout(size: int, ratio: float) -> GroupLayout:
    matched = matched_count(ratio, size)
    return GroupLayout(torch.arange(matched), torch.arange(matched, size))


# --------------------------------------------------------------------- a wider module
SIZE_ATTRIBUTES = {nn.Linear: ("out_features", "in_features"), nn.Conv2d: ("out_channels", "in_channels")}


def check_widenable(spec: PermutationSpec, layouts: Mapping[str, GroupLayout], module: nn.Module) -> None:
    """Raise ConfigError unless every tensor a widened group touches belongs to a layer whose width
    ``widen`` can change: Linear, Conv2d with one group, BatchNorm, LayerNorm over the last axis."""
    for name, layout in layouts.items():
        if layout.width == layout.size:
            continue
        for axis in spec.groups[name].axes:
            if axis.segments != 1 or not _resizable(module, axis.param):
                raise ConfigError(f"partial matching widens group {name!r}, which reorders {axis.param!r} (axis "
                                  f"{axis.dim}); only Linear, Conv2d (groups=1), BatchNorm and LayerNorm layers can be "
                                  "widened: use match_ratio=1 (full matching) for this model")


def _resizable(module: nn.Module, param: str) -> bool:
    """Whether ``widen`` can resize the layer owning state key ``param``."""
    owner, _, tensor = param.rpartition(".")
    try:
        sub = module.get_submodule(owner)
    except AttributeError:
        return False
    if type(sub) is nn.Linear or (type(sub) is nn.Conv2d and sub.groups == 1):
        return tensor in ("weight", "bias")
    if isinstance(sub, (nn.BatchNorm1d, nn.BatchNorm2d)):
        return tensor in ("weight", "bias", "running_mean", "running_var")
    return isinstance(sub, nn.LayerNorm) and len(sub.normalized_shape) == 1 and tensor in ("weight", "bias")


def widen(template: nn.Module, state: Mapping[str, torch.Tensor]) -> nn.Module:
    """A copy of ``template`` whose layers are resized to ``state``'s shapes (the merged model under
    partial matching), with ``state`` loaded."""
    model = copy.deepcopy(template)
    for key, tensor in state.items():
        owner, _, name = key.rpartition(".")
        sub = model.get_submodule(owner)
        current = getattr(sub, name)
        if current is None or current.shape == tensor.shape:
            continue
        if type(sub) in SIZE_ATTRIBUTES and name == "weight":
            out_name, in_name = SIZE_ATTRIBUTES[type(sub)]
            setattr(sub, out_name, tensor.shape[0])
            setattr(sub, in_name, tensor.shape[1])
        elif isinstance(sub, (nn.BatchNorm1d, nn.BatchNorm2d)):
            sub.num_features = tensor.shape[0]
        elif isinstance(sub, nn.LayerNorm):
            sub.normalized_shape = (tensor.shape[0],)
        if name in dict(sub.named_parameters(recurse=False)):
            setattr(sub, name, nn.Parameter(tensor.detach().clone(), requires_grad=current.requires_grad))
        else:
            setattr(sub, name, tensor.detach().clone())
    model.load_state_dict(dict(state))
    return model.eval()


__all__ = ["CostTerm", "GroupLayout", "LaidAxis", "check_widenable", "choose_layout", "full_layout",
           "matched_count", "ownership", "ratio_for_budget", "relative_cost", "spread", "spread_state", "widen"]
