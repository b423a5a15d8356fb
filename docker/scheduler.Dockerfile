# The scheduler image: Python and the scheduler's dependencies only, no torch and no CUDA.
#
#   docker build -f docker/scheduler.Dockerfile -t pagedserve-scheduler .      (from the repository root)
#
# Configured by PAGEDSERVE_* environment variables (the README's Configuration section); by default it
# listens on 0.0.0.0:50051, serves /metrics on 9400 and tokenizes with the embedded stdlib-llama model.

# ---- build: a wheel of the package (setup.py generates the gRPC stubs with grpcio-tools) ----
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml setup.py MANIFEST.in ./
COPY protos/ protos/
COPY scheduler_svc/ scheduler_svc/
COPY executor_svc/ executor_svc/
COPY clients/ clients/
# The whole package: the `pagedserve` CLI (healthcheck) imports the client and the executor's config,
# none of which imports torch.
RUN pip wheel --no-cache-dir --disable-pip-version-check --no-deps --wheel-dir /wheels .

# ---- runtime ----
FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PAGEDSERVE_DEFAULT_MODEL=/opt/pagedserve/models/stdlib-llama \
    PAGEDSERVE_HOST=0.0.0.0
RUN groupadd --system --gid 10001 pagedserve \
    && useradd --system --uid 10001 --gid pagedserve --create-home --home-dir /home/pagedserve pagedserve
COPY --from=build /wheels/ /tmp/wheels/
# Installed by file name, never by project name: an index could hold an unrelated "pagedserve". The
# dependency ranges are pyproject.toml's (DL3013 asks for pins the project does not keep).
# hadolint ignore=DL3013
RUN set -- /tmp/wheels/pagedserve-*.whl \
    && pip install --no-cache-dir --disable-pip-version-check "$1[scheduler]" \
    && rm -rf /tmp/wheels
# An installed (non-editable) package cannot find the repository's models/ beside its modules, so the
# embedded model lives here and PAGEDSERVE_DEFAULT_MODEL (above) points at it.
COPY models/stdlib-llama/ /opt/pagedserve/models/stdlib-llama/

USER 10001:10001
WORKDIR /home/pagedserve
EXPOSE 50051 8000 9400
# Health is SERVING only while every executor rank serves; the port follows PAGEDSERVE_PORT.
HEALTHCHECK --interval=10s --timeout=5s --start-period=60s --retries=3 \
    CMD ["sh", "-c", "pagedserve healthcheck --target 127.0.0.1:${PAGEDSERVE_PORT:-50051}"]
CMD ["pagedserve-scheduler"]
