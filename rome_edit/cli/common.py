"""Arguments and helpers shared by subcommands."""

from __future__ import annotations

import argparse

from rome_edit.models.loading import DTYPES, LoadedModel, load_model


def add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None,
                        help="hub id or local directory (default: the bundled toy GPT-J)")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    parser.add_argument("--device", default=None, help="e.g. cpu, cuda:0 (default cpu)")
    parser.add_argument("--device-map", default=None,
                        help="accelerate device map, e.g. 'auto' to split over devices")
    parser.add_argument("--module-template", action="append", default=[], metavar="PART=TEMPLATE",
                        help="override a module path, e.g. out_proj=model.layers.{}.mlp.down_proj")


def model_from_args(args: argparse.Namespace) -> LoadedModel:
    templates = {}
    for item in args.module_template:
        part, sep, template = item.partition("=")
        if not sep:
            raise ValueError(f"--module-template {item!r} must look like PART=TEMPLATE.")
        templates[part.strip()] = template.strip()
    return load_model(args.model, dtype=args.dtype, device=args.device,
                      device_map=args.device_map, templates=templates or None)
