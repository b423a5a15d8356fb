# Sourced by the device scripts: make the repository importable on a machine with torch + CUDA but
# without this package installed. Carry protos/pagedserve/v1 (generated stubs) and .whl (the
# grpcio-health-checking and grpcio-reflection wheels) when the machine lacks them.
OUT="${OUT:-gpu-out}"
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
fi
export PYTHONPATH="$PWD:$PWD/protos:${PYTHONPATH:-}" PYTHONUNBUFFERED=1
export PAGEDSERVE_KERNEL_CACHE="${PAGEDSERVE_KERNEL_CACHE:-/tmp/pagedserve-kernels}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/device.txt"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1   # no hub on the device machines
