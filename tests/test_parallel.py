"""Data-parallel sweeps and statistics: 2 CPU processes (gloo) give the 1-process result."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
HPARAMS = {"layers": [1], "v_loss_layer": 5, "v_num_grad_steps": 4, "mom2_adjustment": True,
           "mom2_dataset": "bundled", "mom2_n_samples": 300, "mom2_dtype": "float64"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(args: list[str], processes: int, cache: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "ROME_EDIT_CACHE": str(cache)}
    if processes == 1:
        command = [sys.executable, "-m", "rome_edit", *args]
    else:  # the documented launch line (accelerate's torchrun launcher; gloo without CUDA)
        command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu",
                   "--num_processes", str(processes), "--num_machines", "1",
                   "--mixed_precision", "no", "--dynamo_backend", "no",
                   "--main_process_port", str(_free_port()), "-m", "rome_edit", *args]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return done


def _assert_same_matrix(a: torch.Tensor, b: torch.Tensor) -> None:
    # The processes run 1 thread each, the single one 2: float32 keys differ in the last bits.
    # Rounding: C = Σkkᵀ/n (float64 sums) moves by ≤ 2·δk for keys off by δk normwise; 1e-6
    # allows δk ≈ 4 ε32 (measured ≤ 5e-8 on both kernel paths: 5% of it).
    assert ((a - b).norm() / a.norm()).item() < 1e-6


def _rows(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x]


def test_two_process_sweep_equals_one_process(tmp_path):
    (tmp_path / "hp.json").write_text(json.dumps(HPARAMS))
    (tmp_path / "ctx.json").write_text(json.dumps(["{}", "The weather was cold. {}"]))
    common = ["sweep", "--limit", "10", "--batch-size", "3", "--hparams",
              str(tmp_path / "hp.json"), "--context-templates", str(tmp_path / "ctx.json")]
    _run([*common, "--out", str(tmp_path / "one")], 1, tmp_path / "cache1")
    done = _run([*common, "--out", str(tmp_path / "two")], 2, tmp_path / "cache2")
    assert '"n_edits": 10' in done.stdout  # the main process prints the summary, once
    assert done.stdout.count("n_edits") == 1
    one, two = _rows(tmp_path / "one" / "records.jsonl"), _rows(tmp_path / "two" / "records.jsonl")
    assert [r["subject"] for r in one] == [r["subject"] for r in two]
    assert len({r["subject"] for r in two}) == 10
    # the 4 batches were split 2 + 2 over the processes and merged in name order
    assert len(list((tmp_path / "two" / "shards").glob("*.jsonl"))) == 4
    a = load_file(str(tmp_path / "one" / "deltas.safetensors"))
    b = load_file(str(tmp_path / "two" / "deltas.safetensors"))
    for name in ("delta", "v_orig", "v_star", "k_star"):
        rel = ((a[name] - b[name]).norm(dim=1) / a[name].norm(dim=1)).max().item()
        # Rounding through 4 Adam steps (no closed bound): 1e-5 ≈ 80 ε32; measured ≤ 1.3e-6.
        assert rel < 1e-5, (name, rel)
    for key in ("efficacy", "specificity", "paraphrase"):
        assert [r[key] for r in one] == [r[key] for r in two]
    # both runs computed C (each had an empty cache); the 2-process one by all-reduce
    (c1,) = (tmp_path / "cache1").glob("*.safetensors")
    (c2,) = (tmp_path / "cache2").glob("*.safetensors")
    _assert_same_matrix(load_file(str(c1))["second_moment"], load_file(str(c2))["second_moment"])


def test_two_process_stats_equal_one_process(tmp_path):
    common = ["stats", "--layer", "2", "--n-samples", "400", "--batch-size", "16",
              "--stats-dtype", "float64"]
    _run([*common, "--out", str(tmp_path / "one.safetensors")], 1, tmp_path / "cache1")
    done = _run([*common, "--out", str(tmp_path / "two.safetensors")], 2, tmp_path / "cache2")
    assert done.stdout.count("condition number") == 1
    from rome_edit.stats.second_moment import SecondMoment

    one = SecondMoment.load(tmp_path / "one.safetensors")
    two = SecondMoment.load(tmp_path / "two.safetensors")
    assert (one.n_documents, one.n_tokens) == (two.n_documents, two.n_tokens)
    assert one.n_documents == 400
    _assert_same_matrix(one.matrix, two.matrix)
    assert not list((tmp_path / "cache2").glob(".*partial*"))  # checkpoints removed when done


def test_other_commands_refuse_parallel_launch(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "WORLD_SIZE": "2", "RANK": "0"}
    done = subprocess.run([sys.executable, "-m", "rome_edit", "info"], env=env,
                          capture_output=True, text=True)
    assert done.returncode == 2
    assert "runs in one process" in done.stderr and "Traceback" not in done.stderr
