"""Helpers for the API security tests: a whole mesh started by ``fnmesh up``'s own code in a home
whose extra identities the tests issue first, mutual-TLS calls as any certificate (or none),
MQTT 5 peers that report PUBACK reason codes, and the ``fnmesh`` CLI as a child process.

Nothing here sleeps to wait: MQTT waits are on acknowledgements and messages, and the few
polling loops watch another process's state with a deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import paho.mqtt.client as mqtt
from conftest import SCALE
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from fnmesh.certs.home import Home
from fnmesh.certs.identity import Identity, load_identity

#: Upper bound (s) for what should happen within a second on an idle machine.
WAIT = 15.0 * max(1.0, SCALE)
FNMESH = Path(sys.executable).parent / "fnmesh"
if not FNMESH.exists():  # pragma: no cover - tests run from the project's venv
    FNMESH = Path(__file__).resolve().parents[1] / ".venv" / "bin" / "fnmesh"
#: PUBACK reason codes: accepted (with or without a matching subscriber), not authorized.
ACCEPTED = (0x00, 0x10)
NOT_AUTHORIZED = 0x87


# -- the CLI ---------------------------------------------------------------------------------


def cli(home: Home, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    """``fnmesh ARGS`` with ``FNMESH_HOME`` set to ``home`` (group options such as ``audit``'s
    come before the sub-verb, so the home travels in the environment)."""
    env = {**os.environ, "FNMESH_HOME": str(home.root), "PYTHONUNBUFFERED": "1"}
    return subprocess.run(
        [str(FNMESH), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        stdin=subprocess.DEVNULL,
        check=False,
    )


def cli_ok(home: Home, *args: str) -> str:
    out = cli(home, *args)
    assert out.returncode == 0, (
        f"fnmesh {' '.join(args)} exited {out.returncode}\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}"
    )
    return out.stdout


# -- REST calls as any certificate -------------------------------------------------------------


@dataclass(frozen=True)
class Answer:
    status: int
    body: bytes

    @property
    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def reason(self) -> str:
        """The error message of a problem body (empty when there is none)."""
        try:
            return str(self.json["error"]["message"])
        except (ValueError, KeyError, TypeError):
            return ""

    def __str__(self) -> str:
        return f"{self.status} {self.body[:300]!r}"


class Refused(Exception):
    """The TLS handshake (or the connection right after it) failed."""


@dataclass(frozen=True)
class Caller:
    """Calls the coordinator's API over TLS trusting ``ca``, presenting ``cert``/``key`` if any."""

    url: str
    ca: Path
    cert: Path | None = None
    key: Path | None = None
    name: str = "anonymous"

    @classmethod
    def of(cls, url: str, home: Home, ident: Identity | str) -> Caller:
        if isinstance(ident, str):
            ident = load_identity(home.identity_dir(ident))
        return cls(url, home.ca_cert, ident.cert_path, ident.key_path, ident.cn)

    def ssl_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(self.ca))
        if self.cert is not None:
            assert self.key is not None
            ctx.load_cert_chain(self.cert, self.key)
        return ctx

    async def call(
        self,
        method: str,
        path: str,
        *,
        json_body: Any = None,
        data: bytes | None = None,
        headers: dict[str, str] | None = None,
        timeout: float = WAIT,
    ) -> Answer:
        """The answer; :class:`Refused` when TLS refused this caller before any HTTP answer."""
        t = aiohttp.ClientTimeout(total=timeout)
        try:
            async with (
                aiohttp.ClientSession(timeout=t) as s,
                s.request(
                    method,
                    self.url + path,
                    json=json_body,
                    data=data,
                    headers=headers,
                    ssl=self.ssl_context(),
                ) as r,
            ):
                return Answer(r.status, await r.read())
        except (aiohttp.ClientConnectionError, ssl.SSLError, ConnectionError) as e:
            raise Refused(f"{self.name}: {type(e).__name__}: {e}") from e


# -- MQTT 5 peers ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Msg:
    topic: str
    payload: bytes
    correlation: bytes | None
    content_type: str | None
    #: ``time.monotonic()`` at arrival.
    at: float


class Peer:
    """A paho MQTT 5 client on the fleet's mutual TLS. Its network loop runs in paho's own thread
    and every callback hops to the test's event loop, where the waits are."""

    def __init__(self, port: int, home: Home, ident: Identity | str, tag: str = "") -> None:
        if isinstance(ident, str):
            ident = load_identity(home.identity_dir(ident))
        self.cn = ident.cn
        self.port = port
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(home.ca_cert))
        ctx.load_cert_chain(ident.cert_path, ident.key_path)
        # A client id of its own: the mesh's processes keep theirs.
        cid = f"{ident.cn}-{tag or 'sec'}-{secrets.token_hex(3)}"
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=cid, protocol=mqtt.MQTTv5)
        self.client.tls_set_context(ctx)
        self.messages: list[Msg] = []
        self._loop = asyncio.get_running_loop()
        self._changed = asyncio.Event()
        self._connected: asyncio.Future[int] = self._loop.create_future()
        self._acks: dict[int, asyncio.Future[int]] = {}
        self._subacks: dict[int, asyncio.Future[list[int]]] = {}
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.client.on_publish = self._on_publish
        self.client.on_subscribe = self._on_subscribe

    def _hop(self, fn: Callable[..., None], *args: Any) -> None:
        if not self._loop.is_closed():
            self._loop.call_soon_threadsafe(fn, *args)

    def _on_connect(self, _c: Any, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        def done() -> None:
            if not self._connected.done():
                self._connected.set_result(reason.value)

        self._hop(done)

    def _on_message(self, _c: Any, _u: Any, msg: mqtt.MQTTMessage) -> None:
        props = getattr(msg, "properties", None)
        m = Msg(
            msg.topic,
            bytes(msg.payload),
            getattr(props, "CorrelationData", None),
            getattr(props, "ContentType", None),
            time.monotonic(),
        )

        def put() -> None:
            self.messages.append(m)
            self._changed.set()

        self._hop(put)

    def _resolve(self, table: dict[int, asyncio.Future[Any]], mid: int, value: Any) -> None:
        fut = table.setdefault(mid, self._loop.create_future())
        if not fut.done():
            fut.set_result(value)

    def _on_publish(self, _c: Any, _u: Any, mid: int, reason: Any, _p: Any) -> None:
        self._hop(self._resolve, self._acks, mid, reason.value)

    def _on_subscribe(self, _c: Any, _u: Any, mid: int, reasons: Any, _p: Any) -> None:
        self._hop(self._resolve, self._subacks, mid, [r.value for r in reasons])

    async def __aenter__(self) -> Peer:
        await asyncio.to_thread(self.client.connect, "127.0.0.1", self.port, 30)
        self.client.loop_start()
        try:
            async with asyncio.timeout(WAIT):
                rc = await self._connected
            assert rc == 0, f"{self.cn}: CONNACK {rc:#x}"
        except BaseException:
            await self.__aexit__()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.client.disconnect()
        await asyncio.to_thread(self.client.loop_stop)

    async def subscribe(self, topic: str) -> list[int]:
        """Subscribe at QoS 1; the SUBACK's reason codes."""
        _rc, mid = self.client.subscribe(topic, qos=1)
        assert mid is not None
        fut = self._subacks.setdefault(mid, self._loop.create_future())
        try:
            async with asyncio.timeout(WAIT):
                return await fut
        finally:
            self._subacks.pop(mid, None)

    async def publish(
        self,
        topic: str,
        payload: bytes,
        *,
        response_topic: str | None = None,
        correlation: bytes | None = None,
        content_type: str | None = None,
    ) -> int:
        """Publish at QoS 1; the PUBACK's reason code (0 or 0x10 accepted, 0x87 not authorized)."""
        props = None
        if response_topic or correlation or content_type:
            props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
            if response_topic:
                props.ResponseTopic = response_topic
            if correlation:
                props.CorrelationData = correlation
            if content_type:
                props.ContentType = content_type
        info = self.client.publish(topic, payload, qos=1, properties=props)
        fut = self._acks.setdefault(info.mid, self._loop.create_future())
        try:
            async with asyncio.timeout(WAIT):
                return await fut
        finally:
            self._acks.pop(info.mid, None)

    async def wait_for(
        self, pred: Callable[[Msg], bool], timeout: float = WAIT, what: str = "a message"
    ) -> Msg:
        """The first message (already received or arriving) that satisfies ``pred``."""
        end = time.monotonic() + timeout
        i = 0
        while True:
            while i < len(self.messages):
                if pred(self.messages[i]):
                    return self.messages[i]
                i += 1
            left = end - time.monotonic()
            if left <= 0:
                raise AssertionError(f"{self.cn}: no {what} within {timeout:.0f} s")
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(left):
                    await self._changed.wait()


def broker_refuses(port: int, home: Home, ident: Identity) -> bool:
    """True when the broker ends the connection instead of accepting this certificate's CONNECT."""
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(home.ca_cert))
    ctx.load_cert_chain(ident.cert_path, ident.key_path)
    client = mqtt.Client(
        CallbackAPIVersion.VERSION2,
        client_id=f"{ident.cn}-probe-{secrets.token_hex(3)}",
        protocol=mqtt.MQTTv5,
    )
    client.tls_set_context(ctx)
    accepted, closed = threading.Event(), threading.Event()
    client.on_connect = lambda _c, _u, _f, reason, _p: (
        closed if reason.is_failure else accepted
    ).set()
    client.on_disconnect = lambda *_a: closed.set()
    try:
        client.connect("127.0.0.1", port, keepalive=30)
    except (ssl.SSLError, OSError):
        return True
    client.loop_start()
    try:
        deadline = time.monotonic() + WAIT
        while time.monotonic() < deadline:
            if accepted.is_set():
                return False
            if closed.wait(0.05):
                return not accepted.is_set()
        raise AssertionError(f"{ident.cn}: neither accepted nor refused by the broker")
    finally:
        client.disconnect()
        client.loop_stop()


# -- processes ---------------------------------------------------------------------------------


def spawn_agent(home: Home, name: str, labels: str, heartbeat: float) -> subprocess.Popen[bytes]:
    """``fnmesh agent`` as a child of the test (the caller stops it)."""
    log = home.root / "logs" / f"agent-{name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "FNMESH_HOME": str(home.root), "PYTHONUNBUFFERED": "1"}
    args = ["agent", "--name", name, "--labels", labels, "--heartbeat", str(heartbeat), "-v"]
    with open(log, "ab") as out:
        return subprocess.Popen(
            [str(FNMESH), *args],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
        )


def stop_process(p: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    if p.poll() is None:
        p.terminate()
        try:
            p.wait(timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(5)


def poll_until(cond: Callable[[], Any], what: str, timeout: float = WAIT) -> Any:
    """Poll another process's state (REST, files) until ``cond()`` is truthy, with a deadline."""
    end = time.monotonic() + timeout
    while True:
        got = cond()
        if got:
            return got
        if time.monotonic() > end:
            raise AssertionError(f"{what}: not within {timeout:.0f} s")
        time.sleep(0.05)
