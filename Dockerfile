# finetune on GPUs. Build: docker build -t finetune .   Run: docker run --gpus 1 finetune backbone=vgg16
#
# The official PyTorch runtime image already holds a CUDA build of torch + torchvision (Python 3.11
# in /opt/conda, CUDA 12.8, cuDNN 9: Ampere, Hopper and Blackwell GPUs), so `pip install .` only
# adds the pure-Python rest (Lightning, Hydra, torchmetrics, ...) and never pulls a second torch.
# tests/test_dockerfile.py checks this tag's torch against the `torch` requirement in pyproject.toml.
FROM pytorch/pytorch:2.9.1-cuda12.8-cudnn9-runtime

# Match these to your host user (--build-arg FINETUNE_UID=$(id -u)) so files in bind mounts are yours.
ARG FINETUNE_UID=1000
ARG FINETUNE_GID=1000

# FINETUNE_DATA / FINETUNE_CACHE are read by conf/paths/default.yaml; TORCH_HOME is where torchvision
# looks for (and downloads) ImageNet weights: $TORCH_HOME/hub/checkpoints/<file>.pth; HF_HOME, beside it on the
# same volume, is where timm's pretrained weights live (the Hugging Face hub cache).
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    FINETUNE_DATA=/data \
    FINETUNE_CACHE=/cache \
    TORCH_HOME=/torch \
    HF_HOME=/torch/huggingface \
    MPLCONFIGDIR=/tmp/matplotlib

# The volume mount points exist and belong to the runtime user before VOLUME, so named volumes
# start out writable for it.
RUN groupadd --gid "${FINETUNE_GID}" finetune \
    && useradd --no-log-init --create-home --uid "${FINETUNE_UID}" --gid finetune finetune \
    && mkdir -p /data /outputs /cache /torch \
    && chown finetune:finetune /data /outputs /cache /torch

# Only what the wheel is built from: the package, its configs (shipped as finetune.conf) and the
# README that pyproject.toml names as the long description. .dockerignore keeps the rest out.
WORKDIR /opt/finetune
COPY pyproject.toml README.md ./
COPY conf/ conf/
COPY finetune/ finetune/
# The project with its timm extra: the versions are pyproject.toml's ranges, resolved against the base image's torch.
# hadolint ignore=DL3013
RUN pip install --no-cache-dir ".[timm]"

# Numeric, so Kubernetes' runAsNonRoot and the host can tell it is not root without /etc/passwd.
USER ${FINETUNE_UID}:${FINETUNE_GID}
# Hydra writes outputs/ and multirun/ relative to the working directory: both land in /outputs.
WORKDIR /outputs
VOLUME ["/data", "/outputs", "/cache", "/torch"]

ENTRYPOINT ["python", "-m", "finetune"]
