"""Stage 2, the source: the base and experts opened lazily and checked against each other.

The ExpertSet (``layermerge.experts``) reads metadata only: keys, shapes, dtypes, heads, prefixes and
the vocabulary policy are checked here, before any tensor is merged. This module adds what the
method asks of the set (a base, an expert count) and what the output records about the inputs.
"""

from __future__ import annotations

import os

from layermerge.errors import ConfigError
from layermerge.experts import ExpertSet
from layermerge.pipeline.plan import MergePlan


def open_source(plan: MergePlan) -> ExpertSet:
    """The checked expert set for the plan's method: a base when it needs one, an expert count it accepts."""
    info = plan.method
    experts = plan.experts
    expert_set = experts if isinstance(experts, ExpertSet) else ExpertSet(
        plan.base, experts, vocab_policy=plan.vocab_policy, head_keys=list(plan.head_keys),
        tokenizer_source=plan.tokenizer_source, chat_template=plan.chat_template)
    if expert_set.base is None and info.needs_base:
        raise ConfigError(f"method {info.name!r} works on task vectors and needs a base model")
    count = len(expert_set.experts)
    if count < info.min_experts or (info.max_experts is not None and count > info.max_experts):
        if info.min_experts == info.max_experts:
            limit = f"exactly {info.min_experts}"
        else:
            limit = f"at least {info.min_experts}" + (
                f" and at most {info.max_experts}" if info.max_experts is not None else "")
        raise ConfigError(f"method {info.name!r} needs {limit} experts, got {count}")
    return expert_set


def given_paths(plan: MergePlan, expert_set: ExpertSet) -> tuple[str | None, dict[str, str]]:
    """The inputs as the caller named them, for layermerge.yaml (paths as given, not resolved)."""
    def as_given(source, reader) -> str:
        return str(source) if isinstance(source, (str, os.PathLike)) else str(reader.path)

    named = plan.experts if isinstance(plan.experts, dict) else {}
    base_path = as_given(plan.base, expert_set.base) if expert_set.base is not None else None
    return base_path, {e.name: as_given(named.get(e.name), e.reader) for e in expert_set.experts}


def hash_inputs(expert_set: ExpertSet) -> tuple[dict[str, dict[str, str]], dict[str, str]]:
    """``{input path: {weight file: sha256}}`` and ``{input path: role}`` for the model card.

    Called after the merge: the readers hash each file along with the reads the merge made, so this
    costs almost no I/O; inputs whose files hash alike are reported (``RedundantInputWarning``).
    """
    inputs: dict[str, dict[str, str]] = {}
    roles: dict[str, str] = {}
    hub_ids: dict[str, str] = {}
    by_name = {}
    for name, reader in expert_set.input_readers():
        source = str(reader.path)
        by_name[name] = inputs[source] = reader.file_hashes()
        role = "base" if name is None else f"expert {name}"
        roles[source] = f"{roles[source]}, {role}" if source in roles else role
        if getattr(reader, "hub_input", None) is not None:       # given as a hub id: the id and its commit
            hub_ids[source] = reader.hub_input.card_text()
    for source, text in hub_ids.items():
        roles[source] += f", {text}"
    expert_set.warn_identical_files(by_name)
    return inputs, roles


def head_meta(expert_set: ExpertSet) -> dict[str, dict]:
    """Per task: the key prefix of the expert's task model and its config (to rebuild the task model)."""
    return {e.name: {"prefix": e.prefix, "config": e.reader.config} for e in expert_set.experts}
