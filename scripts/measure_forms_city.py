"""What writing the name's other spellings costs the name's other facts, frame by frame.

    python scripts/measure_forms_city.py --sweep vectors/smollm2-sweep-one-key --n 32 \
        --out docs/real-model/forms_city.json

The study checks that an edit keeps the name's city on ``{} lives in the city of`` — asked bare,
so the name opens the text.  A one-key edit barely reaches a name there (that is why its bare
paraphrases lag), so a bare "city kept" figure says little about what the edit does to the name
where it *does* reach it.  This script edits ``--n`` known names of a recorded sweep (half
female, half male; one edit at a time, plain writes, the sweep's prompt, templates and ``C``)
under several settings — one key, the subject forms of :mod:`rome_edit.rome.context` at a few
step counts and clamps, and the forms with ``v*`` fitted to other wordings too
(``fit_phrasings``) — and asks, bare and after a neutral sentence (the name spaced, as
the edit prompt reads it), both the gender paraphrases and the city, counting for the city the
share of names whose first-token argmax among the study's cities is unchanged.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from measure_paraphrase_position import (  # noqa: E402
    answers_of,
    read_sweep,
    sweep_arguments,
    write_result,
)

from rome_edit import Editor  # noqa: E402
from rome_edit.models.scoring import next_token_logprobs  # noqa: E402
from rome_edit.models.subject import fill  # noqa: E402
from rome_edit.rome.request import EditRequest  # noqa: E402
from rome_edit.study.task import ANSWERS, CITY_FACT, PARAPHRASES  # noqa: E402
from rome_edit.weights.write import applied  # noqa: E402

FRAMES = {"bare": "", "after a sentence": "It was a quiet morning. "}
# Other wordings v* is fitted to (hparams fit_phrasings); neither is an evaluated paraphrase.
IS_MY = {"prompt": "{} is my", "answers": {" Male": " brother", " Female": " sister"}}
BORN_A = {"prompt": "{} was born a", "answers": {" Male": " boy", " Female": " girl"}}
SETTINGS: dict[str, dict] = {
    "one key, 8 steps (the first recording)": {"v_num_grad_steps": 8},
    "one key, 20 steps": {"v_num_grad_steps": 20},
    "forms, 8 steps": {"v_num_grad_steps": 8, "subject_forms": ("unspaced", "text-start")},
    "forms, 20 steps": {"v_num_grad_steps": 20, "subject_forms": ("unspaced", "text-start")},
    "forms, 20 steps, clamp 2": {"v_num_grad_steps": 20, "clamp_norm_factor": 2,
                                 "subject_forms": ("unspaced", "text-start")},
    "forms, 20 steps, clamp 1": {"v_num_grad_steps": 20, "clamp_norm_factor": 1,
                                 "subject_forms": ("unspaced", "text-start")},
    "forms, 8 steps, fitted to 'is my' too": {
        "v_num_grad_steps": 8, "subject_forms": ("unspaced", "text-start"),
        "fit_phrasings": [IS_MY]},
    "forms, 8 steps, fitted to 'was born a' and 'is my' too": {
        "v_num_grad_steps": 8, "subject_forms": ("unspaced", "text-start"),
        "fit_phrasings": [BORN_A, IS_MY]},
}
# Each setting is the recorded sweep's hparams with the changes it lists; one key and no fit
# phrasing unless it lists them (the sweep's own may have both).
UNSET = {"subject_forms": (), "fit_phrasings": ()}


def city_of(ed: Editor, names: list[str], template: str) -> list[int]:
    """Each name's argmax city first token (as the sweep's ``city_kept`` compares them)."""
    tok = ed.lm.tokenizer
    firsts = torch.tensor(sorted({tok(c, add_special_tokens=False)["input_ids"][0]
                                  for c in CITY_FACT.candidates}))
    lp = next_token_logprobs(ed.lm.model, tok, [fill(template, n) for n in names])
    return firsts[lp[:, firsts].argmax(-1)].tolist()


def main() -> int:
    ap = sweep_arguments(__doc__.split("\n\n")[0], random_names=False)
    ap.add_argument("--settings", nargs="*", default=list(SETTINGS), choices=list(SETTINGS))
    args = ap.parse_args()
    manifest, _, picked = read_sweep(args.sweep, args.n)
    prompt = manifest["prompt"]
    names = [r["subject"] for r in picked]
    new = ["male" if r["gender"] == "female" else "female" for r in picked]
    ed = Editor.from_sweep(args.sweep, args.model, progress=False)
    base_hp = ed.hparams
    questions = {f"{t} | {f}": (p + t, (a["female"], a["male"]))
                 for t, a in PARAPHRASES for f, p in FRAMES.items()}
    questions["edit prompt"] = (prompt, (ANSWERS["female"], ANSWERS["male"]))
    cities = {f: city_of(ed, names, p + CITY_FACT.prompt) for f, p in FRAMES.items()}
    result: dict = {"sweep": str(args.sweep), "prompt": prompt, "n": len(names),
                    "frames": FRAMES, "settings": {}}
    t_start = time.perf_counter()
    for label in args.settings:
        torch.manual_seed(0)
        ed.hparams = dataclasses.replace(base_hp, **{**UNSET, **SETTINGS[label]})
        t0 = time.perf_counter()
        recs = ed.compute([EditRequest(r["subject"], prompt, r["target"], r["target_true"])
                           for r in picked])
        seconds = time.perf_counter() - t0
        flipped: dict[str, list[bool]] = {k: [] for k in questions}
        kept: dict[str, list[bool]] = {f: [] for f in FRAMES}
        for i, rec in enumerate(recs):
            with applied(ed.lm, [rec]):
                for k, v in answers_of(ed, [names[i]], questions).items():
                    flipped[k].append(v[0] == new[i])
                for f, p in FRAMES.items():
                    kept[f].append(city_of(ed, [names[i]], p + CITY_FACT.prompt)[0]
                                   == cities[f][i])
        row = {"hparams": {k: list(v) if isinstance(v, tuple) else v
                           for k, v in SETTINGS[label].items()},
               "compute_seconds": seconds,
               "flipped": {k: sum(v) / len(v) for k, v in flipped.items()},
               "city_kept": {f: sum(v) / len(v) for f, v in kept.items()},
               "mean_delta_over_v_orig": sum(float(r.delta.norm() / r.v_orig.norm())
                                             for r in recs) / len(recs)}
        for f in FRAMES:
            row[f"both paraphrases | {f}"] = sum(row["flipped"][f"{t} | {f}"]
                                                 for t, _ in PARAPHRASES) / len(PARAPHRASES)
        result["settings"][label] = row
        print(f"{label:40s} edit {row['flipped']['edit prompt']:.3f} | both bare "
              f"{row['both paraphrases | bare']:.3f} after a sentence "
              f"{row['both paraphrases | after a sentence']:.3f} | city kept bare "
              f"{row['city_kept']['bare']:.3f} after a sentence "
              f"{row['city_kept']['after a sentence']:.3f} | {seconds:.0f} s", flush=True)
    result["seconds"] = time.perf_counter() - t_start
    write_result(args.out, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
