#!/usr/bin/env bash
# An A/B of two trees' executors in one device call (issue 18): the GPU tests of the new tree, both
# trees' sampler draws compared on fixed batches (sampler_ab_check.py), then the main workload served
# through gRPC by each tree in turn (step_breakdown.py --runs plain: tok/s and every step's host timing).
# The trees are $AB/base.tar and $AB/new.tar (`git archive` of the two commits), so neither picks up
# uncommitted work; the generated stubs of protos/pagedserve/v1 are copied into both. Carry $AB,
# protos/pagedserve/v1 and .whl (device_env.sh).
#
#   AB=.abtrees bash benchmarks/device/executor_ab.sh
#
# TREES (default "base new") picks the trees to run; REFERENCE_DRAWS, a draws.json from an earlier call,
# is compared with every tree's draws as well.
#
# $OUT receives executor_ab.log, gpu_tests.txt and raw.tar.gz (both runs' bench reports, step logs,
# driver logs, and both trees' draws).
set -uo pipefail
OUT="${OUT:-gpu-out}"
mkdir -p "$OUT"
exec > >(tee -a "$OUT/executor_ab.log") 2>&1
AB="${AB:-.abtrees}"
TREES="${TREES:-base new}"
N="${NUM_REQUESTS:-1000}"
BUDGET_S="${BUDGET_S:-570}"
W=/tmp/executor-ab
start=$SECONDS
say() { echo "[executor_ab.sh +$((SECONDS - start))s] $*"; }
left() { echo $((BUDGET_S - (SECONDS - start))); }

source benchmarks/device/device_env.sh > /dev/null
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv
date -u
rm -rf "$W"
for tree in $TREES; do
  mkdir -p "$W/$tree/src" "$W/$tree/out"
  tar -xf "$AB/$tree.tar" -C "$W/$tree/src"
  cp protos/pagedserve/v1/*_pb2*.py "$W/$tree/src/protos/pagedserve/v1/"
done
in_tree() {     # run a command in one tree, importing that tree alone
  local tree=$1
  shift
  (cd "$W/$tree/src" && PYTHONPATH="/tmp/site:$W/$tree/src:$W/$tree/src/protos" "$@")
}

say "building the kernels"
in_tree new timeout 300 python3 -m executor_svc.build_kernels 2>&1 | tail -n 3

for tree in $TREES; do
  say "$tree: sampler draws"
  in_tree "$tree" timeout 120 python3 "$W/new/src/benchmarks/device/sampler_ab_check.py" \
    --out "$W/$tree/out/draws.json"
done
for reference in "$W/base/out/draws.json" ${REFERENCE_DRAWS:+"$REFERENCE_DRAWS"}; do
  [ -f "$reference" ] || continue
  python3 "$W/new/src/benchmarks/device/sampler_ab_check.py" --compare "$reference" "$W/new/out/draws.json"
  say "sampler draws compared with $reference, rc=$?"
done

for tree in $TREES; do
  say "$tree: served main workload ($N requests)"
  in_tree "$tree" timeout -s INT "${RUN_TIMEOUT:-200}" python3 benchmarks/device/step_breakdown.py \
    --out "$W/$tree/out" --runs plain --num-requests "$N" --max-num-seqs 512 --cuda-graph-max-batch 512 \
    > "$W/$tree/out/driver.log" 2>&1
  say "$tree rc=$?"
  grep '\[step_breakdown\]' "$W/$tree/out/driver.log" | tail -n 2
done

say "new: GPU tests ($(left) s left)"
in_tree new timeout -s INT "$(left)" python3 -m pytest -p no:cacheprovider -o addopts="" -q -rfE \
  --durations=10 -m gpu ${GPU_TESTS:-tests/executor_svc} --ignore=tests/executor_svc/test_tensor_parallel.py \
  > "$OUT/gpu_tests.txt" 2>&1
say "GPU tests rc=$?"
tail -n 15 "$OUT/gpu_tests.txt"
tar -czf "$OUT/raw.tar.gz" -C "$W" --ignore-failed-read $(for tree in $TREES; do echo "$tree/out"; done)
ls -la "$OUT"
say "done"
