#!/usr/bin/env bash
# Issue 7's multi-GPU run on a device machine: tensor_parallel.py with the given flags, logs and results
# in $OUT (default ./gpu-out); device_env.sh says what to carry.
#
#   bash benchmarks/device/tensor_parallel.sh --tp 2,1 --num-requests 500
set -uo pipefail
source "$(dirname "$0")/device_env.sh"
# Anchored at the end: the services run as `python3 -m executor_svc` with no arguments, and an
# unanchored pattern also matched (and killed) a caller's shell whose command line ran
# `python3 -m executor_svc.build_kernels`.
pkill -f "python3? -m (executor_svc|scheduler_svc)$" && sleep 3
python3 benchmarks/device/tensor_parallel.py --out "$OUT" "$@"
