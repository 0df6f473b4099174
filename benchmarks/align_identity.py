"""How much of the base's unit order activation matching keeps between two experts of one base.

Experts fine-tuned from one base inherit its unit order; PLeaS and NP Merge permute one model's units
to match the other's by the correlation of their activations. This prints, per permutation group of
the model, the fraction of units that matching leaves in place (1.0: the base's order kept). Read in
docs/BENCHMARKS.md, "The methods of issue 20 on every track" (PLeaS on the vision5 pairs).

    .venv/bin/python benchmarks/align_identity.py EXPERT_A EXPERT_B --tasks mnist,fashion_mnist
    # the vision5 experts: .cache/layermerge/experts/<task>-efficientnet-lite0-<hash>

Inputs: ``--images`` training images per task (seeded), collated as the experts were trained.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from layermerge.align import activation_matching, build_spec
from layermerge.data import ImageCollator, sample_few_shot
from layermerge.data.models import load_vision_model


def identity_fractions(folder_a: str, folder_b: str, tasks: list[str], images: int, seed: int) -> dict[str, float]:
    model_a, spec = load_vision_model(folder_a)
    model_b, _ = load_vision_model(folder_b)
    collate = ImageCollator(spec.image_size, spec.channels, spec.mean, spec.std)
    batches = []
    for task in tasks:
        rows = sample_few_shot(task, images, seed)
        batches.append(collate([rows[i] for i in range(len(rows))])["pixel_values"])
    permutation_spec = build_spec(model_a, batches[0][:4])
    perms = activation_matching(permutation_spec, model_a, model_b, batches)
    return {name: float((perm == torch.arange(len(perm))).float().mean()) for name, perm in perms.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("expert_a")
    parser.add_argument("expert_b")
    parser.add_argument("--tasks", required=True, help="comma-separated tasks whose images feed the matching")
    parser.add_argument("--images", type=int, default=32, help="training images per task (default 32)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="also write the fractions here")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    fractions = identity_fractions(args.expert_a, args.expert_b, args.tasks.split(","), args.images, args.seed)
    for name, value in fractions.items():
        print(f"{name:32s} {value:.3f}")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(fractions, handle, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
