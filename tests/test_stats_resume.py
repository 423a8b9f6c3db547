"""Statistics runs survive interruption: checkpoints resume to the bit-identical sum."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from rome_edit.stats import second_moment as sm_module
from rome_edit.stats.checkpoint import PassIdentity, load_checkpoint
from rome_edit.stats.corpus import file_corpus
from rome_edit.stats.second_moment import SecondMoment, compute_second_moment

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def corpus(tmp_path):
    rng = random.Random(0)
    words = "Anna said that she lives in the city of Paris . Record for Tom : male".split()
    path = tmp_path / "corpus.txt"
    path.write_text("\n".join(" ".join(rng.choices(words, k=rng.randint(3, 30)))
                              for _ in range(300)))
    return file_corpus(path)


def test_interrupted_pass_resumes_to_the_same_sum(tiny_gptj, corpus, tmp_path, monkeypatch):
    ckpt = tmp_path / "partial.safetensors"
    clean = compute_second_moment(tiny_gptj, 1, corpus, n_samples=300, batch_size=8,
                                  progress=False)
    real = sm_module.run_until
    calls = {"n": 0}

    def dies_at_batch_23(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 23:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(sm_module, "run_until", dies_at_batch_23)
    with pytest.raises(KeyboardInterrupt):
        compute_second_moment(tiny_gptj, 1, corpus, n_samples=300, batch_size=8,
                              progress=False, checkpoint=ckpt, checkpoint_every=5)
    monkeypatch.setattr(sm_module, "run_until", real)
    assert ckpt.exists()
    counted = {"n": 0}

    def counting(*args, **kwargs):
        counted["n"] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(sm_module, "run_until", counting)
    resumed = compute_second_moment(tiny_gptj, 1, corpus, n_samples=300, batch_size=8,
                                    progress=False, checkpoint=ckpt, checkpoint_every=5)
    n_batches = -(-300 // 8)
    assert counted["n"] == n_batches - 20  # batches 0-19 came from the checkpoint
    assert torch.equal(resumed.matrix, clean.matrix)
    assert (resumed.n_tokens, resumed.n_documents) == (clean.n_tokens, clean.n_documents)
    assert not ckpt.exists()  # removed once the pass is complete


def test_writes_cut_short_by_a_kill_are_cleaned_up(tiny_gptj, corpus, tmp_path):
    """SIGKILL skips the atomic writer's own cleanup; the next complete pass removes what a
    killed checkpoint write or a killed final save left."""
    ckpt, out = tmp_path / "partial.safetensors", tmp_path / "C.safetensors"
    stale = [tmp_path / f".{ckpt.name}.k1ll3d.tmp", tmp_path / f".{out.name}.k1ll3d.tmp"]
    for path in stale:
        path.write_bytes(b"half a file")
    keep = tmp_path / ".other.safetensors.k1ll3d.tmp"  # another file's: not ours to delete
    keep.write_bytes(b"")
    stats = compute_second_moment(tiny_gptj, 1, corpus, n_samples=40, batch_size=8,
                                  progress=False, checkpoint=ckpt, checkpoint_every=2)
    stats.save(out)
    assert not any(path.exists() for path in stale) and keep.exists()


def test_checkpoint_of_another_pass_is_not_resumed(tmp_path, caplog):
    path = tmp_path / "partial.safetensors"
    mine = PassIdentity("abc|1|corpus|float32|300|64", 8, 0, 1)
    save_file({"sum": torch.ones(4, 4)}, path, metadata={
        "format": "rome-edit/second-moment-checkpoint/v1", **mine.metadata(),
        "n_tokens": "10", "n_documents": "4", "next_batch": "5"})
    assert load_checkpoint(path, mine).next_batch == 5
    for other in (PassIdentity(mine.request, 16, 0, 1), PassIdentity(mine.request, 8, 1, 2),
                  PassIdentity("abc|2|corpus|float32|300|64", 8, 0, 1)):
        assert load_checkpoint(path, other).total is None
    path.write_bytes(b"\x80\x04 not safetensors")  # e.g. a pickle: never loaded
    assert load_checkpoint(path, mine).total is None
    assert "ignoring" in caplog.text


@pytest.mark.slow
def test_stats_survive_sigkill(tiny_gptj, corpus, tmp_path):
    """Kill -9 ``rome-edit stats`` at random moments; the finished C equals a clean run's."""
    model_dir = tmp_path / "tiny"
    tiny_gptj.model.save_pretrained(model_dir)
    tiny_gptj.tokenizer.save_pretrained(model_dir)
    text = tmp_path / "big.txt"
    text.write_text("\n".join((tmp_path / "corpus.txt").read_text().splitlines() * 12))
    argv = [sys.executable, "-m", "rome_edit", "stats", "--model", str(model_dir), "--layer", "1",
            "--corpus", str(text), "--n-samples", "3600", "--batch-size", "4",
            "--checkpoint-every", "10"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cache = tmp_path / "cache"
    rng = random.Random(1)
    kills, resumed_runs = 0, 0

    def checkpoint_stamp() -> float:
        found = list(cache.glob(".*partial.safetensors")) if cache.exists() else []
        return found[0].stat().st_mtime_ns if found else 0.0

    for _ in range(4):
        before = checkpoint_stamp()
        resumed_runs += before > 0
        proc = subprocess.Popen([*argv, "--cache-dir", str(cache), "--out",
                                 str(tmp_path / "killed.safetensors")], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        while proc.poll() is None and checkpoint_stamp() == before:
            time.sleep(0.01)  # wait for this run's first checkpoint, then kill at random
        time.sleep(rng.uniform(0.0, 0.3))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.wait()
    done = subprocess.run([*argv, "--cache-dir", str(cache), "--out",
                           str(tmp_path / "killed.safetensors")], env=env, capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    clean = subprocess.run([*argv, "--cache-dir", str(tmp_path / "clean-cache"), "--out",
                            str(tmp_path / "clean.safetensors")], env=env, capture_output=True,
                           text=True)
    assert clean.returncode == 0, clean.stderr[-2000:]
    print(f"stats SIGKILL test: {kills} kills of 4 runs, {resumed_runs} runs resumed a checkpoint")
    assert kills >= 2 and resumed_runs >= 1
    a = SecondMoment.load(tmp_path / "killed.safetensors")
    b = SecondMoment.load(tmp_path / "clean.safetensors")
    assert torch.equal(a.matrix, b.matrix)
    assert (a.n_documents, a.n_tokens) == (b.n_documents, b.n_tokens) == (3600, b.n_tokens)
    assert not list(cache.glob(".*partial*"))
