"""Checkpoint input/output: lazy per-tensor reading and atomic sharded writing."""

from layermerge.io.inputs import open_input
from layermerge.io.reader import CheckpointReader, open_checkpoint
from layermerge.io.writer import CheckpointWriter

__all__ = ["CheckpointReader", "CheckpointWriter", "open_checkpoint", "open_input"]
