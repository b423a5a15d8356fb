#!/usr/bin/env bash
# The serving benchmark suite on a device machine: serving_suite.py with the given flags, its log and
# results in $OUT (default ./gpu-out); device_env.sh says what to carry.
#
#   bash benchmarks/device/serving_suite.sh --phases main,peers
set -uo pipefail
source "$(dirname "$0")/device_env.sh"
python3 benchmarks/device/serving_suite.py --out "$OUT" "$@" 2>&1 | tail -c 2000000 > "$OUT/serving_suite.log"
status=${PIPESTATUS[0]}
grep -v '^\[executor\|^\[scheduler' "$OUT/serving_suite.log" | tail -n 60
exit "$status"
