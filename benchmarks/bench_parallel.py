"""One process vs N data-parallel processes for ``rome-edit sweep`` on the bundled model.

    python benchmarks/bench_parallel.py [--n 128] [--processes 2] [--batch-size 32]

Runs the same sweep (bundled preset, the first ``n`` recorded-edit names, context templates
sampled with seed 0, statistics from one shared cache computed beforehand) once as a plain
``rome-edit sweep`` and once under ``accelerate launch --multi_gpu --num_processes N`` (CPU
processes over gloo on a machine without CUDA), then checks that the two stores hold the same
rows in the same order with deltas equal to float tolerance, and writes wall times, the ratio
and the largest differences as JSON.  Process start-up and model loading are inside the
timings: they are part of what a user waits for.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from safetensors.torch import load_file


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _sweep(args: argparse.Namespace, out: Path, processes: int, env: dict) -> float:
    sweep = ["-m", "rome_edit", "sweep", "--limit", str(args.n), "--batch-size",
             str(args.batch_size), "--out", str(out)]
    if processes == 1:
        command = [sys.executable, *sweep]
    else:
        command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu",
                   "--num_processes", str(processes), "--num_machines", "1",
                   "--mixed_precision", "no", "--dynamo_backend", "no",
                   "--main_process_port", str(_port()), *sweep]
    start = time.perf_counter()
    subprocess.run(command, env=env, check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=128)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/parallel.json"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        env = {**os.environ, "ROME_EDIT_CACHE": str(work / "cache")}
        subprocess.run([sys.executable, "-m", "rome_edit", "sweep", "--limit", "1", "--out",
                        str(work / "warm")], env=env, check=True, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)  # computes C once, for both runs
        t_one = _sweep(args, work / "one", 1, env)
        t_par = _sweep(args, work / "par", args.processes, env)
        rows = [[json.loads(x)["subject"] for x in (work / d / "records.jsonl").read_text()
                 .splitlines() if x] for d in ("one", "par")]
        a, b = (load_file(str(work / d / "deltas.safetensors")) for d in ("one", "par"))
        rel = {k: float(((a[k] - b[k]).norm(dim=1) / a[k].norm(dim=1).clamp(min=1e-12)).max())
               for k in ("delta", "v_star", "k_star", "u")}
        summaries = [json.loads((work / d / "summary.json").read_text()) for d in ("one", "par")]
    result = {
        "n_edits": args.n, "processes": args.processes, "batch_size": args.batch_size,
        "one_process_seconds": t_one, "parallel_seconds": t_par, "speedup": t_one / t_par,
        "same_rows_same_order": rows[0] == rows[1],
        "max_relative_difference": rel,
        "efficacy": [s["efficacy"] for s in summaries],
        "specificity": [s["specificity"] for s in summaries],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
