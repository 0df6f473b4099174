"""``layermerge.merge``: every merge, whatever its method's kind, goes plan → source → strategy → sink."""

from __future__ import annotations

import os
from pathlib import Path

from layermerge.io.hub import check_push_ready
from layermerge.io.writer import CheckpointWriter, check_output_location
from layermerge.pipeline.plan import make_plan
from layermerge.pipeline.result import DataDrivenMergedModel, MergedModel
from layermerge.pipeline.sink import MemoryWriter, merge_record, open_writer, write_record, write_side_files
from layermerge.pipeline.source import hash_inputs, head_meta, open_source
from layermerge.pipeline.strategies import strategy_class


def merge(base, experts, method: str = "task_arithmetic", *, output: str | Path | None = None,
          overwrite: bool = False, max_shard_size: str | int = "5GB", dtype: str | None = None,
          vocab_policy: str = "error", head_keys: list[str] | None = None, quiet: bool = False,
          config_record: dict | None = None, data=None, card_paths: str = "name", tokenizer_source: str | None = None,
          chat_template: str | None = None, push_to_hub: str | None = None, **options) -> MergedModel:
    """Merge ``experts`` (fine-tuned from ``base``) with a registered method.

    With ``output`` the result streams straight to a Hugging Face folder; without it, the merged
    state dict is returned in memory (fine for small models). Data-driven methods (ProDistill...)
    take few-shot ``data`` (a data section such as ``{"shots": 16}``, or ``{expert: [input batches]}``)
    and engine options (``device``, ``cache_budget``, ``resume``...; ``layermerge.pipeline.plan.EngineConfig``);
    block methods also take ``template=`` (an ``nn.Module`` of the base's architecture).
    ``card_paths="full"`` writes the inputs' full paths into the model card (default: their names).
    ``vocab_policy`` ("error", "base", "union"), ``tokenizer_source`` and ``chat_template`` (an input's name)
    say what the output vocabulary is when experts added tokens (``layermerge.vocab``).
    ``push_to_hub="org/name"`` uploads the finished output (in memory: a temporary folder) to that hub
    repo; offline, without a token or with the hub unreachable it stops before any merge work.
    """
    if push_to_hub is not None:        # first of all: the arguments as given (locals() holds only them here)
        given = {name: value for name, value in locals().items() if name not in ("push_to_hub", "options")}
        token = check_push_ready(push_to_hub)
        merged = merge(**given, **options)
        if os.environ.get("RANK", "0") == "0":      # under torchrun, the writing rank uploads
            merged.push_to_hub(push_to_hub, token=token)
        return merged
    plan = make_plan(base, experts, method, output=output, overwrite=overwrite, max_shard_size=max_shard_size,
                     dtype=dtype, vocab_policy=vocab_policy, head_keys=head_keys, quiet=quiet,
                     config_record=config_record, data=data, card_paths=card_paths,
                     tokenizer_source=tokenizer_source, chat_template=chat_template, **options)
    expert_set = open_source(plan)
    strategy = strategy_class(plan.kind)(plan, expert_set)
    with strategy.session():
        strategy.prepare()
        if plan.output is not None:
            check_output_location(plan.output, expert_set.input_paths(), plan.overwrite)
        writer = open_writer(plan, expert_set, strategy.is_writer)
        if not isinstance(writer, CheckpointWriter):
            return in_memory_result(plan, expert_set, strategy.run(writer), writer)
        with writer:
            outcome = strategy.run(writer)
            # Heads (usually at the end of an expert's file) and the input hashes come after the merge:
            # the readers hash each file along with the reads, so in this order hashing costs almost no I/O.
            heads = {task: expert_set.head_state(task) for task in expert_set.names}
            inputs, roles = hash_inputs(expert_set)
            reference = expert_set.reference
            write_side_files(writer, heads=heads, head_meta=head_meta(expert_set), task_extras={},
                             config=reference.config, base_folder=reference.folder, method=plan.name,
                             params=plan.param_record, summary=outcome.summary, inputs=inputs, roles=roles,
                             card_paths=plan.card_paths, vocabulary=expert_set.vocabulary)
            write_record(writer, merge_record(plan, expert_set, **outcome.record))
        strategy.finished()
    return MergedModel(None, heads, head_meta(expert_set), expert_set.output_config(), plan.name, plan.param_record,
                       summary=outcome.summary, path=plan.output.resolve(), base_folder=reference.folder)


def in_memory_result(plan, expert_set, outcome, writer: MemoryWriter) -> MergedModel:
    """The merged model held in memory (or, on a data-parallel rank that writes nothing, a stub of it)."""
    reference = expert_set.reference
    if plan.output is not None:            # a rank other than the writer: the writer's folder is the result
        return MergedModel(None, {}, {}, reference.config, plan.name, plan.param_record,
                           path=plan.output.resolve())
    state = {key: writer.tensors[key] for key in expert_set.report.merge_keys}
    heads = {task: expert_set.head_state(task) for task in expert_set.names}
    inputs, roles = hash_inputs(expert_set)
    common = dict(task_extras=writer.task_extras(), summary=outcome.summary, base_folder=reference.folder,
                  inputs=inputs, input_roles=roles, card_paths=plan.card_paths,
                  record=merge_record(plan, expert_set, **outcome.record), vocabulary=expert_set.vocabulary)
    if plan.kind == "block":
        return DataDrivenMergedModel(state, heads, head_meta(expert_set), expert_set.output_config(), plan.name,
                                     plan.param_record, coefficients=writer.side(plan.name, "coefficients"),
                                     blocks=outcome.blocks, **common)
    return MergedModel(state, heads, head_meta(expert_set), expert_set.output_config(), plan.name, plan.param_record,
                       artifacts=writer.side(plan.name, "artifacts"), **common)
