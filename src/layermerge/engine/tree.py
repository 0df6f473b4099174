"""Nested arguments (tuples, lists, dicts of tensors and plain values) split into tensors + a skeleton.

Blocks take extra arguments such as ``position_embeddings=(cos, sin)``; to cache them tensor by
tensor (and move them between devices) we separate the tensors from the structure around them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class Slot:
    """Placeholder for the ``index``-th tensor of a split tree."""

    index: int


@dataclass(frozen=True)
class Carried:
    """Placeholder for an extra block argument that is the previous block's output number ``position``
    (T5's position bias: the first block computes it from its own weights, every later block receives
    it), filled per stream from that stream's own previous block."""

    position: int


def map_leaves(tree: Any, fn) -> Any:
    """The tree (tuples, namedtuples, lists, dicts) with ``fn`` applied to every leaf."""
    if isinstance(tree, tuple) and hasattr(tree, "_fields"):        # namedtuple
        return type(tree)(*(map_leaves(item, fn) for item in tree))
    if isinstance(tree, (tuple, list)):
        return type(tree)(map_leaves(item, fn) for item in tree)
    if isinstance(tree, dict):
        return {key: map_leaves(value, fn) for key, value in tree.items()}
    return fn(tree)


def replace_carried(tree: Any, carried: dict[int, torch.Tensor]) -> Any:
    """The tree with each tensor that *is* ``carried[j]`` (by identity) replaced by ``Carried(j)``."""
    by_identity = {id(tensor): position for position, tensor in carried.items()}

    def replace(leaf):
        if isinstance(leaf, torch.Tensor) and id(leaf) in by_identity:
            return Carried(by_identity[id(leaf)])
        return leaf

    return map_leaves(tree, replace)


def leaves(tree: Any):
    """Every leaf of the tree, in order."""
    if isinstance(tree, (tuple, list)):
        for item in tree:
            yield from leaves(item)
    elif isinstance(tree, dict):
        for value in tree.values():
            yield from leaves(value)
    else:
        yield tree


def carried_positions(tree: Any) -> set[int]:
    """The previous-block output positions a tree's ``Carried`` placeholders name."""
    return {leaf.position for leaf in leaves(tree) if isinstance(leaf, Carried)}


def fill_carried(tree: Any, values: dict[int, torch.Tensor]) -> Any:
    """The tree with each ``Carried(j)`` replaced by ``values[j]``."""
    return map_leaves(tree, lambda leaf: values[leaf.position] if isinstance(leaf, Carried) else leaf)


def split_tensors(tree: Any) -> tuple[Any, list[torch.Tensor]]:
    """``(skeleton, tensors)``: the tree with each tensor replaced by a Slot, and the tensors in order."""
    tensors: list[torch.Tensor] = []

    def take(leaf):
        if isinstance(leaf, torch.Tensor):
            tensors.append(leaf)
            return Slot(len(tensors) - 1)
        return leaf

    return map_leaves(tree, take), tensors


def fill_tensors(skeleton: Any, tensors: list[torch.Tensor]) -> Any:
    """The inverse of split_tensors."""
    return map_leaves(skeleton, lambda leaf: tensors[leaf.index] if isinstance(leaf, Slot) else leaf)


def map_tensors(tree: Any, fn) -> Any:
    """The tree with ``fn`` applied to every tensor (e.g. moving to a device)."""
    skeleton, tensors = split_tensors(tree)
    return fill_tensors(skeleton, [fn(t) for t in tensors])


def trees_equal(a: Any, b: Any) -> bool:
    """Same structure, equal plain values, and tensors equal in shape, dtype and value."""
    skel_a, tens_a = split_tensors(a)
    skel_b, tens_b = split_tensors(b)
    if skel_a != skel_b or len(tens_a) != len(tens_b):
        return False
    return all(x is y or (x.shape == y.shape and x.dtype == y.dtype and torch.equal(x, y))
               for x, y in zip(tens_a, tens_b))
