#!/usr/bin/env bash
# The GPU checks of the kernels on a device machine with torch + CUDA but without this package installed:
# the extension exception probe (PROBE=0 skips it), then the given GPU tests (pytest arguments).
# Outputs go to $OUT (default ./gpu-out); device_env.sh says what to carry.
#
#   bash benchmarks/device/gpu_checks.sh [pytest args...]
set -uo pipefail
source "$(dirname "$0")/device_env.sh"
[ "${PROBE:-1}" = 0 ] || python3 benchmarks/device/extension_exception_probe.py 2>&1 | tee "$OUT/exception_probe.txt"
status=0
python3 -m pytest -p no:cacheprovider -o addopts="" -q -rfE --durations=15 "$@" 2>&1 | tee "$OUT/gpu_tests.txt"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
exit "$status"
