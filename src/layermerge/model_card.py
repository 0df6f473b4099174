"""The README.md model card written into every output folder."""

from __future__ import annotations

import datetime
import json
import platform


def library_versions() -> dict[str, str]:
    import safetensors
    import torch
    import transformers

    import layermerge

    return {"layermerge": layermerge.__version__, "torch": torch.__version__,
            "transformers": transformers.__version__, "safetensors": safetensors.__version__,
            "python": platform.python_version()}


def model_card_text(method: str, params: dict, inputs: dict[str, dict[str, str]], summary: dict) -> str:
    """Markdown: method, parameters, inputs with sha256 of their weight files, versions, date."""
    lines = [
        "---", "library_name: transformers", "tags:", "- merge", "- layermerge", f"- {method}", "---", "",
        f"# Merged model ({method})", "",
        f"Made with [layermerge](https://pypi.org/project/layermerge/) on "
        f"{datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}.", "",
        "## Method", "", f"`{method}` with parameters:", "", "```json", json.dumps(params, indent=2, default=str),
        "```", "", "## Inputs", "",
    ]
    if not inputs:
        lines.append("(not recorded: the model was merged in memory)")
    for source, hashes in inputs.items():
        lines.append(f"- `{source}`")
        for file_name, digest in hashes.items():
            lines.append(f"  - `{file_name}` sha256 `{digest}`")
    lines += ["", "## Summary", "", "```json", json.dumps(summary, indent=2, default=str), "```", "",
              "## Library versions", ""]
    lines += [f"- {name} {version}" for name, version in library_versions().items()]
    lines += ["", "Per-task heads, when the experts had them, are in `heads/<task>/`; load a task model with "
              "`layermerge.load_task_model(folder, task)`.", ""]
    return "\n".join(lines)
