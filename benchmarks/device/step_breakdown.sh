#!/usr/bin/env bash
# Issue 18's step breakdown on one device machine, both systems in one call, one after the other:
# PagedServe served through gRPC (step_breakdown.py: the main workload under torch.profiler, then
# without it), then vLLM 0.20.2 offline (vllm_profile.py: without, then under its worker profiler),
# then the per-step analysis of both traces (step_breakdown_analyze.py). Run it after the vLLM
# harness's install calls (../shared/peers/vllm/README.md); carry .peer/scripts, the generated
# protos/pagedserve/v1 stubs and .whl (device_env.sh).
#
#   bash .peer/scripts/device_install.sh && bash benchmarks/device/step_breakdown.sh
#
# $OUT receives: step_breakdown.log, step_breakdown.json (both analyses, every step), the slim traces
# pagedserve_slim.npz and vllm_slim.npz, and raw.tar.gz (bench reports, the executor's step log,
# vLLM's run report, logs, a few steps of each Chrome trace).
set -uo pipefail
OUT="${OUT:-gpu-out}"
mkdir -p "$OUT"
exec > >(tee -a "$OUT/step_breakdown.log") 2>&1
N="${NUM_REQUESTS:-1000}"
W=/tmp/step-breakdown
rm -rf "$W"
mkdir -p "$W/ps" "$W/vllm" "$W/pack"
start=$SECONDS
say() { echo "[step_breakdown.sh +$((SECONDS - start))s] $*"; }

gpu_free() {    # wait until no process holds the GPU; end this call's own leftovers by pid
  for _ in $(seq 60); do
    [ -z "$(nvidia-smi --query-compute-apps=pid --format=csv,noheader)" ] && return 0
    sleep 1
  done
  for pid in $(nvidia-smi --query-compute-apps=pid --format=csv,noheader); do
    say "GPU still held by pid $pid: ending it"; kill "$pid" 2>/dev/null
  done
  sleep 5
}

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv | tee "$W/device.txt"
date -u | tee -a "$W/device.txt"
say "PagedServe: served main workload, profiled then plain ($N requests)"
(
  export OUT="$W/ps"
  source benchmarks/device/device_env.sh > /dev/null
  timeout -s INT "${PS_TIMEOUT:-300}" python3 benchmarks/device/step_breakdown.py --out "$W/ps" \
    --num-requests "$N" --max-num-seqs 512 --cuda-graph-max-batch 512
) > "$W/ps/driver.log" 2>&1
say "PagedServe rc=$?"
grep -v '^\[executor\|^\[scheduler\|rate inf:' "$W/ps/driver.log" | tail -n 12
grep -h 'captured\|KV cache:\|profiled a\|step_breakdown' "$W/ps/driver.log" | tail -n 8
gpu_free
ls -la "$W/ps"

# PagedServe's trace is parsed on the CPU while vLLM runs (one core of 16, lowest priority).
nice -n 19 python3 benchmarks/device/step_breakdown_analyze.py --pagedserve "$W/ps/pagedserve_trace.json" \
  --pagedserve-steps "$W/ps/pagedserve_steps.json" --out "$W/ps_analysis.json" --slim-dir "$OUT" \
  --excerpt-dir "$W/pack" > "$W/ps_analysis.log" 2>&1 &
analysis=$!

say "vLLM: offline, plain then profiled"
(
  source .peer/scripts/env.sh || exit 1
  PYTHONPATH=/tmp/vsite timeout -s INT "${VLLM_TIMEOUT:-220}" python3 benchmarks/device/vllm_profile.py \
    --out "$W/vllm" --num-requests "$N" --max-num-seqs 512
) > "$W/vllm/vllm.log" 2>&1
say "vLLM rc=$?"
grep '\[vllm_profile\]\|Error\|error' "$W/vllm/vllm.log" | tail -n 12
ls -la "$W/vllm"

python3 benchmarks/device/step_breakdown_analyze.py --vllm "$W/vllm/vllm_trace.json" --out "$W/vllm_analysis.json" \
  --slim-dir "$OUT" --excerpt-dir "$W/pack" > "$W/vllm_analysis.log" 2>&1
say "vLLM analysis rc=$?"
wait "$analysis"
say "PagedServe analysis rc=$?"
tail -n 3 "$W/ps_analysis.log" "$W/vllm_analysis.log"
python3 benchmarks/device/step_breakdown_analyze.py --merge "$W/ps_analysis.json" "$W/vllm_analysis.json" \
  --out "$OUT/step_breakdown.json"
cp "$W/device.txt" "$W/pack/"
tar -czf "$OUT/raw.tar.gz" -C "$W" --ignore-failed-read ps/serving_suite.json ps/pagedserve_steps.json \
  ps/step_breakdown_driver.json ps/driver.log vllm/vllm_profile.json vllm/vllm.log pack \
  ps_analysis.log vllm_analysis.log
ls -la "$OUT"
say "done"
sleep 1
