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
# CUDA: two flavours, picked with --build-arg CUDA_FLAVOUR=...
#   cu130 (default): torch==2.15.0's default Linux wheel on PyPI, a CUDA 13 build that brings its own
#       CUDA user-space libraries (cuda-toolkit 13.2.2, nvidia-cudnn-cu13; they run on CUDA 13.0
#       drivers through CUDA's minor-version compatibility), and onnxruntime-gpu 1.31.1 (CUDA 13).
#       Hosts need a driver that supports CUDA 13 (R580 or newer).
#   cu128: the same torch release as PyTorch's own CUDA 12.8 wheels (torch==2.15.0+cu128 from
#       https://download.pytorch.org/whl/cu128) and onnxruntime-gpu 1.26.0, the newest release on PyPI
#       built for CUDA 12. Hosts need a driver that supports CUDA 12.8 (R570 or newer).
#   docker build --build-arg CUDA_FLAVOUR=cu128 -t hallo3-worker:cu128 .
# Each flavour's base is NVIDIA's CUDA "base" image of that version (driver capabilities and the
# NVIDIA_REQUIRE_CUDA check; the "runtime" flavour would duplicate ~3 GB of libraries the wheels
# already ship), and it sets RUNPOD_MIN_CUDA_VERSION so that the SDK's start-up check rejects a host
# whose driver is too old for it.
#
# Start-up: loading ~40 GB of weights can pass Runpod's 7-minute cold-start limit on a network
# volume. Set RUNPOD_INIT_TIMEOUT (seconds, e.g. 900) on the endpoint in that case.

ARG CUDA_FLAVOUR=cu130
ARG WEIGHTS_MODE=volume

# ---- the CUDA flavours: base image and the lowest CUDA version the host driver must support ---------
FROM nvidia/cuda:13.0.0-base-ubuntu24.04 AS cuda-cu130
ENV RUNPOD_MIN_CUDA_VERSION=13.0

FROM nvidia/cuda:12.8.1-base-ubuntu24.04 AS cuda-cu128
ENV RUNPOD_MIN_CUDA_VERSION=12.8

# ---- base: Python 3.11 (deadsnakes; Ubuntu 24.04 ships 3.12) and the system libraries --------------
# cuda-${CUDA_FLAVOUR} is one of the two stages above, not a registry image (DL3006 does not apply).
# hadolint ignore=DL3006
FROM cuda-${CUDA_FLAVOUR} AS base
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
ARG CUDA_FLAVOUR
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends build-essential python3.11-dev \
 && rm -rf /var/lib/apt/lists/*
RUN python3.11 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /build
COPY requirements.txt requirements-nodeps.txt constraints.txt builder/requirements-image*.txt ./
# Same order as the Makefile: torch first (pinned by constraints.txt; the cu128 flavour takes it from
# PyTorch's CUDA 12.8 index, whose 2.15.0+cu128 satisfies the pin), then the pinned set with the CPU
# onnxruntime swapped for the flavour's onnxruntime-gpu, then the --no-deps packages.
RUN case "$CUDA_FLAVOUR" in \
        cu130) torch_index=https://pypi.org/simple ;; \
        cu128) torch_index=https://download.pytorch.org/whl/cu128 ;; \
        *) echo "CUDA_FLAVOUR must be cu130 or cu128, not '$CUDA_FLAVOUR'" >&2; exit 1 ;; \
    esac \
 && pip install pip==26.3 \
 && pip install --index-url "$torch_index" -c constraints.txt torch \
 && grep -v -E '^onnxruntime==' requirements.txt > requirements-gpu.txt \
 && pip install -c constraints.txt -r requirements-gpu.txt -r requirements-image.txt -r "requirements-image-$CUDA_FLAVOUR.txt" \
 && pip install -c constraints.txt --no-deps -r requirements-nodeps.txt
COPY pyproject.toml ./
COPY src ./src
RUN pip install --no-deps .

# ---- runtime: the worker without weights ------------------------------------------------------------
FROM base AS runtime
COPY --from=deps /opt/venv /opt/venv
# HF_HUB_OFFLINE: the worker only reads local weights (RUNPOD_MIN_CUDA_VERSION comes from the flavour's
# stage). Expandable segments reduce fragmentation-driven OOMs over many jobs.
ENV PATH=/opt/venv/bin:$PATH \
    HF_HUB_OFFLINE=1 \
    HF_HUB_DISABLE_TELEMETRY=1 \
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
