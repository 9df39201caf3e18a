#!/usr/bin/env bash
# The GPU path on a CUDA machine, in about 8 minutes: install, the `gpu` tests, the scale benchmark.
#
#   bash scripts/gpu_check.sh [GEOMETRY] [LAYERS]     (default: qwen3-30b-a3b, 2 MoE layers)
#
# CUDA torch is expected to be installed already (the gpu extra adds faiss-gpu-cu12; pip keeps the
# CUDA torch since any torch 2.x satisfies the requirement). On a machine with no network, put the
# wheels of what it lacks in .whl/ first (pip download --only-binary=:all: for its Python and
# platform): they are installed from there with --no-index. Prints the test summary, then the
# benchmark's table and its JSON line; writes both under ${OUT:-/tmp/gpu-check}.
set -euo pipefail
cd "$(dirname "$0")/.."
GEOMETRY="${1:-qwen3-30b-a3b}"
LAYERS="${2:-2}"
OUT="${OUT:-/tmp/gpu-check}"
mkdir -p "$OUT"
PYTHON="${PYTHON:-python}"

echo "== environment"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
"$PYTHON" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available())"

echo "== install (editable, gpu + dev + eval extras)"
started=$(date +%s)
if [ -d .whl ]; then
    "$PYTHON" -m pip install -q --no-index --find-links .whl -e ".[gpu,dev,eval]" 2>&1 | tail -3
else
    "$PYTHON" -m pip install -q -e ".[gpu,dev,eval]" 2>&1 | tail -3
fi
"$PYTHON" -c "import faiss, torch; print('faiss', faiss.__version__, 'GPUs seen by FAISS:', faiss.get_num_gpus()); assert torch.cuda.is_available(), 'torch sees no CUDA GPU'"
echo "install: $(( $(date +%s) - started )) s"

echo "== pytest -m gpu"
started=$(date +%s)
timeout 240 "$PYTHON" -m pytest -m gpu -v -p no:cacheprovider tests/test_gpu.py 2>&1 | tee "$OUT/pytest.log" | tail -15
echo "tests: $(( $(date +%s) - started )) s"

echo "== scale benchmark: $GEOMETRY, $LAYERS MoE layers, bfloat16 on the GPU"
started=$(date +%s)
timeout 300 "$PYTHON" benchmarks/scale.py --geometry "$GEOMETRY" --layers "$LAYERS" --dtype bfloat16 \
    --workdir "$OUT/scale" 2>&1 | grep -v -E "Loading weights|Writing model" | tee "$OUT/scale.log" | tail -25
echo "benchmark: $(( $(date +%s) - started )) s"
