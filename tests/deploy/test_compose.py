"""docker-compose.yml and its GPU override agree with the code they run.

Parsed with PyYAML, no Docker needed: every command names modules and files that
exist, every variable handed to the app is one shared/config.py reads, the
dependencies wait on health, and the worker can be scaled.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from shared.config import Config
from shared.queue import make_celery, webhook_queue

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
GPU_COMPOSE = ROOT / "docker-compose.gpu.yml"

EXPECTED_SERVICES = {
    "postgres",
    "redis",
    "rabbitmq",
    "migrate",
    "api",
    "proxy",
    "worker",
    "webhooks",
    "flower",
}
APP_SERVICES = {"migrate", "api", "worker", "webhooks"}
LONG_RUNNING_APP = {"api", "worker", "webhooks"}

CONFIG_VARS = {f.name.upper() for f in dataclasses.fields(Config)}
# Read by a library, not by the app (README, "Configuration").
LIBRARY_VARS = {"KERAS_HOME", "PROMETHEUS_MULTIPROC_DIR"}
GPU_LIBRARY_VARS = {"CUDA_VISIBLE_DEVICES", "TF_FORCE_GPU_ALLOW_GROWTH"}
# Settings compose deliberately does not pass on (production must not fetch private URLs).
NOT_PASSED = {"ALLOW_PRIVATE_URLS", "ALLOW_NULL_RUNTIME"}
# Literal (not interpolated) environment values that are allowed: none of them secret.
LITERAL_OK = {
    "POSTGRES_USER",
    "POSTGRES_DB",
    "KERAS_HOME",
    "PROMETHEUS_MULTIPROC_DIR",
    "TF_FORCE_GPU_ALLOW_GROWTH",
    "RABBITMQ_DEFAULT_USER",
    "RABBITMQ_DEFAULT_VHOST",
}
# Secrets compose refuses to start without.
REQUIRED = {"SECRET_KEY": "k", "RABBITMQ_PASSWORD": "r"}


def load(path: Path) -> dict:
    with path.open(encoding="utf-8") as f:
        return yaml.safe_load(f)


@pytest.fixture(scope="module")
def compose() -> dict:
    return load(COMPOSE)


@pytest.fixture(scope="module")
def services(compose) -> dict:
    return compose["services"]


@pytest.fixture(scope="module")
def gpu() -> dict:
    return load(GPU_COMPOSE)


_VAR = re.compile(r"\$\{([A-Z_][A-Z0-9_]*)(?::?-)?")


def interpolate(value: str, env: dict[str, str] | None = None) -> str:
    """Compose's ``${VAR}``, ``${VAR:-default}``, ``${VAR:?error}`` interpolation (nested)."""
    env = env or {}
    out, i = [], 0
    while i < len(value):
        if value.startswith("$$", i):
            out.append("$")
            i += 2
            continue
        if not value.startswith("${", i):
            out.append(value[i])
            i += 1
            continue
        depth, j = 1, i + 2
        while depth:
            if value.startswith("${", j):
                depth, j = depth + 1, j + 2
                continue
            depth -= value[j] == "}"
            j += 1
        body = value[i + 2 : j - 1]
        name, sep, default = re.match(r"([A-Za-z_][A-Za-z0-9_]*)(:?-|:?\?)?(.*)", body).groups()
        given = env.get(name)
        if given not in (None, "") or (sep == "-" and given is not None):
            out.append(given)
        elif sep in (":-", "-"):
            out.append(interpolate(default, env))
        elif sep in (":?", "?"):
            raise LookupError(f"{name} is required: {default}")
        else:
            out.append("")
        i = j
    return "".join(out)


def environment(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {k: "" if v is None else str(v) for k, v in env.items()}


def command(service: dict) -> list[str]:
    cmd = service["command"]
    return cmd if isinstance(cmd, list) else cmd.split()


def option(cmd: list[str], *names: str) -> str:
    for i, word in enumerate(cmd):
        if word in names:
            return cmd[i + 1]
        for name in names:
            if name.startswith("--") and word.startswith(name + "="):
                return word.split("=", 1)[1]
    raise AssertionError(f"{names} not in {cmd}")


def module_defines(module: str, *names: str) -> bool:
    spec = importlib.util.find_spec(module)
    assert spec is not None and spec.origin, f"module {module} not found"
    tree = ast.parse(Path(spec.origin).read_text(encoding="utf-8"))
    defined = set()
    for node in tree.body:
        targets = node.targets if isinstance(node, ast.Assign) else [getattr(node, "target", None)]
        defined |= {t.id for t in targets if isinstance(t, ast.Name)}
    return bool(defined & set(names))


def seconds(duration: str) -> float:
    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001, "us": 1e-6}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|us|h|m|s)", str(duration))
    assert parts, duration
    return sum(float(n) * units[u] for n, u in parts)


# --- services and commands --------------------------------------------------------------


def test_every_expected_service_exists(services):
    assert set(services) == EXPECTED_SERVICES


def test_the_migration_job_runs_the_migrate_module(services):
    cmd = command(services["migrate"])
    assert cmd[:3] == ["python", "-m", "shared.migrate"]
    assert importlib.util.find_spec(cmd[2]) is not None
    assert cmd[3:] == ["upgrade"]
    assert services["migrate"]["restart"] == "no"


def test_the_api_runs_gunicorn_with_the_config_file_and_the_wsgi_app(services):
    cmd = command(services["api"])
    assert cmd[0] == "gunicorn"
    assert (ROOT / option(cmd, "-c", "--config")).is_file()
    module, _, attr = cmd[-1].partition(":")
    assert module_defines(module, attr), f"{cmd[-1]}: no {attr} in {module}"


@pytest.mark.parametrize("name", ["worker", "webhooks"])
def test_celery_services_name_an_importable_app(services, name):
    cmd = command(services[name])
    assert cmd[:1] == ["celery"]
    module = option(cmd, "-A", "--app")
    assert module_defines(module, "app", "celery"), f"-A {module}: no Celery app there"
    assert "worker" in cmd


def test_the_webhook_worker_runs_the_command_its_module_documents(services):
    doc = importlib.util.find_spec("worker.webhook_app").origin
    documented = next(
        line.split()
        for line in Path(doc).read_text(encoding="utf-8").splitlines()
        if line.strip().startswith("celery -A worker.webhook_app")
    )
    cmd = command(services["webhooks"])
    expected = [w.replace("<QUEUE_PREFIX>", "${QUEUE_PREFIX:-imgclf}") for w in documented]
    assert cmd[: len(expected)] == expected
    assert interpolate(option(cmd, "-Q")) == webhook_queue(Config())


def test_gunicorn_config_outlasts_the_longest_long_poll():
    env = {**os.environ, "MAX_WAIT_S": "60"}
    for name in ("PORT", "WEB_CONCURRENCY", "API_THREADS", "GUNICORN_CMD_ARGS"):
        env.pop(name, None)
    out = subprocess.run(
        [sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", "--print-config"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    settings = dict(re.findall(r"^(\w+)\s+= (.*)$", out, re.MULTILINE))
    assert settings["worker_class"] == "gthread"
    assert int(settings["threads"]) >= 8
    assert int(settings["timeout"]) > 60
    assert settings["bind"] == "['0.0.0.0:5000']"
    assert settings["accesslog"] == "-"
    assert settings["wsgi_app"] == "api.wsgi:app"


def test_gunicorn_refuses_fewer_threads_than_long_polls_may_hold():
    # Waits are capped per process (MAX_WAITS_PER_PROCESS); with no more threads than
    # that, long-polls alone could leave nothing to answer any other request.
    env = {**os.environ, "MAX_WAITS_PER_PROCESS": "8", "PORT": "0"}
    env.pop("GUNICORN_CMD_ARGS", None)
    out = subprocess.run(
        [sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", "--threads", "8"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode != 0
    assert "MAX_WAITS_PER_PROCESS" in out.stdout + out.stderr


# --- environment ------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(APP_SERVICES))
def test_app_services_get_only_config_variables(services, name):
    unknown = set(environment(services[name])) - CONFIG_VARS - LIBRARY_VARS
    assert not unknown, f"{name}: not read by shared/config.py: {sorted(unknown)}"


@pytest.mark.parametrize("name", sorted(APP_SERVICES))
def test_every_setting_can_be_set_from_the_env_file(services, name):
    missing = CONFIG_VARS - NOT_PASSED - set(environment(services[name]))
    assert not missing, f"{name}: add to x-app environment: {sorted(missing)}"


def test_defaults_point_at_the_bundled_postgres_and_redis(services):
    env = environment(services["api"])
    url = interpolate(env["DATABASE_URL"], {"POSTGRES_PASSWORD": "pw"})
    assert url == "postgresql+psycopg://imgclf:pw@postgres:5432/imgclf"
    assert interpolate(env["REDIS_URL"]) == "redis://redis:6379/0"
    # Empty means "the default" to Config.from_env, so the unset rest must parse.
    config = Config.from_env(
        {k: interpolate(v, REQUIRED) for k, v in env.items() if k in CONFIG_VARS}
    )
    assert config.secret_key == "k"
    assert not config.allow_private_urls
    assert config.effective_broker_url == "amqp://imgclf:r@rabbitmq:5672/imgclf"
    rabbit = environment(services["rabbitmq"])
    assert interpolate(rabbit["RABBITMQ_DEFAULT_PASS"], REQUIRED) == "r"
    assert rabbit["RABBITMQ_DEFAULT_USER"] == "imgclf" == rabbit["RABBITMQ_DEFAULT_VHOST"]
    pg = environment(services["postgres"])
    assert pg["POSTGRES_USER"] in url and pg["POSTGRES_DB"] in url


@pytest.mark.parametrize("name", sorted(APP_SERVICES))
def test_the_session_key_is_required_not_random_per_process(services, name):
    # With several gunicorn workers a per-process random key breaks every session.
    with pytest.raises(LookupError, match="SECRET_KEY"):
        interpolate(environment(services[name])["SECRET_KEY"])


def test_the_bundled_broker_gets_quorum_queues_with_a_delivery_limit(services):
    env = environment(services["worker"])
    config = Config.from_env({k: interpolate(v, REQUIRED) for k, v in env.items()})
    queues = make_celery(config).conf.task_queues
    assert {q.name for q in queues} == {"imgclf.interactive", "imgclf.bulk", "imgclf.webhooks"}
    assert all(
        q.queue_arguments == {"x-queue-type": "quorum", "x-delivery-limit": 10} and q.durable
        for q in queues
    )
    assert make_celery(config).conf.task_create_missing_queue_type == "quorum"


def test_api_request_metrics_are_summed_over_gunicorn_workers(services):
    api = services["api"]
    directory = environment(api)["PROMETHEUS_MULTIPROC_DIR"]
    assert directory in api["tmpfs"]  # exists, writable and empty at every start
    for name in APP_SERVICES - {"api"}:
        assert "PROMETHEUS_MULTIPROC_DIR" not in environment(services[name])


def test_an_env_file_setting_reaches_the_app(services):
    env = environment(services["worker"])
    given = {"DATABASE_URL": "postgresql+psycopg://u:p@db/x", "BATCH_MAX": "16"}
    assert interpolate(env["DATABASE_URL"], given) == given["DATABASE_URL"]
    assert interpolate(env["BATCH_MAX"], given) == "16"


@pytest.mark.parametrize("path", [COMPOSE, GPU_COMPOSE], ids=lambda p: p.name)
def test_no_secret_is_written_in_a_compose_file(path):
    for name, service in load(path)["services"].items():
        for key, value in environment(service).items():
            assert "${" in value or key in LITERAL_OK, f"{name}: {key} is a literal: {value!r}"
    raw = path.read_text(encoding="utf-8")
    assert "env_file" not in raw  # .env feeds interpolation only, never a whole environment
    compose = load(path)
    if "postgres" in compose["services"]:
        password = environment(compose["services"]["postgres"])["POSTGRES_PASSWORD"]
        assert password.startswith("${POSTGRES_PASSWORD")
    if "rabbitmq" in compose["services"]:
        password = environment(compose["services"]["rabbitmq"])["RABBITMQ_DEFAULT_PASS"]
        assert password.startswith("${RABBITMQ_PASSWORD")


def test_env_example_names_only_variables_compose_reads():
    text = (ROOT / ".env.example").read_text(encoding="utf-8")
    names = set(re.findall(r"^#?\s*([A-Z][A-Z0-9_]*)=", text, re.MULTILINE))
    used = set(_VAR.findall(COMPOSE.read_text() + GPU_COMPOSE.read_text()))
    assert {"POSTGRES_PASSWORD", "SECRET_KEY", "RABBITMQ_PASSWORD"} <= names
    assert names <= used, f"in .env.example but read by no compose file: {names - used}"
    for secret in ("POSTGRES_PASSWORD", "SECRET_KEY", "RABBITMQ_PASSWORD"):
        assert re.search(rf"^{secret}=$", text, re.MULTILINE), "no real secret in the example"


# --- health, dependencies, scaling ------------------------------------------------------


@pytest.mark.parametrize(
    "name", ["postgres", "redis", "rabbitmq", "api", "proxy", "worker", "webhooks"]
)
def test_services_have_healthchecks(services, name):
    check = services[name]["healthcheck"]
    assert not check.get("disable")
    assert check["test"][0] in ("CMD", "CMD-SHELL")


def test_probes_use_the_right_tools(services):
    assert "pg_isready" in " ".join(services["postgres"]["healthcheck"]["test"])
    assert services["redis"]["healthcheck"]["test"][-2:] == ["redis-cli", "ping"]
    assert "rabbitmq-diagnostics" in services["rabbitmq"]["healthcheck"]["test"]
    assert "/healthz" in " ".join(services["api"]["healthcheck"]["test"])


def test_the_celery_healthcheck_code_compiles(services):
    test = services["worker"]["healthcheck"]["test"]
    assert test[1:3] == ["python", "-c"]
    compile(test[3], "<healthcheck>", "exec")


@pytest.mark.parametrize("name", sorted(LONG_RUNNING_APP))
def test_app_services_wait_for_healthy_dependencies_and_migrations(services, name):
    deps = services[name]["depends_on"]
    assert deps["postgres"]["condition"] == "service_healthy"
    assert deps["redis"]["condition"] == "service_healthy"
    assert deps["rabbitmq"]["condition"] == "service_healthy"
    assert deps["migrate"]["condition"] == "service_completed_successfully"


def test_migrations_wait_for_postgres(services):
    assert services["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"


def test_redis_keeps_queued_messages(services):
    cmd = command(services["redis"])
    assert option(cmd, "--appendonly") == "yes"
    assert option(cmd, "--maxmemory-policy") == "noeviction"
    assert any(v.endswith(":/data") for v in services["redis"]["volumes"])
    assert any("/var/lib/postgresql/data" in v for v in services["postgres"]["volumes"])
    # Quorum queues live on disk: the node keeps its name and its volume across restarts.
    rabbit = services["rabbitmq"]
    assert any(v.endswith(":/var/lib/rabbitmq") for v in rabbit["volumes"])
    assert rabbit["hostname"] == "rabbitmq"


def test_only_nginx_is_published_and_gunicorn_is_behind_it(services):
    """Issue #23: gunicorn gives a slow client a thread; nginx reads whole requests first."""
    assert "ports" not in services["api"]
    proxy = services["proxy"]
    assert proxy["image"].startswith("nginx:")
    assert "./deploy/nginx.conf:/etc/nginx/nginx.conf:ro" in proxy["volumes"]
    assert [interpolate(str(p)) for p in proxy["ports"]] == ["5000:80"]
    assert proxy["depends_on"]["api"]["condition"] == "service_healthy"
    assert proxy["ulimits"]["nofile"]["soft"] >= 16384
    conf = (ROOT / "deploy" / "nginx.conf").read_text()
    assert "server api:5000;" in conf and "listen 80;" in conf
    # The API counts clients (per-address limits) by the address nginx saw.
    assert interpolate(environment(services["api"])["TRUSTED_PROXIES"]) == "1"


def test_the_worker_can_be_scaled(services):
    worker = services["worker"]
    assert "ports" not in worker
    assert "container_name" not in worker
    assert seconds(worker["stop_grace_period"]) >= 60
    for name, service in services.items():
        assert "container_name" not in service, name


def test_flower_is_a_monitoring_profile_bound_to_localhost(services):
    flower = services["flower"]
    assert flower["profiles"] == ["monitoring"]
    assert all(str(p).startswith("127.0.0.1:") for p in flower.get("ports", []))


# --- images and builds ------------------------------------------------------------------


def test_app_services_share_one_image_and_build(services):
    images = {services[n]["image"] for n in APP_SERVICES}
    builds = {yaml.safe_dump(services[n]["build"]) for n in APP_SERVICES}
    assert len(images) == 1 and len(builds) == 1
    build = services["api"]["build"]
    assert (ROOT / build["context"] / build.get("dockerfile", "Dockerfile")).is_file()


def test_other_services_use_pinned_public_images(services):
    for name in EXPECTED_SERVICES - APP_SERVICES:
        image = services[name]["image"]
        assert "build" not in services[name]
        assert ":" in image and not image.endswith(":latest"), f"{name}: pin a tag: {image}"


def test_gpu_override_reserves_a_gpu_for_the_worker_only(gpu, services):
    assert set(gpu["services"]) == {"worker"}
    worker = gpu["services"]["worker"]
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] for d in devices)
    env = environment(worker)
    assert "CUDA_VISIBLE_DEVICES" in env
    assert set(env) <= CONFIG_VARS | LIBRARY_VARS | GPU_LIBRARY_VARS
    assert interpolate(worker["image"]) != interpolate(services["worker"]["image"])


def test_gpu_override_builds_tensorflows_cuda_build_of_the_pinned_version(gpu):
    pinned = re.search(
        r"^tensorflow-cpu==(\S+)", (ROOT / "requirements.txt").read_text(), re.MULTILINE
    )
    assert pinned, "requirements.txt no longer pins tensorflow-cpu"
    tf = gpu["services"]["worker"]["build"]["args"]["TF_PACKAGE"]
    assert tf == f"tensorflow[and-cuda]=={pinned.group(1)}"


def _docker_compose() -> list[str] | None:
    docker = shutil.which("docker")
    if docker is None:
        return None
    probe = subprocess.run([docker, "compose", "version"], capture_output=True, timeout=30)
    return [docker, "compose"] if probe.returncode == 0 else None


@pytest.mark.skipif(_docker_compose() is None, reason="docker compose is not installed here")
def test_docker_compose_accepts_both_files():
    env = {**os.environ, "POSTGRES_PASSWORD": "x", "SECRET_KEY": "x"}
    for files in (
        ["-f", "docker-compose.yml"],
        ["-f", "docker-compose.yml", "-f", GPU_COMPOSE.name],
    ):
        subprocess.run(
            [*_docker_compose(), *files, "config", "--quiet"], cwd=ROOT, env=env, check=True
        )
