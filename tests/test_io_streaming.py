"""The low-memory paths of reading and writing: streamed shards, hashes fed by the reads, finiteness.

These back the data-free memory benchmark (docs/BENCHMARKS.md): the writer must produce ordinary
safetensors shards without holding a shard in memory, and the model card's input hashes must be
exactly the files' sha256 whichever order the merge reads tensors in.
"""

from __future__ import annotations

import hashlib
import json
import random

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from layermerge.errors import OutputError
from layermerge.experts import _all_finite
from layermerge.io.reader import CheckpointReader
from layermerge.io.writer import ShardedSafetensorsWriter
from layermerge.methods.base import task_vectors


def _sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _mixed_tensors() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {
        "a.weight": torch.randn(3, 5, generator=generator),
        "b.bf16": torch.randn(7, generator=generator).bfloat16(),
        "c.int": torch.arange(5),
        "d.empty": torch.zeros(0, 3),
        "e.scalar": torch.tensor(3.5),
        "f.bool": torch.tensor([True, False, True]),
        "g.big": torch.randn(300, generator=generator),
        "h.half": torch.randn(2, 2, generator=generator).half(),
        "i.view": torch.randn(6, 4, generator=generator)[:, 1],  # a non-contiguous view
    }


def test_streamed_shards_are_ordinary_safetensors(tmp_path):
    tensors = _mixed_tensors()
    writer = ShardedSafetensorsWriter(tmp_path, max_shard_bytes=1000)
    for key, tensor in tensors.items():
        writer.add(key, tensor)
    names = writer.close()
    assert len(names) == 3 and all(n.endswith(f"-of-{len(names):05d}.safetensors") for n in names)
    assert not list(tmp_path.glob("*.data")), "scratch data files must be removed"
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert sorted(index["weight_map"]) == sorted(tensors)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    loaded = {}
    for name in names:
        with safe_open(str(tmp_path / name), framework="pt") as handle:
            assert handle.metadata() == {"format": "pt"}
        loaded.update(load_file(tmp_path / name))
    for key, tensor in tensors.items():
        assert loaded[key].dtype == tensor.dtype and torch.equal(loaded[key], tensor), key
    # No shard exceeds the limit unless a single tensor does.
    for name in names:
        keys = [k for k, v in index["weight_map"].items() if v == name]
        size = sum(tensors[k].numel() * tensors[k].element_size() for k in keys)
        assert size <= 1000 or len(keys) == 1


def test_single_shard_and_duplicate_keys(tmp_path):
    writer = ShardedSafetensorsWriter(tmp_path, max_shard_bytes=10**9)
    writer.add("x", torch.ones(4))
    with pytest.raises(OutputError, match="'x' was written twice"):
        writer.add("x", torch.ones(4))
    assert writer.close() == ["model.safetensors"]
    assert torch.equal(load_file(tmp_path / "model.safetensors")["x"], torch.ones(4))
    assert ShardedSafetensorsWriter(tmp_path / "none", max_shard_bytes=10).close() == []


@pytest.mark.parametrize("order", ["file", "reversed", "shuffled", "none", "twice", "some"])
def test_hashes_fed_by_reads_equal_the_files_sha256(tmp_path, order):
    tensors = _mixed_tensors()
    folder = tmp_path / "model"
    folder.mkdir()
    writer = ShardedSafetensorsWriter(folder, max_shard_bytes=400)
    for key, tensor in tensors.items():
        writer.add(key, tensor)
    writer.close()
    save_file({"solo": torch.randn(10)}, str(tmp_path / "solo.safetensors"))  # safetensors' own layout
    for path in (folder, tmp_path / "solo.safetensors"):
        reader = CheckpointReader(path)
        keys = reader.keys()
        if order == "reversed":
            keys = keys[::-1]
        elif order == "shuffled":
            random.Random(1).shuffle(keys)
        elif order == "none":
            keys = []
        elif order == "twice":
            keys = keys + keys
        elif order == "some":
            keys = keys[1::2]
        for key in keys:
            reader.get(key)
        expected = {str(p): _sha256(p) for p in reader.weight_files}
        assert reader.file_hashes() == expected
        assert reader.file_hashes() == expected  # cached, and still right when asked again
        for key in reader.keys():  # reads after the digest is final change nothing
            reader.get(key)
        assert reader.file_hashes() == expected


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_all_finite_is_exact(dtype):
    for size in (1, 7, 64, 1000, 70_000):
        clean = torch.randn(size).to(dtype)
        assert _all_finite(clean)
        for position in {0, size // 2, size - 1}:
            for bad in (float("nan"), float("inf"), -float("inf")):
                broken = clean.clone()
                broken[position] = bad
                assert not _all_finite(broken), (size, position, bad)
    assert _all_finite(torch.zeros(0))


def test_task_vectors_subtract_into_one_stack():
    generator = torch.Generator().manual_seed(0)
    base = torch.randn(5, 6, generator=generator)
    experts = [base + torch.randn(5, 6, generator=generator) for _ in range(3)]
    assert torch.equal(task_vectors(base, experts), torch.stack([e - base for e in experts]))
    assert task_vectors(base.half(), [e.half() for e in experts]).dtype == torch.float16
    assert task_vectors(base.half(), experts).dtype == torch.float32  # promoted like e - base
    leaf = base.clone().requires_grad_(True)
    stacked = task_vectors(leaf, experts)  # autograd still works (ProDistill differentiates through it)
    stacked.sum().backward()
    assert torch.equal(leaf.grad, torch.full_like(base, -3.0))
