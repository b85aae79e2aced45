# syntax=docker/dockerfile:1.7
#
# Hallo3 talking-head worker for Runpod serverless (deployment guide: docs/deploy.md).
#
#   docker build -t hallo3-worker .
#       WEIGHTS_MODE=volume (default): no weights in the image; they come from the endpoint's cached
#       model (fudan-generative-ai/hallo3) or a network volume.
#   docker build --build-arg WEIGHTS_MODE=baked --secret id=HF_TOKEN,env=HF_TOKEN -t hallo3-worker:baked .
#       downloads and converts the weights into /opt/hallo3/weights at build time (about 40 GB
#       more image; the token is optional because the repository is public, and is only ever
#       mounted as a BuildKit secret, never stored in a layer).
#
# CUDA: torch==2.13.0's default Linux wheel on PyPI depends on cuda-toolkit 13.0.3 and
# nvidia-cudnn-cu13, i.e. it is a CUDA 13.0 build that brings its own CUDA user-space libraries.
# The base is therefore NVIDIA's CUDA 13.0 "base" image (driver capabilities and the
# NVIDIA_REQUIRE_CUDA check; the "runtime" flavour would duplicate ~3 GB of libraries the wheels
# already ship). Hosts need a driver that supports CUDA 13 (R580 or newer).
#
# Start-up: loading ~40 GB of weights can pass Runpod's 7-minute cold-start limit on a network
# volume. Set RUNPOD_INIT_TIMEOUT (seconds, e.g. 900) on the endpoint in that case.

ARG CUDA_IMAGE=nvidia/cuda:13.0.0-base-ubuntu24.04
ARG WEIGHTS_MODE=volume

# ---- base: Python 3.11 (deadsnakes; Ubuntu 24.04 ships 3.12) and the system libraries --------------
FROM ${CUDA_IMAGE} AS base
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
# ffmpeg: audio decoding fallbacks and pydub (vocal separation); libgl1/libglib2.0-0t64/libegl1/libgles2:
# OpenCV and MediaPipe shared-library needs. Not version-pinned (DL3008): Ubuntu and the PPA drop
# superseded versions, so exact pins break rebuilds; the base image tag pins the distribution.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates gpg-agent software-properties-common \
 && add-apt-repository -y ppa:deadsnakes/ppa \
 && apt-get install -y --no-install-recommends \
        python3.11 python3.11-venv ffmpeg libgl1 libglib2.0-0t64 libegl1 libgles2 \
 && apt-get purge -y --auto-remove software-properties-common gpg-agent \
 && rm -rf /var/lib/apt/lists/*

# ---- deps: build the virtual environment (compilers stay in this stage) ---------------------------
FROM base AS deps
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends build-essential python3.11-dev \
 && rm -rf /var/lib/apt/lists/*
RUN python3.11 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /build
COPY requirements.txt requirements-nodeps.txt constraints.txt builder/requirements-image.txt ./
# Same order as the Makefile: torch first (pinned by constraints.txt), then the pinned set with the
# CPU onnxruntime swapped for onnxruntime-gpu, then the --no-deps packages.
RUN pip install pip==25.3 \
 && pip install -c constraints.txt torch \
 && grep -v -E '^onnxruntime==' requirements.txt > requirements-gpu.txt \
 && pip install -c constraints.txt -r requirements-gpu.txt -r requirements-image.txt \
 && pip install -c constraints.txt --no-deps -r requirements-nodeps.txt
COPY pyproject.toml ./
COPY src ./src
RUN pip install --no-deps .

# ---- runtime: the worker without weights ------------------------------------------------------------
FROM base AS runtime
COPY --from=deps /opt/venv /opt/venv
# HF_HUB_OFFLINE: the worker only reads local weights. RUNPOD_MIN_CUDA_VERSION: the SDK's start-up
# system check then rejects hosts whose driver cannot run this CUDA 13 build. Expandable segments
# reduce fragmentation-driven OOMs over many jobs.
ENV PATH=/opt/venv/bin:$PATH \
    HF_HUB_OFFLINE=1 \
    HF_HUB_DISABLE_TELEMETRY=1 \
    RUNPOD_MIN_CUDA_VERSION=13.0 \
    PYTORCH_ALLOC_CONF=expandable_segments:True
WORKDIR /app
COPY handler.py test_input.json ./
COPY builder ./builder

# ---- weights: "volume" adds nothing; "baked" downloads and converts at build time --------------------
FROM runtime AS weights-volume

FROM runtime AS weights-baked
# One layer: download, convert to safetensors, delete the two SAT checkpoints the worker no longer
# needs (~30 GB), then verify what is left. The raw checkpoints never reach a layer.
RUN --mount=type=secret,id=HF_TOKEN,required=false \
    HF_HUB_OFFLINE=0 python builder/download_weights.py --target /opt/hallo3/weights --token-file /run/secrets/HF_TOKEN \
 && python builder/convert_weights.py --weights-dir /opt/hallo3/weights --delete-sources \
 && python builder/download_weights.py --target /opt/hallo3/weights --verify size
ENV HALLO3_WEIGHTS_DIR=/opt/hallo3/weights

# ---- final --------------------------------------------------------------------------------------
# weights-${WEIGHTS_MODE} is one of the two stages above, not a registry image, so DL3006 (tag the
# image) does not apply.
# hadolint ignore=DL3006
FROM weights-${WEIGHTS_MODE} AS final
CMD ["python", "-u", "handler.py"]
