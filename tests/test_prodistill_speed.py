"""The fast path of the learned-coefficient methods (issue 15): W(λ) with a one-pass backward, batches
regrouped by length with no compute on padding, early stopping, bfloat16 matmuls, determinism."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import randomise_batch_norms_

from layermerge.engine import StateDictSource
from layermerge.engine.batching import group_by_length, padding_share
from layermerge.engine.context import PairRef
from layermerge.engine.precision import matmul_precision
from layermerge.methods.coefficients import combine
from layermerge.methods.fitting import StoppingRule
from layermerge.methods.prodistill import prodistill_merge

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# --------------------------------------------------------------------- W(λ)
def loop_of_addcmul(start, delta, vectors):
    merged = start
    for position in range(delta.shape[0]):
        merged = torch.addcmul(merged, delta[position], vectors[position])
    return merged


@pytest.mark.parametrize("delta_shape", ["element", "tensor"])
def test_combine_matches_plain_autograd(delta_shape):
    """Same values and gradients as autograd through the addcmul loop it replaces (bit for bit for
    element-wise λ; one λ per tensor sums the same products in another order)."""
    generator = torch.Generator().manual_seed(0)
    start = torch.randn(5, 7, generator=generator)
    vectors = torch.randn(3, 5, 7, generator=generator)
    shape = (3, 5, 7) if delta_shape == "element" else (3, 1, 1)
    weight = torch.randn(5, 7, generator=generator)
    deltas = [torch.randn(shape, generator=generator).mul_(0.1).requires_grad_() for _ in range(2)]
    deltas[1].data.copy_(deltas[0].data)
    fast = combine(start, deltas[0], vectors)
    slow = loop_of_addcmul(start, deltas[1], vectors)
    assert torch.equal(fast, slow)
    (fast * weight).sum().backward()
    (slow * weight).sum().backward()
    if delta_shape == "element":
        assert torch.equal(deltas[0].grad, deltas[1].grad)
    else:
        torch.testing.assert_close(deltas[0].grad, deltas[1].grad, rtol=1e-6, atol=1e-6)
    zero = torch.zeros(shape)
    assert torch.equal(combine(start, zero, vectors), start)     # δ = 0: exactly the start (Task Arithmetic)


# --------------------------------------------------------------------- stopping
def test_stopping_rule():
    rule = StoppingRule(patience=2, tolerance=0.01)
    assert rule.stopped_at([10.0, 5.0, 4.0]) is None
    assert rule.stopped_at([10.0, 5.0, 4.99, 4.98]) == 4          # two epochs under 1 % better than 5.0
    assert rule.stopped_at([10.0, 5.0, 4.99, 4.0, 3.99]) is None  # 4.0 was progress: the wait restarts
    assert rule.stopped_at([10.0, 5.0, 6.0, 7.0]) == 4           # worse counts as no progress
    assert StoppingRule().stopped_at([1.0] * 50) is None          # patience 0: never
    with pytest.raises(ValueError):
        StoppingRule(patience=-1)


def toy_setup():
    from test_prodistill import setup_toy

    return setup_toy()


def test_prodistill_stops_a_block_when_its_loss_flattens():
    base, experts, data = toy_setup()
    source = StateDictSource.from_models(base, experts)
    full = prodistill_merge(copy.deepcopy(base), source, data, lr=0.05, epochs=60, batch_size=4, patience=0)
    early = prodistill_merge(copy.deepcopy(base), source, data, lr=0.05, epochs=60, batch_size=4,
                             patience=2, tolerance=0.05)
    rule = StoppingRule(2, 0.05)
    for full_stats, stats in zip(full.block_stats, early.block_stats):
        assert full_stats["epochs_run"] == 60
        assert stats["epochs_run"] < 60
        assert len(stats["epoch_losses"]) == stats["epochs_run"]
        assert rule.stopped_at(stats["epoch_losses"]) == stats["epochs_run"]
    # the same run up to the stop: the first block's epochs are the full run's first epochs (later blocks
    # start from other inputs, the earlier blocks having stopped)
    first, first_full = early.block_stats[0], full.block_stats[0]
    assert first["epoch_losses"] == first_full["epoch_losses"][:first["epochs_run"]]


# --------------------------------------------------------------------- regrouping by length
def right_padded(rows: list[list[int]], pad: int = 7) -> dict:
    width = max(len(row) for row in rows)
    ids = torch.full((len(rows), width), pad)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for position, row in enumerate(rows):
        ids[position, :len(row)] = torch.tensor(row)
        mask[position, :len(row)] = 1
    return {"input_ids": ids, "attention_mask": mask, "label_like": torch.arange(len(rows)) + 100 * width}


def examples_of(batches) -> list[tuple]:
    found = []
    for batch in batches:
        for row in range(batch["input_ids"].shape[0]):
            length = int(batch["attention_mask"][row].sum())
            found.append((tuple(batch["input_ids"][row, :length].tolist()), int(batch["label_like"][row])))
    return sorted(found)


def test_group_by_length_keeps_every_example_and_trims_the_padding():
    batches = [right_padded([[1, 2, 3, 4, 5, 6], [1], [2, 2]]), right_padded([[3, 3, 3, 3, 3], [4], [5, 5, 5]])]
    grouped, units = group_by_length(batches)
    assert units == [0, 1]
    assert examples_of(grouped) == examples_of(batches)
    assert [batch["input_ids"].shape for batch in grouped] == [(3, 6), (3, 2)]
    for batch in grouped:
        lengths = batch["attention_mask"].sum(1)
        assert int(lengths.max()) == batch["input_ids"].shape[1]              # trimmed to its longest
        assert torch.all(batch["input_ids"][batch["attention_mask"] == 0] == 7)   # the batches' own padding id
    assert padding_share(grouped) < padding_share(batches)


def test_batch_cuts_leave_the_fewest_padded_positions():
    """Against every way of cutting small sorted length lists into the same number of batches."""
    import itertools
    import random

    from layermerge.engine.batching import LARGEST_BATCH, batch_cuts

    def positions(lengths, cuts):
        return sum(lengths[start] * (end - start) for start, end in zip(cuts, cuts[1:]))

    generator = random.Random(0)
    for _ in range(200):
        size = generator.randint(1, 4)
        lengths = sorted((generator.randint(1, 30) for _ in range(generator.randint(1, 11))), reverse=True)
        count = -(-len(lengths) // size)
        cuts = batch_cuts(lengths, size)
        assert cuts[0] == 0 and cuts[-1] == len(lengths) and len(cuts) == count + 1
        assert all(0 < end - start <= LARGEST_BATCH * size for start, end in zip(cuts, cuts[1:]))
        fewest = min(positions(lengths, [0, *inner, len(lengths)])
                     for inner in itertools.combinations(range(1, len(lengths)), count - 1)
                     if all(0 < b - a <= LARGEST_BATCH * size
                            for a, b in zip([0, *inner], [*inner, len(lengths)])))
        assert positions(lengths, cuts) == fewest
    assert batch_cuts([9, 2, 2, 2, 2, 2, 2, 2], 4) == [0, 1, 8]             # one long example on its own
    assert batch_cuts([3, 3, 3, 3, 3, 3], 2) == [0, 2, 4, 6]                # no saving: cut every ``size``


def test_call_cuts_cost_the_fewest_positions_and_calls():
    """Against every way of cutting small sorted length lists into pieces: padded positions plus
    ``call_cost`` per piece are fewest, and one piece when nothing pays."""
    import itertools
    import random

    from layermerge.engine.batching import CALL_COST, call_cuts

    def cost(lengths, cuts, call_cost):
        return sum(lengths[a] * (b - a) + call_cost for a, b in zip(cuts, cuts[1:]))

    generator = random.Random(1)
    for _ in range(300):
        call_cost = generator.choice([0, 2, 5, CALL_COST])
        lengths = sorted((generator.randint(1, 40) for _ in range(generator.randint(1, 11))), reverse=True)
        cuts = call_cuts(lengths, call_cost)
        assert cuts[0] == 0 and cuts[-1] == len(lengths) and all(a < b for a, b in zip(cuts, cuts[1:]))
        fewest = min(cost(lengths, [0, *inner, len(lengths)], call_cost)
                     for pieces in range(1, len(lengths) + 1)
                     for inner in itertools.combinations(range(1, len(lengths)), pieces - 1))
        assert cost(lengths, cuts, call_cost) == fewest
    assert call_cuts([64, 64] + [10] * 14, CALL_COST) == [0, 2, 16]
    assert call_cuts([40, 8, 8, 8], 200) == [0, 4]                          # a call dearer than its padding
    assert call_cuts([40, 8, 8, 8], 0) == [0, 1, 4]
    assert call_cuts([5, 5, 5], 0) == [0, 3]                                 # a tie keeps one piece


def test_group_by_length_cuts_pieces_that_keep_their_unit():
    rows = [list(range(5, 29)), [5, 6, 7], list(range(5, 29))] + [[5, 6, 7]] * 5
    batches = [right_padded(rows)]                                          # one batch: one unit
    shapes = {}
    for call_cost in (None, 4, 10_000):
        grouped, units = group_by_length(batches, call_cost)
        assert examples_of(grouped) == examples_of(batches)
        shapes[call_cost] = ([tuple(batch["input_ids"].shape) for batch in grouped], units)
    assert shapes[None] == ([(8, 24)], [0])
    assert shapes[4] == ([(2, 24), (6, 3)], [0, 0])                           # two pieces of the one unit
    assert shapes[10_000] == shapes[None]                                    # no piece pays for its call


def test_group_by_length_leaves_other_batches_alone():
    left = {"input_ids": torch.tensor([[0, 5, 6], [4, 5, 6]]), "attention_mask": torch.tensor([[0, 1, 1], [1, 1, 1]])}
    images = {"pixel_values": torch.randn(2, 3, 4, 4)}
    with_list = {**right_padded([[1, 2], [3]]), "note": ["a", "b"]}
    for batches in ([left, left], [images], [with_list]):
        grouped, units = group_by_length(batches, call_cost=1)
        assert all(a is b for a, b in zip(grouped, batches)) and len(grouped) == len(batches)
        assert units == list(range(len(batches)))


def bert_setup(family_models, rows_per_task=6):
    from transformers import AutoModel

    base_dir, expert_dirs = family_models["bert"]
    import layermerge

    expert_set = layermerge.ExpertSet(base_dir, expert_dirs)
    generator = torch.Generator().manual_seed(3)
    data = {}
    for task in expert_set.names:
        lengths = torch.randint(2, 12, (rows_per_task,), generator=generator).tolist()
        rows = [torch.randint(5, 99, (n,), generator=generator).tolist() for n in lengths]
        data[task] = [right_padded(rows[i:i + 3], pad=0) for i in range(0, rows_per_task, 3)]
        for batch in data[task]:
            del batch["label_like"]
    return (lambda: AutoModel.from_pretrained(base_dir)), expert_set, data


def test_regrouped_batches_give_the_padded_loss(family_models):
    """With one Adam step per epoch over every example, which examples share a batch does not matter:
    regrouped (no padding computed) and padded runs must see the same losses to float tolerance."""
    model, expert_set, data = bert_setup(family_models)
    runs = {}
    for regroup in (False, True):
        runs[regroup] = prodistill_merge(model(), expert_set, data, lr=0.01, epochs=3, batch_size=100,
                                         engine_options={"regroup_by_length": regroup})
    padded, regrouped = runs[False], runs[True]
    assert regrouped.summary["padding_share"] < padded.summary["padding_share"] == padded.summary["padding_share_given"]
    for before, after in zip(padded.block_stats, regrouped.block_stats):
        torch.testing.assert_close(torch.tensor(after["epoch_losses"]), torch.tensor(before["epoch_losses"]),
                                   rtol=1e-4, atol=0)
        assert after["loss_final"] == pytest.approx(before["loss_final"], rel=1e-4)


# --------------------------------------------------------------------- bfloat16 and determinism
def test_bfloat16_training_follows_the_float32_loss_and_keeps_float32_coefficients(family_models):
    model, expert_set, data = bert_setup(family_models)
    runs = {precision: prodistill_merge(model(), expert_set, data, lr=0.01, epochs=4, batch_size=3,
                                        train_precision=precision)
            for precision in ("float32", "bfloat16")}
    for single, half in zip(runs["float32"].block_stats, runs["bfloat16"].block_stats):
        torch.testing.assert_close(torch.tensor(half["epoch_losses"]), torch.tensor(single["epoch_losses"]),
                                   rtol=0.05, atol=0)
    assert all(tensor.dtype == torch.float32 for tensor in runs["bfloat16"].artifacts[0].values())
    assert all(tensor.dtype == torch.float32 for tensor in runs["bfloat16"].state_dict.values()
               if tensor.is_floating_point())


@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
def test_a_seed_gives_the_same_merge_bit_for_bit(family_models, precision):
    model, expert_set, data = bert_setup(family_models)
    first, second = (prodistill_merge(model(), expert_set, data, lr=0.01, epochs=3, batch_size=3,
                                      train_precision=precision, patience=1, tolerance=0.001,
                                      engine_options={"seed": 4}) for _ in range(2))
    assert first.state_dict.keys() == second.state_dict.keys()
    for key, tensor in first.state_dict.items():
        assert torch.equal(tensor, second.state_dict[key]), key


def test_precision_is_validated():
    from layermerge.errors import ConfigError
    from layermerge.methods.registry import _REGISTRY, validate_params

    with pytest.raises(ConfigError, match="train_precision"):
        validate_params(_REGISTRY["prodistill"], {"train_precision": "float16"})
    with pytest.raises(ValueError):
        matmul_precision("float16", torch.device("cpu"))


def test_auto_precision_keeps_convolution_blocks_in_float32():
    from torch import nn

    from layermerge.engine.precision import native_bfloat16, resolve_precision

    cpu = torch.device("cpu")
    convolutional = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
    dense = nn.Sequential(nn.Linear(4, 4), nn.GELU())
    assert resolve_precision("auto", cpu, convolutional) == "float32"
    assert resolve_precision("auto", cpu, dense) == ("bfloat16" if native_bfloat16(cpu) else "float32")
    assert resolve_precision("bfloat16", cpu, convolutional) == "bfloat16"      # an explicit choice stands


def test_convolution_blocks_run_channels_last_with_the_same_values():
    from torch import nn

    from layermerge.engine.capture import call_block

    block = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU6(), nn.Conv2d(8, 8, 1)).eval()
    hidden = torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(0))
    out = call_block(block, None, hidden, ((), {}))
    assert out.is_contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        torch.testing.assert_close(out, block(hidden), rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------- learning-rate schedule
def test_scheduled_lr_by_hand():
    from layermerge.methods.fitting import scheduled_lr

    assert scheduled_lr(0.1, "constant", 0.7) == 0.1
    assert scheduled_lr(0.1, "cosine", 0.0) == pytest.approx(0.1)
    assert scheduled_lr(0.1, "cosine", 0.5) == pytest.approx(0.05)
    assert scheduled_lr(0.1, "cosine", 1.0) == pytest.approx(0.0, abs=1e-12)
    assert scheduled_lr(0.1, "linear", 0.25) == pytest.approx(0.075)
    with pytest.raises(ValueError, match="schedule"):
        scheduled_lr(0.1, "step", 0.5)


class ListContext:
    """The part of an engine context that ``fit`` uses, over a fixed list of refs, in one process."""

    device = torch.device("cpu")

    def __init__(self, refs):
        self.refs = refs
        self.generator = torch.Generator().manual_seed(0)

    def pairs(self):
        return self.refs

    def is_local(self, ref):
        return True

    def progress(self, iterable, desc):
        return iterable

    def all_reduce_(self, tensors):
        return None

    def sum(self, value):
        return value


def test_a_steps_units_stay_whole():
    """``fit`` shuffles step units, not pieces: with one unit per step, every step holds exactly one
    unit's pieces, each unit once per epoch, in the order a shuffle of the units gives."""
    from layermerge.methods import fitting

    refs = [PairRef("a", 0, 3, 0), PairRef("a", 1, 1, 0), PairRef("a", 2, 2, 1), PairRef("b", 0, 4, 0),
            PairRef("b", 1, 4, 1)]
    units = fitting.step_units(refs)
    assert units == [refs[:2], [refs[2]], [refs[3]], [refs[4]]]
    alone = [PairRef("a", 0, 2), PairRef("a", 1, 2)]                        # no unit: each ref its own
    assert fitting.step_units(alone) == [alone[:1], alone[1:]]
    steps = []
    leaf = torch.zeros(2, requires_grad=True)

    def group_loss(group):
        steps.append(list(group))
        return (leaf - 1).pow(2).sum()

    fitting.fit(ListContext(refs), [leaf], group_loss, lr=0.1, epochs=2, batch_size=1)
    generator = torch.Generator().manual_seed(0)
    expected = [units[index] for _ in range(2) for index in torch.randperm(4, generator=generator).tolist()]
    assert steps == expected


def test_schedule_sets_every_steps_learning_rate(monkeypatch):
    """``fit`` hands Adam lr × the schedule at the share of pairs seen before each step."""
    from layermerge.methods import fitting

    seen = []
    original = torch.optim.Adam.step

    def recording_step(self, *args, **kwargs):
        seen.append(self.param_groups[0]["lr"])
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.Adam, "step", recording_step)

    leaf = torch.zeros(3, requires_grad=True)
    context = ListContext([PairRef("a", batch, 2) for batch in range(4)])
    losses = fitting.fit(context, [leaf], lambda refs: (leaf - 1).pow(2).sum() * len(refs), lr=0.2, epochs=3,
                         batch_size=4, schedule="linear")
    assert len(losses) == 3
    # 4 pairs of 2 examples, 2 pairs per step: steps start after 0, 2, 4, ... of 12 pairs
    assert seen == pytest.approx([0.2 * (1 - seen_pairs / 12) for seen_pairs in range(0, 12, 2)])


def test_a_decaying_schedule_is_deterministic_and_differs_from_constant(family_models):
    model, expert_set, data = bert_setup(family_models)
    runs = [prodistill_merge(model(), expert_set, data, lr=0.05, epochs=3, batch_size=3, schedule=schedule,
                             engine_options={"seed": 1}) for schedule in ("cosine", "cosine", "constant")]
    for key, tensor in runs[0].state_dict.items():
        assert torch.equal(tensor, runs[1].state_dict[key]), key
    assert any(not torch.equal(tensor, runs[2].state_dict[key]) for key, tensor in runs[0].state_dict.items())


# --------------------------------------------------------------------- depthwise weight gradient
@pytest.mark.parametrize("stride,padding,size,kernel",
                         [(1, 0, 6, 5), (2, 0, 7, 5), (1, 2, 4, 5), ((2, 1), (1, 2), 5, 5), (1, 1, 2, 3)])
def test_offset_sum_depthwise_gradient_matches_onednn(stride, padding, size, kernel):
    """Forward bit for bit, input gradient oneDNN's own, weight and bias gradients as autograd's (float64
    reference) for the depthwise convolutions it takes over."""
    import torch.nn.functional as F

    from layermerge.methods.depthwise import faster_depthwise, takes_offset_sum

    generator = torch.Generator().manual_seed(0)
    x = torch.randn(3, 6, size, size, generator=generator).contiguous(memory_format=torch.channels_last)
    weight = torch.randn(6, 1, kernel, kernel, generator=generator)
    bias = torch.randn(6, generator=generator)
    assert takes_offset_sum(x, weight.requires_grad_(), stride, padding, 1, 6)
    results = []
    for mode in (True, False):
        leaves = [t.detach().clone().requires_grad_() for t in (x, weight, bias)]
        with faster_depthwise(torch.device("cpu")) if mode else torch.enable_grad():
            out = F.conv2d(leaves[0], leaves[1], leaves[2], stride, padding, 1, 6)
        assert (type(out.grad_fn).__name__ == "DepthwiseConv2dBackward") == mode     # the path taken
        out.pow(2).sum().backward()
        results.append((out.detach(), [leaf.grad for leaf in leaves]))
    (fast_out, fast_grads), (slow_out, slow_grads) = results
    assert torch.equal(fast_out, slow_out)
    assert torch.equal(fast_grads[0], slow_grads[0])
    leaves = [t.detach().double().requires_grad_() for t in (x, weight, bias)]
    F.conv2d(*leaves, stride, padding, 1, 6).pow(2).sum().backward()
    for fast, exact in zip(fast_grads[1:], [leaf.grad for leaf in leaves[1:]]):
        torch.testing.assert_close(fast.double(), exact, rtol=1e-5, atol=1e-4)


def test_offset_sum_leaves_other_convolutions_alone():
    from layermerge.methods.depthwise import takes_offset_sum

    x = torch.randn(2, 8, 6, 6)
    depthwise = torch.randn(8, 1, 5, 5, requires_grad=True)
    assert takes_offset_sum(x, depthwise, 1, 0, 1, 8)
    assert not takes_offset_sum(x, torch.randn(8, 1, 3, 3, requires_grad=True), 1, 0, 1, 8)   # small kernel
    assert takes_offset_sum(torch.randn(2, 8, 2, 2), torch.randn(8, 1, 3, 3, requires_grad=True), 1, 1, 1, 8)  # 2 x 2
    assert not takes_offset_sum(torch.randn(2, 8, 2, 2), torch.randn(8, 1, 1, 1, requires_grad=True), 1, 0, 1, 8)
    assert not takes_offset_sum(x, torch.randn(8, 8, 5, 5, requires_grad=True), 1, 0, 1, 1)   # dense
    assert not takes_offset_sum(torch.randn(2, 8, 12, 12), depthwise, 1, 0, 1, 8)             # 64 outputs
    assert not takes_offset_sum(x, depthwise, 1, 0, 2, 8)                                      # dilated
    assert not takes_offset_sum(x, depthwise.detach(), 1, 0, 1, 8)                             # no gradient
    assert not takes_offset_sum(x.double(), depthwise, 1, 0, 1, 8)


# --------------------------------------------------------------------- the final loss, measured on the push
def test_the_engine_measures_the_final_loss_the_method_would_compute(family_models, monkeypatch):
    """ProDistill's final loss now comes from the engine's push of z_m (one forward pass less per batch):
    the same number as the method's own extra pass (``recompute_expert_outputs`` keeps that path)."""
    from layermerge.methods.prodistill import ProDistill

    model, expert_set, data = bert_setup(family_models)
    calls = []
    original = ProDistill._error
    monkeypatch.setattr(ProDistill, "_error", lambda self, *args: calls.append(1) or original(self, *args))
    pushed = prodistill_merge(model(), expert_set, data, lr=0.01, epochs=2, batch_size=3)
    pushed_calls, calls[:] = len(calls), []
    computed = prodistill_merge(model(), expert_set, data, lr=0.01, epochs=2, batch_size=3,
                                recompute_expert_outputs=True)
    batches = sum(len(batches) for batches in data.values())
    assert len(calls) - pushed_calls == batches * len(pushed.block_stats)     # one pass per batch and block less
    for mine, theirs in zip(pushed.block_stats, computed.block_stats):
        assert mine["loss_final"] == pytest.approx(theirs["loss_final"], rel=1e-6)


def test_bfloat16_training_runs_the_attention_in_float32():
    """Under ``matmul_precision('bfloat16')`` on the CPU the linear layers multiply in bfloat16 and
    ``scaled_dot_product_attention`` runs in float32 (its output float32, equal to a float32 call)."""
    import torch.nn.functional as F

    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 5, 4, generator=generator) for _ in range(3))
    mask = torch.tensor([True, True, True, False, False]).expand(2, 1, 5, 5)
    weight = torch.randn(4, 4, generator=generator)
    with matmul_precision("bfloat16", torch.device("cpu")):
        attended = F.scaled_dot_product_attention(q.bfloat16(), k, v, attn_mask=mask)
        projected = F.linear(attended, weight)
    assert attended.dtype == torch.float32 and projected.dtype == torch.bfloat16
    expected = F.scaled_dot_product_attention(q.bfloat16().float(), k, v, attn_mask=mask)
    torch.testing.assert_close(attended, expected, rtol=1e-6, atol=1e-6)


# --------------------------------------------------------------------- one block call per stack of batches
def test_the_pieces_follow_the_call_cost_and_a_checkpoint_does_not(family_models):
    """On a CPU a call costs ``CALL_COST`` positions by default; a batch with two long examples among
    short ones is cut in two pieces of one step unit where a call is cheap, kept whole where it is
    dear; a checkpoint's fingerprint hashes the batches as given, so a run resumed with another call
    cost (other pieces) is recognised."""
    from layermerge.engine import batching
    from layermerge.engine.driver import BlockEngine
    from layermerge.methods.prodistill import ProDistill

    assert batching.block_call_cost(torch.device("cpu")) == batching.CALL_COST
    assert batching.block_call_cost(torch.device("cuda")) is None
    model, expert_set, _ = bert_setup(family_models)
    rows = [list(range(5, 29)), list(range(5, 29))] + [[5, 6, 7]] * 6
    data = {task: [right_padded(rows, pad=0)] for task in expert_set.names}
    for batch in (batch for batches in data.values() for batch in batches):
        del batch["label_like"]
    method = ProDistill(ProDistill.Params(), expert_set.names)
    cheap, dear = (BlockEngine(model(), expert_set, data, method, call_cost=cost) for cost in (1, 10_000))
    assert [len(cheap.data[task]) for task in expert_set.names] == [2] * len(expert_set.names)
    assert [len(dear.data[task]) for task in expert_set.names] == [1] * len(expert_set.names)
    assert cheap.units == {task: [0, 0] for task in expert_set.names}      # one step unit, two calls
    assert cheap.padding < dear.padding
    assert cheap.fingerprint() == dear.fingerprint()


def test_pieces_change_the_calls_not_the_steps(family_models):
    """Cut into pieces, the batches make the same optimiser steps: the same epoch losses and merged
    weights as whole batches, to float tolerance (float32)."""
    model, expert_set, data = bert_setup(family_models)
    runs = {cost: prodistill_merge(model(), expert_set, data, lr=0.01, epochs=3, batch_size=3,
                                   train_precision="float32", engine_options={"call_cost": cost})
            for cost in (0, 10_000)}
    pieces, whole = runs[0], runs[10_000]
    assert pieces.summary["padding_share"] == 0.0 < whole.summary["padding_share"]
    for cut, kept in zip(pieces.block_stats, whole.block_stats):
        torch.testing.assert_close(torch.tensor(cut["epoch_losses"]), torch.tensor(kept["epoch_losses"]),
                                   rtol=1e-5, atol=0)
    for key, tensor in whole.state_dict.items():
        torch.testing.assert_close(pieces.state_dict[key], tensor, rtol=1e-4, atol=1e-6)


def test_stacked_batches_give_the_loss_and_merge_of_separate_calls(monkeypatch):
    """The toy's blocks take no tensor argument but their input and its batches have no mask, so a
    step's batches run as one call: the same loss as one call per batch (the first block's single
    step, at the initial λ) and, over five epochs, the same losses and merged weights up to the
    rounding of sums in another order; no batch runs on its own."""
    from layermerge.methods.prodistill import ProDistill

    base, experts, data = toy_setup()
    source = StateDictSource.from_models(base, experts)
    separate_calls = []
    original = ProDistill._error
    monkeypatch.setattr(ProDistill, "_error", lambda self, *args: separate_calls.append(1) or original(self, *args))

    def both(**params):
        stacked = prodistill_merge(copy.deepcopy(base), source, data, lr=0.05, patience=0, **params)
        assert separate_calls == []
        separate = prodistill_merge(copy.deepcopy(base), source, data, lr=0.05, patience=0, stack_batches=False,
                                    **params)
        batches = sum(len(batches) for batches in data.values())
        assert len(separate_calls) == batches * params["epochs"] * len(separate.block_stats)
        separate_calls.clear()
        return stacked, separate

    stacked, separate = both(epochs=1, batch_size=64)                     # one step per block
    assert stacked.block_stats[0]["epoch_losses"][0] == pytest.approx(separate.block_stats[0]["epoch_losses"][0],
                                                                      rel=1e-6)
    for key, tensor in separate.state_dict.items():                        # the step taken: the same gradient
        torch.testing.assert_close(stacked.state_dict[key], tensor, rtol=1e-6, atol=1e-6)
    stacked, separate = both(epochs=3, batch_size=8)
    for mine, theirs in zip(stacked.block_stats, separate.block_stats):
        assert mine["epoch_losses"] == pytest.approx(theirs["epoch_losses"], rel=1e-3)


class FakeStreams:
    """What ``Stacking`` asks of a block context: a batch's padding mask and extra arguments."""

    def __init__(self, masks=None, extras=None):
        self.masks, self.extras = masks or {}, extras or {}

    def token_mask(self, ref):
        return self.masks.get(ref)

    def extra(self, ref, stream):
        return self.extras.get(ref, ((), {"scale": 1.0}))


def test_the_stacking_plan_groups_batches_that_can_share_a_call():
    from layermerge.engine.context import PairRef
    from layermerge.methods.stacking import Stacking

    refs = [PairRef("a", batch, 4) for batch in range(7)]
    inputs = [torch.zeros(4, 3, 8, 8) for _ in refs]
    inputs[5] = torch.zeros(4, 3, 6, 6)                                  # another example shape
    masks = {refs[2]: torch.ones(4, 8, dtype=torch.bool)}                # padding: tied to its own length
    extras = {refs[3]: ((torch.zeros(4),), {})}                          # a tensor argument
    plan = Stacking(FakeStreams(masks, extras)).plan(refs, inputs)
    assert plan == [[0, 1], [2], [3], [4], [5], [6]]
    assert Stacking(FakeStreams()).plan(refs[:5], inputs[:5]) == [[0, 1, 2, 3, 4]]
    per_batch = inputs[0].numel() * 4
    assert Stacking(FakeStreams(), max_bytes=2 * per_batch).plan(refs[:5], inputs[:5]) == [[0, 1], [2, 3], [4]]
    assert Stacking(FakeStreams(), enabled=False).plan(refs[:3], inputs[:3]) == [[0], [1], [2]]


class BatchStatisticsBlock(torch.nn.Module):
    """A residual block whose normalisation uses the batch's own statistics even in eval mode, so an
    example's output depends on the other examples of its call."""

    def __init__(self, width):
        super().__init__()
        self.linear = torch.nn.Linear(width, width, bias=False)
        self.norm = torch.nn.BatchNorm1d(width, affine=False, track_running_stats=False)

    def forward(self, x, scale):
        return x + torch.tanh(self.norm(self.linear(x))) * scale


def test_a_block_that_mixes_examples_runs_batch_by_batch():
    """The check on the first stack finds that stacking changes such a block's outputs: it runs one call
    per batch, exactly as with stacking off."""
    base, experts, data = toy_setup()
    for model in (base, *experts.values()):
        for position, layer in enumerate(model.layers):
            replacement = BatchStatisticsBlock(layer.linear.in_features)
            replacement.linear.weight.data.copy_(layer.linear.weight.data)
            model.layers[position] = replacement.eval()
    source = StateDictSource.from_models(base, experts)
    checked = prodistill_merge(copy.deepcopy(base), source, data, lr=0.05, epochs=3, batch_size=8, patience=0)
    separate = prodistill_merge(copy.deepcopy(base), source, data, lr=0.05, epochs=3, batch_size=8, patience=0,
                                stack_batches=False)
    for mine, theirs in zip(checked.block_stats, separate.block_stats):
        assert mine["epoch_losses"] == theirs["epoch_losses"]
    for key, tensor in separate.state_dict.items():
        assert torch.equal(checked.state_dict[key], tensor), key


# --------------------------------------------------------------------- batch norms folded into convolutions
class ConvNormBlock(torch.nn.Module):
    """conv → batch norm → ReLU6 twice, the first convolution called as a function on the block's own
    weight (as EfficientNet's "same"-padding convolutions are), the second as a module; a residual."""

    def __init__(self, channels, bias=False):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(channels, 1, 3, 3) * 0.3)
        self.norm1 = torch.nn.BatchNorm2d(channels)
        self.conv2 = torch.nn.Conv2d(channels, channels, 1, bias=bias)
        self.norm2 = torch.nn.BatchNorm2d(channels)

    def forward(self, x, scale=1.0):
        h = torch.nn.functional.relu6(self.norm1(torch.nn.functional.conv2d(x, self.weight, None, 1, 1, 1,
                                                                            x.shape[1])))
        return x + self.norm2(self.conv2(h)) * scale


def conv_norm_block(seed, channels=4, bias=False):
    torch.manual_seed(seed)
    block = ConvNormBlock(channels, bias)
    randomise_batch_norms_(block.norm1, block.norm2)
    return block.eval()


def outputs_and_gradients(leaves: dict, run):
    """``run(weights)``'s output and the gradient of its squared sum with respect to each leaf, the weights
    built from the leaves as W(λ) is (a product, so the leaves stay leaves)."""
    for leaf in leaves.values():
        leaf.grad = None
    output = run({name: leaf * 1.0 for name, leaf in leaves.items()})
    output.pow(2).sum().backward()
    return output.detach(), {name: leaf.grad.clone() for name, leaf in leaves.items()}


@pytest.mark.parametrize("bias", [False, True])
def test_folded_block_gives_the_blocks_outputs_and_gradients(bias):
    from layermerge.engine import call_block
    from layermerge.methods.folding import fold_block

    block = conv_norm_block(0, bias=bias)
    folded = fold_block(block, ((), {"scale": 0.5}))
    assert [fold.norm for fold in folded.folds] == ["norm1", "norm2"]
    assert [fold.bias for fold in folded.folds] == [None, "conv2.bias" if bias else None]
    x = torch.randn(3, 4, 5, 5, generator=torch.Generator().manual_seed(1))
    leaves = {name: tensor.detach().clone().requires_grad_() for name, tensor in block.named_parameters()}
    buffers = dict(block.named_buffers())

    expected, expected_grads = outputs_and_gradients(
        leaves, lambda w: call_block(block, {**w, **buffers}, x, ((), {"scale": 0.5})))
    output, grads = outputs_and_gradients(leaves, lambda w: folded.run(folded.weights(w), x))
    torch.testing.assert_close(output, expected, rtol=1e-5, atol=1e-5)
    for name, grad in expected_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-5)
    assert folded.matches(dict(block.named_parameters()), x, ((), {"scale": 0.5}))
    assert not folded.matches(dict(block.named_parameters()), x, ((), {"scale": 0.25}))   # traced for 0.5


def test_only_foldable_pairs_are_folded():
    from layermerge.methods.folding import fold_block

    block = conv_norm_block(0)
    assert fold_block(block, ((torch.ones(1),), {})) is None                            # a tensor argument
    assert fold_block(torch.nn.Sequential(torch.nn.Conv2d(2, 2, 1), torch.nn.ReLU()), ((), {})) is None   # no norm
    training = conv_norm_block(0)
    training.norm2.train()
    assert [fold.norm for fold in fold_block(training, ((), {})).folds] == ["norm1"]   # batch statistics: kept
    sequential = torch.nn.Sequential(torch.nn.Conv2d(2, 2, 1), torch.nn.BatchNorm2d(2)).eval()   # module conv
    assert len(fold_block(sequential, ((), {})).folds) == 1

    class TwoUsers(torch.nn.Module):                                    # the convolution's output used twice
        def __init__(self):
            super().__init__()
            self.conv, self.norm = torch.nn.Conv2d(2, 2, 1), torch.nn.BatchNorm2d(2)

        def forward(self, x):
            h = self.conv(x)
            return self.norm(h) + h

    assert fold_block(TwoUsers().eval(), ((), {})) is None

    class Untraceable(torch.nn.Module):                                 # control flow on the input's values
        def __init__(self):
            super().__init__()
            self.conv, self.norm = torch.nn.Conv2d(2, 2, 1), torch.nn.BatchNorm2d(2)

        def forward(self, x):
            return self.norm(self.conv(x)) if x.sum() > 0 else x

    assert fold_block(Untraceable().eval(), ((), {})) is None


class PaddedBlock(torch.nn.Module):
    """Zero paddings before convolutions in each form: a padding module before a functional convolution
    (EfficientNet's "same" padding), ``F.pad`` before a convolution module that pads too, and paddings
    that must stay (one-sided, non-zero, on the channels, used twice)."""

    def __init__(self):
        super().__init__()
        self.pad = torch.nn.ZeroPad2d(2)
        self.weight = torch.nn.Parameter(torch.randn(4, 1, 5, 5) * 0.3)
        self.norm = torch.nn.BatchNorm2d(4)
        self.conv = torch.nn.Conv2d(4, 4, 3, padding=(1, 0))
        self.one_sided = torch.nn.ZeroPad2d((0, 1, 0, 1))
        self.strided = torch.nn.Conv2d(4, 4, 3, stride=2)
        self.last = torch.nn.Conv2d(4, 4, 1)
        self.wider = torch.nn.Conv2d(6, 4, 1)

    def forward(self, x):
        functional = torch.nn.functional
        h = functional.relu6(self.norm(functional.conv2d(self.pad(x), self.weight, None, 1, 0, 1, 4)))
        h = self.conv(functional.pad(h, (1, 1, 2, 2)))                                # rows +2, cols +1: moved
        h = self.strided(self.one_sided(h))                                             # one-sided: kept
        twice = functional.pad(h, (1, 1, 1, 1))                                         # used twice: kept
        h = self.last(twice) + twice
        h = self.last(functional.pad(h, (1, 1, 1, 1), value=1.0))                       # not zero: kept
        return self.wider(functional.pad(h, (0, 0, 0, 0, 1, 1)))                       # channels: kept


def test_symmetric_zero_paddings_move_into_the_convolution():
    from layermerge.methods.folding import fold_block

    torch.manual_seed(0)
    block = PaddedBlock()
    randomise_batch_norms_(block.norm)
    block.eval()
    folded = fold_block(block, ((), {}))
    assert folded.paddings == 2 and len(folded.folds) == 1
    code = folded.module.code
    assert "(2, 2)" in code and "(3, 1)" in code and "one_sided" in code          # conv paddings summed
    x = torch.randn(2, 4, 9, 9, generator=torch.Generator().manual_seed(1))
    leaves = {name: tensor.detach().clone().requires_grad_() for name, tensor in block.named_parameters()}
    buffers = dict(block.named_buffers())

    expected, expected_grads = outputs_and_gradients(
        leaves, lambda w: torch.func.functional_call(block, {**w, **buffers}, (x,)))
    output, grads = outputs_and_gradients(leaves, lambda w: folded.run(folded.weights(w), x))
    assert output.shape == expected.shape
    torch.testing.assert_close(output, expected, rtol=1e-5, atol=1e-5)
    for name, grad in expected_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-4)
    only_padding = torch.nn.Sequential(torch.nn.ZeroPad2d(1), torch.nn.Conv2d(2, 2, 3))     # no norm: still moved
    assert fold_block(only_padding, ((), {})).paddings == 1 and fold_block(only_padding, ((), {})).folds == []


class ConvToy(torch.nn.Module):
    """A stem convolution, three conv/batch-norm blocks and a head: a CNN small enough for the engine."""

    def __init__(self):
        super().__init__()
        self.stem = torch.nn.Conv2d(1, 4, 3, padding=1)
        self.layers = torch.nn.ModuleList(conv_norm_block(position) for position in range(3))
        self.head = torch.nn.Linear(4 * 6 * 6, 3)

    def forward(self, x):
        x = self.stem(x)
        for layer in self.layers:
            x = layer(x, scale=1.0)
        return self.head(x.flatten(1))


def test_prodistill_trains_through_folded_batch_norms_with_the_same_loss():
    """With batch norms folded, a conv/batch-norm model's first step has the unfolded loss and both
    runs end in the same place up to rounding; every block reports its two folds."""
    torch.manual_seed(0)
    base = ConvToy().eval()
    experts = {}
    for task in ("a", "b"):
        expert = copy.deepcopy(base)
        with torch.no_grad():
            for name, tensor in expert.named_parameters():
                if "layers" in name:
                    tensor.add_(torch.randn(tensor.shape, generator=torch.Generator().manual_seed(ord(task))) * 0.1)
        experts[task] = expert
    generator = torch.Generator().manual_seed(3)
    data = {task: [{"x": torch.randn(4, 1, 6, 6, generator=generator)} for _ in range(2)] for task in experts}
    source = StateDictSource.from_models(base, experts)
    runs = {}
    for fold in (True, False):
        runs[fold] = prodistill_merge(copy.deepcopy(base), source, data, lr=0.01, epochs=1, batch_size=64,
                                      patience=0, fold_batch_norms=fold)
    folded, plain = runs[True], runs[False]
    assert [stats["folded_batch_norms"] for stats in folded.block_stats] == [2, 2, 2]
    assert [stats["folded_batch_norms"] for stats in plain.block_stats] == [0, 0, 0]
    assert [stats["folded_paddings"] for stats in folded.block_stats] == [0, 0, 0]      # conv2d pads itself
    assert folded.block_stats[0]["epoch_losses"][0] == pytest.approx(plain.block_stats[0]["epoch_losses"][0],
                                                                     rel=1e-5)
    for key, tensor in plain.state_dict.items():
        torch.testing.assert_close(folded.state_dict[key], tensor, rtol=1e-5, atol=1e-5)
