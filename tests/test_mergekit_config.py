"""mergekit configs read by ``layermerge merge`` (layermerge.mergekit_config, docs/MERGEKIT.md "mergekit configs").

The same YAML file goes to mergekit 0.1.5 and to ``layermerge merge``; every merged tensor must agree to
the tolerance of tests/test_mergekit_parity.py. Fields layermerge ignores are listed in one warning line;
what it cannot compute the same way is refused with exit status 2 and one line naming the feature.
The refusal and conversion tests need no mergekit (and no model files: the config is refused first).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import yaml

from layermerge.cli import main
from layermerge.mergekit_config import CONVERTED_METHODS, convert, is_mergekit_config

try:  # as in test_mergekit_parity.py: any failure to import means "not available"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        from mergekit.config import MergeConfiguration
        from mergekit.merge import run_merge
        from mergekit.options import MergeOptions
    from test_mergekit_parity import _assert_same, _build, _load_folder
    MERGEKIT = None
except Exception as exc:
    MERGEKIT = f"mergekit is not importable ({type(exc).__name__}: {exc}); install mergekit==0.1.5"

@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """tiny Llama base + expert0..2 (full causal LMs, fp32) in one folder; the YAML files go beside them."""
    root = tmp_path_factory.mktemp("mergekit-config")
    base, _ = _build(root, "llama")
    return base.parent


# One YAML per converted method, with the models' paths relative to the YAML's folder (mergekit reads them
# relative to its working directory, which the test sets to that folder).
CASES = {
    "linear": """
merge_method: linear
models:
  - {model: expert0, parameters: {weight: 0.2}}
  - {model: expert1, parameters: {weight: 0.3}}
  - {model: expert2, parameters: {weight: 0.5}}
dtype: float32
""",
    "linear-base-added": """
merge_method: linear
base_model: base                    # not among the models: mergekit adds it, with the top-level weight
models:
  - {model: expert0, parameters: {weight: 2}}
  - {model: expert1}
parameters: {weight: 1}
""",
    "task_arithmetic": """
merge_method: task_arithmetic
base_model: base
models:
  - model: base                     # the usual mergekit layout: the base listed without parameters
  - {model: expert0, parameters: {weight: 1}}
  - {model: expert1, parameters: {weight: 1}}
  - {model: expert2, parameters: {weight: 1}}
parameters: {lambda: 0.3}
dtype: float32
""",
    "task_arithmetic-normalize": """
merge_method: task_arithmetic
base_model: base
models: [{model: expert0}, {model: expert1}, {model: expert2}]
parameters: {weight: 0.5, normalize: true, lambda: 0.9}
""",
    "ties": """
merge_method: ties
base_model: base
models:
  - model: base
  - {model: expert0, parameters: {weight: 1, density: 0.2}}
  - {model: expert1, parameters: {weight: 1, density: 0.2}}
  - {model: expert2, parameters: {weight: 1, density: 0.2}}
parameters: {int8_mask: true, lambda: 0.7}
dtype: float32
""",
    "dare_ties-density1": """
merge_method: dare_ties
base_model: base
models: [{model: expert0}, {model: expert1}, {model: expert2}]
parameters: {weight: 1, density: 1, normalize: true}
""",
    "dare_linear-density1": """
merge_method: dare_linear
base_model: base
models: [{model: expert0}, {model: expert1}, {model: expert2}]
parameters: {weight: 1, density: 1, lambda: 0.4}
""",
    "breadcrumbs": """
merge_method: breadcrumbs
base_model: base
models: [{model: expert0}, {model: expert1}, {model: expert2}]
parameters: {weight: 1, density: 0.5, gamma: 0.25, lambda: 0.3}
""",
    "breadcrumbs_ties": """
merge_method: breadcrumbs_ties
base_model: base
models: [{model: expert0}, {model: expert1}, {model: expert2}]
parameters: {weight: 1, density: 0.5, gamma: 0.25, normalize: true}
""",
    "slerp": """
merge_method: slerp
base_model: expert0
models: [{model: expert0}, {model: expert1}]
parameters: {t: 0.3}
dtype: float32
""",
    "nuslerp": """
merge_method: nuslerp
base_model: base
models:
  - {model: expert0, parameters: {weight: 1}}
  - {model: expert1, parameters: {weight: 3}}
parameters: {nuslerp_flatten: false}
""",
    "nuslerp-no-base": """
merge_method: nuslerp
models: [{model: expert0}, {model: expert2}]
parameters: {weight: 1}
""",
    "multislerp": """
merge_method: multislerp
base_model: base
models:
  - {model: expert0, parameters: {weight: 1}}
  - {model: expert1, parameters: {weight: 2}}
  - {model: expert2, parameters: {weight: 3}}
""",
    "karcher": """
merge_method: karcher
base_model: base                    # mergekit averages the base in as one more model
models: [{model: expert0}, {model: expert1}]
parameters: {max_iter: 5}
""",
    "model_stock": """
merge_method: model_stock
base_model: base
models: [{model: expert0}, {model: expert1}, {model: expert2}]
parameters: {filter_wise: true}
""",
    "sce": """
merge_method: sce
base_model: base
models: [{model: expert0}, {model: expert1}, {model: expert2}]
parameters: {select_topk: 0.5, int8_mask: true}
""",
}
# DELLA draws random masks (mergekit from torch's global generator, we from per-tensor ones): its configs
# are checked for their conversion only (test_della_configs_convert), never for equal tensors.
RANDOM_MASK_METHODS = {"della", "della_linear"}


def _run_mergekit(yml: Path, out: Path, monkeypatch) -> dict:
    monkeypatch.chdir(yml.parent)            # mergekit: relative paths are relative to the working directory
    config = MergeConfiguration.model_validate(yaml.safe_load(yml.read_text()))
    run_merge(config, str(out), options=MergeOptions(quiet=True, copy_tokenizer=False, write_model_card=False))
    return _load_folder(out)


@pytest.mark.mergekit
@pytest.mark.skipif(MERGEKIT is not None, reason=str(MERGEKIT))
@pytest.mark.parametrize("case", list(CASES))
def test_same_tensors_as_mergekit(case, llama, tmp_path, monkeypatch, capsys):
    yml = llama / f"{case}.yml"
    yml.write_text(CASES[case])
    theirs = _run_mergekit(yml, tmp_path / "mergekit", monkeypatch)
    monkeypatch.chdir(tmp_path)              # layermerge: relative to the config file, whatever the directory
    capsys.readouterr()
    assert main(["merge", str(yml), "-o", str(tmp_path / "ours"), "--quiet"]) == 0
    assert "warning" not in capsys.readouterr().err
    _assert_same(_load_folder(tmp_path / "ours"), theirs, llama / "base")
    record = yaml.safe_load((tmp_path / "ours" / "layermerge.yaml").read_text())
    assert record["method"] == convert(yaml.safe_load(CASES[case]))[0]["method"]


def test_every_converted_method_is_compared():
    compared = {yaml.safe_load(text)["merge_method"] for text in CASES.values()}
    assert compared | RANDOM_MASK_METHODS == set(CONVERTED_METHODS)


@pytest.mark.parametrize("text, expected", [
    ("merge_method: della\nbase_model: b\nmodels: [{model: x}, {model: y}]\n"
     "parameters: {weight: 1, density: 0.7, epsilon: 0.1, lambda: 1.1}\n",
     {"method": "della", "params": {"drop_rate": 0.3, "epsilon": 0.1, "rescale": "l1", "scaling": 1.1}}),
    ("merge_method: della_linear\nbase_model: b\nmodels: [{model: x}, {model: y}]\n"
     "parameters: {weight: 0.5, density: 0.4, rescale: false}\n",
     {"method": "della_linear", "params": {"drop_rate": 0.6, "epsilon": 0.15, "rescale": "none", "scaling": 0.5}}),
])
def test_della_configs_convert(text, expected):
    converted, ignored = convert(yaml.safe_load(text))
    assert {key: converted[key] for key in expected} == expected and not ignored


# --------------------------------------------------------------------------- the warning line
def test_ignored_fields_are_listed_in_one_warning_line(tmp_path, capsys):
    base, _ = _build_plain(tmp_path)
    yml = tmp_path / "merge.yml"
    yml.write_text(f"""
name: my-merge                      # not a mergekit key: mergekit ignores it too
merge_method: task_arithmetic
base_model: {base.name}
models:
  - {{model: expert0, parameters: {{weight: 1, lambda: 5}}}}   # lambda is top-level only in mergekit
  - {{model: expert1, parameters: {{weight: 1}}}}
parameters: {{lambda: 0.3, epsilon: 0.1}}
chat_template: chatml
dtype: bfloat16
""")
    assert main(["merge", str(yml), "-o", str(tmp_path / "out"), "--quiet"]) == 0
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("layermerge: warning:")]
    assert len(lines) == 1, lines
    for field in ("name", "models[0].parameters.lambda", "parameters.epsilon", "chat_template", "dtype: bfloat16"):
        assert field in lines[0], (field, lines[0])
    record = yaml.safe_load((tmp_path / "out" / "layermerge.yaml").read_text())
    assert record["params"] == {"scaling": 0.3} and record["dtype"] == "bfloat16"


def _build_plain(root: Path):
    """A tiny Llama base and two experts without mergekit (the warning test needs no mergekit)."""
    import torch
    import transformers
    from conftest import make_config, perturb_

    torch.manual_seed(0)
    base = transformers.AutoModelForCausalLM.from_config(make_config("llama"))
    base.save_pretrained(root / "base")
    for index in range(2):
        perturb_(base, seed=index).save_pretrained(root / f"expert{index}")
    return root / "base", [root / "expert0", root / "expert1"]


# --------------------------------------------------------------------------- refusals
REFUSALS = {
    "slices": ("merge_method: linear\nslices:\n  - sources: [{model: a, layer_range: [0, 2]}]\n", "slices"),
    "modules": ("merge_method: linear\nmodules: {decoder: {models: [{model: a}]}}\n", "modules"),
    "gradient": ("merge_method: task_arithmetic\nbase_model: b\nmodels:\n"
                 "  - {model: a, parameters: {weight: [0, 0.5, 1]}}\n", "per-layer gradient"),
    "filter": ("merge_method: slerp\nbase_model: a\nmodels: [{model: a}, {model: b}]\n"
               "parameters:\n  t: [{filter: self_attn, value: 0.3}, {value: 0.5}]\n", "filter ('self_attn')"),
    "method": ("merge_method: nearswap\nbase_model: b\nmodels: [{model: a}]\n",
               "'nearswap' has no layermerge counterpart"),
    "della-density-one": ("merge_method: della\nbase_model: b\nmodels: [{model: a}]\nparameters: {weight: 1}\n",
                          "density 1 drops nothing"),
    "della-window": ("merge_method: della\nbase_model: b\nmodels: [{model: a}]\n"
                     "parameters: {weight: 1, density: 0.9, epsilon: 0.15}\n", "leaves (0, 1)"),
    "nuslerp-three": ("merge_method: nuslerp\nmodels: [{model: a}, {model: b}, {model: c}]\nparameters: {weight: 1}\n",
                      "exactly two models"),
    "model-stock-no-base": ("merge_method: model_stock\nmodels: [{model: a}, {model: b}]\n", "needs base_model"),
    "karcher-max-iter": ("merge_method: karcher\nmodels: [{model: a}, {model: b}]\nparameters: {max_iter: 2.5}\n",
                         "expected a whole number"),
    "tokenizer-source-elsewhere": ("merge_method: task_arithmetic\nbase_model: b\nmodels: [{model: a}]\n"
                                   "parameters: {weight: 1}\ntokenizer_source: c\n", "tokenizer_source 'c'"),
    "tokenizer-tokens": ("merge_method: task_arithmetic\nbase_model: b\nmodels: [{model: a}]\nparameters: {weight: 1}\n"
                         "tokenizer: {source: union, tokens: {'<x>': {source: a}}}\n", "tokenizer.tokens"),
    "unequal-weights": ("merge_method: ties\nbase_model: b\nmodels:\n  - {model: a, parameters: {weight: 1}}\n"
                        "  - {model: c, parameters: {weight: 0.5}}\n", "per-model weight values differ"),
    "unequal-densities": ("merge_method: ties\nbase_model: b\nparameters: {weight: 1}\nmodels:\n"
                          "  - {model: a, parameters: {density: 0.2}}\n  - {model: c, parameters: {density: 0.3}}\n",
                          "per-model density values differ"),
    "disjoint-sum": ("merge_method: dare_ties\nbase_model: b\nmodels: [{model: a}, {model: c}]\n"
                     "parameters: {weight: 1, density: 0.5}\n", "normalize: false (the default of dare_ties)"),
    "dare-no-rescale": ("merge_method: dare_linear\nbase_model: b\nmodels: [{model: a}]\n"
                        "parameters: {weight: 1, density: 0.5, rescale: false}\n", "rescale: false"),
    "ties-rescale": ("merge_method: ties\nbase_model: b\nmodels: [{model: a}]\n"
                     "parameters: {weight: 1, density: 0.5, rescale: true}\n", "rescale: true"),
    "linear-unnormalised": ("merge_method: linear\nmodels:\n  - {model: a, parameters: {weight: 1}}\n"
                            "  - {model: c, parameters: {weight: 1}}\nparameters: {normalize: false}\n",
                            "normalize: false with weights summing to 2"),
    "missing-weight": ("merge_method: task_arithmetic\nbase_model: b\nmodels: [{model: a}]\n", "no weight"),
    "slerp-three": ("merge_method: slerp\nbase_model: a\nmodels: [{model: a}, {model: b}, {model: c}]\n"
                    "parameters: {t: 0.5}\n", "exactly two models"),
    "lora-elsewhere": ("merge_method: task_arithmetic\nbase_model: b\nmodels: [{model: a+adapter}]\n"
                       "parameters: {weight: 1}\n", "LoRA adapter to a"),
    "dtype-float64": ("merge_method: linear\nmodels: [{model: a, parameters: {weight: 1}}]\ndtype: float64\n",
                      "dtype float64"),
    "mixed-formats": ("merge_method: ties\nexperts: {a: a}\nmodels: [{model: a}]\n", "mixes layermerge keys"),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_refused_with_one_line(case, tmp_path, capsys):
    text, named = REFUSALS[case]
    yml = tmp_path / "merge.yml"
    yml.write_text(text)
    assert main(["merge", str(yml), "-o", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("layermerge: error:") and "mergekit config" in err[0], err
    assert named in err[0], err[0]
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- the conversion itself
def _converted(text: str) -> dict:
    return convert(yaml.safe_load(text), "merge.yml")[0]


BREADCRUMBS = "merge_method: breadcrumbs\nbase_model: b\nmodels: [{model: a}]\n"


@pytest.mark.parametrize("text, method, params", [
    ("merge_method: dare_linear\nbase_model: b\nmodels: [{model: a}, {model: c}]\n"
     "parameters: {weight: 0.5, density: 0.7, lambda: 2}", "dare_linear", {"drop_rate": 1 - 0.7, "scaling": 1.0}),
    ("merge_method: dare_ties\nbase_model: b\nmodels: [{model: a}]\n"
     "parameters: {weight: 2, density: 0.3, normalize: true}", "dare_ties", {"drop_rate": 0.7, "scaling": 1.0}),
    ("merge_method: ties\nbase_model: b\nmodels: [{model: a}]\nparameters: {weight: 1}",   # mergekit's density 1
     "ties", {"density": 1.0, "trim": "tensor", "scaling": 1.0}),
    (f"{BREADCRUMBS}parameters: {{weight: 1, density: 0.9, gamma: 0.05}}",
     "breadcrumbs", {"top_drop": 0.05, "bottom_drop": 0.05, "scaling": 1.0}),
    (f"{BREADCRUMBS}parameters: {{weight: 1, density: 0.95, gamma: 0.1}}",
     "breadcrumbs", {"top_drop": 0.05, "bottom_drop": 0.0, "scaling": 1.0}),
    (f"{BREADCRUMBS}parameters: {{weight: 1}}",   # mergekit's default density 1: no mask at all
     "breadcrumbs", {"top_drop": 0.0, "bottom_drop": 0.0, "scaling": 1.0}),
    ("merge_method: task_arithmetic\nbase_model: b\nmodels: [{model: a}, {model: c}]\n"
     "parameters: {weight: [0.7, 0.7], lambda: 1}", "task_arithmetic", {"scaling": 0.7}),
    ("merge_method: linear\nmodels: [{model: a, parameters: {weight: 1}}, {model: c, parameters: {weight: 3}}]",
     "average", {"weights": [1.0, 3.0]}),
])
def test_equivalences(text, method, params):
    converted = _converted(text)
    assert converted["method"] == method
    assert sorted(converted["params"]) == sorted(params)
    for key, value in params.items():
        assert converted["params"][key] == (pytest.approx(value) if not isinstance(value, str) else value), key


def test_models_names_tokenizer_and_passed_through_keys():
    converted = _converted("""
merge_method: task_arithmetic
base_model: org/base@main
models:
  - {model: {model: {path: org/base, revision: main}}}       # the base, in mapping form
  - {model: runs/sst2/}
  - {model: other/sst2}
  - {model: org/base@main+adapters/qnli}                     # a LoRA on the base: layermerge's LoRA expert
parameters: {weight: 1}
tokenizer_source: other/sst2
out_dtype: bfloat16
dtype: float32
output: merged
max_shard_size: 2GB
""")
    assert converted["base"] == "org/base@main"
    assert converted["experts"] == {"sst2": "runs/sst2/", "sst2-2": "other/sst2", "qnli": "adapters/qnli"}
    assert converted["tokenizer_source"] == "sst2-2"
    assert converted["dtype"] == "bfloat16" and converted["output"] == "merged" and converted["max_shard_size"] == "2GB"
    assert _converted("merge_method: ties\nbase_model: b\nmodels: [{model: a}]\nparameters: {weight: 1}\n"
                      "tokenizer_source: union")["tokenizer_source"] == "union"
    assert _converted("merge_method: ties\nbase_model: b\nmodels: [{model: a}]\nparameters: {weight: 1}\n"
                      "tokenizer: {source: base}")["tokenizer_source"] == "base"


def test_detection():
    assert is_mergekit_config({"merge_method": "ties", "models": []})
    assert is_mergekit_config({"models": [{"model": "a"}]})
    assert not is_mergekit_config({"base": "b", "experts": {"a": "a"}, "method": "ties"})
    assert not is_mergekit_config({"experts": {"a": "a"}, "models": []})   # ours, with a stray key: our error
    assert not is_mergekit_config(["merge_method"])
