"""Same seed, same machine: bit-identical deltas and identical reports (timings aside)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors import safe_open
from safetensors.torch import load_file

from rome_edit.cli.main import main

ROOT = Path(__file__).resolve().parents[1]
# timings, and where the statistics cache of each run lives
TIMINGS = {"seconds", "seconds_per_edit", "wall_seconds_this_run", "path"}


def _without_timings(obj):
    if isinstance(obj, dict):
        return {k: _without_timings(v) for k, v in obj.items() if k not in TIMINGS}
    if isinstance(obj, list):
        return [_without_timings(v) for v in obj]
    return obj


def _same_safetensors(a: Path, b: Path) -> bool:
    """Same tensors (bit for bit) and the same metadata.  The files' bytes may still differ:
    safetensors writes the metadata map in an arbitrary order."""
    with safe_open(str(a), "pt") as fa, safe_open(str(b), "pt") as fb:
        return fa.metadata() == fb.metadata() and set(fa.keys()) == set(fb.keys()) and all(
            fa.get_tensor(k).equal(fb.get_tensor(k)) for k in fa.keys())


def _rows(path: Path) -> list[dict]:
    return [_without_timings(json.loads(x)) for x in path.read_text().splitlines() if x]


@pytest.mark.slow
def test_two_sweep_processes_give_identical_stores(tmp_path):
    """Context templates sampled with --seed, statistics computed, deltas optimised: twice."""
    (tmp_path / "hp.json").write_text(json.dumps({
        "layers": [1], "v_loss_layer": 5, "v_num_grad_steps": 5, "mom2_adjustment": True,
        "mom2_dataset": "bundled", "mom2_n_samples": 200,
        "context_template_length_params": [[5, 3]]}))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for run in ("a", "b"):  # separate processes, separate caches: nothing is shared
        done = subprocess.run(
            [sys.executable, "-m", "rome_edit", "sweep", "--limit", "6", "--batch-size", "4",
             "--hparams", str(tmp_path / "hp.json"), "--seed", "7", "--out",
             str(tmp_path / run)], env={**env, "ROME_EDIT_CACHE": str(tmp_path / f"c{run}")},
            capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-2000:]
    a, b = (load_file(str(tmp_path / r / "deltas.safetensors")) for r in "ab")
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)
    assert _rows(tmp_path / "a" / "records.jsonl") == _rows(tmp_path / "b" / "records.jsonl")
    sa, sb = (json.loads((tmp_path / r / "summary.json").read_text()) for r in "ab")
    assert _without_timings(sa) == _without_timings(sb)
    # the manifest records the sampled templates: the same 3 sentences both times
    ma, mb = (json.loads((tmp_path / r / "sweep.json").read_text()) for r in "ab")
    assert len(ma["context_templates"]) == 4
    assert ma["context_templates"] == mb["context_templates"]
    ca, cb = ((tmp_path / f"c{r}").glob("*.safetensors") for r in "ab")
    assert _same_safetensors(next(ca), next(cb))  # the statistics file too


def test_analysis_report_is_reproducible(tmp_path, capsys):
    sweep = ROOT / "vectors" / "bundled-sweep"
    for run in ("a", "b"):
        assert main(["analyze", str(sweep), "--no-model", "--out", str(tmp_path / run)]) == 0
    capsys.readouterr()
    ra, rb = (json.loads((tmp_path / r / "analysis.json").read_text()) for r in "ab")
    assert _without_timings(ra) == _without_timings(rb)
    assert _same_safetensors(tmp_path / "a" / "gender_vector.safetensors",
                             tmp_path / "b" / "gender_vector.safetensors")
