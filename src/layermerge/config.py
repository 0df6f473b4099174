"""The YAML merge config, validated with pydantic so every mistake names its key and the fix."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from layermerge.errors import ConfigError, LayermergeError
from layermerge.fewshot import DataConfig
from layermerge.io.hub import looks_like_hub_id
from layermerge.io.paths import missing_path_message, relative_to_config
from layermerge.io.writer import parse_size
from layermerge.mergekit_config import from_mergekit, is_mergekit_config
from layermerge.methods.registry import available_methods, get_method, validate_params
from layermerge.names import expert_name_problem
from layermerge.pipeline.plan import EngineConfig


class MergeConfig(BaseModel):
    """What ``layermerge merge CONFIG.yaml`` reads. Paths are relative to the config file."""

    model_config = ConfigDict(extra="forbid")

    base: str | None = Field(None, description="base (pretrained) model folder or weights file")
    experts: dict[str, str] = Field(description="task name -> expert folder or weights file")
    method: str = Field("task_arithmetic", description="a method listed by `layermerge methods`")
    params: dict = Field(default_factory=dict, description="the method's parameters")
    output: str | None = Field(None, description="output folder (the CLI's --output wins)")
    dtype: Literal["float32", "bfloat16", "float16"] | None = Field(
        None, description="output dtype; default: the base's")
    max_shard_size: str | int = Field("5GB", description="largest safetensors shard, e.g. 2GB or 500MB, or bytes")
    vocab_policy: Literal["error", "base", "base_rows", "union"] = Field(
        "error", description="when experts added tokens: stop (error), merge only the base's rows (base; "
                             "base_rows is its earlier name), or keep every added token (union)")
    tokenizer_source: str | None = Field(None, description="the output tokenizer: base, union, or an expert's "
                                                           "name (added tokens get rows from the experts with them)")
    chat_template: str | None = Field(None, description="copy this input's chat template (base or an expert's name) "
                                                        "into the output tokenizer")
    head_keys: list[str] = Field(default_factory=list, description="extra key substrings to keep per task")
    data: DataConfig | None = Field(None, description="few-shot data of data-driven methods (prodistill...)")
    engine: EngineConfig | None = Field(None, description="block engine options of data-driven methods")
    card_paths: Literal["name", "full"] = Field(
        "name", description="model card: each input's folder/file name, or its full local path")
    push_to_hub: str | None = Field(None, description="hub repo (org/name) to upload the output folder to")

    @field_validator("experts")
    @classmethod
    def _non_empty(cls, value: dict[str, str]) -> dict[str, str]:
        if not value:
            raise ValueError("at least one expert is needed")
        for name in value:  # expert names become output folders (heads/<name>/)
            problem = expert_name_problem(name)
            if problem is not None:
                raise ValueError(problem)
        return value

    @field_validator("max_shard_size", mode="before")
    @classmethod
    def _valid_size(cls, value: str | int) -> str | int:
        """YAML gives ``2GB`` as a string and ``1000000`` as an int: both are sizes (checked here, not
        when the first shard is written)."""
        if isinstance(value, bool) or not isinstance(value, (str, int)):
            raise ValueError(f"must be a size such as 2GB or 500MB, or a number of bytes, got {value!r}")
        try:
            parse_size(value)
        except LayermergeError as exc:
            raise ValueError(str(exc)) from None
        return value

    @field_validator("method")
    @classmethod
    def _known_method(cls, value: str) -> str:
        methods = available_methods()
        if value not in methods:
            raise ValueError(f"unknown method {value!r}; allowed: {', '.join(methods)}")
        return value

    @model_validator(mode="after")
    def _data_matches_method(self) -> MergeConfig:
        kind = available_methods()[self.method].kind
        if kind in ("block", "model") and self.data is None:
            raise ValueError(f"method {self.method!r} learns from a few examples per task and needs a 'data' "
                             "section, e.g. data: {shots: 16, tasks: {sst2: {task: sst2}}}")
        if kind == "tensor" and (self.data is not None or self.engine is not None):
            raise ValueError(f"method {self.method!r} is data-free: remove the 'data' and 'engine' sections")
        return self

    def resolve_paths(self, relative_to: Path) -> MergeConfig:
        def fix(path: str | None) -> str | None:
            return relative_to_config(path, relative_to)

        def fix_input(path: str | None) -> str | None:   # a hub id stays one unless that local path exists
            fixed = fix(path)
            return path if fixed is not None and looks_like_hub_id(path) and not Path(fixed).exists() else fixed

        return self.model_copy(update={
            "base": fix_input(self.base), "experts": {k: fix_input(v) for k, v in self.experts.items()},
            "output": fix(self.output),
            "data": self.data.resolve_paths(relative_to) if self.data is not None else None,
            "engine": self.engine.resolve_paths(relative_to) if self.engine is not None else None,
        })


def _fields_at(loc: tuple) -> list[str]:
    """The keys allowed where an unknown key was found (top level, data, data.tasks.<name>, engine)."""
    from layermerge.fewshot import TaskDataConfig

    if len(loc) >= 2 and loc[0] == "engine":
        return list(EngineConfig.model_fields)
    if len(loc) >= 4 and loc[:2] == ("data", "tasks"):
        return list(TaskDataConfig.model_fields)
    if len(loc) >= 2 and loc[0] == "data":
        return list(DataConfig.model_fields)
    return list(MergeConfig.model_fields)


def _format_validation_error(source: str, exc: ValidationError) -> str:
    problems = []
    for error in exc.errors():
        where = ".".join(str(p) for p in error["loc"]) or "(top level)"
        if error["type"] == "extra_forbidden":
            allowed = ", ".join(_fields_at(error["loc"]))
            problems.append(f"unknown key {where!r} (allowed keys: {allowed})")
        elif error["type"] == "missing":
            problems.append(f"missing required key {where!r}")
        else:
            problems.append(f"key {where!r}: {error['msg'].removeprefix('Value error, ')}")
    return f"{source}: " + "; ".join(problems)


def parse_config(data: dict, source: str = "config", relative_to: Path | None = None) -> MergeConfig:
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the config must be a YAML mapping with keys base, experts, method, params")
    if is_mergekit_config(data):  # mergekit's format: converted (docs/MERGEKIT.md), then checked as ours
        data = from_mergekit(data, source)
    try:
        config = MergeConfig(**data)
    except ValidationError as exc:
        raise ConfigError(_format_validation_error(source, exc)) from None
    validate_params(get_method(config.method), config.params)
    return config.resolve_paths(relative_to) if relative_to is not None else config


def load_config(path: str | Path, resolve: bool = True) -> MergeConfig:
    """The validated config; with ``resolve`` its paths are made absolute (relative to the file)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(missing_path_message("config file", path))
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path} is not UTF-8 text (byte {exc.start} cannot be decoded): save the config as "
                          "UTF-8 YAML") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{path} is not valid YAML{where}: {problem}") from None
    return parse_config(data, source=str(path), relative_to=path.parent.resolve() if resolve else None)
