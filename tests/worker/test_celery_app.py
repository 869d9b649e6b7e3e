"""Worker start-up refuses settings that cannot work; the apps are built from a Config."""

import os
import subprocess
import sys

from shared.config import Config
from shared.queue import CLASSIFY_TASK, DELIVER_WEBHOOK_TASK, classify_queues, webhook_queue
from tests import support
from tests.support import ROOT
from worker import celery_app, webhook_app


def _start_worker(**env: str) -> str:
    """Start ``celery -A worker.celery_app worker``; it must exit. Returns its output."""
    proc = subprocess.run(
        [sys.executable, "-m", "celery", "-A", "worker.celery_app", "worker", "--without-mingle"],
        cwd=ROOT,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode != 0
    return proc.stdout + proc.stderr


def test_worker_refuses_a_prefetch_that_cannot_fill_a_batch():
    assert "WORKER_PREFETCH" in _start_worker(BATCH_MAX="32", WORKER_PREFETCH="16")


def test_importing_the_worker_app_loads_no_model():
    code = (
        "import sys, worker.celery_app; "
        "assert 'tensorflow' not in sys.modules and 'keras' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=120)


def test_worker_refuses_to_start_without_its_models(tmp_path):
    # A trained model named in MODELS whose folder does not exist: the worker must exit
    # at start-up rather than consume jobs it cannot run.
    output = _start_worker(
        MODELS="mobilenet,no-such-model",
        MODEL_DIR=str(tmp_path),
        QUEUE_PREFIX=support.new_prefix("start"),
    )
    assert "could not load the models" in output
    assert "no-such-model" in output


def test_a_prefork_pool_process_gets_the_time_its_models_take_to_load():
    # Celery kills a pool process that has not reported for work after
    # worker_proc_alive_timeout (4 s by default); loading TensorFlow and the weights
    # under load takes longer, and pool processes were killed and restarted in a loop.
    code = (
        "import worker.celery_app as w; "
        "print(w.app.conf.worker_proc_alive_timeout, "
        "w.worker_of(w.app).config.worker_proc_alive_timeout_s)"
    )
    env = {**os.environ, "WORKER_PROC_ALIVE_TIMEOUT_S": "240"}
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["240.0", "240.0"]
    env.pop("WORKER_PROC_ALIVE_TIMEOUT_S")
    default = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert float(default.stdout.split()[0]) >= 120


def test_importing_the_worker_apps_reads_no_environment():
    # Settings that cannot work: importing must not mind; the celery command's app,
    # built from the environment on first access, refuses them.
    code = (
        "import worker.celery_app as w, worker.webhook_app as h\n"
        "for m in (w, h):\n"
        "    try:\n"
        "        m.app\n"
        "    except ValueError as exc:\n"
        "        print('refused', exc)\n"
    )
    env = {**os.environ, "BATCH_MAX": "0"}
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("refused BATCH_MAX") == 2


def test_a_classification_app_is_built_from_the_config_it_is_given():
    small = Config(queue_prefix="imgclf-a", batch_max=4, batch_wait_ms=20)
    large = Config(queue_prefix="imgclf-b", batch_max=64)
    a, b = celery_app.create_app(small), celery_app.create_app(large)
    task_a, task_b = a.tasks[CLASSIFY_TASK], b.tasks[CLASSIFY_TASK]
    # Each app's task has its own settings: nothing is frozen at import or shared.
    assert (task_a.batch_max, task_a.batch_wait, task_a.load_ahead) == (4, 0.02, 16)
    assert (task_b.batch_max, task_b.batch_wait, task_b.load_ahead) == (64, 0.0, 256)
    assert task_a.first_queues == {"imgclf-a.interactive"}
    assert [q.name for q in a.conf.task_queues] == list(classify_queues(small))
    assert celery_app.worker_of(a).config is small
    assert celery_app.worker_of(b).config is large
    assert celery_app.worker_of(webhook_app.create_app(small)) is None


def test_a_webhook_app_is_built_from_the_config_it_is_given():
    config = Config(queue_prefix="imgclf-c")
    app = webhook_app.create_app(config)
    assert DELIVER_WEBHOOK_TASK in app.tasks
    assert [q.name for q in app.conf.task_queues] == [webhook_queue(config)]
    assert app.conf.task_default_queue == webhook_queue(config)
    assert webhook_app.worker_of(app).config is config
