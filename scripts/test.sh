#!/usr/bin/env bash
# Run the test suite against real services: installs dev requirements into .venv,
# starts Redis, PostgreSQL and RabbitMQ when they are not running, then runs pytest.
# Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh requirements-dev.txt
scripts/services.sh --postgres --rabbitmq
export IMGCLF_ASSETS="${IMGCLF_ASSETS:-$(cd .. && pwd)/shared/assets}"
exec .venv/bin/python -m pytest "$@"
