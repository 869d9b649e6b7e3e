#!/usr/bin/env bash
# Install and run the whole service on embedded defaults:
# SQLite in var/, a local Redis (started if none answers), migrations,
# one classification worker, one webhook worker and the API (gunicorn) on
# http://${HOST:-127.0.0.1}:${PORT:-5000}.
#
# Ctrl-C (or SIGTERM) stops all of them, and the Redis this script started, if it
# started one. If one of them dies on its own, the others are stopped and the
# script says which one died, with the end of its log, and exits 1.
set -euo pipefail
# Started with SIGINT ignored (a background job of a script or a tool, as POSIX makes
# them), this shell could not trap it, while Celery installs its own handler anyway:
# SIGINT then stopped the workers behind this script's back (exit 1, "exited on its
# own", issue #24). Ctrl-C and SIGINT mean stop here: restart with the default action.
if [ -n "$(trap -p INT)" ] && env --default-signal=INT true 2>/dev/null; then
  exec env --default-signal=INT "$0" "$@"
fi
cd "$(dirname "$0")/.."
scripts/bootstrap.sh requirements.txt
mkdir -p var
services_out="$(scripts/services.sh)"
[ -n "$services_out" ] && echo "$services_out"
own_redis=""
if [[ "$services_out" == *"started redis-server"* ]]; then
  own_redis="var/redis/redis.pid"
fi

# Without network, Keras finds no weights to download: use the development copies when present.
assets="../shared/assets/keras_home"
if [ -z "${KERAS_HOME:-}" ] && [ -d "$assets/models" ] && [ ! -f "$HOME/.keras/models/mobilenet_7_5_224_tf.h5" ]; then
  mkdir -p var/keras_home/models && cp -n "$assets"/models/* var/keras_home/models/
  export KERAS_HOME="$PWD/var/keras_home"
fi

.venv/bin/python -m shared.migrate upgrade

# Each child runs in a process group of its own (set -m), so Ctrl-C (SIGINT to the
# terminal's process group) and a SIGTERM to make's group reach only this script, which
# alone decides to stop, then stops them with SIGTERM (Celery's warm shutdown exits 0;
# on SIGINT it exits 1). A child never exits because of the signal that stops us, so
# `wait -n` below sees only deaths of their own. And gunicorn's worker would get the
# SIGINT and, at once, the master's SIGQUIT: its quit handler can deadlock on its
# thread pool's lock (the master then SIGKILLs the worker).
declare -A names logs
start() {  # start NAME LOG COMMAND...: run COMMAND in the background, output to LOG (- : here)
  local name="$1" log="$2"
  shift 2
  set -m
  if [ "$log" = - ]; then "$@" </dev/null & else "$@" </dev/null >>"$log" 2>&1 & fi
  set +m
  names[$!]="$name"
  logs[$!]="$log"
}

stop_all() {
  trap '' INT TERM HUP  # a second Ctrl-C must not interrupt the clean-up
  kill -TERM "${!names[@]}" 2>/dev/null || true
  # Celery finishes the batches in flight (WORKER_SHUTDOWN_TIMEOUT_S); then force.
  for _ in $(seq 700); do
    alive=""
    for pid in "${!names[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
    [ -z "$alive" ] && break
    sleep 0.1
  done
  kill -KILL "${!names[@]}" 2>/dev/null || true
  if [ -n "$own_redis" ] && [ -f "$own_redis" ]; then
    local redis_pid
    redis_pid="$(cat "$own_redis")"
    kill -TERM "$redis_pid" 2>/dev/null || true
    # It writes its append-only file first: wait, so "stopped" means stopped.
    for _ in $(seq 100); do kill -0 "$redis_pid" 2>/dev/null || break; sleep 0.1; done
    echo "stopped the redis-server this command started"
  fi
}

on_signal() {
  echo "stopping…"
  stop_all
  echo "stopped"
  exit 0  # a requested stop is not an error (make prints none)
}
trap on_signal INT TERM HUP  # HUP: the terminal closed

start "classification worker" var/worker.log \
  .venv/bin/celery -A worker.celery_app worker --loglevel "${LOG_LEVEL:-INFO}"
start "webhook worker" var/webhooks.log \
  .venv/bin/celery -A worker.webhook_app worker --pool threads --concurrency 8 \
  --loglevel "${LOG_LEVEL:-INFO}"
start "API (gunicorn)" - env HOST="${HOST:-127.0.0.1}" \
  .venv/bin/gunicorn -c gunicorn.conf.py --workers "${API_WORKERS:-1}" \
  --threads "${API_THREADS:-32}" --graceful-timeout 10 'api.wsgi:app'
echo "workers started (logs in var/worker.log and var/webhooks.log; the API logs here)"
echo "API on http://${HOST:-127.0.0.1}:${PORT:-5000}  (docs: /docs, spec: /openapi.json); Ctrl-C stops everything"

set +e
wait -n -p died "${!names[@]}"
rc=$?
trap '' INT TERM HUP
how="with code $rc"
# 137 = SIGKILL, most often the kernel's out-of-memory killer (see dmesg).
[ "$rc" -gt 128 ] && how="killed by signal $((rc - 128))$([ "$rc" = 137 ] && echo ' (SIGKILL: out of memory?)')"
echo "run: the ${names[$died]} exited on its own, $how" >&2
if [ "${logs[$died]}" != - ]; then
  echo "run: last lines of ${logs[$died]}:" >&2
  tail -n 15 "${logs[$died]}" >&2
fi
echo "run: stopping everything; fix the cause and run 'make run' again" >&2
unset "names[$died]"
stop_all
exit 1
