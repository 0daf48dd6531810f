# syntax=docker/dockerfile:1
# TicketSmith image: one environment (conda.yaml) in two flavours.
#
#   docker build -t ticketsmith:latest .                          # CUDA flavour (GPU node pools)
#   docker build --build-arg FLAVOR=cpu -t ticketsmith:cpu .      # CPU flavour (CPU pools, laptops)
#
#   docker run --rm ticketsmith:cpu prune --config configs/tiny.yaml --no-tracking
#
# The entry point is the `ticketsmith` CLI; a command that is an executable (`python ...`, as
# MLflow Projects pass one) runs as given. The project lives in /mlflow/projects/code, the
# directory MLflow's Kubernetes backend copies the current project into with --build-image, and
# is installed editable from there, so that copy is the code that runs. It runs as the non-root
# user `ticketsmith` (uid 10001, as the Job templates' securityContext expects).

ARG FLAVOR=cuda
# torch 2.14.1's default wheels bundle the CUDA 13 runtime; the node provides the driver, which
# must be R580 or newer (CUDA 13): on an older one torch sees no GPU, and a Job asking for
# `cuda` fails at once with exit code 2 (see docs/kubernetes.md). The
# CUDA base image adds the driver-compatibility check (NVIDIA_REQUIRE_CUDA) and the
# /usr/local/nvidia paths GKE mounts its driver at.
ARG CUDA_BASE=nvidia/cuda:13.0.0-base-ubuntu24.04
ARG CPU_BASE=ubuntu:24.04
ARG MICROMAMBA_IMAGE=mambaorg/micromamba:2.0.5

FROM ${MICROMAMBA_IMAGE} AS micromamba

FROM ${CUDA_BASE} AS base-cuda
FROM ${CPU_BASE} AS base-cpu

# hadolint ignore=DL3006
FROM base-${FLAVOR} AS runtime
ARG FLAVOR
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ENV DEBIAN_FRONTEND=noninteractive \
    LANG=C.UTF-8 \
    PATH=/opt/conda/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    GIT_PYTHON_REFRESH=quiet \
    MPLCONFIGDIR=/tmp/matplotlib

# tini as PID 1: forwards SIGTERM (Job deletion) to Python and reaps data-loader workers.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates tini \
    && rm -rf /var/lib/apt/lists/*

# The Python environment, from the same spec as `mlflow run` / conda users (conda.yaml). The CPU
# flavour takes torch from PyTorch's CPU wheel index (same version, no CUDA libraries).
COPY --from=micromamba /bin/micromamba /usr/local/bin/micromamba
COPY conda.yaml /tmp/conda.yaml
RUN if [ "$FLAVOR" = "cpu" ]; then \
        export PIP_INDEX_URL=https://download.pytorch.org/whl/cpu \
               PIP_EXTRA_INDEX_URL=https://pypi.org/simple; \
    elif [ "$FLAVOR" != "cuda" ]; then \
        echo "FLAVOR must be cuda or cpu, got '$FLAVOR'" >&2; exit 1; \
    fi \
    && micromamba create --yes --prefix /opt/conda --file /tmp/conda.yaml \
    && micromamba clean --all --yes \
    && rm -rf /tmp/conda.yaml /root/.cache

RUN groupadd --gid 10001 ticketsmith \
    && useradd --uid 10001 --gid 10001 --create-home --shell /usr/sbin/nologin ticketsmith

# The package (editable, see above) with the cloud extra: Azure Blob and GCS artifact stores,
# PostgreSQL for the tracking server, the Kubernetes client for scripts/submit_job.py.
WORKDIR /mlflow/projects/code
COPY pyproject.toml README.md ./
COPY ticketsmith ./ticketsmith
RUN pip install --no-cache-dir --editable ".[cloud]" \
    && python -c "import ticketsmith.cli, mlflow, azure.storage.blob, google.cloud.storage, psycopg2, flask_wtf, kubernetes, pynvml"
COPY MLproject conda.yaml ./
COPY entrypoints ./entrypoints
COPY configs ./configs
COPY scripts ./scripts

# Scratch directories the non-root user writes (the Job templates mount volumes over runs/ and
# data/); the code itself stays root-owned and read-only to the user. The entry-point script's
# "$@" are meant literally (single quotes): SC2016 does not apply.
# hadolint ignore=SC2016
RUN mkdir -p runs data /tmp/matplotlib \
    && chown ticketsmith:ticketsmith runs data /tmp/matplotlib . \
    && printf '%s\n' \
        '#!/bin/sh' \
        '# `IMAGE prune --config ...` runs the ticketsmith CLI; an executable (python, sh) runs as given.' \
        'case "$1" in ""|-*) exec ticketsmith "$@" ;; esac' \
        'if command -v "$1" >/dev/null 2>&1; then exec "$@"; fi' \
        'exec ticketsmith "$@"' \
        > /usr/local/bin/ticketsmith-entrypoint \
    && chmod 0755 /usr/local/bin/ticketsmith-entrypoint

USER 10001:10001
# CUBLAS_WORKSPACE_CONFIG: a fixed cuBLAS workspace, without which torch refuses deterministic
# matmuls on CUDA (train.determinism); it must be set before the first cuBLAS call.
ENV HOME=/home/ticketsmith \
    CUBLAS_WORKSPACE_CONFIG=:4096:8
LABEL org.opencontainers.image.title="ticketsmith" \
      org.opencontainers.image.description="Lottery Ticket Hypothesis experiments with MLflow" \
      ai.ticketsmith.flavor="${FLAVOR}"
ENTRYPOINT ["/usr/bin/tini", "--", "/usr/local/bin/ticketsmith-entrypoint"]
CMD ["--help"]
