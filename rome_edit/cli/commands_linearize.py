"""``rome-edit linearize``: closed-form linear and quadratic approximants of the edit-layer MLP
under a Gaussian (or Gaussian-mixture) fit of its inputs, held-out R², and the SVD of the linear
part against a sweep's concept directions (docs/lens-and-neurons.md).

Arguments are validated before ``--out`` is created.
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

import torch

from rome_edit.analysis.deltas import load_delta_set
from rome_edit.analysis.directions import DIRECTION_NAMES
from rome_edit.api.editor import Editor
from rome_edit.cli.common import add_model_args, model_from_args
from rome_edit.inspection.lens_plots import layer_token_heatmap
from rome_edit.linearisation.io import ACTIVATION_MODES
from rome_edit.linearisation.polynomial import (
    direction_cosines,
    random_abs_cosine,
    top_singular_directions,
)
from rome_edit.linearisation.run import linearize_mlp
from rome_edit.stats.corpus import resolve_corpus


def register(subparsers: argparse._SubParsersAction) -> None:
    lin = subparsers.add_parser("linearize", help="closed-form linear/quadratic approximants "
                                "of the edit-layer MLP, R², SVD vs concept directions")
    lin.add_argument("--layer", type=int, default=None, help="default: the preset's layer")
    lin.add_argument("--corpus", default="bundled", help="as in 'stats' (default bundled)")
    lin.add_argument("--documents", type=int, default=400, help="documents to read")
    lin.add_argument("--heldout", type=float, default=0.3, help="held-out document fraction")
    lin.add_argument("--moments", choices=ACTIVATION_MODES, default="auto",
                     help="activation moments: closed form where known, else quadrature of "
                          "the model's activation (auto); always quadrature; erf-GELU form")
    lin.add_argument("--components", type=int, default=1,
                     help="also fit a Gaussian mixture of this many components and score its "
                          "closed-form linear approximant (default 1: Gaussian only)")
    lin.add_argument("--sweep", type=Path, default=None,
                     help="sweep directory: cosines of the top singular directions with its "
                          "concept directions")
    lin.add_argument("--top", type=int, default=5, help="singular directions to compare")
    lin.add_argument("--seed", type=int, default=0)
    lin.add_argument("--out", required=True, type=Path)
    lin.add_argument("--hparams", default=None)
    add_model_args(lin)
    lin.set_defaults(func=run_linearize)


def run_linearize(args: argparse.Namespace) -> int:
    lm = model_from_args(args)
    layer = args.layer if args.layer is not None else \
        Editor.from_loaded(lm, hparams=args.hparams).layer
    if not 0 <= layer < lm.n_layers:
        raise ValueError(f"--layer {layer} is out of range (0..{lm.n_layers - 1}).")
    if args.documents < 2 or args.top < 1:
        raise ValueError("--documents must be at least 2 and --top at least 1.")
    deltas = load_delta_set(args.sweep) if args.sweep is not None else None
    if deltas is not None and deltas.layer != layer:
        raise ValueError(f"the sweep's deltas are from layer {deltas.layer}, not {layer}; pass "
                         f"--layer {deltas.layer}.")
    texts = list(itertools.islice(iter(resolve_corpus(args.corpus)), args.documents))
    lin = linearize_mlp(lm, layer, texts, heldout_fraction=args.heldout, moments=args.moments,
                        seed=args.seed, components=args.components)
    report = lin.to_json()
    maps = {"value": lin.polynomial.value_map, "key": lin.polynomial.key_map}
    svd = {}
    for name, matrix in maps.items():
        s, left, right = top_singular_directions(matrix, args.top)
        svd[name] = {"singular_values": s.tolist(), "left": left, "right": right}
    report["svd"] = {n: {"singular_values": v["singular_values"]} for n, v in svd.items()}
    if deltas is not None:
        dirs = deltas.directions(seed=args.seed).as_dict()
        d = svd["value"]["left"].shape[1]
        report["cosines"] = {
            "note": "|cos| of the value map's top singular directions (left: output/value "
                    "space, right: input space) with each concept direction of the sweep",
            "random_baseline_mean_abs_cos": random_abs_cosine(d),
            # output (value) side and input (residual) side
            **{side: direction_cosines(svd["value"][side], dirs) for side in ("left", "right")}}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "linearize.json").write_text(json.dumps(report, indent=1) + "\n")
    if "cosines" in report:
        grid = torch.tensor([report["cosines"]["left"][n] for n in DIRECTION_NAMES])
        layer_token_heatmap(grid, [f"σ{i + 1}" for i in range(grid.shape[1])],
                            args.out / "cosines_left.png", row_labels=list(DIRECTION_NAMES),
                            title=f"|cos| of the layer-{layer} MLP's linear part (top left "
                                  "singular directions) with concept directions",
                            colour_label="|cos|", cmap="Purples", ylabel="concept direction",
                            text=[[f"{c:.2f}" for c in row] for row in grid.tolist()])
    r2 = lin.r2
    print(f"layer {layer} MLP ({lin.activation}, moments: {lin.moments_method}); held-out R² "
          f"on {lin.n_heldout_tokens} tokens:")
    print(f"  key:   linear {r2['key_linear']:.4f}  quadratic {r2['key_quadratic']:.4f}  "
          f"(OLS linear on the same data {r2['key_linear_ols']:.4f})")
    print(f"  value: linear {r2['value_linear']:.4f}  quadratic {r2['value_quadratic']:.4f}  "
          f"(OLS linear {r2['value_linear_ols']:.4f})")
    if lin.mixture is not None:
        print(f"  {args.components}-component mixture, linear: key "
              f"{r2['key_linear_mixture']:.4f}  value {r2['value_linear_mixture']:.4f}")
    print(f"wrote {args.out}/linearize.json")
    return 0

