"""benchmarks/bench_gpu.py (what benchmarks/gpu.sh runs on a GPU) stays runnable: its small shape
on CPU, every figure present and consistent."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_benchmark_runs_on_cpu_with_a_small_shape(tmp_path):
    out = tmp_path / "gpu.json"
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_gpu.py"), "--shape", "small",
                    "--device", "cpu", "--dtype", "float32", "--chunks", "1", "2", "--steps", "2",
                    "--n-simple", "1", "--stats-docs", "4", "--doc-tokens", "64", "--out",
                    str(out)], check=True, cwd=ROOT, capture_output=True, timeout=600)
    result = json.loads(out.read_text())
    assert result["device"] == "cpu" and result["n_context_templates"] == 21
    assert [row["chunk"] for row in result["batched"]] == [1, 2]
    for row in result["batched"]:
        assert row["seconds_per_edit"] > 0 and row["estimate_gib"] > 0
        assert row["step_path"] == ["gptj-kernel"]
    assert result["projected_1000_edits_seconds"] == 1000 * result["batched"][-1][
        "seconds_per_edit"]
    assert [s["documents"] for s in result["stats"]] == [4, 4]
    assert result["d_mlp"] == 1024 and result["cholesky_seconds"] > 0


def test_gpu_sh_refuses_without_a_gpu():
    done = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu.sh")], cwd=ROOT,
                          capture_output=True, text=True, timeout=120,
                          env={"PATH": "/usr/bin:/bin", "PYTHON": sys.executable,
                               "CUDA_VISIBLE_DEVICES": ""})
    assert done.returncode == 2 and "no CUDA GPU" in done.stderr
