"""The README.md model card written into every output folder."""

from __future__ import annotations

import datetime
import json
import platform
from pathlib import PurePath


def library_versions() -> dict[str, str]:
    """The versions the card records, read from the installed packages' metadata: importing
    transformers only for its version took 0.7 s of a merge that never used it."""
    from importlib.metadata import PackageNotFoundError, version

    import torch

    import layermerge

    def installed(name: str) -> str:
        try:
            return version(name)
        except PackageNotFoundError:
            return "not installed"

    return {"layermerge": layermerge.__version__, "torch": torch.__version__,
            "transformers": installed("transformers"), "safetensors": installed("safetensors"),
            "python": platform.python_version()}


CARD_PATHS = ("name", "full")


def input_lines(inputs: dict[str, dict[str, str]], roles: dict[str, str] | None = None,
                card_paths: str = "name") -> list[str]:
    """One line per input (its role, and its folder or file name) and one per weight file with its sha256.

    Only the last component of each path is shown: a model card is published with the model, and
    the folders of the machine that merged it are nobody's business (``card_paths="full"`` keeps them).
    """
    if card_paths not in CARD_PATHS:
        raise ValueError(f"card_paths must be one of {CARD_PATHS}, got {card_paths!r}")
    lines = []
    for source, hashes in inputs.items():
        root = PurePath(source)
        shown = str(root) if card_paths == "full" else root.name
        role = (roles or {}).get(source)
        if role and f"`{shown}`" in role:     # the role names it already (a hub id's commit)
            lines.append(f"- {role}")
        else:
            lines.append(f"- {role}: `{shown}`" if role else f"- `{shown}`")
        for file_name, digest in hashes.items():
            path = PurePath(file_name)
            relative = path.relative_to(root) if path.is_relative_to(root) and path != root else path.name
            lines.append(f"  - `{relative}` sha256 `{digest}`")
    return lines


def model_card_text(method: str, params: dict, inputs: dict[str, dict[str, str]], summary: dict,
                    roles: dict[str, str] | None = None, card_paths: str = "name") -> str:
    """Markdown: method, parameters, inputs (role, name and sha256 of their weight files), versions, date."""
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
    lines += input_lines(inputs, roles, card_paths)
    lines += ["", "## Summary", "", "```json", json.dumps(summary, indent=2, default=str), "```", "",
              "## Library versions", ""]
    lines += [f"- {name} {version}" for name, version in library_versions().items()]
    lines += ["", "Per-task heads, when the experts had them, are in `heads/<task>/`; load a task model with "
              "`layermerge.load_task_model(folder, task)`.", ""]
    return "\n".join(lines)
