"""LoRA / PEFT adapters as experts: every tensor equals peft's own merge_and_unload, formed one key at a
time, through any method (TIES, ProDistill, the CLI) as the dense experts; what cannot be read exactly
is refused with one line."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import yaml
from conftest import make_config, perturb_
from safetensors.torch import load_file, save_file

import layermerge
from layermerge.cli import main
from layermerge.errors import CheckpointError
from layermerge.experts import ExpertSet
from layermerge.io.inputs import open_input
from layermerge.io.lora import LoraReader, is_lora_adapter
from layermerge.io.reader import CheckpointReader

pytestmark = pytest.mark.usefixtures("one_torch_thread")
ATOL = 1e-6


def quiet_transformers():
    import transformers

    transformers.logging.set_verbosity_error()


def lora_adapter(model, folder, seed: int, safe: bool = True, **options):
    """Wrap a copy of ``model`` with a LoRA adapter (``options``: LoraConfig's), give every LoRA tensor
    (and every module to save) seeded non-zero values, save the adapter to ``folder``; return peft's
    merged state dict."""
    from peft import LoraConfig, get_peft_model

    quiet_transformers()
    peft_model = get_peft_model(copy.deepcopy(model), LoraConfig(**options))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name or "modules_to_save" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    peft_model.save_pretrained(folder, safe_serialization=safe)
    return {k: v.clone() for k, v in peft_model.merge_and_unload().state_dict().items()}


def assert_matches_peft(reader, dense: dict, prefix: str = ""):
    """Every tensor the reader exposes equals peft's merged model's (``prefix``: what the reader's key
    lacks that peft's has)."""
    for key in reader.keys():
        expected = dense[prefix + key]
        got = reader.get(key)
        assert got.shape == expected.shape == reader.shape(key), key
        assert got.dtype == reader.dtype(key), key
        assert torch.allclose(got.float(), expected.float(), atol=ATOL, rtol=0), key


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """A tiny LlamaForCausalLM saved as its class (keys model.layers...) and as the bare model (layers...)."""
    from transformers import AutoModelForCausalLM

    quiet_transformers()
    root = tmp_path_factory.mktemp("lora_llama")
    torch.manual_seed(0)
    model = perturb_(AutoModelForCausalLM.from_config(make_config("llama")), seed=5)
    model.save_pretrained(root / "base")
    model.model.save_pretrained(root / "bare")
    return model, root


@pytest.fixture(scope="module")
def two_adapters(llama):
    """Two LoRA experts of the llama base, and the same experts saved as dense folders."""
    model, root = llama
    adapters, dense = {}, {}
    for index, name in enumerate(("a", "b")):
        state = lora_adapter(model, root / f"lora_{name}", seed=10 + index, r=4, lora_alpha=8,
                             target_modules=["q_proj", "v_proj", "down_proj"])
        merged = copy.deepcopy(model)
        merged.load_state_dict(state)
        merged.save_pretrained(root / f"dense_{name}")
        adapters[name], dense[name] = root / f"lora_{name}", root / f"dense_{name}"
    return adapters, dense


# --------------------------------------------------------------------------- every tensor as peft merges it
@pytest.mark.parametrize("base_kind", ["base", "bare"])
@pytest.mark.parametrize("safe", [True, False], ids=["safetensors", "bin"])
def test_plain_lora_equals_peft_merge(llama, tmp_path, base_kind, safe):
    model, root = llama
    dense = lora_adapter(model, tmp_path / "adapter", seed=1, safe=safe, r=4, lora_alpha=16,
                         target_modules=["q_proj", "v_proj"])
    assert (tmp_path / "adapter" / ("adapter_model.safetensors" if safe else "adapter_model.bin")).is_file()
    base = CheckpointReader(root / base_kind)
    assert is_lora_adapter(tmp_path / "adapter") and not is_lora_adapter(root / base_kind)
    reader = open_input(tmp_path / "adapter", "expert 'a'", base=base)
    assert isinstance(reader, LoraReader)
    assert reader.keys() == base.keys()                                  # the base's names, shapes, dtypes
    assert_matches_peft(reader, dense, prefix="" if base_kind == "base" else "model.")
    q_key = [k for k in reader.keys() if "layers.0.self_attn.q_proj" in k][0]
    assert not torch.equal(reader.get(q_key), base.get(q_key))           # the update is really there
    assert reader.config == base.config and reader.folder == (tmp_path / "adapter").resolve()
    assert set(reader.file_hashes()) == {str(p) for p in reader.weight_files}
    assert all(p.parent == reader.folder for p in reader.weight_files)


def test_rslora_equals_peft_merge(llama, tmp_path):
    model, root = llama
    dense = lora_adapter(model, tmp_path / "adapter", seed=2, r=4, lora_alpha=8, use_rslora=True,
                         target_modules=["q_proj", "k_proj", "o_proj"])
    assert_matches_peft(open_input(tmp_path / "adapter", base=CheckpointReader(root / "base")), dense)


def test_rank_and_alpha_patterns_equal_peft_merge(llama, tmp_path):
    model, root = llama
    dense = lora_adapter(model, tmp_path / "adapter", seed=3, r=4, lora_alpha=8,
                         target_modules=["q_proj", "v_proj", "gate_proj"],
                         rank_pattern={"layers.1.self_attn.q_proj": 2, "gate_proj": 6},
                         alpha_pattern={"v_proj": 3, "layers.0.mlp.gate_proj": 32})
    saved = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    assert saved["base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight"].shape[0] == 2
    assert_matches_peft(open_input(tmp_path / "adapter", base=CheckpointReader(root / "base")), dense)


def test_embedding_lora_equals_peft_merge(llama, tmp_path):
    model, root = llama
    dense = lora_adapter(model, tmp_path / "adapter", seed=4, r=4, lora_alpha=8,
                         target_modules=["embed_tokens", "q_proj", "lm_head"])
    saved = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    assert "base_model.model.model.embed_tokens.lora_embedding_A" in saved    # PEFT's embedding LoRA
    assert_matches_peft(open_input(tmp_path / "adapter", base=CheckpointReader(root / "base")), dense)
    with pytest.raises(CheckpointError, match="target module 'lm_head' matches no tensor"):
        open_input(tmp_path / "adapter", base=CheckpointReader(root / "bare"))     # the bare model has no head
    dense = lora_adapter(model, tmp_path / "embed", seed=4, r=4, lora_alpha=8, target_modules=["embed_tokens"])
    assert_matches_peft(open_input(tmp_path / "embed", base=CheckpointReader(root / "bare")), dense, "model.")


@pytest.mark.parametrize("options", [
    {"target_modules": ["c_attn", "c_proj"], "fan_in_fan_out": True},
    {"target_modules": ["c_attn"], "fan_in_fan_out": True, "bias": "all"},
    {"target_modules": ["c_attn", "c_fc"], "fan_in_fan_out": True, "bias": "lora_only", "lora_bias": True},
], ids=["fan_in_fan_out", "bias_all", "lora_bias"])
def test_gpt2_conv1d_equals_peft_merge(tmp_path, options):
    from transformers import AutoModelForCausalLM

    quiet_transformers()
    torch.manual_seed(0)
    model = perturb_(AutoModelForCausalLM.from_config(make_config("gpt2")), seed=6)
    model.save_pretrained(tmp_path / "base")
    model.transformer.save_pretrained(tmp_path / "bare")
    dense = lora_adapter(model, tmp_path / "adapter", seed=7, r=4, lora_alpha=8, **options)
    for base_kind, prefix in (("base", ""), ("bare", "transformer.")):
        reader = open_input(tmp_path / "adapter", base=CheckpointReader(tmp_path / base_kind))
        assert_matches_peft(reader, dense, prefix=prefix)


@pytest.fixture(scope="module")
def classifier_adapters(llama):
    """Two sequence-classification LoRA adapters (3 and 4 labels; the score head saved whole by PEFT as
    modules_to_save) trained from the llama base."""
    from transformers import AutoModelForSequenceClassification

    model, root = llama
    out = {}
    for index, labels in enumerate((3, 4)):
        torch.manual_seed(20 + index)
        classifier = AutoModelForSequenceClassification.from_config(make_config("llama", num_labels=labels,
                                                                                pad_token_id=0))
        classifier.model.load_state_dict(model.model.state_dict())
        folder = root / f"cls_{index}"
        dense = lora_adapter(classifier, folder, seed=30 + index, r=2, lora_alpha=4, task_type="SEQ_CLS",
                             target_modules=["q_proj", "v_proj"])
        out[f"task{index}"] = (folder, dense, labels)
    return out


def test_classifier_adapter_with_modules_to_save_equals_peft_merge(llama, classifier_adapters):
    _, root = llama
    folder, dense, labels = classifier_adapters["task0"]
    assert "base_model.model.score.weight" in load_file(str(folder / "adapter_model.safetensors"))
    base = CheckpointReader(root / "base")
    reader = open_input(folder, "expert 'task0'", base=base)
    assert reader.keys() == base.keys() + ["score.weight"]            # the head is added after the base's
    assert reader.shape("score.weight") == (labels, 32)
    assert_matches_peft(reader, {**dense, "lm_head.weight": base.get("lm_head.weight")})
    assert reader.config["num_labels"] == labels and len(reader.config["id2label"]) == labels
    assert reader.config["architectures"] == ["LlamaForSequenceClassification"]
    # On the bare base, the keys are named as the classifier's (model.layers..., score.weight), so the
    # expert set finds the backbone prefix and the head as for a dense classifier.
    bare = CheckpointReader(root / "bare")
    reader = open_input(folder, base=bare)
    assert reader.keys() == ["model." + k for k in bare.keys()] + ["score.weight"]
    assert_matches_peft(reader, dense)
    experts = ExpertSet(root / "bare", {name: entry[0] for name, entry in classifier_adapters.items()})
    assert [e.prefix for e in experts.experts] == ["model.", "model."]
    assert experts.report.head_keys == {"task0": ["score.weight"], "task1": ["score.weight"]}


def test_classifier_adapters_merge_into_task_models(llama, classifier_adapters, tmp_path):
    _, root = llama
    out = tmp_path / "merged"
    layermerge.merge(root / "bare", {name: entry[0] for name, entry in classifier_adapters.items()},
                     "task_arithmetic", output=out, quiet=True)
    for name, (_, dense, labels) in classifier_adapters.items():
        task_model = layermerge.load_task_model(out, name)
        assert task_model.config.num_labels == labels
        assert torch.equal(task_model.state_dict()["score.weight"], dense["score.weight"])


def test_bare_and_causal_lm_bases_give_the_same_expert(llama, two_adapters):
    _, root = llama
    adapters, _ = two_adapters
    full = open_input(adapters["a"], base=CheckpointReader(root / "base"))
    bare = open_input(adapters["a"], base=CheckpointReader(root / "bare"))
    for key in bare.keys():
        assert torch.equal(bare.get(key), full.get("model." + key)), key


def test_adapter_of_the_bare_model_on_the_causal_lm_base(llama, tmp_path):
    model, root = llama
    dense = lora_adapter(model.model, tmp_path / "adapter", seed=8, r=4, target_modules=["q_proj", "up_proj"])
    base = CheckpointReader(root / "base")
    reader = open_input(tmp_path / "adapter", base=base)                 # layers.0... onto model.layers.0...
    assert reader.keys() == base.keys()
    assert_matches_peft(reader, {"model." + k: v for k, v in dense.items()} | {"lm_head.weight":
                                                                               base.get("lm_head.weight")})


def test_bfloat16_base_gives_bfloat16_tensors_computed_in_float32(llama, two_adapters, tmp_path):
    model, root = llama
    adapters, _ = two_adapters
    copy.deepcopy(model).to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    half, full = CheckpointReader(tmp_path / "bf16"), CheckpointReader(root / "base")
    reader = open_input(adapters["a"], base=half)
    key = "model.layers.0.self_attn.q_proj.weight"
    assert reader.dtype(key) == reader.get(key).dtype == torch.bfloat16
    saved = load_file(str(adapters["a"] / "adapter_model.safetensors"))
    pair = [saved[f"base_model.model.model.layers.0.self_attn.q_proj.lora_{p}.weight"] for p in "BA"]
    delta = pair[0].float() @ pair[1].float() * (8 / 4)               # float32, added before rounding
    assert torch.equal(reader.get(key), (half.get(key).float() + delta).to(torch.bfloat16))
    assert torch.allclose(reader.get(key).float(), open_input(adapters["a"], base=full).get(key), atol=2e-2)


# --------------------------------------------------------------------------- one tensor at a time
def test_get_reads_only_that_keys_base_tensor_and_its_a_and_b(llama, two_adapters, monkeypatch):
    _, root = llama
    adapters, _ = two_adapters
    base = CheckpointReader(root / "base")
    reader = open_input(adapters["a"], base=base)
    read_base, read_adapter = [], []
    base_get, adapter_get = base.get, reader._adapter.get
    monkeypatch.setattr(base, "get", lambda key: read_base.append(key) or base_get(key))
    monkeypatch.setattr(reader._adapter, "get", lambda key: read_adapter.append(key) or adapter_get(key))
    monkeypatch.setattr(base, "state_dict", lambda: pytest.fail("the whole base was read"))
    key = "model.layers.1.self_attn.v_proj.weight"
    reader.get(key)
    assert read_base == [key]
    assert sorted(read_adapter) == [f"base_model.model.model.layers.1.self_attn.v_proj.lora_{p}.weight"
                                    for p in "AB"]
    read_base.clear(), read_adapter.clear()
    reader.get("model.norm.weight")                                      # no LoRA there: the base's alone
    assert read_base == ["model.norm.weight"] and read_adapter == []


# --------------------------------------------------------------------------- through layermerge
def assert_same_output(folder, reference: dict):
    merged = CheckpointReader(folder)
    assert sorted(merged.keys()) == sorted(reference)
    for key in merged.keys():
        assert torch.allclose(merged.get(key), reference[key], atol=ATOL, rtol=0), key


def test_ties_merge_of_lora_experts_equals_dense_experts(llama, two_adapters, tmp_path):
    _, root = llama
    adapters, dense = two_adapters
    layermerge.merge(root / "base", adapters, "ties", output=tmp_path / "lora", quiet=True, density=0.5)
    reference = layermerge.merge(root / "base", dense, "ties", quiet=True, density=0.5).state_dict
    assert_same_output(tmp_path / "lora", reference)
    card = (tmp_path / "lora" / "README.md").read_text()
    digests = LoraReader(adapters["a"], CheckpointReader(root / "base")).file_hashes().values()
    assert all(digest in card for digest in digests)                    # the adapters' files in the card


def test_prodistill_merge_of_lora_experts_equals_dense_experts(llama, two_adapters, tmp_path):
    _, root = llama
    adapters, dense = two_adapters
    generator = torch.Generator().manual_seed(0)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    data = {task: [{"input_ids": torch.randint(3, 99, (2, 5), generator=generator) * mask,
                    "attention_mask": mask}] for task in adapters}
    options = dict(data=data, lr=0.01, epochs=2, seed=0, device="cpu", quiet=True)
    layermerge.merge(root / "base", adapters, "prodistill", output=tmp_path / "lora", **options)
    reference = layermerge.merge(root / "base", dense, "prodistill", **options).state_dict
    assert_same_output(tmp_path / "lora", reference)


def test_cli_merge_with_adapter_folders_as_experts(llama, two_adapters, tmp_path, capsys):
    _, root = llama
    adapters, dense = two_adapters
    config = tmp_path / "merge.yaml"
    config.write_text(yaml.safe_dump({"base": str(root / "base"), "method": "ties",
                                      "experts": {k: str(v) for k, v in adapters.items()},
                                      "params": {"density": 0.5}}))
    assert main(["merge", str(config), "-o", str(tmp_path / "out"), "-q"]) == 0
    reference = layermerge.merge(root / "base", dense, "ties", quiet=True, density=0.5).state_dict
    assert_same_output(tmp_path / "out", reference)


# --------------------------------------------------------------------------- refusals: one line each
def refusal(match: str, source, base, role: str = "expert 'a'") -> str:
    with pytest.raises(CheckpointError, match=match) as caught:
        open_input(source, role, base=base)
    message = str(caught.value)
    assert "\n" not in message and str(source.resolve() if hasattr(source, "resolve") else source) in message
    return message


def hand_made_adapter(folder, tensors: dict, **config):
    """An adapter folder written by hand: PEFT's config fields and key names."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 4,
                                                            "bias": "none", **config}))
    save_file({f"base_model.model.{k}": v.contiguous() for k, v in tensors.items()},
              str(folder / "adapter_model.safetensors"))
    return folder


def q_pair(module="model.layers.0.self_attn.q_proj", rows=32, cols=32, rank=2):
    return {f"{module}.lora_A.weight": torch.randn(rank, cols), f"{module}.lora_B.weight": torch.randn(rows, rank)}


def test_refuses_an_adapter_without_its_base(llama, two_adapters):
    _, root = llama
    adapters, _ = two_adapters
    message = refusal("give the base model it was trained on", adapters["a"], None)
    assert "LoRA adapter" in message
    with pytest.raises(CheckpointError, match="is a LoRA adapter, not a model"):   # the adapter as the base
        ExpertSet(adapters["a"], {"b": adapters["b"]})
    with pytest.raises(CheckpointError, match="give the base model"):               # no base at all
        ExpertSet(None, adapters)


def test_refuses_dora(llama, tmp_path):
    model, root = llama
    lora_adapter(model, tmp_path / "dora", seed=1, r=2, target_modules=["q_proj"], use_dora=True)
    refusal(r"DoRA \(use_dora: true\).*merge_and_unload", tmp_path / "dora", CheckpointReader(root / "base"))


def test_refuses_other_peft_types(llama, tmp_path):
    from peft import IA3Config, get_peft_model

    model, root = llama
    get_peft_model(copy.deepcopy(model), IA3Config(target_modules=["k_proj", "down_proj"],
                                                    feedforward_modules=["down_proj"])).save_pretrained(
        tmp_path / "ia3")
    refusal("is a PEFT IA3 adapter; only LoRA adapters", tmp_path / "ia3", CheckpointReader(root / "base"))


def test_refuses_conv_lora(llama, tmp_path):
    _, root = llama
    folder = hand_made_adapter(tmp_path / "conv", {"model.layers.0.self_attn.q_proj.lora_A.weight":
                                                   torch.randn(2, 32, 1, 1),
                                                   "model.layers.0.self_attn.q_proj.lora_B.weight":
                                                   torch.randn(32, 2, 1, 1)})
    refusal("4-dimensional A and B .a convolution layer.", folder, CheckpointReader(root / "base"))


def test_refuses_shapes_that_do_not_fit_the_base(llama, tmp_path):
    _, root = llama
    folder = hand_made_adapter(tmp_path / "wide", q_pair(rows=48, cols=48))       # trained on a wider model
    refusal(r"has shape \(48, 48\), but the base's 'model.layers.0.self_attn.q_proj.weight' is \(32, 32\); "
            "the adapter does not fit this base", folder, CheckpointReader(root / "base"))


def test_refuses_fan_in_fan_out_that_does_not_fit(tmp_path):
    from transformers import AutoModelForCausalLM

    quiet_transformers()
    model = AutoModelForCausalLM.from_config(make_config("gpt2"))
    model.save_pretrained(tmp_path / "base")
    folder = hand_made_adapter(tmp_path / "conv1d", q_pair("transformer.h.0.attn.c_attn", rows=96, cols=32),
                               fan_in_fan_out=False)
    refusal("fits transposed: set fan_in_fan_out to true", folder, CheckpointReader(tmp_path / "base"))


def test_refuses_a_target_module_the_base_lacks(llama, tmp_path):
    _, root = llama
    folder = hand_made_adapter(tmp_path / "other", q_pair("model.layers.0.attention.query"))
    refusal("LoRA target module 'model.layers.0.attention.query' matches no tensor of the base", folder,
            CheckpointReader(root / "base"))


def test_refuses_an_initialisation_that_changes_the_base(llama, tmp_path):
    _, root = llama
    folder = hand_made_adapter(tmp_path / "pissa", q_pair(), init_lora_weights="pissa")
    refusal("init_lora_weights: 'pissa', which changes the base weights", folder, CheckpointReader(root / "base"))


def test_refuses_a_missing_weights_file_and_a_bad_config(llama, tmp_path):
    _, root = llama
    folder = tmp_path / "empty"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    refusal("but no adapter weights: expected adapter_model.safetensors", folder, CheckpointReader(root / "base"))
    (folder / "adapter_config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="malformed .*adapter_config.json"):
        open_input(folder, base=CheckpointReader(root / "base"))


def test_whole_model_method_builds_each_adapter_experts_task_model(llama, classifier_adapters, tmp_path):
    """Fisher runs each expert's whole task model: built from the adapter reader's config and tensors
    (the adapter folder holds no model of its own), the same model peft's merge_and_unload gives."""
    from layermerge.pipeline.strategies.modelwise import load_expert_model

    _, root = llama
    base = CheckpointReader(root / "bare")
    for name, (folder, dense, labels) in classifier_adapters.items():
        reader = open_input(folder, base=base)
        model = load_expert_model(reader.folder, name, reader)
        assert model.config.num_labels == labels
        state = model.state_dict()
        for key, value in dense.items():
            assert torch.allclose(state[key], value, atol=1e-6), key
    batches = {name: [{"input_ids": torch.randint(3, 90, (4, 6)), "attention_mask": torch.ones(4, 6, dtype=torch.long),
                       "labels": torch.tensor([0, 1, 0, 1])}] for name in classifier_adapters}
    out = layermerge.merge(root / "bare", {name: entry[0] for name, entry in classifier_adapters.items()}, "fisher",
                           data=batches, output=tmp_path / "fisher", quiet=True)
    assert (out.path / "model.safetensors").is_file()
