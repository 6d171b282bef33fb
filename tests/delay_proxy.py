"""A TCP proxy that delays every byte by a fixed one-way delay, both ways, in order (no netem here).

Each direction of each connection is a FIFO of ``(due, chunk)``: the reader stamps a
chunk with ``now + delay`` as it arrives, and one writer sends the chunks in arrival order
when they fall due. Chunks are never reordered, and a smaller delay set at run time
never lets a new chunk overtake an older one (it waits for the older one's due time).
End of stream is forwarded as a half-close, delayed like data.

The proxy runs its own event loop in one thread, so a test's loop (or a synchronous
test) is not slowed by it::

    with DelayProxy("127.0.0.1", 0, "127.0.0.1", broker_port, 0.020) as proxy:
        connect_to(proxy.port)          # 20 ms each way, 40 ms round trip
        proxy.set_delay(0.050)
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import socket
import threading
import time
from types import TracebackType

#: Bytes one direction may hold before the proxy stops reading from that side.
MAX_IN_FLIGHT = 4 * 1024 * 1024
_CHUNK = 64 * 1024


def _nodelay(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class _Pipe:
    """One direction of one connection: read, stamp, queue; send when due, in order."""

    def __init__(
        self,
        proxy: DelayProxy,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        client: str = "",
    ) -> None:
        self._proxy = proxy
        self._client = client
        self._reader = reader
        self._writer = writer
        self._queue: collections.deque[tuple[float, bytes]] = collections.deque()
        self._queued = 0
        self._has_data = asyncio.Event()
        self._has_room = asyncio.Event()
        self._has_room.set()
        self._last_due = 0.0

    async def read(self) -> None:
        try:
            while True:
                await self._has_room.wait()
                data = await self._reader.read(_CHUNK)
                self._push(data)
                if not data:
                    return
        except (ConnectionError, OSError):
            self._push(b"")

    def _push(self, data: bytes) -> None:
        # max(): a delay lowered at run time must not let this chunk pass an older one.
        due = max(time.monotonic() + self._proxy.delay_for(self._client), self._last_due)
        self._last_due = due
        self._queue.append((due, data))
        self._queued += len(data)
        if self._queued >= MAX_IN_FLIGHT:
            self._has_room.clear()
        self._has_data.set()

    async def write(self) -> None:
        try:
            while True:
                while not self._queue:
                    self._has_data.clear()
                    await self._has_data.wait()
                due, data = self._queue[0]
                wait = due - time.monotonic()
                if wait > 0:
                    # A timer until the head of the queue is due (not a sleep per chunk
                    # taken in parallel, which could reorder).
                    await asyncio.sleep(wait)
                self._queue.popleft()
                self._queued -= len(data)
                if self._queued < MAX_IN_FLIGHT:
                    self._has_room.set()
                if not data:
                    if self._writer.can_write_eof():
                        self._writer.write_eof()
                    return
                self._writer.write(data)
                await self._writer.drain()
        except (ConnectionError, OSError):
            return


async def _both_ways(up: _Pipe, down: _Pipe) -> None:
    await asyncio.gather(up.read(), up.write(), down.read(), down.write())


class DelayProxy:
    """``listen_host:listen_port`` -> ``target_host:target_port`` with ``delay_s_each_way`` added."""

    def __init__(
        self,
        listen_host: str,
        listen_port: int,
        target_host: str,
        target_port: int,
        delay_s_each_way: float,
    ) -> None:
        if delay_s_each_way < 0:
            raise ValueError("the delay cannot be negative")
        self.listen_host = listen_host
        self.port = listen_port
        self.target = (target_host, target_port)
        self.delay = float(delay_s_each_way)
        #: Delays for connections from one client host, overriding ``delay``.
        self.client_delays: dict[str, float] = {}
        self.connections = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._work: set[asyncio.Task[None]] = set()
        self._started = threading.Event()
        self._error: BaseException | None = None

    def set_delay(self, delay_s_each_way: float, *, client: str | None = None) -> None:
        """Change the one-way delay; it applies to bytes that arrive from now on.

        With ``client`` (an IP address), only connections from that host get this delay.
        """
        if delay_s_each_way < 0:
            raise ValueError("the delay cannot be negative")
        if client is None:
            self.delay = float(delay_s_each_way)
        else:
            self.client_delays[client] = float(delay_s_each_way)

    def delay_for(self, client: str) -> float:
        """The one-way delay for connections from ``client``."""
        return self.client_delays.get(client, self.delay)

    # -- start and stop -------------------------------------------------------------------

    def start(self) -> DelayProxy:
        """Bind and serve in a background thread; ``port`` is the bound port (when 0 was asked)."""
        if self._thread is not None:
            return self
        self._thread = threading.Thread(target=self._run, name="fnmesh-delay-proxy")
        self._thread.start()
        self._started.wait(10)
        if self._error is not None:
            self._thread.join(5)
            self._thread = None
            raise RuntimeError(f"delay proxy could not listen: {self._error}") from self._error
        return self

    def stop(self) -> None:
        """Close the listener and every connection, stop the loop, join the thread."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        fut = asyncio.run_coroutine_threadsafe(self._shutdown(), loop)
        with contextlib.suppress(Exception):
            fut.result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        self._thread = None

    def __enter__(self) -> DelayProxy:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            try:
                self._server = loop.run_until_complete(
                    asyncio.start_server(self._serve, self.listen_host, self.port)
                )
            except OSError as e:
                self._error = e
                return
            self.port = self._server.sockets[0].getsockname()[1]
            self._started.set()
            loop.run_forever()
        finally:
            self._started.set()
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
        # Cancel each connection's pipes, not the connection's own task: asyncio (3.11)
        # logs a traceback for a cancelled client_connected_cb task.
        for w in list(self._work):
            w.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    # -- one connection -----------------------------------------------------------------------

    async def _serve(self, c_reader: asyncio.StreamReader, c_writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self.connections += 1
        writers = [c_writer]
        try:
            t_reader, t_writer = await asyncio.open_connection(*self.target)
            writers.append(t_writer)
            _nodelay(c_writer)
            _nodelay(t_writer)
            peer = c_writer.get_extra_info("peername")
            client = str(peer[0]) if peer else ""
            up = _Pipe(self, c_reader, t_writer, client)
            down = _Pipe(self, t_reader, c_writer, client)
            work = asyncio.create_task(_both_ways(up, down))
            self._work.add(work)
            try:
                await work
            except asyncio.CancelledError:
                if not work.cancelled():
                    raise  # this task itself was cancelled, not just its pipes
            finally:
                self._work.discard(work)
        except OSError:
            pass  # the target refused: the client sees its connection closed
        finally:
            for w in writers:
                w.close()
            for w in writers:
                with contextlib.suppress(Exception):
                    await w.wait_closed()
            self._tasks.discard(task)
