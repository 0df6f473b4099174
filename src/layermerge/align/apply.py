"""Apply, invert and draw permutations of a PermutationSpec.

A permutation of group g is a LongTensor ``perm`` of its ``size`` units: applying it puts unit
``perm[i]`` of the model at position ``i``. Applying every group's permutation together leaves the
function the model computes unchanged (that is what makes them a permutation *symmetry*).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping

import torch
from torch import nn

from layermerge.align.spec import PermutationSpec, expand_index
from layermerge.errors import ConfigError

Perms = dict[str, torch.Tensor]


def identity_perms(spec: PermutationSpec) -> Perms:
    return {name: torch.arange(group.size) for name, group in spec.groups.items()}


def random_perms(spec: PermutationSpec, generator: torch.Generator | None = None) -> Perms:
    """A uniformly random permutation per group (seeded through ``generator``)."""
    return {name: torch.randperm(group.size, generator=generator) for name, group in spec.groups.items()}


def invert_perms(perms: Perms) -> Perms:
    return {name: torch.argsort(perm) for name, perm in perms.items()}


def check_perms(spec: PermutationSpec, perms: Mapping[str, torch.Tensor]) -> None:
    unknown = sorted(set(perms) - set(spec.groups))
    if unknown:
        raise ConfigError(f"permutations given for unknown groups {unknown[:5]}; the spec has {list(spec.groups)[:5]}")
    for name, perm in perms.items():
        size = spec.groups[name].size
        if perm.numel() != size or not torch.equal(torch.sort(perm.cpu().long()).values, torch.arange(size)):
            raise ConfigError(f"the permutation of group {name!r} is not a permutation of {size} units")


def permute_tensor(spec: PermutationSpec, key: str, tensor: torch.Tensor, perms: Mapping[str, torch.Tensor],
                   skip: str | None = None, axes_of=None) -> torch.Tensor:
    """``tensor`` (state key ``key``) with every group's permutation applied, except group ``skip``."""
    for group_name, axis in (axes_of or spec.param_axes()).get(key, ()):
        if group_name == skip or group_name not in perms:
            continue
        index = expand_index(perms[group_name].to(tensor.device), axis.unit, axis.segments)
        tensor = tensor.index_select(axis.dim, index)
    return tensor


def apply_perms(spec: PermutationSpec, state: Mapping[str, torch.Tensor],
                perms: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A new state dict with ``perms`` applied; tensors no group touches are the same objects."""
    check_perms(spec, perms)
    spec.check(state)
    axes_of = spec.param_axes()
    return {key: permute_tensor(spec, key, tensor, perms, axes_of=axes_of) if key in axes_of else tensor
            for key, tensor in state.items()}


def permute_model(model: nn.Module, spec: PermutationSpec, perms: Mapping[str, torch.Tensor]) -> nn.Module:
    """A deep copy of ``model`` with its neurons permuted by ``perms`` (same function, reordered units)."""
    permuted = copy.deepcopy(model)
    state = apply_perms(spec, model.state_dict(), perms)
    permuted.load_state_dict(state)
    return permuted
