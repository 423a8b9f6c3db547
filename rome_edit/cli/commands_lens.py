"""``rome-edit lens`` (logit lens, before/after an edit) and ``rome-edit neurons`` (neuron
importance); ``rome-edit linearize`` is in :mod:`rome_edit.cli.commands_linearize`.

Arguments are validated (records, vectors, targets, layers) before ``--out`` is created.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from rome_edit.analysis.concept_vector import load_concept_vector
from rome_edit.api.editor import Editor
from rome_edit.cli.common import add_model_args, model_from_args
from rome_edit.evaluation.vectors import SubjectKeys
from rome_edit.inspection.lens import compare_lens, logit_lens
from rome_edit.inspection.lens_plots import plot_lens, plot_lens_comparison
from rome_edit.inspection.neuron_overlap import key_preimage, rank_agreement, top_k_overlap
from rome_edit.inspection.neuron_plots import plot_neurons
from rome_edit.inspection.neurons import trace_neurons
from rome_edit.models.architectures import out_proj_weight
from rome_edit.models.identity import check_same_model
from rome_edit.models.loading import LoadedModel
from rome_edit.models.scoring import single_token_id
from rome_edit.rome.key import key_star
from rome_edit.rome.record import EditRecord
from rome_edit.tracing.core import as_template
from rome_edit.tracing.noise import DEFAULT_NOISE, NoiseSpec, resolve_noise
from rome_edit.tracing.trace import DEFAULT_SAMPLES, DEFAULT_SEED
from rome_edit.weights.write import applied, check_record


def _editing_context_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--hparams", default=None, help="hparams JSON (default: the model's preset)")
    p.add_argument("--context-templates", default=None, help="JSON list of templates")
    p.add_argument("--stats", default=None, help="second-moment file (default: cached)")
    p.add_argument("--template-seed", type=int, default=0,
                   help="seed for sampling context templates (default 0, as 'edit' uses)")


def register(subparsers: argparse._SubParsersAction) -> None:
    lens = subparsers.add_parser("lens", help="logit lens of a prompt, optionally before/after "
                                 "an edit or a vector")
    lens.add_argument("--prompt", required=True, help="the text to read, e.g. 'Name: "
                      "Brittany. Gender:'")
    lens.add_argument("--target", action="append", default=[],
                      help="single-token answer to follow (repeatable), e.g. ' Female'")
    what = lens.add_mutually_exclusive_group()
    what.add_argument("--edit", type=Path, default=None,
                      help="edit record directory ('rome-edit edit --out'): lens before/after")
    what.add_argument("--vector", type=Path, default=None,
                      help="vector file ('rome-edit analyze'): written in at --subject")
    lens.add_argument("--subject", default=None, help="with --vector: the subject in --prompt")
    lens.add_argument("--scale", type=float, default=1.0, help="with --vector: multiply it")
    lens.add_argument("--out", required=True, type=Path)
    _editing_context_args(lens)
    add_model_args(lens)
    lens.set_defaults(func=run_lens)

    neu = subparsers.add_parser("neurons", help="indirect effect of every MLP neuron (causal "
                                "tracing per key coordinate) and gradient attributions")
    neu.add_argument("--prompt", required=True, help="template with '{}', e.g. 'Name: {}. "
                     "Gender:'")
    neu.add_argument("--subject", required=True)
    neu.add_argument("--answer", default=None, help="default: the model's top prediction")
    neu.add_argument("--noise", default=DEFAULT_NOISE, help="as in 'trace' (default 3x)")
    neu.add_argument("--samples", type=int, default=DEFAULT_SAMPLES)
    neu.add_argument("--seed", type=int, default=DEFAULT_SEED)
    neu.add_argument("--layers", default=None, help="comma-separated layers (default: all)")
    neu.add_argument("--method", choices=["fast", "plain"], default="fast")
    neu.add_argument("--max-batch", type=int, default=None)
    neu.add_argument("--top-k", type=int, default=50, help="k of the top-k overlaps")
    neu.add_argument("--edit", type=Path, default=None,
                     help="edit record: compare with its u = C⁻¹k* (default: computed)")
    neu.add_argument("--edit-layer", type=int, default=None,
                     help="layer to relate to the edit (default: the record's or the preset's)")
    neu.add_argument("--vector", type=Path, default=None,
                     help="vector file: compare with its key-space preimage W⁺g")
    neu.add_argument("--out", required=True, type=Path)
    _editing_context_args(neu)
    add_model_args(neu)
    neu.set_defaults(func=run_neurons)


def _load_record(lm: LoadedModel, path: Path) -> EditRecord:
    record = EditRecord.load(path)
    check_record(lm, record)
    return record


def _editor(lm: LoadedModel, args: argparse.Namespace, layer: int) -> Editor:
    """The editor at ``layer`` the arguments describe (templates sampled with
    ``--template-seed``)."""
    return Editor.from_loaded(lm, hparams=args.hparams, layer=layer,
                              context_templates=args.context_templates,
                              seed=args.template_seed, stats=args.stats)


def _vector_edit(lm: LoadedModel, args: argparse.Namespace, prompt: str, subject: str):
    """The context manager writing ``scale·g`` at ``subject`` (reference-form rank-one)."""
    cv = load_concept_vector(args.vector, expected_width=lm.model.config.hidden_size)
    check_same_model(lm, cv.model_identity, str(args.vector),
                     "pass --model for the model the vector came from.")
    ed = _editor(lm, args, cv.layer)
    keys = SubjectKeys(lm, cv.layer, [subject], as_template(prompt, subject),
                       ed.context_templates, ed.inverse)
    return keys.written(cv.vector * args.scale), cv


def run_lens(args: argparse.Namespace) -> int:
    lm = model_from_args(args)
    targets = list(args.target)
    for t in targets:
        single_token_id(lm.tokenizer, t)
    if args.vector is not None and not args.subject:
        raise ValueError("--vector needs --subject (the name in --prompt to write it at).")
    modification, description = None, ""
    if args.edit is not None:
        record = _load_record(lm, args.edit)
        req = record.request
        targets = targets or [t for t in (req.target_new, req.target_true) if t]
        modification = applied(lm, [record])
        description = f"edit {req.subject!r} -> {req.target_new!r} at layer {record.layer}"
    elif args.vector is not None:
        if not targets:
            raise ValueError("with --vector pass the answers to follow, e.g. --target ' Female' "
                             "--target ' Male'.")
        modification, cv = _vector_edit(lm, args, args.prompt, args.subject)
        description = (f"vector {args.vector.name} x{args.scale:g} at {args.subject!r}, "
                       f"layer {cv.layer}")
    args.out.mkdir(parents=True, exist_ok=True)
    if modification is None:
        result = logit_lens(lm, args.prompt, targets)
        payload = result.to_json()
        plot_lens(result, args.out)
        for t in targets:
            print(f"{t!r}: top-1 at the last token from layer {result.first_top1(t)} "
                  f"(first top-1 at layer {result.first_ever_top1(t)})")
    else:
        comp = compare_lens(lm, args.prompt, modification, targets, description)
        payload = comp.to_json()
        plot_lens_comparison(comp, args.out)
        print(description)
        for t in targets:
            flips = {o: comp.first_flip(t, o) for o in targets if o != t}
            print(f"{t!r}: top-1 at the last token from layer {comp.before.first_top1(t)} "
                  f"before, {comp.after.first_top1(t)} after"
                  + "".join(f"; first beats {o!r} where it used to lose: layer {f}"
                            for o, f in flips.items()))
    (args.out / "lens.json").write_text(json.dumps(payload, indent=1) + "\n")
    print(f"wrote {args.out}/lens.json and heatmaps")
    return 0


def _layers(text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--layers {text!r} must be comma-separated integers, e.g. 0,1,2."
                         ) from None


def run_neurons(args: argparse.Namespace) -> int:
    lm = model_from_args(args)
    NoiseSpec.parse(args.noise)
    if args.samples < 1 or args.top_k < 1:
        raise ValueError("--samples and --top-k must be at least 1.")
    layers = _layers(args.layers)
    template = as_template(args.prompt, args.subject)
    record = _load_record(lm, args.edit) if args.edit is not None else None
    edit_layer = (args.edit_layer if args.edit_layer is not None else
                  record.layer if record is not None else
                  Editor.from_loaded(lm, hparams=args.hparams).layer)
    vector_ctx = None
    if args.vector is not None:
        vector_ctx = load_concept_vector(args.vector, expected_width=lm.model.config.hidden_size)
        check_same_model(lm, vector_ctx.model_identity, str(args.vector),
                         "pass --model for the model the vector came from.")
    std = resolve_noise(lm, args.noise, template, [args.subject])
    result = trace_neurons(lm, template, args.subject, args.answer, noise_std=std,
                           samples=args.samples, seed=args.seed, layers=layers,
                           method=args.method, max_batch=args.max_batch)
    mask = result.traced_mask()
    if layers is not None:
        chosen = torch.zeros(mask.shape[0], dtype=torch.bool)
        chosen[layers] = True
        mask &= chosen[:, None]
    effects = result.effects[mask]
    k = args.top_k
    report: dict = {**result.summary(), "noise": str(args.noise), "edit_layer": edit_layer,
                    "agreement": {
                        "attribution_patching": rank_agreement(
                            effects, result.attribution[mask], k).to_json(),
                        "grad_x_act_clean": rank_agreement(
                            effects, result.grad_x_act[mask], k).to_json()}}
    report["edit_relation"] = _edit_relation(lm, args, result, template, record, vector_ctx,
                                             edit_layer, k)
    result.save(args.out)
    (args.out / "neurons.json").write_text(json.dumps(report, indent=1) + "\n")
    plot_neurons(result, args.out)
    a = report["agreement"]["attribution_patching"]
    print(f"p_clean {result.p_clean:.4f}  p_corrupt {result.p_corrupt:.4f}  "
          f"({mask.sum().item()} traced (layer, token) cells x {result.effects.shape[-1]} "
          "neurons)")
    print(f"indirect effect vs gradient x Δactivation: Spearman {a['spearman']:.3f}, "
          f"top-{a['k']} |overlap| {a['top_k_overlap_abs']:.2f} (chance {a['chance']:.4f})")
    for name, row in report["edit_relation"].get("overlaps", {}).items():
        pair = (name.replace(" vs ", f"| vs top-{k} |") if " vs " in name
                else f"IE| vs top-{k} |{name}")
        print(f"edit layer {edit_layer}: top-{k} |{pair}|: {row['top_k_overlap']:.2f} "
              f"(chance {row['chance']:.3f})")
    print(f"wrote {args.out}/neurons.json, neurons.safetensors and heatmaps")
    return 0


def _edit_relation(lm, args, result, template, record, vector, layer, k) -> dict:
    """Top-k overlaps, at (edit layer, last subject token), of |IE| with |u| and |W⁺g|."""
    if not 0 <= layer < lm.n_layers:
        raise ValueError(f"--edit-layer {layer} is out of range (0..{lm.n_layers - 1}).")
    token = result.subject_end - 1
    ie = result.effects[layer, token].abs()
    if not ie.any():
        return {"note": f"layer {layer} was not traced"}
    directions: dict[str, torch.Tensor] = {}
    if record is not None:
        directions["u = C^-1 k* (record)"] = record.u
    else:
        ed = _editor(lm, args, layer)
        k_star = key_star(lm, layer, template, args.subject, ed.context_templates)
        inverse = ed.inverse
        directions["u = C^-1 k*" if inverse is not None else "k* (no mom2)"] = (
            inverse.solve(k_star) if inverse is not None else k_star)
    if vector is not None:
        w = out_proj_weight(lm.model, lm.arch, layer).detach()
        w = w.T if lm.arch.out_proj_transposed else w
        directions["W+ g (vector)"] = key_preimage(w, vector.vector.to(w.device)).cpu()
    k = min(k, ie.numel())
    overlaps = {}
    for name, d in directions.items():
        mag = d.abs().double().cpu()
        overlaps[name] = {"top_k_overlap": top_k_overlap(ie, mag, k), "k": k,
                          "chance": k / ie.numel(),
                          "spearman_abs": rank_agreement(ie, mag, k).spearman,
                          "attribution_top_k_overlap": top_k_overlap(
                              result.attribution[layer, token].abs(), mag, k)}
    if len(directions) == 2:
        a, b = (d.abs() for d in directions.values())
        overlaps["u vs W+ g"] = {"top_k_overlap": top_k_overlap(a, b, k), "k": k,
                                 "chance": k / ie.numel(),
                                 "spearman_abs": rank_agreement(a, b, k).spearman}
    return {"layer": layer, "token": token, "token_text": result.tokens[token],
            "attribution_agreement_here": rank_agreement(
                result.effects[layer, token], result.attribution[layer, token], k).to_json(),
            "overlaps": overlaps}
