"""Data-free methods, tensor by tensor: peak memory is one tensor of the base and of each expert plus
the output shard being filled, never a whole model."""

from __future__ import annotations

import time

from layermerge.methods.base import TensorResult
from layermerge.norm_stats import is_running_statistic, mean_of_experts
from layermerge.pipeline.strategies.base import Outcome, Strategy
from layermerge.progress import progress


class TensorStrategy(Strategy):
    def prepare(self) -> None:
        self.algorithm = self.plan.method.cls(self.plan.params, self.expert_set.names)
        self.algorithm.inputs_owned = True

    def run(self, writer) -> Outcome:
        plan, expert_set, algorithm = self.plan, self.expert_set, self.algorithm
        keys = expert_set.report.merge_keys
        started = time.perf_counter()
        for pass_index in range(algorithm.stat_passes):
            for key, base_t, expert_ts in progress(expert_set.iter_merge_tensors(), total=len(keys),
                                                   disable=plan.quiet, unit="tensor",
                                                   desc=f"{plan.name}: statistics pass {pass_index + 1}"):
                algorithm.observe(pass_index, key, base_t, expert_ts)
            algorithm.end_pass(pass_index)
        reference, ref_prefix, out_dtype = expert_set.reference, expert_set.reference_prefix, plan.dtype
        extra_writers = {}
        for key, base_t, expert_ts in progress(expert_set.iter_merge_tensors(), total=len(keys), disable=plan.quiet,
                                               desc=f"{plan.name}: merging", unit="tensor"):
            if is_running_statistic(key):
                result = mean_of_experts(expert_ts)       # statistics, not weights (methods/statistics.py)
            else:
                result = algorithm.merge_tensor(key, base_t, expert_ts)
            del base_t, expert_ts  # free this key's inputs before the output is cast and written
            if not isinstance(result, TensorResult):
                result = TensorResult(result)
            writer.add_tensor(key, result.merged.to(out_dtype or reference.dtype(ref_prefix + key)))
            for task, extra in result.per_task.items():
                if task not in extra_writers:
                    extra_writers[task] = writer.stream_writer(f"task_extras/{task}")
                extra_writers[task].add(key, extra)
        return Outcome({**algorithm.summary(), "seconds": round(time.perf_counter() - started, 3)})
