"""RegMean++ (Nguyen et al., 2025): RegMean whose Grams come from the merged model's own running inputs.

RegMean fits each linear layer on the inputs that layer sees inside each *expert*; once merged, the
layer receives the *merged* model's activations instead, which drift further from the experts' the
deeper the layer. RegMean++ merges block by block and builds task i's Grams by running expert i's
block on the merged model's output of the blocks merged so far (task i's few-shot inputs through
the merged embeddings and merged blocks), so each block is fitted on the inputs it will see. Inside
a block the expert's own layers feed each other, as in the released code. Non-linear tensors
(biases, norms, embeddings) are averaged.

On the block engine this is RegMean with ``inputs="merged"``; this module registers it under its own
name with the released configuration's off-diagonal scaling (α = 0.95).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from layermerge.methods.registry import register
from layermerge.methods.regmean import RegMean


@register("regmean_plusplus", summary="RegMean++: RegMean with each block's Grams taken on the merged model's "
                                      "running inputs (Nguyen et al. 2025)", needs_data=True, kind="block")
class RegMeanPlusPlus(RegMean):
    class Params(RegMean.Params):
        alpha: float = Field(0.95, ge=0, le=1, description="off-diagonal scaling α of each Gram: G̃ = αG + "
                                                           "(1−α)diag(G) (the released configuration: 0.95)")
        inputs: Literal["expert", "merged"] = Field(
            "merged", description="whose layer inputs build task i's Gram: the merged model's stream (RegMean++) "
                                  "or expert i's own (plain RegMean)")
