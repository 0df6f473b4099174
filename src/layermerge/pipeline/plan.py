"""Stage 1, the plan: one merge request (a YAML config or an API call) resolved once into a frozen object.

Every check that needs no weights happens here: the method exists, its parameters are valid, the
engine options and the output options make sense. Later stages read the plan and never re-validate.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from layermerge.errors import ConfigError, LayermergeError
from layermerge.io.paths import relative_to_config
from layermerge.io.writer import parse_size
from layermerge.methods.registry import MethodInfo, get_method, validate_params
from layermerge.model_card import CARD_PATHS

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def resolve_dtype(name: str | torch.dtype | None) -> torch.dtype | None:
    if name is None or isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise ConfigError(f"unknown dtype {name!r}; use one of {sorted(DTYPES)}")
    return DTYPES[name]


def check_card_paths(card_paths: str) -> str:
    if card_paths not in CARD_PATHS:
        raise ConfigError(f"card_paths must be one of {', '.join(CARD_PATHS)} (the model card shows each input's "
                          f"folder name, or its full path), got {card_paths!r}")
    return card_paths


def cache_budget_bytes(value: str | int) -> int:
    """Bytes from ``2GB``, ``500MB``, ``0`` (spill everything) or an integer."""
    if isinstance(value, int) or str(value).strip() == "0":
        if int(value) < 0:
            raise ValueError(f"cache budget must be >= 0 bytes, got {value}")
        return int(value)
    try:
        return parse_size(value)
    except LayermergeError as exc:
        raise ValueError(str(exc)) from None


class EngineConfig(BaseModel):
    """The ``engine:`` section of a merge config (and keyword options of the API)."""

    model_config = ConfigDict(extra="forbid")

    cache_budget: str | int = Field("2GB", description="RAM for cached activations; beyond it they spill to "
                                                       "memory-mapped files (e.g. 500MB, 2GB)")
    spill_dir: str | None = Field(None, description="folder for spilled activations (default: the system "
                                                    "temporary folder)")
    device: str = Field("auto", description="cpu, cuda, cuda:N or auto (CUDA when present)")
    compute_dtype: Literal["float32", "bfloat16"] = Field("float32", description="dtype of block compute; "
                                                          "coefficients and merged weights stay float32")
    seed: int = Field(0, description="seed of the per-block shuffles (data sampling has data.seed)")
    regroup_by_length: bool = Field(True, description="regroup each task's right-padded token batches by "
                                                      "length and trim them, so no block computes on padding")
    call_cost: int | None = Field(None, ge=0, description="what one more block call costs, in token positions: "
                                                          "a regrouped batch is cut into pieces where that "
                                                          "removes more padding (default: 128 on a CPU, "
                                                          "no pieces on a GPU)")
    checkpoint: bool = Field(True, description="write a checkpoint after every block (needed for resume)")
    checkpoint_dir: str | None = Field(None, description="checkpoint folder (default: OUTPUT.checkpoint)")
    keep_checkpoint: bool = Field(False, description="keep the checkpoint folder after a successful run")
    resume: bool = Field(False, description="continue an interrupted run from its last finished block")
    block_plan: dict | None = Field(None, description="module paths {embedding, blocks, head} (or {stacks}) for "
                                                      "models the block plan introspection does not understand")
    block_granularity: Literal["layer", "stage"] = Field(
        "layer", description="hierarchical vision models (Swin, ConvNeXt, ResNet): every layer a block (memory: "
                             "one layer) or every stage a block")
    plot_coefficients: bool = Field(False, description="also write <method>/coefficients.png")

    @field_validator("cache_budget")
    @classmethod
    def _size(cls, value: str | int) -> str | int:
        cache_budget_bytes(value)
        return value

    def resolve_paths(self, relative_to: Path) -> EngineConfig:
        def fix(path: str | None) -> str | None:
            return relative_to_config(path, relative_to)

        return self.model_copy(update={"spill_dir": fix(self.spill_dir), "checkpoint_dir": fix(self.checkpoint_dir)})


ENGINE_OPTIONS = tuple(EngineConfig.model_fields)


def engine_config(options: dict) -> EngineConfig:
    """Validated engine options; a mistake names the option and lists the allowed ones."""
    try:
        return EngineConfig(**options)
    except ValidationError as exc:
        problems = [f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()]
        raise ConfigError(f"engine options: {'; '.join(problems)} (allowed: {', '.join(ENGINE_OPTIONS)})") from None


@dataclass(frozen=True)
class MergePlan:
    """Everything a merge needs to know before it opens a weight file."""

    method: MethodInfo
    params: BaseModel                    # the method's validated parameters
    base: Any                            # inputs as the caller gave them (paths, readers or an ExpertSet)
    experts: Any
    vocab_policy: str = "error"
    head_keys: tuple[str, ...] = ()
    data: Any = None                     # a DataConfig, a data: mapping or {expert: [batches]}
    engine: EngineConfig | None = None   # data-driven methods only
    template: Any = None                 # block methods: an nn.Module (or factory) of the base's architecture
    output: Path | None = None           # None: the result stays in memory
    overwrite: bool = False
    max_shard_size: str | int = "5GB"
    dtype_name: str | None = None
    quiet: bool = False
    card_paths: str = "name"
    config_record: dict | None = None    # what layermerge.yaml records when the merge came from a config file
    tokenizer_source: str | None = None  # the output vocabulary (layermerge.vocab)
    chat_template: str | None = None

    @property
    def name(self) -> str:
        return self.method.name

    @property
    def kind(self) -> str:
        return self.method.kind

    @property
    def dtype(self) -> torch.dtype | None:
        return resolve_dtype(self.dtype_name)

    @property
    def param_record(self) -> dict:
        """The effective parameters (defaults filled in), so a re-run does not depend on this version's defaults."""
        return self.params.model_dump()


def make_plan(base, experts, method: str, *, output=None, overwrite: bool = False,
              max_shard_size: str | int = "5GB", dtype: str | None = None, vocab_policy: str = "error",
              head_keys=None, quiet: bool = False, config_record: dict | None = None, data=None,
              card_paths: str = "name", template=None, tokenizer_source: str | None = None,
              chat_template: str | None = None, **options) -> MergePlan:
    """Resolve a merge request; ``options`` are the method's parameters plus engine options."""
    info = get_method(method)
    check_card_paths(card_paths)
    engine = None
    if info.kind == "tensor":
        if data is not None:
            raise ConfigError(f"method {method!r} is data-free and takes no data; drop data=, or choose a "
                              "data-driven method such as prodistill")
    else:
        engine = engine_config({k: options.pop(k) for k in ENGINE_OPTIONS if k in options})
    if template is not None and info.kind != "block":
        raise ConfigError(f"template= is for block methods (prodistill, distillmerge, regmean); {method!r} "
                          f"is a {info.kind!r} method and builds no template")
    params = validate_params(info, options)
    resolve_dtype(dtype)
    return MergePlan(info, params, base, experts, vocab_policy, tuple(head_keys or ()), data, engine, template,
                     Path(output) if output is not None else None, overwrite, max_shard_size,
                     str(dtype).replace("torch.", "") if isinstance(dtype, torch.dtype) else dtype, quiet,
                     card_paths, config_record, tokenizer_source, chat_template)
