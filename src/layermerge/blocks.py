"""BlockPlan: how a model splits into an embedding stage, an ordered stack of blocks, and a head.

Data-driven methods work one block at a time, so they need to know which modules are the repeated
blocks (``encoder.layer.0``, ``layers.7``, ``_blocks.3``...). The plan is found by introspection,
not by a table of architectures: the blocks are the children of the outermost ``nn.ModuleList``
whose children all share one class and hold parameters (the residual stack of every transformer and
of EfficientNet). Modules registered before that list, on the path from the root, form the
embedding stage; those registered after it form the head. Anything else is described with an
override of module paths, validated against the model.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from torch import nn

from layermerge.errors import ConfigError, LayermergeError

OVERRIDE_KEYS = ("embedding", "blocks", "head")
# A second block stack holding at least this share of the winner's parameters makes the choice ambiguous
# (encoder-decoder models, dual-tower models): the user must say which stack to stream.
AMBIGUITY_SHARE = 0.25

OVERRIDE_EXAMPLE = """\
  block_plan:                    # in the merge config (YAML)
    embedding: [embeddings]      # module paths run before the first block
    blocks: encoder.layer        # an nn.ModuleList / nn.Sequential, or an explicit list of module paths
    head: [final_norm]           # module paths run after the last block
or in Python: BlockPlan.from_override(model, {"embedding": ["embeddings"], "blocks": "encoder.layer",
"head": ["final_norm"]})"""


class BlockPlanError(LayermergeError):
    """No block plan can be found for a model, or an override names modules that do not exist."""


@dataclass(frozen=True)
class BlockPlan:
    """Module paths of the embedding stage, the blocks (in execution order) and the head."""

    embedding: tuple[str, ...]
    blocks: tuple[str, ...]
    head: tuple[str, ...]
    source: str = "introspection"     # "introspection" or "override"
    block_class: str = ""

    def __len__(self) -> int:
        return len(self.blocks)

    def prefix(self, index: int) -> str:
        """The parameter-name prefix of block ``index`` in the model's state dict (``'encoder.layer.3.'``)."""
        return self.blocks[index] + "." if self.blocks[index] else ""

    def block_keys(self, keys: Iterable[str], index: int) -> list[str]:
        """The state-dict keys that belong to block ``index``, in the order given."""
        prefix = self.prefix(index)
        return [key for key in keys if key.startswith(prefix)]

    def block_of_key(self, key: str) -> int | None:
        """The index of the block a state-dict key belongs to, or None for embedding/head/other keys."""
        for index in range(len(self.blocks)):
            if key.startswith(self.prefix(index)):
                return index
        return None

    def non_block_keys(self, keys: Iterable[str]) -> list[str]:
        """Keys outside every block (embeddings, final norms, poolers): merged by Task Arithmetic."""
        return [key for key in keys if self.block_of_key(key) is None]

    def to_dict(self) -> dict:
        return {"embedding": list(self.embedding), "blocks": list(self.blocks), "head": list(self.head),
                "source": self.source, "block_class": self.block_class}

    # ----------------------------------------------------------------- construction
    @classmethod
    def from_model(cls, model: nn.Module, override: Mapping | None = None) -> BlockPlan:
        """The plan of ``model``: from ``override`` when given, else by introspection."""
        if override:
            return cls.from_override(model, override)
        return _introspect(model)

    @classmethod
    def from_override(cls, model: nn.Module, override: Mapping) -> BlockPlan:
        """A plan from module paths, each checked to exist in ``model``."""
        if not isinstance(override, Mapping):
            raise ConfigError(f"block_plan must be a mapping with keys {OVERRIDE_KEYS}, got {override!r}.\n"
                              f"Example:\n{OVERRIDE_EXAMPLE}")
        unknown = sorted(set(override) - set(OVERRIDE_KEYS))
        if unknown:
            raise ConfigError(f"block_plan has unknown key(s) {unknown}; allowed keys are "
                              f"{list(OVERRIDE_KEYS)}.\nExample:\n{OVERRIDE_EXAMPLE}")
        if not override.get("blocks"):
            raise ConfigError(f"block_plan needs 'blocks': a module-list path or a list of module paths.\n"
                              f"Example:\n{OVERRIDE_EXAMPLE}")
        spec = override["blocks"]
        if isinstance(spec, str):
            container = _submodule(model, spec, "blocks")
            if not isinstance(container, (nn.ModuleList, nn.Sequential)) or len(container) == 0:
                raise ConfigError(
                    f"block_plan 'blocks': {spec!r} is a {type(container).__name__}, not a non-empty "
                    "nn.ModuleList or nn.Sequential; give its path or list the block module paths "
                    "explicitly, e.g. "
                    f"blocks: [{spec}.0, {spec}.1]")
            blocks = tuple(f"{spec}.{name}" for name, _ in container.named_children())
        else:
            blocks = tuple(_checked_paths(model, spec, "blocks"))
        embedding = tuple(_checked_paths(model, override.get("embedding") or [], "embedding"))
        head = tuple(_checked_paths(model, override.get("head") or [], "head"))
        _check_disjoint(blocks)
        classes = {type(model.get_submodule(path)).__name__ for path in blocks}
        return cls(embedding, blocks, head, "override", "/".join(sorted(classes)))


def find_block_plan(model: nn.Module, override: Mapping | None = None) -> BlockPlan:
    """The block plan of ``model`` (see BlockPlan.from_model)."""
    return BlockPlan.from_model(model, override)


# --------------------------------------------------------------------- helpers
def _submodule(model: nn.Module, path: str, field: str) -> nn.Module:
    if not isinstance(path, str):
        raise ConfigError(f"block_plan '{field}': module paths must be strings, got {path!r}")
    try:
        return model.get_submodule(path)
    except AttributeError:
        top = ", ".join(name for name, _ in model.named_children())
        raise ConfigError(
            f"block_plan '{field}': {type(model).__name__} has no module {path!r}. Top-level modules: {top}. "
            "Print the model (print(model)) to see every module path.") from None


def _checked_paths(model: nn.Module, paths, field: str) -> list[str]:
    if isinstance(paths, str):
        paths = [paths]
    for path in paths:
        _submodule(model, path, field)
    return list(paths)


def _check_disjoint(blocks: tuple[str, ...]) -> None:
    for i, outer in enumerate(blocks):
        for inner in blocks[i + 1:]:
            if outer == inner or inner.startswith(outer + ".") or outer.startswith(inner + "."):
                raise ConfigError(f"block_plan 'blocks': {outer!r} and {inner!r} overlap; each block must "
                                  "be a separate module, listed once, in execution order")


def _holds_state(module: nn.Module) -> bool:
    """Parameters or persistent buffers: a module that takes part in merging."""
    return any(True for _ in module.parameters()) or bool(module.state_dict())


def _parameter_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _candidates(model: nn.Module) -> list[tuple[str, nn.ModuleList]]:
    """Outermost module lists whose children share one class and hold parameters."""
    found = []
    for path, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        classes = {type(child) for child in module}
        if len(classes) == 1 and all(_holds_state(child) for child in module):
            found.append((path, module))
    outermost = []
    for path, module in found:
        nested = any(other != path and path.startswith(other + ".") for other, _ in found)
        if not nested:
            outermost.append((path, module))
    return outermost


def _introspect(model: nn.Module) -> BlockPlan:
    candidates = _candidates(model)
    if not candidates:
        raise BlockPlanError(
            f"no block plan found for {type(model).__name__}: it has no nn.ModuleList of same-class blocks "
            "with parameters. Describe its structure with a block_plan override of module paths:\n"
            f"{OVERRIDE_EXAMPLE}")
    ranked = sorted(candidates, key=lambda item: _parameter_count(item[1]), reverse=True)
    path, stack = ranked[0]
    if len(ranked) > 1 and _parameter_count(ranked[1][1]) >= AMBIGUITY_SHARE * _parameter_count(stack):
        names = ", ".join(repr(p) for p, _ in ranked[:3])
        raise BlockPlanError(
            f"ambiguous block plan for {type(model).__name__}: several block stacks ({names}) could be the "
            "stream of blocks (an encoder-decoder or dual-tower model). Choose one with a block_plan "
            "override:\n"
            f"{OVERRIDE_EXAMPLE}")
    blocks = tuple(f"{path}.{name}" if path else name for name, _ in stack.named_children())
    embedding, head = _around(model, path)
    return BlockPlan(tuple(embedding), blocks, tuple(head), "introspection", type(stack[0]).__name__)


def _around(model: nn.Module, stack_path: str) -> tuple[list[str], list[str]]:
    """Modules with state registered before / after the block stack on every level of its path.

    Registration order follows execution order in the families we know (embeddings, then layers,
    then the final norm or pooler); stateless modules (dropout, rotary tables) are left out.
    """
    embedding, head = [], []
    parts = stack_path.split(".") if stack_path else []
    module, prefix = model, ""
    for part in parts:
        before = True
        for name, child in module.named_children():
            if name == part:
                before = False
                continue
            if child is None or not _holds_state(child):
                continue
            (embedding if before else head).append(prefix + name)
        module = getattr(module, part)
        prefix = f"{prefix}{part}."
    # Outer levels run around inner ones: embedding outermost-first is already execution order,
    # but the head's inner modules (encoder-level norms) run before the outer ones (pooler).
    head_by_depth = sorted(head, key=lambda p: -p.count("."))
    return embedding, head_by_depth
