# CUDA training image: torch (CUDA build) + the `train` extra. Build from the repo root:
#   docker build -f docker/trainer.Dockerfile -t oodguard-trainer .
# Run the paper recipe on a GPU:
#   docker run --gpus all -v $PWD/runs:/runs -v /path/to/datasets:/data oodguard-trainer \
#     train --recipe paper --data /data --outliers /data --out /runs/aloe-densenet
ARG BASE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04
FROM ${BASE}

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    OODGUARD_DATA_DIR=/data

RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv python3-pip git \
 && rm -rf /var/lib/apt/lists/* \
 && python3 -m venv /opt/venv

WORKDIR /opt/oodguard
# Exactly the locked `train` + `serve` set (hashes checked; the lock is universal, so the image's
# Python 3.12 gets the same versions), then the code without dependencies.
COPY locks/train.txt ./locks/train.txt
RUN pip install --require-hashes --no-deps -r locks/train.txt
COPY pyproject.toml README.md ./
COPY oodguard ./oodguard
COPY training ./training
COPY service ./service
RUN pip install --no-deps --no-build-isolation ".[train,serve]"

VOLUME ["/data", "/runs", "/models"]
ENTRYPOINT ["oodguard"]
CMD ["--help"]
