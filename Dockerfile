# syntax=docker/dockerfile:1
#
# One image for every process of the service; docker-compose.yml picks the command:
#   API (the default CMD)  gunicorn -c gunicorn.conf.py api.wsgi:app
#   classifier worker      celery -A worker.celery_app worker --loglevel INFO
#   webhook worker         celery -A worker.webhook_app worker --pool threads --concurrency 8 -Q imgclf.webhooks
#   migrations             python -m shared.migrate upgrade
#
# Builds (docs/deploy.md):
#   docker build -t imgclf .                                      CPU (tensorflow-cpu)
#   docker build -t imgclf:gpu --build-arg TF_PACKAGE='tensorflow[and-cuda]==2.21.0' .
#   docker build -t imgclf --build-arg FETCH_WEIGHTS=0 .          no network at build time:
#       mount a Keras cache holding the weights at /home/app/.keras instead
#   docker build -t imgclf --build-arg FETCH_MODELS=mobilenet,inception_v3 .
#       bake the weights of every model MODELS will name

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# --- builder: a virtual environment with the pinned requirements ----------------------
FROM ${PYTHON_IMAGE} AS builder

# requirements.txt pins the CPU build of TensorFlow; the GPU image asks for
# TensorFlow's CUDA build (CUDA and cuDNN come as pip wheels; the host needs only the
# NVIDIA driver and the NVIDIA container toolkit).
ARG TF_PACKAGE=tensorflow-cpu==2.21.0

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1

# Compilers for any dependency without a wheel for this platform (none on x86-64
# today); they stay in this stage.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends build-essential \
    && rm -rf /var/lib/apt/lists/*

RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

# Requirements before the source, so a code change reuses this (large) layer.
COPY requirements.txt /tmp/requirements.txt
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
RUN grep -vE '^[[:space:]]*tensorflow(-cpu)?([[:space:]]*[=<>!~[]|$)' /tmp/requirements.txt \
        > /tmp/requirements.image.txt \
    && pip install --no-cache-dir -r /tmp/requirements.image.txt "${TF_PACKAGE}" \
    && pip check

# --- runtime: slim Python, the venv, the code, a non-root user -------------------------
FROM ${PYTHON_IMAGE} AS runtime

LABEL org.opencontainers.image.title="imgclf" \
      org.opencontainers.image.description="Queued batch image classification: API, workers, migrations"

RUN groupadd --system --gid 10001 app \
    && useradd --system --uid 10001 --gid app --create-home --home-dir /home/app \
        --shell /usr/sbin/nologin app

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    KERAS_HOME=/home/app/.keras

COPY --from=builder /opt/venv /opt/venv

WORKDIR /app
# var/: the embedded SQLite default (DATABASE_URL unset) and MODEL_DIR's default.
# /tmp/imgclf-metrics: PROMETHEUS_MULTIPROC_DIR of the api service (a tmpfs there;
# it exists here too so that `docker compose run api flask ...` finds it).
RUN mkdir -p /app/var "${KERAS_HOME}/models" /tmp/imgclf-metrics \
    && chown -R app:app /app/var /home/app /tmp/imgclf-metrics

USER 10001:10001

# ImageNet weights and class index into $KERAS_HOME/models, the way the workers load
# them (keras.utils.get_file); before the source COPY, so code changes keep this layer.
# FETCH_WEIGHTS=1 needs network at build time and fails the build without it;
# FETCH_WEIGHTS=0 skips (mount a Keras cache at /home/app/.keras instead).
# FETCH_MODELS: the models to fetch, comma-separated, as in MODELS.
ARG FETCH_WEIGHTS=1
ARG FETCH_MODELS=mobilenet
RUN if [ "${FETCH_WEIGHTS}" = "1" ]; then \
        python -c "import os, keras; \
A = keras.applications; \
build = {'mobilenet': lambda: A.MobileNet(alpha=0.75, weights='imagenet'), \
'mobilenet_v2': lambda: A.MobileNetV2(alpha=1.0, weights='imagenet'), \
'inception_v3': lambda: A.InceptionV3(weights='imagenet')}; \
[build[m.strip()]() for m in os.environ['FETCH_MODELS'].split(',') if m.strip()]; \
keras.utils.get_file('imagenet_class_index.json', \
'https://storage.googleapis.com/download.tensorflow.org/data/imagenet_class_index.json', \
cache_subdir='models', file_hash='c2c37ea517e94d9795004a39431a14cb')" \
        && ls -l "${KERAS_HOME}/models"; \
    else \
        echo "FETCH_WEIGHTS=${FETCH_WEIGHTS}: no weights in the image; mount a Keras cache at ${KERAS_HOME}"; \
    fi

# The source last (owned by root, read-only for the app user).
COPY . /app

EXPOSE 5000

# Liveness of the API (/healthz checks no dependency). Python, since slim has no curl.
# Services that run another command (workers, migrations) override or disable it.
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('PORT', '5000'), timeout=4)"]

CMD ["gunicorn", "-c", "gunicorn.conf.py", "api.wsgi:app"]
