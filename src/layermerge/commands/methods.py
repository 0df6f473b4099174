"""`layermerge methods`: every registered method with its parameters."""

from __future__ import annotations

import json

from layermerge.methods.registry import available_methods


def add_parser(subparsers):
    parser = subparsers.add_parser("methods", help="list merging methods and their parameters")
    parser.add_argument("name", nargs="?", help="show only this method")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    return parser


def run(args) -> int:
    methods = available_methods()
    if args.name:
        from layermerge.methods.registry import get_method
        methods = {args.name: get_method(args.name)}
    if args.json:
        print(json.dumps({name: {"summary": info.summary, "needs_data": info.needs_data, "kind": info.kind,
                                 "parameters": info.parameters()} for name, info in methods.items()},
                         indent=2, default=str))
        return 0
    for name, info in methods.items():
        data = "needs data" if info.needs_data else "data-free"
        print(f"{name}  [{data}]  {info.summary}")
        for row in info.parameters():
            constraint = f" ({row['constraints']})" if row["constraints"] else ""
            print(f"    {row['name']}: {row['type']} = {row['default']!r}{constraint}  {row['description']}")
        print()
    return 0
