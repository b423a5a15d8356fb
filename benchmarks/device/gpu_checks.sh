#!/usr/bin/env bash
# The GPU checks of the kernels on a device machine with torch + CUDA but without this package installed:
# the extension exception probe (PROBE=0 skips it), then the given GPU tests (pytest arguments).
# Outputs go to $OUT (default ./gpu-out). Carry protos/pagedserve/v1 (generated stubs) and .whl (the
# grpcio-health-checking and grpcio-reflection wheels) when the machine lacks them.
#
#   bash benchmarks/device/gpu_checks.sh [pytest args...]
set -uo pipefail
OUT="${OUT:-gpu-out}"
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
fi
export PYTHONPATH="$PWD:$PWD/protos:${PYTHONPATH:-}" PYTHONUNBUFFERED=1
export PAGEDSERVE_KERNEL_CACHE="${PAGEDSERVE_KERNEL_CACHE:-/tmp/pagedserve-kernels}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/device.txt"
[ "${PROBE:-1}" = 0 ] || python3 benchmarks/device/extension_exception_probe.py 2>&1 | tee "$OUT/exception_probe.txt"
status=0
python3 -m pytest -p no:cacheprovider -o addopts="" -q -rfE --durations=15 "$@" 2>&1 | tee "$OUT/gpu_tests.txt"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
exit "$status"
