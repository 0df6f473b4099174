"""RegMean: the core solve against independent least squares, the known answers (one expert, equal
Grams), the ridge fallback, and a whole merge of tiny BERT experts checked against a second
implementation (hooks on each expert's own full model, numpy solve)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

import layermerge
from layermerge.io.reader import CheckpointReader
from layermerge.methods.regmean import (
    RegMean,
    linear_layers,
    regmean_linear,
    regularised_gram,
    solve_normal_equations,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def random_inputs(seed: int, rows: int, features: int) -> torch.Tensor:
    return torch.randn(rows, features, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_regularised_gram_scales_off_diagonal_only():
    gram = torch.tensor([[4.0, 2.0], [2.0, 9.0]])
    assert torch.equal(regularised_gram(gram, 0.25), torch.tensor([[4.0, 0.5], [0.5, 9.0]]))
    assert torch.equal(regularised_gram(gram, 1.0), gram)
    assert torch.equal(regularised_gram(gram, 0.0), torch.diag(torch.tensor([4.0, 9.0])))


def test_one_linear_layer_is_least_squares_on_stacked_data():
    """α = 1: RegMean's W is the lstsq solution of [X_1; X_2] Wᵀ ≈ [X_1 W_1ᵀ; X_2 W_2ᵀ]."""
    x1, x2 = random_inputs(1, 30, 6), random_inputs(2, 25, 6)
    w1, w2 = random_inputs(3, 4, 6), random_inputs(4, 4, 6)
    stacked_x = np.vstack([x1.numpy(), x2.numpy()])
    stacked_y = np.vstack([x1.numpy() @ w1.numpy().T, x2.numpy() @ w2.numpy().T])
    expected = np.linalg.lstsq(stacked_x, stacked_y, rcond=None)[0].T
    merged = regmean_linear([x1.T @ x1, x2.T @ x2], [w1, w2], alpha=1.0)
    assert merged.shape == w1.shape
    np.testing.assert_allclose(merged.numpy(), expected, rtol=1e-5, atol=1e-5)
    # and it beats averaging on the objective it minimises
    def objective(w):
        return float(((x1 @ (w - w1).T) ** 2).sum() + ((x2 @ (w - w2).T) ** 2).sum())
    assert objective(merged.double()) < objective((w1 + w2) / 2)


def test_alpha_matches_hand_solve_of_scaled_grams():
    x1, x2 = random_inputs(5, 12, 5), random_inputs(6, 9, 5)
    w1, w2 = random_inputs(7, 3, 5), random_inputs(8, 3, 5)
    g1, g2 = (x1.T @ x1).numpy(), (x2.T @ x2).numpy()
    alpha = 0.6
    s1 = alpha * g1 + (1 - alpha) * np.diag(np.diag(g1))
    s2 = alpha * g2 + (1 - alpha) * np.diag(np.diag(g2))
    expected = np.linalg.solve(s1 + s2, s1 @ w1.numpy().T + s2 @ w2.numpy().T).T
    merged = regmean_linear([x1.T @ x1, x2.T @ x2], [w1, w2], alpha=alpha)
    np.testing.assert_allclose(merged.numpy(), expected, rtol=1e-5, atol=1e-5)


def test_one_expert_returns_that_expert():
    x, w = random_inputs(9, 20, 7), random_inputs(10, 5, 7)
    for alpha in (1.0, 0.9, 0.0):
        np.testing.assert_allclose(regmean_linear([x.T @ x], [w], alpha=alpha).numpy(), w.numpy(), atol=1e-5)


def test_identical_grams_give_the_average():
    x = random_inputs(11, 15, 6)
    weights = [random_inputs(12 + i, 4, 6) for i in range(3)]
    average = torch.stack(weights).mean(0)
    for alpha in (1.0, 0.5):
        merged = regmean_linear([x.T @ x] * 3, weights, alpha=alpha)
        np.testing.assert_allclose(merged.numpy(), average.numpy(), atol=1e-5)


def test_singular_system_gets_a_ridge_towards_the_average():
    """Too few rows and a feature no input reaches: Cholesky fails, the ridge solve is finite, the
    unreached feature's column is the experts' average and the reached ones still fit the data."""
    x1 = random_inputs(20, 2, 5)
    x2 = random_inputs(21, 2, 5)
    x1[:, 4] = 0
    x2[:, 4] = 0
    w1, w2 = random_inputs(22, 3, 5), random_inputs(23, 3, 5)
    lhs = (x1.T @ x1 + x2.T @ x2).float()
    rhs = (x1.T @ x1 @ w1.T + x2.T @ x2 @ w2.T).float()
    solution, ridge = solve_normal_equations(lhs, rhs, ((w1 + w2) / 2).T.float())
    assert 0 < ridge < 1e-2 and torch.isfinite(solution).all()
    np.testing.assert_allclose(solution[4].numpy(), ((w1 + w2) / 2)[:, 4].numpy(), atol=1e-5)
    # the reached rows reproduce the experts' outputs (4 rows, rank 4 in the 4 reached features)
    np.testing.assert_allclose((x1.float() @ solution).numpy(), (x1 @ w1.T).numpy(), atol=1e-3)
    np.testing.assert_allclose((x2.float() @ solution).numpy(), (x2 @ w2.T).numpy(), atol=1e-3)
    empty, ridge = solve_normal_equations(torch.zeros(5, 5), torch.zeros(5, 3), w1.T.float())
    assert ridge == float("inf") and torch.equal(empty, w1.T.float())


def test_linear_layers_finds_linear_and_conv1d():
    from transformers.pytorch_utils import Conv1D

    block = nn.Module()
    block.a = nn.Linear(3, 4)
    block.b = Conv1D(6, 3)                      # weight (in=3, out=6)
    block.norm = nn.LayerNorm(4)
    layers = linear_layers(block, {name for name, _ in block.named_parameters()})
    assert [(layer.path, layer.in_features, layer.transposed) for layer in layers] == [("a", 3, False),
                                                                                       ("b", 3, True)]


def test_non_block_scaling():
    assert RegMean(RegMean.Params()).non_block_scaling(4) == 0.25
    assert RegMean(RegMean.Params(others="task_arithmetic", scaling=0.4)).non_block_scaling(4) == 0.4


# --------------------------------------------------------------------- end to end on tiny BERT
def text_batches(tasks, seed=0):
    """Two padded batches per task (padding must not reach the Grams)."""
    generator = torch.Generator().manual_seed(seed)
    data = {}
    for task in tasks:
        batches = []
        for rows, width in ((3, 7), (2, 5)):
            mask = torch.ones(rows, width, dtype=torch.long)
            mask[1:, width - 2:] = 0
            batches.append({"input_ids": torch.randint(3, 99, (rows, width), generator=generator) * mask,
                            "attention_mask": mask})
        data[task] = batches
    return data


FAMILIES = {  # backbone attribute, block container inside it, linear module type, weight stored as (in, out)
    "bert": ("bert", "encoder", nn.Linear, False),
    "gpt2": ("transformer", "h", None, True),
}


def independent_regmean(family: str, experts: dict, data: dict, alpha: float) -> dict[str, np.ndarray]:
    """A second implementation: each expert's own backbone, hooks on its blocks' linear layers, Grams
    of real tokens / examples, numpy solve of the normal equations (float64)."""
    from transformers import AutoModelForSequenceClassification
    from transformers.pytorch_utils import Conv1D

    attribute, container, kind, in_out = FAMILIES[family]
    kind = kind or Conv1D
    lhs, rhs = {}, {}
    for task, folder in experts.items():
        backbone = getattr(AutoModelForSequenceClassification.from_pretrained(folder), attribute).eval().double()
        blocks = backbone.get_submodule(container)
        grams, handles, current = {}, [], {}
        for name, module in blocks.named_modules():
            if isinstance(module, kind):
                def record(module, args, name=name, grams=grams, current=current):
                    x = args[0][current["mask"]]
                    grams[name] = grams.get(name, 0) + (x.T @ x).numpy()
                handles.append(module.register_forward_pre_hook(record))
        examples = 0
        with torch.no_grad():
            for batch in data[task]:
                current["mask"] = batch["attention_mask"].bool()
                backbone(**batch)
                examples += batch["input_ids"].shape[0]
        for handle in handles:
            handle.remove()
        for name, gram in grams.items():
            gram = gram / examples
            gram = alpha * gram + (1 - alpha) * np.diag(np.diag(gram))
            weight = blocks.get_submodule(name).weight.detach().numpy()
            weight = weight if in_out else weight.T
            lhs[name] = lhs.get(name, 0) + gram
            rhs[name] = rhs.get(name, 0) + gram @ weight
    solved = {name: np.linalg.solve(lhs[name], rhs[name]) for name in lhs}
    return {f"{container}.{name}.weight": value if in_out else value.T for name, value in solved.items()}


@pytest.mark.parametrize("family, layers", [("gpt2", 4)])
def test_conv1d_family_matches_a_second_implementation(family, layers, family_models):
    """GPT-2's Conv1D stores weights (in, out): the transposition must be right (c_proj is square)."""
    base, experts = family_models[family]
    data = text_batches(experts)
    merged = layermerge.merge(base, experts, method="regmean", data=data, quiet=True, device="cpu", alpha=0.8)
    expected = independent_regmean(family, experts, data, 0.8)
    assert len(expected) == 2 * layers
    for key, value in expected.items():
        np.testing.assert_allclose(merged.state_dict[key].double().numpy(), value, rtol=1e-4, atol=1e-5,
                                   err_msg=key)


def test_merge_tiny_bert_matches_a_second_implementation(family_models, tmp_path):
    from transformers import AutoModel

    base, experts = family_models["bert"]
    data = text_batches(experts)
    out = tmp_path / "regmean"
    layermerge.merge(base, experts, method="regmean", data=data, output=out, quiet=True, device="cpu",
                     alpha=0.9)
    merged = CheckpointReader(out)
    readers = [CheckpointReader(folder) for folder in experts.values()]
    expected = independent_regmean("bert", experts, data, 0.9)
    assert len(expected) == 2 * 6                      # q, k, v, attention out, intermediate, output per layer
    for key, value in expected.items():
        np.testing.assert_allclose(merged.get(key).double().numpy(), value, rtol=1e-4, atol=1e-5, err_msg=key)
        average = torch.stack([r.get("bert." + key) for r in readers]).mean(0)
        assert not torch.allclose(merged.get(key), average, atol=1e-4), key      # RegMean is not averaging
    # every other tensor (biases, norms, embeddings, pooler) is the experts' average
    for key in merged.keys():
        if key not in expected:
            average = torch.stack([r.get("bert." + key).float() for r in readers]).mean(0)
            torch.testing.assert_close(merged.get(key).float(), average, rtol=1e-5, atol=1e-6, msg=key)
    summary = json.loads((out / "layermerge_summary.json").read_text())
    assert summary["method"] == "regmean"
    assert not list(out.glob("regmean/*.safetensors"))                                 # no Grams saved
    model = AutoModel.from_pretrained(out).eval()
    with torch.no_grad():
        hidden = model(**data["task0"][0]).last_hidden_state
    assert torch.isfinite(hidden).all()


def test_merge_one_expert_is_that_expert(family_models):
    base, experts = family_models["bert"]
    one = {"task1": experts["task1"]}
    merged = layermerge.merge(base, one, method="regmean", data=text_batches(one), quiet=True, device="cpu")
    reader = CheckpointReader(experts["task1"])
    for key, tensor in merged.state_dict.items():
        torch.testing.assert_close(tensor.float(), reader.get("bert." + key).float(), rtol=1e-4, atol=1e-5,
                                   msg=key)


def test_task_arithmetic_for_other_tensors(family_models):
    base, experts = family_models["bert"]
    merged = layermerge.merge(base, experts, method="regmean", data=text_batches(experts), quiet=True,
                              device="cpu", others="task_arithmetic", scaling=0.4)
    base_reader = CheckpointReader(base)
    readers = [CheckpointReader(folder) for folder in experts.values()]
    for key in ("encoder.layer.0.attention.output.LayerNorm.weight", "encoder.layer.1.output.dense.bias",
                "embeddings.word_embeddings.weight"):
        b = base_reader.get(key)
        expected = b + 0.4 * sum(r.get("bert." + key) - b for r in readers)
        torch.testing.assert_close(merged.state_dict[key], expected, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------- data parallel
def toy_regmean(parallel=None) -> dict:
    """RegMean on test_prodistill's toy model, three batches per task (the ranks hold different ones)."""
    import copy

    from test_prodistill import setup_toy, subspace_data

    from layermerge.engine import StateDictSource, run_engine

    base, experts, _ = setup_toy()
    data = {task: subspace_data(task, batches=3, size=3) for task in experts}
    for batches in data.values():                       # every feature reached: no ridge needed
        for batch in batches:
            batch["x"] = batch["x"] + 0.1 * torch.randn(batch["x"].shape, generator=torch.Generator().manual_seed(1))
    options = {"parallel": parallel} if parallel is not None else {}
    method = RegMean(RegMean.Params(alpha=0.8))
    result = run_engine(copy.deepcopy(base), StateDictSource.from_models(base, experts), data, method,
                        scaling=method.non_block_scaling(len(experts)), **options)
    return {"state": result.state_dict, "stats": result.block_stats}


def _worker(rank: int, world: int, port: int, folder: str) -> None:
    import torch.distributed as dist

    from layermerge import distributed

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        torch.save(toy_regmean(distributed.current()), f"{folder}/rank{rank}.pt")
    finally:
        distributed.shutdown()


@pytest.mark.slow
def test_two_processes_match_one(tmp_path):
    """Two gloo processes (each rank Grams over its own batches, then summed) give one process's merge."""
    import torch.multiprocessing as mp
    from test_distributed import free_port

    mp.spawn(_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    single = toy_regmean()
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    for key, tensor in single["state"].items():
        assert torch.equal(ranks[0]["state"][key], ranks[1]["state"][key]), key
        torch.testing.assert_close(ranks[0]["state"][key], tensor, rtol=1e-5, atol=1e-6)
    from test_prodistill import setup_toy

    layer = "layers.0.linear.weight"
    average = sum(expert.state_dict()[layer] for expert in setup_toy()[1].values()) / 2
    assert not torch.allclose(single["state"][layer], average, atol=1e-3)            # not averaging
    assert [s["ridged_layers"] for s in single["stats"]] == [[], [], []]


def test_merged_stream_variant(family_models):
    """inputs='merged': Grams from the merged model's own stream (block 0 sees the averaged embeddings);
    it differs from the paper's expert streams but the untouched tensors are the same averages."""
    base, experts = family_models["bert"]
    data = text_batches(experts)
    paper = layermerge.merge(base, experts, method="regmean", data=data, quiet=True, device="cpu").state_dict
    merged = layermerge.merge(base, experts, method="regmean", data=data, quiet=True, device="cpu",
                              inputs="merged").state_dict
    key = "encoder.layer.0.attention.self.query.weight"
    assert torch.isfinite(merged[key]).all() and not torch.allclose(merged[key], paper[key], atol=1e-5)
    norm = "encoder.layer.1.output.LayerNorm.weight"
    assert torch.equal(merged[norm], paper[norm])


def independent_regmean_plusplus(experts: dict, data: dict, alpha: float) -> dict[str, np.ndarray]:
    """A second implementation of RegMean++ on BERT: the merged backbone starts as the experts' average
    and is solved layer by layer; task i's Grams of layer l come from a copy of the merged backbone
    whose layer l is expert i's (so layers < l are the merged ones), run on task i's batches (float64)."""
    import copy

    from transformers import AutoModelForSequenceClassification

    models = {task: AutoModelForSequenceClassification.from_pretrained(folder).bert.eval().double()
              for task, folder in experts.items()}
    states = [model.state_dict() for model in models.values()]
    merged = copy.deepcopy(next(iter(models.values())))
    merged.load_state_dict({key: torch.stack([s[key] for s in states]).mean(0) for key in states[0]})
    solved = {}
    for index, layer in enumerate(merged.encoder.layer):
        names = [name for name, module in layer.named_modules() if isinstance(module, nn.Linear)]
        lhs, rhs = {}, {}
        for task, model in models.items():
            hybrid = copy.deepcopy(merged)
            hybrid.encoder.layer[index].load_state_dict(model.encoder.layer[index].state_dict())
            grams, current = {}, {}
            handles = []
            for name in names:
                def record(module, args, name=name, grams=grams, current=current):
                    x = args[0][current["mask"]]
                    grams[name] = grams.get(name, 0) + (x.T @ x).numpy()
                handles.append(hybrid.encoder.layer[index].get_submodule(name).register_forward_pre_hook(record))
            examples = 0
            with torch.no_grad():
                for batch in data[task]:
                    current["mask"] = batch["attention_mask"].bool()
                    hybrid(**batch)
                    examples += batch["input_ids"].shape[0]
            for handle in handles:
                handle.remove()
            for name in names:
                gram = grams[name] / examples
                gram = alpha * gram + (1 - alpha) * np.diag(np.diag(gram))
                weight = model.encoder.layer[index].get_submodule(name).weight.detach().numpy().T
                lhs[name] = lhs.get(name, 0) + gram
                rhs[name] = rhs.get(name, 0) + gram @ weight
        with torch.no_grad():
            for name in names:
                value = np.linalg.solve(lhs[name], rhs[name]).T
                layer.get_submodule(name).weight.copy_(torch.from_numpy(value))
                solved[f"encoder.layer.{index}.{name}.weight"] = value
    return solved


def test_regmean_plusplus_matches_a_layer_by_layer_second_implementation(family_models):
    """RegMean++ fits each layer on the merged model's running inputs: checked against an independent
    progressive solve; it differs from plain RegMean (whose layers see each expert's own stream) and
    equals RegMean with inputs="merged" at the same α."""
    base, experts = family_models["bert"]
    data = text_batches(experts)
    merged = layermerge.merge(base, experts, method="regmean_plusplus", data=data, quiet=True,
                              device="cpu").state_dict
    expected = independent_regmean_plusplus(experts, data, 0.95)
    assert len(expected) == 2 * 6
    for key, value in expected.items():
        np.testing.assert_allclose(merged[key].double().numpy(), value, rtol=1e-4, atol=1e-5, err_msg=key)
    plain = layermerge.merge(base, experts, method="regmean", data=data, quiet=True, device="cpu",
                             alpha=0.95).state_dict
    deep = "encoder.layer.1.output.dense.weight"
    assert not torch.allclose(merged[deep], plain[deep], atol=1e-4)
    same_as_flag = layermerge.merge(base, experts, method="regmean", data=data, quiet=True, device="cpu",
                                    alpha=0.95, inputs="merged").state_dict
    assert all(torch.equal(merged[key], same_as_flag[key]) for key in merged)


def test_regmean_plusplus_with_one_expert_returns_it(family_models):
    base, experts = family_models["bert"]
    one = dict(list(experts.items())[:1])
    merged = layermerge.merge(base, one, method="regmean_plusplus", data=text_batches(one), quiet=True,
                              device="cpu").state_dict
    expert = CheckpointReader(next(iter(one.values())))
    for key, tensor in merged.items():
        torch.testing.assert_close(tensor, expert.get("bert." + key).float(), rtol=1e-4, atol=1e-5, msg=key)


# --------------------------------------------------------------------- 1×1 convolutions (EfficientNet)
def test_linear_layers_finds_pointwise_convolutions_only():
    block = nn.Module()
    block.pointwise = nn.Conv2d(4, 6, 1)
    block.strided = nn.Conv2d(4, 6, 1, stride=2)
    block.spatial = nn.Conv2d(4, 6, 3)                       # 3×3: not one linear map per pixel
    block.grouped = nn.Conv2d(4, 4, 1, groups=2)             # block-diagonal: not a plain linear map
    block.padded = nn.Conv2d(4, 6, 1, padding=1)
    names = {name for name, _ in block.named_parameters()}
    layers = linear_layers(block, names)
    assert [(layer.path, layer.in_features, layer.conv_stride) for layer in layers] == [
        ("pointwise", 4, (1, 1)), ("strided", 4, (2, 2))]
    assert linear_layers(block, names, pointwise_convs=False) == []
    weight = block.strided.weight.detach()
    layer = layers[1]
    assert torch.equal(layer.as_in_out(weight), weight[:, :, 0, 0].T)
    assert torch.equal(layer.from_in_out(layer.as_in_out(weight)), weight)
    x = torch.randn(2, 4, 5, 5)
    rows = layer.rows(x)                                     # the pixels the stride-2 conv reads, as rows
    torch.testing.assert_close(rows @ layer.as_in_out(weight), block.strided(x).movedim(1, -1).reshape(-1, 6)
                               - block.strided.bias)


def independent_pointwise_regmean(experts: dict, data: dict, alpha: float) -> dict[str, np.ndarray]:
    """Second implementation for CNNs: each expert's own model, hooks on its blocks' 1×1 convolutions,
    every pixel's channel vector a row, Grams per example, numpy solve (float64)."""
    from layermerge.data.models import load_vision_model

    lhs, rhs = {}, {}
    for task, folder in experts.items():
        model = load_vision_model(folder)[0].eval().double()
        grams, handles = {}, []
        for name, module in model.named_modules():
            if name.startswith("_blocks.") and isinstance(module, nn.Conv2d) and module.kernel_size == (1, 1):
                def record(module, args, name=name, grams=grams):
                    x = args[0].permute(0, 2, 3, 1).reshape(-1, args[0].shape[1])
                    grams[name] = grams.get(name, 0) + (x.T @ x).numpy()
                handles.append(module.register_forward_pre_hook(record))
        with torch.no_grad():
            for batch in data[task]:
                model(batch["pixel_values"].double())
        for handle in handles:
            handle.remove()
        examples = sum(len(batch["pixel_values"]) for batch in data[task])
        for name, gram in grams.items():
            gram = gram / examples
            gram = alpha * gram + (1 - alpha) * np.diag(np.diag(gram))
            weight = model.get_submodule(name).weight.detach()[:, :, 0, 0].numpy().T
            lhs[name] = lhs.get(name, 0) + gram
            rhs[name] = rhs.get(name, 0) + gram @ weight
    # Deep layers see 1×1 or 2×2 feature maps: too few rows for a full-rank Gram (our solve then adds a
    # ridge) or a well-conditioned one; only those with one stable answer are compared.
    return {f"{name}.weight": np.linalg.solve(lhs[name], rhs[name]).T[:, :, None, None] for name in lhs
            if np.linalg.cond(lhs[name]) < 1e6}


def test_efficientnet_pointwise_convolutions_match_a_second_implementation(tmp_path):
    pytest.importorskip("efficientnet_lite_pytorch")
    from test_datadriven_output import save_vision_family

    base, experts = save_vision_family(tmp_path, "efficientnet-lite0", 32, pretrained=False)
    generator = torch.Generator().manual_seed(0)
    data = {task: [{"pixel_values": torch.randn(6, 3, 32, 32, generator=generator)}] for task in experts}
    merged = layermerge.merge(base, experts, method="regmean", data=data, quiet=True, device="cpu", alpha=0.9)
    expected = independent_pointwise_regmean(experts, data, 0.9)
    assert len(expected) >= 8
    assert {"_blocks.0._project_conv.weight", "_blocks.1._expand_conv.weight"} <= set(expected)
    readers = [CheckpointReader(folder) for folder in experts.values()]
    for key, value in expected.items():
        np.testing.assert_allclose(merged.state_dict[key].double().numpy(), value, rtol=1e-3, atol=1e-4,
                                   err_msg=key)          # the Grams are summed in float32 here
        average = torch.stack([r.get(key) for r in readers]).mean(0)
        assert not torch.allclose(merged.state_dict[key], average, atol=1e-4), key
    averaged = layermerge.merge(base, experts, method="regmean", data=data, quiet=True, device="cpu",
                                pointwise_convs=False)
    for key in expected:
        torch.testing.assert_close(averaged.state_dict[key], torch.stack([r.get(key) for r in readers]).mean(0))
