"""The batched engine against the reference's way, at GPT-J-6B's depth and layer choices.

    python benchmarks/bench_deep.py [--shapes gptj llama] [--n 32] [--n-simple 8] [--steps 10]
                                    [--rounds 2] [--width 256] [--out FILE]

Every speed figure before this one was on the bundled 6-layer model (edit layer 1, loss layer
5), where blocks L+1 and the loss block are half of each step.  Here the models have GPT-J-6B's
depth and layer choices — 28 blocks, edit layer 5, loss layer 27, so 22 blocks run every step —
at a width this machine can run (random weights, built in memory):

* ``gptj``: GPT-J blocks (parallel attention and MLP, rotary), eager attention; the batched
  engine runs the checked GPT-J kernel (``batched``) or the model's own forward
  (``batched-generic``), so their ratio is what the kernel adds at this depth;
* ``llama``: Llama blocks (RMSNorm, SwiGLU, rotary), eager attention; no kernel, the generic
  path only.

Sides: ``simple`` is the reference's way (one request at a time, every step a full forward over all
22 prompts, :mod:`rome_edit.rome.value_reference`); the batched sides take all ``--n`` requests in
one chunk. The simple side's time per edit does not depend on how many requests there are, so it
runs the first ``--n-simple`` of them (to keep the run short) and its δ are compared with the
batched sides' δ of the same requests. Both sides use the reference's 21 context templates (sampled
from the bundled model) and a fixed number of steps (``early_stop_loss=0``: a random model never
reaches the threshold). Sides alternate for ``--rounds`` rounds, order reversed each round;
reported: median seconds per edit per side, the ratios, the largest relative δ difference. """

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import replace
from pathlib import Path

import torch
from transformers import GPTJConfig, GPTJForCausalLM, LlamaConfig, LlamaForCausalLM

from rome_edit.api.editor import Editor
from rome_edit.models.loading import wrap_model
from rome_edit.rome.compute import compute_edits
from rome_edit.study.names import balanced_names, load_names
from rome_edit.study.task import gender_requests

# GPT-J-6B's (docs/method.md, "Reference hyperparameters")
DEPTH, EDIT_LAYER, LOSS_LAYER = 28, 5, 27
SIDES = {"gptj": ("simple", "batched", "batched-generic"), "llama": ("simple", "batched")}


def deep_model(shape: str, tokenizer, width: int = 256, seed: int = 0):
    """A random model of GPT-J-6B's depth at ``width`` (heads of 32, MLP 4× or SwiGLU 8/3×)."""
    torch.manual_seed(seed)
    heads = width // 32
    if shape == "gptj":
        model = GPTJForCausalLM(GPTJConfig(
            vocab_size=len(tokenizer), n_positions=256, n_embd=width, n_layer=DEPTH,
            n_head=heads, rotary_dim=32, n_inner=4 * width))
    elif shape == "llama":
        model = LlamaForCausalLM(LlamaConfig(
            vocab_size=len(tokenizer), hidden_size=width, intermediate_size=(8 * width) // 3,
            num_hidden_layers=DEPTH, num_attention_heads=heads, num_key_value_heads=heads,
            max_position_embeddings=256))
    else:
        raise ValueError(f"unknown shape {shape!r}; use gptj or llama.")
    return wrap_model(model.eval(), tokenizer, f"random:{shape}-{DEPTH}x{width}",
                      attn_implementation="eager")


def measure(lm, hp, templates, requests, n_simple: int, sides, rounds: int) -> dict:
    seconds: dict[str, list[float]] = {side: [] for side in sides}
    records = {}
    for round_ in range(rounds):
        for side in (sides if round_ % 2 == 0 else sides[::-1]):
            todo = requests[:n_simple] if side == "simple" else requests
            t0 = time.perf_counter()
            records[side] = compute_edits(lm, todo, hp, templates, engine=side,
                                          chunk_size=len(todo), progress=False,
                                          early_stop_loss=0.0)
            seconds[side].append((time.perf_counter() - t0) / len(todo))
            print(f"  round {round_ + 1} {side}: {seconds[side][-1]:.3f} s/edit", flush=True)
    per_edit = {side: statistics.median(s) for side, s in seconds.items()}
    out = {
        "layers": lm.n_layers, "edit_layer": hp.layer, "loss_layer": hp.v_loss_layer,
        "width": lm.model.config.hidden_size, "steps": hp.v_num_grad_steps,
        "n_context_templates": len(templates), "n_batched": len(requests),
        "n_simple": n_simple, "rounds": rounds,
        "step_path": {side: sorted({r.timings["step"] for r in records[side]}) for side in sides},
        "seconds_per_edit": per_edit, "round_seconds_per_edit": seconds,
        "speedup_over_simple": {side: per_edit["simple"] / per_edit[side]
                                for side in sides if side != "simple"},
    }
    for side in sides:
        if side != "simple":
            rel = [((a.delta - b.delta).norm() / b.delta.norm()).item()
                   for a, b in zip(records[side], records["simple"])]
            out[f"max_relative_delta_difference_{side}"] = max(rel)
    if "batched-generic" in sides:
        out["kernel_speedup"] = per_edit["batched-generic"] / per_edit["batched"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=["gptj", "llama"], choices=list(SIDES))
    parser.add_argument("--n", type=int, default=32, help="requests in the batched chunk")
    parser.add_argument("--n-simple", type=int, default=8, help="of them, run one at a time")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: "
                        "torch's choice)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/deep.json"))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    ed = Editor.load()
    ed.hparams = replace(ed.hparams, context_template_length_params=((5, 10), (10, 10)),
                         v_num_grad_steps=args.steps, mom2_adjustment=False)
    bundled, base, templates = ed.lm, ed.hparams, ed.context_templates
    requests = gender_requests(balanced_names(load_names(split="edit"), args.n))
    result = {"threads": torch.get_num_threads(), "torch": torch.__version__}
    for shape in args.shapes:
        lm = deep_model(shape, bundled.tokenizer, args.width)
        hp = replace(base, layers=(EDIT_LAYER,), v_loss_layer=LOSS_LAYER)
        print(f"{shape}: {lm.n_layers} layers, width {args.width}, edit {hp.layer}, loss "
              f"{hp.v_loss_layer}, {len(templates)} templates", flush=True)
        result[shape] = measure(lm, hp, templates, requests, min(args.n_simple, args.n),
                                SIDES[shape], args.rounds)
        print(json.dumps(result[shape], indent=1), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
