"""bench.common's per-thread CPU meter, on a real child process and the real py-spy."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time

from bench.common import ThreadCpuMeter, python_thread_names

CHILD = textwrap.dedent(
    """
    import sys, threading, time

    def burn():
        end = time.monotonic() + 60
        while time.monotonic() < end:
            sum(range(1000))

    threading.Thread(target=burn, name="burner-7", daemon=True).start()
    print("ready", flush=True)
    sys.stdin.readline()  # until the test is done
    """
)


def test_the_cpu_of_a_process_is_counted_by_python_thread_name():
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert child.stdout.readline().strip() == "ready"
        assert "burner-7" in python_thread_names(child.pid).values()
        meter = ThreadCpuMeter({"child": lambda: [child.pid]}).start()
        # Until the burner has used a few clock ticks (a busy machine gives it fewer).
        for _ in range(100):
            time.sleep(0.05)
            used = meter.stop()
            if used.get("child: burner", 0.0) >= 0.05:
                break
        # Named without its number; the main thread, asleep on stdin, used next to none.
        assert used["child: burner"] >= 0.05, used
        assert used.get("child: MainThread", 0.0) < used["child: burner"], used
    finally:
        child.stdin.close()
        child.wait(30)
