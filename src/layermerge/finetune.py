"""Fine-tuning experts, with a cache so that nothing is trained twice.

Full fine-tuning: every weight trains, AdamW with weight decay on matrices only, a linear warm-up
then linear decay to zero, gradient clipping, dropout as the model defines it, all randomness
seeded. Text classification and regression use ``AutoModelForSequenceClassification`` (one output
and MSE for regression); generation tasks train the causal language model itself on the completion's
tokens (``AutoModelForCausalLM``); image tasks use a registered vision factory
(``vision:efficientnet-lite0``, ``vision:small-cnn``). Tasks are built-in or users' specs
(``layermerge.data.get_task``).

LoRA (``settings.lora``, text and generation tasks): the same model, loop and cache, but the base
stays frozen and only low-rank A·B pairs on its Linear layers train (with peft), plus any module the
base lacks, such as a new classifier head, trained in full and saved through peft's
``modules_to_save``. The result is a PEFT adapter folder (``adapter_config.json`` naming the base
folder, ``adapter_model.safetensors``), which every merge method and ``evaluate_task`` read as the
dense expert base + scale·B·A (``io/lora.py``).

The result is a folder keyed by a sha256 of everything that determines it — the base's weight
file hashes, the task's training file (and a user's task spec), every setting, and the layermerge
version — with a
``layermerge_finetune.json`` written last; a folder with the same key is a cache hit and is
returned without training. Folders are written to a temporary name and renamed when complete.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from torch import nn

from layermerge import __version__
from layermerge.data.collate import IGNORE_INDEX, GenerationCollator, TextCollator, length_grouped_batches, row_lengths
from layermerge.data.models import (
    VisionFactory,
    forward_logits,
    get_vision_factory,
    image_collator_for,
    save_vision_base,
    save_vision_model,
    spec_for,
)
from layermerge.data.sources import TaskData, load_split
from layermerge.data.tasks import Task, get_task
from layermerge.errors import CheckpointError, ConfigError, OutputError
from layermerge.io.atomic import discard_temp, make_temp_sibling, replace_folder
from layermerge.progress import progress as progress_report

MARKER = "layermerge_finetune.json"
GENERATION_MAX_LENGTH = 512   # tokens of prompt + completion when fine-tuning a generation task
VISION_PREFIX = "vision:"
HASH_LIMIT = 2 * 1024**3   # weight files above this are fingerprinted by size and mtime, not hashed
LORA_INSTALL_HINT = "pip install 'layermerge[lora]'"   # peft, which LoRA fine-tuning needs


class LoraSettings(BaseModel):
    """A LoRA recipe: the base stays frozen and each target Linear layer W gains (alpha / r)·B·A, where
    only A and B train (peft's LoraConfig with these values)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    r: int = Field(16, ge=1, description="rank of each A·B pair")
    alpha: float | None = Field(None, gt=0, description="scale numerator, the update is (alpha / r)·B·A "
                                                          "(default 2·r)")
    dropout: float = Field(0.05, ge=0, lt=1, description="dropout on the LoRA branch's input while training")
    target_modules: tuple[str, ...] | None = Field(
        None, min_length=1, description="module names (or name endings, as peft matches them) that get LoRA; "
                                        "default: every Linear layer of the base (attention and MLP), not the "
                                        "output layer or a new head")
    use_rslora: bool = Field(False, description="scale by alpha / sqrt(r) instead of alpha / r")

    @model_validator(mode="before")
    @classmethod
    def default_alpha(cls, values):
        """alpha = 2·r unless given, written out so that both spellings share one cache key."""
        if isinstance(values, dict) and values.get("alpha") is None:
            rank = values.get("r", 16)
            if isinstance(rank, int) and not isinstance(rank, bool):
                values = {**values, "alpha": 2 * rank}
        return values


class FinetuneSettings(BaseModel):
    """Every knob of a fine-tuning run; all of them enter the cache key (``lora`` only when set, so full
    fine-tunes keep the keys they had before LoRA existed)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    epochs: int = Field(1, ge=1, description="passes over the training examples")
    lr: float = Field(5e-5, gt=0, description="peak AdamW learning rate")
    batch_size: int = Field(32, ge=1, description="examples per optimiser step")
    max_length: int = Field(128, ge=8, description="tokens per text example (longer ones are truncated)")
    max_train_examples: int | None = Field(None, ge=1, description="train on a seeded subset of this size")
    warmup_ratio: float = Field(0.06, ge=0, lt=1, description="fraction of steps with a linear warm-up")
    weight_decay: float = Field(0.01, ge=0, description="AdamW decay on matrices (not biases or norms)")
    max_grad_norm: float = Field(1.0, gt=0, description="gradient clipping threshold")
    seed: int = Field(0, description="seeds head initialisation, data order and dropout")
    image_size: int | None = Field(None, ge=8, description="image resolution (vision; default: the model's)")
    lora: LoraSettings | None = Field(None, description="train a LoRA adapter instead of every weight")

    def record(self) -> dict:
        """The settings as the cache key and the marker file hold them: without ``lora`` when it is None."""
        return self.model_dump(exclude={"lora"} if self.lora is None else set())


def make_settings(settings: FinetuneSettings | None = None, **overrides) -> FinetuneSettings:
    """Settings from an object and/or keyword overrides, with one readable error for bad values."""
    values = (settings or FinetuneSettings()).model_dump(exclude_unset=True)    # defaults stay defaults
    values.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return FinetuneSettings(**values)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']} (got {e.get('input')!r})"
                             for e in exc.errors())
        raise ConfigError(f"fine-tuning settings: {problems}") from None


@dataclass
class FinetuneResult:
    path: Path
    cached: bool
    key: str
    record: dict


# --------------------------------------------------------------------------- cache
def cache_root(cache_dir: str | Path | None = None) -> Path:
    """``cache_dir``, else ``$LAYERMERGE_CACHE``, else ``.cache/layermerge`` in the working directory."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser().resolve()
    env = os.environ.get("LAYERMERGE_CACHE")
    return Path(env).expanduser().resolve() if env else (Path.cwd() / ".cache" / "layermerge").resolve()


def file_fingerprint(path: Path) -> str:
    """sha256 of a file's bytes (size and mtime for files above HASH_LIMIT, to keep huge bases quick)."""
    stat = path.stat()
    if stat.st_size > HASH_LIMIT:
        return f"size={stat.st_size},mtime={stat.st_mtime_ns}"
    return _sha256_cached(str(path), stat.st_size, stat.st_mtime_ns)


_HASHES: dict[tuple, str] = {}


def _sha256_cached(path: str, size: int, mtime_ns: int) -> str:
    key = (path, size, mtime_ns)
    if key not in _HASHES:
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            while block := handle.read(1 << 22):
                digest.update(block)
        _HASHES[key] = digest.hexdigest()
    return _HASHES[key]


def base_fingerprint(base: Path | VisionFactory) -> dict:
    if isinstance(base, VisionFactory):
        return {"vision": base.name, "weights": base.weights_id()}
    from layermerge.io.reader import CheckpointReader

    reader = CheckpointReader(base)
    return {p.name: file_fingerprint(p) for p in reader.weight_files}


def data_fingerprint(data: TaskData) -> str:
    origin = Path(data.origin)
    return file_fingerprint(origin) if origin.is_file() else data.origin


def cache_key(base: Path | VisionFactory, task: Task, settings: FinetuneSettings, data: TaskData) -> str:
    record = {"base": base_fingerprint(base), "task": task.name, "settings": settings.record(),
              "data": data_fingerprint(data), "layermerge": __version__}
    if not task.is_builtin:          # a user's spec (fields, labels...) changes the expert; built-ins keep their keys
        record["spec"] = task.model_dump(mode="json", exclude={"directory"})
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()


def read_marker(folder: Path) -> dict | None:
    try:
        return json.loads((folder / MARKER).read_text())
    except (OSError, json.JSONDecodeError):
        return None


# --------------------------------------------------------------------------- public entry point
def resolve_base(base: str | Path | VisionFactory) -> Path | VisionFactory:
    """A Hugging Face folder, or ``vision:<name>`` / a VisionFactory for a registered vision model."""
    if isinstance(base, VisionFactory):
        return base
    text = str(base)
    if text.startswith(VISION_PREFIX):
        return get_vision_factory(text[len(VISION_PREFIX):])
    path = Path(text).expanduser()
    if not path.is_dir():
        raise CheckpointError(f"base model folder not found: {path}. Give a Hugging Face model folder, or "
                              f"{VISION_PREFIX}<name> for a registered vision model")
    return path.resolve()


def finetune(base: str | Path | VisionFactory, task: str | Task, *, output: str | Path | None = None,
             cache_dir: str | Path | None = None, settings: FinetuneSettings | None = None,
             data_dir: str | Path | None = None, overwrite: bool = False, quiet: bool = False,
             **overrides) -> FinetuneResult:
    """Fine-tune ``base`` on ``task`` (or return the cached result). Keyword overrides set
    FinetuneSettings fields (``lr=3e-5, epochs=2``, ``lora={"r": 16}`` ...). Without ``output`` the folder
    goes to ``<cache>/experts/<task>-<base>-<key>``; with ``lora`` it is a PEFT adapter folder."""
    task = get_task(task)
    settings = make_settings(settings, **overrides)
    base = resolve_base(base)
    settings = fit_settings(base, settings, task)
    target, key, train = _locate(base, task, settings, cache_dir, data_dir, output)
    cached = _cached_result(target, key)
    if cached is not None:
        if not quiet:
            print(f"{task.name}: using cached expert {target}")
        return cached
    if target.exists() and not overwrite and output is not None:
        raise OutputError(f"{target} exists and was not produced by these settings; pass --overwrite to "
                          "replace it or choose another --output")
    if isinstance(base, Path) and target.is_relative_to(base):
        raise OutputError(f"output {target} is inside the base folder {base}; inputs are never modified")
    if isinstance(base, Path):       # a text base: its positions and tokenizer, checked before any work
        from layermerge.data.models import check_text_model, load_tokenizer

        check_text_model(base, load_tokenizer(base), settings.max_length, "max_length (--max-length)",
                         "Save the base's tokenizer into that folder (tokenizer.save_pretrained)")

    if settings.lora is not None:
        import_peft()                # before any work: the missing extra is one line, not a traceback
    data = train.take(settings.max_train_examples, settings.seed)
    started = time.perf_counter()
    temp = make_temp_sibling(target)
    try:
        if isinstance(base, VisionFactory):
            stats = _finetune_vision(base, task, data, settings, temp, quiet)
        elif task.is_generation:
            stats = _finetune_causal(base, task, data, settings, temp, quiet)
        else:
            stats = _finetune_text(base, task, data, settings, temp, quiet)
        base_label = str(base) if isinstance(base, Path) else f"{VISION_PREFIX}{base.name}"
        spec = {} if task.is_builtin else {"task_spec": task.record()}
        record = {"key": key, "task": task.name, **spec, "base": base_label, "settings": settings.record(),
                  "train_examples": len(data), "train_origin": train.origin,
                  "seconds": round(time.perf_counter() - started, 1),
                  "layermerge": __version__, **stats}
        (temp / MARKER).write_text(json.dumps(record, indent=2) + "\n")
        replace_folder(temp, target)
    except BaseException:
        discard_temp(temp)
        raise
    if not quiet:
        what = "LoRA adapter trained" if settings.lora is not None else "fine-tuned"
        print(f"{task.name}: {what} on {len(data)} examples in {record['seconds']:.0f} s -> {target}")
    return FinetuneResult(target, False, key, record)


def vision_base_folder(name: str, cache_dir: str | Path | None = None, image_size: int | None = None) -> Path:
    """The pretrained vision backbone saved as a folder (cached), to pass as the base of a merge."""
    factory = get_vision_factory(name)
    folder = cache_root(cache_dir) / "bases" / f"{factory.name}-{image_size or factory.image_size}"
    if not (folder / "model.safetensors").is_file():
        temp = make_temp_sibling(folder)
        try:
            save_vision_base(factory.name, temp, image_size)
            replace_folder(temp, folder)
        except BaseException:
            discard_temp(temp)
            raise
    return folder


def _locate(base: Path | VisionFactory, task: Task, settings: FinetuneSettings, cache_dir, data_dir,
            output=None) -> tuple[Path, str, TaskData]:
    """Where the expert for these inputs lives, its cache key, and the training split the key hashed."""
    if isinstance(base, VisionFactory) != task.is_image:
        kind = "a vision model" if task.is_image else "a Hugging Face text model"
        raise ConfigError(f"task {task.name!r} needs {kind} as base, got {base}")
    if settings.lora is not None and isinstance(base, VisionFactory):
        raise ConfigError(f"LoRA fine-tuning is for Hugging Face text models; {VISION_PREFIX}{base.name} trains "
                          "fully (leave lora unset)")
    if task.is_generation:
        from layermerge.eval.scorers import check_scorer

        check_scorer(task)
    train = load_split(task, "train", data_dir=data_dir)
    key = cache_key(base, task, settings, train)
    base_name = base.name if isinstance(base, VisionFactory) else base.name.replace(" ", "_")
    target = Path(output).expanduser().resolve() if output else \
        cache_root(cache_dir) / "experts" / f"{task.name}-{base_name}-{key[:12]}"
    return target, key, train


def find_cached_expert(base: str | Path | VisionFactory, task: str | Task, *, cache_dir: str | Path | None = None,
                       settings: FinetuneSettings | None = None, data_dir: str | Path | None = None,
                       ) -> FinetuneResult | None:
    """The expert ``finetune`` would return from its cache for these inputs, or None; trains and writes
    nothing (a dry run uses it to tell cached runs from runs still to make)."""
    task = get_task(task)
    base = resolve_base(base)
    target, key, _ = _locate(base, task, fit_settings(base, make_settings(settings), task), cache_dir, data_dir)
    return _cached_result(target, key)


def fit_settings(base: Path | VisionFactory, settings: FinetuneSettings, task: Task | None = None) -> FinetuneSettings:
    """The default max_length lowered to a short text model's positions (a chosen one is checked instead);
    generation tasks default to 512 tokens of prompt and completion."""
    if isinstance(base, VisionFactory) or "max_length" in settings.model_fields_set:
        return settings
    from layermerge.data.models import fitted_length, folder_config

    default = GENERATION_MAX_LENGTH if task is not None and task.is_generation else settings.max_length
    return settings.model_copy(update={"max_length": fitted_length(default, folder_config(base))})


def _cached_result(target: Path, key: str) -> FinetuneResult | None:
    """The finished expert in ``target`` if its marker carries ``key`` (written last, so it is complete)."""
    marker = read_marker(target) if target.is_dir() else None
    if marker is None or marker.get("key") != key:
        return None
    return FinetuneResult(target, True, key, marker)


# --------------------------------------------------------------------------- the model kinds
def _finetune_text(base: Path, task: Task, data: TaskData, settings: FinetuneSettings, out: Path,
                   quiet: bool) -> dict:
    from transformers import AutoModelForSequenceClassification

    from layermerge.data.models import load_tokenizer, quiet_transformers

    tokenizer = load_tokenizer(base)
    labels = dict(enumerate(task.label_names)) if task.label_names else {0: "score"}
    torch.manual_seed(settings.seed)     # the new head's initialisation
    try:
        with quiet_transformers():
            model, loading = AutoModelForSequenceClassification.from_pretrained(
                base, num_labels=task.model_num_labels, id2label=labels,
                label2id={v: k for k, v in labels.items()},
                problem_type="regression" if task.is_regression else "single_label_classification",
                ignore_mismatched_sizes=True, dtype=torch.float32, output_loading_info=True)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"cannot build a sequence classifier from {base}: {exc}") from None
    collator = TextCollator(tokenizer, task, settings.max_length)
    return _train_and_save(model, new_weights(loading), base, tokenizer, task, data, collator, settings, out, quiet)


def _finetune_causal(base: Path, task: Task, data: TaskData, settings: FinetuneSettings, out: Path,
                     quiet: bool) -> dict:
    """A causal language model trained on each example's completion tokens (the prompt is context only)."""
    from layermerge.data.models import load_hf_model, load_tokenizer

    tokenizer = load_tokenizer(base)
    torch.manual_seed(settings.seed)
    model, loading = load_hf_model(base, "AutoModelForCausalLM", "causal language model", dtype=torch.float32,
                                   output_loading_info=True)
    collator = GenerationCollator(tokenizer, task, settings.max_length, include_completion=True, with_labels=True)
    return _train_and_save(model, new_weights(loading), base, tokenizer, task, data, collator, settings, out, quiet)


def _train_and_save(model: nn.Module, new: list[str], base: Path, tokenizer, task: Task, data: TaskData,
                    collator, settings: FinetuneSettings, out: Path, quiet: bool) -> dict:
    """Train every weight (a model folder) or, with ``settings.lora``, a LoRA adapter of ``base``
    (an adapter folder); the tokenizer is saved beside either, as eval and merges expect."""
    from layermerge.data.models import quiet_transformers

    if settings.lora is not None:
        model = add_lora(model, new, base, task, settings.lora)
    stats = train_model(model, task, data, collator, settings, quiet)
    with quiet_transformers():
        if settings.lora is not None:    # the embedding is frozen: never save a copy of it
            model.save_pretrained(out, save_embedding_layers=False)
            stats["trainable_parameters"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
        else:
            model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return stats


def _finetune_vision(factory: VisionFactory, task: Task, data: TaskData, settings: FinetuneSettings,
                     out: Path, quiet: bool) -> dict:
    spec = spec_for(factory, task.num_labels, settings.image_size)
    torch.manual_seed(settings.seed)
    model = factory.build(spec.num_classes, spec.image_size, True)
    stats = train_model(model, task, data, image_collator_for(spec), settings, quiet)
    save_vision_model(model, spec, out)
    return stats


# --------------------------------------------------------------------------- LoRA
def import_peft():
    """peft, which LoRA fine-tuning needs; it is the optional ``lora`` extra."""
    try:
        import peft
    except ImportError:
        raise ConfigError(f"LoRA fine-tuning needs the peft package: {LORA_INSTALL_HINT}") from None
    return peft


def new_weights(loading: dict) -> list[str]:
    """The task model's weights that the base folder did not provide (a new head, a resized one): from
    transformers' ``output_loading_info``."""
    mismatched = [item[0] if isinstance(item, (tuple, list)) else item for item in loading.get("mismatched_keys", ())]
    return sorted(set(loading.get("missing_keys", ())) | set(mismatched))


def lora_targets(model: nn.Module, excluded: list[str]) -> list[str]:
    """The default targets: every Linear (or GPT-2 Conv1D) layer's path, except the output layer and
    the modules in ``excluded`` (new weights, trained in full instead)."""
    from transformers.pytorch_utils import Conv1D

    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    skip = tuple(f"{name}." for name in excluded)
    return sorted(name for name, module in model.named_modules()
                  if isinstance(module, (nn.Linear, Conv1D)) and module is not output
                  and name not in excluded and not f"{name}.".startswith(skip))


def add_lora(model: nn.Module, new: list[str], base: Path, task: Task, lora: LoraSettings) -> nn.Module:
    """``model`` wrapped by peft: frozen, LoRA pairs on the targets; weights the base lacks (``new``, a
    classifier head) train in full as ``modules_to_save``, which io/lora.py reads as new tensors."""
    peft = import_peft()
    if any("." not in name for name in new):
        loose = [name for name in new if "." not in name]
        raise ConfigError(f"LoRA fine-tuning of {base}: the task model has new weights outside any module "
                          f"({', '.join(loose)}), which a LoRA adapter cannot save; fine-tune fully (no lora)")
    heads = sorted({name.rsplit(".", 1)[0] for name in new})
    targets = list(lora.target_modules) if lora.target_modules else lora_targets(model, heads)
    if not targets:
        raise ConfigError(f"LoRA fine-tuning of {base}: the model has no Linear layer to put LoRA on; name the "
                          "modules with target_modules (--lora-targets)")
    config = peft.LoraConfig(
        task_type="CAUSAL_LM" if task.is_generation else "SEQ_CLS", r=lora.r, lora_alpha=lora.alpha,
        lora_dropout=lora.dropout, target_modules=targets, modules_to_save=heads or None,
        use_rslora=lora.use_rslora, bias="none")
    try:
        with warnings.catch_warnings():      # peft calls transformers APIs that transformers 5 deprecates
            warnings.simplefilter("ignore", FutureWarning)
            wrapped = peft.get_peft_model(model, config)
    except ValueError as exc:         # e.g. a named target that the model does not have
        raise ConfigError(f"LoRA fine-tuning of {base}: {str(exc).splitlines()[0]}") from None
    wrapped.peft_config["default"].base_model_name_or_path = str(base)   # the folder, as io/lora.py finds it
    return wrapped


# --------------------------------------------------------------------------- the training loop
def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices and kernels only; biases and norm scales (1-D) are not decayed."""
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (decay if param.ndim >= 2 else no_decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def warmup_linear(total_steps: int, warmup_steps: int):
    """lr multiplier: 0 → 1 over the warm-up, then linearly 1 → 0 at the last step."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))
    return factor


def task_loss(task: Task, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    if task.is_generation:           # next-token prediction on the completion's tokens only
        if not (labels[:, 1:] != IGNORE_INDEX).any():     # every completion cut off by max_length
            return logits.sum() * 0.0
        return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels[:, 1:].reshape(-1),
                               ignore_index=IGNORE_INDEX)
    if task.is_regression:
        return F.mse_loss(logits.reshape(len(labels), -1)[:, 0], labels.float())
    return F.cross_entropy(logits, labels)


def train_model(model: nn.Module, task: Task, data: TaskData, collator, settings: FinetuneSettings,
                quiet: bool = False) -> dict:
    """Train ``model``'s trainable parameters in place (every weight, or a LoRA adapter's); returns the mean
    loss of the first and last 10% of steps."""
    lengths = row_lengths(data)
    steps_per_epoch = math.ceil(len(data) / settings.batch_size)
    total = steps_per_epoch * settings.epochs
    optimizer = torch.optim.AdamW(parameter_groups(model, settings.weight_decay), lr=settings.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, warmup_linear(total, math.ceil(settings.warmup_ratio * total)))
    torch.manual_seed(settings.seed)     # dropout masks
    model.train()
    losses = []
    progress = progress_report(total=total, disable=quiet, desc=f"fine-tuning {task.name}", unit="step")
    for epoch in range(settings.epochs):
        order = length_grouped_batches(lengths, settings.batch_size, shuffle=True, seed=settings.seed + epoch)
        for indices in order:
            batch = collator([data[int(i)] for i in indices])
            loss = task_loss(task, forward_logits(model, batch), batch["labels"])
            if not torch.isfinite(loss):
                raise ConfigError(f"fine-tuning {task.name} diverged (loss {loss.item()}); lower lr (now "
                                  f"{settings.lr})")
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), settings.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
            progress.update(1)
            progress.set_postfix(loss=f"{loss.item():.3f}")
    progress.close()
    model.eval()
    tenth = max(1, len(losses) // 10)
    return {"steps": len(losses), "first_loss": sum(losses[:tenth]) / tenth,
            "last_loss": sum(losses[-tenth:]) / tenth}
