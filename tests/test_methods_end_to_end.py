"""Every data-free method end to end on a tiny BERT.

Merged folders load with transformers and give finite outputs; the whole-model TIES trim and
EMR's rebuilt task models are checked against in-memory computations.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
import yaml
from conftest import build_family, tree_hashes
from safetensors.torch import load_file

import layermerge
from layermerge.errors import CheckpointError

METHODS = ["ties", "dare_linear", "dare_ties", "breadcrumbs", "breadcrumbs_ties", "consensus", "emr", "pcb",
           "magmax", "slerp"]


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    root = tmp_path_factory.mktemp("bert")
    base, experts = build_family(root, "bert", n_experts=3)
    return root, base, experts


def weights(folder) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def backbone(expert_folder) -> dict[str, torch.Tensor]:
    """The expert's backbone tensors under the base's key names (drop the ``bert.`` prefix and the head)."""
    return {k[len("bert."):]: v for k, v in weights(expert_folder).items() if k.startswith("bert.")}


@pytest.mark.parametrize("method", METHODS + ["ties-global"])
def test_merged_folder_loads_and_runs(bert, method):
    from transformers import AutoModel

    root, base, experts = bert
    name, params = (("ties", {"trim": "global"}) if method == "ties-global" else (method, {}))
    chosen = dict(list(experts.items())[:2]) if name == "slerp" else experts
    before = tree_hashes([base, *chosen.values()])
    output = root / f"merged-{method}"
    layermerge.merge(base, chosen, name, output=output, quiet=True, **params)
    assert tree_hashes([base, *chosen.values()]) == before
    model = AutoModel.from_pretrained(output).eval()
    with torch.no_grad():
        hidden = model(input_ids=torch.tensor([[5, 17, 42, 3, 8]])).last_hidden_state
    assert torch.isfinite(hidden).all()
    merged = weights(output)
    base_weights = weights(base)
    assert merged.keys() == base_weights.keys()
    assert any(not torch.equal(merged[k], base_weights[k]) for k in merged)
    task_model = layermerge.load_task_model(output, "task1")
    assert task_model.config.num_labels == 3


def test_slerp_without_a_base(bert):
    root, _, experts = bert
    # task1/task2 (3 and 4 labels) record their label count in config.json; transformers leaves the
    # default 2-label task0's out, and without a base that is what tells a head from a backbone tensor.
    a, b = experts["task1"], experts["task2"]
    merged = layermerge.merge(None, {"task1": a, "task2": b}, "slerp", quiet=True, t=0.0)
    first = weights(a)
    assert not any(key.startswith("classifier.") for key in merged.state_dict)  # heads stay per task
    for key, tensor in merged.state_dict.items():  # no base: keys are named as in the first expert
        torch.testing.assert_close(tensor, first[key])
    halfway = layermerge.merge(None, {"task1": a, "task2": b}, "slerp", quiet=True).state_dict
    second = weights(b)
    assert all(torch.isfinite(t).all() for t in halfway.values())
    key = "bert.encoder.layer.0.attention.self.query.weight"
    assert not torch.equal(halfway[key], first[key]) and not torch.equal(halfway[key], second[key])


def test_global_ties_through_merge_equals_naive_in_memory(bert):
    _, base, experts = bert
    density = 0.1
    merged = layermerge.merge(base, experts, "ties", quiet=True, density=density, trim="global").state_dict
    keys = layermerge.ExpertSet(base, experts).report.merge_keys  # the streaming order
    base_w = weights(base)
    expert_w = [backbone(folder) for folder in experts.values()]
    kept = []
    for expert in expert_w:
        flat = torch.cat([(expert[k].float() - base_w[k].float()).reshape(-1) for k in keys])
        count = int(density * flat.numel())
        order = torch.sort(flat.abs(), descending=True, stable=True).indices
        mask = torch.zeros(flat.numel(), dtype=torch.bool)
        mask[order[:count]] = True
        kept.append(torch.where(mask, flat, 0.0).double().numpy())
    flat_base = torch.cat([base_w[k].float().reshape(-1) for k in keys]).double().numpy()
    total = np.sum(kept, axis=0)
    sign = np.where(total >= 0, 1.0, -1.0)
    agree = [(np.sign(t) == sign) & (t != 0) for t in kept]
    numerator = np.sum([np.where(a, t, 0.0) for a, t in zip(agree, kept)], axis=0)
    counts = np.sum(agree, axis=0)
    expected = flat_base + np.where(counts > 0, numerator / np.maximum(counts, 1), 0.0)
    got = torch.cat([merged[k].reshape(-1) for k in keys]).double().numpy()
    np.testing.assert_allclose(got, expected, atol=1e-6, rtol=0)


def emr_by_hand(base_w, expert_w, keys):
    """θ0 + τ_uni, the masks and the whole-model rescalers, in numpy."""
    unified, masks = {}, {t: {} for t in range(len(expert_w))}
    numerators, denominators = np.zeros(len(expert_w)), np.zeros(len(expert_w))
    for k in keys:
        taus = np.stack([(e[k].float() - base_w[k].float()).double().numpy() for e in expert_w])
        sign = np.sign(taus.sum(0))
        magnitude = np.max(np.where(taus * sign > 0, np.abs(taus), 0.0), axis=0)
        unified[k] = sign * magnitude
        for t in range(len(expert_w)):
            masks[t][k] = taus[t] * unified[k] > 0
            numerators[t] += np.abs(taus[t]).sum()
            denominators[t] += np.abs(np.where(masks[t][k], unified[k], 0.0)).sum()
    return unified, masks, numerators / denominators


def test_emr_output_and_rebuilt_task_models(bert, tmp_path):
    _, base, experts = bert
    output = tmp_path / "emr"
    result = layermerge.merge(base, experts, "emr", output=output, quiet=True)
    base_w = weights(base)
    expert_w = [backbone(folder) for folder in experts.values()]
    keys = list(base_w)
    unified, masks, rescalers = emr_by_hand(base_w, expert_w, keys)
    assert list(result.summary["rescalers"].values()) == pytest.approx(list(rescalers), rel=1e-6)

    merged = weights(output)
    for k in keys:
        expected = base_w[k].double().numpy() + unified[k]
        np.testing.assert_allclose(merged[k].double().numpy(), expected, atol=1e-6)
    for index, task in enumerate(experts):
        stored = load_file(str(output / "task_extras" / task / "model.safetensors"))
        for k in keys:
            assert stored[k].dtype == torch.bool
            assert np.array_equal(stored[k].numpy(), masks[index][k])
        model_state = layermerge.load_task_model(output, task).state_dict()
        for k in keys:
            rebuilt = rescalers[index] * np.where(masks[index][k], unified[k], 0.0)
            expected = base_w[k].double().numpy() + rebuilt
            got = model_state["bert." + k].double().numpy()
            np.testing.assert_allclose(got, expected, atol=1e-5, err_msg=k)
        head = weights(experts[task])
        torch.testing.assert_close(model_state["classifier.weight"], head["classifier.weight"])


def test_emr_task_model_needs_the_base(bert, tmp_path):
    _, base, experts = bert
    output = tmp_path / "emr"
    layermerge.merge(base, experts, "emr", output=output, quiet=True)
    moved = tmp_path / "moved-base"
    shutil.copytree(base, moved)
    record = yaml.safe_load((output / "layermerge.yaml").read_text())
    record["base"] = str(tmp_path / "gone")
    (output / "layermerge.yaml").write_text(yaml.safe_dump(record))
    with pytest.raises(CheckpointError, match="base="):
        layermerge.load_task_model(output, "task0")
    rebuilt = layermerge.load_task_model(output, "task0", base=moved).state_dict()
    reference = layermerge.load_task_model(output, "task0", base=base).state_dict()
    for k, v in reference.items():
        assert torch.equal(rebuilt[k], v)
