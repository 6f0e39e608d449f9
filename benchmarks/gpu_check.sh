#!/usr/bin/env bash
# GPU check for a lent device machine: one command, no network, torch/Triton as that machine has them.
#   OUT=/some/dir bash benchmarks/gpu_check.sh
# What comes back is at most 8 files from $OUT; this writes 5: gpu_check.log (every step's output, appended as
# it goes), steps.log (each step's command and exit code, then the closing line), and the JSONs bench_anchor.json,
# bench_fp32.json (rewritten after every model, so a timeout keeps what was measured) and bench_scan.json.
# The step timeouts sum to 480 s (the budget is 520 s):
#    env 15 | backends 60 | verify 90 | cuda_model 60 | cuda_tests 60 | bench_scan 25 | bench_anchor 130 | bench_fp32 40
#   1. the environment, and which scan backends work on each device and why not (exits 0; the CPU probe builds
#      the fused CPU kernel, so verify/ finds it built)
#   2. verify/ on the CUDA targets (HYPOTHESIS_PROFILE=gpu: 8 examples per property)
#   3. the Vim model itself on CUDA, every CUDA backend and every method, against stm_ref's float64 forward
#      (tests/test_cuda_model.py, its own step so that its results survive a timeout of the next); then the other
#      CUDA tests (every backend's scan vs the float64 reference)
#   4. the scan benchmark; the throughput bench under the field's anchor protocol (--protocol rmeeto: batch 128,
#      model.half() + fp16 autocast, 100 warm-up forwards, blocks of 30) for Vim-Ti and Vim-S; fp32 for Vim-Ti
#   5. the closing line: which CUDA backends were certified, which not and why (benchmarks/gpu_summary.py)
# On a machine without CUDA it runs to the end too: the CUDA steps skip or fail, each exit recorded.
set -uo pipefail
OUT="${OUT:-gpu_out}"
mkdir -p "$OUT"
LOG="$OUT/gpu_check.log"
JUNIT="$(mktemp -d)"
export PYTHONUNBUFFERED=1
step() {  # step NAME SECONDS COMMAND...: run with a timeout, append to the log, record the exit code
  local name="$1" limit="$2"
  shift 2
  echo "== $name (timeout ${limit}s): $*" | tee -a "$OUT/steps.log" >> "$LOG"
  timeout -k 10 "$limit" "$@" >> "$LOG" 2>&1
  local rc=$?
  echo "$name exit $rc" | tee -a "$OUT/steps.log" >> "$LOG"
}
step env 15 bash -c 'nvidia-smi || true; python3 -c "
import torch
print(\"torch\", torch.__version__, \"cuda\", torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else \"\")
try:
    import triton; print(\"triton\", triton.__version__)
except ImportError as e:
    print(\"triton: not installed\", e)
"'
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . >> "$LOG" 2>&1 \
  || export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
step backends 60 python3 -c "
import torch
from stm_fast import ssm
for dev in ['cpu'] + (['cuda'] if torch.cuda.is_available() else []):
    print(dev, 'automatic:', ssm.resolve_backend(None, dev))
    for name, ok, why in ssm.backend_status(dev):
        print('  ', name, 'works' if ok else 'does not run: ' + why)
if not torch.cuda.is_available():
    print('cuda: no device')
"
HYPOTHESIS_PROFILE=gpu step verify 90 python3 -m pytest -q -p no:cacheprovider -k cuda verify/test_fast_path.py \
  --junitxml="$JUNIT/verify.xml"
step cuda_model 60 python3 -m pytest -q -p no:cacheprovider tests/test_cuda_model.py --junitxml="$JUNIT/cuda_model.xml"
step cuda_tests 60 python3 -m pytest -q -p no:cacheprovider -m cuda tests/ --ignore=tests/test_cuda_model.py \
  --junitxml="$JUNIT/cuda_tests.xml"
step bench_scan 25 python3 -m pytest -q -p no:cacheprovider benchmarks/bench_scan.py --benchmark-only \
  --benchmark-json="$OUT/bench_scan.json"
step bench_anchor 130 python3 -m stm_fast.bench --device cuda --protocol rmeeto --model vim_tiny vim_small \
  --methods stm tome evit --rates 0.2 0.3 --json "$OUT/bench_anchor.json"
step bench_fp32 40 python3 -m stm_fast.bench --device cuda --dtype fp32 --rounds 3 --model vim_tiny \
  --methods stm tome --rates 0.2 --json "$OUT/bench_fp32.json"
python3 -m benchmarks.gpu_summary "$JUNIT"/*.xml 2>> "$LOG" | tee -a "$OUT/steps.log" >> "$LOG"
rm -rf "$JUNIT"
