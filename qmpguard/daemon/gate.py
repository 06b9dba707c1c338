"""A semaphore whose size can change while it is held: `concurrency` on SIGHUP.

asyncio.Semaphore cannot be resized. Replacing it would let the holders of the old one
and of the new one run side by side; this gate counts every holder against the size in
force, so after a reload to N at most N run as soon as the surplus holders finish.
"""

from __future__ import annotations

import asyncio
from collections import deque
from types import TracebackType


class Gate:
    """`async with gate:` admits at most `size` holders at once; `resize(n)` any time."""

    def __init__(self, size: int) -> None:
        if size < 1:
            raise ValueError(f"gate size must be at least 1, got {size}")
        self.size = size
        self.busy = 0
        self._waiters: deque[asyncio.Future[None]] = deque()

    async def acquire(self) -> None:
        """Wait for a place, first come first served. A place is handed over when it is
        granted (counted in `busy` by whoever frees it), so no newcomer can take it."""
        if self.busy < self.size and not self._waiters:
            self.busy += 1
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter in self._waiters:
                self._waiters.remove(waiter)
            elif waiter.done() and not waiter.cancelled():
                self.release()  # granted, then cancelled: hand the place on
            raise

    def release(self) -> None:
        self.busy -= 1
        self._wake()

    def resize(self, size: int) -> None:
        """Admit up to `size` from now on: waiters go at once if the gate grew; if it
        shrank, holders finish and no one new enters until fewer than `size` hold it."""
        if size < 1:
            raise ValueError(f"gate size must be at least 1, got {size}")
        self.size = size
        self._wake()

    def _wake(self) -> None:
        """Grant free places to waiters, oldest first."""
        while self.busy < self.size and self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                self.busy += 1
                waiter.set_result(None)

    async def __aenter__(self) -> None:
        await self.acquire()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()
