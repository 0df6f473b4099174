"""The expert outputs in the precision a method asks for, and capture without repeated block calls.

The expert outputs Block(θ_i; z_i) (the targets, and the expert stream's next inputs) run without
gradients; a method may ask for them in bfloat16 (``expert_output_precision``), where they are
checked here against the same forwards computed by hand under ``matmul_precision``. They come back in
float32 whatever computed them, a block that cannot run in bfloat16 falls back to float32, and the
merged stream is pushed in float32 regardless.
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import make_config, perturbed
from torch import nn

import layermerge
from layermerge.engine import StateDictSource, call_block, capture_block_inputs, run_engine
from layermerge.engine.capture import with_hidden_dtype
from layermerge.engine.precision import matmul_precision
from layermerge.methods.prodistill import prodistill_merge

TASKS = ("t0", "t1")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny_bert():
    from transformers import AutoModel

    torch.manual_seed(0)
    base = AutoModel.from_config(make_config("bert")).eval()
    experts = {task: perturbed(base, seed=i + 1) for i, task in enumerate(TASKS)}
    data = {}
    for i, task in enumerate(TASKS):
        generator = torch.Generator().manual_seed(i)
        ids = torch.randint(3, 99, (2, 7), generator=generator)
        mask = torch.tensor([[1] * 7, [1] * 5 + [0] * 2])
        data[task] = [{"input_ids": ids * mask, "attention_mask": mask}]
    return base, experts, data


class RecordingTaskArithmetic:
    """Per-block Task Arithmetic that asks for its expert outputs in ``precision`` and keeps, for block
    1, the expert stream's inputs and outputs and the merged stream's input as the engine hands them
    over."""

    name = "recording_task_arithmetic"

    def __init__(self, precision: str):
        self.precision = precision
        self.seen: dict[str, torch.Tensor] = {}

    def expert_output_precision(self, device, module):
        return self.precision

    def merge_block(self, ctx):
        if ctx.index == 1:
            ref = ctx.pairs("t0")[0]
            self.seen = {"zi": ctx.expert_input(ref).clone(), "yi": ctx.expert_output(ref).clone(),
                         "zm": ctx.merged_input(ref).clone(), "extra": ctx.extra(ref, "expert")}
            self.module, self.weights = ctx.module, ctx.experts["t0"]
        return {name: base + 0.3 * sum(ctx.experts[t][name] - base for t in ctx.tasks)
                for name, base in ctx.base.items()}


def run(precision: str, base, experts, data):
    method = RecordingTaskArithmetic(precision)
    result = run_engine(copy.deepcopy(base), StateDictSource.from_models(base, experts), data, method,
                        regroup_by_length=False)
    return method, result


def test_bfloat16_expert_outputs_are_the_expert_forwards_under_autocast_and_stay_float32():
    base, experts, data = tiny_bert()
    exact, exact_result = run("float32", base, experts, data)
    fast, fast_result = run("bfloat16", base, experts, data)
    # Block 1's expert input is block 0's expert output, computed in bfloat16 here and in float32 there.
    assert fast.seen["zi"].dtype == torch.float32 and fast.seen["yi"].dtype == torch.float32
    assert not torch.equal(fast.seen["zi"], exact.seen["zi"])
    torch.testing.assert_close(fast.seen["zi"], exact.seen["zi"], rtol=0.05, atol=0.05)
    with torch.no_grad():
        by_hand = call_block(fast.module, fast.weights, fast.seen["zi"], fast.seen["extra"])
        with matmul_precision("bfloat16", torch.device("cpu")):
            by_hand_bf16 = call_block(fast.module, fast.weights, fast.seen["zi"], fast.seen["extra"])
    assert torch.equal(fast.seen["yi"], by_hand_bf16.float())
    assert not torch.equal(fast.seen["yi"], by_hand)
    # The merged stream is pushed in float32 either way: its input to block 1 is the same bits.
    assert torch.equal(fast.seen["zm"], exact.seen["zm"])
    assert [stats["expert_output_precision"] for stats in fast_result.block_stats] == ["bfloat16"] * 2
    assert [stats["expert_output_precision"] for stats in exact_result.block_stats] == ["float32"] * 2
    assert not any("expert_output_precision_fallback" in stats for stats in fast_result.block_stats)
    # The merged weights do not depend on the streams for Task Arithmetic: identical.
    for key, tensor in exact_result.state_dict.items():
        assert torch.equal(fast_result.state_dict[key], tensor), key


def test_a_method_without_expert_output_precision_gets_float32():
    base, experts, data = tiny_bert()
    exact, _ = run("float32", base, experts, data)

    class Plain(RecordingTaskArithmetic):
        expert_output_precision = None

    method = Plain("ignored")
    run_engine(copy.deepcopy(base), StateDictSource.from_models(base, experts), data, method,
               regroup_by_length=False)
    for name in ("zi", "yi", "zm"):
        assert torch.equal(method.seen[name], exact.seen[name]), name


class AutocastRefusingBlock(nn.Module):
    """A block that cannot run under autocast (as X-MOD's adapters mix dtypes)."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 4)

    def forward(self, x):
        if torch.is_autocast_enabled("cpu"):
            raise RuntimeError("expected scalar type BFloat16 but found Float")
        return x + torch.tanh(self.linear(x))


class TwoBlocks(nn.Module):
    """An embedding and two blocks of ``block_type``; a block's tuple output hands on its first item."""

    def __init__(self, block_type: type[nn.Module]):
        super().__init__()
        self.embed = nn.Linear(4, 4)
        self.layers = nn.ModuleList(block_type() for _ in range(2))

    def forward(self, inputs):
        hidden = self.embed(inputs)
        for layer in self.layers:
            out = layer(hidden)
            hidden = out[0] if isinstance(out, tuple) else out
        return hidden


def test_a_block_that_fails_in_bfloat16_gets_float32_expert_outputs_and_says_so():
    torch.manual_seed(0)
    base = TwoBlocks(AutocastRefusingBlock).eval()
    experts = {task: perturbed(base, seed=i + 1) for i, task in enumerate(TASKS)}
    data = {task: [{"inputs": torch.randn(3, 4, generator=torch.Generator().manual_seed(i))}]
            for i, task in enumerate(TASKS)}
    plan = layermerge.blocks.BlockPlan(("embed",), ("layers.0", "layers.1"), ())
    results = {}
    for precision in ("float32", "bfloat16"):
        method = RecordingTaskArithmetic(precision)
        results[precision] = (method, run_engine(copy.deepcopy(base), StateDictSource.from_models(base, experts),
                                                 data, method, plan=plan))
    (exact, _), (fell_back, result) = results["float32"], results["bfloat16"]
    for name in ("zi", "yi", "zm"):
        assert torch.equal(fell_back.seen[name], exact.seen[name]), name
    assert [stats["expert_output_precision"] for stats in result.block_stats] == ["bfloat16"] * 2
    assert all("expected scalar type" in stats["expert_output_precision_fallback"]
               for stats in result.block_stats)


def test_hidden_states_come_back_in_the_streams_dtype():
    hidden = torch.ones(2, 3, dtype=torch.bfloat16)
    assert with_hidden_dtype(hidden, torch.float32).dtype == torch.float32
    extra = torch.zeros(1)
    output = with_hidden_dtype((hidden, extra), torch.float32)
    assert output[0].dtype == torch.float32 and output[1] is extra
    same = torch.ones(2, dtype=torch.float32)
    assert with_hidden_dtype(same, torch.float32) is same


@pytest.mark.parametrize("train_precision, expected", [("float32", "float32"), ("bfloat16", "bfloat16")])
def test_prodistill_targets_follow_its_training_precision(train_precision, expected):
    base, experts, data = tiny_bert()
    source = StateDictSource.from_models(base, experts)
    options = {"lr": 0.05, "epochs": 2, "train_precision": train_precision}
    auto = prodistill_merge(copy.deepcopy(base), source, data, **options)
    assert [stats["expert_output_precision"] for stats in auto.block_stats] == [expected] * 2
    chosen = prodistill_merge(copy.deepcopy(base), source, data, target_precision=expected, **options)
    exact = prodistill_merge(copy.deepcopy(base), source, data, target_precision="float32", **options)
    for key, tensor in auto.state_dict.items():
        assert torch.equal(chosen.state_dict[key], tensor), key
    differs = [key for key, tensor in auto.state_dict.items() if not torch.equal(exact.state_dict[key], tensor)]
    assert bool(differs) == (expected == "bfloat16")


class CountingBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 4)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return x + self.linear(x)


@pytest.mark.parametrize("known_format", [None, 1])
def test_capture_skips_the_format_call_once_the_format_is_known(known_format):
    """The first block's one real call only teaches the output format; a stream's later batches skip it
    when the format says the block hands on nothing but its hidden states."""
    torch.manual_seed(0)
    model = TwoBlocks(CountingBlock).eval()
    plan = layermerge.blocks.BlockPlan(("embed",), ("layers.0", "layers.1"), ())
    batch = {"inputs": torch.randn(3, 4)}
    learned = capture_block_inputs(model, plan, batch)
    assert model.layers[0].calls == 1 and learned.output_format is None
    known = capture_block_inputs(model, plan, batch, known_format=known_format)
    assert model.layers[0].calls == 1 and model.layers[1].calls == 0
    assert torch.equal(known.hidden, learned.hidden) and known.output_format == known_format


def test_capture_still_calls_blocks_that_hand_on_more_outputs():
    base, _, data = tiny_bert()
    plan = layermerge.blocks.find_block_plan(base)
    batch = data["t0"][0]
    learned = capture_block_inputs(base, plan, batch)
    calls = []
    first_linear = next(m for m in base.get_submodule(plan.blocks[0]).modules() if isinstance(m, nn.Linear))
    handle = first_linear.register_forward_hook(lambda *args: calls.append(1))
    try:
        capture_block_inputs(base, plan, batch, known_format=2)
    finally:
        handle.remove()
    assert len(calls) == 1 and learned.output_format in (None, 1)
