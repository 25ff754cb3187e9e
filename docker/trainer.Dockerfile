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
COPY pyproject.toml README.md ./
COPY oodguard ./oodguard
COPY training ./training
COPY service ./service
RUN pip install ".[train,serve]"

VOLUME ["/data", "/runs", "/models"]
ENTRYPOINT ["oodguard"]
CMD ["--help"]
