"""The pixels that one process's concurrent image decodes may hold at once.

A decoded image takes memory in proportion to its pixels (1 to 4 bytes each in the
mode Pillow decodes into, about twice that at peak, see ``shared.images``), and
its compressed size says nothing about that: a 77 KB PNG holds 40 million pixels.
So every decode in a process first takes its width × height from one budget and
gives it back when done; a decode that does not fit waits, first come first
served, and gives up after a deadline. An image larger than the whole budget is
refused outright.

One implementation for one process's threads and for several processes: the worker
and its loader processes (``worker.loader_pool``) share one, so N loader processes
still decode at most ``DECODE_BUDGET_PIXELS`` together, not N times that.
"""

from __future__ import annotations

import contextlib
import fcntl
import multiprocessing
import os
import tempfile
import threading
import time
import weakref
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np

from shared.errors import DecodeBusy, ImageTooLarge


class PixelBudget:
    """One pixel budget for the threads of one or several processes.

    An image larger than the whole budget is refused at once; the others wait first
    come first served across all threads and processes, and give up with
    ``DecodeBusy`` after ``wait_s``. The state is in shared memory. Made with one
    *owner* per process that decodes; the maker is the last owner, and
    ``member(owner)`` is what another process holds (passed as a ``Process``
    argument at spawn).

    Built to survive a process killed at any instruction (SIGKILL, the OOM killer):

    - the mutex is ``flock`` on a file, which the kernel lets go when its holder
      dies. A ``multiprocessing`` lock held by a dead process stays taken for ever,
      and a ``multiprocessing.Condition`` deadlocks its next ``notify`` when a waiter
      dies (it waits for every counted sleeper to wake);
    - so there is no cross-process condition variable: a decode that does not fit
      waits on a ``threading.Condition`` that its own process's releases wake, and
      with other owners also checks again after a short, growing pause, for their
      releases (this waits only while the budget is full). With one owner (the
      worker's threads, LOADER_PROCESSES=0) no other process can be involved: no
      ``flock`` and no pause, only the thread lock and the condition;
    - each owner's pixels and place in line are its own words in shared memory,
      each changed by a single store, so a death between two stores leaves nothing
      half-done beyond that owner's words; ``reclaim(owner)``, called by the worker
      when it reaps a dead process and before starting its replacement, gives back
      that owner's pixels and its places in line (a dead first-in-line would
      otherwise block everyone).
    """

    def __init__(self, capacity: int, wait_s: float, owners: int = 1, waiters: int = 16) -> None:
        """``waiters``: how many threads of one owner may stand in line at once (more
        wait for a place in it)."""
        if capacity < 1:
            raise ValueError("a pixel budget needs at least one pixel")
        if owners < 1 or waiters < 1:
            raise ValueError("a shared pixel budget needs an owner and a waiter")
        self.capacity = capacity
        self._wait_s = wait_s
        self._owners = owners
        self._waiters = waiters
        # [next ticket, peak held] + pixels held per owner + tickets in line per owner.
        self._words = multiprocessing.RawArray("q", _HEAD + owners + owners * waiters)
        fd, self._path = tempfile.mkstemp(prefix="imgclf-pixel-budget-")
        os.close(fd)
        self._creator = os.getpid()
        self.owner = owners - 1
        self._attach()

    def member(self, owner: int) -> PixelBudget:
        """The same budget as taken by ``owner`` (pass it to that owner's process)."""
        if not 0 <= owner < self._owners:
            raise ValueError(f"owner {owner} is not one of the budget's {self._owners}")
        state = self.__getstate__()
        state["owner"] = owner
        other = PixelBudget.__new__(PixelBudget)
        other.__setstate__(state)  # its own file description: flock excludes it from this one
        return other

    def __getstate__(self) -> dict:
        # The RawArray pickles only while spawning a process: a member goes as an argument.
        state = dict(self.__dict__)
        locals_ = ("_fd", "_lock", "_seats", "_seat_free", "_used", "_held", "_line", "_released")
        for local in locals_:
            state.pop(local, None)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._attach()

    def _attach(self) -> None:
        self._fd = os.open(self._path, os.O_RDWR)
        weakref.finalize(self, os.close, self._fd)
        self._lock = threading.Lock()  # flock does not exclude threads sharing the fd
        words = np.frombuffer(self._words, dtype=np.int64)
        self._used = words[:_HEAD]
        self._held = words[_HEAD : _HEAD + self._owners]
        self._line = words[_HEAD + self._owners :].reshape(self._owners, self._waiters)
        self._seats = list(range(self._waiters))  # this process's places in its line row
        self._seat_free = threading.Semaphore(self._waiters)
        # Wakes this process's waiting decodes when pixels or the head of the line may
        # have changed here; a count, so a wake between a check and the wait is not lost.
        self._released = threading.Condition(threading.Lock())
        self._changes = 0

    def close(self) -> None:
        """Remove the lock file (the creator, once every process is gone)."""
        if os.getpid() == self._creator:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._path)

    @contextmanager
    def _locked(self) -> Iterator[None]:
        with self._lock:
            if self._owners == 1:  # one process: nobody else takes the file's lock
                yield
                return
            fcntl.flock(self._fd, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(self._fd, fcntl.LOCK_UN)

    @property
    def free(self) -> int:
        with self._locked():
            return self.capacity - int(self._held.sum())

    @property
    def waiting(self) -> int:
        """Decodes standing in line for pixels, in all processes."""
        with self._locked():
            return int(np.count_nonzero(self._line))

    @property
    def peak(self) -> int:
        """The most pixels held at once, across all processes, since the budget was made."""
        with self._locked():
            return int(self._used[_PEAK])

    def held_by(self, owner: int) -> int:
        """What ``owner`` holds now. Kept beside ``free`` and ``peak`` as the budget's
        read-outs: the tests check the reclaim by it, and in a debugger a leak shows as
        pixels held by an idle owner."""
        with self._locked():
            return int(self._held[owner])

    def reclaim(self, owner: int) -> int:
        """Give back what the dead ``owner`` held, and its places in line; returns the pixels.

        Only for an owner whose process has exited (its sentinel is ready): a live
        one would give back pixels it still uses.
        """
        with self._locked():
            pixels = int(self._held[owner])
            self._held[owner] = 0
            self._line[owner, :] = 0
        return pixels

    @contextmanager
    def hold(self, pixels: int) -> Iterator[None]:
        """Hold ``pixels`` of the budget for the ``with`` block; given back on any exit."""
        self._take(pixels)
        try:
            yield
        finally:
            with self._locked():
                self._held[self.owner] -= pixels
            self._wake()

    def _wake(self) -> None:
        with self._released:
            self._changes += 1
            self._released.notify_all()

    def _take(self, pixels: int) -> None:
        if pixels > self.capacity:
            raise ImageTooLarge(_too_large(pixels, self.capacity))
        owner = self.owner
        deadline = time.monotonic() + self._wait_s
        if not self._seat_free.acquire(timeout=self._wait_s):
            raise DecodeBusy(_busy(self._wait_s))
        with self._lock:
            seat = self._seats.pop()
        ticket = 0  # 0: not in line
        try:
            pause = _FIRST_PAUSE_S
            while True:
                with self._released:
                    seen = self._changes
                with self._locked():
                    if not ticket:
                        ticket = int(self._used[_NEXT]) + 1
                        self._used[_NEXT] = ticket
                        self._line[owner, seat] = ticket
                    elif self._line[owner, seat] != ticket:
                        # Reclaimed as if dead: a caller's bug, never a normal path.
                        raise RuntimeError("the pixel budget's line lost a living decode")
                    # First in line only: a stream of small images must not starve a large one.
                    first = int(self._line[self._line > 0].min())
                    held = int(self._held.sum())
                    if first == ticket and held + pixels <= self.capacity:
                        self._held[owner] += pixels
                        self._line[owner, seat] = 0
                        ticket = 0
                        self._used[_PEAK] = max(int(self._used[_PEAK]), held + pixels)
                        return
                left = deadline - time.monotonic()
                if left <= 0:
                    raise DecodeBusy(_busy(self._wait_s))
                # Alone, only this process's releases can make room: no pause needed.
                wait = left if self._owners == 1 else min(pause, left)
                with self._released:
                    if self._changes == seen:
                        self._released.wait(wait)
                pause = min(2 * pause, _MAX_PAUSE_S)
        finally:
            if ticket:  # gave up: leave the line
                with self._locked():
                    if self._line[owner, seat] == ticket:
                        self._line[owner, seat] = 0
            with self._lock:
                self._seats.append(seat)
            self._seat_free.release()
            self._wake()  # the head of the line moved: the next one may go


_NEXT, _PEAK, _HEAD = 0, 1, 2
# Checks of a full budget for other processes' releases: soon (a small decode ends
# within milliseconds), then less often.
_FIRST_PAUSE_S = 0.001
_MAX_PAUSE_S = 0.02


def _too_large(pixels: int, capacity: int) -> str:
    return (
        f"The image has {pixels:,} pixels; a worker decodes at most {capacity:,} "
        "at once (DECODE_BUDGET_PIXELS)."
    )


def _busy(wait_s: float) -> str:
    return f"No memory came free to decode the image within {wait_s:g} s."
