"""The "Beyond ROME" figures on the bundled model (docs/beyond-rome.md), one part at a time.

    python scripts/measure_beyond_rome.py sweep      # faithful vs protected 1,000-name sweeps
    python scripts/measure_beyond_rome.py generalise # protection on neighbours it never saw
    python scripts/measure_beyond_rome.py persist-tune  # the batched form's weights (edit split)
    python scripts/measure_beyond_rome.py persist    # one checkpoint holding ±g for 120 names
    python scripts/measure_beyond_rome.py persist-unseen  # other names never protected
    python scripts/measure_beyond_rome.py degrade    # N = 10, 100, 1,000 edits in one model
    python scripts/measure_beyond_rome.py forensics  # on the persist part's checkpoints
    python scripts/measure_beyond_rome.py forms      # reach and cost of each protection form

Results go to ``docs/beyond-rome/*.json`` (and ``degradation.png``).  ``--limit N`` runs each part
on a few names (a smoke test; its figures mean nothing).  ``degrade`` writes the recorded deltas
of ``vectors/bundled-sweep`` (the faithful sweep: the same ``k*`` and ``v*`` whatever the
update form), so it re-optimises nothing.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import statistics
import time
from pathlib import Path

import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from rome_edit.analysis.concept_vector import load_concept_vector
from rome_edit.api.editor import Editor
from rome_edit.evaluation.evaluate import evaluate_edits, summarize
from rome_edit.forensics.detect import changed_layers, compare_with_targets, identify_edits
from rome_edit.forms.fitted_write import fit_vector_write, write_fitted
from rome_edit.forms.many import DEFAULT_MOM2_WEIGHT, vector_targets, write_edits
from rome_edit.forms.protect import ProtectedDirections, ProtectSettings, second_moment_matrix
from rome_edit.forms.protected_keys import Protection, build_bank, protect_records
from rome_edit.models.layers import layer_output
from rome_edit.models.loading import load_model
from rome_edit.rome.key import keys_and_values
from rome_edit.rome.record import EditRecord
from rome_edit.study.edited_model import model_state, score_model
from rome_edit.study.names import load_names
from rome_edit.study.persisted import default_scale, persist_vector, score_persisted
from rome_edit.study.sweep import run_gender_sweep
from rome_edit.study.task import (
    ANSWERS,
    CITY_FACT,
    EDIT_PROMPT,
    gender_request,
    other_gender,
)
from rome_edit.weights.persist import load_persisted, load_targets
from rome_edit.weights.write import preserved

OUT = Path("docs/beyond-rome")
SWEEP = Path("vectors/bundled-sweep")
GENDER_VECTOR = SWEEP / "analysis" / "gender_vector.safetensors"
SHOWN = ("n_edits", "efficacy", "paraphrase", "specificity", "specificity_same_last_token",
         "specificity_random", "city_kept", "fluency_before", "fluency_after",
         "seconds_per_edit")


def editor() -> Editor:
    """The bundled model with its preset, templates sampled with seed 0, cached statistics."""
    return Editor.load(seed=0, progress=False)


def setup():
    ed = editor()
    return ed.lm, ed.hparams, ed.context_templates, ed.inverse


def write_json(name: str, data: dict) -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / name).write_text(json.dumps(data, indent=1) + "\n")
    print(json.dumps(data, indent=1)[:3000])


def part_sweep(args) -> None:
    """Faithful ROME and protected ROME over the 1,000 recorded-edit names, same run."""
    lm, hp, templates, inverse = setup()
    names = load_names()
    edit = [e for e in names if e.split == "edit"][: args.limit]
    work = Path(args.work)
    out = {}
    runs = (("faithful", None), ("protected", args.protect))
    for label, source in [r for r in runs if args.only in (None, r[0])]:
        folder = work / f"sweep-{label}"
        shutil.rmtree(folder, ignore_errors=True)
        t0 = time.perf_counter()
        protection = None
        if source is not None:
            bank = build_bank(lm, hp.layer, EDIT_PROMPT, [e.name for e in names], templates,
                              source)
            protection = Protection(bank, ProtectSettings(args.protect_form,
                                                          args.protect_weight))
        setup_s = time.perf_counter() - t0
        summary = run_gender_sweep(lm, edit, hp, templates, folder, inverse,
                                   neighbour_names=names, protection=protection, progress=False)
        out[label] = {**{k: summary[k] for k in SHOWN}, "protected_keys_s": setup_s,
                      "protection": summary.get("protection")}
    if args.only is None:
        faithful = load_targets([work / "sweep-faithful"])
        protected = load_targets([work / "sweep-protected"])
        out["delta_max_abs_difference"] = (faithful.delta - protected.delta).abs().max().item()
    else:  # the other run's figures: the recorded faithful sweep
        protected = load_targets([work / "sweep-protected"])
        recorded = load_targets([SWEEP])
        out["faithful_recorded"] = {k: json.loads((SWEEP / "summary.json").read_text())[k]
                                    for k in SHOWN}
        out["delta_max_abs_difference_vs_recorded"] = (
            recorded.subset(len(protected.subjects)).delta - protected.delta).abs().max().item()
    write_json(f"protected_sweep{'' if args.only is None else '_' + args.only}.json", out)


def part_generalise(args) -> None:
    """Protection's weight, and whether it helps neighbours it never saw, scored fast on the
    recorded sweep's edits (their ``k*``, ``v*``; only ``u`` changes): ``all`` protects every
    other name and draws neighbours from all 1,120 (as the sweep part); ``unseen`` protects
    only the other *edit-split* names and scores the 120 held-out names as neighbours (5
    sharing the last token where there are, 5 random) — next to ROME's paper form each time."""
    lm, hp, templates, inverse = setup()
    names = load_names()
    entries = {e.name: e for e in names}
    targets = load_targets([SWEEP], lm).subset(args.limit)
    residual = targets.v_star - layer_output(lm, targets.layer, targets.k_star)
    paper = inverse.solve(targets.k_star.double()).double()
    paper = paper / (paper * targets.k_star.double()).sum(1, keepdim=True)
    records = [EditRecord(gender_request(entries[s]), lm.identity, targets.layer, {},
                          targets.k_star[i], targets.v_orig[i], targets.v_star[i],
                          targets.delta[i], paper[i].float(), residual[i])
               for i, s in enumerate(targets.subjects)]
    everyone = [e.name for e in names]
    pools = {"all": (everyone, everyone),
             "unseen": ([e.name for e in names if e.split == "edit"],
                        [e.name for e in names if e.split == "heldout"])}
    out: dict = {"n_edits": len(records)}
    for pool_name, (protected, neighbours) in pools.items():
        bank = build_bank(lm, targets.layer, EDIT_PROMPT, protected, templates, "other-names")
        out[pool_name] = {"protected_pool": len(protected), "neighbour_pool": len(neighbours)}
        for weight in (None, 0.01, 0.1, 0.3):
            recs = records if weight is None else protect_records(
                lm, records, Protection(bank, ProtectSettings(weight=weight)), inverse)
            summary = summarize(evaluate_edits(lm, recs, neighbour_pool=neighbours,
                                               kept=[CITY_FACT], progress=False))
            key = "paper" if weight is None else f"protected_weight_{weight:g}"
            out[pool_name][key] = {k: summary[k] for k in (
                "efficacy", "paraphrase", "specificity", "specificity_same_last_token",
                "specificity_random", "city_kept")}
            print(pool_name, key, json.dumps(out[pool_name][key]))
    write_json("protection_weights.json", out)


# How each persisted model is written: (label, form, protected positions or None, soft
# protection weight λ, statistics weight λ_C).  The batched row's λ and λ_C were chosen by
# ``persist-tune`` on 120 names of the edit split, never on the held-out names scored here.
PERSIST_RUNS = (
    ("sequential", "sequential", None, 0.01, DEFAULT_MOM2_WEIGHT),
    ("sequential + protect other-names", "sequential", "last", 0.01, DEFAULT_MOM2_WEIGHT),
    ("sequential + protect other-names, every token", "sequential", "all", 0.1,
     DEFAULT_MOM2_WEIGHT),
    ("batched + protect other-names, every token", "batched", "all", 15.0, 0.005),
    ("fitted to each name's response, protect other-names", "fitted", "last", None, None),
)
TUNE_GRID = ((10.0, 0.003), (15.0, 0.005), (10.0, 0.01), (20.0, 0.01), (30.0, 0.01),
             (100.0, 0.03))


def _persist_setup(args):
    lm, hp, templates, inverse = setup()
    names = load_names()
    gv = load_concept_vector(GENDER_VECTOR)
    scale, why = default_scale(GENDER_VECTOR, gv)
    pool = [e.name for e in names]
    banks = {positions: build_bank(lm, gv.layer, EDIT_PROMPT, pool, templates, "other-names",
                                   positions) for positions in ("last", "all")}
    return lm, templates, inverse, names, gv, scale, why, pool, banks


def part_persist(args) -> None:
    """+g and −g written for all held-out names into one saved model each, loaded fresh."""
    lm, templates, inverse, names, gv, scale, why, pool, banks = _persist_setup(args)
    heldout = [e for e in names if e.split == "heldout"][: args.limit]
    before = model_state(lm, pool)
    out: dict = {"vector": str(GENDER_VECTOR), "scale": scale, "scale_source": why,
                 "n_names": len(heldout), "runs": []}
    work = Path(args.work)
    for label, form, positions, weight, mom2 in PERSIST_RUNS:
        for sign in (1, -1):
            tag = label.replace(" + ", "-").replace(", ", "-").replace(" ", "_")
            folder = work / f"persist-{tag}-{sign:+d}"
            shutil.rmtree(folder, ignore_errors=True)
            protection = (Protection(banks[positions], ProtectSettings(weight=weight or 0.01))
                          if positions else None)
            t0 = time.perf_counter()
            with preserved(lm, [gv.layer]):
                persist_vector(lm, [e.name for e in heldout], gv.vector.float() * scale * sign,
                               gv.layer, templates, folder, inverse, form, protection,
                               mom2 or DEFAULT_MOM2_WEIGHT, progress=False,
                               described={"sign": sign, "scale": scale}, sign=sign)
            seconds = time.perf_counter() - t0
            score = score_persisted(folder, before, heldout, sign)
            out["runs"].append({"label": label, "form": form, "protected": positions,
                                "weight": weight if positions else None,
                                "mom2_weight": mom2 if form == "batched" else None,
                                "sign": sign, "write_and_save_s": seconds, **score})
            print(json.dumps(out["runs"][-1]))
    write_json("persisted_vector.json", out)


def part_persist_unseen(args) -> None:
    """Other names kept when only some are protected: 800 of the 1,000 other names (a fixed
    shuffle) are protected, 200 never are; each form writes ±g for the 120 held-out names in
    memory, scored on the unedited model's answers."""
    lm, templates, inverse, names, gv, scale, why, pool, _ = _persist_setup(args)
    heldout = [e for e in names if e.split == "heldout"][: args.limit]
    edited = {e.name for e in heldout}
    others = [n for n in pool if n not in edited]
    random.Random(0).shuffle(others)
    protected, unseen = others[:800], others[800:]
    banks = {positions: build_bank(lm, gv.layer, EDIT_PROMPT, protected, templates,
                                   "other-names", positions) for positions in ("last", "all")}
    before = model_state(lm, pool)
    index = {n: i for i, n in enumerate(pool)}
    rows = []
    for label, form, positions, weight, mom2 in PERSIST_RUNS:
        for sign in (1, -1):
            protection = (Protection(banks[positions], ProtectSettings(weight=weight or 0.01))
                          if positions else None)
            vector = gv.vector.float() * scale * sign
            with preserved(lm, [gv.layer]):
                if form == "fitted":
                    fit = fit_vector_write(lm, gv.layer, EDIT_PROMPT, vector, sorted(edited),
                                           [1 if sign > 0 else 0] * len(edited), protected,
                                           (ANSWERS["female"], ANSWERS["male"]),
                                           inverse)
                    write_fitted(lm, fit, vector)
                else:
                    targets = vector_targets(lm, gv.layer, sorted(edited), vector, templates,
                                             EDIT_PROMPT)
                    write_edits(lm, targets, form, inverse, protection,
                                mom2 or DEFAULT_MOM2_WEIGHT, progress=False)
                after = model_state(lm, pool)
            moved_to = "male" if sign > 0 else "female"
            flips = [after.gender[index[e.name]] == moved_to for e in heldout
                     if e.gender != moved_to]
            kept = {group: sum(after.gender[index[n]] == before.gender[index[n]]
                               for n in names_) / len(names_)
                    for group, names_ in (("protected", protected), ("unseen", unseen))}
            rows.append({"label": label, "sign": sign, "flip": sum(flips) / len(flips),
                         "protected_kept": kept["protected"], "unseen_kept": kept["unseen"]})
            print(json.dumps(rows[-1]))
    write_json("persisted_unseen.json", {"n_protected": len(protected),
                                         "n_unseen": len(unseen), "rows": rows})


def part_persist_tune(args) -> None:
    """The batched every-token form's λ and λ_C, chosen on 120 edit-split names (in memory):
    the highest share of other names kept with both flip rates ≥ 90%."""
    lm, templates, inverse, names, gv, scale, why, pool, banks = _persist_setup(args)
    tune = [e for e in names if e.split == "edit"][: min(120, args.limit)]
    tuned = {e.name for e in tune}
    before = model_state(lm, pool)
    index = {n: i for i, n in enumerate(pool)}
    rows = []
    for weight, mom2 in TUNE_GRID:
        row = {"weight": weight, "mom2_weight": mom2}
        for sign in (1, -1):
            targets = vector_targets(lm, gv.layer, [e.name for e in tune],
                                     gv.vector.float() * scale * sign, templates, EDIT_PROMPT)
            with preserved(lm, [gv.layer]):
                write_edits(lm, targets, "batched", inverse,
                            Protection(banks["all"], ProtectSettings(weight=weight)), mom2,
                            progress=False)
                after = model_state(lm, pool)
            moved_to = "male" if sign > 0 else "female"
            flips = [after.gender[index[e.name]] == moved_to for e in tune
                     if e.gender != moved_to]
            others = [after.gender[i] == before.gender[i] for n, i in index.items()
                      if n not in tuned]
            row[f"flip_{sign:+d}"] = sum(flips) / len(flips)
            row[f"others_kept_{sign:+d}"] = sum(others) / len(others)
        rows.append(row)
        print(json.dumps(row))
    ok = [r for r in rows if min(r["flip_+1"], r["flip_-1"]) >= 0.9]
    best = max(ok, key=lambda r: r["others_kept_+1"] + r["others_kept_-1"]) if ok else None
    write_json("persisted_tuning.json", {"names": [e.name for e in tune], "rows": rows,
                                         "chosen": best})


# (label, form, protected positions or None, soft weight λ, statistics weight λ_C)
DEGRADE_RUNS = (
    ("sequential", "sequential", None, 0.01, DEFAULT_MOM2_WEIGHT),
    ("sequential + protect", "sequential", "last", 0.01, DEFAULT_MOM2_WEIGHT),
    ("batched", "batched", None, 0.01, DEFAULT_MOM2_WEIGHT),
    ("batched + protect", "batched", "last", 0.01, DEFAULT_MOM2_WEIGHT),
    ("batched + protect every token", "batched", "all", 15.0, 0.005),
)


def part_degrade(args) -> None:
    """N edits from the recorded sweep written into one model, five ways."""
    lm, hp, templates, inverse = setup()
    names = load_names()
    pool = [e.name for e in names]
    rows = [json.loads(line) for line in (SWEEP / "records.jsonl").read_text().splitlines()]
    gender = {r["subject"]: r["gender"] for r in rows}
    everything = load_targets([SWEEP], lm)
    banks = {positions: build_bank(lm, hp.layer, EDIT_PROMPT, pool, templates, "other-names",
                                   positions) for positions in ("last", "all")}
    sizes = [n for n in (10, 100, 1000) if n <= args.limit]
    n_gen = 10
    before = model_state(lm, pool, [r["subject"] for r in rows[:n_gen]])
    table = []
    for n in sizes:
        targets = everything.subset(n)
        goal = {s: other_gender(gender[s]) for s in targets.subjects}
        for label, form, positions, weight, mom2 in DEGRADE_RUNS:
            protection = (Protection(banks[positions], ProtectSettings(weight=weight))
                          if positions else None)
            with preserved(lm, [hp.layer]):
                res = write_edits(lm, targets, form, inverse, protection, mom2,
                                  progress=False)
                after = model_state(lm, pool, targets.subjects[:n_gen])
            score = score_model(lm, before, after, goal)
            table.append({"n": n, "label": label, "form": form,
                          "protected": positions is not None, "positions": positions,
                          "weight": weight if positions else None,
                          "mom2_weight": mom2 if form == "batched" else None,
                          "write_s": res.seconds, "delta_w_norm": res.delta_w_norm,
                          **score.to_dict()})
            print(json.dumps(table[-1]))
    write_json("degradation.json", {"runs": [list(r) for r in DEGRADE_RUNS], "rows": table})
    plot_degradation(table, OUT / "degradation.png")


def plot_degradation(table: list[dict], path: Path) -> None:
    fig = Figure(figsize=(11, 3.4))
    metrics = ("efficacy", "specificity", "city_kept", "fluency_after")
    styles = {"sequential": ("-", "tab:red"), "sequential + protect": ("-", "tab:blue"),
              "batched": ("--", "tab:red"), "batched + protect": ("--", "tab:blue"),
              "batched + protect every token": ("--", "tab:green")}
    for ax, metric in zip(fig.subplots(1, len(metrics)), metrics):
        for label, (style, colour) in styles.items():
            pts = [(r["n"], r[metric]) for r in table if r["label"] == label]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], style, color=colour,
                    marker="o", label=label)
        ax.set_xscale("log")
        ax.set_xlabel("edits in one model")
        ax.set_title(metric.replace("_", " "))
    fig.axes[0].legend(fontsize=7)
    fig.suptitle("bundled toy GPT-J, layer 1: N recorded gender edits written together")
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=110, bbox_inches="tight")


def part_forensics(args) -> None:
    """Name the edited subjects of the persist part's checkpoints among all bundled names."""
    ed = editor()
    original, templates, solver = ed.lm, ed.context_templates, ed.solver
    pool = [e.name for e in load_names()]
    out = []
    for folder in sorted(Path(args.work).glob("persist-*")):
        meta, targets = load_persisted(folder)
        edited = load_model(folder)
        t0 = time.perf_counter()
        changes = changed_layers(edited, original)
        found = [f for c in changes for f in identify_edits(edited, original, c, pool,
                                                             meta["prompt"], templates, solver)]
        out.append({"checkpoint": folder.name, "layers": [c.to_dict() for c in changes],
                    "seconds": time.perf_counter() - t0,
                    **compare_with_targets(found, targets.subjects, targets.delta)})
        print(json.dumps(out[-1])[:600])
    write_json("forensics.json", {"candidates": len(pool), "checkpoints": out})


def part_forms(args) -> None:
    """Each protection form on every 25th recorded edit: how far the update reaches other
    names (``r = uᵀk / uᵀk*`` at their bare-prompt keys; the layer moves by ``r·(v* − W k*)``)
    and what it costs at average tokens (``uᵀCu`` over ROME's paper-form ``u``)."""
    lm, hp, templates, inverse = setup()
    pool = [e.name for e in load_names()]
    everything = load_targets([SWEEP], lm)
    bank = build_bank(lm, hp.layer, EDIT_PROMPT, pool, templates, "other-names")
    k_bare, _ = keys_and_values(lm, hp.layer, [EDIT_PROMPT] * len(pool), pool)
    c = second_moment_matrix(inverse, bank.keys.shape[1])
    index = {n: i for i, n in enumerate(pool)}
    toks = bank.last_tokens
    rows = []
    for form, weight, threshold, scope in (
            ("paper", 0.0, 0.0, "-"), ("hard", 0.0, 0.0, "same-last-token"),
            ("soft", 0.01, 0.0, "other-names"), ("soft", 0.1, 0.0, "other-names"),
            ("soft", 1.0, 0.0, "other-names"), ("soft", 100.0, 0.0, "other-names"),
            ("null-space", 0.0, 1e-2, "other-names"), ("null-space", 0.0, 1e-3, "other-names")):
        settings = ProtectSettings("hard" if form == "paper" else form, weight or 1.0,
                                   threshold or 1e-2)
        dirs = ProtectedDirections(bank.keys, settings, inverse)
        own, same, cost = [], [], []
        for i in range(0, len(everything.subjects), 25)[: args.limit]:
            j, k = index[everything.subjects[i]], everything.k_star[i]
            paper = inverse.solve(k[None].double())[0]
            paper = paper / (paper @ k.double())
            keep = [q for q in range(len(pool)) if q != j and
                    (scope == "other-names" or toks[q] == toks[j])] if form != "paper" else []
            u = dirs.direction(k, torch.tensor(keep, dtype=torch.long)).double()
            own.append((u @ k_bare[j].double()).item())
            same += [(u @ k_bare[q].double()).item() for q in range(len(pool))
                     if toks[q] == toks[j] and q != j]
            cost.append(((u @ c @ u) / (paper @ c @ paper)).item())
        rows.append({"form": form, "weight": weight or None, "threshold": threshold or None,
                     "protected": scope, "n_edits": len(own),
                     "self_ratio_median": statistics.median(own),
                     "same_last_token_share_above_half":
                         sum(abs(r) > 0.5 for r in same) / max(1, len(same)),
                     "same_last_token_ratio_median": statistics.median(same),
                     "cost_median": statistics.median(cost), "cost_max": max(cost)})
        print(json.dumps(rows[-1]))
    write_json("forms.json", {"rows": rows})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("part", choices=["sweep", "generalise", "persist", "persist-tune",
                                         "persist-unseen",
                                         "degrade", "forensics", "forms"])
    parser.add_argument("--only", choices=["faithful", "protected"], default=None,
                        help="sweep part: run only one of the two sweeps")
    parser.add_argument("--protect", default="other-names",
                        help="sweep part: the protected set (other-names, same-last-token, FILE)")
    parser.add_argument("--protect-form", default="auto", help="sweep part: protection form")
    parser.add_argument("--protect-weight", type=float, default=0.1,
                        help="sweep part: soft protection weight λ")
    parser.add_argument("--limit", type=int, default=10_000, help="fewer names (smoke test)")
    parser.add_argument("--work", default="/tmp/rome-edit-beyond",
                        help="where sweeps and checkpoints are written")
    args = parser.parse_args()
    torch.set_grad_enabled(True)
    {"sweep": part_sweep, "generalise": part_generalise, "persist": part_persist,
     "persist-tune": part_persist_tune, "persist-unseen": part_persist_unseen,
     "degrade": part_degrade,
     "forensics": part_forensics, "forms": part_forms}[args.part](args)


if __name__ == "__main__":
    main()
