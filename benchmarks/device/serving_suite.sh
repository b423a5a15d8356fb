#!/usr/bin/env bash
# The serving benchmark suite on a device machine: serving_suite.py with the given flags, its log and
# results in $OUT (default ./gpu-out); device_env.sh says what to carry.
#
#   bash benchmarks/device/serving_suite.sh --phases main,peers
set -uo pipefail
source "$(dirname "$0")/device_env.sh"
# Services of an earlier run cut off by a time limit outlive it (they run in sessions of their own) and
# would hold the GPU's memory: stop them first.
# Anchored at the end: the services run as `python3 -m executor_svc` with no arguments, and an
# unanchored pattern also matched (and killed) a caller's shell whose command line ran
# `python3 -m executor_svc.build_kernels`.
pkill -f "python3? -m (executor_svc|scheduler_svc)$" && sleep 3
python3 benchmarks/device/serving_suite.py --out "$OUT" "$@" > "$OUT/serving_suite.log" 2>&1
status=${PIPESTATUS[0]}
grep -v '^\[executor\|^\[scheduler' "$OUT/serving_suite.log" | tail -n 60
exit "$status"
