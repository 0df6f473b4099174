"""`layermerge inspect`: task-vector statistics checked against a by-hand computation in numpy."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import build_family, tree_hashes
from safetensors.torch import load_file, save_file

from layermerge.cli import main
from layermerge.experts import ExpertSet
from layermerge.inspect import save_heatmap, task_vector_stats
from layermerge.io.reader import CheckpointReader

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def derived_expert(base_dir: Path, template: Path, target: Path, make_tau) -> Path:
    """An expert whose backbone is base + make_tau(key, base_tensor); the template gives head and config."""
    shutil.copytree(template, target)
    state = load_file(str(template / "model.safetensors"))
    base = CheckpointReader(base_dir)
    for key in base.keys():
        value = base.get(key)
        state["bert." + key] = value + make_tau(key, value)
    save_file(state, str(target / "model.safetensors"), metadata={"format": "pt"})
    return target


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    """A base and experts with known relations: random, sparse, 2×task0, −task0, and no change at all."""
    root = tmp_path_factory.mktemp("zoo")
    base, experts = build_family(root, "bert", n_experts=2)
    tau0 = {k[len("bert."):]: v for k, v in load_file(str(experts["task0"] / "model.safetensors")).items()}
    base_state = CheckpointReader(base).state_dict()
    tau0 = {k: tau0[k] - base_state[k] for k in base_state}
    generator = torch.Generator().manual_seed(7)
    template = experts["task1"]
    zoo = dict(experts)

    def sparse(key, value):
        keep = torch.rand(value.shape, generator=generator) < 0.3
        return torch.randn(value.shape, generator=generator) * 0.01 * keep

    zoo["sparse"] = derived_expert(base, template, root / "sparse", sparse)
    zoo["double"] = derived_expert(base, template, root / "double", lambda k, v: 2 * tau0[k])
    zoo["opposite"] = derived_expert(base, template, root / "opposite", lambda k, v: -tau0[k])
    zoo["same"] = derived_expert(base, template, root / "same", lambda k, v: torch.zeros_like(v))
    return base, zoo


@pytest.fixture(scope="module")
def zoo_stats(zoo):
    base, experts = zoo
    return task_vector_stats(ExpertSet(base, experts))


def by_hand(base: Path, experts: dict[str, Path]):
    """Flatten every backbone tensor in memory, in float64 numpy, independently of layermerge.inspect."""
    base_state = {k: v.double().numpy() for k, v in load_file(str(base / "model.safetensors")).items()}
    keys = sorted(base_state)
    taus = []
    for folder in experts.values():
        state = load_file(str(folder / "model.safetensors"))
        parts = [(state["bert." + k].double().numpy() - base_state[k]).ravel() for k in keys]
        taus.append(np.concatenate(parts))
    count = len(taus)
    norms = [float(np.sqrt(np.dot(t, t))) for t in taus]
    cosine = np.full((count, count), np.nan)
    conflict = np.full((count, count), np.nan)
    both = np.zeros((count, count), dtype=np.int64)
    for i in range(count):
        for j in range(count):
            if norms[i] > 0 and norms[j] > 0:
                cosine[i, j] = np.dot(taus[i], taus[j]) / (norms[i] * norms[j])
            mask = (taus[i] != 0) & (taus[j] != 0)
            both[i, j] = mask.sum()
            if mask.any():
                conflict[i, j] = np.mean(np.sign(taus[i][mask]) != np.sign(taus[j][mask]))
    base_norm = float(np.sqrt(sum(np.sum(v * v) for v in base_state.values())))
    return norms, cosine, conflict, both, base_norm, taus[0].size


def as_array(matrix) -> np.ndarray:
    return np.array([[np.nan if v is None else v for v in row] for row in matrix], dtype=float)


@pytest.mark.parametrize("chunk", [None, 1000], ids=["whole-tensors", "chunked"])
def test_statistics_match_an_in_memory_computation(zoo, zoo_stats, chunk):
    """Chunks of 1000 entries split most tensors at unaligned points; the sums must not notice."""
    base, experts = zoo
    stats = zoo_stats if chunk is None else task_vector_stats(ExpertSet(base, experts), chunk=chunk)
    norms, cosine, conflict, both, base_norm, numel = by_hand(base, experts)
    assert stats.names == list(experts)
    assert stats.numel == numel and stats.tensors == len(CheckpointReader(base).keys())
    np.testing.assert_allclose(stats.norms, norms, rtol=1e-6)
    assert stats.base_norm == pytest.approx(base_norm, rel=1e-9)
    np.testing.assert_allclose(as_array(stats.cosine), cosine, rtol=1e-6, atol=1e-9)
    np.testing.assert_array_equal(np.array(stats.both_nonzero), both)
    np.testing.assert_allclose(as_array(stats.sign_conflict), conflict, rtol=1e-12, atol=0)
    assert stats.nonfinite == [] and stats.checked_finite


def test_statistics_of_known_relations(zoo_stats):
    stats = zoo_stats
    index = {name: i for i, name in enumerate(stats.names)}
    t0, double, opposite, same = index["task0"], index["double"], index["opposite"], index["same"]
    assert stats.cosine[t0][double] == pytest.approx(1.0, abs=1e-6)
    assert stats.cosine[t0][opposite] == pytest.approx(-1.0, abs=1e-6)
    assert stats.norms[double] == pytest.approx(2 * stats.norms[t0], rel=1e-5)
    assert stats.sign_conflict[t0][double] == 0.0
    assert stats.sign_conflict[t0][opposite] == 1.0
    assert stats.norms[same] == 0.0
    assert stats.cosine[t0][same] is None and stats.sign_conflict[t0][same] is None
    assert stats.both_nonzero[t0][same] == 0
    # Independent random task vectors disagree on about half the entries both changed.
    assert 0.45 < stats.sign_conflict[t0][index["task1"]] < 0.55
    # The sparse expert changed ~30% of entries, so it shares about that many with task0.
    assert 0.25 < stats.both_nonzero[t0][index["sparse"]] / stats.numel < 0.35
    assert stats.cosine[t0][t0] == pytest.approx(1.0) and stats.sign_conflict[t0][t0] == 0.0


def test_heatmap_is_a_valid_png(zoo_stats, tmp_path):
    path = save_heatmap(zoo_stats, tmp_path / "plots" / "heat.png")
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    assert 600 <= width <= 3000 and 300 <= height <= 1500 and width > height  # two panels side by side
    assert 10_000 < len(data) < 2_000_000
    import matplotlib.image

    pixels = matplotlib.image.imread(path)
    assert pixels.shape[:2] == (height, width) and pixels.std() > 0.05  # not a blank canvas


def test_cli_inspect_prints_report_and_table_and_writes_files(zoo, tmp_path, capsys):
    base, experts = zoo
    before = tree_hashes([base, *experts.values()])
    args = ["inspect", str(base), f"first={experts['task0']}", str(experts["task1"]),
            str(experts["opposite"]), "--heatmap", str(tmp_path / "h.png"),
            "--json", str(tmp_path / "s.json"), "--quiet"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "compatibility: OK" in out and "merged tensors: 39" in out
    assert "per-task head 'first': 2 tensors 'classifier.bias', 'classifier.weight'" in out
    assert "expert 'bert-task1'" in out and "expert 'opposite'" in out  # default names: folder names
    assert "cosine similarity of task vectors" in out and "sign-conflict rate" in out
    assert "free of NaN/Inf" in out
    record = json.loads((tmp_path / "s.json").read_text())
    stats = record["statistics"]
    assert stats["tasks"] == ["first", "bert-task1", "opposite"]
    assert stats["cosine"][0][2] == pytest.approx(-1.0, abs=1e-6) and stats["sign_conflict"][0][2] == 1.0
    assert record["report"]["head_keys"]["first"] == ["classifier.bias", "classifier.weight"]
    assert record["experts"]["first"]["prefix"] == "bert."
    assert (tmp_path / "h.png").read_bytes()[:4] == b"\x89PNG"
    assert tree_hashes([base, *experts.values()]) == before


def test_cli_names_option(zoo, capsys):
    base, experts = zoo
    args = ["inspect", str(base), str(experts["task0"]), str(experts["task1"]), "--names", "a,b", "-q"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "expert 'a'" in out and "expert 'b'" in out


@pytest.mark.parametrize("extra, message", [
    (["--names", "a"], "--names lists 1 names"),
    (["--names", "x,x"], "two experts are named 'x'"),
])
def test_cli_bad_names(zoo, capsys, extra, message):
    base, experts = zoo
    assert main(["inspect", str(base), str(experts["task0"]), str(experts["task1"]), *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_cli_incompatible_expert_is_a_one_line_error(zoo, tmp_path, capsys):
    base, experts = zoo
    _, gpt2 = build_family(tmp_path, "gpt2", n_experts=1)
    capsys.readouterr()
    assert main(["inspect", str(base), str(experts["task0"]), str(gpt2["task0"])]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("layermerge: error: different model_type")
    assert captured.err.count("\n") == 1
    assert "Traceback" not in captured.err


@pytest.fixture(scope="module")
def poisoned(zoo, tmp_path_factory):
    """task1 with a NaN in one backbone weight and an Inf in its classifier."""
    base, experts = zoo
    target = tmp_path_factory.mktemp("poison") / "task1-nan"
    shutil.copytree(experts["task1"], target)
    state = load_file(str(target / "model.safetensors"))
    state["bert.encoder.layer.0.output.dense.weight"][1, 2] = float("nan")
    state["classifier.weight"][0, 0] = float("inf")
    save_file(state, str(target / "model.safetensors"), metadata={"format": "pt"})
    return base, {"task0": experts["task0"], "task1": target}


def test_non_finite_values_are_all_listed(poisoned, capsys):
    base, experts = poisoned
    stats = task_vector_stats(ExpertSet(base, experts))
    found = {(item.checkpoint, item.key, item.count) for item in stats.nonfinite}
    assert found == {("task1", "encoder.layer.0.output.dense.weight", 1), ("task1", "classifier.weight", 1)}
    args = ["inspect", str(base), *(f"{k}={v}" for k, v in experts.items()), "-q"]
    assert main(args) == 2
    captured = capsys.readouterr()
    assert "compatibility: OK" in captured.out  # metadata is fine; values are not
    assert captured.err.count("\n") == 1 and "2 tensors hold NaN/Inf" in captured.err
    assert "'encoder.layer.0.output.dense.weight'" in captured.err and "'classifier.weight'" in captured.err


def test_check_finite_can_be_turned_off(poisoned, tmp_path, capsys):
    base, experts = poisoned
    stats = task_vector_stats(ExpertSet(base, experts), check_finite=False)
    assert stats.nonfinite == [] and not stats.checked_finite
    args = ["inspect", str(base), *(f"{k}={v}" for k, v in experts.items()), "-q", "--no-check-finite",
            "--json", str(tmp_path / "s.json")]
    assert main(args) == 0
    assert "free of NaN/Inf" not in capsys.readouterr().out
    record = json.loads((tmp_path / "s.json").read_text(), parse_constant=lambda c: pytest.fail(f"bare {c}"))
    assert record["statistics"]["cosine"][0][1] is None  # undefined values are null, not NaN


def test_vocab_policy_base_rows_in_inspect(tmp_path, capsys):
    from transformers import AutoModelForSequenceClassification

    base, experts = build_family(tmp_path, "bert", n_experts=2)
    model = AutoModelForSequenceClassification.from_pretrained(experts["task1"])
    model.resize_token_embeddings(103, mean_resizing=False)
    model.save_pretrained(tmp_path / "grown")
    args = ["inspect", str(base), str(experts["task0"]), f"grown={tmp_path / 'grown'}", "-q"]
    assert main(args) == 2
    assert "vocab_policy" in capsys.readouterr().err
    assert main([*args, "--vocab-policy", "base_rows"]) == 0
    assert "merging the 1 embedding tensors' rows" in capsys.readouterr().out
    stats = task_vector_stats(ExpertSet(base, {"a": experts["task0"], "b": tmp_path / "grown"},
                                        vocab_policy="base_rows"))
    assert stats.numel == sum(CheckpointReader(base).numel(k) for k in CheckpointReader(base).keys())
