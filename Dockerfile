# VibeVoice RunPod serverless worker. Two images from one file (docs/operations.md#deployment-choices):
#
#   docker build -t vibevoice-worker .                       # self-contained (the default target)
#   docker build --build-arg BAKE_MODEL=vibevoice/VibeVoice-7B-hf \
#       --secret id=hf_token,env=HF_TOKEN -t vibevoice-worker:baked .
#   docker build --target volume -t vibevoice-worker:volume .
#
# Self-contained: the dependencies are installed at build time (VIBEVOICE_PYTHON); the model comes from
# RunPod's cached models, a network volume if one is attached, a download, or is baked in. It is the
# default because it needs no volume: RunPod Hub builds the default target, and a worker without a
# volume would otherwise rebuild the 7.5 GB venv at every cold start. Network-volume mode: the image
# holds Python and the code only; bootstrap.sh builds the venv and the model cache on /runpod-volume on
# the first boot (and warns, in one line, when no volume is attached).
#
# The base is CUDA's smallest image: torch's wheels bring their own CUDA runtime, cuBLAS, cuDNN and
# NCCL (nvidia-* packages in the venv), and the flash-attn wheel is prebuilt, so neither needs the
# toolkit, headers or nvcc of a devel image; the base image adds the settings that make the NVIDIA
# container runtime mount the host's driver, and refuses hosts whose driver is older than CUDA 12.8.
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-base-ubuntu24.04

FROM ${CUDA_IMAGE} AS base
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# RUNPOD_INIT_TIMEOUT: a first boot (venv and model download) takes longer than RunPod's default 420 s.
ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    APP_DIR=/app \
    RUNPOD_INIT_TIMEOUT=2400
# Ubuntu 24.04's python3 is 3.12. Versions come from the pinned base image's release.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends \
        python3 python3-venv libsndfile1 ca-certificates util-linux \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /app

# --- network-volume mode: the venv and the model on the volume, built by the first boot -----------------
FROM base AS volume
COPY . /app
CMD ["bash", "/app/bootstrap.sh"]

# --- self-contained (the default target, last): dependencies (and optionally the model) in the image ------
FROM base AS self-contained
ARG TORCH_SPEC=torch==2.8.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128
ARG FLASH_ATTN_SPEC=https://github.com/Dao-AILab/flash-attention/releases/download/v2.8.3/flash_attn-2.8.3+cu12torch2.8cxx11abiTRUE-cp312-cp312-linux_x86_64.whl
COPY requirements.txt /app/requirements.txt
RUN python3 -m venv /opt/venv \
    && /opt/venv/bin/pip install --no-cache-dir --index-url "$TORCH_INDEX_URL" "$TORCH_SPEC" \
    && if [ -n "$FLASH_ATTN_SPEC" ]; then /opt/venv/bin/pip install --no-cache-dir "$FLASH_ATTN_SPEC"; fi \
    && /opt/venv/bin/pip install --no-cache-dir -r /app/requirements.txt
# BAKE_MODEL=<hub id> downloads the model at build time (converted when it is in the community layout).
ARG BAKE_MODEL=""
COPY deploy/ /app/deploy/
RUN --mount=type=secret,id=hf_token,required=false \
    if [ -n "$BAKE_MODEL" ]; then \
        HF_TOKEN="$(cat /run/secrets/hf_token 2>/dev/null || true)" \
        /opt/venv/bin/python -c "import os, sys; from huggingface_hub import snapshot_download; \
snapshot_download(sys.argv[1], local_dir='/opt/model-src', token=os.environ.get('HF_TOKEN') or None)" "$BAKE_MODEL" \
        && if grep -q '"decoder_config"' /opt/model-src/config.json; then \
            /opt/venv/bin/python -m deploy.convert_checkpoint /opt/model-src /opt/vibevoice-model && rm -rf /opt/model-src; \
        else mv /opt/model-src /opt/vibevoice-model; fi \
        && rm -rf /root/.cache/huggingface; \
    fi
ENV VIBEVOICE_PYTHON=/opt/venv/bin/python
COPY . /app
CMD ["bash", "/app/bootstrap.sh"]
