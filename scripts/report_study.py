"""Every figure of a gender sweep and its analysis, as Markdown (docs/real-model.md).

    python scripts/report_study.py SWEEP_DIR ANALYSIS_DIR
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def pct(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:.1f}%"


def by_gender(rows: list[dict], key: str) -> str:
    parts = []
    for g in ("female", "male"):
        vals = [r[key] for r in rows if r["gender"] == g and r.get(key) is not None]
        parts.append(f"{g} {pct(sum(vals) / len(vals)) if vals else '—'} (n {len(vals)})")
    return ", ".join(parts)


def main() -> None:
    sweep, analysis = Path(sys.argv[1]), Path(sys.argv[2])
    s = json.loads((sweep / "summary.json").read_text())
    rows = [json.loads(line) for line in (sweep / "records.jsonl").read_text().splitlines()]
    a = json.loads((analysis / "analysis.json").read_text())
    sel = s.get("selection", {})
    print(f"sweep: {s['n_edits']} edits at layer {s['layer']}, {s['seconds_per_edit']:.2f} s/edit; "
          f"known-only {sel.get('n_right')} of {sel.get('n_tested')} tested names right "
          f"(female {pct(sel.get('accuracy_female'))}, male {pct(sel.get('accuracy_male'))})")
    print("| metric | all | by original gender |\n|---|---|---|")
    for key in ("efficacy", "paraphrase", "specificity", "specificity_random",
                "specificity_same_last_token", "city_kept"):
        print(f"| {key} | {pct(s.get(key))} | {by_gender(rows, key)} |")
    print(f"| fluency (bits) | {s['fluency_before']:.2f} → {s['fluency_after']:.2f} | |")
    print(f"| mean p(new) | {s['mean_p_new_before']:.3f} → {s['mean_p_new_after']:.3f} | |")
    print(f"| mean ‖δ‖, ‖v_orig‖ | {s['mean_delta_norm']:.1f}, {s['mean_v_orig_norm']:.1f} | |")
    c = a["classifier"]
    print(f"\nclassifier test accuracy {c['test_accuracy']:.3f} (shuffled labels "
          f"{c['shuffled_test_accuracy']:.3f}); vector norm {a['vector']['norm']:.2f}")
    if "heldout" not in a:
        return
    h = a["heldout"]
    print(f"held-out: n {h['n']}, baseline accuracy {pct(h['baseline_accuracy'])}; "
          f"heldout_selection {a.get('heldout_selection')}")
    for mode in ("weights", "activations"):
        v, k = a[f"vector_{mode}"], a[f"control_{mode}"]
        print(f"\n{mode}: vector F→M {pct(v['flip_f_to_m'])}, M→F {pct(v['flip_m_to_f'])}, "
              f"keep M {pct(v['keep_m'])}, keep F {pct(v['keep_f'])}, paraphrase F→M "
              f"{pct(v['paraphrase_flip_f_to_m'])}, M→F {pct(v['paraphrase_flip_m_to_f'])}; "
              f"random: F→M {pct(k['flip_f_to_m']['mean'])}, M→F "
              f"{pct(k['flip_m_to_f']['mean'])}")
        for verdict in a[f"verdict_{mode}"]:
            print(f"  verdict {verdict}")
    curves = a["scale_curves"]
    print(f"\nscales {curves['scales']}; control rates {curves['control_rates']}")
    for name, tables in curves["directions"].items():
        cells = "; ".join(f"{sc}×: F→M {pct(t['flip_f_to_m'])} M→F {pct(t['flip_m_to_f'])} "
                          f"keepM {pct(t['keep_m'])} keepF {pct(t['keep_f'])}"
                          for sc, t in zip(curves["scales"], tables))
        print(f"  {name}: {cells}")
    print(f"best_scale {a.get('best_scale')}")
    print(f"best_informative_scale {a.get('best_informative_scale')}")


if __name__ == "__main__":
    main()
