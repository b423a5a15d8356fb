#!/usr/bin/env bash
# Overlapped executor steps on a GPU, and vLLM, in one device call (issue 18): the suite's main workload
# served through gRPC with the executor's steps overlapped and one by one (--no-overlap-steps), and vLLM
# 0.20.2 offline on the same trace, one after the other, never two at once. The tree is $AB/new.tar
# (`git archive` of a commit), so no uncommitted work runs; the generated stubs of protos/pagedserve/v1
# are copied into it. Carry $AB, protos/pagedserve/v1 and .whl (device_env.sh), and .peer/scripts for
# vLLM (its site must already be installed in /tmp/vsite: ../shared/peers/vllm/README.md).
#
#   AB=.abtrees STEPS="build tests on off vllm" bash benchmarks/device/overlap_ab.sh
#
# STEPS, in order, from: build (the kernels), draws (the sampler's draws on fixed batches, with the
# kernels and with PAGEDSERVE_CUDA_KERNELS=0, compared bit for bit: sampler_ab_check.py), tests (the
# executor's GPU tests), on / off (the main
# workload, $NUM_REQUESTS requests at max_num_seqs 512, overlapped / one by one), vllm (vLLM offline,
# temperature 1, same trace and limits), http (the suite's http phase: the same requests through gRPC
# and through the OpenAI HTTP API). $OUT receives overlap_ab.log, gpu_tests.txt, serving_<step>/ (each
# suite run's JSON, markdown and log) and vllm_offline.json.
set -uo pipefail
OUT="$(mkdir -p "${OUT:-gpu-out}" && cd "${OUT:-gpu-out}" && pwd)"
exec > >(tee -a "$OUT/overlap_ab.log") 2>&1
AB="$(cd "${AB:-.abtrees}" && pwd)"
CALLER="$PWD"
STEPS="${STEPS:-build tests on off vllm}"
N="${NUM_REQUESTS:-1000}"
W=/tmp/overlap-ab
start=$SECONDS
say() { echo "[overlap_ab.sh +$((SECONDS - start))s] $*"; }

source benchmarks/device/device_env.sh > /dev/null
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv
date -u
rm -rf "$W" && mkdir -p "$W"
tar -xf "$AB/new.tar" -C "$W"
cp protos/pagedserve/v1/*_pb2*.py "$W/protos/pagedserve/v1/"
export PYTHONPATH="/tmp/site:$W:$W/protos"
cd "$W"
pkill -f "python3? -m (executor_svc|scheduler_svc)$" && sleep 3

wait_gpu_free() {   # the previous run's processes must have released the GPU
  for _ in $(seq 60); do
    [ -z "$(nvidia-smi --query-compute-apps=pid --format=csv,noheader)" ] && return 0
    sleep 1
  done
}

suite() {           # one serving_suite.py run into $OUT/serving_$1
  local name=$1
  shift
  mkdir -p "$OUT/serving_$name"
  timeout -s INT "${RUN_TIMEOUT:-240}" python3 benchmarks/device/serving_suite.py --out "$OUT/serving_$name" \
    --max-num-seqs 512 --cuda-graph-max-batch 512 "$@" > "$OUT/serving_$name/serving_suite.log" 2>&1
  say "$name rc=$?"
  grep -v '^\[executor\|^\[scheduler' "$OUT/serving_$name/serving_suite.log" | grep '^| pagedserve' | tail -n 4
  wait_gpu_free
}

for step in $STEPS; do
  say "step $step"
  case $step in
    build) timeout 300 python3 -m executor_svc.build_kernels 2>&1 | tail -n 3 ;;
    draws)
      PAGEDSERVE_CUDA_KERNELS=0 timeout 120 python3 benchmarks/device/sampler_ab_check.py --out "$OUT/draws_reference.json"
      timeout 120 python3 benchmarks/device/sampler_ab_check.py --out "$OUT/draws_kernels.json"
      python3 benchmarks/device/sampler_ab_check.py --compare "$OUT/draws_reference.json" "$OUT/draws_kernels.json"
      say "draws compared, rc=$?" ;;
    tests)
      timeout -s INT "${TESTS_TIMEOUT:-300}" python3 -m pytest -p no:cacheprovider -o addopts="" -q -rfE \
        --durations=10 -m gpu ${GPU_TESTS:-tests/executor_svc} --ignore=tests/executor_svc/test_tensor_parallel.py \
        > "$OUT/gpu_tests.txt" 2>&1
      say "GPU tests rc=$?"
      tail -n 15 "$OUT/gpu_tests.txt" ;;
    on) suite on --phases main --num-requests "$N" ;;
    off) suite off --phases main --num-requests "$N" --no-overlap-steps ;;
    http) suite http --phases http --num-requests "$N" ;;
    vllm)
      (cd "$CALLER" && source .peer/scripts/env.sh && PYTHONPATH=/tmp/vsite timeout -s INT "${VLLM_TIMEOUT:-240}" \
        python3 .peer/scripts/vllm_offline.py --project "$W" --trace sharegpt --num-requests "$N" \
        --max-num-seqs 512 --runs "${VLLM_RUNS:-random}" --out "$OUT/vllm_offline.json" > "$OUT/vllm_offline.log" 2>&1)
      say "vllm rc=$?"
      tail -n 3 "$OUT/vllm_offline.log"
      wait_gpu_free ;;
    *) say "unknown step $step" ;;
  esac
done
say "done"
