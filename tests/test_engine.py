"""The block-streaming engine: captured streams match real forward passes, per-block Task Arithmetic
equals the data-free merge, the activation cache spills without changing results, and a killed run
resumes to the same result."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import layermerge
from layermerge.blocks import BlockPlanError
from layermerge.engine import (
    ActivationCache,
    BlockResult,
    ExpertSetSource,
    StateDictSource,
    call_block,
    capture_block_inputs,
    run_engine,
    task_arithmetic_tensor,
)
from layermerge.engine.capture import hidden_parameter
from layermerge.errors import DataError, IncompatibleExpertsError, OutputError

TEXT = dict(vocab_size=99, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=37,
            max_position_embeddings=64)
CONFIGS = {
    "bert": dict(model_type="bert", **TEXT),
    "gpt2": dict(model_type="gpt2", vocab_size=99, n_embd=32, n_layer=3, n_head=4, n_positions=64),
    "llama": dict(model_type="llama", **TEXT, num_key_value_heads=2),
    # Alternating sliding-window layers: blocks receive different masks, which the engine must keep apart.
    "qwen2": dict(model_type="qwen2", **TEXT, num_key_value_heads=2, use_sliding_window=True,
                  sliding_window=3, max_window_layers=1,
                  layer_types=["full_attention", "sliding_attention", "full_attention"]),
    # Encoder-decoder models: two stacks, the decoder's cross-attention reading each stream's own encoder.
    "t5": dict(model_type="t5", vocab_size=99, d_model=32, d_kv=8, d_ff=37, num_layers=3, num_heads=4,
               decoder_start_token_id=0),
    "bart": dict(model_type="bart", vocab_size=99, d_model=32, encoder_layers=2, decoder_layers=3,
                 encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=37, decoder_ffn_dim=37,
                 max_position_embeddings=64, pad_token_id=1, bos_token_id=0, eos_token_id=2,
                 decoder_start_token_id=2),
    "whisper": dict(model_type="whisper", vocab_size=99, d_model=32, encoder_layers=2, decoder_layers=2,
                    encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=37, decoder_ffn_dim=37,
                    num_mel_bins=8, max_source_positions=16, max_target_positions=32, pad_token_id=1,
                    bos_token_id=2, eos_token_id=2, decoder_start_token_id=3),
}
SEQ2SEQ = ("t5", "bart", "whisper")
# Hierarchical vision models: every stage's layers are blocks, every stage a stack (patch merging and
# downsampling run between stages).
HIERARCHICAL = {
    "swin": dict(model_type="swin", image_size=32, patch_size=4, embed_dim=16, depths=[2, 2], num_heads=[2, 4],
                 window_size=4),
    "convnext": dict(model_type="convnext", hidden_sizes=[8, 16], depths=[2, 2], num_stages=2),
    "resnet": dict(model_type="resnet", embedding_size=8, hidden_sizes=[8, 16], depths=[2, 2], layer_type="basic"),
}
CONFIGS.update(HIERARCHICAL)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors run fastest on one thread, above all on a shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def perturbed(model: nn.Module, seed: int, scale: float = 0.05) -> nn.Module:
    expert = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in expert.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * scale)
    return expert.eval()


def text_batches(seed: int, lengths=((7, 5), (6, 6))) -> list[dict]:
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for batch_lengths in lengths:
        width = max(batch_lengths)
        ids = torch.randint(3, 99, (len(batch_lengths), width), generator=generator)
        mask = torch.tensor([[1] * n + [0] * (width - n) for n in batch_lengths])
        batches.append({"input_ids": ids * mask, "attention_mask": mask})
    return batches


def seq2seq_batches(family: str, seed: int) -> list[dict]:
    """Encoder inputs (tokens with padding, or audio features) and teacher-forced decoder tokens."""
    generator = torch.Generator().manual_seed(seed)
    decoder = {"decoder_input_ids": torch.randint(4, 99, (2, 5), generator=generator),
               "decoder_attention_mask": torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])}
    if family == "whisper":
        return [{"input_features": torch.randn(2, 8, 32, generator=generator), **decoder}]
    return [{**text_batches(seed, lengths=((7, 5),))[0], **decoder}]


def make_setup(family: str, tasks=("t0", "t1")):
    from transformers import AutoConfig, AutoModel

    torch.manual_seed(0)
    if family == "efficientnet":
        from efficientnet_lite_pytorch import EfficientNet

        base = EfficientNet.from_name("efficientnet-lite0").eval()
        data = {task: [{"inputs": torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(i))}]
                for i, task in enumerate(tasks)}
    else:
        base = AutoModel.from_config(AutoConfig.for_model(**CONFIGS[family])).eval()
        if family in SEQ2SEQ:
            data = {task: seq2seq_batches(family, i) for i, task in enumerate(tasks)}
        elif family in HIERARCHICAL:
            data = {task: [{"pixel_values": torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(i))}]
                    for i, task in enumerate(tasks)}
        else:
            data = {task: text_batches(i) for i, task in enumerate(tasks)}
    experts = {task: perturbed(base, seed=i + 1) for i, task in enumerate(tasks)}
    return base, experts, data


def _f32(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.float() if tensor.is_floating_point() else tensor


def ta_state(base: nn.Module, experts: dict[str, nn.Module], scaling: float = 0.3) -> dict:
    expert_states = [m.state_dict() for m in experts.values()]
    return {k: task_arithmetic_tensor(_f32(v), [_f32(s[k]) for s in expert_states], scaling)
            for k, v in base.state_dict().items()}


def block_io(model: nn.Module, blocks: list[str], batch: dict) -> tuple[list, list]:
    """Inputs and outputs of every block in a real forward pass, recorded with hooks."""
    inputs, outputs, handles = [], [], []
    for path in blocks:
        module = model.get_submodule(path)

        def pre(hooked, args, kwargs):
            inputs.append(args[0] if args else kwargs[hidden_parameter(hooked.forward)])

        def post(_, args, kwargs, out):
            outputs.append(out if isinstance(out, torch.Tensor) else out[0])

        handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(module.register_forward_hook(post, with_kwargs=True))
    try:
        with torch.no_grad():
            model(**batch)
    finally:
        for handle in handles:
            handle.remove()
    return inputs, outputs


class BlockTaskArithmetic:
    """Per-block Task Arithmetic: the engine's trivial method."""

    name = "block_task_arithmetic"

    def __init__(self, scaling: float = 0.3):
        self.scaling = scaling
        self.calls: list[int] = []

    def config(self) -> dict:
        return {"scaling": self.scaling}

    def merge_block(self, ctx):
        self.calls.append(ctx.index)
        return {name: task_arithmetic_tensor(base, [ctx.experts[t][name] for t in ctx.tasks], self.scaling)
                for name, base in ctx.base.items()}


class CheckingTaskArithmetic(BlockTaskArithmetic):
    """Also checks every cached stream against hooks on real full models."""

    def __init__(self, merged_model, experts, data, blocks):
        super().__init__()
        self.expected = {}
        for task, batches in data.items():
            for position, batch in enumerate(batches):
                merged_in, _ = block_io(merged_model, blocks, batch)
                expert_in, expert_out = block_io(experts[task], blocks, batch)
                self.expected[(task, position)] = (merged_in, expert_in, expert_out)

    def merge_block(self, ctx):
        for ref in ctx.pairs():
            merged_in, expert_in, expert_out = self.expected[(ref.task, ref.batch)]
            torch.testing.assert_close(ctx.merged_input(ref), merged_in[ctx.index], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(ctx.expert_input(ref), expert_in[ctx.index], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(ctx.expert_output(ref), expert_out[ctx.index], rtol=1e-5, atol=1e-5)
        return super().merge_block(ctx)


class NoisyDataMerger(BlockTaskArithmetic):
    """Reads every stream and draws random numbers: its result depends on activations, order and RNG."""

    name = "noisy"

    def __init__(self, fail_at: int | None = None):
        super().__init__()
        self.fail_at = fail_at

    def merge_block(self, ctx):
        if ctx.index == self.fail_at:
            raise RuntimeError("simulated kill")
        self.calls.append(ctx.index)
        ta = {name: task_arithmetic_tensor(base, [ctx.experts[t][name] for t in ctx.tasks], 0.3)
              for name, base in ctx.base.items()}
        score = sum(float((ctx.run(ta, ctx.merged_input(ref), ref) - ctx.expert_output(ref)).pow(2).mean())
                    + float(ctx.expert_input(ref).abs().mean()) for ref in ctx.pairs())
        scale = 0.2 + 0.1 * torch.tanh(torch.tensor(score)) + 0.05 * torch.rand((), generator=ctx.generator)
        merged = {name: task_arithmetic_tensor(base, [ctx.experts[t][name] for t in ctx.tasks], float(scale))
                  for name, base in ctx.base.items()}
        return BlockResult(merged, artifacts={"scale": scale.reshape(1)}, stats={"score": score})


@pytest.mark.parametrize("family", ["bert", "gpt2", "llama", "qwen2", "efficientnet", *SEQ2SEQ, *HIERARCHICAL])
def test_streams_match_real_forward_passes(family):
    """z_m, z_i and Block(θ_i; z_i) equal the hidden states of full Task-Arithmetic and expert models."""
    base, experts, data = make_setup(family)
    merged_model = copy.deepcopy(base)
    merged_model.load_state_dict(ta_state(base, experts))
    template = copy.deepcopy(base)
    plan = layermerge.blocks.find_block_plan(template)
    if family == "efficientnet":
        plan = type(plan)(plan.embedding, plan.blocks[:5], plan.head)      # five blocks keep the test fast
    method = CheckingTaskArithmetic(merged_model, experts, data, list(plan.blocks))
    result = run_engine(template, StateDictSource.from_models(base, experts), data, method, plan=plan,
                        regroup_by_length=False)       # compared batch by batch with the given batches
    assert method.calls == list(range(len(plan)))
    expected = ta_state(base, experts)
    assert result.state_dict.keys() == expected.keys()    # blocks past a truncated plan: non-block TA
    for key, tensor in result.state_dict.items():
        assert torch.equal(tensor, expected[key]), key


@pytest.mark.parametrize("family", ["bert", "gpt2", "llama", "qwen2"])
def test_captured_arguments_replay_each_block_exactly(family):
    """Replaying every block on what capture recorded reproduces the full model's hidden states, whatever
    keyword names the library uses for masks, positions or caches."""
    base, _, data = make_setup(family)
    plan = layermerge.blocks.find_block_plan(base)
    batch = data["t0"][0]
    inputs = capture_block_inputs(base, plan, batch)
    _, expected = block_io(base, list(plan.blocks), batch)
    hidden = inputs.hidden
    with torch.no_grad():
        for index, path in enumerate(plan.blocks):
            hidden = call_block(base.get_submodule(path), None, hidden, inputs.extras[inputs.extra_index[index]])
            torch.testing.assert_close(hidden, expected[index], rtol=0, atol=1e-6, msg=f"block {index}")
    if family == "qwen2":      # the sliding-window layer gets its own mask, kept apart from the others
        assert inputs.extra_index == [0, 1, 0]


class KeywordBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 4)

    def forward(self, x, *, scale):
        return torch.tanh(self.linear(x)) * scale


class KeywordCaller(nn.Module):
    """Calls its blocks with the hidden state by keyword, under a name no library uses."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.layers = nn.ModuleList(KeywordBlock() for _ in range(3))
        self.head = nn.Linear(4, 2)

    def forward(self, input_ids):
        hidden = self.embed(input_ids)
        for depth, layer in enumerate(self.layers):
            hidden = layer(x=hidden, scale=1.0 + depth)
        return self.head(hidden)


def test_capture_finds_the_hidden_state_by_the_blocks_own_parameter_name():
    torch.manual_seed(0)
    model = KeywordCaller().eval()
    plan = layermerge.blocks.BlockPlan(("embed",), ("layers.0", "layers.1", "layers.2"), ("head",))
    batch = {"input_ids": torch.tensor([[1, 2, 3], [4, 5, 6]])}
    inputs = capture_block_inputs(model, plan, batch)
    assert [extra[1]["scale"] for extra in inputs.extras] == [1.0, 2.0, 3.0]
    _, expected = block_io(model, list(plan.blocks), batch)
    hidden = inputs.hidden
    with torch.no_grad():
        for index, path in enumerate(plan.blocks):
            hidden = call_block(model.get_submodule(path), None, hidden, inputs.extras[inputs.extra_index[index]])
            assert torch.equal(hidden, expected[index])


def test_block_task_arithmetic_equals_data_free_merge(family_models):
    from transformers import AutoModel

    base_dir, expert_dirs = family_models["bert"]
    expert_set = layermerge.ExpertSet(base_dir, expert_dirs)
    template = AutoModel.from_pretrained(base_dir)
    data = {task: text_batches(i, lengths=((5, 3),)) for i, task in enumerate(expert_set.names)}
    result = run_engine(template, expert_set, data, BlockTaskArithmetic())
    reference = layermerge.merge(base_dir, expert_dirs, method="task_arithmetic", quiet=True)
    assert list(result.state_dict) == list(reference.state_dict)
    for key, tensor in reference.state_dict.items():
        assert torch.equal(result.state_dict[key], tensor), key
    assert isinstance(ExpertSetSource(expert_set).keys(), list)


def test_cache_spill_gives_the_same_result(tmp_path):
    base, experts, data = make_setup("llama")
    source = StateDictSource.from_models(base, experts)
    in_ram = run_engine(copy.deepcopy(base), source, data, NoisyDataMerger(), seed=3)
    spilled = run_engine(copy.deepcopy(base), source, data, NoisyDataMerger(), seed=3, cache_budget=0,
                         spill_dir=tmp_path / "spill")
    assert in_ram.summary["cache"]["spilled_tensors"] == 0
    assert spilled.summary["cache"]["spilled_tensors"] > 0 and spilled.summary["cache"]["peak_ram_bytes"] == 0
    for key, tensor in in_ram.state_dict.items():
        assert torch.equal(spilled.state_dict[key], tensor), key
    assert in_ram.block_stats == spilled.block_stats
    assert list((tmp_path / "spill").iterdir()) == []          # spill files removed at the end


def test_resume_after_kill_equals_uninterrupted_run(tmp_path):
    base, experts, data = make_setup("bert")
    source = StateDictSource.from_models(base, experts)
    uninterrupted = run_engine(copy.deepcopy(base), source, data, NoisyDataMerger(), seed=7)

    killed = NoisyDataMerger(fail_at=2)
    with pytest.raises(RuntimeError, match="simulated kill"):
        run_engine(copy.deepcopy(base), source, data, killed, seed=7, checkpoint_dir=tmp_path / "ckpt")
    assert killed.calls == [0, 1]

    folder = tmp_path / "ckpt"
    with pytest.raises(OutputError, match="resume=True"):
        run_engine(copy.deepcopy(base), source, data, NoisyDataMerger(), seed=7, checkpoint_dir=folder)
    with pytest.raises(OutputError, match="seed"):
        run_engine(copy.deepcopy(base), source, data, NoisyDataMerger(), seed=8, checkpoint_dir=folder,
                   resume=True)

    resumed_method = NoisyDataMerger()
    resumed = run_engine(copy.deepcopy(base), source, data, resumed_method, seed=7,
                         checkpoint_dir=tmp_path / "ckpt", resume=True)
    assert resumed_method.calls == [2]                          # blocks 0 and 1 came from the checkpoint
    assert resumed.summary["resumed_blocks"] == 2
    for key, tensor in uninterrupted.state_dict.items():
        assert torch.equal(resumed.state_dict[key], tensor), key
    assert resumed.block_stats == uninterrupted.block_stats
    for index, artifacts in uninterrupted.artifacts.items():
        assert torch.equal(resumed.artifacts[index]["scale"], artifacts["scale"])


def test_activation_cache_budget_and_spill(tmp_path):
    cache = ActivationCache(budget=100, spill_dir=tmp_path)
    small, big = torch.arange(10, dtype=torch.float32), torch.arange(40, dtype=torch.float32)
    cache.put("a", small)                      # 40 bytes: RAM
    cache.put("b", big)                        # 160 bytes: over budget, spilled
    assert cache.ram_bytes == 40 and cache.disk_bytes == 160 and cache.spilled == 1
    assert torch.equal(cache.get("a"), small) and torch.equal(cache.get("b"), big)
    cache.put("c", big[::4])                   # a view: 40 bytes, fits
    assert cache.ram_bytes == 80 and torch.equal(cache.get("c"), big[::4])
    cache.rename("b", "a")
    assert torch.equal(cache.get("a"), big) and "b" not in cache and cache.ram_bytes == 40
    cache.pop("a")
    assert cache.disk_bytes == 0 and len(cache) == 1
    spill_dirs = list(tmp_path.iterdir())
    cache.close()
    assert len(spill_dirs) == 1 and not spill_dirs[0].exists()


def test_custom_module_with_override_and_errors():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Linear(4, 6)
            self.one = nn.Linear(6, 6)
            self.two = nn.Linear(6, 6)

        def forward(self, x):
            return self.two(self.one(self.stem(x)))

    torch.manual_seed(0)
    base = Net()
    experts = {"a": perturbed(base, 1), "b": perturbed(base, 2)}
    data = {"a": [{"x": torch.randn(3, 4)}], "b": [{"x": torch.randn(2, 4)}]}
    override = {"embedding": ["stem"], "blocks": ["one", "two"]}
    result = run_engine(copy.deepcopy(base), StateDictSource.from_models(base, experts), data,
                        BlockTaskArithmetic(), block_plan=override)
    expected = ta_state(base, experts)
    assert all(torch.equal(result.state_dict[k], v) for k, v in expected.items())

    with pytest.raises(DataError, match="different tasks"):
        run_engine(copy.deepcopy(base), StateDictSource.from_models(base, experts), {"a": data["a"]},
                   BlockTaskArithmetic(), block_plan=override)
    with pytest.raises(IncompatibleExpertsError, match="same parameter names"):
        renamed = {f"net.{k}": v for k, v in base.state_dict().items()}
        run_engine(copy.deepcopy(base), StateDictSource(renamed, {t: renamed for t in experts}), data,
                   BlockTaskArithmetic(), block_plan=override)


def test_a_step_between_blocks_is_refused_not_skipped():
    """The engine streams each block's output into the next; a model that changes it in between (here a
    ReLU, elsewhere another stack's embedding) would be merged on streams it never computes."""

    class Gap(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Linear(4, 6)
            self.layers = nn.ModuleList([nn.Linear(6, 6), nn.Linear(6, 6)])

        def forward(self, x):
            return self.layers[1](torch.relu(self.layers[0](self.stem(x))))

    base = Gap()
    data = {"a": [{"x": torch.randn(3, 4)}]}
    with pytest.raises(BlockPlanError, match="'layers.1' does not receive block 'layers.0''s output"):
        run_engine(copy.deepcopy(base), StateDictSource.from_models(base, {"a": perturbed(base, 1)}), data,
                   BlockTaskArithmetic())


def test_blocks_called_twice_are_refused():
    class Shared(nn.Module):
        """ALBERT-style: a layer module applied several times, which is not a stream of blocks."""

        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList([nn.Linear(4, 4), nn.Linear(4, 4)])

        def forward(self, x):
            return self.layers[1](self.layers[0](self.layers[0](x)))

    base = Shared()
    with pytest.raises(BlockPlanError, match="not called once each"):
        run_engine(copy.deepcopy(base), StateDictSource.from_models(base, {"a": base}),
                   {"a": [{"x": torch.ones(1, 4)}]}, BlockTaskArithmetic())


def test_a_last_block_called_again_is_refused():
    """ALBERT runs its one shared layer group once per layer: the plan's last (only) block is called again
    after the capture pass would stop, so the first capture runs the model to its end to see it."""

    class Looped(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList([nn.Linear(4, 4)])
            self.head = nn.Linear(4, 2)

        def forward(self, x):
            for _ in range(3):
                x = self.layers[0](x)
            return self.head(x)

    base = Looped()
    with pytest.raises(BlockPlanError, match=r"not called once each in plan order \(calls: \[0, 0\]"):
        run_engine(copy.deepcopy(base), StateDictSource.from_models(base, {"a": perturbed(base, 1)}),
                   {"a": [{"x": torch.ones(2, 4)}]}, BlockTaskArithmetic())


def test_blocks_returning_dicts_are_refused():
    class DictBlock(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(4, 4)

        def forward(self, x):
            return {"feature_map": self.linear(x)}

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList([DictBlock(), DictBlock()])

        def forward(self, x):
            for layer in self.layers:
                x = layer(x)["feature_map"]
            return x

    base = Net()
    with pytest.raises(BlockPlanError, match="returns a dict"):
        run_engine(copy.deepcopy(base), StateDictSource.from_models(base, {"a": base}),
                   {"a": [{"x": torch.ones(2, 4)}]}, BlockTaskArithmetic())


def test_key_value_caches_are_never_replayed():
    """A cache object a model builds (even with use_cache=False) grows at every call; blocks get None."""
    from transformers import DynamicCache

    from layermerge.engine.capture import without_caches

    cache = DynamicCache()
    args, kwargs = without_caches((torch.ones(1), cache), {"cache": cache, "mask": None, "scale": 2})
    assert args[1] is None and kwargs == {"cache": None, "mask": None, "scale": 2}


def test_group_norm_blocks_keep_the_default_layout():
    """torch 2.13's CPU GroupNorm backward crashes on channels-last inputs, so such blocks are not converted."""
    from layermerge.engine.capture import call_block_outputs

    seen = []
    block = nn.Sequential(nn.Conv2d(4, 4, 1), nn.GroupNorm(2, 4))
    block.register_forward_pre_hook(lambda module, args: seen.append(args[0].is_contiguous()))
    call_block_outputs(block, None, torch.randn(1, 4, 3, 3), ((), {}))
    plain = nn.Sequential(nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)).eval()
    plain.register_forward_pre_hook(lambda module, args: seen.append(args[0].is_contiguous()))
    call_block_outputs(plain, None, torch.randn(1, 4, 3, 3), ((), {}))
    assert seen == [True, False]          # GroupNorm: as given; otherwise channels-last


@pytest.mark.parametrize("count", [1, 2, 3, 5])
def test_task_arithmetic_tensor_streams_experts_and_matches_the_stacked_sum(count, monkeypatch):
    """Summing task vectors one expert at a time, in slices, gives θ0 + λ Σ τ bit for bit as the stacked
    expression (and so as the data-free Task Arithmetic); a generator's previous expert is freed before
    the next is read, so a vocabulary-sized tensor is never held T times."""
    import weakref

    import layermerge.engine.driver as driver

    monkeypatch.setattr(driver, "SUM_CHUNK", 7)          # many slices, one of them partial
    generator = torch.Generator().manual_seed(count)
    base = torch.randn(5, 9, generator=generator)
    experts = [base + 0.01 * torch.randn(5, 9, generator=generator) for _ in range(count)]
    expected = base + 0.3 * torch.stack([e - base for e in experts]).sum(0)
    assert torch.equal(task_arithmetic_tensor(base, experts, 0.3), expected)

    alive = []

    def one_at_a_time():
        for expert in experts:
            assert not any(ref() is not None for ref in alive), "the previous expert is still held"
            copy_ = expert.clone()
            alive.append(weakref.ref(copy_))
            yield copy_
            del copy_

    assert torch.equal(task_arithmetic_tensor(base, one_at_a_time(), 0.3), expected)
    integer = torch.arange(6)
    assert task_arithmetic_tensor(integer, iter([integer + 1]), 0.3) is integer
    with pytest.raises(ValueError, match="at least one expert"):
        task_arithmetic_tensor(base, iter([]), 0.3)
