# The executor image: a CUDA build of torch, the executor, and PagedServe's CUDA kernels compiled at
# image build time for Ampere (sm_80) and Hopper (sm_90a), so an executor starts without minutes of nvcc.
#
#   docker build -f docker/executor.Dockerfile -t pagedserve-executor .       (from the repository root)
#
# The build needs no GPU. A CPU-only variant (no CUDA toolkit, the CPU torch wheel, no kernels) is
#
#   docker build -f docker/executor.Dockerfile -t pagedserve-executor:cpu \
#       --build-arg BASE_IMAGE=ubuntu:24.04 \
#       --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu --build-arg BUILD_KERNELS=0 .
#
# Configured by PAGEDSERVE_EXECUTOR_* environment variables; by default it listens on 0.0.0.0:50061.

# A -devel image: torch's extension loader checks the cached build with ninja and nvcc's CUDA_HOME at run
# time too, not only when compiling. CUDA 12.9 pairs with torch's cu129 wheels.
ARG BASE_IMAGE=nvidia/cuda:12.9.1-devel-ubuntu24.04
FROM ${BASE_IMAGE}

ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu129
ARG BUILD_KERNELS=1

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PATH=/opt/venv/bin:$PATH \
    PAGEDSERVE_DEFAULT_MODEL=/opt/pagedserve/models/stdlib-llama \
    PAGEDSERVE_KERNEL_CACHE=/opt/pagedserve-kernels \
    PAGEDSERVE_EXECUTOR_HOST=0.0.0.0 \
    TORCH_CUDA_ARCH_LIST="8.0;9.0a"
# TORCH_CUDA_ARCH_LIST matches the -gencode flags executor_svc/ops.py pins for the kernels (which take
# precedence for them), so any other extension torch builds here targets the same two architectures.

# python3-dev: the extension's bindings include Python.h; g++: nvcc's host compiler and the C++ sources.
# The packages follow the base image's Ubuntu release (DL3008 asks for exact versions, which the archive
# drops as it moves on; the base image tag is what pins them).
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv python3-dev g++ \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 pagedserve \
    && useradd --system --uid 10001 --gid pagedserve --create-home --home-dir /home/pagedserve pagedserve

# torch first, in its own layer: it is gigabytes and changes far less often than the code.
RUN python3 -m venv /opt/venv \
    && pip install --no-cache-dir --disable-pip-version-check --index-url "${TORCH_INDEX_URL}" \
        "torch==${TORCH_VERSION}" \
    && pip install --no-cache-dir --disable-pip-version-check ninja==1.13.0

# An editable install: executor_svc/ops.py compiles csrc/ from beside the packages, so the executor runs
# from this source tree (where the default model is found too).
WORKDIR /opt/pagedserve
COPY pyproject.toml setup.py MANIFEST.in ./
COPY protos/ protos/
COPY scheduler_svc/ scheduler_svc/
COPY executor_svc/ executor_svc/
COPY clients/ clients/
COPY csrc/ csrc/
COPY models/stdlib-llama/ models/stdlib-llama/
# The dependency ranges are pyproject.toml's (DL3013 asks for pins the project does not keep).
# hadolint ignore=DL3013
RUN pip install --no-cache-dir --disable-pip-version-check -e ".[executor]" \
    && install -d -o 10001 -g 10001 "${PAGEDSERVE_KERNEL_CACHE}"

USER 10001:10001
# Built as the user that runs the executor: at start-up torch takes a lock file in the cache directory
# and ninja confirms the build there, so the directory must be the runtime user's.
RUN if [ "${BUILD_KERNELS}" = "1" ]; then python -m executor_svc.build_kernels; fi

WORKDIR /home/pagedserve
EXPOSE 50061 9401
# SERVING once the model is loaded and the KV cache can be initialized; the port follows the environment.
HEALTHCHECK --interval=10s --timeout=5s --start-period=600s --retries=3 \
    CMD ["sh", "-c", "pagedserve healthcheck --target 127.0.0.1:${PAGEDSERVE_EXECUTOR_PORT:-50061}"]
CMD ["pagedserve-executor"]
