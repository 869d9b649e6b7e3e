#!/usr/bin/env bash
# Make sure a Redis (and, with --postgres, a PostgreSQL; with --rabbitmq, a RabbitMQ)
# answers locally; start them if not. Used by the run and test commands; does nothing
# when the services already answer.
set -euo pipefail
cd "$(dirname "$0")/.."

redis_url="${REDIS_URL:-redis://127.0.0.1:6379/0}"
hostport="${redis_url#*://}"; hostport="${hostport##*@}"; hostport="${hostport%%/*}"
redis_host="${hostport%%:*}"; redis_port="${hostport##*:}"
[ "$redis_port" = "$hostport" ] && redis_port=6379

redis_up() { (exec 3<>"/dev/tcp/$redis_host/$redis_port") 2>/dev/null; }

install_pkg() {
  if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$@" >/dev/null
  else
    echo "please install: $*" >&2; exit 1
  fi
}

if ! redis_up; then
  case "$redis_host" in
    127.0.0.1|localhost) ;;
    *) echo "Redis at $redis_url does not answer" >&2; exit 1 ;;
  esac
  command -v redis-server >/dev/null || install_pkg redis-server
  mkdir -p var/redis
  # Append-only persistence: jobs queued before a restart survive it.
  redis-server --daemonize yes --bind 127.0.0.1 --port "$redis_port" --dir "$PWD/var/redis" \
    --appendonly yes --save "" --logfile "$PWD/var/redis/redis.log" \
    --pidfile "$PWD/var/redis/redis.pid"
  for _ in $(seq 50); do redis_up && break; sleep 0.1; done
  redis_up || { echo "could not start redis-server" >&2; exit 1; }
  echo "started redis-server on port $redis_port (data in var/redis)"
fi

want_postgres=0; want_rabbitmq=0
for arg in "$@"; do
  case "$arg" in
    --postgres) want_postgres=1 ;;
    --rabbitmq) want_rabbitmq=1 ;;
    *) echo "unknown option: $arg" >&2; exit 2 ;;
  esac
done

if [ "$want_postgres" = 1 ]; then
  pg_up() { (exec 3<>/dev/tcp/127.0.0.1/5432) 2>/dev/null; }
  if ! pg_up; then
    command -v pg_ctlcluster >/dev/null || install_pkg postgresql
    version="$(ls /etc/postgresql | sort -V | tail -1)"
    pg_ctlcluster --skip-systemctl-redirect "$version" main start
    for _ in $(seq 100); do pg_up && break; sleep 0.1; done
    pg_up || { echo "could not start PostgreSQL" >&2; exit 1; }
    echo "started PostgreSQL $version"
  fi
fi

if [ "$want_rabbitmq" = 1 ]; then
  # The fault tests also run on RabbitMQ (the production broker, docs/deploy.md).
  rabbit_up() { (exec 3<>/dev/tcp/127.0.0.1/5672) 2>/dev/null; }
  if ! rabbit_up; then
    command -v rabbitmq-server >/dev/null || install_pkg rabbitmq-server
    rabbitmq-server -detached
    for _ in $(seq 600); do rabbit_up && break; sleep 0.1; done
    # The port opens before the broker takes connections: wait for the app itself.
    rabbitmqctl await_startup --timeout 120 >/dev/null 2>&1 || true
    rabbit_up || { echo "could not start RabbitMQ" >&2; exit 1; }
    echo "started RabbitMQ"
  fi
fi
