"""Which lever moves the pronoun paraphrase on SmolLM2, and which does not.

    python scripts/measure_paraphrase_levers.py --sweep vectors/smollm2-sweep-one-key --n 64 \
        --out docs/real-model/paraphrase_levers.json

``measure_paraphrase_position.py`` found the study's paraphrase shortfall in one prompt: the
pronoun paraphrase ``{} said that`` asked bare, where female names edited to male keep ``she``.
This script asks what it is about that prompt and whether any setting of the method reaches it.
On ``--n`` known names of a recorded sweep (half female, half male) it measures:

1. **Surface form.** The edit prompt reads the name after a space (`` Mary``); a name that opens
   the text, or follows a newline, is read without one (``Mary``) — for a byte-level BPE
   tokenizer a different token sequence.  The frames are: bare, after the document separator
   (``<|endoftext|>``, what pretraining put between documents), after a newline, and after a
   neutral sentence (the spaced form again).  It also counts the names whose two forms differ.
2. **Levers of the method**, each a pass of one edit per name, scored in every frame, with
   ``--n-random`` random other names kept on the edit prompt: the sweep's settings; δ written at
   2× and 3× (is it strength?); 20 steps; clamp 16; no KL term; 21 context templates
   (ROME's GPT-J setting); layers 1 and 5 (``C`` from the Debian handbook there); and the bare
   surface form written too — a second ``v*`` optimised on the edit prompt with the name unspaced
   (``Name:{}``), both keys written by the minimum-``C``-norm rank-2 update (ROME's Eq. 2 with two
   keys); and that with 20 steps; the text-start form written too — a ``v*`` optimised on the
   edit prompt from the name on (``{}. Gender:``) with no context template, so the name opens
   the text as in a bare paraphrase — alone and with the unspaced form (the forms of
   :mod:`rome_edit.rome.context`, which the toolkit's ``subject_forms`` option writes; here
   they are written by this script's own rank-k solve).  The writes are plain, one name at a
   time, except the two
   ``protected`` passes: they spare every other known name's keys as the preset does (the
   minimum-norm write within the null space of those keys at every prompt token, threshold
   0.01).  Random other names are checked on the edit prompt and on the pronoun read
   unspaced (after the separator), where a write at the unspaced key could reach them.
3. **An upper bound in the value space.**  For each name, a free vector added to the layer's
   MLP output at the bare name's last token, optimised on the bare pronoun prompt itself
   (Adam, lr 0.5, at most 30 steps, norm at most 4× the value there) until the other pronoun
   wins.  It says whether the edited layer *can* carry the pronoun at all; it is a diagnostic
   fitted on the test prompt, not an edit method.
"""

from __future__ import annotations

import dataclasses
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from measure_paraphrase_position import (  # noqa: E402
    answers_of,
    rank_two_update,
    read_sweep,
    sweep_arguments,
    write_result,
)

from rome_edit import Editor  # noqa: E402
from rome_edit.forms.protect import null_space_basis, second_moment_matrix  # noqa: E402
from rome_edit.forms.protected_keys import ProtectedKeyBank  # noqa: E402
from rome_edit.models.architectures import out_proj_weight  # noqa: E402
from rome_edit.models.subject import locate_subjects  # noqa: E402
from rome_edit.rome.context import form_prompt, form_templates  # noqa: E402
from rome_edit.rome.hparams import ROMEHyperParams  # noqa: E402
from rome_edit.rome.request import EditRequest  # noqa: E402
from rome_edit.rome.solver import Solver  # noqa: E402
from rome_edit.study.known import known_names  # noqa: E402
from rome_edit.study.names import load_names  # noqa: E402
from rome_edit.study.task import ANSWERS, PARAPHRASES  # noqa: E402

SEPARATOR = "<|endoftext|>"
FRAMES = {"bare": "", "after the document separator": SEPARATOR, "after a newline": "\n",
          "after a sentence": "It was a quiet morning. "}


@dataclasses.dataclass(frozen=True)
class Pass:
    """One setting: hyperparameter overrides, the scale δ is written at, whether the unspaced
    form is written too, and whether the write spares the other known names' keys (the
    preset's protection: null space of their keys at every prompt token, threshold 0.01)."""

    overrides: dict = dataclasses.field(default_factory=dict)
    scale: float = 1.0
    unspaced: bool = False
    protect: bool = False
    text_start: bool = False


TWENTY = {"v_num_grad_steps": 20}
PASSES: dict[str, Pass] = {
    "sweep settings": Pass(),
    "delta x2": Pass(scale=2.0),
    "delta x3": Pass(scale=3.0),
    "20 steps": Pass(TWENTY),
    "clamp 16, 20 steps": Pass({**TWENTY, "clamp_norm_factor": 16}),
    "no KL term": Pass({"kl_factor": 0.0}),
    "21 context templates": Pass({"context_template_length_params": [[5, 10], [10, 10]]}),
    "layer 1": Pass({"layers": [1]}),
    "layer 5": Pass({"layers": [5]}),
    "unspaced form written too": Pass(unspaced=True),
    "unspaced form too, 20 steps": Pass(TWENTY, unspaced=True),
    "20 steps, protected": Pass(TWENTY, protect=True),
    "text-start form too, 20 steps": Pass(TWENTY, text_start=True),
    "unspaced and text-start forms too, 20 steps": Pass(TWENTY, unspaced=True, text_start=True),
    "unspaced form too, 20 steps, protected": Pass(TWENTY, unspaced=True, protect=True),
}
PROTECT_THRESHOLD = 0.01


def editor_for(sweep: Path, model: str, manifest: dict, overrides: dict) -> Editor:
    hp = dataclasses.replace(ROMEHyperParams.from_dict(manifest["hparams"]), **overrides)
    same_layer = hp.layers == manifest["hparams"]["layers"]
    templates = None if "context_template_length_params" in overrides \
        else manifest["context_templates"]
    stats = manifest["stats"]["path"] if same_layer else None
    return Editor.load(model, hparams=hp, context_templates=templates,
                       stats=stats if stats and Path(stats).is_file() else None,
                       corpus=None if same_layer else "debian-handbook", progress=False)


class Metrics:
    """The metric of each minimum-norm write: ``C⁻¹`` (ROME's), or with the other known names
    protected ``Q (QᵀCQ)⁻¹ Qᵀ`` for the null space ``Q`` of their keys (AlphaEdit's threshold,
    as the preset), so that the write is exact at the edit's keys and ≈ 0 at theirs."""

    def __init__(self, solver: Solver, d_mlp: int, bank: ProtectedKeyBank | None) -> None:
        self.c_inv = solver.solve(torch.eye(d_mlp, dtype=torch.float64)).double()
        self.bank = bank
        self.d_mlp = d_mlp
        if bank is not None:
            self.c = second_moment_matrix(solver, d_mlp)

    def __call__(self, subject: str) -> torch.Tensor:
        if self.bank is None:
            return self.c_inv
        others = self.bank.keys[self.bank.select(subject, 0)]  # "other-names": every other row
        q = null_space_basis(others, PROTECT_THRESHOLD, self.d_mlp)
        return q @ torch.linalg.solve(q.T @ self.c @ q, q.T)


def run_pass(ed: Editor, picked: list[dict], prompt: str, questions: dict, pool: list[str],
             setting: Pass, protect_names: list[str], n_random: int, rng: random.Random
             ) -> dict:
    lm, layer = ed.lm, ed.layer
    weight = out_proj_weight(lm.model, lm.arch, layer)
    bank = ed.protection(prompt, protect_names, positions="all").bank if setting.protect \
        else None
    metric = Metrics(ed.solver, weight.shape[1], bank)
    t0 = time.perf_counter()
    forms = [prompt, form_prompt(prompt, "unspaced")] if setting.unspaced else [prompt]
    records = [ed.compute([EditRequest(r["subject"], p, r["target"], r["target_true"])
                           for r in picked]) for p in forms]
    if setting.text_start:
        # No context template: the key and the value are those of the name opening the text.
        templates = ed.context_templates
        ed.context_templates = form_templates(templates, "text-start")
        try:
            records.append(ed.compute([EditRequest(r["subject"], form_prompt(prompt, "text-start"),
                                                   r["target"], r["target_true"])
                                       for r in picked]))
        finally:
            ed.context_templates = templates
    seconds = time.perf_counter() - t0
    # Other names asked on the edit prompt, and on the pronoun read unspaced (after the
    # separator): a write at the unspaced key could reach other names' unspaced keys.
    others_q = {"edit prompt": questions["edit prompt"],
                "pronoun": questions["{} said that | after the document separator"]}
    after: dict[str, list[str]] = {k: [] for k in questions}
    kept: dict[str, list[bool]] = {k: [] for k in others_q}
    for i, r in enumerate(picked):
        keys = torch.stack([recs[i].k_star.double() for recs in records])
        residuals = torch.stack([recs[i].v_star.double() for recs in records]) \
            - keys @ weight.double().T
        update = rank_two_update(keys, setting.scale * residuals, metric(r["subject"]))
        others = rng.sample(pool, n_random)
        others_before = answers_of(ed, others, others_q)
        saved = weight.data.clone()
        weight.data += update.to(weight.dtype)
        try:
            for k, v in answers_of(ed, [r["subject"]], questions).items():
                after[k] += v
            for k, v in answers_of(ed, others, others_q).items():
                kept[k] += [a == b for a, b in zip(others_before[k], v)]
        finally:
            weight.data.copy_(saved)
    return {"after": after, "specificity_random": sum(kept["edit prompt"]) / len(picked)
            / n_random, "specificity_random_pronoun": sum(kept["pronoun"]) / len(picked)
            / n_random, "compute_seconds": seconds}


def rates(after: list[str], genders: list[str]) -> dict[str, float]:
    new = ["male" if g == "female" else "female" for g in genders]
    hit = [a == b for a, b in zip(after, new)]
    f = [h for h, g in zip(hit, genders) if g == "female"]
    m = [h for h, g in zip(hit, genders) if g == "male"]
    return {"flipped": sum(hit) / len(hit), "flipped_f_to_m": sum(f) / len(f),
            "flipped_m_to_f": sum(m) / len(m)}


def value_bound(ed: Editor, picked: list[dict], template: str, answers: dict[str, str]
                ) -> list[dict]:
    """Per name: can a vector added to the layer's MLP output at the bare name's last token
    turn the pronoun to the other gender (optimised on that prompt; see the module doc)?"""
    lm, layer = ed.lm, ed.layer
    module = lm.model.get_submodule(lm.arch.out_proj.format(layer))
    ids = {g: lm.tokenizer(a, add_special_tokens=False)["input_ids"][-1]
           for g, a in answers.items()}
    for p in lm.model.parameters():
        p.requires_grad_(False)
    out = []
    for r in picked:
        span = locate_subjects(lm.tokenizer, [template], [r["subject"]])[0]
        x = torch.tensor([span.input_ids], device=lm.device)
        want, old = ids[r["target_gender"]], ids[r["gender"]]
        d = torch.zeros(module.out_features, device=lm.device, requires_grad=True)
        base: dict[str, torch.Tensor] = {}

        def add(_m, _i, o, d=d, base=base, pos=span.last):
            base["v"] = o[0, pos].detach()
            o = o.clone()
            o[0, pos] = o[0, pos] + d
            return o

        handle = module.register_forward_hook(add)
        opt = torch.optim.Adam([d], lr=0.5)
        steps = 0
        try:
            for steps in range(31):
                logp = torch.log_softmax(lm.model(x).logits[0, -1].float(), -1)
                if logp[want] > logp[old] or steps == 30:
                    break
                opt.zero_grad()
                (-logp[want]).backward()
                opt.step()
                with torch.no_grad():
                    d.mul_(torch.clamp(4 * base["v"].norm() / d.norm().clamp_min(1e-9), max=1))
        finally:
            handle.remove()
        out.append({"name": r["subject"], "gender": r["gender"],
                    "target_gender": r["target_gender"], "n_tokens": span.end - span.start,
                    "flipped": bool(logp[want] > logp[old]), "steps": steps,
                    "norm": float(d.detach().norm()), "value_norm": float(base["v"].norm())})
    return out


def main() -> int:
    ap = sweep_arguments(__doc__.split("\n\n")[0])
    ap.add_argument("--passes", nargs="*", default=list(PASSES), choices=list(PASSES))
    args = ap.parse_args()
    manifest, records, picked = read_sweep(args.sweep, args.n)
    prompt = manifest["prompt"]
    for r in picked:
        r["target_gender"] = "male" if r["gender"] == "female" else "female"
    names = [r["subject"] for r in picked]
    genders = [r["gender"] for r in picked]
    pool = [r["subject"] for r in records if r["subject"] not in set(names)]
    questions = {"edit prompt": (prompt, (ANSWERS["female"], ANSWERS["male"]))}
    for template, answers in PARAPHRASES:
        for frame, prefix in FRAMES.items():
            questions[f"{template} | {frame}"] = (prefix + template,
                                                 (answers["female"], answers["male"]))
    result: dict = {"sweep": str(args.sweep), "prompt": prompt, "n": len(names),
                    "frames": FRAMES, "passes": {}}
    t_start = time.perf_counter()
    protect_names: list[str] | None = None
    for name in args.passes:
        setting = PASSES[name]
        torch.manual_seed(0)
        ed = editor_for(args.sweep, args.model, manifest, setting.overrides)
        if setting.protect and protect_names is None:
            protect_names = [e.name for e in known_names(ed.lm, load_names()).names]
            result["protected_pool"] = len(protect_names)
        if "known" not in result:
            tok = ed.lm.tokenizer
            result["model_identity"] = ed.lm.name
            result["forms_differ"] = sum(
                tok(n, add_special_tokens=False)["input_ids"]
                != tok(" " + n, add_special_tokens=False)["input_ids"] for n in names) / len(names)
            before = answers_of(ed, names, questions)
            result["known"] = {k: sum(a == g for a, g in zip(v, genders)) / len(v)
                               for k, v in before.items()}
        res = run_pass(ed, picked, prompt, questions, pool, setting, protect_names or [],
                       args.n_random, random.Random(0))
        row = {"layer": ed.layer, **dataclasses.asdict(setting),
               "specificity_random": res["specificity_random"],
               "specificity_random_pronoun": res["specificity_random_pronoun"],
               "compute_seconds": res["compute_seconds"],
               "table": {k: rates(v, genders) for k, v in res["after"].items()}}
        result["passes"][name] = row
        t = row["table"]
        said, said_mid = t["{} said that | bare"], t["{} said that | after a sentence"]
        print(f"{name:28s} random kept {row['specificity_random']:.3f} "
              f"(pronoun {row['specificity_random_pronoun']:.3f}) | edit "
              f"{t['edit prompt']['flipped']:.3f} | said bare {said['flipped']:.3f} "
              f"(F→M {said['flipped_f_to_m']:.3f}) | said after a sentence "
              f"{said_mid['flipped']:.3f} | record bare "
              f"{t['Record for {}: | bare']['flipped']:.3f}", flush=True)
        if name == "sweep settings":
            template, answers = PARAPHRASES[0]
            bound = value_bound(ed, picked, template, answers)
            result["value_bound"] = {
                "template": template, "names": bound,
                "flipped": rates([b["target_gender"] if b["flipped"] else b["gender"]
                                  for b in bound], genders),
                "mean_norm_over_value_norm": sum(b["norm"] / b["value_norm"] for b in bound
                                                 if b["flipped"]) / max(1, sum(b["flipped"]
                                                                              for b in bound))}
            print("value bound on the bare pronoun prompt:", result["value_bound"]["flipped"],
                  flush=True)
    result["seconds"] = time.perf_counter() - t_start
    write_result(args.out, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
