"""Sweeps: resumable with nothing lost or duplicated, and a store that refuses mixing."""

import json
from pathlib import Path

import pytest
import torch
from concepts import CITY, JOB, LABELLED, SUBJECTS
from safetensors.torch import load_file

import rome_edit.evaluation.sweep as sweep_mod
from rome_edit.rome.hparams import ROMEHyperParams

CTX = ["{}", "The weather was cold. {}"]
NAMES = list(LABELLED)


def run_sweep(lm, labelled, hp, context_templates, out_dir, **kwargs):
    """A sweep of :data:`concepts.CITY` edits, labelled, with the subjects as neighbours."""
    return sweep_mod.run_sweep(lm, CITY.requests(labelled), hp, context_templates, out_dir,
                               labels=[label for _, label in labelled], classes=CITY.classes,
                               neighbour_pool=[s for s, _ in labelled], kept=[JOB], **kwargs)


def hp(lm):
    return ROMEHyperParams(layers=(1,), v_loss_layer=lm.n_layers - 1, v_num_grad_steps=4,
                           mom2_adjustment=False)


def test_sweep_resumes_after_interruption(tiny_gptj, tmp_path, monkeypatch):
    lm = tiny_gptj
    full = run_sweep(lm, NAMES, hp(lm), CTX, tmp_path / "full", batch_size=2, progress=False)
    real = sweep_mod.compute_edits
    calls = {"n": 0}

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt  # as if Ctrl-C arrived during the second batch
        return real(*args, **kwargs)

    monkeypatch.setattr(sweep_mod, "compute_edits", flaky)
    with pytest.raises(KeyboardInterrupt):
        run_sweep(lm, NAMES, hp(lm), CTX, tmp_path / "resumed", batch_size=2, progress=False)
    assert len(list((tmp_path / "resumed" / "shards").glob("*.jsonl"))) == 1
    monkeypatch.setattr(sweep_mod, "compute_edits", real)
    resumed = run_sweep(lm, NAMES, hp(lm), CTX, tmp_path / "resumed", batch_size=2,
                        progress=False)
    assert resumed["n_edits"] == full["n_edits"] == len(NAMES)
    rows = [json.loads(x) for x in (tmp_path / "resumed" / "records.jsonl").read_text().split(
        "\n") if x]
    assert sorted(r["subject"] for r in rows) == sorted(s for s, _ in NAMES)
    a = load_file(str(tmp_path / "full" / "deltas.safetensors"))["delta"]
    b = load_file(str(tmp_path / "resumed" / "deltas.safetensors"))["delta"]
    assert torch.equal(a, b)  # fixed batches: the redone batch has the same companions
    summary = json.loads((tmp_path / "resumed" / "summary.json").read_text())
    for key in ("n_edits", "layer", "efficacy", "paraphrase", "specificity", "seconds",
                "seconds_per_edit"):
        assert key in summary
    assert {"subject", "label", "target"} <= set(rows[0])
    # fluency is sampled: the first 2 names of each batch of 2, i.e. every name here
    assert all(r["generation_after"] and r["fluency_after"] > 0 for r in rows)
    assert summary["fluency_after"] == pytest.approx(
        sum(r["fluency_after"] for r in rows) / len(rows))
    assert all(r["target"] == CITY.answers[r["label"]] for r in rows)


def test_sweep_refuses_to_mix(tiny_gptj, tmp_path):
    lm = tiny_gptj
    run_sweep(lm, NAMES[:2], hp(lm), CTX, tmp_path / "s", batch_size=2, progress=False)
    other = ROMEHyperParams(layers=(2,), v_loss_layer=lm.n_layers - 1, v_num_grad_steps=4,
                            mom2_adjustment=False)
    before = (tmp_path / "s" / "records.jsonl").read_text()
    with pytest.raises(ValueError, match="different"):
        run_sweep(lm, NAMES, other, CTX, tmp_path / "s", batch_size=2, progress=False)
    assert (tmp_path / "s" / "records.jsonl").read_text() == before


@pytest.mark.slow
def test_sweep_survives_sigkill(tiny_gptj, tmp_path):
    """Kill -9 a CLI sweep at several moments; the resumed store has every name exactly once."""
    import os
    import random
    import signal
    import subprocess
    import sys
    import time

    model_dir = tmp_path / "tiny"
    tiny_gptj.model.save_pretrained(model_dir)
    tiny_gptj.tokenizer.save_pretrained(model_dir)
    (tmp_path / "hp.json").write_text(json.dumps({
        "layers": [1], "v_loss_layer": 3, "v_num_grad_steps": 4, "mom2_adjustment": False}))
    (tmp_path / "ctx.json").write_text(json.dumps(CTX))
    names = SUBJECTS[:48]
    # the store is what is tested; the study's CLI sweep runs it, on a names CSV it accepts
    (tmp_path / "names.csv").write_text("name,gender\n" + "".join(
        f"{n},{('female', 'male')[i % 2]}\n" for i, n in enumerate(names)))
    argv = [sys.executable, "-m", "rome_edit", "sweep", "--model", str(model_dir), "--names",
            str(tmp_path / "names.csv"), "--hparams", str(tmp_path / "hp.json"),
            "--context-templates", str(tmp_path / "ctx.json"), "--batch-size", "2"]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    rng = random.Random(0)
    kills = 0
    shards = tmp_path / "killed" / "shards"
    for _ in range(4):
        before = len(list(shards.glob("*.jsonl"))) if shards.exists() else 0
        proc = subprocess.Popen([*argv, "--out", str(tmp_path / "killed")], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        # Wait until this run has finished a batch, then kill at a random moment after it:
        # mid-batch, mid-write or between batches.
        while proc.poll() is None and (not shards.exists() or
                                       len(list(shards.glob("*.jsonl"))) == before):
            time.sleep(0.02)
        time.sleep(rng.uniform(0.0, 0.4))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.wait()
    done = subprocess.run([*argv, "--out", str(tmp_path / "killed")], env=env,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    print(f"sweep SIGKILL test: {kills} kills of 4 runs")
    assert kills >= 1
    rows = [json.loads(x) for x in
            (tmp_path / "killed" / "records.jsonl").read_text().splitlines() if x]
    assert sorted(r["subject"] for r in rows) == sorted(names)
    clean = subprocess.run([*argv, "--out", str(tmp_path / "clean")], env=env,
                           capture_output=True, text=True)
    assert clean.returncode == 0
    clean_rows = [json.loads(x) for x in
                  (tmp_path / "clean" / "records.jsonl").read_text().splitlines() if x]
    assert [r["subject"] for r in rows] == [r["subject"] for r in clean_rows]
    a = load_file(str(tmp_path / "killed" / "deltas.safetensors"))
    b = load_file(str(tmp_path / "clean" / "deltas.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in b)  # bit-identical to an uninterrupted run
    assert not list((tmp_path / "killed").rglob("*.tmp"))  # no temporary file survives
