"""Agreement with mergekit 0.1.5: the same inputs give the same merged tensors.

Task Arithmetic and TIES below; Model Stock, Karcher, NuSLERP, Multi-SLERP, SCE and DELLA's drop
probabilities further down (``GEOMETRIC_CASES``).

mergekit is an independent implementation of Task Arithmetic and TIES, so agreement to 1e-6 on
every tensor checks our arithmetic, our parameter conventions and our handling of every key
(embeddings, norms, output heads). The parameter correspondence exercised here is the one
documented in docs/MERGEKIT.md:

* ``task_arithmetic(scaling=λ)``  ==  mergekit ``task_arithmetic`` with ``weight: 1`` per model and
  ``lambda: λ`` (or, equivalently, ``weight: λ`` and ``lambda: 1``);
* ``ties(density=d, scaling=λ, trim="tensor")``  ==  mergekit ``ties`` with ``weight: 1`` and
  ``density: d`` per model, ``lambda: λ``, ``normalize: true`` (its default); ``int8_mask`` only
  changes the dtype of mergekit's sign mask, never the result.

mergekit compares whole architectures, so both tools get the same full task models (a causal LM
or a sequence classifier with one label count for every expert); our usual layout (a bare base
and experts with differently sized heads) is not expressible in mergekit.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from conftest import make_config, perturb_
from safetensors.torch import load_file

try:  # mergekit pulls in transformers internals; any failure to import means "not available"
    with warnings.catch_warnings():  # its lazy unpickler touches the deprecated numpy.core on import
        warnings.simplefilter("ignore", DeprecationWarning)
        from mergekit.config import MergeConfiguration
        from mergekit.merge import run_merge
        from mergekit.options import MergeOptions
except Exception as exc:
    pytest.skip(f"mergekit is not importable ({type(exc).__name__}: {exc}); install mergekit==0.1.5 "
                "(make install does) to run the parity tests", allow_module_level=True)

import layermerge

pytestmark = pytest.mark.mergekit

TOLERANCE = 1e-6
N_EXPERTS = 3

# family -> (transformers auto class, config overrides); one mergekit-supported architecture each.
FAMILIES = {
    "llama": ("AutoModelForCausalLM", {}),                            # LlamaForCausalLM, untied lm_head
    "gpt2": ("AutoModelForCausalLM", {}),                             # GPT2LMHeadModel, lm_head tied to wte
    "bert": ("AutoModelForSequenceClassification", {"num_labels": 2}),  # BertForSequenceClassification
}


def _build(root: Path, family: str, shared: float = 0.0) -> tuple[Path, dict[str, Path]]:
    """A tiny base and N_EXPERTS experts of one full task-model class, saved as safetensors (fp32).

    ``shared``: the scale of one perturbation common to every expert, so task vectors correlate
    (independent noise alone makes them nearly orthogonal, where Model Stock returns the base)."""
    import transformers

    auto_class, overrides = FAMILIES[family]
    model_class = getattr(transformers, auto_class)
    torch.manual_seed(0)
    base = model_class.from_config(make_config(family, **overrides))
    base_dir = root / family / "base"
    base.save_pretrained(base_dir)
    experts = {}
    for index in range(N_EXPERTS):
        expert = model_class.from_config(make_config(family, **overrides))
        expert.load_state_dict(base.state_dict())
        perturb_(expert, seed=index)
        if shared:
            perturb_(expert, seed=1000, scale=shared)
        experts[f"task{index}"] = root / family / f"expert{index}"
        expert.save_pretrained(experts[f"task{index}"])
    return base_dir, experts


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("mergekit-parity")
    checkpoints = {family: _build(root, family) for family in FAMILIES}
    checkpoints["llama-correlated"] = _build(root / "correlated", "llama", shared=0.02)
    return checkpoints


def _load_folder(folder: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for path in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(path))
    assert tensors, f"no safetensors weights in {folder}"
    return tensors


def _run_mergekit(out: Path, method: str, base: Path | None, experts: dict[str, Path], global_params: dict,
                  model_params: dict | list[dict]) -> dict[str, torch.Tensor]:
    """mergekit's merge; ``model_params`` is one dict for every model or one per model; no base when None."""
    per_model = model_params if isinstance(model_params, list) else [model_params] * len(experts)
    config = MergeConfiguration.model_validate({
        "merge_method": method,
        **({"base_model": str(base)} if base is not None else {}),
        "dtype": "float32",
        "parameters": global_params,
        "models": [{"model": str(path), "parameters": params} for path, params in zip(experts.values(), per_model)],
    })
    run_merge(config, str(out), options=MergeOptions(quiet=True, copy_tokenizer=False, write_model_card=False))
    return _load_folder(out)


def _run_ours(out: Path, method: str, base: Path, experts: dict[str, Path], params: dict) -> dict[str, torch.Tensor]:
    layermerge.merge(base, experts, method=method, output=out, quiet=True, **params)
    return _load_folder(out)


def _assert_same(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor], base: Path,
                 tolerance: float = TOLERANCE) -> None:
    assert sorted(ours) == sorted(theirs), (
        f"different tensors: only ours {sorted(set(ours) - set(theirs))}, only mergekit's "
        f"{sorted(set(theirs) - set(ours))}")
    worst_key, worst = None, 0.0
    for key, tensor in ours.items():
        assert tensor.dtype == theirs[key].dtype == torch.float32, key
        assert tensor.shape == theirs[key].shape, key
        diff = (tensor - theirs[key]).abs().max().item() if tensor.numel() else 0.0
        if diff >= worst:
            worst_key, worst = key, diff
    assert worst <= tolerance, f"largest difference {worst:.3g} in {worst_key!r}"
    # The comparison must not be vacuous: the merge moved every tensor away from the base.
    original = _load_folder(base)
    for key, tensor in ours.items():
        assert (tensor - original[key]).abs().max() > 1e-4, f"{key!r} was not merged"


CASES = [
    # (id, family, our method+params, mergekit method, mergekit global params, per-model params)
    ("ta-llama", "llama", ("task_arithmetic", {"scaling": 0.3}),
     ("task_arithmetic", {"lambda": 0.3}, {"weight": 1.0})),
    ("ta-gpt2", "gpt2", ("task_arithmetic", {"scaling": 0.3}),
     ("task_arithmetic", {"lambda": 0.3}, {"weight": 1.0})),
    ("ta-bert", "bert", ("task_arithmetic", {"scaling": 0.3}),
     ("task_arithmetic", {"lambda": 0.3}, {"weight": 1.0})),
    ("ta-llama-weight-as-scaling", "llama", ("task_arithmetic", {"scaling": 0.7}),
     ("task_arithmetic", {}, {"weight": 0.7})),
    ("ties-llama", "llama", ("ties", {"density": 0.2, "scaling": 1.0, "trim": "tensor"}),
     ("ties", {"lambda": 1.0, "normalize": True}, {"weight": 1.0, "density": 0.2})),
    ("ties-gpt2", "gpt2", ("ties", {"density": 0.2, "scaling": 1.0, "trim": "tensor"}),
     ("ties", {"lambda": 1.0, "normalize": True}, {"weight": 1.0, "density": 0.2})),
    ("ties-bert", "bert", ("ties", {"density": 0.2, "scaling": 1.0, "trim": "tensor"}),
     ("ties", {"lambda": 1.0, "normalize": True}, {"weight": 1.0, "density": 0.2})),
    ("ties-llama-d05-l07-int8mask", "llama", ("ties", {"density": 0.5, "scaling": 0.7, "trim": "tensor"}),
     ("ties", {"lambda": 0.7, "int8_mask": True}, {"weight": 1.0, "density": 0.5})),
]


@pytest.mark.parametrize("family, ours_spec, theirs_spec", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_matches_mergekit(checkpoints, tmp_path, family, ours_spec, theirs_spec):
    base, experts = checkpoints[family]
    method, params = ours_spec
    mk_method, mk_global, mk_model = theirs_spec
    theirs = _run_mergekit(tmp_path / "mergekit", mk_method, base, experts, mk_global, mk_model)
    ours = _run_ours(tmp_path / "ours", method, base, experts, params)
    _assert_same(ours, theirs, base)


def test_ties_density_one_is_plain_sign_consensus(checkpoints, tmp_path):
    """density=1 skips trimming in both tools; what remains is the sign election and disjoint mean."""
    base, experts = checkpoints["llama"]
    theirs = _run_mergekit(tmp_path / "mergekit", "ties", base, experts, {"lambda": 1.0},
                           {"weight": 1.0, "density": 1.0})
    ours = _run_ours(tmp_path / "ours", "ties", base, experts, {"density": 1.0, "scaling": 1.0})
    _assert_same(ours, theirs, base)


# --------------------------------------------------------------------------- mergekit's other methods
# (id, family, our method+params, mergekit method, global params, per-model params, base used, tolerance)
GEOMETRIC_CASES = [
    ("model-stock", "llama-correlated", ("model_stock", {}), ("model_stock", {}, {}), True, TOLERANCE),
    ("model-stock-filter-wise", "llama-correlated", ("model_stock", {"filter_wise": True}),
     ("model_stock", {"filter_wise": True}, {}), True, TOLERANCE),
    # Karcher's angles are float64 scalars here, float32 tensors in mergekit: 1.2e-7 apart at most.
    ("karcher", "llama", ("karcher", {}), ("karcher", {}, {}), False, TOLERANCE),
    ("karcher-bert", "bert", ("karcher", {"max_iter": 3}), ("karcher", {"max_iter": 3}, {}), False, TOLERANCE),
    ("nuslerp", "llama", ("nuslerp", {}), ("nuslerp", {}, {"weight": 1.0}), True, TOLERANCE),
    ("nuslerp-weighted-rows", "gpt2", ("nuslerp", {"weights": [1.0, 3.0], "flatten": False}),
     ("nuslerp", {"nuslerp_flatten": False}, [{"weight": 1.0}, {"weight": 3.0}]), True, TOLERANCE),
    ("nuslerp-row-wise", "llama", ("nuslerp", {"flatten": False, "row_wise": True}),
     ("nuslerp", {"nuslerp_flatten": False, "nuslerp_row_wise": True}, {"weight": 1.0}), True, TOLERANCE),
    ("nuslerp-no-base", "llama", ("nuslerp", {"weights": [2.0, 1.0]}),
     ("nuslerp", {}, [{"weight": 2.0}, {"weight": 1.0}]), False, TOLERANCE),
    ("multislerp", "llama", ("multislerp", {"weights": [1.0, 2.0, 3.0]}),
     ("multislerp", {}, [{"weight": 1.0}, {"weight": 2.0}, {"weight": 3.0}]), True, TOLERANCE),
    ("multislerp-no-base", "bert", ("multislerp", {}), ("multislerp", {}, {"weight": 1.0}), False, TOLERANCE),
    ("sce", "llama", ("sce", {}), ("sce", {}, {}), True, TOLERANCE),
    ("sce-top-half", "gpt2", ("sce", {"select_topk": 0.5}), ("sce", {"select_topk": 0.5}, {}), True, TOLERANCE),
]


@pytest.mark.parametrize("family, ours_spec, theirs_spec, with_base, tolerance", [c[1:] for c in GEOMETRIC_CASES],
                         ids=[c[0] for c in GEOMETRIC_CASES])
def test_other_methods_match_mergekit(checkpoints, tmp_path, family, ours_spec, theirs_spec, with_base, tolerance):
    base, experts = checkpoints[family]
    method, params = ours_spec
    mk_method, mk_global, mk_model = theirs_spec
    if method == "nuslerp":
        experts = dict(list(experts.items())[:2])
    theirs = _run_mergekit(tmp_path / "mergekit", mk_method, base if with_base else None, experts, mk_global,
                           mk_model)
    if with_base:
        ours = _run_ours(tmp_path / "ours", method, base, experts, params)
    else:   # without a base the keys are the first expert's, as in mergekit
        ours = _run_ours(tmp_path / "ours", method, None, experts, params)
    _assert_same(ours, theirs, base, tolerance)


def test_della_drop_probabilities_match_mergekit_magprune(monkeypatch):
    """mergekit's MAGPRUNE with its random draw replaced by the probabilities themselves returns
    τ · P(keep) entry by entry: the same keep probabilities as ours, row by row."""
    import mergekit.sparsify

    from layermerge.methods.della import magprune_drop_probability

    class ExpectedMask:
        def __getattr__(self, name):
            return getattr(torch, name)

        @staticmethod
        def bernoulli(probabilities, *args, **kwargs):
            return probabilities

    monkeypatch.setattr(mergekit.sparsify, "torch", ExpectedMask())
    generator = torch.Generator().manual_seed(0)
    for shape in [(7, 33), (50,), (1, 9)]:   # (3-D and up: mergekit ranks along axis 1, we along the flattened row)
        tau = torch.randn(shape, generator=generator)
        theirs = mergekit.sparsify.della_magprune(tau, density=0.6, epsilon=0.15)
        ours = tau * (1 - magprune_drop_probability(tau, 0.4, 0.15))
        torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=1e-6)


# --------------------------------------------------------------------------- bf16 inputs
@pytest.fixture(scope="module")
def bf16_llama(tmp_path_factory):
    """The llama checkpoints saved in bf16, where task vectors are quantised and magnitudes often tie."""
    import transformers

    root = tmp_path_factory.mktemp("mergekit-parity-bf16")
    torch.manual_seed(0)
    base = transformers.AutoModelForCausalLM.from_config(make_config("llama"))
    experts = {}
    for index in range(N_EXPERTS):
        expert = transformers.AutoModelForCausalLM.from_config(make_config("llama"))
        expert.load_state_dict(base.state_dict())
        perturb_(expert, seed=index)
        experts[f"task{index}"] = root / f"expert{index}"
        expert.to(torch.bfloat16).save_pretrained(experts[f"task{index}"])
    base.to(torch.bfloat16).save_pretrained(root / "base")
    return root / "base", experts


class _StableArgsortTorch:
    """``torch`` as seen by mergekit.sparsify, except that argsort is stable (equal values: lower index first)."""

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def argsort(values, *args, **kwargs):
        return torch.argsort(values, *args, stable=True, **kwargs)


def _mergekit_bf16(out: Path, method: str, base: Path, experts: dict[str, Path], global_params: dict,
                   model_params: dict) -> dict[str, torch.Tensor]:
    config = MergeConfiguration.model_validate({
        "merge_method": method, "base_model": str(base),
        "dtype": "float32", "out_dtype": "bfloat16",  # compute in fp32 like us, save bf16
        "parameters": global_params,
        "models": [{"model": str(path), "parameters": model_params} for path in experts.values()],
    })
    run_merge(config, str(out), options=MergeOptions(quiet=True, copy_tokenizer=False, write_model_card=False))
    return _load_folder(out)


def _assert_identical(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor]) -> None:
    assert sorted(ours) == sorted(theirs)
    for key in ours:
        assert ours[key].dtype == theirs[key].dtype == torch.bfloat16, key
        differing = int((ours[key] != theirs[key]).sum())
        assert differing == 0, f"{key!r}: {differing} of {ours[key].numel()} elements differ"


def test_bf16_task_arithmetic_is_bitwise_identical(bf16_llama, tmp_path):
    """Our dtype="bfloat16" is mergekit's dtype: float32 (compute) + out_dtype: bfloat16."""
    base, experts = bf16_llama
    theirs = _mergekit_bf16(tmp_path / "mergekit", "task_arithmetic", base, experts, {"lambda": 0.3}, {"weight": 1.0})
    ours = _run_ours(tmp_path / "ours", "task_arithmetic", base, experts, {"scaling": 0.3, "dtype": "bfloat16"})
    _assert_identical(ours, theirs)


def test_bf16_ties_differs_only_in_tie_order_at_the_threshold(bf16_llama, tmp_path, monkeypatch):
    """With bf16 inputs, several entries often share the k-th largest |τ|. We keep the lowest flat
    indices among them; mergekit keeps whichever its unstable argsort puts first. Making mergekit's
    argsort stable (and nothing else) must make the two merges bitwise identical."""
    import mergekit.sparsify

    base, experts = bf16_llama
    monkeypatch.setattr(mergekit.sparsify, "torch", _StableArgsortTorch())
    theirs = _mergekit_bf16(tmp_path / "mergekit", "ties", base, experts, {"lambda": 1.0},
                            {"weight": 1.0, "density": 0.2})
    ours = _run_ours(tmp_path / "ours", "ties", base, experts, {"density": 0.2, "scaling": 1.0, "dtype": "bfloat16"})
    _assert_identical(ours, theirs)
