"""Dynamic batching for one function.

A request that finds the function idle is dispatched at once: batching never
delays a lone request. Requests that arrive while a batch runs wait in a
bounded queue and go together in the next batch, up to ``max_batch`` rows.
With ``max_delay_s > 0`` a batch that is not full may wait that long (counted
from its oldest request's arrival) for more rows, but only when the function
is busy, never for a request that found it idle.

A batch normally runs off the event loop (the ``run`` coroutine hands it to a
worker thread). When ``inline`` is given, the batcher first offers each batch
to it: it may run the batch at once on the loop thread and return True (the
service does that only for runs measured to cost less than the thread hop
they avoid), or return False to leave it to ``run``.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Generic, TypeVar


@dataclass(slots=True, eq=False)
class Pending:
    """One admitted request waiting for, or in, a batch: what the batcher needs of it.

    The service's requests are a subclass that carries the rest (inputs, where
    the answer goes), so each request is one object.
    """

    rows: int
    received: float


P = TypeVar("P", bound=Pending)
RunBatch = Callable[[list[P]], Awaitable[None]]
#: Runs a batch synchronously if it may; False leaves it to the ``RunBatch`` coroutine.
RunInline = Callable[[list[P]], bool]


class Batcher(Generic[P]):
    """Gathers requests for one function into batches and runs them one at a time."""

    def __init__(
        self,
        run: RunBatch[P],
        *,
        max_batch: int,
        max_delay_s: float = 0.0,
        max_queue: int = 1024,
        clock: Callable[[], float] = time.monotonic,
        inline: RunInline[P] | None = None,
    ) -> None:
        self._run = run
        self._inline = inline
        self.max_batch = max(1, max_batch)
        self.max_delay_s = max_delay_s
        self.max_queue = max_queue
        self._clock = clock
        self._queue: deque[P] = deque()
        self.queued_rows = 0
        self.running_rows = 0
        self._task: asyncio.Task[None] | None = None
        self._more = asyncio.Event()
        self._busy_since_idle = False

    @property
    def queued(self) -> int:
        return len(self._queue)

    @property
    def busy(self) -> bool:
        return self._task is not None and not self._task.done()

    def full(self) -> bool:
        return len(self._queue) >= self.max_queue

    def submit(self, p: P) -> None:
        """Queue ``p`` (the caller has checked :meth:`full`); start a batch if idle."""
        idle = self._task is None or self._task.done()
        if idle and not self._queue and self._inline is not None and self._inline([p]):
            return
        self._queue.append(p)
        self.queued_rows += p.rows
        if idle:
            self._task = asyncio.get_running_loop().create_task(self._drain())
        else:
            self._more.set()

    async def _drain(self) -> None:
        first = True
        while self._queue:
            if not first and self.max_delay_s > 0 and self.queued_rows < self.max_batch:
                await self._wait_for_more()
            first = False
            batch: list[P] = []
            rows = 0
            while self._queue and (not batch or rows + self._queue[0].rows <= self.max_batch):
                p = self._queue.popleft()
                batch.append(p)
                rows += p.rows
            self.queued_rows -= rows
            self.running_rows = rows
            try:
                if self._inline is not None and self._inline(batch):
                    # Let the loop read and write before the next batch.
                    await asyncio.sleep(0)
                else:
                    await self._run(batch)
            finally:
                self.running_rows = 0

    async def _wait_for_more(self) -> None:
        oldest = self._queue[0].received
        while self.queued_rows < self.max_batch:
            remaining = oldest + self.max_delay_s - self._clock()
            if remaining <= 0:
                return
            self._more.clear()
            # asyncio.timeout, not wait_for: on Python 3.11 wait_for can swallow a
            # cancellation that arrives as the event is set, and a stop would hang.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(remaining):
                    await self._more.wait()

    async def async_drain(self, timeout: float) -> bool:
        """Wait until every queued request has run; False if ``timeout`` passed first."""
        task = self._task
        if task is None or task.done():
            return True
        try:
            async with asyncio.timeout(timeout):
                await asyncio.shield(task)
            return True
        except TimeoutError:
            return False

    def take_all(self) -> list[P]:
        """Remove and return everything queued (for answering it on shutdown)."""
        items = list(self._queue)
        self._queue.clear()
        self.queued_rows = 0
        return items

    async def async_cancel(self) -> None:
        if self._task is not None and not self._task.done():
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
