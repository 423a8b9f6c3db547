"""Measure the peak memory of one batched edit chunk and compare it with the estimate.

    python benchmarks/measure_edit_memory.py --width 512 --layers 12 --chunk 16 [--vocab 16384]

Builds a random GPT-J-shaped model (float32, CPU), runs one warm-up edit, resets the process's
peak resident set (``/proc/self/clear_refs``, Linux), runs ``compute_edits`` on ``--chunk``
names with 21 context templates and prints the peak RSS growth next to
:func:`rome_edit.assembly.memory.estimate_edit_memory` for the same shapes.  The estimate is
what sizes GPT-J-6B runs (docs/scaling.md); this script is how it was checked.
"""

from __future__ import annotations

import argparse
import ctypes
import json

import torch
from transformers import AutoTokenizer, GPTJConfig, GPTJForCausalLM

from rome_edit.assembly.memory import estimate_edit_memory
from rome_edit.models.loading import bundled_model_path, wrap_model
from rome_edit.rome.compute import compute_edits
from rome_edit.rome.hparams import ROMEHyperParams
from rome_edit.rome.prefix_pass import PromptBatch
from rome_edit.rome.request import EditRequest, rewriting_layouts

NAMES = ["Brittany", "Christopher", "Margaret", "Robert", "Jennifer", "Michael", "Elizabeth",
         "William", "Ani", "David", "Anna", "Tom", "Lucy", "Peter", "Sarah", "James"]
CONTEXT = ["{}"] + [("The city was quiet and the rain fell " * 2)[: 20 + 3 * i] + ". {}"
                    for i in range(20)]


def _map_large_allocations() -> None:
    """Make glibc hand every allocation above 128 KiB back to the OS when freed (mmap), so the
    resident set follows live tensors instead of what the heap happened to keep."""
    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD
    except OSError:
        pass  # not glibc: the peak still bounds the live tensors, less tightly


def _status(field: str) -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def measure(width: int, layers: int, chunk: int, vocab: int) -> dict:
    _map_large_allocations()
    torch.manual_seed(0)
    torch.set_num_threads(1)
    tokenizer = AutoTokenizer.from_pretrained(bundled_model_path())
    config = GPTJConfig(n_embd=width, n_layer=layers, n_head=8, rotary_dim=16,
                        vocab_size=vocab, n_positions=128, bos_token_id=0, eos_token_id=0)
    lm = wrap_model(GPTJForCausalLM(config), tokenizer, "random-gptj")
    requests = [EditRequest(n, "Name: {}. Gender:", " Male", " Female")
                for n in (NAMES * (1 + chunk // len(NAMES)))[:chunk]]
    hp = ROMEHyperParams(layers=(1,), v_loss_layer=layers - 1, v_num_grad_steps=3,
                         mom2_adjustment=False)
    compute_edits(lm, requests[:1], hp, CONTEXT[:2], progress=False)  # warm-up allocations
    layout = PromptBatch(lm, [[*layouts, kl] for r in requests
                              for layouts, kl in [rewriting_layouts(tokenizer, r, CONTEXT)]],
                         torch.device("cpu"))
    prefix, own, suffix = layout.P, layout.O, layout.S
    base = _status("VmRSS")
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")  # reset VmHWM to the current RSS
    compute_edits(lm, requests, hp, CONTEXT, chunk_size=chunk, progress=False)
    measured = _status("VmHWM") - base
    est = estimate_edit_memory(lm.model, "float32", layer=1, chunk_size=chunk,
                               n_prompts=len(CONTEXT) + 1, prefix_tokens=prefix,
                               own_tokens=own, suffix_tokens=suffix)
    estimate = est.prefix_cache + est.step_activations + est.logits
    return {"width": width, "layers": layers, "chunk": chunk, "vocab": vocab,
            "prefix_tokens": prefix, "own_tokens": own, "suffix_tokens": suffix,
            "measured_mib": measured / 2**20, "estimate_mib": estimate / 2**20,
            "estimate_over_measured": estimate / measured}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--chunk", type=int, default=16)
    parser.add_argument("--vocab", type=int, default=1024)
    args = parser.parse_args()
    print(json.dumps(measure(args.width, args.layers, args.chunk, args.vocab)))


if __name__ == "__main__":
    main()
