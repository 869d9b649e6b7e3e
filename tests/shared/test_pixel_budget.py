"""PixelBudget: concurrent decodes share one pool of pixels (threads, events, no sleeps)."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from shared.errors import DecodeBusy, ImageTooLarge
from shared.pixel_budget import PixelBudget
from tests import support

PATIENT_S = 30.0  # long enough never to expire on a busy machine; waits end on events


def _holder(budget: PixelBudget, pixels: int, entered: threading.Event, leave: threading.Event):
    with budget.hold(pixels):
        entered.set()
        assert leave.wait(PATIENT_S)


def test_holds_add_up_and_a_decode_that_does_not_fit_waits_for_a_release() -> None:
    budget = PixelBudget(100, wait_s=PATIENT_S)
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


def test_small_decodes_fit_beside_each_other() -> None:
    budget = PixelBudget(100, wait_s=PATIENT_S)
    with budget.hold(30), budget.hold(30), budget.hold(40):
        assert budget.free == 0
    assert budget.free == 100


def test_first_come_first_served_so_a_large_image_is_not_starved() -> None:
    budget = PixelBudget(100, wait_s=PATIENT_S)
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


def test_an_image_larger_than_the_whole_budget_is_refused_at_once() -> None:
    budget = PixelBudget(100, wait_s=PATIENT_S)
    # Even a full budget answers at once: the image could never fit.
    with budget.hold(100), pytest.raises(ImageTooLarge, match="at most 100"), budget.hold(101):
        pass
    assert budget.free == 100


def test_waiting_past_the_deadline_gives_up_and_leaves_the_line() -> None:
    budget = PixelBudget(100, wait_s=0.05)
    with budget.hold(80):
        with pytest.raises(DecodeBusy), budget.hold(30):
            pass
        with budget.hold(20):  # the one that gave up no longer blocks the line
            assert budget.free == 0
    assert budget.free == 100


def test_pixels_come_back_when_the_decode_fails() -> None:
    budget = PixelBudget(100, wait_s=PATIENT_S)
    with pytest.raises(RuntimeError), budget.hold(70):
        raise RuntimeError("the decoder broke")
    assert budget.free == 100


def _wait_until_waiting(budget: PixelBudget, n: int) -> None:
    support.wait_for(lambda: budget.waiting >= n, PATIENT_S, f"{n} decodes in line")
