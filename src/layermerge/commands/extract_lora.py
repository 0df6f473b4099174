"""`layermerge extract-lora MODEL --base BASE -o OUT [--rank 16]`: a model as a LoRA adapter of its base."""

from __future__ import annotations


def add_parser(subparsers):
    parser = subparsers.add_parser(
        "extract-lora", help="write a merged (or fine-tuned) model as a LoRA adapter of its base (truncated SVD)",
        description="Factor each changed 2-D weight of MODEL against BASE by a truncated SVD at --rank and write a "
                    "PEFT LoRA adapter folder (adapter_config.json + adapter_model.safetensors). Changed norms and "
                    "biases cannot be carried by LoRA and are listed in OUT/layermerge_extract.json.")
    parser.add_argument("model", help="the merged or fine-tuned model (folder, file, hub id, GGUF)")
    parser.add_argument("--base", required=True, help="the base model the adapter applies to")
    parser.add_argument("--output", "-o", required=True, help="the adapter folder to write")
    parser.add_argument("--rank", type=int, default=16, help="LoRA rank r (default 16)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    return parser


def run(args) -> int:
    from layermerge.lora_export import extract_lora

    report = extract_lora(args.model, args.base, args.output, rank=args.rank, overwrite=args.overwrite)
    errors = report["relative_error"].values()
    print(f"wrote a rank-{report['rank']} LoRA adapter of {report['tensors']} tensors to {args.output} (largest "
          f"relative error {max(errors):.4f}); left at the base's values: {len(report['left_at_base'])} tensors")
    return 0
