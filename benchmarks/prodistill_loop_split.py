"""One ProDistill merge of a benchmark track, its training loop split into pieces (issue 15).

    .venv/bin/python benchmarks/prodistill_loop_split.py --track glue8-minilm --set epochs=2 \
        --set patience=0 --threads 1

Builds the track's merge exactly as ``layermerge bench`` does (its experts, shots, max length, seed 0,
its ProDistill parameters, then ``--set KEY=VALUE`` on top), runs ``layermerge merge`` in this process
with timers wrapped around the pieces of the loop (no library code is edited), and prints, per call
and in total: building W(λ) (``MergingCoefficients.weights``), loading the cached inputs, planning
which batches share a block call (``Stacking.plan``), the block's forward and loss per block call
(``ProDistill._call_error``, stacked batches or one by one; ``_error`` inside it counts the batches run
on their own), ``loss.backward()`` (which includes τ ⊙ ∂L/∂W), Adam's
step and zero_grad, each block's training (``fit``) and the whole merge. ``--set epochs=0`` gives the
merge's fixed cost (capture, the expert and merged stream forwards, output). Timers are inclusive per
wrapped call; the error calls also count the engine-free passes a method makes outside training.
Experts must already be fine-tuned (``layermerge bench TRACK --stages experts``).
"""

from __future__ import annotations

import argparse
import collections
import functools
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO / "benchmarks"))       # prodistill_speed's track_context


def track_config(track_name: str, overrides: dict) -> dict:
    """The merge config ``layermerge bench`` would write for the track's ProDistill row (seed 0)."""
    from prodistill_speed import track_context

    from layermerge.bench.runner import Run, merge_config

    ctx = track_context(track_name)
    params = {**ctx.track.method_params.get("prodistill", {}), **overrides}
    config = merge_config(ctx, Run(row="split", method="prodistill", params=params, shots=ctx.track.shots, seed=0))
    config["engine"] = {"device": "cpu", "seed": 0}
    return config


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--track", default="glue8-minilm")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a ProDistill parameter")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    overrides = {}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--set {item!r}: expected KEY=VALUE")
        overrides[key] = yaml.safe_load(value)

    from layermerge.cli import main as layermerge_main
    from layermerge.methods import coefficients, prodistill, stacking

    seconds, calls = collections.defaultdict(float), collections.defaultdict(int)

    def timed(owner, name: str, label: str) -> None:
        function = getattr(owner, name)

        @functools.wraps(function)
        def wrapper(*call_args, **kwargs):
            started = time.perf_counter()
            try:
                return function(*call_args, **kwargs)
            finally:
                seconds[label] += time.perf_counter() - started
                calls[label] += 1

        setattr(owner, name, wrapper)

    timed(coefficients.MergingCoefficients, "weights", "W(λ)")
    timed(prodistill.ProDistill, "_input", "loading a cached input")
    timed(stacking.Stacking, "plan", "planning the block calls")
    timed(prodistill.ProDistill, "_call_error", "forward + loss, per block call")
    timed(prodistill.ProDistill, "_error", "forward + loss, per unstacked batch")
    timed(torch.Tensor, "backward", "backward")
    timed(torch.optim.Adam, "step", "Adam step")
    timed(torch.optim.Adam, "zero_grad", "zero_grad")
    timed(prodistill, "fit", "fit (one block's training)")
    timed(prodistill.ProDistill, "merge_block", "merge_block")

    with tempfile.TemporaryDirectory(prefix="prodistill-split-") as scratch:
        config_path = Path(scratch) / "merge.yaml"
        config_path.write_text(yaml.safe_dump(track_config(args.track, overrides), sort_keys=False))
        started = time.perf_counter()
        status = layermerge_main(["merge", str(config_path), "--output", str(Path(scratch) / "out"), "--quiet"])
        wall = time.perf_counter() - started
    if status:
        return status
    print(f"{args.track}, {overrides or 'track defaults'}, {args.threads} thread(s): merge {wall:.2f} s")
    for label, total in seconds.items():
        print(f"  {label:<36} {total:8.2f} s {calls[label]:6d} calls {1000 * total / calls[label]:9.2f} ms per call")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
