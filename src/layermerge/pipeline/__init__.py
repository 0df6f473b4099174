"""One pipeline for every merge, whatever the method's kind (docs/ARCHITECTURE.md draws it):

1. ``plan``: the request resolved and validated once (method, parameters, data, engine, output);
2. ``source``: the base and experts opened lazily and checked against each other;
3. ``strategies``: tensor by tensor, block by block through the engine, or on whole task models;
4. ``sink``: the writer (a folder, memory, or nothing) and the side files every output has.
"""

from layermerge.pipeline.plan import EngineConfig, MergePlan, make_plan
from layermerge.pipeline.result import DataDrivenMergedModel, MergedModel
from layermerge.pipeline.run import merge

__all__ = ["DataDrivenMergedModel", "EngineConfig", "MergePlan", "MergedModel", "make_plan", "merge"]
