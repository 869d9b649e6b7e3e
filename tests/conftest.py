"""Session-wide test set-up: real assets, a writable Keras cache, shared fixtures."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ASSETS = Path(os.environ.get("IMGCLF_ASSETS", ROOT.parent / "shared" / "assets"))
PHOTOS = ASSETS / "photos"


def _prepare_keras_home() -> Path:
    """Keras writes keras.json into KERAS_HOME, so tests use a writable copy of the assets."""
    target = ROOT / ".cache" / "keras_home"
    source = ASSETS / "keras_home"
    if not (target / "models").is_dir():
        target.mkdir(parents=True, exist_ok=True)
        shutil.copytree(source / "models", target / "models", dirs_exist_ok=True)
    return target


# Must happen before anything imports keras.
os.environ["KERAS_HOME"] = str(_prepare_keras_home())


@pytest.fixture(scope="session")
def photos_dir() -> Path:
    return PHOTOS


# --- integration fixtures: real databases, Redis, photo server and worker -------

import dataclasses  # noqa: E402

from tests import support  # noqa: E402


@pytest.fixture(scope="session")
def postgres_url():
    url = support.create_postgres_database()
    yield url
    support.drop_postgres_database(url)


@pytest.fixture(scope="session")
def sqlite_url(tmp_path_factory):
    return f"sqlite:///{tmp_path_factory.mktemp('sqlite') / 'imgclf.db'}"


@pytest.fixture(scope="session", params=["postgres", "sqlite"])
def db_url(request):
    """Every test that uses the database runs on PostgreSQL and on embedded SQLite."""
    return request.getfixturevalue(f"{request.param}_url")


@pytest.fixture(scope="session")
def photo_server(photos_dir, tmp_path_factory):
    """A local HTTP server with the real photos plus a few files that are not usable images."""
    root = tmp_path_factory.mktemp("www")
    for photo in photos_dir.iterdir():
        (root / photo.name).symlink_to(photo)
    (root / "notes.jpg").write_text("this is text, not a JPEG\n")
    (root / "bomb.png").write_bytes(support.png_header(30000, 30000))
    # Far more segments and chunks than a real file has (issue #14), small enough to serve fast.
    (root / "segments.jpg").write_bytes(support.jpeg_segment_flood(200_000))
    (root / "chunks.png").write_bytes(support.png_chunk_flood(100_000))
    with support.PhotoServer(root) as server:
        yield server


@dataclasses.dataclass
class Stack:
    config: object
    app: object
    worker: support.WorkerProcess | None

    def client(self):
        return self.app.test_client()


def _stack(db_url: str, with_worker: bool, **overrides):
    from api import create_app

    config = support.migrated(support.test_config(db_url, **overrides))
    workers = []
    if with_worker:
        workers = [
            support.WorkerProcess(config).start(),
            support.WebhookWorkerProcess(config).start(),
        ]
        for w in workers:
            w.wait_ready()
    try:
        yield Stack(config=config, app=create_app(config), worker=workers[0] if workers else None)
    finally:
        for w in workers:
            w.stop()
        support.delete_redis_prefix(config.queue_prefix)


@pytest.fixture(scope="session")
def api_stack(db_url):
    """The API on a real database and Redis, with no worker consuming its queue."""
    yield from _stack(db_url, with_worker=False)


@pytest.fixture(scope="session")
def stack(db_url, tmp_path_factory):
    """API + a real Celery worker running the real MobileNet + the webhook worker.

    It gets a database of its own (same backend as ``db_url``): its workers' sweeps and
    reconciler act on every row of their database, and must not touch other tests' rows.
    """
    if db_url.startswith("sqlite"):
        url = f"sqlite:///{tmp_path_factory.mktemp('stack') / 'stack.db'}"
        yield from _stack(url, with_worker=True)
        return
    url = support.create_postgres_database()
    try:
        yield from _stack(url, with_worker=True)
    finally:
        support.drop_postgres_database(url)


@pytest.fixture
def client(api_stack):
    return api_stack.client()


@pytest.fixture
def user(client):
    return support.new_user(client)


@pytest.fixture
def admin(api_stack):
    """An administrator made the documented way: ``flask --app api create-admin``."""
    return support.make_admin(api_stack.app)


@pytest.fixture(scope="session", autouse=True)
def redis_left_as_found():
    """Keys the suite did not create survive it, in every database of the test Redis.

    A sentinel key goes into each database at the start and must still be there at the
    end: a test that runs FLUSHDB or FLUSHALL, or deletes by a pattern wider than its own
    prefix, fails the session here.
    """
    sentinels = support.plant_redis_sentinels(support.REDIS_URL)
    yield
    missing = support.missing_redis_sentinels(sentinels)
    assert not missing, f"the suite deleted keys it did not create, in Redis {missing}"


@pytest.fixture
def receiver():
    """A local HTTP server that records the webhooks delivered to it."""
    from harness.webhook_receiver import Receiver

    with Receiver() as server:
        yield server


# The slow tier (``-m integration``): a real worker with the model, a browser, a trained
# model, the run command, or many processes for a reliability run. ``make test-fast``
# runs the rest (``-m "not integration"``): unit and API tests on the real databases.
INTEGRATION_FIXTURES = frozenset(
    {"stack", "fault_stack_factory", "browser", "live", "idle", "sessions", "runtime",
     "null_runtime", "trained", "cifar_subset"}
)  # fmt: skip
INTEGRATION_PATHS = (
    "reliability/", "bench/", "training/", "worker/models/", "web/test_browser.py",
    "worker/test_loader.py", "worker/test_loader_pool.py", "worker/test_pipeline.py",
    "worker/test_celery_app.py", "test_run_command.py", "test_clean_up.py",
    "api/test_fuzz.py", "api/test_schemathesis.py",  # generated runs over the whole API
    # worker processes started as the docs start them, or nginx in front of gunicorn
    "worker/test_loader_slow_hosts.py", "worker/test_loader_startup.py",
    "worker/test_loader_documented.py", "deploy/test_front_proxy.py",
)  # fmt: skip


def pytest_collection_modifyitems(config, items):
    tests_dir = Path(__file__).parent
    for item in items:
        file = Path(item.fspath)
        path = file.relative_to(tests_dir).as_posix() if tests_dir in file.parents else ""
        if path.startswith(INTEGRATION_PATHS) or INTEGRATION_FIXTURES & set(item.fixturenames):
            item.add_marker(pytest.mark.integration)


def pytest_sessionfinish(session, exitstatus):
    """Leave Redis and PostgreSQL as the session found them, whatever the tests left."""
    support.clean_up_session()
