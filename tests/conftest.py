"""Shared fixtures: tiny transformers models of several families, built and saved by the tests."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch

TINY_CONFIGS = {
    "bert": dict(model_type="bert", vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                 intermediate_size=37, max_position_embeddings=64),
    "roberta": dict(model_type="roberta", vocab_size=99, hidden_size=32, num_hidden_layers=2,
                    num_attention_heads=4, intermediate_size=37, max_position_embeddings=70, pad_token_id=1),
    "vit": dict(model_type="vit", image_size=16, patch_size=4, num_channels=3, hidden_size=32,
                num_hidden_layers=2, num_attention_heads=4, intermediate_size=37),
    "gpt2": dict(model_type="gpt2", vocab_size=99, n_embd=32, n_layer=2, n_head=4, n_positions=64),
    "llama": dict(model_type="llama", vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, intermediate_size=48, max_position_embeddings=64),
}


def make_config(family: str, **overrides):
    from transformers import AutoConfig

    values = dict(TINY_CONFIGS[family])
    values.update(overrides)
    return AutoConfig.for_model(**values)


def perturb_(model: torch.nn.Module, seed: int, scale: float = 0.02) -> torch.nn.Module:
    """Play fine-tuning: add seeded noise to every parameter."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * scale)
    return model


def perturbed(model: torch.nn.Module, seed: int, scale: float = 0.05) -> torch.nn.Module:
    """An expert: a copy of ``model`` with seeded noise on every parameter, in eval mode."""
    import copy

    return perturb_(copy.deepcopy(model), seed, scale).eval()


def save_with_experts(base: torch.nn.Module, root: Path, count: int = 2) -> tuple[dict, dict]:
    """Save ``base`` in ``root/base`` and ``count`` perturbed experts ``t0, t1...`` beside it, as
    save_pretrained writes them; returns ({task: expert model}, {task: folder})."""
    base.save_pretrained(root / "base")
    experts, paths = {}, {}
    for index in range(count):
        task = f"t{index}"
        experts[task], paths[task] = perturbed(base, index + 1), root / task
        experts[task].save_pretrained(paths[task])
    return experts, paths


def build_family(root: Path, family: str, n_experts: int = 3, task_heads: bool = True) -> tuple[Path, dict[str, Path]]:
    """Save a tiny base (AutoModel) and experts (with classification heads where the family has them)."""
    from transformers import AutoModel, AutoModelForImageClassification, AutoModelForSequenceClassification

    torch.manual_seed(0)
    # ViT and RoBERTa task models have no pooler, so neither may their base.
    base_options = {"add_pooling_layer": False} if family in ("vit", "roberta") else {}
    base = AutoModel.from_config(make_config(family), **base_options)
    base_dir = root / f"{family}-base"
    base.save_pretrained(base_dir)
    experts = {}
    for index in range(n_experts):
        name = f"task{index}"
        labels = 2 + index
        if task_heads:
            head_cls = AutoModelForImageClassification if family == "vit" else AutoModelForSequenceClassification
            torch.manual_seed(100 + index)
            model = head_cls.from_config(make_config(family, num_labels=labels))
            prefix = model.base_model_prefix
            getattr(model, prefix).load_state_dict(base.state_dict())
        else:
            model = AutoModel.from_config(make_config(family), **base_options)
            model.load_state_dict(base.state_dict())
        perturb_(model, seed=index)
        expert_dir = root / f"{family}-{name}"
        model.save_pretrained(expert_dir)
        experts[name] = expert_dir
    return base_dir, experts


def tree_hashes(paths) -> dict[str, str]:
    """sha256 of every file under the given folders, to prove inputs were never modified."""
    hashes = {}
    for root in paths:
        root = Path(root)
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        for path in files:
            hashes[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
    return hashes


@pytest.fixture(scope="session")
def family_models(tmp_path_factory):
    """family -> (base_dir, {task: expert_dir}); built once per test session."""
    root = tmp_path_factory.mktemp("families")
    return {family: build_family(root, family) for family in TINY_CONFIGS}


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny tensors gain nothing from intra-op threads, and on a busy shared CPU the thread pool's
    contention makes them many times slower; use with ``pytestmark = pytest.mark.usefixtures(...)``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class BNNet(torch.nn.Module):
    """Two 3×3 convolutions with BatchNorm and a linear head, for 1×4×4 inputs: a CNN small enough for
    the alignment tests (NP Merge, PLeaS)."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.BatchNorm2d(4)
        self.conv2, self.bn2 = torch.nn.Conv2d(4, 3, 3, padding=1), torch.nn.BatchNorm2d(3)
        self.fc = torch.nn.Linear(3 * 4 * 4, 5)

    def forward(self, x):
        x = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
        return self.fc(torch.flatten(x, 1))


def randomise_batch_norms_(*norms: torch.nn.Module) -> None:
    """Non-trivial weights and running statistics for batch norms (from the global seed)."""
    for bn in norms:
        bn.weight.data.uniform_(0.5, 1.5)
        bn.bias.data.normal_()
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2.0)


def bn_net(seed: int) -> torch.nn.Module:
    """A seeded BNNet with non-trivial BatchNorm weights and running statistics, in eval mode."""
    torch.manual_seed(seed)
    model = BNNet()
    randomise_batch_norms_(model.bn1, model.bn2)
    return model.eval()
