"""Where a paraphrase puts the name decides whether a gender edit reaches it.

    python scripts/measure_paraphrase_position.py --sweep vectors/smollm2-sweep-one-key --n 64 \
        --out docs/real-model/paraphrase_position.json

The study's paraphrases (``{} said that`` → he/she, ``Record for {}:`` → male/female) are asked
bare, as the toy study asks them.  On a tokenizer that adds no start token (SmolLM2's GGUF
tokenizer adds none) the pronoun paraphrase then puts the name at position 0, the sequence's
first token, which on Llama-family models also serves as the attention sink; ROME reads and
writes the name's key in context (after the edit prompt's prefix and the context templates).
This script edits ``--n`` known names of a recorded sweep with that sweep's settings, one at a
time, and asks each paraphrase in three frames, before and after the edit:

* ``bare`` — as the study asks it;
* ``after start token`` — after the tokenizer's start token (its ``bos_token``);
* ``after a sentence`` — after each of three neutral sentences (CounterFact's paraphrase
  prompts also carry a prefix of unrelated text).

It reports, per paraphrase and frame, how often the unedited model answers the name's own
gender (``known``), how often the edit moves the answer to the new gender (``flipped``, by
direction) and the same among the names the unedited model got right in that frame
(``flipped_known``).  The edit prompt is the sweep's; nothing here changes the study's metric.

Then the key: the cosine between each name's ``k*`` (what ROME writes) and its key when the
name opens the text (``k_start``, the layer's key at the name's last token of the bare name),
and a second pass that writes the edit's delta at both keys — the minimum-``C``-norm rank-2
update with ``ΔW k* = v* − W k*`` and ``ΔW k_start = δ`` (ROME's Eq. 2 with two keys) — to see
whether the key at the start of a text is what the pronoun paraphrase misses.  Both passes
also score ``--n-random`` random other names of the sweep on the edit prompt.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rome_edit import Editor  # noqa: E402
from rome_edit.models.architectures import out_proj_weight  # noqa: E402
from rome_edit.models.scoring import choose_between  # noqa: E402
from rome_edit.models.subject import fill  # noqa: E402
from rome_edit.rome.key import keys_and_values  # noqa: E402
from rome_edit.rome.request import EditRequest  # noqa: E402
from rome_edit.study.task import ANSWERS, PARAPHRASES  # noqa: E402

SENTENCES = ("It was a quiet morning. ", "The meeting ended late. ", "Here is the next entry. ")


def frames(start_token: str) -> dict[str, tuple[str, ...]]:
    return {"bare": ("",), "after start token": (start_token,), "after a sentence": SENTENCES}


def answers_of(ed: Editor, names: list[str], questions: dict[str, tuple[str, tuple[str, str]]]
               ) -> dict[str, list[str]]:
    """For each question (template, (female, male) answers): each name's argmax gender."""
    out = {}
    for key, (template, (female, male)) in questions.items():
        pred = choose_between(ed.lm.model, ed.lm.tokenizer, [fill(template, n) for n in names],
                              [female, male])
        out[key] = ["female" if p == 0 else "male" for p in pred.tolist()]
    return out


def rank_two_update(keys: torch.Tensor, residuals: torch.Tensor, c_inv: torch.Tensor
                    ) -> torch.Tensor:
    """The minimum-C-norm ``ΔW`` (d_model × d_mlp) with ``ΔW kᵢ = rᵢ`` for each row pair
    (ROME's Eq. 2 with several keys): ``ΔW = R (K C⁻¹ Kᵀ)⁻¹ K C⁻¹``."""
    ck = c_inv @ keys.T
    return residuals.T @ torch.linalg.solve(keys @ ck, ck.T)


def table_of(questions: dict, before: dict, after: dict, genders: list[str], start: str
             ) -> dict[str, dict[str, float]]:
    n = len(genders)
    new = ["male" if g == "female" else "female" for g in genders]

    def rates(keys: list[str]) -> dict[str, float]:
        pairs = [(k, i) for k in keys for i in range(n)]
        known = [before[k][i] == genders[i] for k, i in pairs]
        out = {"known": sum(known) / len(known)}
        for label, keep in (("flipped", lambda k, i: True),
                            ("flipped_f_to_m", lambda k, i: genders[i] == "female"),
                            ("flipped_m_to_f", lambda k, i: genders[i] == "male"),
                            ("flipped_known", lambda k, i: before[k][i] == genders[i])):
            hits = [after[k][i] == new[i] for k, i in pairs if keep(k, i)]
            out[label] = sum(hits) / len(hits) if hits else float("nan")
        return out

    table = {"edit prompt": rates(["edit prompt"])}
    for template, _ in PARAPHRASES:
        for frame in frames(start):
            table[f"{template} | {frame}"] = rates(
                [k for k in questions if k.startswith(f"{template}|{frame}|")])
    for frame in frames(start):
        table[f"both paraphrases | {frame}"] = rates(
            [k for k in questions if k.split("|")[1:2] == [frame]])
    return table


def sweep_arguments(description: str, random_names: bool = True) -> argparse.ArgumentParser:
    """The arguments the paraphrase diagnostics take (this script,
    ``measure_paraphrase_levers.py``, ``measure_forms_city.py``; ``--n-random`` where the
    script checks random other names)."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--sweep", type=Path, required=True)
    ap.add_argument("--model", default="smollm2-135m-gguf")
    ap.add_argument("--n", type=int, default=64, help="names, half female and half male")
    if random_names:
        ap.add_argument("--n-random", type=int, default=5, help="random other names per edit")
    ap.add_argument("--out", type=Path, required=True)
    return ap


def first_of_each_gender(records: list[dict], n: int) -> list[dict]:
    """The sweep's first ``n // 2`` female and first ``n // 2`` male records."""
    return [r for r in records if r["gender"] == "female"][: n // 2] + \
        [r for r in records if r["gender"] == "male"][: n // 2]


def write_result(out: Path, result: dict) -> None:
    """The diagnostics' result file: indented JSON, its folder made if need be."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")


def read_sweep(sweep: Path, n: int) -> tuple[dict, list[dict], list[dict]]:
    """A recorded sweep's manifest, its records, and the ``n`` of them to edit
    (:func:`first_of_each_gender`)."""
    manifest = json.loads((sweep / "sweep.json").read_text())
    records = [json.loads(line) for line in (sweep / "records.jsonl").open()]
    return manifest, records, first_of_each_gender(records, n)


def main() -> int:
    args = sweep_arguments(__doc__.split("\n\n")[0]).parse_args()
    torch.manual_seed(0)
    rng = random.Random(0)
    manifest, records, picked = read_sweep(args.sweep, args.n)
    prompt = manifest["prompt"]
    names = [r["subject"] for r in picked]
    pool = [r["subject"] for r in records if r["subject"] not in set(names)]
    ed = Editor.from_sweep(args.sweep, args.model, progress=False)
    lm, layer = ed.lm, ed.layer
    start = lm.tokenizer.bos_token or lm.tokenizer.eos_token or ""
    questions: dict[str, tuple[str, tuple[str, str]]] = {
        "edit prompt": (prompt, (ANSWERS["female"], ANSWERS["male"]))}
    for template, answers in PARAPHRASES:
        for frame, prefixes in frames(start).items():
            for i, prefix in enumerate(prefixes):
                questions[f"{template}|{frame}|{i}"] = (prefix + template,
                                                       (answers["female"], answers["male"]))
    edit_q = {"edit prompt": questions["edit prompt"]}
    before = answers_of(ed, names, questions)
    weight = out_proj_weight(lm.model, lm.arch, layer)
    c_inv = ed.solver.solve(torch.eye(weight.shape[1], dtype=torch.float64)).double()
    passes = {"rome": {k: [] for k in questions}, "rome + start key": {k: [] for k in questions}}
    random_kept = {p: [] for p in passes}
    cosines = []
    t0 = time.perf_counter()
    for r in picked:
        record = ed.compute([EditRequest(r["subject"], prompt, r["target"], r["target_true"])])[0]
        k_start = keys_and_values(lm, layer, ["{}"], [r["subject"]])[0][0].double()
        k_star = record.k_star.double()
        cosines.append(float(torch.nn.functional.cosine_similarity(k_star, k_start, 0)))
        others = rng.sample(pool, args.n_random)
        others_before = answers_of(ed, others, edit_q)["edit prompt"]
        residual = record.v_star.double() - weight.double() @ k_star
        updates = {"rome": rank_two_update(k_star[None], residual[None], c_inv),
                   "rome + start key": rank_two_update(
                       torch.stack([k_star, k_start]),
                       torch.stack([residual, record.delta.double()]), c_inv)}
        for name, update in updates.items():
            saved = weight.data.clone()
            weight.data += update.to(weight.dtype)
            try:
                for k, v in answers_of(ed, [r["subject"]], questions).items():
                    passes[name][k] += v
                now = answers_of(ed, others, edit_q)["edit prompt"]
                random_kept[name] += [a == b for a, b in zip(others_before, now)]
            finally:
                weight.data.copy_(saved)
    seconds = time.perf_counter() - t0
    genders = [r["gender"] for r in picked]
    result = {"sweep": str(args.sweep), "model_identity": lm.name, "prompt": prompt,
              "layer": layer, "n": len(names), "start_token": start,
              "sentences": list(SENTENCES), "seconds": seconds,
              "cosine_k_star_k_start": {"mean": statistics.mean(cosines),
                                        "min": min(cosines), "max": max(cosines)},
              "passes": {p: {"table": table_of(questions, before, after, genders, start),
                             "specificity_random": sum(random_kept[p]) / len(random_kept[p])}
                         for p, after in passes.items()}}
    write_result(args.out, result)
    print(f"cos(k*, k_start): mean {statistics.mean(cosines):.3f}")
    for p, res in result["passes"].items():
        print(f"{p}: random-name specificity {res['specificity_random']:.3f}")
        for key, row in res["table"].items():
            print(f"  {key:45s} known {row['known']:.3f}  flipped {row['flipped']:.3f} "
                  f"(F→M {row['flipped_f_to_m']:.3f}, M→F {row['flipped_m_to_f']:.3f}; "
                  f"among known {row['flipped_known']:.3f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
