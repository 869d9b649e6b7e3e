.DEFAULT_GOAL := help
.PHONY: help install run test test-fast lint format worker webhook-worker api migrate bench clean

help:  ## List the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-14s %s\n", $$1, $$2}'

install:  ## Create .venv from requirements-dev.txt (runtime, training pipeline, test tools)
	scripts/bootstrap.sh requirements-dev.txt

run:  ## Install and run everything on embedded defaults (SQLite, local Redis, both workers, API on 127.0.0.1:5000)
	scripts/run_local.sh

test:  ## Run the whole test suite against real Redis, PostgreSQL, SQLite and a worker
	scripts/test.sh

test-fast:  ## Unit and API tests only: no model, browser or multi-process runs
	scripts/test.sh -m "not integration"

lint:  ## ruff lint and format check, mypy type check
	scripts/bootstrap.sh requirements-dev.txt
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .
	.venv/bin/mypy

format:  ## Apply ruff fixes and formatting
	.venv/bin/ruff check --fix .
	.venv/bin/ruff format .

migrate:  ## Apply database migrations to DATABASE_URL
	.venv/bin/python -m shared.migrate upgrade

worker:  ## Run one classification worker in the foreground
	.venv/bin/celery -A worker.celery_app worker --loglevel INFO

webhook-worker:  ## Run the webhook delivery worker in the foreground
	.venv/bin/celery -A worker.webhook_app worker --pool threads --concurrency 8 --loglevel INFO

api:  ## Run the API under gunicorn on 127.0.0.1:5000 (HOST, PORT to change)
	HOST=$${HOST:-127.0.0.1} .venv/bin/gunicorn -c gunicorn.conf.py 'api.wsgi:app'

bench:  ## Run every benchmark (15-30 min) and write docs/benchmarks.md
	.venv/bin/python -m bench.run_all

clean:  ## Remove local state (var/, caches) and this QUEUE_PREFIX's keys from Redis
	if [ -x .venv/bin/python ]; then .venv/bin/python -m scripts.clean_redis; fi
	rm -rf var .cache .pytest_cache test-output
