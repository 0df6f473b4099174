"""Weight matching: permute model B's units so that its weights are as close as possible to model A's.

Maximise Σ_axes ⟨W_A, P(W_B)⟩ over the groups' permutations by coordinate ascent (Ainsworth et al.,
"Git Re-Basin", 2023): for one group at a time, with every other group's permutation held fixed, the
best permutation is a linear assignment problem whose cost sums, over the group's axes, the inner
products of A's unit i with B's unit j (all other axes of those tensors already permuted). Groups
are visited in a seeded random order and the sweep repeats until no group improves.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from layermerge.align.apply import Perms, check_perms, identity_perms, permute_tensor
from layermerge.align.spec import PermutationSpec, units_view


def assign(cost: torch.Tensor) -> torch.Tensor:
    """The permutation ``perm`` maximising Σ_i cost[i, perm[i]] (Hungarian algorithm, scipy)."""
    from scipy.optimize import linear_sum_assignment  # on first use: importing scipy cost every merge 0.1 s

    rows, cols = linear_sum_assignment(cost.detach().double().cpu().numpy(), maximize=True)
    perm = torch.empty(cost.shape[0], dtype=torch.long)
    perm[torch.as_tensor(rows)] = torch.as_tensor(cols)
    return perm


def group_cost(spec: PermutationSpec, name: str, state_a: Mapping[str, torch.Tensor],
               state_b: Mapping[str, torch.Tensor], perms: Mapping[str, torch.Tensor], axes_of=None) -> torch.Tensor:
    """cost[i, j] = similarity of A's unit i and B's unit j over every matched axis of group ``name``."""
    group = spec.groups[name]
    cost = torch.zeros(group.size, group.size, dtype=torch.float64)
    for axis in group.axes:
        if not axis.match:
            continue
        weight_a = state_a[axis.param].detach().cpu().double()
        weight_b = permute_tensor(spec, axis.param, state_b[axis.param].detach().cpu().double(), perms, skip=name,
                                  axes_of=axes_of)
        cost += units_view(weight_a, axis, group.size) @ units_view(weight_b, axis, group.size).T
    return cost


def weight_matching(spec: PermutationSpec, state_a: Mapping[str, torch.Tensor], state_b: Mapping[str, torch.Tensor],
                    *, max_iter: int = 100, seed: int = 0, init: Mapping[str, torch.Tensor] | None = None,
                    groups: list[str] | None = None) -> Perms:
    """Permutations of B's units (apply them to B with ``apply_perms``) matching its weights to A's.

    ``groups`` restricts the search to those groups (the others keep ``init``, default identity).
    """
    spec.check(state_a)
    spec.check(state_b)
    perms = {name: perm.clone().long().cpu() for name, perm in (init or identity_perms(spec)).items()}
    check_perms(spec, perms)
    free = list(groups if groups is not None else spec.groups)
    axes_of = spec.param_axes()
    # Converted once: the sweep reads every tensor many times.
    state_a = {key: state_a[key].detach().cpu().double() for key in axes_of}
    state_b = {key: state_b[key].detach().cpu().double() for key in axes_of}
    sweeps = 0
    generator = torch.Generator().manual_seed(seed)
    for _ in range(max_iter):
        sweeps += 1
        improved = False
        for index in torch.randperm(len(free), generator=generator).tolist():
            name = free[index]
            cost = group_cost(spec, name, state_a, state_b, perms, axes_of)
            best = assign(cost)
            rows = torch.arange(cost.shape[0])
            old, new = float(cost[rows, perms[name]].sum()), float(cost[rows, best].sum())
            if new > old + 1e-12 * max(1.0, abs(old)):
                perms[name] = best
                improved = True
        if not improved:
            break
    return perms
