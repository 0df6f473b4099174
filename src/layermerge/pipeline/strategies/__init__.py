"""Stage 3, the strategies: how a kind of method turns the source into merged tensors.

Each strategy is built from the plan and the checked expert set, ``prepare()``s what needs the
weights' metadata (templates, few-shot data, checkpoint folders) before any output exists, and
``run(writer)``s the merge into the writer, returning its summary and the extra sections of the
config record. ``tensor``: stream tensor by tensor (data-free); ``block``: block by block through the
engine (ProDistill, DistillMerge, RegMean); ``model``: on each expert's whole task model (Fisher,
AdaMerging, NeuLig, NP Merge...).
"""

from __future__ import annotations

import importlib

from layermerge.pipeline.strategies.base import Outcome, Strategy

# kind -> (module, class), imported on first use: a data-free merge never loads the engine.
STRATEGIES = {"tensor": ("tensorwise", "TensorStrategy"), "block": ("blockwise", "BlockStrategy"),
              "model": ("modelwise", "ModelStrategy")}


def strategy_class(kind: str) -> type[Strategy]:
    module, name = STRATEGIES[kind]
    return getattr(importlib.import_module(f"layermerge.pipeline.strategies.{module}"), name)


__all__ = ["STRATEGIES", "Outcome", "Strategy", "strategy_class"]
