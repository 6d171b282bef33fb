"""An MQTT 5 client that lives on the asyncio loop.

paho-mqtt's socket is driven by the loop (``add_reader``/``add_writer``), so
every paho callback runs on the loop thread. The only work done elsewhere is
the blocking TCP/TLS connect, run in the default executor; the socket
callbacks it triggers hop back with ``call_soon_threadsafe``. Every socket gets
TCP_NODELAY: with Nagle a QoS 1 round trip on loopback costs ~88 ms instead
of ~0.35 ms.

Publishes that matter are awaited until the broker acknowledges them;
reconnection is a task with exponential backoff, after which subscriptions and
the ``on_connect`` hooks (status re-publish) run again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.matcher import MQTTMatcher
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from fnmesh.agent import mqtt_speedups
from fnmesh.errors import MeshError

mqtt_speedups.apply()

log = logging.getLogger("fnmesh.mqtt")

Handler = Callable[[mqtt.MQTTMessage], None]
Hook = Callable[[], Coroutine[Any, Any, None]]


class TransportError(MeshError):
    """The broker could not be reached, or refused us."""


@dataclass(frozen=True, slots=True)
class BrokerURL:
    host: str
    port: int
    tls: bool

    @classmethod
    def parse(cls, url: str) -> BrokerURL:
        parts = urlsplit(url)
        if parts.scheme not in ("mqtt", "mqtts", "tcp", "ssl"):
            raise TransportError(f"broker URL {url!r} must start with mqtt:// or mqtts://")
        tls = parts.scheme in ("mqtts", "ssl")
        if not parts.hostname:
            raise TransportError(f"broker URL {url!r} has no host")
        return cls(parts.hostname, parts.port or (8883 if tls else 1883), tls)


@dataclass(frozen=True, slots=True)
class Will:
    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = True


def _nodelay(sock: Any) -> None:
    with contextlib.suppress(OSError, AttributeError):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def properties(
    packet: int = PacketTypes.PUBLISH,
    *,
    content_type: str | None = None,
    correlation: bytes | None = None,
    response_topic: str | None = None,
    expiry: int | None = None,
) -> Properties | None:
    """MQTT 5 properties for a publish, or None when there are none."""
    if content_type is None and correlation is None and response_topic is None and expiry is None:
        return None
    p = Properties(packet)
    if content_type is not None:
        p.ContentType = content_type
    if correlation is not None:
        p.CorrelationData = correlation
    if response_topic is not None:
        p.ResponseTopic = response_topic
    if expiry is not None:
        p.MessageExpiryInterval = expiry
    return p


def reply_properties(content_type: str, correlation: bytes | None) -> Properties:
    """An answer's properties: its ContentType, and the request's CorrelationData if any.

    What :func:`properties` makes, without checking each name and value again
    (both are known good here): an agent sends one for every answer.
    """
    p = Properties(PacketTypes.PUBLISH)
    # The fast Properties (mqtt_speedups) keep each property under its compressed name.
    d = p.__dict__
    d["ContentType"] = content_type
    if correlation is not None:
        d["CorrelationData"] = correlation
    return p


class _CachingMatcher(MQTTMatcher):
    """paho's filter tree, remembering which values each topic matched.

    paho walks the tree (a recursive generator) for every message it
    dispatches, and a client sees the same few topics over and over. Any
    change to the filters forgets everything remembered.
    """

    #: Topics remembered (all are forgotten when full).
    SIZE = 4096

    def __init__(self) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self._matched: dict[str, list[Any]] = {}

    def __setitem__(self, key: str, value: Any) -> None:
        super().__setitem__(key, value)  # type: ignore[no-untyped-call]
        self._matched.clear()

    def __delitem__(self, key: str) -> None:
        super().__delitem__(key)  # type: ignore[no-untyped-call]
        self._matched.clear()

    def iter_match(self, topic: str) -> Iterator[Any]:
        found = self._matched.get(topic)
        if found is None:
            found = list(super().iter_match(topic))  # type: ignore[no-untyped-call]
            if len(self._matched) >= self.SIZE:
                self._matched.clear()
            self._matched[topic] = found
        return iter(found)


class _CoalescingClient(mqtt.Client):
    """paho's client, writing every packet queued in one loop pass with one socket send.

    paho sends each packet with its own ``send``: over TLS that is one record
    and one system call per packet (a publish and a PUBACK per request). Here
    ``loop_write`` collects what paho would send and writes it at once; bytes
    the socket does not take stay buffered, in order, until it is writable.
    Nothing buffered survives a reconnect (QoS 1 messages are re-sent by paho).

    Its callback filters sit in a :class:`_CachingMatcher`.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._on_message_filtered = _CachingMatcher()
        self._wbuf = bytearray()
        self._collecting = False

    def _sock_send(self, buf: bytes | bytearray) -> int:
        if self._collecting:
            self._wbuf += buf
            return len(buf)
        return super()._sock_send(buf)

    def loop_write(self) -> MQTTErrorCode:
        if self._wbuf and not self._flush():
            return mqtt.MQTT_ERR_SUCCESS
        self._collecting = True
        try:
            rc = super().loop_write()
        finally:
            self._collecting = False
        self._flush()
        return rc

    def _flush(self) -> bool:
        """Send buffered bytes; False if the socket could not take them all."""
        while self._wbuf:
            try:
                n = super()._sock_send(bytes(self._wbuf))
            except BlockingIOError:
                # paho has just asked for a writable callback (its own
                # ``want_write`` no longer sees these bytes); the rest waits for it.
                return False
            except (OSError, ConnectionError):
                self._wbuf.clear()
                return False
            del self._wbuf[:n]
        return True

    def reset_buffer(self) -> None:
        self._wbuf.clear()

    def _sock_close(self) -> None:
        # paho closes the socket as soon as it has "sent" a DISCONNECT, which here is
        # still in the buffer: without this the broker sees a dropped link and
        # publishes the Last Will ("offline" without the node's functions) on every
        # clean stop.
        if self._wbuf and self._sock is not None:
            self._flush()
        super()._sock_close()


class MqttClient:
    """One MQTT 5 connection, owned by one asyncio loop."""

    def __init__(
        self,
        url: str,
        client_id: str,
        *,
        ssl_context: ssl.SSLContext | None = None,
        keepalive: int = 5,
        will: Will | None = None,
        persistent: bool = True,
        session_expiry: int = 7 * 24 * 3600,
        username: str | None = None,
        on_connect: Hook | None = None,
    ) -> None:
        self.url = BrokerURL.parse(url)
        if self.url.tls and ssl_context is None:
            raise TransportError(f"{url} needs TLS: no certificate configured for this identity")
        self.client_id = client_id
        self.keepalive = keepalive
        self._persistent = persistent
        self._session_expiry = session_expiry
        self._hooks: list[Hook] = [on_connect] if on_connect else []
        self._subs: dict[str, int] = {}
        self._acks: dict[int, asyncio.Future[None]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._connected = asyncio.Event()
        self._connect_error: str | None = None
        self._closing = False
        self._misc_task: asyncio.Task[None] | None = None
        self._reconnect_task: asyncio.Task[None] | None = None
        self._hook_tasks: set[asyncio.Task[None]] = set()
        self._sock: Any = None
        self._writing = False
        self._flush_scheduled = False
        self.reconnects = 0

        c = _CoalescingClient(
            CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=mqtt.MQTTv5,
            reconnect_on_failure=False,
        )
        if ssl_context is not None and self.url.tls:
            c.tls_set_context(ssl_context)
        if username:
            c.username_pw_set(username)
        if will is not None:
            c.will_set(will.topic, will.payload, will.qos, will.retain)
        c.max_inflight_messages_set(0)
        c.max_queued_messages_set(0)
        c.on_socket_open = self._on_socket_open
        c.on_socket_close = self._on_socket_close
        c.on_socket_register_write = self._on_register_write
        c.on_socket_unregister_write = self._on_unregister_write
        c.on_connect = self._on_connect
        c.on_disconnect = self._on_disconnect
        c.on_publish = self._on_publish
        c.on_message = self._on_unrouted
        self._c: _CoalescingClient = c

    # -- public API -------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def add_connect_hook(self, hook: Hook) -> None:
        self._hooks.append(hook)

    def subscribe(self, topic: str, handler: Handler, qos: int = 1) -> None:
        """Route messages matching ``topic`` to ``handler`` (called on the loop)."""
        self._c.message_callback_add(topic, lambda _c, _u, msg: handler(msg))
        self._subs[topic] = qos
        if self.connected:
            self._c.subscribe(topic, qos)

    async def async_start(self, timeout: float = 10.0) -> None:
        """Connect, and keep reconnecting in the background if the link drops."""
        self._loop = asyncio.get_running_loop()
        self._closing = False
        try:
            async with asyncio.timeout(timeout):
                await self._async_connect_once()
        except TimeoutError as e:
            raise TransportError(
                f"no answer from the broker at {self.url.host}:{self.url.port} in {timeout:.0f} s"
                + (f" ({self._connect_error})" if self._connect_error else "")
            ) from e

    async def async_publish(
        self,
        topic: str,
        payload: bytes,
        qos: int = 1,
        retain: bool = False,
        props: Properties | None = None,
        timeout: float = 10.0,
    ) -> None:
        """Publish and wait until the broker has it (PUBACK for QoS 1)."""
        info = self._c.publish(topic, payload, qos, retain, props)
        if info.rc != mqtt.MQTT_ERR_SUCCESS and info.rc != mqtt.MQTT_ERR_NO_CONN:
            raise TransportError(f"publish to {topic} failed: {mqtt.error_string(info.rc)}")
        if qos == 0:
            return
        if info.is_published():
            return
        fut = asyncio.get_running_loop().create_future()
        self._acks[info.mid] = fut
        try:
            async with asyncio.timeout(timeout):
                await fut
        finally:
            self._acks.pop(info.mid, None)

    def publish(
        self,
        topic: str,
        payload: bytes | bytearray,
        qos: int = 1,
        retain: bool = False,
        props: Properties | None = None,
    ) -> None:
        """Publish without waiting (paho keeps QoS 1 messages until acknowledged)."""
        self._c.publish(topic, payload, qos, retain, props)

    async def async_stop(self, timeout: float = 5.0) -> None:
        """Disconnect cleanly (no Last Will) and stop every task this client started."""
        self._closing = True
        for t in (self._reconnect_task, self._misc_task, *self._hook_tasks):
            if t is not None:
                t.cancel()
        if self.connected:
            self._c.disconnect()
            # Let the loop flush the DISCONNECT packet before the socket goes.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await self._wait_closed()
        self._drop_socket()
        for fut in self._acks.values():
            if not fut.done():
                fut.set_exception(TransportError("client stopped"))
        for t in (self._reconnect_task, self._misc_task, *self._hook_tasks):
            if t is not None:
                with contextlib.suppress(BaseException):
                    await t
        self._hook_tasks.clear()

    # -- connection -------------------------------------------------------------------

    async def _async_connect_once(self) -> None:
        assert self._loop is not None
        self._connected.clear()
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = self._session_expiry if self._persistent else 0
        await self._loop.run_in_executor(
            None,
            lambda: self._c.connect(
                self.url.host,
                self.url.port,
                keepalive=self.keepalive,
                clean_start=not self._persistent,
                properties=props,
            ),
        )
        await self._connected.wait()

    async def _wait_closed(self) -> None:
        while self._sock is not None:
            await asyncio.sleep(0.005)

    async def _reconnect_loop(self) -> None:
        delay = 0.05
        while not self._closing:
            try:
                async with asyncio.timeout(10):
                    await self._async_connect_once()
                self.reconnects += 1
                log.info("reconnected to broker", extra={"client": self.client_id})
                return
            except (OSError, TimeoutError, ssl.SSLError, ValueError) as e:
                log.debug("reconnect failed: %s", e)
                self._drop_socket()
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)

    async def _misc_loop(self) -> None:
        while not self._closing:
            await asyncio.sleep(min(1.0, self.keepalive / 2))
            if self._c.loop_misc() != mqtt.MQTT_ERR_SUCCESS:
                break

    # -- paho socket callbacks (may arrive from the connect thread) -------------------

    def _call(self, fn: Callable[[], None]) -> None:
        loop = self._loop
        if loop is None:
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            fn()
        else:
            loop.call_soon_threadsafe(fn)

    def _on_socket_open(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        _nodelay(sock)
        self._c.reset_buffer()

        def attach() -> None:
            assert self._loop is not None
            self._sock = sock
            self._loop.add_reader(sock, self._readable)
            if self._misc_task is None or self._misc_task.done():
                self._misc_task = self._loop.create_task(self._misc_loop())

        self._call(attach)

    def _readable(self) -> None:
        sock = self._sock
        self._c.loop_read()
        # TLS may hold decrypted bytes the selector will never report.
        while sock is not None and sock is self._sock and getattr(sock, "pending", lambda: 0)():
            self._c.loop_read()

    def _on_socket_close(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        self._call(self._drop_socket)

    def _drop_socket(self) -> None:
        if self._sock is not None and self._loop is not None:
            with contextlib.suppress(ValueError, OSError):
                self._loop.remove_reader(self._sock)
                self._loop.remove_writer(self._sock)
        self._sock = None

    def _on_register_write(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        def attach() -> None:
            if self._loop is None:
                return
            if self._writing:
                # The socket did not take everything: wait until it is writable.
                self._loop.add_writer(sock, self._write)
            elif not self._flush_scheduled:
                # Everything published during this loop pass goes out in one write.
                self._flush_scheduled = True
                self._loop.call_soon(self._write)

        self._call(attach)

    def _write(self) -> None:
        self._flush_scheduled = False
        self._writing = True
        try:
            self._c.loop_write()
        finally:
            self._writing = False

    def _on_unregister_write(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        def detach() -> None:
            if self._loop is not None:
                with contextlib.suppress(ValueError, OSError):
                    self._loop.remove_writer(sock)

        self._call(detach)

    # -- paho protocol callbacks (on the loop) ----------------------------------------

    def _on_connect(
        self, client: mqtt.Client, userdata: Any, flags: Any, rc: ReasonCode, props: Any
    ) -> None:
        if rc.is_failure:
            self._connect_error = f"broker refused the connection: {rc}"
            log.warning(self._connect_error)
            return
        self._connect_error = None
        for topic, qos in self._subs.items():
            client.subscribe(topic, qos)
        self._connected.set()
        assert self._loop is not None
        for hook in self._hooks:
            t = self._loop.create_task(hook())
            self._hook_tasks.add(t)
            t.add_done_callback(self._hook_tasks.discard)

    def _on_disconnect(
        self, client: mqtt.Client, userdata: Any, flags: Any, rc: ReasonCode, props: Any
    ) -> None:
        self._connected.clear()
        if self._closing or self._loop is None:
            return
        log.warning("lost the broker connection: %s", rc)
        if self._reconnect_task is None or self._reconnect_task.done():
            self._reconnect_task = self._loop.create_task(self._reconnect_loop())

    def _on_publish(
        self, client: mqtt.Client, userdata: Any, mid: int, rc: ReasonCode, props: Any
    ) -> None:
        fut = self._acks.pop(mid, None)
        if fut is not None and not fut.done():
            if rc.is_failure:
                fut.set_exception(TransportError(f"broker refused publish: {rc}"))
            else:
                fut.set_result(None)

    def _on_unrouted(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        log.debug("message on %s matched no handler", msg.topic)
