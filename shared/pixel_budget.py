"""The pixels that one process's concurrent image decodes may hold at once.

A decoded image takes memory in proportion to its pixels (1 to 4 bytes each in the
mode Pillow decodes into, about twice that at peak, see ``shared.images``), and
its compressed size says nothing about that: a 77 KB PNG holds 40 million pixels.
So every decode in a process first takes its width × height from one budget and
gives it back when done; a decode that does not fit waits, first come first
served, and gives up after a deadline. An image larger than the whole budget is
refused outright. Threads share one budget; each process has its own.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager

from shared.errors import DecodeBusy, ImageTooLarge


class PixelBudget:
    def __init__(self, capacity: int, wait_s: float) -> None:
        if capacity < 1:
            raise ValueError("a pixel budget needs at least one pixel")
        self.capacity = capacity
        self._wait_s = wait_s
        self._free = capacity
        self._line: deque[object] = deque()
        self._changed = threading.Condition()

    @property
    def free(self) -> int:
        with self._changed:
            return self._free

    @property
    def waiting(self) -> int:
        """Decodes standing in line for pixels."""
        with self._changed:
            return len(self._line)

    @contextmanager
    def hold(self, pixels: int) -> Iterator[None]:
        """Hold ``pixels`` of the budget for the ``with`` block; given back on any exit."""
        self._take(pixels)
        try:
            yield
        finally:
            with self._changed:
                self._free += pixels
                self._changed.notify_all()

    def _take(self, pixels: int) -> None:
        if pixels > self.capacity:
            raise ImageTooLarge(
                f"The image has {pixels:,} pixels; a worker decodes at most {self.capacity:,} "
                "at once (DECODE_BUDGET_PIXELS)."
            )
        ticket = object()
        with self._changed:
            self._line.append(ticket)
            try:
                # First in line only: a stream of small images must not starve a large one.
                fits = self._changed.wait_for(
                    lambda: self._line[0] is ticket and self._free >= pixels, self._wait_s
                )
                if not fits:
                    raise DecodeBusy(
                        f"No memory came free to decode the image within {self._wait_s:g} s."
                    )
                self._free -= pixels
            finally:
                self._line.remove(ticket)
                self._changed.notify_all()  # the next in line may fit now
