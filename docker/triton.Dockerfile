# syntax=docker/dockerfile:1
# Triton for fsar: NVIDIA's Triton image plus what the Python backend models (text_encoder,
# video_encoder, fewshot_head) import: torch, open_clip and this project's `training` package.
# Build from the repository root (the context is the repo; see .dockerignore):
#
#   docker build -f docker/triton.Dockerfile -t fsar-triton .
#
# Base image tag: 25.10 (nvcr.io/nvidia/tritonserver:25.10-py3).
# - "-py3" images include the Python backend (the "-py3-min" / "-cpu-only" variants are not for this).
# - 25.10 is built on CUDA 13.0.2, Ubuntu 24.04 and Python 3.12; the Python backend's stub runs the
#   system Python 3.12, so the packages below go into the system site-packages.
# - torch 2.14.1 from PyPI (pinned by constraints.txt) is the CUDA 13.0 (cu130) build, which
#   matches. torch's wheels bring their own CUDA libraries, so what the host must provide is a
#   driver that runs CUDA 13.0: R580 or newer (NVIDIA's 25.10 notes name R575 as the floor;
#   data-center GPUs on older long-term branches can use the image's forward-compatibility libs).
# - GPUs with compute capability 7.5 or newer (Turing, Ampere, Ada, Hopper, Blackwell).
# - Newer than the Triton 2.51 server (the 24.10 release) that the test suite runs locally from the
#   nvidia-pytriton wheel; the model configuration and Python backend API used are the same.
# To use another release, pass --build-arg TRITON_IMAGE=...; a CUDA 12 release (25.07 or older)
# also needs a CUDA 12 torch: --build-arg PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cu128.
ARG TRITON_IMAGE=nvcr.io/nvidia/tritonserver:25.10-py3
FROM ${TRITON_IMAGE}

# Optional extra package index for torch (see above).
ARG PIP_EXTRA_INDEX_URL=""

# PIP_BREAK_SYSTEM_PACKAGES: Ubuntu 24.04 marks the system Python as externally managed, and the
# Python backend can only see the system site-packages. HF_HOME / TORCH_HOME: CLIP weights are
# downloaded under /cache, the named volume of docker-compose.yml, and survive restarts.
ENV PIP_BREAK_SYSTEM_PACKAGES=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HF_HOME=/cache/huggingface \
    TORCH_HOME=/cache/torch \
    XDG_CACHE_HOME=/cache

WORKDIR /opt/fsar/src
COPY pyproject.toml README.md constraints.txt ./
COPY training/ training/
COPY service/ service/
# numpy<2: Triton's Python-backend stub is built against NumPy 1.x (a known issue of the 2.5x/25.xx
# releases, triton-inference-server/server#8301); with NumPy 2 it misreads every tensor.
RUN python3 -m pip install --no-cache-dir -c constraints.txt ".[train]" "numpy<2" \
    && python3 -c "import torch, open_clip, training; print('torch', torch.__version__, 'cuda', torch.version.cuda)"

# Run as an unprivileged user; /cache belongs to it so a fresh named volume inherits the owner.
RUN useradd --system --uid 10001 --create-home --home-dir /home/fsar --shell /usr/sbin/nologin fsar \
    && mkdir -p /cache/huggingface /cache/torch \
    && chown -R 10001:10001 /cache
USER 10001:10001
WORKDIR /home/fsar

# 8000 HTTP (health: /v2/health/ready), 8001 gRPC (the gateway), 8002 Prometheus metrics.
EXPOSE 8000 8001 8002

HEALTHCHECK --interval=15s --timeout=5s --start-period=600s --retries=5 \
    CMD ["curl", "-fsS", "http://127.0.0.1:8000/v2/health/ready"]

# The model repository (from `fsar export`) is mounted read-only at /models.
CMD ["tritonserver", "--model-repository=/models", "--http-port=8000", "--grpc-port=8001", "--metrics-port=8002"]
