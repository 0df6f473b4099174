"""ExpertSet: a base model plus named experts fine-tuned from it, read lazily and checked up front.

Every check that can be made from metadata alone (key names, shapes, dtypes, model types, vocabulary
sizes) runs before any merging, so a mismatch fails in seconds with a message that names the files
and the first offending keys. Finiteness needs the values, so it is checked as each tensor is read.

Key names are compared after stripping a task-model prefix: an expert saved as
``BertForSequenceClassification`` stores ``bert.encoder...`` where the base ``BertModel`` stores
``encoder...``. Keys that only the experts have (``classifier.weight``), or whose shape differs
between experts, are per-task heads: kept per task, never merged.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from layermerge.errors import CheckpointError, IncompatibleExpertsError, RedundantInputWarning
from layermerge.io.inputs import open_input
from layermerge.io.reader import CheckpointReader
from layermerge.names import check_expert_name
from layermerge.vocab import plan_vocabulary

VOCAB_POLICIES = ("error", "base", "base_rows", "union")   # base_rows: the earlier name of base
MAX_LISTED = 5


def _listed(keys: list[str]) -> str:
    shown = ", ".join(repr(k) for k in keys[:MAX_LISTED])
    more = f" (and {len(keys) - MAX_LISTED} more)" if len(keys) > MAX_LISTED else ""
    return shown + more


def detect_prefix(base_keys: set[str], expert_keys: list[str]) -> str:
    """The prefix that maps an expert's keys onto the base's, e.g. ``'bert.'`` (or ``''``)."""
    direct = sum(1 for key in expert_keys if key in base_keys)
    best_prefix, best_hits = "", direct
    candidates = {key.split(".", 1)[0] + "." for key in expert_keys if "." in key}
    for prefix in candidates:
        hits = sum(1 for key in expert_keys if key.startswith(prefix) and key[len(prefix):] in base_keys)
        if hits > best_hits:
            best_prefix, best_hits = prefix, hits
    return best_prefix


def _label_count(reader: CheckpointReader) -> int | None:
    """Number of classes in a checkpoint's config (``id2label`` or ``num_labels``), if it has a config.

    transformers omits both from config.json when they hold its default of two labels.
    """
    if reader.config is None:
        return None
    config = reader.config
    if isinstance(config.get("id2label"), dict):
        return len(config["id2label"])
    return config.get("num_labels", 2)


def _vision_head_prefixes(readers: list[CheckpointReader]) -> list[str]:
    """Head prefixes that layermerge vision models record in their config (``_fc.`` for EfficientNet).

    Image experts often share a class count (MNIST, KMNIST and CIFAR-10 all have ten), so shapes alone
    cannot tell their classifiers from the backbone; the recorded prefix can.
    """
    prefixes = []
    for reader in readers:
        record = (reader.config or {}).get("layermerge_vision") or {}
        prefix = record.get("head_prefix") if isinstance(record, dict) else None
        if prefix and prefix not in prefixes:
            prefixes.append(prefix)
    return prefixes


def _all_finite(tensor: torch.Tensor) -> bool:
    """Exact and ~40x faster than ``isfinite(t).all()`` on large tensors: min and max propagate NaN,
    and every value lies between them, so both are finite exactly when all values are."""
    if tensor.numel() == 0:
        return True
    low, high = torch.aminmax(tensor)
    return bool(torch.isfinite(low)) and bool(torch.isfinite(high))


@dataclass
class Expert:
    """One expert: its task name, reader, and the prefix its backbone keys carry."""

    name: str
    reader: CheckpointReader
    prefix: str = ""
    # Non-float buffers the base has and this expert's file lacks (``position_ids`` that newer
    # transformers no longer save): read from the base, so every method leaves them as the base has them.
    carried: dict[str, CheckpointReader] = field(default_factory=dict)

    def key_for(self, base_key: str) -> str:
        return self.prefix + base_key

    def get(self, base_key: str) -> torch.Tensor:
        if base_key in self.carried:
            return self.carried[base_key].get(base_key)
        return self.reader.get(self.key_for(base_key))

    def shape(self, base_key: str) -> tuple:
        if base_key in self.carried:
            return tuple(self.carried[base_key].shape(base_key))
        return tuple(self.reader.shape(self.key_for(base_key)))

    def dtype(self, base_key: str) -> torch.dtype:
        if base_key in self.carried:
            return self.carried[base_key].dtype(base_key)
        return self.reader.dtype(self.key_for(base_key))


@dataclass
class CompatibilityReport:
    """What a merge of this set will do with every key, and any non-fatal notes."""

    merge_keys: list[str]
    head_keys: dict[str, list[str]]            # task -> expert-side key names kept per task
    vocab_keys: list[str] = field(default_factory=list)  # merged on the base's rows only
    notes: list[str] = field(default_factory=list)

    def summary_lines(self) -> list[str]:
        lines = [f"merged tensors: {len(self.merge_keys)}"]
        for task, keys in self.head_keys.items():
            lines.append(f"per-task head '{task}': {len(keys)} tensors {_listed(keys)}")
        lines.extend(self.notes)
        return lines


class ExpertSet:
    """Base plus named experts. ``check()`` validates compatibility before any work is done."""

    def __init__(self, base: str | Path | CheckpointReader | None, experts: dict[str, str | Path | CheckpointReader],
                 vocab_policy: str = "error", head_keys: list[str] | None = None, tokenizer_source: str | None = None,
                 chat_template: str | None = None):
        if not isinstance(experts, Mapping):
            raise IncompatibleExpertsError(f"experts must be a mapping of expert name to folder or file, e.g. "
                                           f"{{'sst2': 'models/bert-sst2'}}, not a {type(experts).__name__}")
        if not experts:
            raise IncompatibleExpertsError("no experts given: pass at least one expert checkpoint")
        if vocab_policy not in VOCAB_POLICIES:
            raise IncompatibleExpertsError(f"vocab_policy must be one of {VOCAB_POLICIES}, got {vocab_policy!r}")
        for name in experts:  # names become folders in the output (heads/<name>/): refuse ../ and the like
            check_expert_name(name)
        self.base = open_input(base, "base model") if base is not None else None
        self.vocab_policy = vocab_policy
        self.extra_head_patterns = list(head_keys or [])
        self.head_prefixes: list[str] = []
        first_name, first_source = next(iter(experts.items()))
        reference_keys = set((self.base or open_input(first_source, f"expert '{first_name}'")).keys())
        self.experts: list[Expert] = []
        for name, source in experts.items():
            reader = open_input(source, f"expert '{name}'", base=self.base)
            self.experts.append(Expert(name, reader, detect_prefix(reference_keys, reader.keys())))
        if self.base is not None:
            self.head_prefixes = _vision_head_prefixes([self.base] + [e.reader for e in self.experts])
        self.tokenizer_source = tokenizer_source
        self.report = self.check()
        self.vocabulary = plan_vocabulary(self.base, [(e.name, e.reader) for e in self.experts], vocab_policy,
                                          tokenizer_source, chat_template, self._base_rows())
        self._vocab_means: dict[str, torch.Tensor] = {}
        self._redundant_warned: set[tuple[str | None, str]] = set()
        self._warn_same_paths()

    # ----------------------------------------------------------------- properties
    @property
    def names(self) -> list[str]:
        return [expert.name for expert in self.experts]

    @property
    def reference(self) -> CheckpointReader:
        """The checkpoint whose key names and dtypes the output uses: the base, or the first expert."""
        return self.base if self.base is not None else self.experts[0].reader

    @property
    def reference_prefix(self) -> str:
        return "" if self.base is not None else self.experts[0].prefix

    def input_readers(self) -> list[tuple[str | None, CheckpointReader]]:
        """(expert name, reader) of every input, the base first with the name None."""
        return ([(None, self.base)] if self.base is not None else []) + [(e.name, e.reader) for e in self.experts]

    def input_paths(self) -> list[Path]:
        readers = ([self.base] if self.base is not None else []) + [e.reader for e in self.experts]
        return [r.path for r in readers]

    # ----------------------------------------------------------------- checks
    def _is_declared_head(self, key: str) -> bool:
        return any(pattern in key for pattern in self.extra_head_patterns) or any(
            key.startswith(prefix) for prefix in self.head_prefixes)

    def _inside_backbone(self, key: str, prefix: str, backbone_roots: set[str]) -> bool:
        """An extra key under a backbone module (``encoder.layer.7...``) is not a head."""
        if self._is_declared_head(key) or not key.startswith(prefix):
            return False
        return key[len(prefix):].split(".", 1)[0] in backbone_roots

    def check(self) -> CompatibilityReport:
        """Validate everything that metadata can tell; raise IncompatibleExpertsError on the first failure."""
        self._check_model_types()
        reference = self.reference
        ref_prefix = self.reference_prefix
        backbone = [k[len(ref_prefix):] for k in reference.keys() if k.startswith(ref_prefix)]
        if self.base is None:
            # Without a base, the reference's own non-prefixed keys are heads of the first expert.
            backbone = [k for k in backbone if k]
        backbone_set = set(backbone)
        backbone_roots = {k.split(".", 1)[0] for k in backbone if "." in k}

        merge_keys, vocab_keys = [], []
        head_keys: dict[str, list[str]] = {e.name: [] for e in self.experts}
        vocab_size = self._vocab_sizes()

        for expert in self.experts:
            ekeys = expert.reader.keys()
            mapped = {k[len(expert.prefix):] for k in ekeys if k.startswith(expert.prefix)}
            missing = [k for k in backbone if k not in mapped and not self._is_declared_head(k)]
            carried = [k for k in missing if self.base is not None and not reference.dtype(k).is_floating_point]
            if carried and len(carried) < len(backbone):
                expert.carried.update({k: self.base for k in carried})
                missing = [k for k in missing if k not in expert.carried]
            if missing and len(missing) == len(backbone):
                raise IncompatibleExpertsError(
                    f"expert '{expert.name}' ({expert.reader.path}) shares no parameter names with "
                    f"{reference.path}: it is not fine-tuned from this base. First keys: "
                    f"expert {_listed(ekeys)}; base {_listed(backbone)}"
                )
            if missing:
                raise IncompatibleExpertsError(
                    f"expert '{expert.name}' ({expert.reader.path}) is missing {len(missing)} keys that "
                    f"{reference.path} has: {_listed(missing)}. Every expert must contain the full backbone; "
                    "re-save it from the complete model."
                )
            extra = [k for k in ekeys if not (k.startswith(expert.prefix) and k[len(expert.prefix):] in backbone_set)]
            inside_backbone = [k for k in extra if self._inside_backbone(k, expert.prefix, backbone_roots)]
            if inside_backbone:
                raise IncompatibleExpertsError(
                    f"expert '{expert.name}' ({expert.reader.path}) has {len(inside_backbone)} extra keys inside "
                    f"the backbone that {reference.path} lacks: {_listed(inside_backbone)}. It has a different "
                    "architecture (more layers or extra modules) and cannot be merged with this base. If these are "
                    "task-specific modules, declare them with head_keys=['<substring>']."
                )
            head_keys[expert.name].extend(extra)

        for key in backbone:
            if self._is_declared_head(key):
                for expert in self.experts:
                    head_keys[expert.name].append(expert.key_for(key))
                continue
            ref_shape, ref_dtype = reference.shape(ref_prefix + key), reference.dtype(ref_prefix + key)
            shapes = {e.name: e.shape(key) for e in self.experts}
            dtypes = {e.name: e.dtype(key) for e in self.experts}
            mismatched = {n: s for n, s in shapes.items() if s != ref_shape}
            if mismatched:
                if self._is_vocab_key(key, ref_shape, mismatched, vocab_size):
                    vocab_keys.append(key)
                    merge_keys.append(key)
                    continue
                if self._looks_like_head(key, ref_shape, shapes):
                    for expert in self.experts:
                        head_keys[expert.name].append(expert.key_for(key))
                    continue
                name, shape = next(iter(mismatched.items()))
                expert = next(e for e in self.experts if e.name == name)
                raise IncompatibleExpertsError(
                    f"shape mismatch for key {key!r}: {reference.path} has {tuple(ref_shape)}, expert '{name}' "
                    f"({expert.reader.path}) has {tuple(shape)}. The expert must be fine-tuned from this base "
                    "with the same architecture. If this tensor is a task head, declare it with "
                    "head_keys=['<substring>'] so it is kept per task instead of merged."
                )
            bad_dtype = {n: d for n, d in dtypes.items() if d != ref_dtype}
            if bad_dtype:
                name, dtype = next(iter(bad_dtype.items()))
                expert = next(e for e in self.experts if e.name == name)
                raise IncompatibleExpertsError(
                    f"dtype mismatch for key {key!r}: {reference.path} stores {ref_dtype}, expert '{name}' "
                    f"({expert.reader.path}) stores {dtype}. Save every model in one dtype "
                    f"(e.g. model.to(torch.{str(ref_dtype).replace('torch.', '')}).save_pretrained(...))."
                )
            merge_keys.append(key)

        notes = []
        carried = sorted({key for e in self.experts for key in e.carried})
        if carried:
            notes.append(f"{len(carried)} non-float buffers only the base stores are kept as the base has them: "
                         f"{_listed(carried)}")
        if vocab_keys:
            notes.append(
                f"vocabulary sizes differ; merging the {len(vocab_keys)} embedding tensors' rows the base has"
                + ("; the experts' extra token rows are dropped (vocab_policy: base)"
                   if self.vocab_policy in ("base", "base_rows") and self.tokenizer_source in (None, "base") else
                   "; rows of the tokens the experts added come from those experts (layermerge.vocab)")
            )
        return CompatibilityReport(merge_keys, head_keys, vocab_keys, notes)

    def _check_model_types(self) -> None:
        readers = ([("base", self.base)] if self.base is not None else []) + [(e.name, e.reader) for e in self.experts]
        typed = [(name, r) for name, r in readers if r.model_type is not None]
        if not typed:
            return
        first_name, first = typed[0]
        for name, reader in typed[1:]:
            if reader.model_type != first.model_type:
                raise IncompatibleExpertsError(
                    f"different model_type: '{first_name}' ({first.path}) is {first.model_type!r} but '{name}' "
                    f"({reader.path}) is {reader.model_type!r}. Merging needs models of one architecture."
                )

    def _vocab_sizes(self) -> dict[str, int | None]:
        sizes = {}
        readers = ([("base", self.base)] if self.base is not None else []) + [(e.name, e.reader) for e in self.experts]
        for name, reader in readers:
            config = reader.config or {}
            sizes[name] = config.get("vocab_size") or (config.get("text_config") or {}).get("vocab_size")
        return sizes

    def _is_vocab_key(self, key: str, ref_shape: tuple, mismatched: dict[str, tuple], vocab_size: dict) -> bool:
        """True when only the first dimension differs and it is a vocabulary size; applies the policy."""
        if not all(len(s) == len(ref_shape) and s[1:] == ref_shape[1:] for s in mismatched.values()):
            return False
        known_vocab = {v for v in vocab_size.values() if v}
        if not ({ref_shape[0]} | {s[0] for s in mismatched.values()}) <= known_vocab:
            return False
        if self.vocab_policy in ("base", "base_rows", "union") or self.tokenizer_source is not None:
            short = [n for n, s in mismatched.items() if s[0] < ref_shape[0]]
            if short:
                raise IncompatibleExpertsError(
                    f"expert(s) {short} have fewer vocabulary rows than the base for {key!r}; "
                    "'base_rows' needs every expert's vocabulary to extend the base's"
                )
            return True
        details = ", ".join(f"'{n}': {s[0]}" for n, s in mismatched.items())
        raise IncompatibleExpertsError(
            f"vocabulary size mismatch for {key!r}: the base has {ref_shape[0]} rows, experts have {details}. "
            "An expert added tokens, so rows beyond the base's vocabulary have no counterpart to merge with. "
            "Set vocab_policy: union to keep every expert's added tokens (their rows from those experts), "
            "vocab_policy: base to merge only the rows the base has and drop the added tokens, or "
            "tokenizer_source: EXPERT to output one expert's tokenizer."
        )

    def _looks_like_head(self, key: str, ref_shape: tuple, shapes: dict[str, tuple]) -> bool:
        """A classification head: a 1-2 dim tensor whose first dimension is each expert's label count.

        Checking the label count (from the expert's config) keeps a position table or a layer of
        another width from being mistaken for a head and silently dropped from the merge.
        """
        all_shapes = [ref_shape, *shapes.values()]
        if any(len(s) != len(ref_shape) or len(s) > 2 for s in all_shapes):
            return False
        if not all(s[1:] == ref_shape[1:] for s in all_shapes):
            return False
        labels = {e.name: _label_count(e.reader) for e in self.experts}
        return all(labels[name] is not None and shape[0] == labels[name] for name, shape in shapes.items())

    def _base_rows(self) -> int:
        """Rows of the reference's embedding (its vocab_size), or 0 when its config does not say."""
        return (self._vocab_sizes().get("base") if self.base is not None else None) or 0

    def vocabulary_rows(self, key: str, merged: torch.Tensor) -> torch.Tensor:
        """A merged tensor as written: vocabulary tensors grown by the rows of the experts' added tokens
        (``self.vocabulary``, see layermerge.vocab); others as they are."""
        if self.vocabulary is None or key not in self.report.vocab_keys:
            return merged

        def rows(position: int, indices: list[int]) -> torch.Tensor:
            return self.experts[position].get(key)[indices].to(merged.dtype)

        return self.vocabulary.extend(merged, rows)

    def vocabulary_view(self, key: str, position: int | None = None) -> torch.Tensor:
        """The base's (``position`` None) or expert ``position``'s tensor for a vocabulary key in the output
        vocabulary's rows (``OutputVocabulary.view``), for the block engine's non-block weights."""
        base_rows = self.reference.shape(self.reference_prefix + key)[0]
        if key not in self._vocab_means:          # read each expert's added rows once per key
            shape = self.reference.shape(self.reference_prefix + key)[1:]

            def rows(index: int, indices: list[int]) -> torch.Tensor:
                return self.experts[index].get(key)[indices]

            self._vocab_means[key] = self.vocabulary.extend(torch.zeros((0, *shape)), rows)
        if position is None:
            return self.vocabulary.view(self.base_tensor(key), self._vocab_means[key])
        expert = self.experts[position].get(key)
        return self.vocabulary.view(expert[:base_rows], self._vocab_means[key], position, expert)

    def output_config(self) -> dict | None:
        """The reference's config, with the output vocabulary's size when it grew."""
        config = self.reference.config
        return config if self.vocabulary is None else self.vocabulary.config(config)

    # ----------------------------------------------------------------- tensor access
    def base_tensor(self, key: str) -> torch.Tensor:
        """The base's tensor for a backbone key (with no base: zeros, so task vectors are the experts)."""
        if self.base is None:
            ref = self.experts[0].reader
            return torch.zeros(ref.shape(self.reference_prefix + key), dtype=ref.dtype(self.reference_prefix + key))
        return self.base.get(key)

    def expert_tensors(self, key: str) -> list[torch.Tensor]:
        return list(self.each_expert_tensor(key))

    def each_expert_tensor(self, key: str) -> Iterator[torch.Tensor]:
        """The experts' tensors for ``key`` read one at a time (vocabulary tensors cut to the output's rows),
        for consumers that never need them all at once: a 150k-row embedding is 0.9 GB per expert."""
        rows = self.reference.shape(self.reference_prefix + key)[0] if key in self.report.vocab_keys else None
        for expert in self.experts:      # no local holds a yielded tensor while the consumer works on it
            yield expert.get(key) if rows is None else expert.get(key)[:rows]

    def iter_merge_tensors(self, dtype: torch.dtype = torch.float32,
                           check_finite: bool = True) -> Iterator[tuple[str, torch.Tensor, list[torch.Tensor]]]:
        """(key, base, [experts]) for every merged key, one key at a time, cast to ``dtype``."""
        equal = [pair for pair in self._input_pairs() if pair not in self._redundant_warned]
        for key in self.report.merge_keys:
            # Each original is dropped as soon as its cast copy exists, so an input is held once while
            # the consumer works; deleting after the yield frees this key before the next is read.
            base = self.base_tensor(key).to(dtype)
            experts = self.expert_tensors(key)
            for index in range(len(experts)):
                experts[index] = experts[index].to(dtype)
            if check_finite:  # after the cast, which is also where an overflow to Inf would appear
                self._check_finite(key, base, experts)
            if equal:         # before the yield: a method may modify the tensors in place
                equal = self._still_equal(equal, base, experts)
            yield key, base, experts
            del base, experts
        for first, second in equal if self.report.merge_keys else []:
            why = "every merged tensor equals the base's" if first is None else "every merged tensor is equal"
            self._warn_redundant(first, second, why)

    def _check_finite(self, key: str, base: torch.Tensor, experts: list[torch.Tensor]) -> None:
        named = ([("base", self.base, base)] if self.base is not None else []) + [
            (e.name, e.reader, t) for e, t in zip(self.experts, experts)
        ]
        for name, reader, tensor in named:
            if tensor.is_floating_point() and not _all_finite(tensor):
                count = int((~torch.isfinite(tensor)).sum())
                raise IncompatibleExpertsError(
                    f"'{name}' ({reader.path}) has {count} NaN/Inf values in {key!r}. A diverged fine-tune "
                    "cannot be merged; re-train that expert or drop it from the set."
                )

    # ----------------------------------------------------------------- redundant inputs
    # An expert identical to the base (a zero task vector) or to another expert is legal but almost
    # always a mistake, so it is a warning, found as cheaply as possible: the same path (no I/O) at
    # once; equal tensors while a data-free merge streams them (a comparison that stops at the first
    # tensor that differs, so it costs one compare per pair in the usual case); equal sha256 of the
    # weight files after any merge, from the hashes the model card needs anyway (no extra I/O).
    def _input_pairs(self) -> list[tuple[str | None, str]]:
        """Every pair of inputs that should differ; None stands for the base."""
        names = self.names
        pairs: list[tuple[str | None, str]] = [(None, name) for name in names] if self.base is not None else []
        return pairs + [(a, b) for i, a in enumerate(names) for b in names[i + 1:]]

    def _warn_redundant(self, first: str | None, second: str, why: str) -> None:
        warned = self._redundant_warned
        if (first, second) in warned or ((None, first) in warned and (None, second) in warned):
            return              # already said, or implied: both are identical to the base
        warned.add((first, second))
        if first is None:
            message = (f"expert '{second}' is identical to the base model ({why}): its task vector is zero, so "
                       "it adds nothing to the merged backbone; check its path (or whether it was trained with "
                       "a frozen backbone)")
        else:
            message = (f"experts '{first}' and '{second}' are identical ({why}): the same model counts twice in "
                       "the merge; drop one or fix its path")
        warnings.warn(message, RedundantInputWarning, stacklevel=2)

    def _warn_same_paths(self) -> None:
        readers = dict(self.input_readers())
        for first, second in self._input_pairs():
            if readers[first].path == readers[second].path:
                self._warn_redundant(first, second, f"the same path {readers[second].path}")

    def _still_equal(self, pairs: list, base: torch.Tensor, experts: list[torch.Tensor]) -> list:
        tensors: dict[str | None, torch.Tensor] = dict(zip(self.names, experts))
        tensors[None] = base
        return [(a, b) for a, b in pairs if torch.equal(tensors[a], tensors[b])]

    def warn_identical_files(self, hashes: dict[str | None, dict[str, str]]) -> None:
        """Warn about inputs whose weight files have the same sha256; ``hashes``: name (None: the
        base) -> that reader's ``file_hashes()``."""
        digests = {name: sorted(values.values()) for name, values in hashes.items()}
        for first, second in self._input_pairs():
            if first in digests and second in digests and digests[first] == digests[second]:
                self._warn_redundant(first, second, "their weight files have the same sha256")

    def head_state(self, task: str) -> dict[str, torch.Tensor]:
        expert = next(e for e in self.experts if e.name == task)
        return {key: expert.reader.get(key) for key in self.report.head_keys[task]}

    def expert(self, name: str) -> Expert:
        for expert in self.experts:
            if expert.name == name:
                return expert
        raise CheckpointError(f"no expert named {name!r}; experts are {self.names}")


def load_experts(base: str | Path | None, experts: dict[str, str | Path], **options) -> ExpertSet:
    """Open and check a base and named experts (see ExpertSet)."""
    return ExpertSet(base, experts, **options)
