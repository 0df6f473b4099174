"""The reliability corpus (issue 13, section 3): bad inputs through the CLI and the Python API.

Every row of ``CASES`` builds its inputs (in the test's tmp_path, or by naming the module's shared tiny
models), runs one command, and asserts what every user error must give:

* exit status 2 (through the API: a ``LayermergeError`` subclass);
* stderr ends with exactly one line ``layermerge: error: ...`` holding the expected words (compared
  case-insensitively, with the test's folders shown as ``<tmp>`` and ``<shared>``); the only lines allowed
  before it are ``layermerge: warning: ...`` lines (a warning about one input may precede an error about
  another). stdout is not checked: ``inspect`` prints its report before a late error;
* no "Traceback" in stdout or stderr;
* the inputs untouched and nothing left behind: every path under tmp_path and under the shared inputs is
  listed, with each file's sha256, before and after the command, and the lists must be equal (so no
  output folder, no ``.*.tmp-*`` sibling, no ``*.checkpoint`` folder, no file written anywhere else).

Merges run with ``--quiet`` so that a case's stderr is its error line alone. Most rows run in-process
(``layermerge.cli.main``); the ``process`` rows run ``python -m layermerge`` to show that no traceback
escapes the real entry point, and the ``api`` rows call ``layermerge.merge`` directly.
Argument-syntax errors (a missing positional, an unknown flag, a value of the wrong type) are
argparse's; the CLI's parser reports them as one line too, so they are rows like the others.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import resource
import shutil
import signal
import struct
import subprocess
import sys
import typing
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml
from conftest import build_family
from safetensors.torch import load_file, save_file
from tinytext import VOCAB, build_text_setup, write_tiny_glue

import layermerge
from layermerge.cli import main
from layermerge.errors import LayermergeError
from layermerge.methods.registry import available_methods

pytestmark = pytest.mark.usefixtures("one_torch_thread")

DROP = object()               # a config value that removes its key
POSITIONS = 64                # the tiny BERT's max_position_embeddings (tests/conftest.py)
TEXT_FILES = ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


# --------------------------------------------------------------------------- shared tiny inputs
@dataclass
class Shared:
    """Inputs every case may name but must never change: a tiny BERT family and a text setup."""

    root: Path
    base: Path                   # BertModel, no tokenizer
    experts: dict[str, Path]     # task0 (2 labels), task1 (3 labels)
    text_base: Path              # BertModel with a character-level tokenizer
    text_experts: dict[str, Path]  # sst2, rte
    data_dir: Path               # glue/{sst2,rte}/{train,test}.jsonl


@pytest.fixture(scope="module")
def shared(tmp_path_factory) -> Shared:
    root = tmp_path_factory.mktemp("shared").resolve()
    base, experts = build_family(root, "bert", n_experts=2)
    text_base, text_experts, data_dir = build_text_setup(root / "text")
    return Shared(root, base, experts, text_base, text_experts, data_dir)


# --------------------------------------------------------------------------- what a case builds with
class Env:
    """The folders of one case: ``in/`` for the inputs it makes, ``out`` where outputs are asked for."""

    def __init__(self, root: Path, shared: Shared):
        self.root = root
        self.shared = shared
        self.inputs = root / "in"
        self.inputs.mkdir(exist_ok=True)
        self.out = root / "out"

    # configs --------------------------------------------------------------
    def df(self, **changes) -> dict:
        """A valid data-free config (task_arithmetic on the shared BERT experts) with top-level changes."""
        config = {"base": str(self.shared.base), "experts": {k: str(v) for k, v in self.shared.experts.items()},
                  "method": "task_arithmetic"}
        return apply(config, changes)

    def dd(self, data: dict | None = None, engine: dict | None = None, **changes) -> dict:
        """A valid ProDistill config on the text setup; ``data``/``engine`` change keys of those sections."""
        config = {"base": str(self.shared.text_base),
                  "experts": {k: str(v) for k, v in self.shared.text_experts.items()},
                  "method": "prodistill", "params": {"epochs": 1, "batch_size": 4, "lr": 0.05},
                  "data": {"shots": 4, "max_length": 16, "batch_size": 2, "data_dir": str(self.shared.data_dir)},
                  "engine": {"device": "cpu"}}
        config["data"] = apply(config["data"], data or {})
        config["engine"] = apply(config["engine"], engine or {})
        return apply(config, changes)

    def write(self, config, name: str = "merge.yaml") -> str:
        path = self.inputs / name
        if isinstance(config, bytes):
            path.write_bytes(config)
        elif isinstance(config, str):
            path.write_text(config)
        else:
            path.write_text(yaml.safe_dump(config, sort_keys=False))
        return str(path)

    def merge(self, config, *flags: str, out: str | Path | None = None) -> list[str]:
        path = config if isinstance(config, str) else self.write(config)
        return ["merge", path, "--output", str(out if out is not None else self.out), "--quiet", *flags]

    # inputs ----------------------------------------------------------------
    def file(self, name: str = "file.txt", text: str = "a file, not a folder\n") -> Path:
        path = self.inputs / name
        path.write_text(text)
        return path

    def folder(self, name: str) -> Path:
        path = self.inputs / name
        path.mkdir(parents=True)
        return path

    def loop(self, name: str = "loop") -> Path:
        """A symbolic link that points at itself."""
        path = self.inputs / name
        path.symlink_to(path)
        return path

    def copy(self, source: Path, name: str, skip: tuple[str, ...] = ()) -> Path:
        target = self.inputs / name
        shutil.copytree(source, target, ignore=shutil.ignore_patterns(*skip) if skip else None)
        return target

    def expert_copy(self, name: str = "broken", edit=None, config_edit=None, source: Path | None = None) -> Path:
        """A copy of expert task1 (or ``source``) whose state dict / config.json were changed."""
        target = self.copy(source or self.shared.experts["task1"], name)
        if edit is not None:
            state = edit(load_file(str(target / "model.safetensors")))
            save_file({k: v.contiguous() for k, v in state.items()}, str(target / "model.safetensors"),
                      metadata={"format": "pt"})
        if config_edit is not None:
            config = json.loads((target / "config.json").read_text())
            config = config_edit(config) or config
            (target / "config.json").write_text(json.dumps(config))
        return target

    def with_expert(self, path: Path | str, name: str = "task1", **changes) -> dict:
        """The data-free config with expert ``name`` replaced by ``path``."""
        config = self.df(**changes)
        config["experts"][name] = str(path)
        return config

    def sharded(self, name: str = "sharded") -> Path:
        """A copy of expert task1 split into two shards with a safetensors index."""
        target = self.copy(self.shared.experts["task1"], name)
        state = load_file(str(target / "model.safetensors"))
        (target / "model.safetensors").unlink()
        keys = sorted(state)
        halves = {"model-00001-of-00002.safetensors": keys[: len(keys) // 2],
                  "model-00002-of-00002.safetensors": keys[len(keys) // 2:]}
        weight_map = {}
        for file_name, part in halves.items():
            save_file({k: state[k].contiguous() for k in part}, str(target / file_name), metadata={"format": "pt"})
            weight_map.update({k: file_name for k in part})
        index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
        (target / "model.safetensors.index.json").write_text(json.dumps(index))
        return target

    def text_base_copy(self, name: str = "textbase", skip: tuple[str, ...] = (), config_edit=None) -> Path:
        target = self.copy(self.shared.text_base, name, skip=skip)
        if config_edit is not None:
            config = json.loads((target / "config.json").read_text())
            config = config_edit(config) or config
            (target / "config.json").write_text(json.dumps(config))
        return target

    def data_copy(self, edit: Callable[[Path], None] | None = None) -> Path:
        target = self.copy(self.shared.data_dir, "data")
        if edit is not None:
            edit(target)
        return target


def apply(config: dict, changes: dict) -> dict:
    config = dict(config)
    for key, value in changes.items():
        if value is DROP:
            config.pop(key, None)
        else:
            config[key] = value
    return config


def truncate(path: Path, keep: float = 0.5) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    return path


def garbage(path: Path, size: int = 4096) -> Path:
    path.write_bytes(bytes((i * 97 + 13) % 251 for i in range(size)))
    return path


def safetensors_header(path: Path, header: bytes, length: int | None = None) -> Path:
    """A file with a safetensors length prefix and ``header`` (the prefix may lie about the length)."""
    path.write_bytes(struct.pack("<Q", len(header) if length is None else length) + header)
    return path


class Evil:
    """Pickles as a call of os.system: loading it with plain pickle would create the marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def malicious_pickle(path: Path, marker: Path) -> Path:
    torch.save({"embeddings.word_embeddings.weight": torch.zeros(2, 2), "payload": Evil(marker)}, path)
    return path


def poison(key: str, value: float):
    def edit(state):
        state[key] = state[key].clone()
        state[key][0, 0] = value
        return state
    return edit


def tokenizer_with_words(folder: Path, count: int) -> None:
    """Replace the folder's tokenizer by one of ``count`` words (more rows than the embedding has)."""
    from transformers import BertTokenizer

    for name in TEXT_FILES:
        (folder / name).unlink(missing_ok=True)
    words = VOCAB + [f"w{i}" for i in range(count - len(VOCAB))]
    BertTokenizer(vocab={w: i for i, w in enumerate(words)}).save_pretrained(folder)


# --------------------------------------------------------------------------- the table
@dataclass(frozen=True)
class Case:
    id: str
    build: Callable[[Env], object]   # argv (cli/process) or a zero-argument callable (api)
    expect: tuple[str, ...]          # words the error line must hold (case-insensitive; "a|b": either)
    via: str = "cli"                 # cli (in-process), process (python -m layermerge) or api
    absent: tuple[str, ...] = ()     # words it must not hold
    marker: str | None = None        # a path (relative to tmp_path) that must never appear
    file_size_limit: int | None = None  # RLIMIT_FSIZE for a process case: a full disk


CASES: list[Case] = []


def add(case_id: str, build, *expect: str, **options) -> None:
    CASES.append(Case(re.sub(r"[^A-Za-z0-9._-]+", "", case_id), build, expect, **options))


S_KEY = "bert.encoder.layer.1.attention.output.dense.weight"

# ---- the config file itself
add("config-missing", lambda e: e.merge(str(e.inputs / "none.yaml")), "config file not found", "none.yaml")
add("config-is-a-folder", lambda e: e.merge(str(e.folder("cfg.yaml"))), "cfg.yaml")
add("config-under-a-file", lambda e: e.merge(str(e.file() / "merge.yaml")), "merge.yaml")
add("config-invalid-yaml", lambda e: e.merge(e.write("method: ties\nbase: [unclosed\n")), "not valid YAML",
    "line 3", via="process")
add("config-tab-indented", lambda e: e.merge(e.write("experts:\n\tsst2: x\n")), "not valid YAML")
add("config-a-list", lambda e: e.merge(e.write("- a\n- b\n")), "must be a YAML mapping")
add("config-a-scalar", lambda e: e.merge(e.write("just some words\n")), "must be a YAML mapping")
add("config-empty", lambda e: e.merge(e.write("")), "must be a YAML mapping")
add("config-not-utf8", lambda e: e.merge(e.write(b"base: \xff\xfe\x00\x81\n")), "merge.yaml")
add("config-symlink-loop", lambda e: e.merge(str(e.loop("loop.yaml"))), "loop.yaml", "symbolic link")
add("config-name-too-long", lambda e: e.merge(str(e.inputs / ("c" * 300 + ".yaml"))), "too long|bytes long")

# ---- top-level keys: unknown, missing, wrong type, out of range
add("key-unknown", lambda e: e.merge(e.df(methd="ties")), "unknown key 'methd'", "allowed keys")
add("key-experts-missing", lambda e: e.merge(e.df(experts=DROP)), "missing required key 'experts'")
add("experts-empty", lambda e: e.merge(e.df(experts={})), "key 'experts'", "at least one expert")
add("experts-a-list", lambda e: e.merge(e.df(experts=["a", "b"])), "key 'experts'")
add("experts-path-a-number", lambda e: e.merge(e.df(experts={"task0": 5})), "experts.task0")
add("experts-path-null", lambda e: e.merge(e.df(experts={"task0": None})), "experts.task0")
add("base-a-list", lambda e: e.merge(e.df(base=[1, 2])), "key 'base'")
add("method-unknown", lambda e: e.merge(e.df(method="tyes")), "unknown method 'tyes'", "task_arithmetic")
add("method-a-number", lambda e: e.merge(e.df(method=5)), "key 'method'")
add("params-a-list", lambda e: e.merge(e.df(params=[1, 2])), "key 'params'")
add("params-unknown", lambda e: e.merge(e.df(params={"scale": 0.3})), "unknown parameter 'scale'",
    "allowed: scaling")
add("output-a-list", lambda e: e.merge(e.df(output=[1])), "key 'output'")
add("output-missing", lambda e: ["merge", e.write(e.df()), "--quiet"], "no output folder")
add("dtype-unknown", lambda e: e.merge(e.df(dtype="float8")), "key 'dtype'", "'bfloat16'")
add("dtype-a-number", lambda e: e.merge(e.df(dtype=16)), "key 'dtype'")
add("shard-size-words", lambda e: e.merge(e.df(max_shard_size="lots")), "max_shard_size", "lots")
add("shard-size-unit", lambda e: e.merge(e.df(max_shard_size="5XB")), "max_shard_size", "5XB")
add("shard-size-zero", lambda e: e.merge(e.df(max_shard_size="0")), "max_shard_size")
add("shard-size-negative", lambda e: e.merge(e.df(max_shard_size="-5GB")), "max_shard_size")
add("shard-size-int-zero", lambda e: e.merge(e.df(max_shard_size=0)), "max_shard_size", absent=("valid string",))
add("shard-size-int-negative", lambda e: e.merge(e.df(max_shard_size=-1)), "max_shard_size",
    absent=("valid string",))
add("vocab-policy-unknown", lambda e: e.merge(e.df(vocab_policy="rows")), "key 'vocab_policy'", "'base_rows'")
add("head-keys-a-string", lambda e: e.merge(e.df(head_keys="pooler")), "key 'head_keys'")
add("head-keys-numbers", lambda e: e.merge(e.df(head_keys=[1])), "head_keys")
add("data-for-data-free", lambda e: e.merge(e.df(data={"shots": 4})), "data-free", "remove the 'data'")
add("engine-for-data-free", lambda e: e.merge(e.df(engine={"device": "cpu"})), "data-free")
add("data-missing", lambda e: e.merge(apply(e.dd(), {"data": DROP})), "needs a 'data' section")
add("base-null-for-task-vectors", lambda e: e.merge(e.df(base=None, method="ties")), "needs a base model")
add("slerp-one-expert", lambda e: e.merge(e.df(method="slerp", experts={"task0": str(e.shared.experts["task0"])})),
    "slerp", "exactly 2")
add("flag-resume-data-free", lambda e: e.merge(e.df(), "--resume"), "--resume", "data-driven",
    absent=("only apply to",))
add("flag-cache-budget-data-free", lambda e: e.merge(e.df(), "--cache-budget", "1GB"), "--cache-budget")
add("flag-device-data-free", lambda e: e.merge(e.df(), "--device", "cpu"), "--device")

# ---- expert names become folders: only a safe character set
for _id, _name, _words in [
    ("traversal", "../../evil", ("../../evil",)), ("slash", "a/b", ("'a/b'",)), ("dotdot", "..", ("'..'",)),
    ("dot", ".", ("'.'",)), ("empty", "", ("expert name",)), ("absolute", "/abs/evil", ("/abs/evil",)),
    ("backslash", "a\\b", ("expert name",)), ("newline", "a\nb", ("expert name",)),
    ("nul", "a\x00b", ("expert name",)), ("too-long", "n" * 300, ("expert name",)),
]:
    add(f"name-{_id}", lambda e, n=_name: e.merge(e.with_expert(e.shared.experts["task1"], name=n)), *_words,
        via="process" if _id == "traversal" else "cli")

# ---- checkpoints that cannot be read
add("base-missing", lambda e: e.merge(e.df(base=str(e.inputs / "nowhere"))), "base", "<tmp>/in/nowhere",
    absent=("checkpoint not found",))
add("expert-missing", lambda e: e.merge(e.with_expert(e.inputs / "gone")), "expert", "gone")
add("base-under-a-file", lambda e: e.merge(e.df(base=str(e.file() / "sub"))), "base", "sub")
add("base-empty-folder", lambda e: e.merge(e.df(base=str(e.folder("empty")))), "no weights found")
add("base-only-config", lambda e: e.merge(e.df(base=str(e.copy(e.shared.base, "cfgonly",
                                                                  skip=("*.safetensors",))))), "no weights found")
add("base-unsupported-file", lambda e: e.merge(e.df(base=str(e.file("weights.txt")))), "unsupported", "weights.txt")
add("base-dev-null", lambda e: e.merge(e.df(base="/dev/null")), "/dev/null")
add("base-symlink-loop", lambda e: e.merge(e.df(base=str(e.loop()))), "loop", "symbolic link", via="process")
add("expert-symlink-loop", lambda e: e.merge(e.with_expert(e.loop())), "loop", "symbolic link")
add("weights-symlink-loop", lambda e: e.merge(e.with_expert(_weights_loop(e))), "model.safetensors", "symbolic link")
add("base-name-too-long", lambda e: e.merge(e.df(base=str(e.inputs / ("b" * 300)))), "too long|bytes long")


def _weights_loop(e: Env) -> Path:
    folder = e.copy(e.shared.experts["task1"], "looped", skip=("model.safetensors",))
    (folder / "model.safetensors").symlink_to(folder / "model.safetensors")
    return folder


def _broken_weights(e: Env, damage) -> Path:
    folder = e.copy(e.shared.experts["task1"], "broken")
    damage(folder / "model.safetensors")
    return folder


for _id, _damage in [
    ("empty", lambda p: p.write_bytes(b"")), ("truncated", truncate),
    ("header-only", lambda p: p.write_bytes(p.read_bytes()[: 8 + struct.unpack("<Q", p.read_bytes()[:8])[0]])),
    ("garbage", garbage), ("huge-header-length", lambda p: safetensors_header(p, b"{}", length=2**60)),
    ("header-not-json", lambda p: safetensors_header(p, b"{not json at all}   ")),
    ("header-wrong-shape", lambda p: _lie_about_shape(p)),
]:
    add(f"safetensors-{_id}", lambda e, d=_damage: e.merge(e.with_expert(_broken_weights(e, d))),
        "model.safetensors", via="process" if _id == "truncated" else "cli")


def _lie_about_shape(path: Path) -> None:
    """Rewrite the header so one tensor claims more bytes than the file holds."""
    raw = path.read_bytes()
    length = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8: 8 + length])
    key = next(k for k in header if k != "__metadata__")
    header[key]["shape"] = [10**6]
    header[key]["data_offsets"] = [0, 4 * 10**6]
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + length:])


add("bare-safetensors-empty", lambda e: e.merge(e.with_expert(garbage(e.inputs / "w.safetensors", 0))),
    "w.safetensors")
add("bare-safetensors-no-tensors", lambda e: e.merge(e.with_expert(_empty_safetensors(e))), "contains no tensors")


def _empty_safetensors(e: Env) -> Path:
    path = e.inputs / "none.safetensors"
    save_file({}, str(path))
    return path


def _damaged_shards(e: Env, damage) -> Path:
    folder = e.sharded()
    damage(folder)
    return folder


SHARD2 = "model-00002-of-00002.safetensors"
INDEX = "model.safetensors.index.json"
for _id, _damage, _words in [
    ("missing", lambda f: (f / SHARD2).unlink(), (SHARD2, "missing")),
    ("truncated", lambda f: truncate(f / SHARD2), (SHARD2,)),
    ("empty", lambda f: (f / SHARD2).write_bytes(b""), (SHARD2,)),
    ("garbage", lambda f: garbage(f / SHARD2), (SHARD2,)),
    ("index-not-json", lambda f: (f / INDEX).write_text("{\"weight_map\": {"), (INDEX,)),
    ("index-empty-file", lambda f: (f / INDEX).write_text(""), (INDEX,)),
    ("index-without-weight-map", lambda f: (f / INDEX).write_text("{\"metadata\": {}}"), (INDEX, "weight_map")),
    ("index-weight-map-a-list", lambda f: (f / INDEX).write_text("{\"weight_map\": [\"a\", \"b\"]}"), (INDEX,)),
    ("index-weight-map-empty", lambda f: (f / INDEX).write_text("{\"weight_map\": {}}"), ("no tensors",)),
    ("index-names-wrong-shard", lambda f: _misplace_key(f), ("model-00001-of-00002.safetensors",)),
]:
    add(f"shards-{_id}", lambda e, d=_damage: e.merge(e.with_expert(_damaged_shards(e, d))), *_words)


def _misplace_key(folder: Path) -> None:
    index = json.loads((folder / INDEX).read_text())
    key = sorted(k for k, v in index["weight_map"].items() if v == SHARD2)[0]
    index["weight_map"][key] = "model-00001-of-00002.safetensors"
    (folder / INDEX).write_text(json.dumps(index))


add("config-json-malformed", lambda e: e.merge(e.with_expert(_config_text(e, "{\"model_type\": "))), "config.json")
add("config-json-a-list", lambda e: e.merge(e.with_expert(_config_text(e, "[1, 2, 3]"))), "config.json")
add("config-json-model-type-a-number", lambda e: e.merge(e.with_expert(e.expert_copy(
    config_edit=lambda c: {**c, "model_type": 7}))), "model_type")


def _config_text(e: Env, text: str) -> Path:
    folder = e.copy(e.shared.experts["task1"], "badconfig")
    (folder / "config.json").write_text(text)
    return folder


def _pickled_folder(e: Env, write) -> Path:
    folder = e.copy(e.shared.experts["task1"], "pickled", skip=("model.safetensors",))
    write(folder / "pytorch_model.bin")
    return folder


add("bin-garbage", lambda e: e.merge(e.with_expert(_pickled_folder(e, garbage))), "pytorch_model.bin")
add("pt-truncated", lambda e: e.merge(e.with_expert(truncate(_saved_pt(e, load_file(
    str(e.shared.experts["task1"] / "model.safetensors")))))), "weights.pt")
add("pt-a-list", lambda e: e.merge(e.with_expert(_saved_pt(e, [1, 2, 3]))), "not a state dict")
add("pt-dict-of-numbers", lambda e: e.merge(e.with_expert(_saved_pt(e, {"a": 1}))), "not a state dict")
add("pt-malicious-pickle", lambda e: e.merge(e.with_expert(malicious_pickle(e.inputs / "evil.pt", e.root / "PWNED"))),
    "pickle", "safetensors", absent=("file an issue",), marker="PWNED", via="process")
add("bin-malicious-pickle", lambda e: e.merge(e.with_expert(_pickled_folder(
    e, lambda p: malicious_pickle(p, e.root / "PWNED")))), "pickle", absent=("file an issue",), marker="PWNED")
add("base-malicious-pickle", lambda e: e.merge(e.df(base=str(malicious_pickle(e.inputs / "base.pt",
                                                                              e.root / "PWNED")))),
    "pickle", absent=("file an issue",), marker="PWNED")


def _saved_pt(e: Env, obj) -> Path:
    path = e.inputs / "weights.pt"
    torch.save(obj, path)
    return path


# ---- the README's compatibility checks ("Checks before any work")
def _drop_key(state):
    return {k: v for k, v in state.items() if k != "bert.encoder.layer.1.output.dense.weight"}


def _extra_layer(state):
    return {**state, **{k.replace("layer.1.", "layer.2."): v.clone() for k, v in state.items() if "layer.1." in k}}


def _wider(state):
    key = "bert.encoder.layer.0.intermediate.dense.bias"
    return {**state, key: torch.zeros(40)}


def _vocab(count):
    """An expert that added (or dropped) tokens records its new vocab_size, as resize_token_embeddings does."""
    return lambda config: {**config, "vocab_size": count}


def _rows(count):
    def edit(state):
        key = "bert.embeddings.word_embeddings.weight"
        return {**state, key: torch.zeros(count, state[key].shape[1])}
    return edit


add("compat-missing-key", lambda e: e.merge(e.with_expert(e.expert_copy(edit=_drop_key))), "missing 1 keys",
    "task1")
add("compat-extra-layer", lambda e: e.merge(e.with_expert(e.expert_copy(edit=_extra_layer))),
    "extra keys inside the backbone")
add("compat-shape", lambda e: e.merge(e.with_expert(e.expert_copy(edit=_wider))), "shape mismatch",
    "encoder.layer.0.intermediate.dense.bias")
add("compat-dtype", lambda e: e.merge(e.with_expert(e.expert_copy(edit=lambda s: {k: v.half() for k, v in s.items()}))),
    "dtype mismatch")
add("compat-model-type", lambda e: e.merge(e.with_expert(e.expert_copy(
    config_edit=lambda c: {**c, "model_type": "roberta"}))), "different model_type", "'roberta'")
add("compat-vocab-size", lambda e: e.merge(e.with_expert(e.expert_copy(edit=_rows(105), config_edit=_vocab(105)))),
    "vocabulary size mismatch", "vocab_policy: base")
add("compat-vocab-smaller-base-rows", lambda e: e.merge(e.with_expert(e.expert_copy(edit=_rows(90),
                                                                                     config_edit=_vocab(90)),
                                                                      vocab_policy="base_rows")),
    "fewer vocabulary rows")
add("compat-nan", lambda e: e.merge(e.with_expert(e.expert_copy(edit=poison(S_KEY, float("nan"))))), "NaN/Inf",
    "task1")
add("compat-inf", lambda e: e.merge(e.with_expert(e.expert_copy(edit=poison(S_KEY, float("inf"))))), "NaN/Inf")
add("compat-nan-in-base", lambda e: e.merge(e.df(base=str(e.expert_copy(
    source=e.shared.base, edit=poison("encoder.layer.0.output.dense.weight", float("nan")))))), "NaN/Inf")
add("compat-no-shared-keys", lambda e: e.merge(e.with_expert(_stranger(e))), "shares no parameter names")


def _stranger(e: Env) -> Path:
    path = e.inputs / "stranger.safetensors"
    save_file({"conv1.weight": torch.zeros(4, 3, 3, 3), "fc.bias": torch.zeros(10)}, str(path))
    return path


# ---- where the output goes
add("out-inside-base", lambda e: e.merge(e.df(), out=e.shared.base / "merged"), "overlaps the input")
add("out-is-an-expert", lambda e: e.merge(e.df(), out=e.shared.experts["task0"]), "overlaps the input")
add("out-is-the-base-overwrite", lambda e: e.merge(e.df(), "--overwrite", out=e.shared.base), "overlaps the input")
add("out-above-an-input", lambda e: e.merge(e.with_expert(e.copy(e.shared.experts["task1"], "models/e1")),
                                            "--overwrite", out=e.inputs / "models"), "overlaps the input")
add("out-exists", lambda e: e.merge(e.df(), out=e.folder("existing")), "already exists", "--overwrite")
add("out-is-a-file-overwrite", lambda e: e.merge(e.df(), "--overwrite", out=e.file("out.txt")), "out.txt")
add("out-parent-is-a-file", lambda e: e.merge(e.df(), out=e.file() / "merged"), "file.txt")
add("out-name-too-long", lambda e: e.merge(e.df(), out=e.inputs / ("o" * 300)), "too long|bytes long", via="process")
add("out-through-symlink-loop", lambda e: e.merge(e.df(), out=e.loop() / "merged"), "loop")
add("out-unwritable-location", lambda e: e.merge(e.df(), out="/sys/layermerge-reliability-out"),
    "layermerge-reliability-out", "not permitted|permission|read-only")
add("out-disk-full", lambda e: e.merge(e.df()), "<tmp>/", os.strerror(errno.EFBIG), via="process",
    file_size_limit=20_000)
add("api-save-into-the-base", lambda e: lambda: layermerge.merge(
    e.shared.base, e.shared.experts, "task_arithmetic", quiet=True).save(e.shared.base / "merged"),
    "overlaps the input", via="api")

# ---- data-driven merges: data, engine and checkpoint folders
for _key, _value in [("shots", 0), ("shots", "many"), ("seed", "abc"), ("split", "test"), ("batch_size", 0),
                     ("max_length", 0), ("tasks", ["sst2"])]:
    add(f"data-{_key}-{_value}", lambda e, k=_key, v=_value: e.merge(e.dd(data={k: v})), f"data.{_key}")
add("data-unknown-key", lambda e: e.merge(e.dd(data={"shot": 4})), "unknown key 'data.shot'", "allowed keys")
add("data-a-list", lambda e: e.merge(apply(e.dd(), {"data": [1, 2]})), "key 'data'")
for _key, _value in [("shots", -1), ("split", "dev"), ("max_length", 0), ("seed", "x")]:
    add(f"data-task-{_key}-{_value}", lambda e, k=_key, v=_value: e.merge(e.dd(data={"tasks": {"sst2": {k: v}}})),
        f"data.tasks.sst2.{_key}")
add("data-task-unknown-key", lambda e: e.merge(e.dd(data={"tasks": {"sst2": {"name": "sst2"}}})),
    "allowed keys: task, split, shots")
add("data-task-unknown-task", lambda e: e.merge(e.dd(data={"tasks": {"sst2": {"task": "sst3"}}})),
    "unknown task 'sst3'")
add("data-tasks-not-an-expert", lambda e: e.merge(e.dd(data={"tasks": {"qnli": {}}})), "['qnli']",
    "not experts")
add("data-expert-not-a-task", lambda e: e.merge(e.dd(experts={"mystery": str(e.shared.text_experts["sst2"]),
                                                             "rte": str(e.shared.text_experts["rte"])})),
    "data.tasks.mystery.task")
add("data-image-task-for-text", lambda e: e.merge(e.dd(data={"tasks": {"rte": {"task": "mnist"}}})), "mnist")
add("data-dir-missing", lambda e: e.merge(e.dd(data={"data_dir": str(e.inputs / "nodata")})), "nodata")
add("data-dir-a-file", lambda e: e.merge(e.dd(data={"data_dir": str(e.file())})), "file.txt")
add("data-file-missing", lambda e: e.merge(e.dd(data={"data_dir": str(e.data_copy(
    lambda d: shutil.rmtree(d / "glue" / "rte")))})), "rte/train")
add("data-file-bad-json", lambda e: e.merge(e.dd(data={"data_dir": str(e.data_copy(
    lambda d: (d / "glue" / "rte" / "train.jsonl").write_text("{\"sentence1\": \n")))})), "not valid JSON")
add("data-file-empty", lambda e: e.merge(e.dd(data={"data_dir": str(e.data_copy(
    lambda d: (d / "glue" / "rte" / "train.jsonl").write_text("")))})), "holds no examples")
add("data-file-bad-label", lambda e: e.merge(e.dd(data={"data_dir": str(e.data_copy(
    lambda d: (d / "glue" / "sst2" / "train.jsonl").write_text("{\"sentence\": \"ok\", \"label\": 7}\n")))})),
    "label 7 is not one of the declared labels")
add("data-file-missing-field", lambda e: e.merge(e.dd(data={"data_dir": str(e.data_copy(
    lambda d: (d / "glue" / "sst2" / "train.jsonl").write_text("{\"text\": \"ok\", \"label\": 1}\n")))})),
    "no field 'sentence'", "fields: text, label")

# max_length beyond the position table: checked before any work (no OUT.checkpoint left behind)
add("max-length-just-beyond", lambda e: e.merge(e.dd(data={"max_length": POSITIONS + 1})), "max_length",
    str(POSITIONS + 1), str(POSITIONS))
add("max-length-huge", lambda e: e.merge(e.dd(data={"max_length": 100_000})), "max_length", "100000")
add("max-length-per-task", lambda e: e.merge(e.dd(data={"tasks": {"rte": {"max_length": 500}}})), "max_length",
    "500")

# tokenizers: one that cannot be loaded, or whose vocabulary does not fit the embedding, is refused
add("tokenizer-missing-in-base", lambda e: e.merge(e.dd(base=str(e.text_base_copy(skip=TEXT_FILES)))),
    "tokenizer", via="process")
add("tokenizer-vocab-beyond-embedding", lambda e: e.merge(e.dd(base=str(_big_vocab_base(e)))), "tokenizer", "99")
add("tokenizer-folder-missing", lambda e: e.merge(e.dd(data={"tokenizer": str(e.inputs / "notok")})), "notok")
add("tokenizer-folder-empty", lambda e: e.merge(e.dd(data={"tokenizer": str(e.folder("emptytok"))})), "tokenizer",
    "emptytok")


def _big_vocab_base(e: Env) -> Path:
    folder = e.text_base_copy()
    tokenizer_with_words(folder, 150)
    return folder


# the base's config.json, which builds the model the data flows through
add("dd-config-no-model-type", lambda e: e.merge(e.dd(base=str(e.text_base_copy(
    config_edit=lambda c: c.pop("model_type") and c)))), "model_type")
add("dd-config-unknown-model-type", lambda e: e.merge(e.dd(base=str(e.text_base_copy(
    config_edit=lambda c: {**c, "model_type": "nosuchmodel"})))), "nosuchmodel")
add("dd-config-hidden-size-words", lambda e: e.merge(e.dd(base=str(e.text_base_copy(
    config_edit=lambda c: {**c, "hidden_size": "big"})))), "config.json")
add("dd-config-more-layers", lambda e: e.merge(e.dd(base=str(e.text_base_copy(
    config_edit=lambda c: {**c, "num_hidden_layers": 3})))), "layer.2")
add("dd-config-wrong-vocab-size", lambda e: e.merge(e.dd(base=str(e.text_base_copy(
    config_edit=lambda c: {**c, "vocab_size": 200})))), "word_embeddings|vocab_size|config.json")

for _key, _value, _words in [
    ("devices", "cpu", ("allowed keys: cache_budget",)), ("compute_dtype", "float16", ("engine.compute_dtype",)),
    ("cache_budget", "lots", ("engine.cache_budget",)), ("cache_budget", -5, ("engine.cache_budget",)),
    ("device", "tpu", ("tpu",)), ("seed", "x", ("engine.seed",)), ("checkpoint", "maybe", ("engine.checkpoint",)),
    ("keep_checkpoint", 3, ("engine.keep_checkpoint",)), ("block_plan", "layers", ("engine.block_plan",)),
    ("block_plan", {"blocks": "no.such.module"}, ("no.such.module",)),
]:
    add(f"engine-{_key}-{_value}", lambda e, k=_key, v=_value: e.merge(e.dd(engine={k: v})),
        *_words)
add("flag-device-bogus", lambda e: e.merge(e.dd(), "--device", "tpu"), "tpu")
add("flag-cache-budget-bogus", lambda e: e.merge(e.dd(), "--cache-budget", "lots"), "lots")
add("flag-checkpoint-dir-a-file", lambda e: e.merge(e.dd(), "--checkpoint-dir", str(e.file())), "file.txt")
add("flag-checkpoint-dir-inside-an-input", lambda e: e.merge(
    e.dd(), "--checkpoint-dir", str(e.shared.text_base / "ckpt")), "checkpoint")
add("spill-dir-a-file", lambda e: e.merge(e.dd(engine={"spill_dir": str(e.file()), "cache_budget": 0})),
    "file.txt")


def _old_checkpoint(e: Env, run: str) -> None:
    folder = e.root / "out.checkpoint"
    folder.mkdir()
    (folder / "run.json").write_text(run)


add("checkpoint-exists-without-resume", lambda e: (_old_checkpoint(
    e, json.dumps({"format": 1, "fingerprint": {"method": "other"}, "finished": 1})), e.merge(e.dd()))[1],
    "already holds a run", "--resume")
add("checkpoint-of-another-run", lambda e: (_old_checkpoint(
    e, json.dumps({"format": 1, "fingerprint": {"method": "other"}, "finished": 1})), e.merge(e.dd(), "--resume"))[1],
    "different run")
add("checkpoint-run-json-corrupt", lambda e: (_old_checkpoint(e, "{\"finished\": "),
                                              e.merge(e.dd(), "--resume"))[1], "run.json")


# ---- every method's parameters: a value of the wrong type, and each bound crossed
def _wrong_type_value(annotation):
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        return "no-such-choice"
    if annotation is bool:
        return "perhaps"
    if annotation is int:
        return "many"
    if annotation is float:
        return "lots"
    return "heavy"           # list[float] | None and the like


def _beyond(bound, annotation) -> list:
    step = 1 if annotation is int else 0.5
    values = []
    for attribute, shift in (("ge", -step), ("gt", 0), ("le", step), ("lt", 0)):
        limit = getattr(bound, attribute, None)
        if limit is not None:
            values.append(limit + shift)
    return values


def _param_case(method: str, kind: str, params: dict):
    def build(e: Env):
        config = e.df(method=method, params=params) if kind == "tensor" else e.dd(method=method, params=params)
        return e.merge(config)
    return build


for _method, _info in available_methods().items():
    for _name, _field in _info.params_model.model_fields.items():
        _wrong = {_name: _wrong_type_value(_field.annotation)}
        add(f"param-{_method}-{_name}-type", _param_case(_method, _info.kind, _wrong), f"'{_method}'",
            f"parameter '{_name}'")
        for _bound in _field.metadata:
            for _value in _beyond(_bound, _field.annotation):
                add(f"param-{_method}-{_name}-{_value}", _param_case(_method, _info.kind, {_name: _value}),
                    f"'{_method}'", f"parameter '{_name}'")

# ---- inspect
add("inspect-base-missing", lambda e: ["inspect", str(e.inputs / "nowhere"), str(e.shared.experts["task0"]), "-q"],
    "nowhere")
add("inspect-expert-missing", lambda e: ["inspect", str(e.shared.base), str(e.inputs / "gone"), "-q"], "gone")
add("inspect-names-count", lambda e: ["inspect", str(e.shared.base), *map(str, e.shared.experts.values()),
                                      "--names", "a", "-q"], "--names")
add("inspect-duplicate-names", lambda e: ["inspect", str(e.shared.base), f"x={e.shared.experts['task0']}",
                                          f"x={e.shared.experts['task1']}", "-q"], "two experts are named")
add("inspect-name-traversal", lambda e: ["inspect", str(e.shared.base), *map(str, e.shared.experts.values()),
                                         "--names", "../../evil,b", "-q"], "../../evil")
add("inspect-nan-expert", lambda e: ["inspect", str(e.shared.base), str(e.shared.experts["task0"]),
                                     str(e.expert_copy(edit=poison(S_KEY, float("nan")))), "-q"], "NaN/Inf")
add("inspect-shape-mismatch", lambda e: ["inspect", str(e.shared.base), str(e.shared.experts["task0"]),
                                         str(e.expert_copy(edit=_wider)), "-q"], "shape mismatch")
add("inspect-heatmap-parent-a-file", lambda e: ["inspect", str(e.shared.base), *map(str, e.shared.experts.values()),
                                                "--heatmap", str(e.file() / "tv.png"), "-q"], "file.txt",
    via="process")
add("inspect-heatmap-a-folder", lambda e: ["inspect", str(e.shared.base), *map(str, e.shared.experts.values()),
                                           "--heatmap", str(e.folder("tv.png")), "-q"], "tv.png")
add("inspect-heatmap-name-too-long", lambda e: ["inspect", str(e.shared.base), *map(str, e.shared.experts.values()),
                                                "--heatmap", str(e.inputs / ("h" * 300 + ".png")), "-q"],
    "too long|bytes long")
add("inspect-json-parent-a-file", lambda e: ["inspect", str(e.shared.base), *map(str, e.shared.experts.values()),
                                             "--json", str(e.file() / "r.json"), "-q"], "file.txt")
add("inspect-base-symlink-loop", lambda e: ["inspect", str(e.loop()), str(e.shared.experts["task0"]), "-q"],
    "loop", "symbolic link")


# ---- argument syntax (argparse): one line naming the command and pointing at its --help
add("args-no-command", lambda e: [], "required: command", "layermerge --help")
add("args-unknown-command", lambda e: ["mrege"], "invalid choice: 'mrege'")
add("args-merge-no-config", lambda e: ["merge"], "merge:", "required: config", "layermerge merge --help")
add("args-merge-unknown-flag", lambda e: ["merge", str(e.df()), "--bogus"], "unrecognized arguments: --bogus")
add("args-merge-bad-dtype-choice", lambda e: ["merge", str(e.df()), "--compute-dtype", "int8"],
    "--compute-dtype", "invalid choice: 'int8'")
add("args-finetune-threads-not-int", lambda e: ["finetune", str(e.shared.text_base), "--task", "sst2",
                                                "--threads", "two"], "--threads", "invalid int value: 'two'")
add("args-inspect-one-model", lambda e: ["inspect"], "inspect:", "required")


# ---- eval (the text expert sst2 with the base's tokenizer, on the local GLUE copy)
def _eval(e: Env, *flags: str, model: str | Path | None = None) -> list[str]:
    return ["eval", str(model or e.shared.text_experts["sst2"]), "--tokenizer", str(e.shared.text_base),
            "--data-dir", str(e.shared.data_dir), "--max-examples", "4", "--threads", "1", "-q", *flags]


add("eval-folder-missing", lambda e: _eval(e, "--tasks", "sst2", model=e.inputs / "nowhere"), "nowhere")
add("eval-folder-a-file", lambda e: _eval(e, "--tasks", "sst2", model=e.file()), "file.txt")
add("eval-unknown-task", lambda e: _eval(e, "--tasks", "sst3"), "unknown task 'sst3'")
add("eval-empty-task-entry", lambda e: _eval(e, "--tasks", "sst2,,rte"), "bad task list")
add("eval-experts-not-pairs", lambda e: _eval(e, "--tasks", "sst2", "--experts", "sst2"), "TASK=DIR")
add("eval-experts-not-in-tasks", lambda e: _eval(e, "--tasks", "sst2", "--experts",
                                                f"rte={e.shared.text_experts['rte']}"), "not in --tasks")
add("eval-threads-zero", lambda e: _eval(e, "--tasks", "sst2", "--threads", "0"), "--threads")
add("eval-no-tasks", lambda e: _eval(e, model=e.shared.text_base), "--tasks")
add("eval-max-examples-zero", lambda e: _eval(e, "--tasks", "sst2", "--max-examples", "0"), "examples")
add("eval-max-examples-negative", lambda e: _eval(e, "--tasks", "sst2", "--max-examples", "-3"), "examples")
add("eval-batch-size-zero", lambda e: _eval(e, "--tasks", "sst2", "--batch-size", "0"), "batch")
add("eval-max-length-zero", lambda e: _eval(e, "--tasks", "sst2", "--max-length", "0"), "length")
add("eval-max-length-beyond-positions", lambda e: _eval(e, "--tasks", "sst2", "--max-length", "1000",
                                                       "--data-dir", str(_long_texts(e))), "length", "1000")
add("eval-data-dir-missing", lambda e: _eval(e, "--tasks", "sst2", "--data-dir", str(e.inputs / "nodata")),
    "nodata")
add("eval-tokenizer-missing", lambda e: _eval(e, "--tasks", "sst2", "--tokenizer", str(e.inputs / "notok")), "notok")
add("eval-output-a-file", lambda e: _eval(e, "--tasks", "sst2", "--output", str(e.file("report.txt"))), "report.txt")


# ---- finetune (the text base; the cache and the data inside the case's folder)
def _long_texts(e: Env) -> Path:
    """A GLUE folder whose sst2 sentences tokenise to ~300 tokens, beyond the tiny BERT's 64 positions."""
    folder = e.inputs / "longdata"
    write_tiny_glue(folder, "sst2")
    for split in ("train", "test"):
        path = folder / "glue" / "sst2" / f"{split}.jsonl"
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        path.write_text("".join(json.dumps({**row, "sentence": " ".join([row["sentence"]] * 30)}) + "\n"
                                for row in rows))
    return folder


def _finetune(e: Env, *flags: str, base: str | Path | None = None, task: str = "sst2") -> list[str]:
    return ["finetune", str(base or e.shared.text_base), "--task", task, "--cache-dir", str(e.root / "cache"),
            "--data-dir", str(e.shared.data_dir), "--max-train-examples", "4", "--threads", "1", "-q", *flags]


add("finetune-unknown-task", lambda e: _finetune(e, task="sst3"), "unknown task 'sst3'")
add("finetune-base-missing", lambda e: _finetune(e, base=e.inputs / "nowhere"), "nowhere")
add("finetune-base-a-file", lambda e: _finetune(e, base=e.file()), "file.txt")
add("finetune-unknown-vision-model", lambda e: _finetune(e, base="vision:nosuch", task="mnist"), "nosuch")
add("finetune-threads-zero", lambda e: _finetune(e, "--threads", "0"), "--threads")
add("finetune-epochs-zero", lambda e: _finetune(e, "--epochs", "0"), "epochs")
add("finetune-lr-negative", lambda e: _finetune(e, "--lr", "-1"), "lr")
add("finetune-batch-size-zero", lambda e: _finetune(e, "--batch-size", "0"), "batch")
add("finetune-max-length-tiny", lambda e: _finetune(e, "--max-length", "4"), "length")
add("finetune-max-length-beyond-positions", lambda e: _finetune(e, "--max-length", "1000", "--data-dir",
                                                                str(_long_texts(e))), "length", "1000")
add("finetune-train-examples-zero", lambda e: _finetune(e, "--max-train-examples", "0"), "train")
add("finetune-warmup-beyond-one", lambda e: _finetune(e, "--warmup-ratio", "1.5"), "warmup")
add("finetune-weight-decay-negative", lambda e: _finetune(e, "--weight-decay", "-0.1"), "weight_decay")
add("finetune-data-dir-missing", lambda e: _finetune(e, "--data-dir", str(e.inputs / "nodata")), "nodata")
add("finetune-output-inside-base", lambda e: _finetune(e, "--output", str(e.shared.text_base / "ft")), "base")
add("finetune-output-exists", lambda e: _finetune(e, "--output", str(e.folder("done"))), "exists")
add("finetune-base-without-tokenizer", lambda e: _finetune(e, base=e.text_base_copy(skip=TEXT_FILES)), "tokenizer")
add("finetune-cache-dir-a-file", lambda e: _finetune(e, "--cache-dir", str(e.file())), "file.txt")

# ---- bench, methods, demo
add("bench-unknown-track", lambda e: ["bench", "no-such-track", "--dry-run", "-q"], "unknown track")
add("bench-track-invalid-yaml", lambda e: ["bench", e.write("name: [x\n", "track.yaml"), "--dry-run", "-q"],
    "not valid YAML")
add("bench-track-a-list", lambda e: ["bench", e.write("- a\n", "track.yaml"), "--dry-run", "-q"], "mapping")
add("bench-track-unknown-key", lambda e: ["bench", e.write("colour: blue\n", "track.yaml"), "--dry-run", "-q"],
    "colour")
add("bench-unknown-stage", lambda e: ["bench", "glue8-minilm", "--stages", "nosuch", "--dry-run", "-q"],
    "unknown stage")
add("bench-seeds-words", lambda e: ["bench", "glue8-minilm", "--seeds", "a,b", "--dry-run", "-q"], "--seeds")
add("bench-threads-zero", lambda e: ["bench", "glue8-minilm", "--threads", "0", "--dry-run", "-q"], "--threads")
add("methods-unknown", lambda e: ["methods", "no_such_method"], "unknown method 'no_such_method'")
add("demo-unknown-task", lambda e: ["demo", "--tasks", "sst3", "--cache-dir", str(e.root / "cache"), "-q"],
    "unknown task 'sst3'")
add("demo-threads-zero", lambda e: ["demo", "--threads", "0", "--cache-dir", str(e.root / "cache"), "-q"],
    "--threads")


# ---- the Python API
def _api(build):
    """``build(env)`` makes the inputs and returns the keyword arguments of ``layermerge.merge``."""
    def builder(e: Env):
        options = build(e)
        return lambda: layermerge.merge(**options)
    return builder


def _api_merge(e: Env, **overrides) -> dict:
    return {"base": e.shared.base, "experts": dict(e.shared.experts), "method": "ties", "output": e.out,
            "quiet": True, **overrides}


def _api_dd(e: Env, changes: dict | None = None, **overrides) -> dict:
    config = e.dd(data=changes)
    return {"base": config["base"], "experts": config["experts"], "method": "prodistill", "output": e.out,
            "quiet": True, "data": config["data"], "device": "cpu", **config["params"], **overrides}


add("api-base-missing", _api(lambda e: _api_merge(e, base=e.inputs / "nowhere")), "nowhere", via="api")
add("api-unknown-method", _api(lambda e: _api_merge(e, method="tyes")), "unknown method 'tyes'", via="api")
add("api-param-out-of-range", _api(lambda e: _api_merge(e, density=2.0)), "parameter 'density'", via="api")
add("api-unknown-param", _api(lambda e: _api_merge(e, densty=0.2)), "unknown parameter 'densty'", via="api")
add("api-name-traversal", _api(lambda e: _api_merge(e, experts={"../../evil": e.shared.experts["task0"],
                                                                "b": e.shared.experts["task1"]})),
    "../../evil", via="api")
add("api-name-traversal-in-memory", _api(lambda e: _api_merge(e, output=None, experts={
    "../evil": e.shared.experts["task0"], "b": e.shared.experts["task1"]})), "../evil", via="api")
add("api-output-inside-input", _api(lambda e: _api_merge(e, output=e.shared.base / "merged")), "overlaps the input",
    via="api")
add("api-corrupt-safetensors", _api(lambda e: _api_merge(e, experts={
    "task0": e.shared.experts["task0"], "task1": _broken_weights(e, truncate)})), "model.safetensors", via="api")
add("api-malicious-pickle", _api(lambda e: _api_merge(e, experts={
    "task0": e.shared.experts["task0"], "evil": malicious_pickle(e.inputs / "evil.pt", e.root / "PWNED")})),
    "pickle", via="api", marker="PWNED", absent=("file an issue",))
add("api-nan", _api(lambda e: _api_merge(e, experts={
    "task0": e.shared.experts["task0"], "task1": e.expert_copy(edit=poison(S_KEY, float("nan")))})), "NaN/Inf",
    via="api")
add("api-shard-size-negative", _api(lambda e: _api_merge(e, max_shard_size=-1)), "size", via="api")
add("api-dtype-unknown", _api(lambda e: _api_merge(e, dtype="float8")), "float8", via="api")
add("api-vocab-policy-unknown", _api(lambda e: _api_merge(e, vocab_policy="rows")), "vocab_policy", via="api")
add("api-experts-a-list", _api(lambda e: _api_merge(e, experts=[str(p) for p in e.shared.experts.values()])),
    "experts|mapping|dict", via="api")
add("api-data-for-data-free", _api(lambda e: _api_merge(e, data={"shots": 4})), "data-free", via="api")
add("api-dd-no-data", _api(lambda e: _api_dd(e, data=None)), "data", via="api")
add("api-dd-max-length-beyond-positions", _api(lambda e: _api_dd(e, {"max_length": 1000})), "max_length",
    "1000", via="api")
add("api-dd-base-without-tokenizer", _api(lambda e: _api_dd(e, base=e.text_base_copy(skip=TEXT_FILES))),
    "tokenizer", via="api")
add("api-dd-engine-option", _api(lambda e: _api_dd(e, cache_budget="lots")), "cache_budget", via="api")
add("api-dd-resume-without-output", _api(lambda e: _api_dd(e, output=None, resume=True)), "resume", via="api")


# --------------------------------------------------------------------------- running a case
def snapshot(*roots: Path) -> dict[str, str]:
    """Every path under ``roots``: files by sha256, links by target, folders as 'dir' (links not followed)."""
    entries = {}
    for root in roots:
        for folder, dirs, files in os.walk(root):
            for name in dirs + files:
                path = os.path.join(folder, name)
                if os.path.islink(path):
                    entries[path] = "link:" + os.readlink(path)
                elif os.path.isdir(path):
                    entries[path] = "dir"
                elif os.path.isfile(path):
                    with open(path, "rb") as handle:
                        entries[path] = hashlib.sha256(handle.read()).hexdigest()
                else:
                    entries[path] = "special"
    return entries


def describe_changes(before: dict[str, str], after: dict[str, str]) -> list[str]:
    changes = []
    for path in sorted(set(before) | set(after)):
        name = os.path.basename(path)
        if path not in before:
            kind = ("temporary folder" if ".tmp-" in name else "checkpoint folder" if name.endswith(".checkpoint")
                    else "new")
            changes.append(f"{kind}: {path}")
        elif path not in after:
            changes.append(f"removed: {path}")
        elif before[path] != after[path]:
            changes.append(f"modified: {path}")
    return changes


def normalise(text: str, env: Env) -> str:
    """The message with the test's folders shown as <tmp> and <shared>, lower-cased for matching."""
    for folder, label in ((env.shared.root, "<shared>"), (env.root.resolve(), "<tmp>"), (env.root, "<tmp>")):
        text = text.replace(str(folder), label)
    return text.lower()


def run_process(argv: list[str], cwd: Path, file_size_limit: int | None = None) -> tuple[int, str, str]:
    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)     # writes past the limit fail with EFBIG instead
        resource.setrlimit(resource.RLIMIT_FSIZE, (file_size_limit, file_size_limit))

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("LAYERMERGE_DATA", None)
    result = subprocess.run([sys.executable, "-m", "layermerge", *argv], capture_output=True, text=True, cwd=cwd,
                            env=env, timeout=120, preexec_fn=limit if file_size_limit else None)
    return result.returncode, result.stdout, result.stderr


def run_cli(argv: list[str], capfd) -> tuple[int, str, str]:
    capfd.readouterr()
    try:
        code = main(argv)
    except SystemExit as exc:          # argparse's usage errors exit from inside parse_args
        code = exc.code
    captured = capfd.readouterr()
    return code, captured.out, captured.err


def check_error_line(err: str, out: str, case: Case, env: Env) -> None:
    assert "Traceback" not in out + err, f"a traceback escaped:\n{err[-3000:]}"
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines, f"nothing on stderr (stdout: {out[-500:]!r})"
    *before, last = lines
    assert last.startswith("layermerge: error: "), f"the last stderr line is not the error line: {lines[-5:]}"
    assert all(line.startswith("layermerge: warning: ") for line in before), f"stray stderr lines: {lines}"
    check_message(last.removeprefix("layermerge: error: "), case, env)


def check_message(message: str, case: Case, env: Env) -> None:
    shown = normalise(message, env)
    missing = [word for word in case.expect if not any(w.lower() in shown for w in word.split("|"))]
    assert not missing, f"the error does not say {missing}: {message!r}"
    present = [word for word in case.absent if word.lower() in shown]
    assert not present, f"the error still says {present}: {message!r}"


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_bad_input_ends_cleanly(case: Case, shared: Shared, tmp_path, capfd, monkeypatch):
    monkeypatch.chdir(tmp_path)                   # anything written to the working directory is seen too
    monkeypatch.delenv("LAYERMERGE_DATA", raising=False)
    env = Env(tmp_path, shared)
    action = case.build(env)
    before = snapshot(tmp_path, shared.root)
    if case.via == "api":
        capfd.readouterr()
        with pytest.raises(LayermergeError) as info:
            action()
        captured = capfd.readouterr()
        assert "Traceback" not in captured.out + captured.err
        check_message(str(info.value), case, env)
    else:
        if case.via == "process":
            code, out, err = run_process(action, tmp_path, case.file_size_limit)
        else:
            code, out, err = run_cli(action, capfd)
        check_error_line(err, out, case, env)
        assert code == 2, f"exit status {code}, expected 2"
    if case.marker is not None:
        assert not (tmp_path / case.marker).exists(), "the pickle's code ran"
    assert describe_changes(before, snapshot(tmp_path, shared.root)) == []


def test_the_corpus_holds_at_least_100_cases():
    ids = [case.id for case in CASES]
    assert len(set(ids)) == len(ids), "case ids must be unique"
    assert len(CASES) >= 100
    assert sum(case.via == "process" for case in CASES) >= 8
    assert sum(case.via == "api" for case in CASES) >= 10


# --------------------------------------------------------------------------- controls
def test_the_valid_inputs_merge_cleanly(shared: Shared, tmp_path, capfd):
    """The cases change one thing each in these configs, so these must succeed as they are."""
    env = Env(tmp_path, shared)
    before = snapshot(shared.root)
    for name, config in (("free", env.df()), ("driven", env.dd())):
        code, _, err = run_cli(env.merge(config, out=tmp_path / name), capfd)
        assert code == 0, err
        assert (tmp_path / name / "model.safetensors").is_file()
    assert (tmp_path / "driven" / "prodistill" / "blocks.json").is_file()
    assert snapshot(shared.root) == before
    assert not list(tmp_path.glob(".*.tmp-*")) and not list(tmp_path.glob("*.checkpoint"))


def test_an_integer_max_shard_size_is_bytes(shared: Shared, tmp_path, capfd):
    env = Env(tmp_path, shared)
    code, _, err = run_cli(env.merge(env.df(max_shard_size=50_000)), capfd)
    assert code == 0, err
    assert len(list(env.out.glob("model-*-of-*.safetensors"))) > 1


@pytest.mark.parametrize("how", ["same-path", "a-copy"])
def test_the_same_expert_twice_is_a_warning(shared: Shared, tmp_path, capfd, how):
    """Duplicates are found by content: the same folder twice, or a copy of it under another name."""
    env = Env(tmp_path, shared)
    again = shared.experts["task0"] if how == "same-path" else env.copy(shared.experts["task0"], "copy")
    config = env.df(experts={"task0": str(shared.experts["task0"]), "again": str(again),
                             "task1": str(shared.experts["task1"])})
    code, _, err = run_cli(env.merge(config), capfd)
    assert code == 0, err
    warnings = [line for line in err.splitlines() if line.startswith("layermerge: warning: ")]
    assert len(warnings) == 1 and "task0" in warnings[0] and "again" in warnings[0], err


def test_an_expert_identical_to_the_base_is_a_warning(shared: Shared, tmp_path, capfd):
    env = Env(tmp_path, shared)
    config = env.df(experts={"task0": str(shared.experts["task0"]), "same": str(shared.base)})
    code, _, err = run_cli(env.merge(config), capfd)
    assert code == 0, err
    warnings = [line for line in err.splitlines() if line.startswith("layermerge: warning: ")]
    assert len(warnings) == 1 and "same" in warnings[0], err
