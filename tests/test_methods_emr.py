"""EMR-Merging: unified vector, masks and whole-model rescalers by hand; rebuilt task weights."""

from __future__ import annotations

import pytest
import torch

from layermerge.methods.registry import get_method, validate_params

TENSORS = {
    # per key: base, [τ1, τ2, τ3]
    "a": (torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0]),
          [torch.tensor([1.0, -2.0, 3.0, 0.0, 1.0]), torch.tensor([2.0, 1.0, -1.0, 0.0, -1.0]),
           torch.tensor([-1.0, -1.0, 2.0, 0.0, 0.0])]),
    "b": (torch.tensor([[0.5]]), [torch.tensor([[0.5]]), torch.tensor([[-1.0]]), torch.tensor([[-0.5]])]),
}
# a: Σ = [2, -2, 4, 0, 0] → signs [+, -, +, none, none]; largest agreeing |τ|: [2, 2, 3, -, -]
#    τ_uni = [2, -2, 3, 0, 0]; M1 = [1,1,1,0,0], M2 = [1,0,0,0,0], M3 = [0,1,1,0,0]
# b: Σ = -1 → sign -, largest agreeing |τ| = 1 → τ_uni = -1; M1 = 0, M2 = 1, M3 = 1
UNIFIED = {"a": torch.tensor([2.0, -2.0, 3.0, 0.0, 0.0]), "b": torch.tensor([[-1.0]])}
MASKS = {"a": [[1, 1, 1, 0, 0], [1, 0, 0, 0, 0], [0, 1, 1, 0, 0]], "b": [[[0]], [[1]], [[1]]]}
# λ_t = Σ|τ_t| / Σ|M_t ⊙ τ_uni| over both tensors:
#   t1: (7 + 0.5) / (7 + 0) ; t2: (5 + 1) / (2 + 1) ; t3: (4 + 0.5) / (5 + 1)
RESCALERS = {"t1": 7.5 / 7, "t2": 6 / 3, "t3": 4.5 / 6}


def run_emr():
    info = get_method("emr")
    method = info.cls(validate_params(info, {}), ["t1", "t2", "t3"])
    for key, (base, taus) in TENSORS.items():
        method.observe(0, key, base, [base + t for t in taus])
    method.end_pass(0)
    results = {key: method.merge_tensor(key, base, [base + t for t in taus])
               for key, (base, taus) in TENSORS.items()}
    return method, results


def test_unified_vector_masks_and_rescalers_by_hand():
    method, results = run_emr()
    for key, (base, _) in TENSORS.items():
        torch.testing.assert_close(results[key].merged, base + UNIFIED[key])
        for index, task in enumerate(["t1", "t2", "t3"]):
            mask = results[key].per_task[task]
            assert mask.dtype == torch.bool
            assert torch.equal(mask, torch.tensor(MASKS[key][index], dtype=torch.bool))
    assert method.summary()["rescalers"] == pytest.approx(RESCALERS)


def test_rebuilt_task_weights_by_hand():
    from layermerge.methods.emr import rebuild_task_weight

    _, results = run_emr()
    base, _ = TENSORS["a"]
    t1 = rebuild_task_weight(base, results["a"].merged, results["a"].per_task["t1"], RESCALERS["t1"])
    torch.testing.assert_close(t1, base + 7.5 / 7 * torch.tensor([2.0, -2.0, 3.0, 0.0, 0.0]))
    t2 = rebuild_task_weight(base, results["a"].merged, results["a"].per_task["t2"], RESCALERS["t2"])
    torch.testing.assert_close(t2, base + 2.0 * torch.tensor([2.0, 0.0, 0.0, 0.0, 0.0]))


def test_all_zero_task_vectors():
    info = get_method("emr")
    method = info.cls(validate_params(info, {}), ["t1", "t2"])
    base = torch.randn(4)
    method.observe(0, "w", base, [base.clone(), base.clone()])
    method.end_pass(0)
    result = method.merge_tensor("w", base, [base.clone(), base.clone()])
    assert torch.equal(result.merged, base)
    assert not any(bool(m.any()) for m in result.per_task.values())
    assert method.summary()["rescalers"] == {"t1": 0.0, "t2": 0.0}
