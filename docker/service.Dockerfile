# Slim inference image: onnxruntime + FastAPI, no torch. Build from the repo root:
#   docker build -f docker/service.Dockerfile -t oodguard-service .
ARG BASE=python:3.11-slim
FROM ${BASE}

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /opt/oodguard
# Dependencies first (cached layer): exactly the locked `serve` set, hashes checked; no torch in
# this image. Then the code, without dependencies.
COPY locks/serve.txt ./locks/serve.txt
RUN pip install --no-compile --require-hashes --no-deps -r locks/serve.txt
COPY pyproject.toml README.md ./
COPY oodguard ./oodguard
COPY training ./training
COPY service ./service
RUN pip install --no-compile --no-deps --no-build-isolation ".[serve]" \
 && useradd --system --uid 10001 --home-dir /nonexistent --shell /usr/sbin/nologin oodguard \
 && mkdir -p /models && chown oodguard /models

# The default bundle is baked in; /models is a volume for bundles deployed later (hot-swap).
COPY models/default /opt/oodguard/models/default

ENV OODGUARD_HOST=0.0.0.0 \
    OODGUARD_PORT=8000 \
    OODGUARD_BUNDLE=/opt/oodguard/models/default \
    OODGUARD_MODELS_DIR=/models \
    OMP_NUM_THREADS=1

VOLUME ["/models"]
USER oodguard
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=3s --start-period=20s --retries=3 \
  CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=2)" || exit 1

ENTRYPOINT ["oodguard"]
CMD ["serve"]
