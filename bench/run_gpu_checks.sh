#!/usr/bin/env bash
# One device call for issue 7: the GPU tests, then the GPU benchmark; logs and JSON land in $OUT
# (the device tool's output folder) or ./gpu-out. Each half has its own time limit so that a hang in
# one still leaves the other's output. Expected: ~3 + ~3 minutes on an H100/H200.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-gpu-out}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee "$out/gpu.txt"
python3 -c "import cupy, numpy, torch; print('cupy', cupy.__version__, 'numpy', numpy.__version__, 'torch', torch.__version__)" 2>&1 | tee -a "$out/gpu.txt"
timeout 270 python3 -m pytest -q -rs -p no:cacheprovider tests/test_gpu.py tests/test_gpu_paths.py 2>&1 | tee "$out/test_gpu.log"
timeout 300 python3 bench/bench_gpu.py --out "$out/bench_gpu.json" 2>&1 | tee "$out/bench_gpu.log"
