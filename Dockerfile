# lokr-serve image. Default: CUDA runtime base. CPU variant: --build-arg VARIANT=cpu
#   docker build -t lokr-serve .                       # GPU (run with --gpus all)
#   docker build -t lokr-serve:cpu --build-arg VARIANT=cpu .
# Installs exactly as the README: `make install` (a venv in /app/.venv, torch pinned by TORCH_SPEC).
ARG VARIANT=cuda

FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04 AS base-cuda
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv python3-pip make ca-certificates \
 && rm -rf /var/lib/apt/lists/*
# torch's default Linux wheels on PyPI bundle CUDA.
ENV TORCH_SPEC="torch>=2.4,<3"

FROM python:3.11-slim AS base-cpu
RUN apt-get update \
 && apt-get install -y --no-install-recommends make \
 && rm -rf /var/lib/apt/lists/*
# Pass PIP_EXTRA_INDEX_URL (a CPU-only torch index) at build time for a smaller CPU image.
ENV TORCH_SPEC="torch>=2.4,<3"

FROM base-${VARIANT}
ARG PIP_EXTRA_INDEX_URL=""
ENV PIP_EXTRA_INDEX_URL=${PIP_EXTRA_INDEX_URL} \
    PYTHONUNBUFFERED=1 \
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
RUN make install PYTHON=python3 TORCH_SPEC="$TORCH_SPEC" && chown -R lokr:lokr /app
USER lokr

EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
  CMD ["python3", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/ready' % os.environ.get('LOKR_PORT', '8000'), timeout=4)"]

# Set LOKR_MODEL (a mounted model dir or hub id) to serve a real model; without it, the offline demo runs.
# Admin routes on this non-loopback bind need LOKR_ADMIN_TOKEN.
CMD ["lokr-serve", "serve"]
