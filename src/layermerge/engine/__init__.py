"""The block-streaming engine shared by data-driven methods (see docs/DATA_DRIVEN.md)."""

from layermerge.engine.cache import ActivationCache
from layermerge.engine.capture import BlockInputs, call_block, capture_block_inputs
from layermerge.engine.context import BlockContext, BlockResult, NetworkContext, PairRef
from layermerge.engine.driver import (
    BlockEngine,
    BlockMerger,
    CollectingSink,
    DiscardingSink,
    EngineResult,
    EngineSink,
    block_seed,
    non_block_tensor,
    resolve_compute_dtype,
    run_engine,
    task_arithmetic_tensor,
)
from layermerge.engine.sources import ExpertSetSource, StateDictSource, WeightSource

__all__ = ["ActivationCache", "BlockContext", "BlockEngine", "BlockInputs", "BlockMerger", "BlockResult",
           "CollectingSink", "DiscardingSink", "EngineResult", "EngineSink", "ExpertSetSource", "NetworkContext",
           "PairRef", "StateDictSource", "WeightSource", "block_seed", "call_block", "capture_block_inputs",
           "non_block_tensor", "resolve_compute_dtype", "run_engine",
           "task_arithmetic_tensor"]
