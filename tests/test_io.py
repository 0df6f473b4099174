"""Checkpoint reading (every supported layout, safely, lazily) and atomic sharded writing."""

from __future__ import annotations

import json
import pickle
import re

import pytest
import torch
from conftest import make_config, tree_hashes
from safetensors.torch import save_file

import layermerge.io.reader as reader_module
from layermerge.errors import CheckpointError, OutputError
from layermerge.io.reader import CheckpointReader, sha256_of_file
from layermerge.io.writer import CheckpointWriter, check_output_location, parse_size

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny_bert():
    """A tiny BertModel and its state dict (the reference every layout is compared with)."""
    from transformers import AutoModel

    torch.manual_seed(0)
    model = AutoModel.from_config(make_config("bert")).eval()
    return model, {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_state(reader: CheckpointReader, expected: dict[str, torch.Tensor]) -> None:
    assert sorted(reader.keys()) == sorted(expected)
    for key, tensor in expected.items():
        assert reader.shape(key) == tuple(tensor.shape), key
        assert reader.dtype(key) == tensor.dtype, key
        assert torch.equal(reader.get(key), tensor), key


def write_sharded_bin(folder, state: dict[str, torch.Tensor], shards: int = 3) -> None:
    """The legacy sharded layout (transformers 5 no longer writes .bin): shards plus an index."""
    folder.mkdir(parents=True, exist_ok=True)
    keys = list(state)
    weight_map = {}
    for number in range(shards):
        name = f"pytorch_model-{number + 1:05d}-of-{shards:05d}.bin"
        part = {k: state[k] for k in keys[number::shards]}
        torch.save(part, folder / name)
        weight_map.update({k: name for k in part})
    index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps(index))


# --------------------------------------------------------------------------- reading layouts
def test_single_safetensors_folder(tmp_path, tiny_bert):
    model, state = tiny_bert
    model.save_pretrained(tmp_path / "m")
    reader = CheckpointReader(tmp_path / "m")
    assert_same_state(reader, state)
    assert reader.folder == (tmp_path / "m").resolve()
    assert reader.config["model_type"] == "bert" and reader.model_type == "bert"
    assert [p.name for p in reader.weight_files] == ["model.safetensors"]
    digest = sha256_of_file(tmp_path / "m" / "model.safetensors")
    assert reader.file_hashes() == {str((tmp_path / "m" / "model.safetensors").resolve()): digest}


def test_sharded_safetensors_index(tmp_path, tiny_bert):
    model, state = tiny_bert
    model.save_pretrained(tmp_path / "m", max_shard_size="40KB")
    assert (tmp_path / "m" / "model.safetensors.index.json").is_file()
    reader = CheckpointReader(tmp_path / "m")
    assert len(reader.weight_files) > 1
    assert_same_state(reader, state)


def test_pytorch_model_bin_folder(tmp_path, tiny_bert):
    model, state = tiny_bert
    folder = tmp_path / "m"
    model.config.save_pretrained(folder)
    torch.save(state, folder / "pytorch_model.bin")
    reader = CheckpointReader(folder)
    assert_same_state(reader, state)
    assert reader.model_type == "bert"


def test_sharded_bin_index(tmp_path, tiny_bert):
    _, state = tiny_bert
    write_sharded_bin(tmp_path / "m", state)
    reader = CheckpointReader(tmp_path / "m")
    assert len(reader.weight_files) == 3
    assert_same_state(reader, state)


def test_bare_safetensors_and_pt_files(tmp_path, tiny_bert):
    _, state = tiny_bert
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "w.safetensors"))
    torch.save(state, tmp_path / "w.pt")
    torch.save({"state_dict": state, "epoch": 3}, tmp_path / "ckpt.pth")  # a training checkpoint
    for name in ("w.safetensors", "w.pt", "ckpt.pth"):
        reader = CheckpointReader(tmp_path / name)
        assert reader.folder is None
        assert reader.config is None  # no config.json beside the file
        assert_same_state(reader, state)


def test_get_returns_an_independent_copy(tmp_path, tiny_bert):
    _, state = tiny_bert
    torch.save(state, tmp_path / "w.pt")
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "w.safetensors"))
    for name in ("w.pt", "w.safetensors"):
        reader = CheckpointReader(tmp_path / name)
        key = "embeddings.word_embeddings.weight"
        reader.get(key).zero_()
        assert torch.equal(reader.get(key), state[key])


# --------------------------------------------------------------------------- safe loading
class NotATensor:
    """Unpickling this would run arbitrary code paths; weights-only loading must refuse it."""


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_pickle_with_an_object_is_refused(tmp_path, zip_format):
    path = tmp_path / "evil.pt"
    torch.save({"w": torch.zeros(2), "payload": NotATensor()}, path,
               _use_new_zipfile_serialization=zip_format)
    with pytest.raises(CheckpointError) as info:
        CheckpointReader(path)
    message = str(info.value)
    assert str(path) in message and "weights_only" in message
    assert "\n" not in message  # the CLI prints it on one line


def test_pickle_of_a_non_state_dict_is_refused(tmp_path):
    torch.save([torch.zeros(2)], tmp_path / "list.pt")
    with pytest.raises(CheckpointError, match="not a state dict of tensors"):
        CheckpointReader(tmp_path / "list.pt")


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_garbage_files_give_checkpoint_errors(tmp_path):
    (tmp_path / "junk.pt").write_bytes(pickle.dumps("x")[:3])
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 4)
    (tmp_path / "weights.npz").write_bytes(b"")
    for name, pattern in (("junk.pt", "cannot load"), ("junk.safetensors", "cannot read safetensors"),
                          ("weights.npz", "unsupported checkpoint file")):
        with pytest.raises(CheckpointError, match=pattern):
            CheckpointReader(tmp_path / name)


def test_missing_and_empty_inputs(tmp_path):
    with pytest.raises(CheckpointError, match="model not found: .*nowhere"):
        CheckpointReader(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match=r"no weights found in folder .*empty.*config\.json"):
        CheckpointReader(tmp_path / "empty")


def test_index_listing_a_missing_shard(tmp_path, tiny_bert):
    model, _ = tiny_bert
    model.save_pretrained(tmp_path / "m", max_shard_size="40KB")
    shard = sorted((tmp_path / "m").glob("model-*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(CheckpointError, match=re.escape(shard.name) + ".*missing"):
        CheckpointReader(tmp_path / "m")


def test_unknown_key_names_the_checkpoint(tmp_path, tiny_bert):
    model, _ = tiny_bert
    model.save_pretrained(tmp_path / "m")
    with pytest.raises(CheckpointError, match="'no.such.key' not found in checkpoint"):
        CheckpointReader(tmp_path / "m").get("no.such.key")


# --------------------------------------------------------------------------- laziness
def test_safetensors_reader_loads_no_tensor_until_asked(tmp_path, tiny_bert, monkeypatch):
    model, state = tiny_bert
    model.save_pretrained(tmp_path / "single")
    model.save_pretrained(tmp_path / "sharded", max_shard_size="40KB")
    loaded, opened = [], []
    real_safe_open = reader_module.safe_open

    class SpyHandle:
        def __init__(self, path, framework):
            opened.append(path)
            self._handle = real_safe_open(path, framework=framework)

        def __enter__(self):
            self._inner = self._handle.__enter__()
            return self

        def __exit__(self, *exc):
            return self._handle.__exit__(*exc)

        def keys(self):
            return self._inner.keys()

        def get_slice(self, key):
            return self._inner.get_slice(key)

        def get_tensor(self, key):
            loaded.append(key)
            return self._inner.get_tensor(key)

    monkeypatch.setattr(reader_module, "safe_open", SpyHandle)
    single = CheckpointReader(tmp_path / "single")
    sharded = CheckpointReader(tmp_path / "sharded")
    assert opened == [str(tmp_path / "single" / "model.safetensors")]  # the index alone names sharded keys
    for reader in (single, sharded):
        assert [reader.shape(k) for k in reader.keys()] == [tuple(state[k].shape) for k in reader.keys()]
    assert loaded == []  # metadata came from headers only
    key = "encoder.layer.1.output.dense.weight"
    assert torch.equal(sharded.get(key), state[key])
    assert loaded == [key]


def test_pickled_weights_are_memory_mapped_weights_only(tmp_path, tiny_bert, monkeypatch):
    _, state = tiny_bert
    torch.save(state, tmp_path / "w.bin")
    calls = []
    real_load = torch.load

    def spy_load(*args, **kwargs):
        calls.append(kwargs)
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy_load)
    reader = CheckpointReader(tmp_path / "w.bin")
    reader.get("pooler.dense.bias")
    assert calls and all(c.get("weights_only") is True for c in calls)
    assert calls[0].get("mmap") is True  # storage is paged in by the OS, not read at construction
    assert len(calls) == 1  # loaded once, cached


# --------------------------------------------------------------------------- writing
def test_sharded_writer_output_loads_with_transformers(tmp_path, tiny_bert):
    from transformers import AutoModel

    model, state = tiny_bert
    model.save_pretrained(tmp_path / "src")
    before = tree_hashes([tmp_path / "src"])
    out = tmp_path / "out"
    with CheckpointWriter(out, inputs=[tmp_path / "src"], max_shard_size="30KB") as writer:
        for key, tensor in state.items():
            writer.add_tensor(key, tensor)
        copied = writer.copy_base_files(tmp_path / "src")
    assert copied == ["config.json"]
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    count = len(shards)
    assert count > 2
    assert shards == [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert sorted(index["weight_map"]) == sorted(state)
    assert set(index["weight_map"].values()) == set(shards)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in state.values())
    for name in shards:  # every shard respects the limit unless it holds one oversized tensor
        keys = [k for k, v in index["weight_map"].items() if v == name]
        size = sum(state[k].numel() * state[k].element_size() for k in keys)
        assert size <= 30_000 or len(keys) == 1
    loaded = AutoModel.from_pretrained(out).eval()
    for key, tensor in loaded.state_dict().items():
        assert torch.equal(tensor, state[key]), key
    assert tree_hashes([tmp_path / "src"]) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]  # no temp or scratch left


def test_single_shard_has_no_index(tmp_path, tiny_bert):
    _, state = tiny_bert
    with CheckpointWriter(tmp_path / "out") as writer:
        for key, tensor in state.items():
            writer.add_tensor(key, tensor)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["model.safetensors"]
    assert_same_state(CheckpointReader(tmp_path / "out"), state)


def test_exception_inside_the_writer_leaves_nothing(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="boom"):
        with CheckpointWriter(out, max_shard_size="1KB") as writer:
            for index in range(4):
                writer.add_tensor(f"t{index}", torch.ones(200))
            writer.write_text("README.md", "half done")
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_failure_while_finishing_leaves_nothing(tmp_path, monkeypatch):
    import layermerge.io.writer as writer_module

    def fail(self):
        raise OSError("No space left on device")

    monkeypatch.setattr(writer_module.ShardedSafetensorsWriter, "close", fail)
    with pytest.raises(OSError, match="No space"):
        with CheckpointWriter(tmp_path / "out") as writer:
            writer.add_tensor("t", torch.ones(3))
    assert list(tmp_path.iterdir()) == []


def test_failed_overwrite_keeps_the_old_output(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with CheckpointWriter(out, overwrite=True) as writer:
            writer.add_tensor("t", torch.ones(3))
            raise RuntimeError("boom")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert (out / "keep.txt").read_text() == "old"


def test_existing_output_refused_then_replaced_with_overwrite(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(OutputError, match="already exists.*overwrite"):
        CheckpointWriter(out)
    assert (out / "old.txt").is_file()
    with CheckpointWriter(out, overwrite=True) as writer:
        writer.add_tensor("t", torch.arange(3.0))
    assert sorted(p.name for p in out.iterdir()) == ["model.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # the backup was removed
    assert torch.equal(CheckpointReader(out).get("t"), torch.arange(3.0))


def test_output_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "out").write_text("x")
    with pytest.raises(OutputError, match="not a folder"):
        CheckpointWriter(tmp_path / "out", overwrite=True)


def test_output_overlapping_an_input_is_refused(tmp_path):
    model_dir = tmp_path / "models" / "base"
    model_dir.mkdir(parents=True)
    (model_dir / "model.safetensors").write_bytes(b"")
    weights = tmp_path / "files" / "w.safetensors"
    weights.parent.mkdir()
    weights.write_bytes(b"")
    before = tree_hashes([tmp_path])
    for output in (model_dir, model_dir / "merged", tmp_path / "models", tmp_path):
        for overwrite in (False, True):
            with pytest.raises(OutputError, match="overlaps the input"):
                check_output_location(output, [model_dir], overwrite=overwrite)
    # A bare weights file: its own path, and the folders above it, are inputs too.
    for output in (weights, tmp_path / "files"):
        with pytest.raises(OutputError, match="overlaps the input"):
            check_output_location(output, [weights], overwrite=True)
    # A folder beside a bare weights file is fine.
    check_output_location(tmp_path / "files" / "merged", [weights], overwrite=False)
    check_output_location(tmp_path / "elsewhere", [model_dir], overwrite=False)
    assert tree_hashes([tmp_path]) == before


def test_parse_size():
    assert parse_size("5GB") == 5 * 10**9
    assert parse_size("500MB") == 500 * 10**6
    assert parse_size("2 kb") == 2000
    assert parse_size("1.5GiB") == int(1.5 * 2**30)
    assert parse_size("3MiB") == 3 * 2**20
    assert parse_size("10B") == 10
    assert parse_size("123") == 123
    assert parse_size(4096) == 4096
    for bad in ("five GB", "5XB", "", "-1MB", "0", 0):
        with pytest.raises(OutputError, match="size"):
            parse_size(bad)


def test_inputs_unchanged_by_reading(tmp_path, tiny_bert):
    model, state = tiny_bert
    model.save_pretrained(tmp_path / "a", max_shard_size="40KB")
    torch.save(state, tmp_path / "b.pt")
    before = tree_hashes([tmp_path])
    for path in (tmp_path / "a", tmp_path / "b.pt"):
        reader = CheckpointReader(path)
        reader.state_dict()
        reader.file_hashes()
    assert tree_hashes([tmp_path]) == before
