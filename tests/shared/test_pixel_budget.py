"""The pixel budget: concurrent decodes share one pool of pixels (threads, events, no sleeps).

The contract through the budget's maker (one process's threads) and through a member
(a loader process's share), then across real processes, including ones killed while
holding pixels, waiting in line or holding its lock.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest

from harness.waiting import wait_for
from shared.errors import DecodeBusy, ImageTooLarge
from shared.pixel_budget import PixelBudget

PATIENT_S = 30.0  # long enough never to expire on a busy machine; waits end on events
SPAWN = multiprocessing.get_context("spawn")  # as the loader processes are started


@pytest.fixture(params=["maker", "member"])
def make(request) -> Iterator[Callable[..., PixelBudget]]:
    """Build a budget, used by its maker (one process) or through another owner's member."""
    made: list[PixelBudget] = []

    def build(capacity: int, wait_s: float) -> PixelBudget:
        if request.param == "maker":
            made.append(PixelBudget(capacity, wait_s=wait_s))
            return made[-1]
        made.append(PixelBudget(capacity, wait_s, owners=2, waiters=4))
        return made[-1].member(0)

    yield build
    for budget in made:
        budget.close()


def _holder(budget: PixelBudget, pixels: int, entered: threading.Event, leave: threading.Event):
    with budget.hold(pixels):
        entered.set()
        assert leave.wait(PATIENT_S)


def test_holds_add_up_and_a_decode_that_does_not_fit_waits_for_a_release(make) -> None:
    budget = make(100, wait_s=PATIENT_S)
    first_in, first_out = threading.Event(), threading.Event()
    second_in, second_out = threading.Event(), threading.Event()
    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(_holder, budget, 60, first_in, first_out)
        assert first_in.wait(PATIENT_S)
        assert budget.free == 40
        second = pool.submit(_holder, budget, 50, second_in, second_out)
        # The second cannot be in: 60 + 50 > 100. It is waiting in line, not failed.
        assert not second.done() and not second_in.is_set()
        first_out.set()
        first.result(PATIENT_S)
        assert second_in.wait(PATIENT_S)
        assert budget.free == 50
        second_out.set()
        second.result(PATIENT_S)
    assert budget.free == 100


def test_a_release_in_this_process_wakes_the_waiting_decode(make, monkeypatch) -> None:
    # The pauses between checks (for other processes' releases) made long: only a
    # wake on this process's release lets the waiting decode in within PATIENT_S.
    monkeypatch.setattr("shared.pixel_budget._FIRST_PAUSE_S", 10 * PATIENT_S)
    monkeypatch.setattr("shared.pixel_budget._MAX_PAUSE_S", 10 * PATIENT_S)
    budget = make(100, wait_s=10 * PATIENT_S)
    first_in, first_out = threading.Event(), threading.Event()
    second_in, second_out = threading.Event(), threading.Event()
    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(_holder, budget, 100, first_in, first_out)
        assert first_in.wait(PATIENT_S)
        second = pool.submit(_holder, budget, 100, second_in, second_out)
        wait_for(lambda: budget.waiting == 1, PATIENT_S, "the second decode in line")
        first_out.set()
        assert second_in.wait(PATIENT_S)
        second_out.set()
        first.result(PATIENT_S)
        second.result(PATIENT_S)


def test_small_decodes_fit_beside_each_other(make) -> None:
    budget = make(100, wait_s=PATIENT_S)
    with budget.hold(30), budget.hold(30), budget.hold(40):
        assert budget.free == 0
    assert budget.free == 100


def test_first_come_first_served_so_a_large_image_is_not_starved(make) -> None:
    budget = make(100, wait_s=PATIENT_S)
    order: list[str] = []
    release = threading.Event()
    with ThreadPoolExecutor(3) as pool:
        blocker_in = threading.Event()
        blocker = pool.submit(_holder, budget, 60, blocker_in, release)
        assert blocker_in.wait(PATIENT_S)

        def take(name: str, pixels: int, queued: threading.Event) -> None:
            queued.set()
            with budget.hold(pixels):
                order.append(name)

        large_queued, small_queued = threading.Event(), threading.Event()
        large = pool.submit(take, "large", 100, large_queued)
        assert large_queued.wait(PATIENT_S)
        _wait_until_waiting(budget, 1)
        # 10 pixels are free now, but the small one queued behind the large one.
        small = pool.submit(take, "small", 10, small_queued)
        assert small_queued.wait(PATIENT_S)
        _wait_until_waiting(budget, 2)
        assert order == []
        release.set()
        for future in (blocker, large, small):
            future.result(PATIENT_S)
    assert order == ["large", "small"]


def test_an_image_larger_than_the_whole_budget_is_refused_at_once(make) -> None:
    budget = make(100, wait_s=PATIENT_S)
    # Even a full budget answers at once: the image could never fit.
    with budget.hold(100), pytest.raises(ImageTooLarge, match="at most 100"), budget.hold(101):
        pass
    assert budget.free == 100


def test_waiting_past_the_deadline_gives_up_and_leaves_the_line(make) -> None:
    budget = make(100, wait_s=0.05)
    with budget.hold(80):
        with pytest.raises(DecodeBusy), budget.hold(30):
            pass
        with budget.hold(20):  # the one that gave up no longer blocks the line
            assert budget.free == 0
    assert budget.free == 100


def test_pixels_come_back_when_the_decode_fails(make) -> None:
    budget = make(100, wait_s=PATIENT_S)
    with pytest.raises(RuntimeError), budget.hold(70):
        raise RuntimeError("the decoder broke")
    assert budget.free == 100


def _wait_until_waiting(budget: PixelBudget, n: int) -> None:
    wait_for(lambda: budget.waiting >= n, PATIENT_S, f"{n} decodes in line")


# --- one budget across real processes ---------------------------------------------------


def _hold_in_child(member: PixelBudget, pixels: int, entered, leave, gave_up=None) -> None:
    """A loader process's decode: hold ``pixels`` until told to leave."""
    try:
        with member.hold(pixels):
            entered.set()
            leave.wait(PATIENT_S)
    except DecodeBusy:
        if gave_up is not None:
            gave_up.set()


def _lock_in_child(member: PixelBudget, entered, leave) -> None:
    with member._locked():  # killed here: the budget's mutex must not stay taken
        entered.set()
        leave.wait(PATIENT_S)


@pytest.fixture
def shared() -> Iterator[PixelBudget]:
    budget = PixelBudget(100, PATIENT_S, owners=3, waiters=2)
    yield budget
    budget.close()


def _start(target, *args):
    proc = SPAWN.Process(target=target, args=args, daemon=True)
    proc.start()
    return proc


def _kill(proc) -> None:
    os.kill(proc.pid, signal.SIGKILL)
    proc.join(PATIENT_S)
    assert proc.exitcode == -signal.SIGKILL


def test_two_processes_share_one_budget(shared) -> None:
    first_in, first_out = SPAWN.Event(), SPAWN.Event()
    second_in, second_out = SPAWN.Event(), SPAWN.Event()
    first = _start(_hold_in_child, shared.member(0), 60, first_in, first_out)
    try:
        assert first_in.wait(PATIENT_S)
        assert shared.free == 40 and shared.held_by(0) == 60
        # 60 + 50 > 100 across the two processes, though each alone would fit.
        second = _start(_hold_in_child, shared.member(1), 50, second_in, second_out)
        _wait_until_waiting(shared, 1)
        assert not second_in.is_set()
        first_out.set()
        assert second_in.wait(PATIENT_S)
        assert shared.free == 50 and shared.held_by(1) == 50
        second_out.set()
        for proc in (first, second):
            proc.join(PATIENT_S)
            assert proc.exitcode == 0
    finally:
        first_out.set()
    assert shared.free == 100
    assert shared.peak == 60  # never both at once


def test_a_killed_process_pixels_come_back_when_its_owner_is_reclaimed(shared) -> None:
    entered, leave = SPAWN.Event(), SPAWN.Event()
    holder = _start(_hold_in_child, shared.member(0), 80, entered, leave)
    assert entered.wait(PATIENT_S)
    _kill(holder)  # as the OOM killer would, mid-decode
    assert shared.free == 20  # the dead process still holds them: nobody else can
    assert shared.reclaim(0) == 80  # what the worker does when it reaps the process
    assert shared.free == 100
    with shared.member(0).hold(100):  # its replacement, as owner 0 again, gets it all
        assert shared.free == 0


def test_first_come_first_served_across_processes_and_a_dead_first_in_line_leaves_it(
    shared,
) -> None:
    worker = shared.member(2)
    entered, leave, gave_up = SPAWN.Event(), SPAWN.Event(), SPAWN.Event()
    order: list[str] = []
    with worker.hold(60):
        large = _start(_hold_in_child, shared.member(0), 50, entered, leave, gave_up)
        _wait_until_waiting(shared, 1)
        small_done = threading.Event()

        def small() -> None:
            with worker.hold(10):
                order.append("small")
            small_done.set()

        threading.Thread(target=small, daemon=True).start()
        _wait_until_waiting(shared, 2)
        # 40 are free and the small one fits, but the large one came first.
        assert order == [] and not entered.is_set()
        _kill(large)
        assert not small_done.is_set()  # a dead first in line still blocks the line ...
        shared.reclaim(0)  # ... until the worker reaps it
        assert small_done.wait(PATIENT_S)
    assert order == ["small"] and not gave_up.is_set()
    assert shared.waiting == 0 and shared.free == 100


def test_a_process_killed_holding_the_budget_lock_does_not_lock_the_others_out(shared) -> None:
    entered, leave = SPAWN.Event(), SPAWN.Event()
    locker = _start(_lock_in_child, shared.member(0), entered, leave)
    assert entered.wait(PATIENT_S)
    _kill(locker)
    with shared.member(1).hold(100):  # a multiprocessing.Lock would stay taken for ever
        assert shared.free == 0
