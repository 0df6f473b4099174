"""Expert (task) names: they become folder names in the output (``heads/<name>/``, ``task_extras/<name>/``).

A name is therefore limited to a safe character set, so that no name can point outside the output
folder (``../../evil``), into a sub-folder (``a/b``), or be hidden or ambiguous: it starts with a
letter or digit, continues with letters, digits, ``.``, ``_`` or ``-``, and is at most 128 characters.
"""

from __future__ import annotations

import re

from layermerge.errors import ConfigError

NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
NAME_RULE = ("use letters, digits, '.', '_' and '-' (starting with a letter or digit, at most 128 "
             "characters), e.g. 'sst2' or 'task-1'")


def expert_name_problem(name) -> str | None:
    """Why ``name`` cannot be an expert name, or None when it can."""
    if not isinstance(name, str):
        return f"expert name {name!r} is not a string: {NAME_RULE}"
    if NAME_PATTERN.fullmatch(name) is None:
        return f"expert name {name!r} is not allowed: {NAME_RULE}"
    return None


def check_expert_name(name) -> str:
    """Return ``name`` if it is a safe expert name, else raise ConfigError saying which characters are allowed."""
    problem = expert_name_problem(name)
    if problem is not None:
        raise ConfigError(problem)
    return name
