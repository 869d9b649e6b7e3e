"""gunicorn.conf.py's stop-signal wrapper alone (tests/test_run_command.py runs a whole stop)."""

import importlib.util
import signal
import threading
from types import SimpleNamespace

from tests import support


def _conf():
    spec = importlib.util.spec_from_file_location(
        "gunicorn_conf", support.ROOT / "gunicorn.conf.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class _Done:
    def __init__(self) -> None:
        self.closed = 0

    def close(self) -> None:
        self.closed += 1


def _worker(done: _Done):
    return SimpleNamespace(wsgi=SimpleNamespace(extensions={"imgclf": SimpleNamespace(done=done)}))


def test_a_second_quit_signal_inside_the_first_is_ignored():
    """Ctrl-C: SIGINT from the terminal, then the master's SIGQUIT while the first runs."""
    done, calls = _Done(), []
    quitting = threading.Event()

    def gunicorn_quit(signum, frame):
        calls.append(signum)
        if len(calls) == 1:  # the master's SIGQUIT lands inside the first handler
            handler(signal.SIGQUIT, None)

    handler = _conf()._ending_waits(_worker(done), gunicorn_quit, quitting)
    handler(signal.SIGINT, None)
    assert calls == [signal.SIGINT]
    assert done.closed == 1


def test_a_quit_after_a_graceful_stop_still_runs():
    done, calls = _Done(), []
    quitting = threading.Event()
    handler = _conf()._ending_waits(_worker(done), lambda s, f: calls.append(s), quitting)
    handler(signal.SIGTERM, None)
    handler(signal.SIGQUIT, None)
    handler(signal.SIGINT, None)
    assert calls == [signal.SIGTERM, signal.SIGQUIT]
    assert done.closed == 2
