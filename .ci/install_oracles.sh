#!/usr/bin/env bash
# Install the optional external oracle for verify/test_mamba_ssm_oracle.py: mamba-ssm's pure-PyTorch
# `selective_scan_ref`, without its CUDA kernels (this works on CPU-only machines).
#
# Never fails the caller: on any problem it prints one line and exits 0, and the oracle test then
# skips itself. Idempotent: returns at once when mamba-ssm is already installed.
#
# What gets installed, and why only that:
#   wheel    build-time only: mamba-ssm's setup.py imports wheel.bdist_wheel, and the build has to run
#            with --no-build-isolation (setup.py imports torch; an isolated build would not see it).
#   einops   the one runtime import of selective_scan_interface.py that is not already here.
#   mamba-ssm with --no-deps: its declared deps (transformers, tilelang, quack-kernels, ninja, ...)
#            are for the model classes and kernels, not for selective_scan_ref. triton, also imported
#            by that module, is installed with torch.
# Environment: PYTHON (default python), MAMBA_SSM_VERSION, ORACLE_INSTALL_TIMEOUT (seconds, total).
set -u

PY="${PYTHON:-python}"
MAMBA_SSM_VERSION="${MAMBA_SSM_VERSION:-2.3.2.post1}"
LIMIT="${ORACLE_INSTALL_TIMEOUT:-600}"

skip() {
    echo "install_oracles: $1; verify/test_mamba_ssm_oracle.py will be skipped"
    exit 0
}

installed() {  # what `pip show mamba-ssm` checks, plus einops, in one quick interpreter start
    "$PY" -c 'import importlib.metadata as m, importlib.util as u, sys
m.version("mamba-ssm"); sys.exit(u.find_spec("einops") is None)' >/dev/null 2>&1
}

installed && exit 0

"$PY" -c "import torch" >/dev/null 2>&1 || skip "torch is not importable with $PY"

log="$(mktemp)"
trap 'rm -f "$log"' EXIT

if ! timeout -k 10 "$LIMIT" env MAMBA_FORCE_BUILD=TRUE MAMBA_SKIP_CUDA_BUILD=TRUE bash -c '
    set -e
    "$0" -m pip install -q --disable-pip-version-check wheel einops
    "$0" -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation \
        "mamba-ssm==$1"
' "$PY" "$MAMBA_SSM_VERSION" >"$log" 2>&1; then
    last="$(tail -n 1 "$log" | cut -c1-160)"
    skip "installing mamba-ssm==$MAMBA_SSM_VERSION failed or took over ${LIMIT}s${last:+ ($last)}"
fi

installed || skip "mamba-ssm is still not importable after installing"
exit 0
