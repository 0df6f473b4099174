"""A merged model (or any fine-tune) written back as a LoRA adapter of its base: a truncated SVD of
each 2-D weight's change, as mergekit's ``extract-lora`` does.

For every 2-D floating-point weight that differs from the base's, Δ = W − W₀ is factored as
U·S·Vᵀ and its first ``rank`` singular directions kept: ``lora_B = U_r·√S_r``, ``lora_A = √S_r·V_rᵀ``,
with ``lora_alpha = rank`` so PEFT's scale α/r is 1 and ``base + B·A`` is the best rank-``rank``
approximation of the model (Eckart–Young). Embedding tables are factored the same way
(``lora_embedding_A/B``, PEFT's layout). Tensors LoRA cannot carry (norm scales, biases) are
reported, not written: the adapter leaves them at the base's values. One tensor at a time; the
adapter folder is written atomically.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from layermerge.errors import CheckpointError, ConfigError
from layermerge.io.atomic import discard_temp, make_temp_sibling, replace_folder
from layermerge.io.inputs import open_input

PREFIX = "base_model.model."


def factor(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(B, A, relative error) with B·A the best rank-``rank`` approximation of ``delta`` (float32)."""
    u, s, vh = torch.linalg.svd(delta.float(), full_matrices=False)
    r = min(rank, len(s))
    root = s[:r].sqrt()
    b, a = u[:, :r] * root, root[:, None] * vh[:r]
    total = float(s.square().sum())
    error = float(s[r:].square().sum() / total) ** 0.5 if total > 0 else 0.0
    return b.contiguous(), a.contiguous(), error


def extract_lora(model: str | Path, base: str | Path, output: str | Path, rank: int = 16,
                 overwrite: bool = False) -> dict:
    """Write ``model`` as a LoRA adapter of ``base`` into ``output``; returns what was written and left out."""
    from safetensors.torch import save_file

    if not isinstance(rank, int) or rank < 1:
        raise ConfigError(f"rank must be a positive integer, got {rank!r}")
    base_reader = open_input(base, "base model")
    reader = open_input(model, "model", base=base_reader)
    output = Path(output).expanduser().resolve()
    if output.exists() and not overwrite:
        raise ConfigError(f"{output} exists; pass --overwrite to replace it or choose another output folder")
    missing = [key for key in base_reader.keys() if key not in reader]
    if missing:
        raise CheckpointError(f"the model lacks {len(missing)} of the base's tensors (e.g. {missing[0]!r}): it is not "
                              "a fine-tune of this base with the same key names")
    embeddings = _embedding_keys(base_reader)
    tensors, modules, left_out, errors = {}, [], [], {}
    for key in base_reader.keys():
        before, after = base_reader.get(key), reader.get(key)
        if before.shape != after.shape:
            raise CheckpointError(f"{key!r} has shape {tuple(after.shape)} in the model but {tuple(before.shape)} in "
                                  "the base; a LoRA adapter cannot change shapes (added tokens?)")
        if not before.is_floating_point() or torch.equal(before, after):
            continue
        if before.dim() != 2 or not key.endswith(".weight"):
            left_out.append(key)
            continue
        module = key[: -len(".weight")]
        b, a, error = factor(after.float() - before.float(), rank)
        if key in embeddings:      # PEFT: Δ = (B·A)ᵀ with lora_embedding_A (r × vocab), lora_embedding_B (dim × r)
            tensors[f"{PREFIX}{module}.lora_embedding_A"] = b.T.contiguous()
            tensors[f"{PREFIX}{module}.lora_embedding_B"] = a.T.contiguous()
        else:
            tensors[f"{PREFIX}{module}.lora_A.weight"] = a
            tensors[f"{PREFIX}{module}.lora_B.weight"] = b
        modules.append(module.rsplit(".", 1)[-1])
        errors[key] = round(error, 6)
    if not tensors:
        raise CheckpointError("the model's 2-D weights equal the base's: there is no change to extract")
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": rank, "target_modules": sorted(set(modules)),
              "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False, "use_rslora": False,
              "base_model_name_or_path": str(base_reader.path), "task_type": "CAUSAL_LM"
              if (base_reader.config or {}).get("architectures", [""])[0].endswith("ForCausalLM") else None}
    temp = make_temp_sibling(output)
    try:
        save_file(tensors, str(temp / "adapter_model.safetensors"), metadata={"format": "pt"})
        (temp / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
        report = {"rank": rank, "tensors": len(errors), "relative_error": errors, "left_at_base": left_out}
        (temp / "layermerge_extract.json").write_text(json.dumps(report, indent=2) + "\n")
        replace_folder(temp, output)
    except BaseException:
        discard_temp(temp)
        raise
    return report


def _embedding_keys(reader) -> set[str]:
    """Token-embedding weights: 2-D tensors whose rows are the vocabulary, named as embeddings."""
    rows = (reader.config or {}).get("vocab_size")
    return {key for key in reader.keys() if "embed" in key and reader.shape(key) and reader.shape(key)[0] == rows}
