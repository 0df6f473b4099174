"""A merged model written back as a LoRA adapter (layermerge extract-lora): checked against peft.

Two LoRA experts of a tiny Llama (rank 2 each) merged by Task Arithmetic change each targeted weight by
a matrix of rank at most 4, so an extracted rank-4 adapter must give back the merged model exactly
(to float tolerance) through peft's own merge_and_unload; a rank-1 adapter must be the best rank-1
approximation (its relative error equals the SVD's tail).
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_config

import layermerge
import layermerge.lora_export
from layermerge.cli import main
from layermerge.io.reader import CheckpointReader
from layermerge.lora_export import factor


@pytest.fixture(scope="module")
def merged(tmp_path_factory):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    root = tmp_path_factory.mktemp("extract")
    torch.manual_seed(0)
    LlamaForCausalLM(make_config("llama", tie_word_embeddings=False)).save_pretrained(root / "base")
    experts = {}
    for seed, name in enumerate(("a", "b")):
        model = get_peft_model(LlamaForCausalLM.from_pretrained(root / "base"),
                               LoraConfig(r=2, lora_alpha=2, target_modules=["q_proj", "v_proj", "down_proj"]))
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for key, param in model.named_parameters():
                if "lora_B" in key:
                    param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
        model.save_pretrained(root / name)
        experts[name] = root / name
    layermerge.merge(root / "base", experts, "task_arithmetic", scaling=0.5, output=root / "merged", quiet=True)
    return root


def peft_merged(base, adapter) -> dict:
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    model = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(base), adapter)
    return model.merge_and_unload().state_dict()


def test_rank_4_adapter_gives_back_the_merged_model_through_peft(merged, capsys):
    root = merged
    code = main(["extract-lora", str(root / "merged"), "--base", str(root / "base"), "-o", str(root / "lora4"),
                 "--rank", "4"])
    assert code == 0, capsys.readouterr().err
    config = json.loads((root / "lora4" / "adapter_config.json").read_text())
    assert config["r"] == 4 and set(config["target_modules"]) == {"q_proj", "v_proj", "down_proj"}
    rebuilt, want = peft_merged(root / "base", root / "lora4"), CheckpointReader(root / "merged")
    for key in want.keys():
        torch.testing.assert_close(rebuilt[key], want.get(key), atol=1e-6, rtol=1e-5)
    report = json.loads((root / "lora4" / "layermerge_extract.json").read_text())
    assert max(report["relative_error"].values()) < 1e-5 and report["left_at_base"] == []


def test_rank_1_is_the_best_rank_1_approximation(merged, tmp_path):
    from layermerge.lora_export import extract_lora

    root = merged
    report = extract_lora(root / "merged", root / "base", tmp_path / "lora1", rank=1)
    key = "model.layers.0.self_attn.q_proj.weight"
    delta = CheckpointReader(root / "merged").get(key) - CheckpointReader(root / "base").get(key)
    singular = torch.linalg.svdvals(delta)
    tail = float((singular[1:].square().sum() / singular.square().sum()).sqrt())
    assert report["relative_error"][key] == pytest.approx(tail, rel=1e-4)
    rebuilt = peft_merged(root / "base", tmp_path / "lora1")
    base = CheckpointReader(root / "base").get(key)
    error = torch.linalg.norm(rebuilt[key] - base - delta) / torch.linalg.norm(delta)
    assert float(error) == pytest.approx(tail, rel=1e-3)


def test_factor_reconstructs_a_low_rank_matrix():
    generator = torch.Generator().manual_seed(1)
    delta = torch.randn(20, 3, generator=generator) @ torch.randn(3, 12, generator=generator)
    b, a, error = factor(delta, 3)
    assert b.shape == (20, 3) and a.shape == (3, 12) and error < 1e-5
    torch.testing.assert_close(b @ a, delta, atol=1e-5, rtol=1e-5)


def test_nothing_to_extract_and_a_bad_rank_are_one_line_errors(merged, tmp_path, capsys):
    root = merged
    assert main(["extract-lora", str(root / "base"), "--base", str(root / "base"), "-o", str(tmp_path / "x")]) == 2
    assert "no change to extract" in capsys.readouterr().err
    assert main(["extract-lora", str(root / "merged"), "--base", str(root / "base"), "-o", str(tmp_path / "y"),
                 "--rank", "0"]) == 2
    err = capsys.readouterr().err
    assert "rank must be a positive integer" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_an_embedding_change_uses_peft_embedding_lora_layout(merged, tmp_path):
    """A changed token embedding is written as lora_embedding_A/B, which peft merges back as the change."""
    from transformers import LlamaForCausalLM

    root = merged
    model = LlamaForCausalLM.from_pretrained(root / "base")
    generator = torch.Generator().manual_seed(3)
    weight = model.model.embed_tokens.weight
    with torch.no_grad():
        weight += (torch.randn(weight.shape[0], 2, generator=generator)
                   @ torch.randn(2, weight.shape[1], generator=generator)) * 0.1
    model.save_pretrained(tmp_path / "changed")
    layermerge.lora_export.extract_lora(tmp_path / "changed", root / "base", tmp_path / "lora", rank=2)
    rebuilt = peft_merged(root / "base", tmp_path / "lora")
    key = "model.embed_tokens.weight"
    torch.testing.assert_close(rebuilt[key], CheckpointReader(tmp_path / "changed").get(key), atol=1e-5, rtol=1e-5)
