"""Worker start-up refuses settings that cannot work."""

import os
import subprocess
import sys

from tests import support
from tests.support import ROOT


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
        "print(w.app.conf.worker_proc_alive_timeout, w.config.worker_proc_alive_timeout_s)"
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
