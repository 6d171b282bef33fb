"""Worker threads for model runs, with a single hand-off each way.

``loop.run_in_executor`` wraps each call in a ``concurrent.futures.Future``
chained to an asyncio future, and checks the pool's threads on every submit:
for runs of a few hundred microseconds that is a visible share of the agent's
CPU. Here a call is one tuple on a ``SimpleQueue``, and its outcome comes back
with one ``call_soon_threadsafe``.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")

_Job = tuple[asyncio.AbstractEventLoop, "asyncio.Future[Any]", Callable[..., Any], tuple[Any, ...]]


class Runner:
    """A fixed set of daemon threads running blocking calls for one event loop's coroutines."""

    def __init__(self, threads: int, *, name: str = "fnmesh-run") -> None:
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._threads = [
            threading.Thread(target=self._work, name=f"{name}-{i}", daemon=True)
            for i in range(max(1, threads))
        ]
        for t in self._threads:
            t.start()
        self._closed = False

    def run(self, fn: Callable[..., T], *args: Any) -> asyncio.Future[T]:
        """Run ``fn(*args)`` on a worker; await the returned future for its result."""
        if self._closed:
            raise RuntimeError("the runner is shut down")
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[T] = loop.create_future()
        self._jobs.put((loop, fut, fn, args))
        return fut

    def _work(self) -> None:
        while (job := self._jobs.get()) is not None:
            loop, fut, fn, args = job
            try:
                result, error = fn(*args), None
            except Exception as e:  # handed to the awaiting coroutine
                result, error = None, e
            with contextlib.suppress(RuntimeError):  # the loop has closed: nobody waits
                loop.call_soon_threadsafe(_settle, fut, result, error)

    def shutdown(self, timeout: float = 10.0) -> None:
        """Let queued calls finish, then stop the threads (waits up to ``timeout`` for each)."""
        self._closed = True
        for _ in self._threads:
            self._jobs.put(None)
        for t in self._threads:
            t.join(timeout)


def _settle(fut: asyncio.Future[Any], result: Any, error: Exception | None) -> None:
    if fut.cancelled():
        return
    if error is not None:
        fut.set_exception(error)
    else:
        fut.set_result(result)
