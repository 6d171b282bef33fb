"""A small client for invokers (devices, scripts): one answer per invoke, retries with the same id.

Each invoke publishes one request (QoS 1) to ``{root}/fn/{ns}/{name}/invoke``
and waits for its answer on the client's reply topic,
``{root}/replies/{device}/{inbox}``. MQTT 5 carries the reply topic as the
ResponseTopic and the id as the CorrelationData; MQTT 3.1.1 carries both in
the payload (``reply_to``, ``id``); the id is in the payload either way.

When no answer comes within ``timeout_s``, the request is sent again with the
SAME id, reply topic and CorrelationData: the mesh suppresses duplicates by
(reply topic, id, CorrelationData) and replays the first execution's stored
answer, so a retry never runs a function twice while the first run is
remembered. An error answer in ``retry_on`` (default: ``saturated``) is
retried too, after a backoff. The caller gets exactly one answer per invoke;
later answers to the same id are dropped (and counted in :class:`ClientStats`).

paho runs in one network thread per client, started by ``connect`` and joined
by ``close`` (context managers do both). The sync client's callers wait on
queues the network thread fills; the async client's callbacks hop to its
event loop with ``call_soon_threadsafe``. The socket gets TCP_NODELAY.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import queue
import random
import socket
import ssl
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self
from urllib.parse import urlsplit

import numpy as np
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from fnmesh.errors import MeshError
from fnmesh.functions.errors import MessageError
from fnmesh.functions.messages import (
    Encoding,
    ErrorCode,
    ErrorReply,
    Response,
    decode_reply,
    encode_request,
)

__all__ = [
    "AsyncMeshClient",
    "Backoff",
    "ClientError",
    "ClientStats",
    "ConnectError",
    "InvokeError",
    "InvokeTimeout",
    "MeshClient",
]

DEFAULT_ROOT = "fnmesh/v1"
#: Answered ids remembered, so that a late duplicate is told apart from a stray answer.
_REMEMBERED = 65_536


class ClientError(MeshError):
    """Base of the invoking client's errors."""


class ConnectError(ClientError):
    """The broker could not be reached, refused us, or the client is closed."""


class InvokeError(ClientError):
    """The mesh answered with an error (``code`` is one of :class:`ErrorCode`)."""

    def __init__(self, code: ErrorCode, message: str, id: str) -> None:
        super().__init__(f"{code.value}: {message}")
        self.code = code
        self.message = message
        self.id = id


class InvokeTimeout(InvokeError):
    """No answer came after every attempt (code ``timeout``, raised by the client itself)."""

    def __init__(self, message: str, id: str, attempts: int) -> None:
        super().__init__(ErrorCode.TIMEOUT, message, id)
        self.attempts = attempts


@dataclass(frozen=True, slots=True)
class Backoff:
    """Wait before re-sending after a retryable error: ``base_s * factor**n``, capped, jittered."""

    base_s: float = 0.05
    factor: float = 2.0
    max_s: float = 2.0
    #: Fraction of the delay drawn at random, so that a fleet does not retry in step.
    jitter: float = 0.5

    def delay(self, retry: int, rng: random.Random | None = None) -> float:
        d = min(self.max_s, self.base_s * self.factor**retry)
        return d * (1.0 - self.jitter * (rng or random).random())


@dataclass(slots=True)
class ClientStats:
    """What a client saw; counts only grow."""

    #: Requests published, retries included.
    sent: int = 0
    retries: int = 0
    #: Invokes that returned an answer (a response or an error) to their caller.
    answered: int = 0
    #: Answers to an id that had already been answered: dropped.
    duplicates: int = 0
    #: Answers to an id this client never asked for (or forgot): dropped.
    strays: int = 0
    #: Messages on the reply topic that are not a valid answer: dropped.
    bad_replies: int = 0
    connects: int = 0


Reply = Response | ErrorReply


class _Closed:
    """Put in a waiter's queue when the client closes under it."""


_CLOSED = _Closed()


# -- the broker link: paho and its thread --------------------------------------------------------


def _nodelay(sock: Any) -> None:
    with contextlib.suppress(OSError, AttributeError):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _safe_name(s: str) -> str:
    """``s`` usable as one topic level."""
    return "".join("_" if c in "/+#\0" else c for c in s) or "_"


class _Link:
    """One paho client, driven by its own network thread (``loop_start``/``loop_stop``).

    Every callback runs on that thread: replies go to ``deliver(key, reply)``,
    readiness (connected and the reply subscription acknowledged) to ``ready()``.
    """

    def __init__(
        self,
        url: str,
        *,
        client_id: str,
        tls: ssl.SSLContext | None,
        protocol: int,
        persistent: bool,
        session_expiry_s: int,
        keepalive: int,
        reply_topic: str,
        deliver: Callable[[str, Reply], None],
        ready: Callable[[], None],
        stats: ClientStats,
        lock: threading.Lock,
    ) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("mqtt", "mqtts", "tcp", "ssl") or not parts.hostname:
            raise ConnectError(f"broker URL {url!r} must be mqtt://HOST:PORT or mqtts://HOST:PORT")
        use_tls = parts.scheme in ("mqtts", "ssl")
        if use_tls and tls is None:
            raise ConnectError(f"{url} needs TLS: pass an ssl.SSLContext with the device's key")
        if protocol not in (5, 311):
            raise ValueError(f"protocol must be 5 or 311, not {protocol!r}")
        self.host = parts.hostname
        self.port = parts.port or (8883 if use_tls else 1883)
        self.v5 = protocol == 5
        self.reply_topic = reply_topic
        self._persistent = persistent
        self._session_expiry_s = session_expiry_s
        self._keepalive = keepalive
        self._deliver = deliver
        self._ready = ready
        self._stats = stats
        self._lock = lock
        self._sub_mid: int | None = None
        self.error: str | None = None
        kw: dict[str, Any] = {}
        if not self.v5:
            kw["clean_session"] = not persistent
        c = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=mqtt.MQTTv5 if self.v5 else mqtt.MQTTv311,
            **kw,
        )
        if use_tls:
            assert tls is not None
            c.tls_set_context(tls)
        c.max_inflight_messages_set(0)
        c.max_queued_messages_set(0)
        # Floats work (paho only multiplies and compares them): a broker restart costs
        # well under a second, not paho's default first wait of one second.
        c.reconnect_delay_set(0.05, 2)  # type: ignore[arg-type]
        c.on_socket_open = lambda _c, _u, sock: _nodelay(sock)
        c.on_connect = self._on_connect
        c.on_connect_fail = self._on_connect_fail
        c.on_subscribe = self._on_subscribe
        c.on_message = self._on_message
        self._c = c

    def start(self) -> None:
        """Start the network thread; it connects, and reconnects whenever the link drops."""
        kw: dict[str, Any] = {}
        if self.v5:
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = self._session_expiry_s if self._persistent else 0
            kw = {"clean_start": not self._persistent, "properties": props}
        self._c.connect_async(self.host, self.port, keepalive=self._keepalive, **kw)
        self._c.loop_start()

    def stop(self) -> None:
        """Disconnect cleanly and join the network thread."""
        with contextlib.suppress(Exception):
            self._c.disconnect()
        self._c.loop_stop()

    @property
    def thread(self) -> threading.Thread | None:
        t: threading.Thread | None = getattr(self._c, "_thread", None)
        return t

    def publish(self, topic: str, payload: bytes, props: Properties | None) -> None:
        """QoS 1; while the link is down paho keeps the message and sends it on reconnect."""
        info = self._c.publish(topic, payload, 1, False, props)
        if info.rc not in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN):
            raise ConnectError(f"publish to {topic} failed: {mqtt.error_string(info.rc)}")

    # -- paho callbacks (network thread) --------------------------------------------------

    def _on_connect(
        self, c: mqtt.Client, _u: Any, _flags: Any, rc: ReasonCode, _props: Any
    ) -> None:
        if rc.is_failure:
            self.error = f"the broker refused the connection: {rc}"
            return
        with self._lock:
            self._stats.connects += 1
        # Every time, persistent session or not: a broker that lost its state lost it too.
        _, self._sub_mid = c.subscribe(self.reply_topic, qos=1)

    def _on_connect_fail(self, _c: mqtt.Client, _u: Any) -> None:
        self.error = f"could not connect to {self.host}:{self.port}"

    def _on_subscribe(
        self, _c: mqtt.Client, _u: Any, mid: int, codes: list[ReasonCode], _props: Any
    ) -> None:
        if mid != self._sub_mid:
            return
        if any(code.is_failure for code in codes):
            self.error = f"the broker refused the subscription to {self.reply_topic}: {codes}"
            return
        self.error = None
        self._ready()

    def _on_message(self, _c: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
        props = getattr(msg, "properties", None) if self.v5 else None
        content_type = getattr(props, "ContentType", None)
        correlation = getattr(props, "CorrelationData", None)
        try:
            reply = decode_reply(bytes(msg.payload), content_type)
        except MessageError:
            with self._lock:
                self._stats.bad_replies += 1
            return
        # The id is in every request this client sends; the CorrelationData (the same
        # id) still finds an answer whose payload lost it.
        key = reply.id
        if not key and correlation:
            key = bytes(correlation).decode("utf-8", "replace")
        self._deliver(key, reply)


# -- one invoke's retry state ----------------------------------------------------------------------


class _Book:
    """Waiters by request id, and recently answered ids; shared by the caller and the link."""

    def __init__(self, stats: ClientStats, lock: threading.Lock) -> None:
        self._stats = stats
        self._lock = lock
        self._waiting: dict[str, Callable[[object], None]] = {}
        self._done: OrderedDict[str, None] = OrderedDict()
        self._closed = False

    def expect(self, rid: str, put: Callable[[object], None]) -> None:
        with self._lock:
            if self._closed:
                raise ConnectError("the client is closed")
            if rid in self._waiting:
                raise ValueError(f"request id {rid!r} is already being invoked by this client")
            self._waiting[rid] = put
            self._done.pop(rid, None)

    def deliver(self, rid: str, reply: object) -> None:
        with self._lock:
            put = self._waiting.get(rid)
            if put is None:
                if rid in self._done:
                    self._stats.duplicates += 1
                else:
                    self._stats.strays += 1
                return
        put(reply)

    def finish(self, rid: str, answered: bool, extra: int = 0) -> None:
        """The invoke is over: later answers to ``rid`` are duplicates."""
        with self._lock:
            self._waiting.pop(rid, None)
            self._done[rid] = None
            while len(self._done) > _REMEMBERED:
                self._done.popitem(last=False)
            if answered:
                self._stats.answered += 1
            self._stats.duplicates += extra

    def close_all(self) -> None:
        with self._lock:
            self._closed = True
            waiting = list(self._waiting.values())
        for put in waiting:
            put(_CLOSED)


@dataclass(frozen=True, slots=True)
class _Settings:
    timeout_s: float
    retries: int
    backoff: Backoff
    retry_on: frozenset[ErrorCode]
    on_retry: Callable[[str, int, str], None] | None


class _Call:
    """One invoke: sends and re-sends the request, and decides what each event means."""

    def __init__(
        self,
        link: _Link,
        stats: ClientStats,
        lock: threading.Lock,
        settings: _Settings,
        topic: str,
        inputs: Mapping[str, np.ndarray],
        rid: str,
        deadline_ms: int | None,
        encoding: Encoding,
    ) -> None:
        self.link = link
        self.stats = stats
        self.lock = lock
        self.s = settings
        self.topic = topic
        self.inputs = {k: np.asarray(v) for k, v in inputs.items()}
        self.rid = rid
        self.encoding = encoding
        self.deadline_ms = deadline_ms
        self.started = time.monotonic()
        self.deadline_at = (
            None if deadline_ms is None else self.started + max(0, deadline_ms) / 1000.0
        )
        self.attempts = 0
        self.retries_for_errors = 0
        self.wait_until = 0.0
        self.resend_at: float | None = None
        self.last_error: ErrorReply | None = None
        props = None
        if link.v5:
            props = Properties(PacketTypes.PUBLISH)
            props.ContentType = encoding.content_type
            props.ResponseTopic = link.reply_topic
            props.CorrelationData = rid.encode("utf-8")
        self.props = props
        self.payload = self._encode(deadline_ms)

    def _encode(self, deadline_ms: int | None) -> bytes:
        return encode_request(
            self.inputs,
            self.encoding,
            id=self.rid,
            deadline_ms=deadline_ms,
            reply_to=None if self.link.v5 else self.link.reply_topic,
        )

    def send(self, reason: str | None = None) -> None:
        now = time.monotonic()
        if reason is not None:
            if self.s.on_retry is not None:
                self.s.on_retry(self.rid, self.attempts, reason)
            if self.deadline_at is not None:
                # The deadline is the caller's budget: a retry carries what is left of it.
                left_ms = math.ceil((self.deadline_at - now) * 1000)
                self.payload = self._encode(max(1, left_ms))
        self.link.publish(self.topic, self.payload, self.props)
        self.attempts += 1
        with self.lock:
            self.stats.sent += 1
            if reason is not None:
                self.stats.retries += 1
        self.resend_at = None
        self.wait_until = now + self.s.timeout_s

    def next_wait(self) -> float:
        """Seconds until something must happen if no answer comes."""
        until = self.resend_at if self.resend_at is not None else self.wait_until
        if self.deadline_at is not None:
            # Past its deadline the mesh answers ``timeout`` itself: give that a moment.
            until = min(until, self.deadline_at + self.s.timeout_s)
        return max(0.0, until - time.monotonic())

    def on_silence(self) -> None:
        """Nothing came in time: re-send, or raise."""
        if self.resend_at is not None:
            # A backoff after a retryable error answer is over.
            assert self.last_error is not None
            if self._out_of_time():
                raise InvokeError(self.last_error.code, self.last_error.message, self.rid)
            self.send(self.last_error.code.value)
            return
        if self.attempts > self.s.retries or self._out_of_time():
            raise InvokeTimeout(
                f"no answer from the mesh after {self.attempts} attempt(s) "
                f"in {time.monotonic() - self.started:.1f} s",
                self.rid,
                self.attempts,
            )
        self.send("timeout")

    def on_reply(self, reply: object) -> Response | None:
        """An answer: return it, raise it, or schedule a re-send (None)."""
        if isinstance(reply, _Closed):
            raise ConnectError("the client was closed while the request was waiting")
        if isinstance(reply, Response):
            return reply
        assert isinstance(reply, ErrorReply)
        if (
            reply.code in self.s.retry_on
            and self.attempts <= self.s.retries
            and not self._out_of_time()
        ):
            self.last_error = reply
            if self.resend_at is None:
                self.resend_at = time.monotonic() + self.s.backoff.delay(self.retries_for_errors)
                self.retries_for_errors += 1
            return None
        raise InvokeError(reply.code, reply.message, self.rid)

    def _out_of_time(self) -> bool:
        return self.deadline_at is not None and time.monotonic() >= self.deadline_at


# -- the clients -----------------------------------------------------------------------------------


class _Base:
    """What both clients share: settings, the reply topic, the link and the book of waiters.

    ``client_id`` names the MQTT session (keep it stable with ``persistent=True``) and the
    reply topic, ``{root}/replies/{device_name}/{client_id}``.
    """

    def __init__(
        self,
        broker_url: str,
        *,
        client_id: str,
        tls: ssl.SSLContext | None,
        device_name: str,
        root: str = DEFAULT_ROOT,
        protocol: int = 5,
        timeout_s: float = 5.0,
        retries: int = 3,
        backoff: Backoff | None = None,
        retry_on: frozenset[ErrorCode] | set[ErrorCode] = frozenset({ErrorCode.SATURATED}),
        on_retry: Callable[[str, int, str], None] | None = None,
        persistent: bool = False,
        session_expiry_s: int = 3600,
        keepalive: int = 30,
        connect_timeout_s: float = 10.0,
    ) -> None:
        if timeout_s <= 0 or retries < 0:
            raise ValueError("timeout_s must be positive and retries at least 0")
        if not device_name or any(c in device_name for c in "/+#\0"):
            raise ValueError(f"device_name {device_name!r} must be one topic level")
        self.root = root.rstrip("/")
        self.device_name = device_name
        self.reply_topic = f"{self.root}/replies/{device_name}/{_safe_name(client_id)}"
        self.stats = ClientStats()
        self.connect_timeout_s = connect_timeout_s
        self._lock = threading.Lock()
        self._book = _Book(self.stats, self._lock)
        self._settings = _Settings(
            timeout_s, retries, backoff or Backoff(), frozenset(retry_on), on_retry
        )
        self._closed = False
        self._started = False
        self._ready_sync = threading.Event()
        self._link = _Link(
            broker_url,
            client_id=client_id,
            tls=tls,
            protocol=protocol,
            persistent=persistent,
            session_expiry_s=session_expiry_s,
            keepalive=keepalive,
            reply_topic=self.reply_topic,
            deliver=self._deliver,
            ready=self._on_ready,
            stats=self.stats,
            lock=self._lock,
        )

    @classmethod
    def from_home(cls, home: str | Path, device: str, **kw: Any) -> Self:
        """A client acting as ``device.{device}`` of a home folder (broker URL and root from
        its ``fnmesh.toml`` unless given)."""
        from fnmesh.certs.home import open_home
        from fnmesh.certs.identity import load_identity
        from fnmesh.certs.tls import client_context

        h = open_home(home)
        cfg = h.load_config()
        ident = load_identity(h.identity_dir(f"device.{device}"))
        kw.setdefault("root", cfg.topic_root)
        kw.setdefault("client_id", f"device.{device}-{uuid.uuid4().hex[:8]}")
        return cls(
            kw.pop("broker_url", cfg.broker),
            tls=client_context(ident, h.ca_cert),
            device_name=device,
            **kw,
        )

    @property
    def protocol(self) -> int:
        return 5 if self._link.v5 else 311

    def function_topic(self, function: str) -> str:
        ns, sep, name = function.partition("/")
        if not sep or not ns or not name or "/" in name or any(c in function for c in "+#\0"):
            raise ValueError(f"function {function!r} must be 'namespace/name'")
        return f"{self.root}/fn/{function}/invoke"

    def _new_call(
        self,
        function: str,
        inputs: Mapping[str, np.ndarray],
        id: str | None,
        deadline_ms: int | None,
        encoding: Encoding,
    ) -> _Call:
        if self._closed or not self._started:
            raise ConnectError("the client is not connected (use it as a context manager)")
        rid = id if id is not None else uuid.uuid4().hex
        return _Call(
            self._link,
            self.stats,
            self._lock,
            self._settings,
            self.function_topic(function),
            inputs,
            rid,
            deadline_ms,
            encoding,
        )

    def _deliver(self, rid: str, reply: Reply) -> None:
        raise NotImplementedError

    def _on_ready(self) -> None:
        raise NotImplementedError


class MeshClient(_Base):
    """The blocking client; safe to share between threads (each invoke blocks its caller)."""

    def _deliver(self, rid: str, reply: Reply) -> None:
        self._book.deliver(rid, reply)

    def _on_ready(self) -> None:
        self._ready_sync.set()

    def connect(self) -> MeshClient:
        """Connect and subscribe to the reply topic; raises :class:`ConnectError` in time."""
        if self._started:
            return self
        self._started = True
        self._link.start()
        if not self._ready_sync.wait(self.connect_timeout_s):
            why = self._link.error or "no answer from the broker"
            self.close()
            raise ConnectError(
                f"cannot connect to {self._link.host}:{self._link.port} "
                f"in {self.connect_timeout_s:.0f} s: {why}"
            )
        return self

    def close(self) -> None:
        """Disconnect and join the network thread; waiting invokes raise ConnectError."""
        if self._closed:
            return
        self._closed = True
        self._book.close_all()
        if self._started:
            self._link.stop()

    def __enter__(self) -> MeshClient:
        return self.connect()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def invoke(
        self,
        function: str,
        inputs: Mapping[str, np.ndarray],
        *,
        id: str | None = None,
        deadline_ms: int | None = None,
        encoding: Encoding = Encoding.MSGPACK,
    ) -> Response:
        """Run ``function`` (``ns/name``) on ``inputs``; raises :class:`InvokeError` for an error
        answer and :class:`InvokeTimeout` when every attempt went unanswered."""
        call = self._new_call(function, inputs, id, deadline_ms, encoding)
        q: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._book.expect(call.rid, q.put)
        answered = False
        try:
            call.send()
            while True:
                try:
                    got = q.get(timeout=call.next_wait())
                except queue.Empty:
                    call.on_silence()
                    continue
                out = call.on_reply(got)
                if out is not None:
                    answered = True
                    return out
        except InvokeTimeout:
            raise
        except InvokeError:
            answered = True
            raise
        finally:
            self._book.finish(call.rid, answered, _drain(q))


def _drain(q: queue.SimpleQueue[object]) -> int:
    n = 0
    while True:
        try:
            if not isinstance(q.get_nowait(), _Closed):
                n += 1
        except queue.Empty:
            return n


class AsyncMeshClient(_Base):
    """The asyncio client: paho in its own thread, every callback hopping to the loop that
    connected it (use it from that loop only)."""

    _loop: asyncio.AbstractEventLoop | None = None
    _ready_ev: asyncio.Event | None = None

    def _hop(self, fn: Callable[..., None], *args: Any) -> None:
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        with contextlib.suppress(RuntimeError):  # the loop closed under us
            loop.call_soon_threadsafe(fn, *args)

    def _deliver(self, rid: str, reply: Reply) -> None:
        self._hop(self._book.deliver, rid, reply)

    def _on_ready(self) -> None:
        if self._ready_ev is not None:
            self._hop(self._ready_ev.set)

    async def connect(self) -> AsyncMeshClient:
        """Connect and subscribe to the reply topic; raises :class:`ConnectError` in time."""
        if self._started:
            return self
        self._loop = asyncio.get_running_loop()
        self._ready_ev = asyncio.Event()
        self._started = True
        self._link.start()
        try:
            async with asyncio.timeout(self.connect_timeout_s):
                await self._ready_ev.wait()
        except TimeoutError:
            why = self._link.error or "no answer from the broker"
            await self.close()
            raise ConnectError(
                f"cannot connect to {self._link.host}:{self._link.port} "
                f"in {self.connect_timeout_s:.0f} s: {why}"
            ) from None
        return self

    async def close(self) -> None:
        """Disconnect and join the network thread; waiting invokes raise ConnectError."""
        if self._closed:
            return
        self._closed = True
        self._book.close_all()
        if self._started:
            # The join may take up to one pass of paho's select: not on the loop.
            await asyncio.to_thread(self._link.stop)

    async def __aenter__(self) -> AsyncMeshClient:
        return await self.connect()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def invoke(
        self,
        function: str,
        inputs: Mapping[str, np.ndarray],
        *,
        id: str | None = None,
        deadline_ms: int | None = None,
        encoding: Encoding = Encoding.MSGPACK,
    ) -> Response:
        """As :meth:`MeshClient.invoke`, without blocking the loop."""
        call = self._new_call(function, inputs, id, deadline_ms, encoding)
        q: asyncio.Queue[object] = asyncio.Queue()
        self._book.expect(call.rid, q.put_nowait)
        answered = False
        try:
            call.send()
            while True:
                try:
                    async with asyncio.timeout(call.next_wait()):
                        got = await q.get()
                except TimeoutError:
                    call.on_silence()
                    continue
                out = call.on_reply(got)
                if out is not None:
                    answered = True
                    return out
        except InvokeTimeout:
            raise
        except InvokeError:
            answered = True
            raise
        finally:
            extra = 0
            while not q.empty():
                if not isinstance(q.get_nowait(), _Closed):
                    extra += 1
            self._book.finish(call.rid, answered, extra)
