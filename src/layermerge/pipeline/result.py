"""What ``layermerge.merge`` returns: the merged model, in memory or in its output folder."""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from layermerge.coefficient_plot import BLOCKS_FILE
from layermerge.errors import ConfigError
from layermerge.io.writer import CheckpointWriter
from layermerge.pipeline.sink import write_record, write_side_files


@dataclass
class MergedModel:
    """A merged backbone (in memory or in a folder), the per-task heads, and what produced it."""

    state_dict: dict[str, torch.Tensor] | None
    heads: dict[str, dict[str, torch.Tensor]]
    head_meta: dict[str, dict]
    config: dict | None
    method: str
    params: dict
    task_extras: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    summary: dict = field(default_factory=dict)
    path: Path | None = None
    base_folder: Path | None = None
    inputs: dict[str, dict[str, str]] = field(default_factory=dict)   # input path -> {file: sha256}
    record: dict | None = None                                         # what layermerge.yaml records
    artifacts: dict[str, torch.Tensor] = field(default_factory=dict)  # saved as <method>/artifacts.safetensors
    input_roles: dict[str, str] = field(default_factory=dict)          # input path -> "base", "expert sst2"
    card_paths: str = "name"                                            # model card: path names or "full" paths
    vocabulary: Any = None                                              # a grown output vocabulary (layermerge.vocab)
    hub_url: str | None = None                                          # where push_to_hub uploaded it

    def save(self, output: str | Path, overwrite: bool = False, max_shard_size: str | int = "5GB") -> Path:
        """Write as a Hugging Face folder (atomically), with the same side files as ``merge(output=...)``:
        heads, model card with the inputs' hashes, ``layermerge.yaml``."""
        if self.state_dict is None:
            raise ConfigError(f"this merged model already lives in {self.path}; copy that folder instead")
        input_paths = [Path(p) for p in self.inputs]
        with CheckpointWriter(output, inputs=input_paths, overwrite=overwrite,
                              max_shard_size=max_shard_size) as writer:
            for key, tensor in self.state_dict.items():
                writer.add_tensor(key, tensor)
            if self.artifacts:
                writer.write_state_dict(self.method, self.artifacts, prefix="artifacts")
            self.write_method_files(writer)
            write_side_files(writer, heads=self.heads, head_meta=self.head_meta, task_extras=self.task_extras,
                             config=self.config, base_folder=self.base_folder, method=self.method,
                             params=self.params, summary=self.summary, inputs=self.inputs, roles=self.input_roles,
                             card_paths=self.card_paths, vocabulary=self.vocabulary)
            if self.record is not None:
                write_record(writer, self.record)
        return Path(output).resolve()

    def push_to_hub(self, repo: str, private: bool = False, token: str | None = None) -> str:
        """Upload the merged model's folder, model card included, to the Hugging Face hub repo ``repo``
        (created when missing); a model in memory is saved to a temporary folder first. Offline, without a
        token, or when the hub cannot be reached, raises OutputError before writing anything. Returns its URL."""
        from layermerge.io import hub

        token = hub.check_push_ready(repo, token)
        if self.state_dict is None:
            self.hub_url = hub.push_folder(self.path, repo, private=private, token=token)
            return self.hub_url
        with tempfile.TemporaryDirectory(prefix="layermerge-push-") as temp:
            folder = self.save(Path(temp) / "model")
            self.hub_url = hub.push_folder(folder, repo, private=private, token=token, kept=False)
        return self.hub_url

    def write_method_files(self, writer: CheckpointWriter) -> None:
        """Files a kind of method adds under ``<method>/`` (none here)."""

    def to_hf_model(self):
        """The merged backbone as a transformers model built from the base's config."""
        from layermerge.hf import backbone_from_state_dict

        if self.state_dict is None:
            from transformers import AutoModel
            return AutoModel.from_pretrained(self.path)
        return backbone_from_state_dict(self.config, self.state_dict)


@dataclass
class DataDrivenMergedModel(MergedModel):
    """A MergedModel plus the learned coefficients (checkpoint key names) and per-block records."""

    coefficients: dict[str, torch.Tensor] = field(default_factory=dict)
    blocks: dict | None = None

    def write_method_files(self, writer: CheckpointWriter) -> None:
        """The coefficients and their per-block summary, as a merge into a folder writes them."""
        if self.coefficients:
            writer.write_state_dict(self.method, {k: v.contiguous() for k, v in self.coefficients.items()},
                                    prefix="coefficients")
        if self.blocks:
            writer.write_text(f"{self.method}/{BLOCKS_FILE}", json.dumps(self.blocks, indent=2, default=str) + "\n")
