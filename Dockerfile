# syntax=docker/dockerfile:1
# fsar gateway: the HTTP API (FastAPI + uvicorn), video decoding (PyAV) and the Triton gRPC client.
# The default image has NO torch: the model runs in Triton (docker/triton.Dockerfile).
#
#   docker build -t fsar-gateway .
#
# An embedded image (the model in-process, no Triton) adds the `train` extra; torch from PyPI is
# the CUDA build, add the CPU index for a CPU-only image:
#
#   docker build -t fsar-gateway:embedded --build-arg EXTRAS=serve,triton,train \
#     --build-arg FSAR_BACKEND=embedded \
#     --build-arg PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu .
#
# PyAV's wheels bundle FFmpeg, so no system ffmpeg (and no apt-get) is needed.

ARG PYTHON_IMAGE=python:3.11-slim

# --------------------------------------------------------------------------- builder
# A virtual environment at /opt/venv with fsar and its extras installed (not editable).
FROM ${PYTHON_IMAGE} AS builder

# Extras of the fsar package to install (serve,triton = gateway for a Triton backend).
ARG EXTRAS=serve,triton
# Optional extra package index (e.g. https://download.pytorch.org/whl/cpu for CPU-only torch).
ARG PIP_EXTRA_INDEX_URL=""

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

WORKDIR /src
COPY pyproject.toml README.md constraints.txt ./
COPY training/ training/
COPY service/ service/
# constraints.txt pins torch/torchvision (used only when EXTRAS include train).
RUN pip install --no-cache-dir -c constraints.txt ".[${EXTRAS}]" \
    && fsar --help > /dev/null

# --------------------------------------------------------------------------- runtime
FROM ${PYTHON_IMAGE} AS runtime

# Backend the image starts with: triton (default image) or embedded (image built with train).
ARG FSAR_BACKEND=triton

LABEL org.opencontainers.image.title="fsar-gateway" \
      org.opencontainers.image.description="fsar gateway: few-shot / zero-shot video action recognition API"

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    FSAR_HOST=0.0.0.0 \
    FSAR_PORT=8080 \
    FSAR_BACKEND=${FSAR_BACKEND}

# ~/.cache exists and belongs to fsar, so a volume mounted there (embedded image: downloaded CLIP
# weights) is writable.
RUN groupadd --system --gid 10001 fsar \
    && useradd --system --uid 10001 --gid fsar --create-home --home-dir /home/fsar \
       --shell /usr/sbin/nologin fsar \
    && install -d -o fsar -g fsar /home/fsar/.cache

COPY --from=builder /opt/venv /opt/venv

# Numeric user so orchestrators can verify runAsNonRoot.
USER 10001:10001
WORKDIR /home/fsar

# Documentation only: the server listens on $FSAR_PORT (8080 unless overridden).
EXPOSE 8080

# Process liveness through the API's /healthz on $FSAR_PORT (python, no curl in slim images).
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('FSAR_PORT', '8080'), timeout=4)"]

CMD ["fsar", "serve"]
