#!/usr/bin/env bash
# Install and run the whole service on embedded defaults:
# SQLite in var/, a local Redis (started if none answers), migrations,
# one classification worker, one webhook worker and one API process (gunicorn) on port ${PORT:-5000}. Ctrl-C stops all.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh requirements.txt
scripts/services.sh
mkdir -p var

# Without network, Keras finds no weights to download: use the development copies when present.
assets="../shared/assets/keras_home"
if [ -z "${KERAS_HOME:-}" ] && [ -d "$assets/models" ] && [ ! -f "$HOME/.keras/models/mobilenet_7_5_224_tf.h5" ]; then
  mkdir -p var/keras_home/models && cp -n "$assets"/models/* var/keras_home/models/
  export KERAS_HOME="$PWD/var/keras_home"
fi

.venv/bin/python -m shared.migrate upgrade
.venv/bin/celery -A worker.celery_app worker --loglevel "${LOG_LEVEL:-INFO}" \
  >>var/worker.log 2>&1 &
worker=$!
.venv/bin/celery -A worker.webhook_app worker --pool threads --concurrency 8 \
  --loglevel "${LOG_LEVEL:-INFO}" >>var/webhooks.log 2>&1 &
webhooks=$!
trap 'kill "$worker" "$webhooks" 2>/dev/null; wait "$worker" "$webhooks" 2>/dev/null' EXIT INT TERM
echo "workers started (logs in var/worker.log and var/webhooks.log)"
echo "API on http://127.0.0.1:${PORT:-5000}  (docs: /docs, spec: /openapi.json)"
.venv/bin/gunicorn --bind "0.0.0.0:${PORT:-5000}" --worker-class gthread \
  --workers "${API_WORKERS:-1}" --threads "${API_THREADS:-32}" --timeout 90 \
  --graceful-timeout 30 'api.wsgi:app'
