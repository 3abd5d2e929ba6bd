# syntax=docker/dockerfile:1
# Images of the VAE service (README, "Deploy"):
#   docker build -t vae-service .                  the API: ONNX Runtime with CUDA 13 + cuDNN 9, no torch
#   docker build -t vae-trainer --target trainer .  torch, to train and export into a mounted models volume
# tests/deploy runs this file's install commands and CMD in a fresh virtualenv, and hadolint on it.

# Base image choice: python slim + the NVIDIA wheels that `onnxruntime-gpu[cuda,cudnn]` declares, rather
# than an nvidia/cuda cudnn-runtime image. pip resolves CUDA and cuDNN to the major versions this
# onnxruntime-gpu build was made for (its METADATA: nvidia-cuda-runtime~=13.0, nvidia-cudnn-cu13~=9.0 ...),
# so the two can't drift apart; the image runs the same Python (3.11) as development and CI, where these
# exact commands are tested; and there is no apt-installed second Python. The size is comparable: the
# ~2.5 GB of CUDA and cuDNN libraries dominate either way. The host needs an NVIDIA driver for CUDA 13
# (580 or later) and the NVIDIA Container Toolkit, which mounts libcuda into the container.
ARG PYTHON_VERSION=3.11
# onnxruntime-gpu's own CUDA extras bring the libraries it was built against (CUDA 13 for 1.31).
ARG ORT_VERSION=1.31.1
# Same pin as the Makefile's TORCH_VERSION (a test checks the two agree).
ARG TORCH_VERSION=2.13.0

FROM python:${PYTHON_VERSION}-slim-trixie AS base
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv
ENV PATH="${VIRTUAL_ENV}/bin:${PATH}"
# One non-root uid for the API and the trainer, so that both can use the same volumes; /models and /runs
# are the volumes' mount points (a new volume takes the owner of its mount point).
RUN groupadd --system --gid 10001 vae \
    && useradd --system --no-log-init --uid 10001 --gid vae --home-dir /nonexistent --shell /usr/sbin/nologin vae \
    && mkdir /models /runs \
    && chown vae:vae /models /runs

# ---- builder: the service and its dependencies in a virtualenv, copied whole into the runtime stage ----
FROM base AS builder
ARG ORT_VERSION
# ONNX Runtime with its CUDA and cuDNN wheels (~2.5 GB) in a layer of its own, before any of the project's
# files: the builder downloads them again when ORT_VERSION changes, not at every change to the service.
RUN python -m venv "$VIRTUAL_ENV" \
    && pip install "onnxruntime-gpu[cuda,cudnn]==${ORT_VERSION}"
WORKDIR /src
COPY pyproject.toml README.md ./
COPY service/ service/
# Without training/ in /src the service's wheel holds no trainer code; its `vae-train` script, which would
# fail to import it, goes too (the trainer stage has both).
RUN pip install . "onnxruntime-gpu[cuda,cudnn]==${ORT_VERSION}" \
    && rm "$VIRTUAL_ENV/bin/vae-train"

# ---- trainer: torch, `make train`'s two commands, writing into the models volume ----
# The CPU build of torch by default: the default recipe (digits, an MLP) trains in minutes on a CPU, and
# a CUDA torch would add gigabytes and its own CUDA version next to onnxruntime's. On a GPU host build
# with --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu130 and reserve a GPU for it.
FROM base AS trainer
ARG TORCH_VERSION
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
WORKDIR /src
COPY pyproject.toml README.md ./
COPY service/ service/
COPY training/ training/
# torch first, pinned and from the CPU index, so that the `train` extra never pulls a CUDA build.
# DL3013 (pin versions) would have the project itself pinned: its dependencies are pyproject.toml's ranges.
# hadolint ignore=DL3013
RUN python -m venv "$VIRTUAL_ENV" \
    && pip install --index-url "$TORCH_INDEX_URL" "torch==${TORCH_VERSION}" \
    && pip install ".[train]"
# matplotlib (the export's plots) wants a writable config directory.
ENV MPLCONFIGDIR=/tmp/matplotlib
USER 10001:10001
WORKDIR /runs
CMD ["sh", "-c", "python -m training train --out /runs/default && python -m training export --checkpoint /runs/default/best.pt --out /models/default"]

# ---- runtime: the API; the last stage, so the one `docker build .` builds without --target ----
FROM base AS runtime
ARG PYTHON_VERSION
# onnxruntime finds the CUDA and cuDNN libraries of the NVIDIA wheels through the loader path.
ENV LD_LIBRARY_PATH="${VIRTUAL_ENV}/lib/python${PYTHON_VERSION}/site-packages/nvidia/cu13/lib:\
${VIRTUAL_ENV}/lib/python${PYTHON_VERSION}/site-packages/nvidia/cudnn/lib"
COPY --from=builder ${VIRTUAL_ENV} ${VIRTUAL_ENV}
WORKDIR /app
COPY models/default/ models/default/
# Settings (service/config.py); override them with `docker run -e` or compose's `environment`.
ENV VAE_MODEL_DIR=/app/models/default \
    VAE_PROVIDERS=CUDAExecutionProvider,CPUExecutionProvider \
    VAE_REQUIRE_GPU=false
USER 10001:10001
EXPOSE 8000
# On SIGTERM the service stops accepting, finishes the requests in flight (at most VAE_DRAIN_TIMEOUT
# seconds), shuts the app down and exits 0.
STOPSIGNAL SIGTERM
# Python's urllib instead of curl: the slim image has no curl, and installing it adds a package to patch.
# urlopen raises on the 503 that /ready answers until the model is loaded and warm.
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/ready', timeout=4)"]
# `make serve`, listening on all interfaces of the container.
CMD ["python", "-m", "service", "--host", "0.0.0.0", "--port", "8000"]
