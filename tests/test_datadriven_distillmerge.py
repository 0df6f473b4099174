"""DistillMerge: lr 0 is Task Arithmetic, its loss is the end-to-end feature error computed by hand,
training lowers it, and the gradient reaches the first block through the whole stack."""

from __future__ import annotations

import copy

import pytest
import torch
from test_prodistill import setup_toy

import layermerge
from layermerge.engine import StateDictSource, run_engine
from layermerge.errors import ConfigError
from layermerge.io.reader import CheckpointReader
from layermerge.methods.distillmerge import DistillMerge

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def distillmerge(base, experts, data, **params):
    method = DistillMerge(DistillMerge.Params(**params))
    return run_engine(copy.deepcopy(base), StateDictSource.from_models(base, experts), data, method,
                      scaling=method.params.init, seed=2)


def features(model, batch) -> torch.Tensor:
    """The output of the last block (the input of the head), by running the modules by hand."""
    hidden = model.embed(batch["x"])
    for layer in model.layers:
        hidden = layer(hidden, scale=1.0)
    return hidden


def task_arithmetic_model(base, experts, scaling=0.3):
    merged = copy.deepcopy(base)
    merged.load_state_dict({k: v + scaling * sum(e.state_dict()[k] - v for e in experts.values())
                            for k, v in base.state_dict().items()})
    return merged


def hand_loss(merged, experts, data) -> float:
    """Σ_i 1/(2T|D_i|) Σ_x ‖F_merged(x) − F_i(x)‖², F = final features."""
    total = 0.0
    with torch.no_grad():
        for task, expert in experts.items():
            count = sum(len(batch["x"]) for batch in data[task])
            for batch in data[task]:
                error = (features(merged, batch) - features(expert, batch)).pow(2).sum()
                total += float(error) / (2 * len(experts) * count)
    return total


def test_lr_zero_is_task_arithmetic_and_loss_matches_hand_computation():
    base, experts, data = setup_toy()
    result = distillmerge(base, experts, data, lr=0.0, epochs=3)
    ta = task_arithmetic_model(base, experts)
    for key, tensor in ta.state_dict().items():
        assert torch.equal(result.state_dict[key], tensor), key
    assert result.block_stats[-1]["loss_final"] == pytest.approx(hand_loss(ta, experts, data), rel=1e-5)
    assert result.artifacts[0]["a/linear.weight"].shape == (8, 8)


def test_training_lowers_the_end_to_end_loss_and_reaches_the_first_block():
    base, experts, data = setup_toy()
    result = distillmerge(base, experts, data, lr=0.05, epochs=40, batch_size=8)
    stats = result.block_stats[-1]
    losses = stats["epoch_losses"]
    assert losses[-1] < 0.2 * losses[0] and stats["loss_final"] < 0.2 * losses[0]
    merged = copy.deepcopy(base)
    merged.load_state_dict(result.state_dict)
    assert stats["loss_final"] == pytest.approx(hand_loss(merged, experts, data), rel=1e-4)
    assert hand_loss(merged, experts, data) < 0.2 * hand_loss(task_arithmetic_model(base, experts), experts, data)
    # The first block has no loss of its own here: its λ moved only through backpropagation from the end.
    assert not torch.all(result.artifacts[0]["a/linear.weight"] == 0.3)
    assert result.artifacts[0]["a/linear.weight"][4:, 4:].eq(0.3).all()        # τ = 0 there: no gradient


def test_distillmerge_through_merge_writes_its_coefficients(family_models, tmp_path):
    base, experts = family_models["bert"]
    generator = torch.Generator().manual_seed(0)
    data = {task: [{"input_ids": torch.randint(3, 99, (2, 5), generator=generator)}] for task in experts}
    out = tmp_path / "distillmerge"
    layermerge.merge(base, experts, method="distillmerge", data=data, output=out, lr=0.0, epochs=1, quiet=True,
                     device="cpu")
    reference = layermerge.merge(base, experts, method="task_arithmetic", quiet=True).state_dict
    merged = CheckpointReader(out)
    assert all(torch.equal(merged.get(k), v) for k, v in reference.items())
    assert (out / "distillmerge" / "coefficients.safetensors").is_file()
    assert not (tmp_path / "distillmerge.checkpoint").exists()
    with pytest.raises(ConfigError, match="no per-block checkpoints"):
        layermerge.merge(base, experts, method="distillmerge", data=data, output=tmp_path / "x", resume=True,
                         quiet=True)


@pytest.mark.parametrize("method", ["distillmerge", "prodistill"])
def test_epochs_show_a_progress_bar_unless_quiet(method, capsys, monkeypatch):
    """DistillMerge trains every block at once for many minutes: without an epochs bar the screen stood
    still. ProDistill shows it under its blocks bar. (capsys is no terminal: plain lines, one per update.)"""
    import layermerge.progress
    from layermerge.methods.prodistill import ProDistill

    monkeypatch.setattr(layermerge.progress, "PLAIN_INTERVAL", 0.0)

    base, experts, data = setup_toy()
    merger = DistillMerge(DistillMerge.Params(epochs=3)) if method == "distillmerge" else ProDistill(
        ProDistill.Params(epochs=3), list(experts))
    for quiet in (False, True):
        run_engine(copy.deepcopy(base), StateDictSource.from_models(base, experts), data, merger,
                   scaling=0.3, quiet=quiet)
        shown = capsys.readouterr().err
        assert ("epochs 1/3 (33%)" in shown) is not quiet, shown
