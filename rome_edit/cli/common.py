"""Arguments and helpers shared by subcommands."""

from __future__ import annotations

import argparse

from rome_edit.models.compat import ATTENTION_IMPLEMENTATIONS
from rome_edit.models.loading import DTYPES, LoadedModel, load_model


def add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None,
                        help="hub id, local directory, GGUF file (*.gguf, dequantised) or a "
                             "name listed by 'rome-edit models' (default: the bundled toy "
                             "GPT-J)")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    parser.add_argument("--device", default=None, help="e.g. cpu, cuda:0 (default cpu)")
    parser.add_argument("--attn-implementation", default="eager",
                        choices=ATTENTION_IMPLEMENTATIONS,
                        help="attention kernel, recorded with the results: eager (the "
                             "reference's arithmetic, default) or sdpa (fused, faster on GPUs)")
    parser.add_argument("--device-map", default=None,
                        help="accelerate device map, e.g. 'auto' to split over devices")
    parser.add_argument("--max-memory", default=None, metavar="DEV=SIZE,...",
                        help="with --device-map auto: memory per device, e.g. "
                             "'0=20GiB,1=20GiB,cpu=60GiB'")
    parser.add_argument("--offload-folder", default=None,
                        help="with --device-map: where accelerate may offload blocks to disk")
    parser.add_argument("--module-template", action="append", default=[], metavar="PART=TEMPLATE",
                        help="override a module path, e.g. out_proj=model.layers.{}.mlp.down_proj")


def model_from_args(args: argparse.Namespace, default_device: str | None = None) -> LoadedModel:
    """The model the arguments name; ``default_device`` applies when ``--device`` is not given
    (a data-parallel process's own GPU)."""
    templates = {}
    for item in args.module_template:
        part, sep, template = item.partition("=")
        if not sep:
            raise ValueError(f"--module-template {item!r} must look like PART=TEMPLATE.")
        templates[part.strip()] = template.strip()
    if args.max_memory is not None and args.device_map is None:
        raise ValueError("--max-memory needs --device-map (e.g. --device-map auto).")
    device = args.device or (default_device if args.device_map is None else None)
    return load_model(args.model, dtype=args.dtype, device=device, device_map=args.device_map,
                      max_memory=parse_max_memory(args.max_memory), templates=templates or None,
                      offload_folder=args.offload_folder,
                      attn_implementation=args.attn_implementation)


def parse_max_memory(text: str | None) -> dict[int | str, str] | None:
    """``'0=20GiB,cpu=60GiB'`` → ``{0: '20GiB', 'cpu': '60GiB'}`` (accelerate's format)."""
    if text is None:
        return None
    limits: dict[int | str, str] = {}
    for item in text.split(","):
        device, sep, size = item.partition("=")
        device, size = device.strip(), size.strip()
        if not sep or not device or not size:
            raise ValueError(f"--max-memory item {item!r} must look like DEVICE=SIZE, e.g. "
                             "0=20GiB or cpu=60GiB.")
        limits[int(device) if device.isdigit() else device] = size
    return limits
