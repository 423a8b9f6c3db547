"""``rome-edit info`` and ``rome-edit generate``."""

from __future__ import annotations

import argparse

from rome_edit.cli.common import add_model_args, model_from_args
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


def run_info(args: argparse.Namespace) -> int:
    lm = model_from_args(args)
    arch = lm.arch
    d_model, d_mlp = mlp_widths(lm.model, arch)
    n_params = sum(p.numel() for p in lm.model.parameters())
    rows = [
        ("model", lm.name),
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
