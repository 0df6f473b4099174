"""GGUF files (llama.cpp's format) as a base or an expert.

A ``.gguf`` file, or a folder holding exactly one, is read through transformers' GGUF support
(``AutoModelForCausalLM.from_pretrained(folder, gguf_file=name)``, every tensor dequantised to float32,
q/k projections un-permuted) with the config and tokenizer the file carries. That takes 15-75 s for a
real model, so it is done once: the model is saved as a plain Hugging Face folder (safetensors,
config.json, tokenizer files, generation config; transformers' quantisation flags cleared, tied
embeddings left tied as ``save_pretrained`` writes them) under
``<cache_root()>/gguf/<stem>-<first 16 hex digits of the file's sha256>``, written in a temporary
sibling and renamed into place (``io/atomic.py``), so an interrupted conversion leaves nothing behind.
A later open of the same bytes finds that folder and reads it in a second.

``GgufReader`` is a ``CheckpointReader`` over the cached folder (keys, shapes, lazy tensors, config,
tokenizer), but its ``path``, ``weight_files`` and ``file_hashes`` name the original ``.gguf`` file, so
the model card lists the GGUF file and its sha256, and the record names what the user gave.

The ``gguf`` package is optional (``pip install gguf``, or the ``gguf`` extra); it is needed only to
convert, not to open a file already converted.
"""

from __future__ import annotations

import functools
import json
import re
import sys
import warnings
from pathlib import Path

from layermerge.errors import CheckpointError, LayermergeWarning
from layermerge.io.atomic import discard_temp, make_temp_sibling, replace_folder
from layermerge.io.paths import broken_link_reason, missing_path_message
from layermerge.io.reader import (
    BIN_INDEX,
    BIN_SINGLE,
    SAFETENSORS_INDEX,
    SAFETENSORS_SINGLE,
    CheckpointReader,
    sha256_of_file,
)

GGUF_MAGIC = b"GGUF"
GGUF_SUFFIX = ".gguf"
GGUF_MIN_VERSION = "0.10.0"         # what transformers' GGUF loader asks for (utils/import_utils.py)
CACHE_FOLDER = "gguf"               # under cache_root()
MARKER = "layermerge_gguf.json"     # written last into a finished conversion
HASH_DIGITS = 16
WEIGHT_NAMES = (SAFETENSORS_SINGLE, SAFETENSORS_INDEX, BIN_SINGLE, BIN_INDEX)
INSTALL_HINT = "pip install gguf (or pip install 'layermerge[gguf]')"


# ----------------------------------------------------------------------------- detection
def _gguf_files(folder: Path) -> list[Path]:
    try:
        return sorted(p for p in folder.iterdir() if p.suffix.lower() == GGUF_SUFFIX and p.is_file())
    except OSError:
        return []


def has_gguf_magic(path: Path) -> bool:
    """Whether ``path`` starts with the four bytes every GGUF file starts with."""
    try:
        with open(path, "rb") as handle:
            return handle.read(4) == GGUF_MAGIC
    except OSError:
        return False


def is_gguf(path: Path) -> bool:
    """A path ending in ``.gguf`` (even a missing one: the reader says it is missing), a file starting with
    the GGUF magic bytes, or a folder with no Hugging Face weights file but with a ``.gguf`` file."""
    path = Path(path)
    try:
        if path.is_dir():
            if any((path / name).exists() for name in WEIGHT_NAMES) or any(path.glob("*.safetensors")):
                return False
            return bool(_gguf_files(path))
        if path.suffix.lower() == GGUF_SUFFIX:
            return True
        return path.is_file() and has_gguf_magic(path)
    except OSError:
        return False


def find_gguf_file(path: Path, role: str | None = None) -> Path:
    """The one GGUF file ``path`` names (a file, or a folder holding exactly one); CheckpointError otherwise."""
    what = role or "model"
    given = Path(path).expanduser()
    if broken_link_reason(given) is not None or not given.exists():
        raise CheckpointError(missing_path_message(what, given.absolute()))
    given = given.resolve()
    if given.is_dir():
        found = _gguf_files(given)
        if not found:
            raise CheckpointError(f"{what}: folder {given} holds no .gguf file")
        if len(found) > 1:
            names = ", ".join(p.name for p in found)
            raise CheckpointError(f"{what}: folder {given} holds {len(found)} GGUF files ({names}); pass one file, "
                                  f"e.g. {given / found[0].name}")
        given = found[0]
    try:
        with open(given, "rb") as handle:
            head = handle.read(4)
    except OSError as exc:
        raise CheckpointError(f"{what}: cannot read {given}: {exc.strerror or exc}") from None
    if head != GGUF_MAGIC:
        raise CheckpointError(f"{what}: {given} is not a GGUF file (it starts with {head!r}, not the GGUF magic "
                              "bytes b'GGUF'); it is corrupt, truncated or of another format")
    return given


# ----------------------------------------------------------------------------- the cache
@functools.lru_cache(maxsize=64)
def _sha256_cached(path: str, size: int, mtime_ns: int) -> str:
    return sha256_of_file(Path(path))


def gguf_sha256(path: Path) -> str:
    """sha256 of a GGUF file, hashed once per process while its size and mtime stay the same."""
    stat = path.stat()
    return _sha256_cached(str(path), stat.st_size, stat.st_mtime_ns)


def cached_folder_for(gguf_file: Path, digest: str, cache_dir: str | Path | None = None) -> Path:
    """``<cache_root()>/gguf/<stem>-<sha256, 16 hex>``: named by the file's bytes, so an edited file converts anew."""
    from layermerge.finetune import cache_root

    stem = re.sub(r"[^A-Za-z0-9._+-]", "_", gguf_file.stem)[:100] or "model"
    return cache_root(cache_dir) / CACHE_FOLDER / f"{stem}-{digest[:HASH_DIGITS]}"


def is_converted(folder: Path) -> bool:
    return (folder / MARKER).is_file() and (folder / "config.json").is_file()


def _require_gguf_package(gguf_file: Path, what: str) -> None:
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise CheckpointError(f"{what}: reading the GGUF file {gguf_file} needs the gguf package: "
                              f"{INSTALL_HINT}") from None
    from importlib.metadata import PackageNotFoundError, version

    try:
        installed = version("gguf")
    except PackageNotFoundError:
        return
    if _version_tuple(installed) < _version_tuple(GGUF_MIN_VERSION):
        raise CheckpointError(f"{what}: reading the GGUF file {gguf_file} needs gguf>={GGUF_MIN_VERSION}, "
                              f"{installed} is installed: pip install -U gguf")


def _version_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", text)[:3])


def describe_gguf(gguf_file: Path) -> tuple[str | None, list[str]]:
    """(architecture, tensor types such as ['F32', 'Q4_1']) from the file's metadata; (None, []) if unreadable."""
    facts = gguf_facts(gguf_file)
    return facts.get("architecture"), facts.get("types", [])


def gguf_facts(gguf_file: Path) -> dict:
    """``architecture``, ``types`` (tensor types) and ``split_count`` from the file's header; {} if unreadable."""
    try:
        from gguf import GGUFReader

        reader = GGUFReader(str(gguf_file))
        facts: dict = {"types": sorted({getattr(t.tensor_type, "name", str(t.tensor_type)) for t in reader.tensors})}
        field = reader.fields.get("general.architecture")
        if field is not None:
            facts["architecture"] = bytes(field.parts[field.data[0]]).decode("utf-8", "replace")
        field = reader.fields.get("split.count")
        if field is not None:
            facts["split_count"] = int(field.parts[field.data[0]][0])
        return facts
    except Exception:  # noqa: BLE001 - facts for a message; the caller reports the real failure
        return {}


def _supported_architectures() -> set[str]:
    supported: set[str] = set()
    try:
        from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

        supported.update(GGUF_SUPPORTED_ARCHITECTURES)
    except Exception:  # noqa: BLE001 - layouts differ between transformers versions
        pass
    try:
        from transformers.integrations.gguf import GGUF_ARCHS

        supported.update(GGUF_ARCHS)
    except Exception:  # noqa: BLE001
        pass
    return supported


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    text = text if len(text) <= 300 else text[:297] + "..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def unsupported_architecture(gguf_file: Path) -> str | None:
    """The file's architecture when transformers is known not to read it from GGUF, else None."""
    architecture, _ = describe_gguf(gguf_file)
    supported = _supported_architectures()
    return architecture if architecture is not None and supported and architecture not in supported else None


def conversion_error(gguf_file: Path, what: str, exc: BaseException | None) -> CheckpointError:
    """One line: transformers could not read this GGUF file; its architecture and tensor types, the cause."""
    architecture, types = describe_gguf(gguf_file)
    facts = []
    if architecture is not None:
        facts.append(f"architecture {architecture!r}")
    if types:
        facts.append("tensor types " + ", ".join(types))
    about = f" ({'; '.join(facts)})" if facts else ""
    supported = _supported_architectures()
    if architecture is not None and supported and architecture not in supported:
        reason = (f"transformers cannot read the architecture {architecture!r} from GGUF files; it reads "
                  f"{', '.join(sorted(supported))}")
    else:
        reason = f"transformers cannot load it: {_one_line(exc) if exc is not None else 'unknown cause'}"
    return CheckpointError(f"{what}: cannot read the GGUF file {gguf_file}{about}: {reason}; convert it to a "
                           "Hugging Face folder with a tool that knows this model, or use a supported "
                           "quantisation (F32, F16, BF16, Q8_0, Q4_K...)")


def _dequantising_kwargs() -> dict:
    """Ask transformers for a plain float32 model; newer versions would otherwise keep weights packed."""
    import inspect

    import torch

    kwargs: dict = {"dtype": torch.float32}
    try:
        from transformers import GgufConfig
    except ImportError:
        return kwargs
    if "dequantize" in inspect.signature(GgufConfig).parameters:
        kwargs["quantization_config"] = GgufConfig(dequantize=True)
    return kwargs


def _clear_quantisation(model) -> None:
    """transformers flags a model loaded from GGUF as quantised, and save_pretrained refuses it; the weights
    are plain float32 tensors by now, so the flags go (as ``HfQuantizer.remove_quantization_config`` does)."""
    quantizer = getattr(model, "hf_quantizer", None)
    remove = getattr(quantizer, "remove_quantization_config", None)
    if callable(remove):
        remove(model)
    for name in ("hf_quantizer", "quantization_method", "_weight_conversions"):
        if hasattr(model, name):
            try:
                delattr(model, name)
            except AttributeError:
                setattr(model, name, None)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    try:
        model.is_quantized = False
    except AttributeError:  # a read-only property in some versions: it follows hf_quantizer
        pass


def convert_gguf(gguf_file: Path, target: Path, what: str = "model") -> dict:
    """Write ``gguf_file`` as a Hugging Face folder into ``target`` (which exists and is empty);
    returns what the marker file records."""
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from layermerge.data.models import quiet_transformers

    folder, name = str(gguf_file.parent), gguf_file.name
    try:
        with quiet_transformers():
            model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, **_dequantising_kwargs())
    except (KeyboardInterrupt, SystemExit, MemoryError):
        raise
    except Exception as exc:  # transformers and gguf raise ValueError, KeyError, NotImplementedError...
        raise conversion_error(gguf_file, what, exc) from exc
    _clear_quantisation(model)
    with quiet_transformers():
        model.save_pretrained(target)
    if not (target / "generation_config.json").is_file() and getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(target)
    del model
    tokenizer_note = None
    try:
        with quiet_transformers():
            AutoTokenizer.from_pretrained(folder, gguf_file=name).save_pretrained(target)
    except (KeyboardInterrupt, SystemExit, MemoryError):
        raise
    except Exception as exc:  # noqa: BLE001 - merging the weights needs no tokenizer; say so and go on
        tokenizer_note = _one_line(exc)
    try:
        from importlib.metadata import version

        gguf_version = version("gguf")
    except Exception:  # noqa: BLE001
        gguf_version = None
    return {"source": gguf_file.name, "transformers": transformers.__version__, "gguf": gguf_version,
            "dtype": "float32", "tokenizer": tokenizer_note is None, "tokenizer_error": tokenizer_note}


def ensure_converted(gguf_file: Path, digest: str, what: str = "model", cache_dir: str | Path | None = None,
                     quiet: bool = False) -> Path:
    """The cached Hugging Face folder of ``gguf_file`` (sha256 ``digest``), converting it first if needed."""
    target = cached_folder_for(gguf_file, digest, cache_dir)
    if is_converted(target):
        return target
    _require_gguf_package(gguf_file, what)
    if gguf_facts(gguf_file).get("split_count", 1) > 1:
        raise CheckpointError(f"{what}: {gguf_file} is one part of a split GGUF, and transformers reads whole "
                              "files only; join the parts first (llama.cpp: llama-gguf-split --merge FIRST-PART "
                              "OUT.gguf) and pass the joined file")
    if unsupported_architecture(gguf_file) is not None:    # fail before the long load
        raise conversion_error(gguf_file, what, None)
    if not quiet:
        print(f"layermerge: converting {gguf_file.name} ({what}) into a Hugging Face folder, once: {target}",
              file=sys.stderr, flush=True)
    temp = make_temp_sibling(target)
    try:
        record = convert_gguf(gguf_file, temp, what)
        record["sha256"] = digest
        (temp / MARKER).write_text(json.dumps(record, indent=2) + "\n")
        if is_converted(target):          # another process finished the same conversion meanwhile
            discard_temp(temp)
        else:
            replace_folder(temp, target)
    except BaseException:
        discard_temp(temp)
        raise
    return target


def conversion_record(folder: Path) -> dict:
    try:
        return json.loads((folder / MARKER).read_text())
    except (OSError, ValueError):
        return {}


# ----------------------------------------------------------------------------- the reader
class _NoHash:
    """The cached safetensors are not what the model card names, so reads feed no digest."""

    def observe(self, key, tensor) -> None:
        return None


class GgufReader(CheckpointReader):
    """A GGUF file, read through its cached Hugging Face conversion (see the module docstring)."""

    def __init__(self, path: str | Path, role: str | None = None, cache_dir: str | Path | None = None):
        what = role or "model"
        gguf_file = find_gguf_file(Path(path), role)
        self.gguf_file = gguf_file
        self.sha256 = gguf_sha256(gguf_file)
        self.cached_folder = ensure_converted(gguf_file, self.sha256, what, cache_dir)
        super().__init__(self.cached_folder, role)
        self.path = gguf_file           # what the user gave: the record, the card, duplicate checks
        self.folder = self.cached_folder  # config.json, tokenizer, generation config, task models
        self.conversion = conversion_record(self.cached_folder)
        if self.conversion.get("tokenizer") is False:
            warnings.warn(f"{what}: the tokenizer stored in {gguf_file.name} could not be rebuilt "
                          f"({self.conversion.get('tokenizer_error')}), so its converted folder {self.cached_folder} "
                          "has none; data-driven methods need data.tokenizer", LayermergeWarning, stacklevel=2)

    def _hasher(self, file_path: Path):
        return _NoHash()

    @property
    def weight_files(self) -> list[Path]:
        return [self.gguf_file]

    def file_hashes(self) -> dict[str, str]:
        return {str(self.gguf_file): self.sha256}

    def __repr__(self) -> str:
        return f"GgufReader({str(self.gguf_file)!r} via {str(self.cached_folder)!r}, {len(self)} tensors)"
