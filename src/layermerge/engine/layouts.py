"""Module tensors that transformers fuses from several checkpoint tensors, mapped element by element.

transformers 5 loads some checkpoints into other shapes than they are stored in: Mixtral's and
Qwen-MoE's per-expert matrices (``experts.3.w1.weight``...) become one 3-D tensor per layer
(``mlp.experts.gate_up_proj``: every expert's w1 and w3, stacked and concatenated). The block engine
runs the module, so it needs the module's tensors; the output keeps the checkpoint's own layout.

Which element of a module tensor each checkpoint tensor holds is learned from transformers' own
reverse conversion (the one ``save_pretrained`` applies): a tensor of element indices is reverted
and read back. Reading assembles a module tensor from its checkpoint tensors by those indices and
writing splits it again, so both directions follow the library's rules exactly, whatever the
operations (stacking, concatenation, transposition, interleaving). A conversion that does not move
elements one to one, or builds one checkpoint tensor from several module tensors, is refused with
the tensors named. The indices of one layer serve every layer with the same structure.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import nn

from layermerge.errors import IncompatibleExpertsError

NUMBERED_PREFIX = re.compile(r"^(.*?\d+)\.")
DIGITS = re.compile(r"\d+")


@dataclass(frozen=True)
class Piece:
    """One checkpoint tensor (``key``, ``shape``) holding the elements ``index`` (flat positions) of a
    module tensor."""

    key: str
    shape: tuple[int, ...]
    index: torch.Tensor

    def take(self, module_tensor: torch.Tensor) -> torch.Tensor:
        """This checkpoint tensor's values, taken from the (whole) module tensor."""
        return module_tensor.reshape(-1)[self.index].reshape(self.shape)


@dataclass(frozen=True)
class FusedLayout:
    """How a module tensor of ``shape`` is stored: split over ``pieces`` (every element exactly once)."""

    shape: tuple[int, ...]
    pieces: tuple[Piece, ...]

    @property
    def keys(self) -> list[str]:
        return [piece.key for piece in self.pieces]

    def assemble(self, read: Callable[[str], torch.Tensor]) -> torch.Tensor:
        """The module tensor from its checkpoint tensors (``read(key)``), one piece at a time."""
        out = None
        for piece in self.pieces:
            part = read(piece.key)
            if out is None:
                out = part.new_empty(int(torch.Size(self.shape).numel()))
            out[piece.index] = part.reshape(-1).to(out.dtype)
        return out.reshape(self.shape)

    def split(self, module_tensor: torch.Tensor) -> dict[str, torch.Tensor]:
        """{checkpoint key: tensor} of a module tensor, in the checkpoint's layout."""
        return {piece.key: piece.take(module_tensor).contiguous() for piece in self.pieces}


def fused_layouts(model: nn.Module, candidates: Iterable[str], checkpoint_shape: Callable[[str], tuple | None],
                  checkpoint_prefix: str = "",
                  revert: Callable[[nn.Module, dict], dict] | None = None) -> dict[str, FusedLayout]:
    """{module key: FusedLayout} for the ``candidates`` (module keys without a checkpoint tensor of their
    own name) that transformers builds from several checkpoint tensors.

    ``checkpoint_shape(key)`` is a checkpoint tensor's shape, or None when the checkpoints lack it;
    checkpoint keys are the reverted names behind ``checkpoint_prefix`` (a task model's ``model.``);
    ``revert`` is transformers' ``revert_weight_conversion`` (looked up when not given). Candidates the
    reverse conversion does not map onto existing checkpoint tensors (tied copies, buffers) are left out.
    """
    if revert is None:
        from transformers.core_model_loading import revert_weight_conversion as revert
    state = model.state_dict()
    groups: dict[str, list[str]] = {}
    for key in candidates:
        if key in state and state[key].is_floating_point():
            match = NUMBERED_PREFIX.match(key)
            groups.setdefault(match.group(1) if match else "", []).append(key)
    layouts: dict[str, FusedLayout] = {}
    learned: dict[tuple, tuple[str, dict[str, FusedLayout | None]]] = {}
    for prefix, keys in groups.items():
        shapes = {key: tuple(state[key].shape) for key in keys}
        signature = (DIGITS.sub("#", prefix), tuple((key[len(prefix):], shapes[key]) for key in keys))
        if signature in learned:
            template_prefix, known = learned[signature]
            group = {prefix + name[len(template_prefix):]: renamed(layout, template_prefix, prefix)
                     for name, layout in known.items()}
        else:
            group = _learn(model, prefix, shapes, revert)
            learned[signature] = (prefix, group)
        for key, layout in group.items():
            layout = prefixed(layout, checkpoint_prefix)
            _check_against_checkpoint(key, layout, checkpoint_shape)
            if layout is not None and all(checkpoint_shape(piece.key) is not None for piece in layout.pieces):
                layouts[key] = layout
    return layouts


def prefixed(layout: FusedLayout | None, prefix: str) -> FusedLayout | None:
    if layout is None or not prefix:
        return layout
    return FusedLayout(layout.shape, tuple(Piece(prefix + p.key, p.shape, p.index) for p in layout.pieces))


def renamed(layout: FusedLayout | None, old_prefix: str, new_prefix: str) -> FusedLayout | None:
    """The same layout for another layer: checkpoint keys under ``new_prefix`` instead of ``old_prefix``."""
    if layout is None:
        return None
    old_number, new_number = DIGITS.findall(old_prefix)[-1], DIGITS.findall(new_prefix)[-1]
    pieces = [Piece(_swap_layer(piece.key, old_prefix, new_prefix, old_number, new_number), piece.shape, piece.index)
              for piece in layout.pieces]
    return FusedLayout(layout.shape, tuple(pieces))


def _swap_layer(key: str, old_prefix: str, new_prefix: str, old_number: str, new_number: str) -> str:
    """A checkpoint key of layer ``old_prefix`` renamed to layer ``new_prefix`` (the checkpoint may name
    the path differently, e.g. ``model.layers.3``: the layer number right after the shared stem moves)."""
    if key.startswith(old_prefix + "."):
        return new_prefix + key[len(old_prefix):]
    stem = old_prefix[: -len(old_number)]                     # 'layers.' of 'layers.0'
    position = key.find(stem + old_number + ".")
    if position < 0:
        raise IncompatibleExpertsError(f"cannot follow the checkpoint key {key!r} from {old_prefix!r} to "
                                       f"{new_prefix!r}")
    start = position + len(stem)
    return key[:start] + new_number + key[start + len(old_number):]


def _learn(model: nn.Module, prefix: str, shapes: dict[str, tuple], revert) -> dict[str, FusedLayout | None]:
    """Revert one layer's candidate tensors holding their own element indices; read the pieces back."""
    offsets, placeholders, total = {}, {}, 0
    for key, shape in shapes.items():
        count = int(torch.Size(shape).numel())
        offsets[key] = total
        placeholders[key] = torch.arange(total, total + count, dtype=torch.int64).reshape(shape)
        total += count
    reverted = revert(model, dict(placeholders))
    owner_of = sorted((offset, key) for key, offset in offsets.items())
    pieces: dict[str, list[Piece]] = {key: [] for key in shapes}
    for name, values in reverted.items():
        if name in shapes and values is placeholders[name]:
            continue                                      # not converted: the module key is the checkpoint key
        if not isinstance(values, torch.Tensor) or values.dtype != torch.int64 or values.numel() == 0:
            raise IncompatibleExpertsError(
                f"transformers' conversion of {name!r} does not move weights one to one (it computes them), "
                "so layermerge cannot map it between the model and the checkpoint; merge this family with a "
                "data-free method, which works on the checkpoint's tensors as stored")
        flat = values.reshape(-1)
        low, high = int(flat.min()), int(flat.max())
        owner = _owner(owner_of, low)
        if owner is None or high >= offsets[owner] + int(torch.Size(shapes[owner]).numel()):
            raise IncompatibleExpertsError(
                f"transformers stores the checkpoint tensor {name!r} from several module tensors; layermerge "
                "maps each module tensor on its own checkpoint tensors only, so this family's data-driven merge "
                "is not supported (data-free methods work on the checkpoint's tensors as stored)")
        pieces[owner].append(Piece(name, tuple(values.shape), flat - offsets[owner]))
    layouts: dict[str, FusedLayout | None] = {}
    for key, parts in pieces.items():
        if not parts:
            layouts[key] = None
            continue
        count = int(torch.Size(shapes[key]).numel())
        covered = torch.cat([piece.index for piece in parts]).sort().values
        if covered.numel() != count or not torch.equal(covered, torch.arange(count)):
            raise IncompatibleExpertsError(
                f"transformers' conversion of {prefix + '.' if prefix else ''}{key[len(prefix):].lstrip('.')} "
                f"does not hold every element exactly once in {[p.key for p in parts][:4]}; layermerge cannot "
                "map it between the model and the checkpoint (data-free methods work on the checkpoint as stored)")
        if len(parts) == 1 and parts[0].shape == shapes[key] and torch.equal(parts[0].index, torch.arange(count)):
            layouts[key] = None                           # renamed only: the key map covers it
            continue
        layouts[key] = FusedLayout(shapes[key], tuple(parts))
    return layouts


def _owner(owner_of: list[tuple[int, str]], index: int) -> str | None:
    found = None
    for offset, key in owner_of:
        if offset <= index:
            found = key
    return found


def _check_against_checkpoint(key: str, layout: FusedLayout | None,
                              checkpoint_shape: Callable[[str], tuple | None]) -> None:
    """Every piece the checkpoints hold must have the shape the conversion expects."""
    if layout is None:
        return
    for piece in layout.pieces:
        found = checkpoint_shape(piece.key)
        if found is not None and tuple(found) != piece.shape:
            raise IncompatibleExpertsError(
                f"the checkpoint tensor {piece.key!r} has shape {tuple(found)}, but transformers' conversion of "
                f"the module tensor {key!r} expects {piece.shape}; the checkpoints and the config disagree")
