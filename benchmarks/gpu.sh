#!/usr/bin/env bash
# GPU figures at GPT-J-6B's shape in one command (a few minutes on one H100/H200-class GPU):
#   bash benchmarks/gpu.sh [--out benchmarks/results/gpu.json] [bench_gpu.py options]
# Runs from a checkout without installing: the machine needs torch with CUDA, transformers,
# safetensors, tqdm and matplotlib.  No download: the model is built with random weights on the
# GPU and the bundled tokenizer is used.  On a machine without a GPU it refuses; test the script
# on CPU with `python benchmarks/bench_gpu.py --shape small --device cpu`.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "benchmarks/gpu.sh: no CUDA GPU visible to $PY; on CPU run" \
         "'python benchmarks/bench_gpu.py --shape small --device cpu' instead." >&2
    exit 2
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
"$PY" -c "import torch, transformers; print('torch', torch.__version__, '| transformers', transformers.__version__)"
exec "$PY" benchmarks/bench_gpu.py "$@"
