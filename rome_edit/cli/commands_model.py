"""``rome-edit info``, ``rome-edit generate`` and ``rome-edit models``."""

from __future__ import annotations

import argparse

from rome_edit.cli.common import add_model_args, model_from_args
from rome_edit.models import gguf
from rome_edit.models.architectures import mlp_widths
from rome_edit.models.scoring import generate


def register(subparsers: argparse._SubParsersAction) -> None:
    info = subparsers.add_parser("info", help="summarise a model: family, layers, edit target")
    add_model_args(info)
    info.set_defaults(func=run_info)

    gen = subparsers.add_parser("generate", help="complete a prompt")
    add_model_args(gen)
    gen.add_argument("--prompt", required=True, action="append",
                     help="prompt text (repeat for several)")
    gen.add_argument("--max-new-tokens", type=int, default=20)
    gen.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    gen.add_argument("--seed", type=int, default=0)
    gen.set_defaults(func=run_generate)

    models = subparsers.add_parser(
        "models", help="the GGUF models --model NAME can load, and where they are installed",
        description="Lists the named GGUF models (--model NAME loads one): installed, with "
                    "the file's path, or the command that installs it.")
    models.add_argument("--path", metavar="NAME", choices=sorted(gguf.GGUF_MODELS), default=None,
                        help="print only NAME's file path (an error naming the install "
                             "command when it is not installed)")
    models.set_defaults(func=run_models)


def run_info(args: argparse.Namespace) -> int:
    lm = model_from_args(args)
    arch = lm.arch
    d_model, d_mlp = mlp_widths(lm.model, arch)
    n_params = sum(p.numel() for p in lm.model.parameters())
    rows = [
        ("model", lm.name),
        *([("GGUF file", f"{lm.gguf_file} (dequantised)")] if lm.gguf_file else []),
        ("identity", lm.identity),
        ("attention", lm.attn_implementation),
        ("family", arch.family),
        ("parameters", f"{n_params:,}"),
        ("layers", lm.n_layers),
        ("d_model (value size)", d_model),
        ("d_mlp (key size)", d_mlp),
        ("vocabulary", len(lm.tokenizer)),
        ("blocks", "parallel (attention and MLP read the same ln(h))" if arch.parallel
         else "sequential"),
        ("edit target", arch.out_proj + (" (Conv1D, stored transposed)"
                                         if arch.out_proj_transposed else "")),
        ("mlp / attention", f"{arch.mlp} / {arch.attn}"),
        ("embeddings / final norm / unembedding",
         f"{arch.embed} / {arch.final_norm} / {arch.lm_head}"),
        ("dtype / device", f"{next(lm.model.parameters()).dtype} / {lm.device}"),
    ]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    return 0


def run_generate(args: argparse.Namespace) -> int:
    lm = model_from_args(args)
    for prompt in args.prompt:
        text = generate(lm.model, lm.tokenizer, prompt, args.max_new_tokens, args.sample, args.seed)
        print(f"{prompt}{text}")
    return 0


def run_models(args: argparse.Namespace) -> int:
    if args.path is not None:
        print(gguf.gguf_source(args.path))  # raises, naming the install command, when absent
        return 0
    for name, entry in sorted(gguf.GGUF_MODELS.items()):
        path = gguf.find_gguf_model(name)
        print(f"{name}  {entry.about}")
        print(f"  {'installed: ' + str(path) if path else 'not installed; ' + entry.install}")
    return 0
