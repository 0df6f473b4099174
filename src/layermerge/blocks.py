"""BlockPlan: how a model splits into an embedding stage, an ordered stack of blocks, and a head.

Data-driven methods work one block at a time, so they need to know which modules are the repeated
blocks (``encoder.layer.0``, ``layers.7``, ``_blocks.3``...). The plan is found by introspection,
not by a table of architectures: the blocks are the children of the outermost ``nn.ModuleList``
whose children all share one class and hold parameters (the residual stack of every transformer and
of EfficientNet). Modules registered before that list, on the path from the root, form the
embedding stage; those registered after it form the head. Anything else is described with an
override of module paths, validated against the model.

Encoder-decoder models have two such stacks, each with its own stream: the plan lists the encoder's
blocks, then the decoder's, and ``stack_starts`` says where each stack begins. The engine never
feeds one stack's output into the other's first block; it captures the decoder's inputs afresh,
with each stream's own encoder output (see ``layermerge.engine.capture``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from torch import nn

from layermerge.errors import ConfigError, LayermergeError

OVERRIDE_KEYS = ("embedding", "blocks", "head", "stacks")
GRANULARITIES = ("layer", "stage")
# A second block stack holding at least this share of the winner's parameters makes the choice ambiguous
# (encoder-decoder models, dual-tower models): the user must say which stack to stream.
AMBIGUITY_SHARE = 0.25

OVERRIDE_EXAMPLE = """\
  block_plan:                    # in the merge config (YAML)
    embedding: [embeddings]      # module paths run before the first block
    blocks: encoder.layer        # an nn.ModuleList / nn.Sequential, or an explicit list of module paths
    head: [final_norm]           # module paths run after the last block
  block_plan:                    # an encoder-decoder model: one stream per stack, in execution order
    stacks: [encoder.block, decoder.block]
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
    stack_starts: tuple[int, ...] = (0,)   # the first block of each stack (one stream per stack)

    def __len__(self) -> int:
        return len(self.blocks)

    @property
    def stacks(self) -> int:
        return len(self.stack_starts)

    def stack_of(self, index: int) -> int:
        """Which stack block ``index`` belongs to (0 for single-stack models)."""
        return sum(1 for start in self.stack_starts if start <= index) - 1

    def stack_blocks(self, stack: int) -> range:
        """The block indices of ``stack``."""
        end = self.stack_starts[stack + 1] if stack + 1 < len(self.stack_starts) else len(self.blocks)
        return range(self.stack_starts[stack], end)

    def starts_stack(self, index: int) -> bool:
        """Whether block ``index`` is the first of a stack after the first (its inputs are captured afresh)."""
        return index > 0 and index in self.stack_starts

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
                "source": self.source, "block_class": self.block_class, "stack_starts": list(self.stack_starts)}

    # ----------------------------------------------------------------- construction
    @classmethod
    def from_model(cls, model: nn.Module, override: Mapping | None = None, granularity: str = "layer") -> BlockPlan:
        """The plan of ``model``: from ``override`` when given, else by introspection.

        ``granularity`` matters for hierarchical models (Swin, ConvNeXt, ResNet), whose outer stack is a
        list of stages, each holding a list of layers: ``"layer"`` (the default) makes every layer a
        block and every stage a stack, so memory is one layer; ``"stage"`` keeps whole stages as blocks.
        """
        if granularity not in GRANULARITIES:
            raise ConfigError(f"block granularity {granularity!r} is not one of {list(GRANULARITIES)}")
        if override:
            return cls.from_override(model, override)
        return _introspect(model, granularity)

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
        if bool(override.get("blocks")) == bool(override.get("stacks")):
            raise ConfigError(f"block_plan needs either 'blocks' (a module-list path or a list of module paths) "
                              f"or 'stacks' (one such entry per stack of an encoder-decoder model).\n"
                              f"Example:\n{OVERRIDE_EXAMPLE}")
        if override.get("stacks"):
            stacks = override["stacks"]
            if isinstance(stacks, str) or not isinstance(stacks, (list, tuple)):
                raise ConfigError(f"block_plan 'stacks' must be a list with one entry per stack (a module-list "
                                  f"path or a list of module paths), got {stacks!r}.\nExample:\n{OVERRIDE_EXAMPLE}")
            groups = [_block_paths(model, spec, "stacks") for spec in stacks]
        else:
            groups = [_block_paths(model, override["blocks"], "blocks")]
        blocks = tuple(path for group in groups for path in group)
        starts = tuple(sum(len(group) for group in groups[:k]) for k in range(len(groups)))
        embedding = tuple(_checked_paths(model, override.get("embedding") or [], "embedding"))
        head = tuple(_checked_paths(model, override.get("head") or [], "head"))
        _check_disjoint(blocks)
        classes = {type(model.get_submodule(path)).__name__ for path in blocks}
        return cls(embedding, blocks, head, "override", "/".join(sorted(classes)), starts)


def find_block_plan(model: nn.Module, override: Mapping | None = None, granularity: str = "layer") -> BlockPlan:
    """The block plan of ``model`` (see BlockPlan.from_model)."""
    return BlockPlan.from_model(model, override, granularity)


# --------------------------------------------------------------------- helpers
def _block_paths(model: nn.Module, spec, field: str) -> list[str]:
    """The block module paths of one stack: a container's children, or the paths listed."""
    if isinstance(spec, str):
        container = _submodule(model, spec, field)
        if not isinstance(container, (nn.ModuleList, nn.Sequential)) or len(container) == 0:
            raise ConfigError(
                f"block_plan '{field}': {spec!r} is a {type(container).__name__}, not a non-empty "
                "nn.ModuleList or nn.Sequential; give its path or list the block module paths "
                "explicitly, e.g. "
                f"blocks: [{spec}.0, {spec}.1]")
        return [f"{spec}.{name}" for name, _ in container.named_children()]
    if not spec:
        raise ConfigError(f"block_plan '{field}': an empty list of blocks")
    return _checked_paths(model, spec, field)


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


def _stage_layers(stage: nn.Module) -> str | None:
    """The path (within ``stage``) of the one list of same-class layers holding most of a stage's weights."""
    inner = []
    for path, module in stage.named_modules():
        if path and isinstance(module, (nn.ModuleList, nn.Sequential)) and len(module) > 0:
            classes = {type(child) for child in module}
            if len(classes) == 1 and all(_holds_state(child) for child in module):
                inner.append((path, module))
    outermost = [(p, m) for p, m in inner if not any(o != p and p.startswith(o + ".") for o, _ in inner)]
    if len(outermost) != 1:
        return None
    path, layers = outermost[0]
    return path if _parameter_count(layers) * 2 > _parameter_count(stage) else None


def _layer_plan(model: nn.Module, path: str, stack: nn.ModuleList) -> BlockPlan | None:
    """Every stage's layers as blocks, every stage a stack (its own stream capture: whatever runs between
    two stages, a patch merging or downsampling, runs for real when the next stage's inputs are captured)."""
    blocks, starts = [], []
    for name, stage in stack.named_children():
        inner = _stage_layers(stage)
        if inner is None:
            return None
        prefix = f"{path}.{name}" if path else name
        starts.append(len(blocks))
        blocks.extend(f"{prefix}.{inner}.{layer}" for layer, _ in stage.get_submodule(inner).named_children())
    if len(blocks) <= len(starts):
        return None
    embedding, head = _around(model, path)
    classes = sorted({type(model.get_submodule(block)).__name__ for block in blocks})
    return BlockPlan(tuple(embedding), tuple(blocks), tuple(head), "introspection", "/".join(classes), tuple(starts))


def _introspect(model: nn.Module, granularity: str = "layer") -> BlockPlan:
    candidates = _candidates(model)
    if not candidates:
        raise BlockPlanError(
            f"no block plan found for {type(model).__name__}: it has no nn.ModuleList of same-class blocks "
            "with parameters. Describe its structure with a block_plan override of module paths:\n"
            f"{OVERRIDE_EXAMPLE}")
    ranked = sorted(candidates, key=lambda item: _parameter_count(item[1]), reverse=True)
    path, stack = ranked[0]
    two_stacks = _encoder_decoder_stacks(model, candidates)
    if two_stacks is not None:
        return _stacked_plan(model, two_stacks)
    if len(ranked) > 1 and _parameter_count(ranked[1][1]) >= AMBIGUITY_SHARE * _parameter_count(stack):
        names = ", ".join(repr(p) for p, _ in ranked[:3])
        raise BlockPlanError(
            f"ambiguous block plan for {type(model).__name__}: several block stacks ({names}) could be the "
            "stream of blocks (an encoder-decoder or dual-tower model). Choose one with a block_plan "
            "override:\n"
            f"{OVERRIDE_EXAMPLE}")
    if granularity == "layer":
        layered = _layer_plan(model, path, stack)
        if layered is not None:
            return layered
    blocks = tuple(f"{path}.{name}" if path else name for name, _ in stack.named_children())
    embedding, head = _around(model, path)
    return BlockPlan(tuple(embedding), blocks, tuple(head), "introspection", type(stack[0]).__name__)


def _module_path(model: nn.Module, target: nn.Module) -> str | None:
    for path, module in model.named_modules():
        if module is target:
            return path
    return None


def _encoder_decoder_stacks(model: nn.Module, candidates) -> list[tuple[str, nn.ModuleList]] | None:
    """The encoder's and the decoder's block stacks of a Hugging Face encoder-decoder model, in that order.

    The model says which is which (``config.is_encoder_decoder``, ``get_encoder()``, ``get_decoder()``);
    each must hold exactly one candidate stack, else the plan stays ambiguous.
    """
    config = getattr(model, "config", None)
    if not getattr(config, "is_encoder_decoder", False):
        return None
    try:
        encoder, decoder = model.get_encoder(), model.get_decoder()
    except (AttributeError, NotImplementedError, TypeError):
        return None
    if encoder is None or decoder is None or encoder is decoder:
        return None
    ordered = []
    for part in (encoder, decoder):
        root = _module_path(model, part)
        if root is None:
            return None
        inside = [(path, stack) for path, stack in candidates
                  if not root or path == root or path.startswith(root + ".")]
        if len(inside) != 1:
            return None
        ordered.append(inside[0])
    return ordered


def _stacked_plan(model: nn.Module, stacks: list[tuple[str, nn.ModuleList]]) -> BlockPlan:
    """One plan over several stacks, each stack's blocks in order, each stack's stream captured afresh."""
    blocks, embedding, head, starts, classes = [], [], [], [], []
    for path, stack in stacks:
        starts.append(len(blocks))
        blocks.extend(f"{path}.{name}" if path else name for name, _ in stack.named_children())
        before, after = _around(model, path)
        embedding.extend(p for p in before if p not in embedding and not any(p == s for s, _ in stacks))
        head.extend(p for p in after if p not in head)
        classes.append(type(stack[0]).__name__)
    # A module around one stack can be another stack's container (the decoder follows the encoder):
    # only modules outside every block are embedding or head.
    inside = tuple(path + "." for path, _ in stacks)
    containers = {path.rsplit(".", 1)[0] if "." in path else "" for path, _ in stacks}

    def outside(p: str) -> bool:
        return not (p + ".").startswith(inside) and p not in containers and not any(
            c.startswith(p + ".") for c in containers if c)

    embedding = [p for p in embedding if outside(p)]
    head = [p for p in head if outside(p) and p not in embedding]
    return BlockPlan(tuple(embedding), tuple(blocks), tuple(head), "introspection", "/".join(classes),
                     tuple(starts))


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
