"""ProDistill on the block engine: lr 0 is Task Arithmetic, and on experts that change disjoint
parameters (and whose tasks live in disjoint feature subspaces) the distillation recovers both."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import layermerge
from layermerge.engine import StateDictSource
from layermerge.methods.prodistill import ProDistill, prodistill_merge

HALF = 4


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(2 * HALF, 2 * HALF, bias=False)

    def forward(self, x, scale):
        return x + torch.tanh(self.linear(x)) * scale


class Toy(nn.Module):
    """Embedding → residual blocks (with an extra argument) → head; no biases: subspaces stay apart."""

    def __init__(self, depth: int = 3):
        super().__init__()
        self.embed = nn.Linear(2 * HALF, 2 * HALF, bias=False)
        self.layers = nn.ModuleList(Block() for _ in range(depth))
        self.head = nn.Linear(2 * HALF, 1, bias=False)

    def forward(self, x):
        x = self.embed(x)
        for layer in self.layers:
            x = layer(x, scale=1.0)
        return self.head(x)


def block_diagonal_(model: Toy) -> Toy:
    """Zero the cross-subspace weights: features 0..HALF-1 and HALF..2*HALF-1 never mix."""
    with torch.no_grad():
        for module in [model.embed, *(layer.linear for layer in model.layers)]:
            module.weight[:HALF, HALF:] = 0
            module.weight[HALF:, :HALF] = 0
    return model


def disjoint_experts(base: Toy) -> dict[str, Toy]:
    """Expert 'a' changes only the first subspace's block weights, 'b' only the second's."""
    experts = {}
    for task, rows in (("a", slice(0, HALF)), ("b", slice(HALF, 2 * HALF))):
        expert = copy.deepcopy(base)
        generator = torch.Generator().manual_seed(len(experts) + 1)
        with torch.no_grad():
            for layer in expert.layers:
                layer.linear.weight[rows, rows] += torch.randn(HALF, HALF, generator=generator) * 0.8
        experts[task] = expert.eval()
    return experts


def subspace_data(task: str, batches: int = 2, size: int = 4) -> list[dict]:
    generator = torch.Generator().manual_seed(ord(task))
    out = []
    for _ in range(batches):
        x = torch.randn(size, 2 * HALF, generator=generator)
        x[:, HALF:] = 0 if task == "a" else x[:, HALF:]
        x[:, :HALF] = 0 if task == "b" else x[:, :HALF]
        out.append({"x": x})
    return out


def setup_toy():
    torch.manual_seed(0)
    base = block_diagonal_(Toy()).eval()
    experts = disjoint_experts(base)
    data = {task: subspace_data(task) for task in experts}
    return base, experts, data


def test_lr_zero_equals_task_arithmetic_exactly(family_models):
    from transformers import AutoModel

    base_dir, expert_dirs = family_models["llama"]
    expert_set = layermerge.ExpertSet(base_dir, expert_dirs)
    generator = torch.Generator().manual_seed(0)
    data = {task: [{"input_ids": torch.randint(0, 99, (2, 5), generator=generator),
                    "attention_mask": torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])}]
            for task in expert_set.names}
    result = prodistill_merge(AutoModel.from_pretrained(base_dir), expert_set, data, lr=0.0, epochs=3)
    reference = layermerge.merge(base_dir, expert_dirs, method="task_arithmetic", scaling=0.3, quiet=True)
    assert list(result.state_dict) == list(reference.state_dict)
    for key, tensor in reference.state_dict.items():
        assert torch.equal(result.state_dict[key], tensor), key
    # Learned coefficients are reported per block, task and tensor, at their initial value.
    coefficient = result.artifacts[0]["task0/mlp.up_proj.weight"]
    assert coefficient.shape == (48, 32) and torch.all(coefficient == 0.3)


@pytest.mark.parametrize("granularity", ["tensor", "task"])
def test_coarse_coefficients_at_lr_zero_equal_task_arithmetic(granularity):
    """The coarse ablations start where element-wise λ start: at Task Arithmetic (0.3), exactly."""
    base, experts, data = setup_toy()
    result = prodistill_merge(copy.deepcopy(base), StateDictSource.from_models(base, experts), data,
                              lr=0.0, epochs=2, granularity=granularity)
    for key, value in base.state_dict().items():
        expected = value + 0.3 * sum(expert.state_dict()[key] - value for expert in experts.values())
        torch.testing.assert_close(result.state_dict[key], expected, rtol=0, atol=1e-6)


def test_disjoint_experts_are_recovered():
    base, experts, data = setup_toy()
    result = prodistill_merge(copy.deepcopy(base), StateDictSource.from_models(base, experts), data,
                              lr=0.05, epochs=150, batch_size=4, patience=0, train_precision="float32",
                              engine_options={"seed": 1})      # bfloat16 would end 5e-3 off, by CPU kind
    for stats in result.block_stats:
        assert stats["loss_final"] < 1e-3 * stats["loss_first_epoch"]
    merged = copy.deepcopy(base)
    merged.load_state_dict(result.state_dict)
    ta = copy.deepcopy(base)
    ta.load_state_dict({k: v + 0.3 * sum(e.state_dict()[k] - v for e in experts.values())
                        for k, v in base.state_dict().items()})
    with torch.no_grad():
        for task, expert in experts.items():
            for batch in data[task]:
                target = expert(**batch)
                torch.testing.assert_close(merged(**batch), target, atol=5e-3, rtol=0)
                assert (ta(**batch) - target).abs().max() > 0.05          # Task Arithmetic does not get there
    # λ rose from 0.3 towards 1 on the entries the expert changed; elsewhere τ = 0, so λ has no gradient.
    coefficient = result.artifacts[0]["a/linear.weight"]
    assert coefficient[:HALF, :HALF].mean() > 0.85
    assert torch.all(coefficient[HALF:, HALF:] == 0.3)


@pytest.mark.parametrize("granularity, shape", [("tensor", ()), ("task", ())])
@pytest.mark.parametrize("input_mode", ["merged", "expert"])
def test_ablation_options_run_and_reduce_the_loss(granularity, shape, input_mode):
    base, experts, data = setup_toy()
    result = prodistill_merge(copy.deepcopy(base), StateDictSource.from_models(base, experts), data,
                              lr=0.05, epochs=20, granularity=granularity, input_mode=input_mode)
    assert result.artifacts[0]["a/linear.weight"].shape == shape
    assert all(s["loss_last_epoch"] < s["loss_first_epoch"] for s in result.block_stats)


def test_padding_tokens_do_not_count():
    """Changing what padded positions produce must not change the loss."""

    class Ctx:
        device = torch.device("cpu")

        def __init__(self, output):
            self.output = output

        def run(self, weights, hidden, ref, stream):
            return self.output

        def merged_input(self, ref):
            return None

        def expert_output(self, ref):
            return torch.zeros(2, 3, 4)

        def token_mask(self, ref):
            return torch.tensor([[True, True, False], [True, False, False]])

    method = ProDistill()
    output = torch.ones(2, 3, 4)
    noisy = output.clone()
    noisy[0, 2] = 100.0
    noisy[1, 1:] = -50.0
    assert float(method._error(Ctx(output), {}, None, {})) == 3 * 4
    assert float(method._error(Ctx(noisy), {}, None, {})) == 3 * 4


def test_registered_and_parameters_validated():
    from layermerge.errors import ConfigError
    from layermerge.methods.registry import _REGISTRY, validate_params

    info = _REGISTRY["prodistill"]
    assert info.kind == "block" and info.needs_data
    defaults = validate_params(info, {})
    assert (defaults.lr, defaults.batch_size, defaults.init) == (0.03, 64, 0.3)
    with pytest.raises(ConfigError, match="granularity"):
        validate_params(info, {"granularity": "row"})


@pytest.mark.parametrize("input_mode", ["dual", "merged", "expert"])
def test_recomputing_expert_outputs_gives_the_same_result(input_mode):
    """The switch only exists to time what computing Block(θ_i; ·) once per block saves."""
    base, experts, data = setup_toy()
    source = StateDictSource.from_models(base, experts)
    options = {"lr": 0.05, "epochs": 5, "input_mode": input_mode}
    once = prodistill_merge(copy.deepcopy(base), source, data, **options)
    every_step = prodistill_merge(copy.deepcopy(base), source, data, recompute_expert_outputs=True, **options)
    for key, tensor in once.state_dict.items():
        assert torch.equal(every_step.state_dict[key], tensor), key
    assert once.block_stats == every_step.block_stats
    assert "recompute_expert_outputs" not in ProDistill(ProDistill.Params(recompute_expert_outputs=True)).config()


def test_auto_precision_falls_back_to_float32_when_bfloat16_fails(monkeypatch):
    """'auto' picks bfloat16 on CPUs with native bfloat16 matmuls; a block that cannot run in it (DeBERTa's
    attention overflows, X-MOD's adapters mix dtypes) trains in float32 instead of failing the merge."""
    import layermerge.methods.prodistill as module

    real_fit = module.fit
    tried = []

    def fit(*args, precision="float32", **kwargs):
        tried.append(precision)
        if precision == "bfloat16":
            raise RuntimeError("expected scalar type BFloat16 but found Float")
        return real_fit(*args, precision=precision, **kwargs)

    monkeypatch.setattr(module, "fit", fit)
    monkeypatch.setattr(module, "resolve_precision", lambda precision, device, block: "bfloat16")
    base, experts, data = setup_toy()
    result = prodistill_merge(copy.deepcopy(base), StateDictSource.from_models(base, experts), data, epochs=3)
    assert tried == ["bfloat16", "float32"] * len(result.plan)
    stats = result.block_stats[0]
    assert stats["train_precision"] == "float32" and "expected scalar type" in stats["precision_fallback"]
    with pytest.raises(RuntimeError, match="expected scalar type"):      # a precision the user chose is kept
        prodistill_merge(copy.deepcopy(base), StateDictSource.from_models(base, experts), data, epochs=3,
                         train_precision="bfloat16")
