"""What the GPT-J step kernel adds over the model's own forward, on the bundled and a deep shape.

    python benchmarks/bench_kernel.py [--n 32] [--rounds 2] [--steps 10]
                                      [--out benchmarks/results/kernel.json]

The batched engine computes each value-optimisation step either with the GPT-J kernel
(``engine="batched"``, :mod:`rome_edit.models.gptj_suffix`, checked against the model on first
use) or with the model's own forward over the suffix (``engine="batched-generic"``).  Both run
the same δ = 0 pass and the same loop, so the ratio is the kernel's contribution.  Two shapes:

* **bundled** — the bundled 6-layer GPT-J, edit layer 1, loss layer 5 (blocks 2–5 run per step);
* **deep** — a random-initialised GPT-J with GPT-J-6B's depth and layer choices (28 layers, edit
  layer 5, loss layer 27: 22 blocks per step) at the bundled model's width (256, 8 heads,
  rotary 32, d_mlp 1024), with the bundled tokenizer.

Both use the reference's 21 context templates (sampled from the bundled model) and a fixed
number of steps (no early stop: a random model never reaches the threshold, and the bundled
side is held to the same count).  The sides alternate for ``--rounds`` rounds, order swapped
each round; reported: median seconds per edit, the ratio, and the largest relative δ difference.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import replace
from pathlib import Path

import torch
from transformers import GPTJConfig, GPTJForCausalLM

from rome_edit.api.editor import Editor
from rome_edit.models.loading import wrap_model
from rome_edit.rome.compute import compute_edits
from rome_edit.rome.hparams import ROMEHyperParams
from rome_edit.rome.request import EditRequest
from rome_edit.study.names import load_names
from rome_edit.study.task import ANSWERS, EDIT_PROMPT, other_gender


def deep_gptj(tokenizer, seed: int = 0):
    """GPT-J-6B's depth (28 blocks) at the bundled width, random weights, eager attention."""
    torch.manual_seed(seed)
    config = GPTJConfig(vocab_size=len(tokenizer), n_positions=256, n_embd=256, n_layer=28,
                        n_head=8, rotary_dim=32, n_inner=1024)
    return wrap_model(GPTJForCausalLM(config), tokenizer, "random:gptj-28x256",
                      attn_implementation="eager")


def measure(lm, hp: ROMEHyperParams, templates, requests, rounds: int) -> dict:
    seconds: dict[str, list[float]] = {"batched": [], "batched-generic": []}
    records = {}
    for round_ in range(rounds):
        order = list(seconds) if round_ % 2 == 0 else list(seconds)[::-1]
        for engine in order:
            t0 = time.perf_counter()
            records[engine] = compute_edits(lm, requests, hp, templates, engine=engine,
                                            chunk_size=len(requests), progress=False,
                                            early_stop_loss=0.0)
            seconds[engine].append(time.perf_counter() - t0)
            print(f"  round {round_ + 1} {engine}: {seconds[engine][-1]:.1f} s", flush=True)
    kernel, generic = (statistics.median(seconds[k]) for k in seconds)
    rel = [((a.delta - b.delta).norm() / b.delta.norm()).item()
           for a, b in zip(records["batched"], records["batched-generic"])]
    return {
        "layers": lm.n_layers, "edit_layer": hp.layer, "loss_layer": hp.v_loss_layer,
        "steps": hp.v_num_grad_steps, "n_edits": len(requests), "rounds": rounds,
        "step_path": sorted({r.timings["step"] for r in records["batched"]}),
        "kernel_seconds_per_edit": kernel / len(requests),
        "generic_seconds_per_edit": generic / len(requests),
        "kernel_speedup": generic / kernel,
        "round_seconds": seconds,
        "max_relative_delta_difference": max(rel),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/kernel.json"))
    args = parser.parse_args()
    ed = Editor.load()
    ed.hparams = replace(ed.hparams, context_template_length_params=((5, 10), (10, 10)),
                         v_num_grad_steps=args.steps, mom2_adjustment=False)
    bundled, base, templates = ed.lm, ed.hparams, ed.context_templates
    names = load_names(split="edit")
    names = [n for pair in zip(names[::2], names[1::2]) for n in pair][: args.n]
    requests = [EditRequest(e.name, EDIT_PROMPT, ANSWERS[other_gender(e.gender)],
                            ANSWERS[e.gender]) for e in names]
    result = {"threads": torch.get_num_threads(), "torch": torch.__version__,
              "n_context_templates": len(templates)}
    shapes = {"bundled": (bundled, base),
              "deep": (deep_gptj(bundled.tokenizer), replace(base, layers=(5,), v_loss_layer=27))}
    for shape, (lm, hp) in shapes.items():
        print(f"{shape}: {lm.n_layers} layers, edit {hp.layer}, loss {hp.v_loss_layer}",
              flush=True)
        result[shape] = measure(lm, hp, templates, requests, args.rounds)
        print(json.dumps(result[shape], indent=1), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
