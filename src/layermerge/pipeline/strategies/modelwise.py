"""Whole-model methods (``kind="model"``): Fisher, AdaMerging, Localize-and-Stitch, NeuLig, NP Merge.

Fisher merging needs gradients of the expert's own predictions, AdaMerging the entropy of each task
head's output, Localize-and-Stitch a labelled loss, NeuLig a router over the experts' features and
NP Merge a merged classifier: none of these is local to one block, so they cannot stream through
the block engine. They get a ``ModelContext`` instead: the few-shot batches (with labels), the base
and expert backbones as tensors, and every expert's full task model, through which any backbone can
be run differentiably (``torch.func.functional_call``). Memory is therefore the experts' full models
plus what the method keeps, not one block — the methods' docs say so.

A method registers with ``kind="model"`` and implements ``merge_models(ctx) -> ModelMergeResult``; the
output has the layout of every other merge plus ``<method>/artifacts.safetensors`` and
``task_extras/<task>/`` when the method returns per-task weights (these replace the shared weights
when that task's model is loaded).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from torch import nn

from layermerge.engine.layouts import FusedLayout, fused_layouts
from layermerge.engine.template import checkpoint_key_map, transformers_names
from layermerge.errors import CheckpointError, ConfigError, DataError
from layermerge.experts import ExpertSet, detect_prefix
from layermerge.methods.base import ModelMergeResult
from layermerge.norm_stats import experts_mean_statistics
from layermerge.pipeline.strategies.base import Outcome, Strategy
from layermerge.progress import progress

TASK_EXTRAS_REPLACE = "replace"      # layermerge_summary.json "task_extras" value: per-task tensors replace


def load_expert_model(folder: Path | None, name: str, reader=None) -> nn.Module:
    """An expert's full task model (backbone + head) from its folder: layermerge vision model or a
    transformers sequence classifier. An input whose folder holds no model of its own (a LoRA adapter:
    ``reader`` forms its tensors) is built from the reader's config and tensors."""
    from layermerge.data.models import load_hf_model, load_vision_model, vision_spec_of

    if reader is not None and reader.config is not None and (folder is None or not (folder / "config.json").is_file()):
        return model_from_reader(reader, name)
    if folder is None:
        raise CheckpointError(f"expert '{name}' is a bare state dict; this method runs each expert's whole task "
                              "model, so give a model folder (config.json naming its architecture, as "
                              "save_pretrained writes, or a layermerge vision model)")
    if vision_spec_of(folder) is not None:
        model, _ = load_vision_model(folder)
        return model.eval()
    architecture = _architecture(folder)
    if architecture is None:
        return load_hf_model(folder, "AutoModelForSequenceClassification", "sequence classifier").eval()
    import transformers

    from layermerge.data.models import quiet_transformers

    with quiet_transformers():
        return getattr(transformers, architecture).from_pretrained(folder).eval()


def model_from_reader(reader, name: str) -> nn.Module:
    """The expert's task model, its class named by ``architectures`` in the reader's config."""
    import transformers

    from layermerge.data.models import quiet_transformers

    config = dict(reader.config)
    architecture = (config.get("architectures") or [None])[0]
    if architecture is None or not hasattr(transformers, architecture):
        raise CheckpointError(f"expert '{name}' ({reader.path}): its config names no transformers architecture, so "
                              "its whole task model cannot be built for this method; merge the adapter into its "
                              "base (peft's merge_and_unload) and give that folder")
    hf_config = transformers.AutoConfig.for_model(**config)
    with quiet_transformers():
        return getattr(transformers, architecture).from_pretrained(None, config=hf_config,
                                                                   state_dict=reader.state_dict()).eval()


def _architecture(folder: Path) -> str | None:
    """The transformers class an expert was saved as (``architectures`` in its config), if known."""
    import json

    import transformers

    try:
        names = json.loads((folder / "config.json").read_text()).get("architectures") or []
    except (OSError, ValueError):
        return None
    return names[0] if names and hasattr(transformers, names[0]) else None


class ModelContext:
    """What a ``kind="model"`` method sees; see the module docstring and docs/DATA_DRIVEN.md."""

    def __init__(self, expert_set: ExpertSet, batches: Mapping[str, list[dict]], device: torch.device,
                 seed: int = 0, quiet: bool = False):
        self.expert_set = expert_set
        self.tasks = list(expert_set.names)
        self.merge_keys = list(expert_set.report.merge_keys)
        self._merge_key_set = set(self.merge_keys)
        self.device = device
        self.generator = torch.Generator().manual_seed(seed)
        self.quiet = quiet
        self._batches = {task: [_to_device(b, device) for b in batches[task]] for task in self.tasks}
        self._models: dict[str, nn.Module] = {}
        self._names: dict[str, dict[str, str]] = {}
        # Per task: module tensors transformers fused from several merge keys (MoE experts), by module name.
        self._fused: dict[str, dict[str, FusedLayout]] = {}

    # ----------------------------------------------------------------- data and weights
    def batches(self, task: str) -> list[dict[str, torch.Tensor]]:
        """The few-shot batches of expert ``task``: model inputs plus ``labels`` when the data has them."""
        if task not in self._batches:
            raise KeyError(f"no data for '{task}'; experts are {self.tasks}")
        return self._batches[task]

    def base_state(self) -> dict[str, torch.Tensor]:
        """Merge key → the base's fp32 tensor (zeros for a merge without a base)."""
        return {key: self.expert_set.base_tensor(key).to(self.device, torch.float32) for key in self.merge_keys}

    def expert_state(self, task: str) -> dict[str, torch.Tensor]:
        """Merge key → expert ``task``'s fp32 tensor."""
        expert = self.expert_set.expert(task)
        rows = self._vocab_rows()
        state = {}
        for key in self.merge_keys:
            tensor = expert.get(key)
            if key in rows:
                tensor = tensor[:rows[key]]
            state[key] = tensor.to(self.device, torch.float32)
        return state

    def _vocab_rows(self) -> dict[str, int]:
        reference, prefix = self.expert_set.reference, self.expert_set.reference_prefix
        return {key: reference.shape(prefix + key)[0] for key in self.expert_set.report.vocab_keys}

    # ----------------------------------------------------------------- models
    def task_model(self, task: str) -> nn.Module:
        """Expert ``task``'s full model (backbone and its head), fp32, eval mode, frozen, cached."""
        if task not in self._models:
            expert = self.expert_set.expert(task)
            model = load_expert_model(expert.reader.folder, task, expert.reader).to(self.device, torch.float32)
            for param in model.parameters():
                param.requires_grad_(False)
            self._models[task] = model
            self._names[task] = self._parameter_names(model, expert.prefix, task)
        return self._models[task]

    def parameter_keys(self, task: str) -> list[str]:
        """The merge keys that are trainable parameters of ``task_model(task)`` (not buffers such as
        BatchNorm statistics, which take no gradient), pieces of fused module tensors included."""
        model = self.task_model(task)
        parameters = {name for name, _ in model.named_parameters(remove_duplicate=False)}
        keys = [key for key, name in self._names[task].items() if name in parameters]
        keys += [piece.key for name, layout in self._fused[task].items() if name in parameters
                 for piece in layout.pieces]
        return keys

    def release(self, task: str) -> None:
        """Drop ``task``'s cached model (a method that visits experts one at a time keeps one in memory)."""
        self._models.pop(task, None)

    def parameter_names(self, task: str) -> dict[str, str]:
        """Merge key → the name of that tensor in ``task_model(task)``'s own state dict."""
        self.task_model(task)
        return dict(self._names[task])

    def _parameter_names(self, model: nn.Module, prefix: str, task: str) -> dict[str, str]:
        """Merge key → the task model's own state-dict name (transformers may rename keys on load)."""
        wanted = [prefix + key for key in self.merge_keys]
        by_checkpoint = {ckpt: name for name, ckpt in checkpoint_key_map(model, wanted).items()}
        names = {key: by_checkpoint[prefix + key] for key in self.merge_keys if prefix + key in by_checkpoint}
        # Integer buffers an older checkpoint stores but the model no longer registers (position_ids)
        # need no swapping: they are not learned and are saved as the base has them.
        reference, ref_prefix = self.expert_set.reference, self.expert_set.reference_prefix
        self._fused[task] = self._fused_layouts(model, prefix, set(names.values()))
        fused = {piece.key for layout in self._fused[task].values() for piece in layout.pieces}
        missing = [key for key in self.merge_keys
                   if key not in names and key not in fused and reference.dtype(ref_prefix + key).is_floating_point]
        if missing:
            raise CheckpointError(f"expert '{task}': its task model has no parameter for backbone keys "
                                  f"{missing[:5]} (prefix '{prefix}'); is its config the base's architecture?")
        return names

    def _fused_layouts(self, model: nn.Module, prefix: str, named: set[str]) -> dict[str, FusedLayout]:
        """Module tensors built from several merge keys, with pieces named by merge key (prefix removed)."""
        reference, ref_prefix = self.expert_set.reference, self.expert_set.reference_prefix
        available = self._merge_key_set

        def shape(key: str):
            key = key[len(prefix):] if prefix and key.startswith(prefix) else key
            return tuple(reference.shape(ref_prefix + key)) if key in available else None

        candidates = [name for name in model.state_dict() if name not in named]
        found = fused_layouts(model, candidates, shape, checkpoint_prefix=detect_prefix(
            set(transformers_names(model).values()), [prefix + key for key in self.merge_keys]))
        return {name: FusedLayout(layout.shape, tuple(
                    type(piece)(piece.key[len(prefix):] if prefix and piece.key.startswith(prefix) else piece.key,
                                piece.shape, piece.index) for piece in layout.pieces))
                for name, layout in found.items()}

    def _call(self, task: str, backbone: Mapping[str, torch.Tensor], batch: Mapping[str, torch.Tensor],
              capture_head_input: bool = False) -> torch.Tensor:
        from layermerge.data.models import forward_logits

        model = self.task_model(task)
        names = self._names[task]
        unknown = [key for key in backbone if key not in names and key not in self._merge_key_set]
        if unknown:
            raise KeyError(f"backbone keys {unknown[:5]} are not merge keys of this expert set")
        overrides = {names[key]: tensor for key, tensor in backbone.items() if key in names}
        overrides.update(fused_overrides(model, self._fused[task], backbone))
        captured: list[torch.Tensor] = []
        handle = None
        if capture_head_input:
            classifier = final_linear(model)
            handle = classifier.register_forward_pre_hook(lambda module, args: captured.append(args[0]))
        try:
            with _swapped(model, overrides):
                logits = forward_logits(model, dict(batch))
        finally:
            if handle is not None:
                handle.remove()
        if capture_head_input:
            return captured[-1]
        return logits

    def logits(self, task: str, backbone: Mapping[str, torch.Tensor],
               batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Task ``task``'s logits with the backbone weights in ``backbone`` (any subset of the merge
        keys; the rest stay the expert's), differentiable in them."""
        return self._call(task, backbone, batch)

    def features(self, task: str, backbone: Mapping[str, torch.Tensor],
                 batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The representation the task's head classifies: the input of its final ``nn.Linear``."""
        return self._call(task, backbone, batch, capture_head_input=True)

    def progress(self, iterable: Iterable, desc: str, total: int | None = None):
        return progress(iterable, desc=desc, total=total, disable=self.quiet, leave=False)


def fused_overrides(model: nn.Module, layouts: Mapping[str, FusedLayout],
                    backbone: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Module tensors assembled (differentiably) from the merge keys in ``backbone`` that are pieces of
    fused tensors; pieces ``backbone`` lacks keep the model's own values."""
    overrides = {}
    state = None
    for name, layout in layouts.items():
        given = [piece for piece in layout.pieces if piece.key in backbone]
        if not given:
            continue
        if state is None:
            state = model.state_dict(keep_vars=True)
        flat = state[name].detach().reshape(-1)
        for piece in given:
            flat = flat.index_put((piece.index.to(flat.device),), backbone[piece.key].reshape(-1).to(flat.dtype))
        overrides[name] = flat.reshape(layout.shape)
    return overrides


def final_linear(model: nn.Module) -> nn.Linear:
    """The last ``nn.Linear`` registered in ``model``: the classifier of every head layermerge builds."""
    linears = [module for module in model.modules() if isinstance(module, nn.Linear)]
    if not linears:
        raise ConfigError(f"{type(model).__name__} has no nn.Linear classifier, so its features are undefined")
    return linears[-1]


class _swapped:
    """Run a module with some parameters/buffers replaced (differentiably) via functional_call semantics.

    ``torch.func.functional_call`` needs the call itself; models with custom ``forward`` argument
    handling (``forward_logits``) are simpler to call normally, so the replacement is done through
    ``torch.nn.utils.stateless``'s reparametrisation context, which is what functional_call uses.
    Tied weights follow: replacing the token embedding of a model whose output head shares it replaces
    the head's too (``tie_weights``), as loading the merged checkpoint would.
    """

    def __init__(self, model: nn.Module, overrides: dict[str, torch.Tensor]):
        self.model, self.overrides = model, overrides

    def __enter__(self):
        from torch.nn.utils.stateless import _reparametrize_module

        self._context = _reparametrize_module(self.model, self.overrides, tie_weights=True)
        self._context.__enter__()
        return self.model

    def __exit__(self, *exc):
        return self._context.__exit__(*exc)


def _to_device(batch: Mapping, device: torch.device) -> dict:
    if not isinstance(batch, Mapping):
        raise DataError(f"each few-shot batch must be a dict of tensors, got {type(batch).__name__}")
    return {key: value.to(device) if isinstance(value, torch.Tensor) else value for key, value in batch.items()}


# --------------------------------------------------------------------- the entry point
def few_shot_with_labels(data, expert_set: ExpertSet) -> dict[str, list[dict]]:
    """{expert: [batch...]} from a ``data:`` section or hand-built batches, keeping ``labels``."""
    from layermerge.fewshot import few_shot_inputs

    batches = dict(few_shot_inputs(data, expert_set))
    missing = [name for name in expert_set.names if not batches.get(name)]
    if missing:
        raise DataError(f"no few-shot batches for experts {missing}; data must cover every expert "
                        f"({expert_set.names})")
    return {name: [b] if isinstance(b, Mapping) else list(b) for name, b in batches.items()
            if name in expert_set.names}


class ModelStrategy(Strategy):
    def prepare(self) -> None:
        from layermerge.distributed import resolve_device

        self.batches = few_shot_with_labels(self.plan.data, self.expert_set)
        self.device = resolve_device(self.plan.engine.device)

    def run(self, writer) -> Outcome:
        from layermerge.fewshot import data_record, describe, task_records

        plan, expert_set, engine = self.plan, self.expert_set, self.plan.engine
        torch.manual_seed(engine.seed)
        ctx = ModelContext(expert_set, self.batches, self.device, seed=engine.seed, quiet=plan.quiet)
        algorithm = plan.method.cls(plan.params, expert_set.names)
        started = time.perf_counter()
        result = algorithm.merge_models(ctx)
        missing = [key for key in expert_set.report.merge_keys if key not in result.params]
        if missing:
            raise RuntimeError(f"method {plan.name!r} returned no merged tensor for {missing[:5]}")
        if not getattr(algorithm, "merges_running_statistics", False):
            result.params.update(experts_mean_statistics(ctx, result.params))   # see layermerge.norm_stats
        summary = {**result.stats, "seconds": round(time.perf_counter() - started, 3),
                   "data": describe(self.batches), "task_specs": task_records(plan.data, expert_set.names)}
        if result.task_params:
            summary["task_extras"] = TASK_EXTRAS_REPLACE
        reference, ref_prefix, out_dtype = expert_set.reference, expert_set.reference_prefix, plan.dtype

        def cast(key: str, tensor: torch.Tensor) -> torch.Tensor:
            return tensor.detach().to("cpu", out_dtype or reference.dtype(ref_prefix + key)).contiguous()

        for key in expert_set.report.merge_keys:
            writer.add_tensor(key, cast(key, result.params[key]))
        artifacts = {k: v.detach().cpu().contiguous() for k, v in result.artifacts.items()}
        if artifacts:
            writer.write_state_dict(plan.name, artifacts, prefix="artifacts")
        for task, tensors in result.task_params.items():
            if tensors:
                writer.write_state_dict(f"task_extras/{task}", {key: cast(key, t) for key, t in tensors.items()})
        engine_record = {"device": engine.device, "seed": engine.seed}
        return Outcome(summary, {"data": data_record(plan.data, self.batches), "engine": engine_record})


__all__ = ["ModelContext", "ModelMergeResult", "ModelStrategy", "final_linear", "load_expert_model"]
