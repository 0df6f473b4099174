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


def replace_carried(tree: Any, carried: dict[int, torch.Tensor]) -> Any:
    """The tree with each tensor that *is* ``carried[j]`` (by identity) replaced by ``Carried(j)``."""

    def walk(node):
        if isinstance(node, torch.Tensor):
            for position, tensor in carried.items():
                if node is tensor:
                    return Carried(position)
            return node
        if isinstance(node, tuple) and hasattr(node, "_fields"):
            return type(node)(*(walk(item) for item in node))
        if isinstance(node, (tuple, list)):
            return type(node)(walk(item) for item in node)
        if isinstance(node, dict):
            return {key: walk(value) for key, value in node.items()}
        return node

    return walk(tree)


def carried_positions(tree: Any) -> set[int]:
    """The previous-block output positions a tree's ``Carried`` placeholders name."""
    found: set[int] = set()

    def walk(node):
        if isinstance(node, Carried):
            found.add(node.position)
        elif isinstance(node, (tuple, list)):
            for item in node:
                walk(item)
        elif isinstance(node, dict):
            for value in node.values():
                walk(value)

    walk(tree)
    return found


def fill_carried(tree: Any, values: dict[int, torch.Tensor]) -> Any:
    """The tree with each ``Carried(j)`` replaced by ``values[j]``."""

    def walk(node):
        if isinstance(node, Carried):
            return values[node.position]
        if isinstance(node, tuple) and hasattr(node, "_fields"):
            return type(node)(*(walk(item) for item in node))
        if isinstance(node, (tuple, list)):
            return type(node)(walk(item) for item in node)
        if isinstance(node, dict):
            return {key: walk(value) for key, value in node.items()}
        return node

    return walk(tree)


def split_tensors(tree: Any) -> tuple[Any, list[torch.Tensor]]:
    """``(skeleton, tensors)``: the tree with each tensor replaced by a Slot, and the tensors in order."""
    tensors: list[torch.Tensor] = []

    def walk(node):
        if isinstance(node, torch.Tensor):
            tensors.append(node)
            return Slot(len(tensors) - 1)
        if isinstance(node, tuple) and hasattr(node, "_fields"):        # namedtuple
            return type(node)(*(walk(item) for item in node))
        if isinstance(node, (tuple, list)):
            return type(node)(walk(item) for item in node)
        if isinstance(node, dict):
            return {key: walk(value) for key, value in node.items()}
        return node

    return walk(tree), tensors


def fill_tensors(skeleton: Any, tensors: list[torch.Tensor]) -> Any:
    """The inverse of split_tensors."""

    def walk(node):
        if isinstance(node, Slot):
            return tensors[node.index]
        if isinstance(node, tuple) and hasattr(node, "_fields"):
            return type(node)(*(walk(item) for item in node))
        if isinstance(node, (tuple, list)):
            return type(node)(walk(item) for item in node)
        if isinstance(node, dict):
            return {key: walk(value) for key, value in node.items()}
        return node

    return walk(skeleton)


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
