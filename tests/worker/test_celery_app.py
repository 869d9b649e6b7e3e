"""Worker start-up refuses settings that cannot work."""

import os
import subprocess
import sys

from tests.support import ROOT


def test_worker_refuses_a_prefetch_that_cannot_fill_a_batch():
    env = {**os.environ, "BATCH_MAX": "32", "WORKER_PREFETCH": "16"}
    proc = subprocess.run(
        [sys.executable, "-m", "celery", "-A", "worker.celery_app", "worker"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0
    assert "WORKER_PREFETCH" in proc.stdout + proc.stderr


def test_importing_the_worker_app_loads_no_model():
    code = (
        "import sys, worker.celery_app; "
        "assert 'tensorflow' not in sys.modules and 'keras' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=120)


def test_worker_refuses_to_start_without_its_models(tmp_path):
    # A trained model named in MODELS whose folder does not exist: the worker must exit
    # at start-up rather than consume jobs it cannot run.
    env = {
        **os.environ,
        "MODELS": "mobilenet,no-such-model",
        "MODEL_DIR": str(tmp_path),
        "QUEUE_PREFIX": f"imgclf-start-{tmp_path.name}",
    }
    proc = subprocess.run(
        [sys.executable, "-m", "celery", "-A", "worker.celery_app", "worker", "--without-mingle"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode != 0
    assert "could not load the models" in proc.stdout + proc.stderr
    assert "no-such-model" in proc.stdout + proc.stderr
