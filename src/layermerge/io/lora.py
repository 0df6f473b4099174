"""PEFT/LoRA adapter folders as experts: the base plus scale·B·A, formed tensor by tensor.

A LoRA adapter (``adapter_config.json`` plus ``adapter_model.safetensors`` or ``adapter_model.bin``)
holds only the change to its base model. ``LoraReader`` shows it as the dense expert it stands for,
with the base's key names, shapes and dtypes, so every method reads it like any checkpoint; a tensor
is formed only when ``get`` asks for it, from that key's base tensor and its own A and B, so no dense
expert is ever held in memory.

What the adapter file holds, with PEFT's ``base_model.model.`` stripped from each key:

* ``<module>.lora_A.weight`` / ``.lora_B.weight`` (Linear, GPT-2 Conv1D with ``fan_in_fan_out``):
  the module's weight gains ``scale · B @ A`` (transposed for ``fan_in_fan_out``);
* ``<module>.lora_embedding_A`` / ``.lora_embedding_B`` (Embedding): the weight gains
  ``scale · (B @ A)ᵀ``;
* ``<module>.lora_B.bias`` (``lora_bias: true``): the module's bias gains ``scale · bias``;
* any other tensor (``modules_to_save``, ``bias: all``/``lora_only``, an embedding saved with
  ``save_embedding_layers``; ``.base_layer.`` removed from the name) replaces the base's tensor, or
  is a new one (a classifier head).

``scale`` is ``lora_alpha / r`` (``lora_alpha / sqrt(r)`` with ``use_rslora``), per module from
``rank_pattern`` and ``alpha_pattern`` as PEFT matches them. Deltas are computed in float32 and the
result has the base tensor's dtype. Module paths are matched to the base's keys exactly, or with one
leading prefix stripped or added, so a base saved as the bare model (``layers.0...``) or as its
``*ForCausalLM`` class (``model.layers.0...``) both work. What would not give the merged model PEFT
itself gives (DoRA, other PEFT types, convolution LoRA, initialisations that change the base, ...)
is refused with one line naming it.
"""

from __future__ import annotations

import copy
import json
import math
import re
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import torch

from layermerge.errors import CheckpointError
from layermerge.io.paths import broken_link_reason, missing_path_message
from layermerge.io.reader import CheckpointReader, sha256_of_file

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
PEFT_PREFIX = "base_model.model."
MERGE_FIX = ("merge it into its base with peft (PeftModel.from_pretrained(base, adapter).merge_and_unload()"
             ".save_pretrained(folder)) and give that folder as the expert")
# init_lora_weights values that leave the base weights as they are; PiSSA, OLoRA, CorDA, LoftQ and
# LoRA-GA move part of the base into A and B, so their adapters only fit a changed base.
PLAIN_INITS = {"gaussian", "eva", "orthogonal"}
# Config options that make the adapter something other than base + scale·B·A.
UNSUPPORTED_OPTIONS = {
    "use_dora": "DoRA (use_dora: true)",
    "layer_replication": "layer replication (layer_replication)",
    "target_parameters": "LoRA on parameters (target_parameters)",
    "trainable_token_indices": "trainable tokens (trainable_token_indices)",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens)",
    "use_qalora": "QA-LoRA (use_qalora: true)",
    "use_bdlora": "BD-LoRA (use_bdlora)",
}
# transformers' auto-class tables for the task model a classifier (or LM) adapter was trained as.
TASK_TABLES = {
    "SEQ_CLS": "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES",
    "TOKEN_CLS": "MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES",
    "CAUSAL_LM": "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES",
    "QUESTION_ANS": "MODEL_FOR_QUESTION_ANSWERING_MAPPING_NAMES",
    "SEQ_2_SEQ_LM": "MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES",
}
CLASSIFIER_TASKS = ("SEQ_CLS", "TOKEN_CLS")
LORA_KEY = re.compile(r"(?P<module>.+)\.(?P<part>lora_A\.weight|lora_B\.weight|lora_B\.bias"
                      r"|lora_embedding_A|lora_embedding_B)")


def is_lora_adapter(path: Path) -> bool:
    """A folder holding ``adapter_config.json`` (a PEFT adapter; ``LoraReader`` refuses the non-LoRA ones)."""
    path = Path(path)
    return path.is_dir() and (path / ADAPTER_CONFIG).is_file()


def pattern_value(patterns: dict, module: str, default):
    """PEFT's ``get_pattern_key``: the first pattern that matches the end of ``module`` (after a dot)."""
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return value
    return default


@dataclass
class _Delta:
    """One low-rank change: ``scale · B @ A`` (``kind`` linear, linear_t, embedding) or ``scale · b`` (bias)."""

    kind: str
    a_key: str | None
    b_key: str
    scale: float


@dataclass
class _Entry:
    """How one exposed tensor is formed: a base tensor or an adapter tensor, plus deltas."""

    base_key: str | None
    whole: str | None = None                       # an adapter tensor that replaces the base's (or is new)
    deltas: list[_Delta] = field(default_factory=list)
    shape: tuple[int, ...] = ()
    dtype: torch.dtype = torch.float32


class LoraReader(CheckpointReader):
    """A PEFT LoRA adapter on ``base`` read as the dense expert base + scale·B·A, one tensor at a time."""

    def __init__(self, path: Path, base: CheckpointReader | None, role: str | None = None):
        given = Path(path).expanduser()
        if broken_link_reason(given) is not None or not given.exists():
            raise CheckpointError(missing_path_message(role or "adapter", given.absolute()))
        self.path = given.resolve()
        self.folder: Path | None = self.path
        self.role = role or "adapter"
        self._pickle_cache: dict = {}
        self._hashers: dict = {}
        self.adapter_config = self._read_config()
        self._who = f"{self.role} ({self.path})"
        if base is None:
            self._refuse_without_base()
        self.base = base
        self._check_config()
        self._weights_path = self._find_weights()
        self._adapter = CheckpointReader(self._weights_path, self.role)
        self._entries: dict[str, _Entry] = self._plan()

    # ----------------------------------------------------------------- the adapter's config
    def _read_config(self) -> dict:
        config_path = self.path / ADAPTER_CONFIG
        try:
            config = json.loads(config_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError, OSError) as exc:
            raise CheckpointError(f"malformed {config_path}: {' '.join(str(exc).split())}; re-save the adapter "
                                  "with save_pretrained") from None
        if not isinstance(config, dict):
            raise CheckpointError(f"malformed {config_path}: an adapter config is a JSON object ({{...}}), this "
                                  f"one is a {type(config).__name__}")
        return config

    def _refuse_without_base(self) -> None:
        trained_on = self.adapter_config.get("base_model_name_or_path")
        hint = f" (its adapter_config.json names {trained_on!r})" if trained_on else ""
        if self.role == "base model":
            raise CheckpointError(f"the base model {self.path} is a LoRA adapter, not a model: give the model the "
                                  f"adapter was trained on{hint} as the base, and the adapter as an expert")
        raise CheckpointError(f"{self._who} is a LoRA adapter, which holds only the change to its base model: "
                              f"give the base model it was trained on{hint} (base: in the config, base=... in "
                              "the API)")

    def _check_config(self) -> None:
        config = self.adapter_config
        peft_type = config.get("peft_type")
        if peft_type is None:
            raise CheckpointError(f"{self.path / ADAPTER_CONFIG} names no peft_type, so it is not a PEFT adapter "
                                  "config; re-save the adapter with peft's save_pretrained")
        if str(peft_type).upper() != "LORA":
            raise CheckpointError(f"{self._who} is a PEFT {peft_type} adapter; only LoRA adapters are read as "
                                  f"experts: {MERGE_FIX}")
        for option, name in UNSUPPORTED_OPTIONS.items():
            if config.get(option):
                raise CheckpointError(f"{self._who} is a LoRA adapter with {name}, which layermerge cannot read "
                                      f"as base + scale·B·A: {MERGE_FIX}")
        init = config.get("init_lora_weights", True)
        if isinstance(init, str) and init.lower() not in PLAIN_INITS:
            raise CheckpointError(
                f"{self._who} was initialised with init_lora_weights: {init!r}, which changes the base weights, so "
                "it does not apply to the original base: convert it to a plain LoRA with peft's save_pretrained("
                f"..., path_initial_model_for_weight_conversion=...), or {MERGE_FIX}")
        bias = config.get("bias", "none")
        if bias not in ("none", "all", "lora_only"):
            raise CheckpointError(f"{self._who} has bias: {bias!r}; PEFT knows 'none', 'all' and 'lora_only': "
                                  "re-save the adapter with peft")
        for option in ("r", "lora_alpha"):
            value = config.get(option, 8)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                raise CheckpointError(f"{self.path / ADAPTER_CONFIG} has {option}: {value!r}; it must be a "
                                      "positive number")
        for option in ("rank_pattern", "alpha_pattern"):
            if not isinstance(config.get(option) or {}, dict):
                raise CheckpointError(f"{self.path / ADAPTER_CONFIG} has a {option} that is not a mapping of "
                                      "module pattern to number")

    def _find_weights(self) -> Path:
        for name in ADAPTER_WEIGHTS:
            if (self.path / name).is_file():
                return self.path / name
        for name in ADAPTER_WEIGHTS:
            if broken_link_reason(self.path / name) is not None:
                raise CheckpointError(missing_path_message("adapter weights file", self.path / name))
        found = sorted(p.name for p in self.path.iterdir())
        raise CheckpointError(f"{self._who} has {ADAPTER_CONFIG} but no adapter weights: expected "
                              f"{' or '.join(ADAPTER_WEIGHTS)}; the folder holds {found[:10]}")

    def _scale(self, module: str) -> tuple[int, float]:
        """(rank, scale) of ``module`` (its path in the model PEFT wrapped), as PEFT computes them."""
        config = self.adapter_config
        rank = pattern_value(config.get("rank_pattern") or {}, module, config.get("r", 8))
        alpha = pattern_value(config.get("alpha_pattern") or {}, module, config.get("lora_alpha", 8))
        if isinstance(rank, bool) or not isinstance(rank, (int, float)) or rank <= 0:
            raise CheckpointError(f"{self.path / ADAPTER_CONFIG} gives module {module!r} the rank {rank!r}; "
                                  "it must be a positive number")
        return int(rank), alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank

    # ----------------------------------------------------------------- mapping the adapter onto the base
    @cached_property
    def _base_roots(self) -> list[str]:
        return sorted({key.split(".", 1)[0] + "." for key in self.base.keys() if "." in key})

    def _resolve(self, name: str) -> tuple[str | None, str | None]:
        """(the base key for the adapter's tensor path ``name``, the leading prefix the adapter has and the
        base lacks): exactly, with the adapter's first component stripped, or with one of the base's
        leading components added."""
        base = self.base
        if name in base:
            return name, None
        head, _, rest = name.partition(".")
        if rest and rest in base:
            return rest, head + "."
        hits = [root + name for root in self._base_roots if root + name in base]
        if len(hits) == 1:
            return hits[0], None
        if len(hits) > 1:
            raise CheckpointError(f"{self._who}: the adapter's {name!r} matches several tensors of the base "
                                  f"{base.path} ({', '.join(hits[:3])}); save the base with the class the "
                                  "adapter was trained on")
        return None, None

    def _plan(self) -> dict[str, _Entry]:
        """Every exposed key and how it is formed, from metadata only; checks every shape."""
        loras: dict[str, dict[str, str]] = {}
        wholes: dict[str, str] = {}
        for key in self._adapter.keys():
            if not key.startswith(PEFT_PREFIX):
                raise CheckpointError(f"{self._who}: the adapter file {self._weights_path.name} holds {key!r}, "
                                      f"which does not start with PEFT's {PEFT_PREFIX!r}; re-save the adapter "
                                      "with peft's save_pretrained")
            name = key[len(PEFT_PREFIX):]
            found = LORA_KEY.fullmatch(name)
            if found:
                loras.setdefault(found["module"], {})[found["part"]] = key
                continue
            parts = name.split(".")
            if any(part.startswith("lora_") or part in ("token_adapter", "ranknum") for part in parts):
                raise CheckpointError(f"{self._who} holds {key!r}, a LoRA tensor of a kind layermerge cannot "
                                      f"apply (only lora_A/lora_B and lora_embedding_A/B are): {MERGE_FIX}")
            parts = [p for p in parts if p not in ("base_layer", "original_module")]
            if "modules_to_save" in parts:        # older PEFT kept modules_to_save.<adapter> in saved names
                at = parts.index("modules_to_save")
                del parts[at:at + 2]
            wholes[".".join(parts)] = key

        entries: dict[str, _Entry] = {}           # keyed by the base's key (or the adapter's, for new ones)
        stripped: set[str] = set()
        added: list[str] = []
        for name, key in wholes.items():
            base_key, prefix = self._resolve(name)
            if prefix:
                stripped.add(prefix)
            if base_key is None:
                added.append(name)
                entries[name] = _Entry(None, key, shape=self._adapter.shape(key), dtype=self._adapter.dtype(key))
            else:
                entries[base_key] = _Entry(base_key, key, shape=self._adapter.shape(key),
                                           dtype=self.base.dtype(base_key))
        for module, parts in loras.items():
            self._plan_module(module, parts, entries, stripped)

        # The rest of the base, unchanged.
        planned = dict(entries)
        entries = {}
        for key in self.base.keys():
            entries[key] = planned.pop(key, None) or _Entry(key, shape=tuple(self.base.shape(key)),
                                                            dtype=self.base.dtype(key))
        entries.update(planned)                   # the new tensors (heads), after the base's
        # A head on a bare base: name everything as the adapter's task model does (``model.layers...``
        # and ``score.weight``), so the expert set finds the backbone prefix as for a dense expert.
        self.exposed_prefix = next(iter(stripped)) if added and len(stripped) == 1 else ""
        self.added_keys = list(added)
        return {(self.exposed_prefix + key if entry.base_key is not None else key): entry
                for key, entry in entries.items()}

    def _plan_module(self, module: str, parts: dict[str, str], entries: dict[str, _Entry], stripped: set) -> None:
        """Add one LoRA module's deltas to its weight's (and bias's) entry."""
        embedding = "lora_embedding_A" in parts or "lora_embedding_B" in parts
        a_key = parts.get("lora_embedding_A" if embedding else "lora_A.weight")
        b_key = parts.get("lora_embedding_B" if embedding else "lora_B.weight")
        if a_key is None or b_key is None:
            present = ", ".join(sorted(parts))
            raise CheckpointError(f"{self._who}: module {module!r} has only {present} of its LoRA pair (A and B); "
                                  "the adapter file is incomplete: re-save it")
        a_shape, b_shape = tuple(self._adapter.shape(a_key)), tuple(self._adapter.shape(b_key))
        if len(a_shape) != 2 or len(b_shape) != 2:
            raise CheckpointError(f"{self._who} has LoRA on {module!r} with {len(a_shape)}-dimensional A and B "
                                  f"(a convolution layer), which layermerge does not read: {MERGE_FIX}")
        rank, scale = self._scale(module)
        if a_shape[0] != rank or b_shape[1] != rank:
            raise CheckpointError(f"{self._who}: module {module!r} has A {a_shape} and B {b_shape}, which do not "
                                  f"have the rank {rank} that {ADAPTER_CONFIG} gives it (r, rank_pattern); the "
                                  "config does not belong to these weights")
        base_key, prefix = self._resolve(module + ".weight")
        if base_key is None:
            raise CheckpointError(
                f"{self._who}: LoRA target module {module!r} matches no tensor of the base {self.base.path} "
                f"(no {module + '.weight'!r}, with or without a leading prefix): the adapter was trained on "
                "another model; give the base it was trained on")
        if prefix:
            stripped.add(prefix)
        entry = entries.setdefault(base_key, _Entry(base_key, shape=tuple(self.base.shape(base_key)),
                                                    dtype=self.base.dtype(base_key)))
        fan_in_fan_out = bool(self.adapter_config.get("fan_in_fan_out")) and not embedding
        kind = "embedding" if embedding else "linear_t" if fan_in_fan_out else "linear"
        delta_shape = (a_shape[1], b_shape[0]) if kind != "linear" else (b_shape[0], a_shape[1])
        if tuple(entry.shape) != delta_shape:
            hint = ""
            if not embedding and tuple(entry.shape) == delta_shape[::-1]:
                hint = (" (it fits transposed: set fan_in_fan_out to "
                        f"{str(not fan_in_fan_out).lower()} in {ADAPTER_CONFIG} if the adapter was trained so)")
            raise CheckpointError(
                f"{self._who}: the LoRA update of {module!r} has shape {delta_shape}, but the base's {base_key!r} "
                f"is {tuple(entry.shape)}{hint}; the adapter does not fit this base: give the base it was trained on")
        entry.deltas.append(_Delta(kind, a_key, b_key, scale))
        if "lora_B.bias" in parts:
            bias_key, _ = self._resolve(module + ".bias")
            if bias_key is None:
                raise CheckpointError(f"{self._who} has lora_bias on {module!r}, but the base has no bias there; "
                                      "give the base it was trained on")
            bias = entries.setdefault(bias_key, _Entry(bias_key, shape=tuple(self.base.shape(bias_key)),
                                                       dtype=self.base.dtype(bias_key)))
            if tuple(self._adapter.shape(parts["lora_B.bias"])) != tuple(bias.shape):
                raise CheckpointError(f"{self._who}: lora_B.bias of {module!r} has shape "
                                      f"{tuple(self._adapter.shape(parts['lora_B.bias']))}, the base's "
                                      f"{bias_key!r} is {tuple(bias.shape)}; the adapter does not fit this base")
            bias.deltas.append(_Delta("bias", None, parts["lora_B.bias"], scale))

    # ----------------------------------------------------------------- queries
    def keys(self) -> list[str]:
        return list(self._entries)

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def _entry(self, key: str) -> _Entry:
        try:
            return self._entries[key]
        except KeyError:
            raise CheckpointError(f"key {key!r} not found in {self._who}") from None

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._entry(key).shape)

    def dtype(self, key: str) -> torch.dtype:
        return self._entry(key).dtype

    def get(self, key: str) -> torch.Tensor:
        """The dense expert's tensor: this key's base (or saved) tensor plus its LoRA deltas, nothing else read."""
        entry = self._entry(key)
        tensor = self._adapter.get(entry.whole) if entry.whole is not None else self.base.get(entry.base_key)
        if not entry.deltas:
            return tensor.to(entry.dtype)
        merged = tensor.float()
        for delta in entry.deltas:
            merged = merged + self._delta(delta)
        return merged.to(entry.dtype)

    def _delta(self, delta: _Delta) -> torch.Tensor:
        b = self._adapter.get(delta.b_key).float()
        if delta.kind == "bias":
            return b * delta.scale
        product = b @ self._adapter.get(delta.a_key).float()
        if delta.kind != "linear":            # Conv1D (fan_in_fan_out) and Embedding store the transpose
            product = product.T
        return product * delta.scale

    # ----------------------------------------------------------------- metadata
    @cached_property
    def config(self) -> dict | None:
        """The base's config; for an adapter that adds a head, also the task model's class and label count."""
        config = self.base.config
        if config is None:
            return None
        config = copy.deepcopy(config)
        heads = list(self.added_keys) + [
            k for k, e in self._entries.items()
            if e.whole is not None and e.base_key is not None and tuple(e.shape) != tuple(self.base.shape(e.base_key))]
        if not heads:
            return config
        task_type = str(self.adapter_config.get("task_type") or "").upper()
        architecture = self._task_class(config, task_type)
        if architecture:
            config["architectures"] = [architecture]
        labels = self._label_rows(heads) if task_type in CLASSIFIER_TASKS else None
        if labels is not None:
            names = config.get("id2label")
            if not (isinstance(names, dict) and len(names) == labels):
                config["id2label"] = {str(i): f"LABEL_{i}" for i in range(labels)}
                config["label2id"] = {f"LABEL_{i}": i for i in range(labels)}
            config["num_labels"] = labels
        return config

    def _task_class(self, config: dict, task_type: str) -> str | None:
        mapping = self.adapter_config.get("auto_mapping") or {}
        named = mapping.get("base_model_class") if isinstance(mapping, dict) else None
        if named:
            return named
        table_name = TASK_TABLES.get(task_type)
        if table_name is None or not config.get("model_type"):
            return None
        try:
            from transformers.models.auto import modeling_auto
        except ImportError:
            return None
        value = getattr(modeling_auto, table_name, {}).get(config["model_type"])
        return value[0] if isinstance(value, (list, tuple)) else value

    def _label_rows(self, heads: list[str]) -> int | None:
        """The class count of a classifier adapter: the fewest rows of its head's 2-D weights."""
        rows = [self.shape(k)[0] for k in heads if k.endswith("weight") and len(self.shape(k)) == 2]
        return min(rows) if rows else None

    @property
    def weight_files(self) -> list[Path]:
        """The adapter's own files (the base's are the base reader's)."""
        return [self._weights_path, self.path / ADAPTER_CONFIG]

    def file_hashes(self) -> dict[str, str]:
        return {str(p): sha256_of_file(p) for p in self.weight_files}

    def __repr__(self) -> str:
        return f"LoraReader({str(self.path)!r} on {str(self.base.path)!r}, {len(self)} tensors)"
