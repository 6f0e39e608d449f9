#!/usr/bin/env bash
# GPU check for a lent device machine (no network there): one command, the step timeouts sum to 520 s.
#   OUT=/some/dir bash benchmarks/gpu_check.sh
# Installs this checkout without dependencies (the machine's Python has torch, triton, numpy, hypothesis,
# pytest, pytest-benchmark), then, each step under its own timeout and each writing its log under $OUT as it
# goes (a step that times out still leaves what it printed):
#   1. the environment and which scan/conv backends work here, and why not (the probes of stm_fast.ssm; the
#      CPU probe builds the fused CPU kernel, ~25 s cold, so that verify/ finds it built)
#   2. pytest verify/  (certifies the fast path on this machine's devices)
#   3. the CUDA tests (every backend vs the float64 reference: tails, bf16, fp64, channel-last, decay_scale,
#      last state, L in {1, 197, 730}) and the model tests on CUDA
#   4. the scan benchmark and the throughput bench (bf16 and fp32)
set -uo pipefail
OUT="${OUT:-gpu_out}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
step() {  # step NAME SECONDS COMMAND...: run with a timeout, log to $OUT/NAME.log, record the exit code
  local name="$1" limit="$2"
  shift 2
  echo "== $name (timeout ${limit}s): $*" | tee -a "$OUT/steps.log"
  timeout -k 10 "$limit" "$@" > "$OUT/$name.log" 2>&1
  echo "$name exit $?" | tee -a "$OUT/steps.log"
}
step env 30 bash -c 'nvidia-smi; python3 -c "import torch, triton; print(\"torch\", torch.__version__, \"triton\", triton.__version__, torch.cuda.get_device_name(0))"'
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . > "$OUT/install.log" 2>&1 \
  || export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
step backends 75 python3 -c "
import torch
from stm_fast import ssm
from stm_fast.ops import conv, probe
for dev in ['cpu', 'cuda']:
    d = torch.device(dev)
    print(dev, 'available:', ssm.available_backends(d), 'automatic:', ssm.resolve_backend(None, d))
    for name in ('fused', 'triton', 'mamba_ssm'):
        print('  ', name, ssm._works(name, d))
print('causal_conv1d', probe.probe('causal_conv1d', torch.device('cuda'), conv._check_causal_conv1d))
"
step verify 120 python3 -m pytest -q -p no:cacheprovider verify/
step cuda_tests 100 python3 -m pytest -q -p no:cacheprovider -m cuda tests/
step model_tests 50 python3 -m pytest -q -p no:cacheprovider tests/test_vim.py tests/test_reduce_reference.py tests/test_cuda_paths.py
step bench_scan 45 python3 -m pytest -q -p no:cacheprovider benchmarks/bench_scan.py --benchmark-only \
  --benchmark-json="$OUT/bench_scan.json"
step bench_bf16 60 python3 -m stm_fast.bench --device cuda --rounds 5 --model vim_tiny vim_small --dtype bf16 \
  --json "$OUT/bench_bf16.json"
step bench_fp32 40 python3 -m stm_fast.bench --device cuda --rounds 5 --model vim_tiny --dtype fp32 --json "$OUT/bench_fp32.json"
