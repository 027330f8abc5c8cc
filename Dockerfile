# lokr-serve image. Default: CUDA (run with --gpus all). CPU variant: --build-arg VARIANT=cpu
#   docker build -t lokr-serve .
#   docker build -t lokr-serve:cpu --build-arg VARIANT=cpu .
# Installs exactly as the README: one `make install` (a venv in /app/.venv; torch once, pinned by the Makefile's
# TORCH_SPEC, which constraints.txt pins to the same version, so pip never downloads it twice).
# Both variants start from a plain Python base: the torch wheel from PyPI bundles its own CUDA runtime and cuDNN
# (only the host's driver is needed, which `--gpus all` mounts), so a CUDA base image would hold them twice.
# The CPU variant installs torch from PyTorch's CPU wheel index (about 200 MB instead of several GB).
ARG VARIANT=cuda

FROM python:3.11-slim AS base-cuda
ENV TORCH_INDEX=""

FROM python:3.11-slim AS base-cpu
ENV TORCH_INDEX="https://download.pytorch.org/whl/cpu"

FROM base-${VARIANT}
RUN apt-get update \
 && apt-get install -y --no-install-recommends make \
 && rm -rf /var/lib/apt/lists/*
ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    TOKENIZERS_PARALLELISM=false \
    LOKR_HOST=0.0.0.0 \
    LOKR_PORT=8000 \
    LOKR_SERVE_CACHE=/home/lokr/.cache/lokr-serve \
    PATH=/app/.venv/bin:$PATH

RUN useradd --create-home --uid 10001 lokr
WORKDIR /app
COPY --chown=lokr:lokr pyproject.toml constraints.txt Makefile README.md ./
COPY --chown=lokr:lokr lokr ./lokr
COPY --chown=lokr:lokr service ./service
RUN make install PYTHON=python3 TORCH_INDEX="$TORCH_INDEX" && chown -R lokr:lokr /app
USER lokr

EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
  CMD ["python3", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/ready' % os.environ.get('LOKR_PORT', '8000'), timeout=4)"]

# Set LOKR_MODEL (a mounted model dir or hub id) to serve a real model; without it, the offline demo runs.
# Admin routes on this non-loopback bind need LOKR_ADMIN_TOKEN.
# Outside Docker, scripts/run_image_entry.py runs this same command with this same environment.
CMD ["lokr-serve", "serve"]
