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
