#!/usr/bin/env bash
# GPU check for a lent device machine (see benchmarks/README in the main README): no network there.
# Installs this checkout without dependencies (its Python already has torch, triton, numpy, hypothesis,
# pytest, pytest-benchmark), runs the CUDA tests (triton vs torch vs the float64 reference) and the
# throughput benchmark, and writes logs and JSON under $OUT. Usage: OUT=/some/dir bash benchmarks/gpu_check.sh
set -uo pipefail
OUT="${OUT:-gpu_out}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
{
  nvidia-smi || true
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name(0))"
} > "$OUT/env.log" 2>&1
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . > "$OUT/install.log" 2>&1 \
  || export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
python3 -m pytest -q -p no:cacheprovider -m cuda tests/ 2>&1 | tee "$OUT/cuda_tests.log"
python3 -m pytest -q -p no:cacheprovider tests/test_scan.py tests/test_vim.py 2>&1 | tail -5 | tee -a "$OUT/cuda_tests.log"
timeout 300 python3 -m pytest -q -p no:cacheprovider benchmarks/bench_scan.py --benchmark-only \
  --benchmark-json="$OUT/bench_scan.json" 2>&1 | tail -15 | tee "$OUT/bench_scan.log"
timeout 300 python3 -m stm_fast.bench --device cuda --rounds 5 --model vim_tiny vim_small --dtype bf16 --json "$OUT/bench_bf16.json" \
  2>&1 | tee "$OUT/bench_bf16.log"
timeout 200 python3 -m stm_fast.bench --device cuda --rounds 5 --model vim_tiny --dtype fp32 --json "$OUT/bench_fp32.json" \
  2>&1 | tee "$OUT/bench_fp32.log"
