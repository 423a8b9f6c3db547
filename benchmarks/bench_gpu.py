"""GPU figures at GPT-J-6B's shape: seconds per edit, peak memory vs the estimate, C throughput.

    bash benchmarks/gpu.sh [--out FILE]                      # on a GPU machine, a few minutes
    python benchmarks/bench_gpu.py --shape small --device cpu --out FILE   # the same on CPU

Builds a model with GPT-J-6B's configuration (28 blocks, width 4096, 16 heads, rotary 64, MLP
16384, vocabulary 50400) in float16 with random weights, directly on the device (no download),
and the bundled tokenizer (its ids are a subset of the vocabulary).  With the GPT-J-6B
preset's edit layer 5, loss layer 27, 21 context templates and 20 steps held fixed
(``early_stop_loss=0``; a random model never reaches the threshold) it measures:

1. the batched engine's seconds per edit for chunks of 8, 16, 32 and 64 names, and the time
   1,000 edits would take at 64 (value optimisation, keys and update; the statistics are
   item 3); peak GPU memory per chunk (``torch.cuda.max_memory_allocated``) next to
   :func:`rome_edit.assembly.memory.estimate_edit_memory` for the same chunk;
2. the reference's way (``simple``: one edit at a time, a full forward per step) on a few
   names, for the ratio on this device;
3. statistics throughput: keys accumulated per second by
   :func:`rome_edit.stats.second_moment.compute_second_moment` (the forward stops after layer
   5's output projection), on documents of about ``--doc-tokens`` tokens, and the time of the
   float64 Cholesky factorisation of ``C`` (16384 × 16384) that every edit then reuses.

``--shape small`` runs the same script on a 4-block, width-256 model (for testing on CPU).
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from pathlib import Path

import torch
from transformers import GPTJConfig, GPTJForCausalLM

from rome_edit.api.editor import Editor
from rome_edit.assembly.memory import GIB, estimate_edit_memory, meta_model
from rome_edit.models.loading import load_model, wrap_model
from rome_edit.rome.compute import compute_edits
from rome_edit.rome.hparams import ROMEHyperParams
from rome_edit.stats.corpus import TextCorpus, bundled_corpus
from rome_edit.stats.inverse import InverseSecondMoment
from rome_edit.stats.second_moment import compute_second_moment
from rome_edit.study.names import balanced_names, load_names
from rome_edit.study.task import gender_requests

SHAPES = {  # GPTJConfig arguments; edit layer, loss layer
    "gpt-j-6b": (dict(vocab_size=50400, n_positions=2048, n_embd=4096, n_layer=28, n_head=16,
                      rotary_dim=64), 5, 27),
    "small": (dict(vocab_size=1024, n_positions=256, n_embd=256, n_layer=4, n_head=8,
                   rotary_dim=32), 1, 3),
}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build(shape: str, tokenizer, device: torch.device, dtype: torch.dtype):
    kwargs, layer, loss_layer = SHAPES[shape]
    config = GPTJConfig(**kwargs)
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = GPTJForCausalLM(config).eval()
    finally:
        torch.set_default_dtype(default)
    return wrap_model(model, tokenizer, f"random:{shape}", attn_implementation="eager"), config, \
        layer, loss_layer


def long_documents(n_tokens: int, n_docs: int) -> TextCorpus:
    """Bundled-corpus documents joined into ~``n_tokens``-token documents (the reference's
    Wikipedia text is mostly truncated at the context length)."""
    per_doc = max(1, n_tokens // 16)  # bundled documents are ~16 tokens

    def documents():
        source, doc = iter(bundled_corpus()), []
        for text in source:
            doc.append(text)
            if len(doc) == per_doc:
                yield " ".join(doc)
                doc = []

    return TextCorpus(f"bundled-joined:{n_tokens}:{n_docs}",
                      lambda: itertools.islice(documents(), n_docs))


def edit_figures(lm, hp, templates, requests, chunks, device, config, dtype_name) -> list[dict]:
    rows = []
    for chunk in chunks:
        todo = requests[:chunk]
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        sync(device)
        t0 = time.perf_counter()
        records = compute_edits(lm, todo, hp, templates, engine="batched", chunk_size=chunk,
                                progress=False, early_stop_loss=0.0)
        sync(device)
        seconds = time.perf_counter() - t0
        estimate = estimate_edit_memory(meta_model(config), dtype_name, layer=hp.layer,
                                        loss_layer=hp.v_loss_layer, chunk_size=chunk,
                                        n_prompts=len(templates) + 1)
        row = {"chunk": chunk, "seconds": seconds, "seconds_per_edit": seconds / chunk,
               "step_path": sorted({r.timings["step"] for r in records}),
               "estimate_gib": estimate.device_total / GIB}
        if device.type == "cuda":
            row["peak_gib"] = torch.cuda.max_memory_allocated(device) / GIB
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=list(SHAPES), default="gpt-j-6b")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["float16", "bfloat16", "float32"], default="float16")
    parser.add_argument("--chunks", type=int, nargs="+", default=[8, 16, 32, 64])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--n-simple", type=int, default=4)
    parser.add_argument("--stats-docs", type=int, default=512)
    parser.add_argument("--doc-tokens", type=int, default=1024)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/gpu.json"))
    args = parser.parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    bundled = load_model()  # the tokenizer, and the sampler of the 21 context templates
    hp = ROMEHyperParams(layers=(SHAPES[args.shape][1],), v_loss_layer=SHAPES[args.shape][2],
                         v_num_grad_steps=args.steps, v_lr=0.5, v_weight_decay=0.5,
                         clamp_norm_factor=4, kl_factor=0.0625, mom2_adjustment=False,
                         context_template_length_params=((5, 10), (10, 10)))
    templates = Editor(bundled, hp).context_templates
    requests = gender_requests(balanced_names(load_names(split="edit"), max(args.chunks)))
    result: dict = {"device": torch.cuda.get_device_name(device) if device.type == "cuda"
                    else "cpu", "torch": torch.__version__, "shape": args.shape,
                    "dtype": args.dtype, "steps": args.steps,
                    "n_context_templates": len(templates)}
    t0 = time.perf_counter()
    lm, config, _, _ = build(args.shape, bundled.tokenizer, device, dtype)
    sync(device)
    result["build_seconds"] = time.perf_counter() - t0
    result["parameters"] = sum(p.numel() for p in lm.model.parameters())
    print(json.dumps(result), flush=True)
    # warm-up: CUDA kernels, and the GPT-J kernel's one-time check against the model's forward
    compute_edits(lm, requests[:2], hp, templates, progress=False, early_stop_loss=0.0)
    result["batched"] = edit_figures(lm, hp, templates, requests, args.chunks, device, config,
                                     args.dtype)
    largest = result["batched"][-1]
    result["projected_1000_edits_seconds"] = 1000 * largest["seconds_per_edit"]
    sync(device)
    t0 = time.perf_counter()
    compute_edits(lm, requests[: args.n_simple], hp, templates, engine="simple",
                  progress=False, early_stop_loss=0.0)
    sync(device)
    simple = (time.perf_counter() - t0) / args.n_simple
    result["simple_seconds_per_edit"] = simple
    result["batched_speedup_over_simple"] = simple / largest["seconds_per_edit"]
    print(json.dumps({"simple_seconds_per_edit": simple}), flush=True)
    for name, corpus, batch in (("long documents", long_documents(args.doc_tokens,
                                                                  args.stats_docs), 8),
                                ("bundled documents", bundled_corpus(), 64)):
        sync(device)
        t0 = time.perf_counter()
        stats = compute_second_moment(lm, hp.layer, corpus, n_samples=args.stats_docs,
                                      batch_size=batch, max_length=args.doc_tokens,
                                      progress=False)
        sync(device)
        seconds = time.perf_counter() - t0
        result.setdefault("stats", []).append({
            "corpus": name, "documents": stats.n_documents, "tokens": stats.n_tokens,
            "seconds": seconds, "tokens_per_second": stats.n_tokens / seconds})
        print(json.dumps(result["stats"][-1]), flush=True)
    d_mlp = stats.d_mlp
    spd = torch.randn(d_mlp, d_mlp, device=device, dtype=torch.float32) / d_mlp ** 0.5
    spd = spd @ spd.T + torch.eye(d_mlp, device=device)
    sync(device)
    t0 = time.perf_counter()
    InverseSecondMoment.from_matrix(spd)
    sync(device)
    result["cholesky_seconds"] = time.perf_counter() - t0
    result["d_mlp"] = d_mlp
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1), flush=True)


if __name__ == "__main__":
    main()
