"""Helpers for the node agent's tests: bundles wrapped for a node, agents in and out of process,
and devices (fnmesh's own MQTT 5 client and a plain paho MQTT 3.1.1 one).

Everything here waits on events, acknowledgements or retained messages, never on a fixed
sleep; the few polling loops watch state no event reports (files, another process, the
warm pool's idle clock) and always carry a deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import os
import re
import sys
import time
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import onnxruntime as ort
import paho.mqtt.client as paho
from conftest import SCALE, Broker, Fleet
from paho.mqtt.enums import CallbackAPIVersion

from fnmesh.agent.main import Agent, AgentConfig
from fnmesh.agent.mqtt import MqttClient, properties
from fnmesh.certs.identity import Identity
from fnmesh.certs.tls import client_context
from fnmesh.functions import bundle as fnb
from fnmesh.functions.examples.models import NAMESPACE, build_example
from fnmesh.functions.messages import (
    Encoding,
    ErrorReply,
    Response,
    decode_reply,
    encode_request,
)

#: Upper bound (s) for anything that should happen at once on an idle machine.
WAIT = 10.0 * max(1.0, SCALE)
NODE = "lyon-1"
FNMESH = Path(sys.executable).parent / "fnmesh"
if not FNMESH.exists():  # pragma: no cover - tests run from the project's venv
    FNMESH = Path(__file__).resolve().parents[1] / ".venv" / "bin" / "fnmesh"


def new_root() -> str:
    """A topic root of its own, so no test ever sees another's retained messages."""
    return f"t{uuid.uuid4().hex[:12]}"


def fid(name: str) -> str:
    """``digits`` -> ``examples/digits``."""
    return name if "/" in name else f"{NAMESPACE}/{name}"


# -- bundles ---------------------------------------------------------------------------


def build_bundle(
    fleet: Fleet,
    model: str | bytes,
    *,
    nodes: Iterable[str] = (NODE,),
    name: str | None = None,
    version: str = "1.0.0",
    **kw: Any,
) -> bytes:
    """An example (by name) or an ONNX model, signed by the fleet's publisher, keyed for ``nodes``."""
    if isinstance(model, str):
        name = name or fid(model)
        model = build_example(model).onnx_bytes
    assert name is not None, "a raw model needs a function name"
    recipients = {}
    for ident in (fleet.coordinator, *(fleet.node(n) for n in nodes)):
        assert ident.info.x25519 is not None
        recipients[ident.cn] = ident.info.x25519
    b = fnb.build(
        model, name=name, version=version, publisher=fleet.publisher, recipients=recipients, **kw
    )
    return b.to_bytes()


# -- reference answers -------------------------------------------------------------------


@functools.cache
def _session(model: bytes) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    return ort.InferenceSession(model, sess_options=so, providers=["CPUExecutionProvider"])


def ort_run(model: str | bytes, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """What ONNX Runtime itself says for ``inputs`` (an example by name, or model bytes)."""
    if isinstance(model, str):
        model = build_example(model).onnx_bytes
    s = _session(model)
    values = s.run(None, {k: np.asarray(v) for k, v in inputs.items()})
    return {o.name: np.asarray(v) for o, v in zip(s.get_outputs(), values, strict=True)}


def assert_same_outputs(
    got: Mapping[str, np.ndarray], want: Mapping[str, np.ndarray], what: str = ""
) -> None:
    """Same names, dtypes and shapes; integers exact, floats to within float32 rounding."""
    assert set(got) == set(want), f"{what}: outputs {sorted(got)} != {sorted(want)}"
    for k, w in want.items():
        g = np.asarray(got[k])
        assert g.dtype == w.dtype, f"{what}: {k} dtype {g.dtype} != {w.dtype}"
        assert g.shape == w.shape, f"{what}: {k} shape {g.shape} != {w.shape}"
        if np.issubdtype(w.dtype, np.floating):
            np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6, err_msg=f"{what}: {k}")
        else:
            np.testing.assert_array_equal(g, w, err_msg=f"{what}: {k}")


def rows(inputs: Mapping[str, np.ndarray], i: int, j: int | None = None) -> dict[str, np.ndarray]:
    """Rows ``i:j`` (one row when ``j`` is None) of every input, as a batch."""
    j = i + 1 if j is None else j
    return {k: np.ascontiguousarray(v[i:j]) for k, v in inputs.items()}


# -- metrics -------------------------------------------------------------------------------

_SAMPLE = re.compile(r"^([a-zA-Z_:][\w:]*)(\{[^}]*\})?\s+(\S+)$")


def metric(agent: Agent, name: str, **labels: str) -> float:
    """The value of one sample of the agent's Prometheus text (0 if absent)."""
    text = agent.metrics.render().decode()
    total = 0.0
    for line in text.splitlines():
        m = _SAMPLE.match(line)
        if not m or m.group(1) != name:
            continue
        have = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', m.group(2) or ""))
        if all(have.get(k) == v for k, v in labels.items()):
            total += float(m.group(3))
    return total


# -- an agent in this process ------------------------------------------------------------------


@contextlib.asynccontextmanager
async def running_agent(
    fleet: Fleet,
    broker: Broker,
    root: str,
    bundles: Iterable[bytes] = (),
    *,
    node: str = NODE,
    prewarm: bool = True,
    **cfg: Any,
) -> AsyncIterator[Agent]:
    """Start an agent on this loop serving ``bundles``; it is always stopped on the way out."""
    fleet.node(node)
    cfg.setdefault("heartbeat_s", 0.5)
    agent = Agent(
        AgentConfig(home=fleet.home.root, name=node, broker=broker.tls_url, topic_root=root, **cfg)
    )
    try:
        await agent.async_start()
        for b in bundles:
            await agent.async_serve_bundle(b, prewarm=prewarm)
        # The inbox SUBSCRIBE went out before this PUBLISH on the same connection, so its
        # acknowledgement means the broker routes requests to the agent from now on.
        await agent.presence.async_publish_status()
        yield agent
    finally:
        await agent.async_stop()


# -- replies ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Reply:
    """One message a device received."""

    topic: str
    payload: bytes
    correlation: bytes | None = None
    content_type: str | None = None
    qos: int = 1

    @property
    def body(self) -> Response | ErrorReply:
        return decode_reply(self.payload, self.content_type)

    @property
    def raw(self) -> dict[str, Any]:
        """The payload as a plain map, whatever its encoding."""
        if self.payload[:1] == b"{":
            out = json.loads(self.payload)
        else:
            out = msgpack.unpackb(self.payload, raw=False)
        assert isinstance(out, dict)
        return out

    def ok(self) -> Response:
        b = self.body
        assert isinstance(b, Response), f"expected an answer, got {b}"
        return b

    def error(self) -> ErrorReply:
        b = self.body
        assert isinstance(b, ErrorReply), f"expected an error, got {b}"
        return b


class _Mailbox:
    """Messages per topic, each in arrival order, with waits that time out."""

    def __init__(self) -> None:
        self.by_topic: dict[str, asyncio.Queue[Reply]] = defaultdict(asyncio.Queue)
        self.all: list[Reply] = []

    def put(self, r: Reply) -> None:
        self.all.append(r)
        self.by_topic[r.topic].put_nowait(r)

    async def get(self, topic: str, timeout: float = WAIT) -> Reply:
        try:
            async with asyncio.timeout(timeout):
                return await self.by_topic[topic].get()
        except TimeoutError:
            raise AssertionError(f"no message on {topic} within {timeout:.0f} s") from None

    def pending(self, topic: str) -> int:
        return self.by_topic[topic].qsize()


class Device:
    """A device on fnmesh's own MQTT 5 client: ResponseTopic + CorrelationData requests.

    Every request gets a reply topic of its own under ``{root}/replies/{name}/``.
    """

    def __init__(self, fleet: Fleet, broker: Broker, root: str, name: str = "meter-1") -> None:
        self.ident: Identity = fleet.device(name)
        self.root = root
        self.name = name
        self.replies = f"{root}/replies/{name}/"
        self.mail = _Mailbox()
        self.client = MqttClient(
            broker.tls_url,
            f"{self.ident.cn}-{uuid.uuid4().hex[:6]}",
            ssl_context=client_context(self.ident, fleet.home.ca_cert),
            persistent=False,
        )
        self.client.subscribe(self.replies + "#", self._on_message)

    def _on_message(self, msg: paho.MQTTMessage) -> None:
        props = getattr(msg, "properties", None)
        self.mail.put(
            Reply(
                msg.topic,
                bytes(msg.payload),
                getattr(props, "CorrelationData", None),
                getattr(props, "ContentType", None),
                msg.qos,
            )
        )

    async def watch_everything(self) -> None:
        """Also collect every message on the broker; returns once the subscription is live."""
        self.client.subscribe("#", self._on_message)
        probe = self.replies + "watching"
        await self.client.async_publish(probe, b"probe", qos=1)
        await self.mail.get(probe)

    async def __aenter__(self) -> Device:
        try:
            await self.client.async_start()
        except BaseException:
            await self.client.async_stop()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.client.async_stop()

    def reply_topic(self) -> str:
        return self.replies + uuid.uuid4().hex[:12]

    async def send(
        self,
        function: str,
        inputs: Mapping[str, np.ndarray] | None = None,
        *,
        payload: bytes | None = None,
        encoding: Encoding = Encoding.MSGPACK,
        id: str | None = None,
        deadline_ms: int | None = None,
        response_topic: str | bool | None = True,
        correlation: bytes | bool | None = True,
        content_type: str | bool | None = True,
        reply_to: str | None = None,
        expiry: int | None = None,
        node: str = NODE,
        topic: str | None = None,
        qos: int = 1,
    ) -> tuple[str | None, bytes | None]:
        """Publish one request (acknowledged at QoS 1); returns its reply topic and correlation.

        ``True`` means "make one up" (response topic, correlation) or "say the encoding"
        (content type); ``None`` leaves the property out.
        """
        if payload is None:
            assert inputs is not None
            payload = encode_request(
                inputs, encoding, id=id, deadline_ms=deadline_ms, reply_to=reply_to
            )
        rt = self.reply_topic() if response_topic is True else response_topic
        corr = uuid.uuid4().bytes if correlation is True else correlation
        ct = encoding.content_type if content_type is True else content_type
        assert not isinstance(rt, bool) and not isinstance(corr, bool)
        assert not isinstance(ct, bool)
        await self.client.async_publish(
            topic or f"{self.root}/nodes/{node}/invoke/{fid(function)}",
            payload,
            qos=qos,
            props=properties(content_type=ct, correlation=corr, response_topic=rt, expiry=expiry),
        )
        return rt or reply_to, corr

    async def call(
        self, function: str, inputs: Mapping[str, np.ndarray] | None = None, **kw: Any
    ) -> Reply:
        """Send one request and wait for its answer."""
        timeout = kw.pop("timeout", WAIT)
        topic, _ = await self.send(function, inputs, **kw)
        assert topic is not None
        return await self.mail.get(topic, timeout)


class Device311:
    """A device on plain paho speaking MQTT 3.1.1: ``reply_to`` and ``id`` ride in the payload."""

    def __init__(self, fleet: Fleet, broker: Broker, root: str, name: str = "old-meter") -> None:
        self.ident = fleet.device(name)
        self.root = root
        self.replies = f"{root}/replies/{name}/"
        self.mail = _Mailbox()
        self._broker = broker
        self._loop = asyncio.get_running_loop()
        self._connected = asyncio.Event()
        self._subacks: dict[int, asyncio.Event] = {}
        c = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=f"{self.ident.cn}-{uuid.uuid4().hex[:6]}",
            protocol=paho.MQTTv311,
        )
        c.tls_set_context(client_context(self.ident, fleet.home.ca_cert))
        c.on_connect = lambda *a: self._loop.call_soon_threadsafe(self._connected.set)
        c.on_message = lambda _c, _u, m: self._loop.call_soon_threadsafe(
            self.mail.put, Reply(m.topic, bytes(m.payload), qos=m.qos)
        )
        c.on_subscribe = lambda _c, _u, mid, *a: self._loop.call_soon_threadsafe(
            self._subacks.setdefault(mid, asyncio.Event()).set
        )
        self.client = c

    async def __aenter__(self) -> Device311:
        await asyncio.to_thread(self.client.connect, "127.0.0.1", self._broker.tls_port, 30)
        self.client.loop_start()
        try:
            async with asyncio.timeout(WAIT):
                await self._connected.wait()
            _, mid = self.client.subscribe(self.replies + "#", qos=1)
            async with asyncio.timeout(WAIT):
                await self._subacks.setdefault(mid, asyncio.Event()).wait()
        except BaseException:
            await self.__aexit__()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.client.disconnect()
        await asyncio.to_thread(self.client.loop_stop)

    async def call(
        self,
        function: str,
        inputs: Mapping[str, np.ndarray] | None = None,
        *,
        payload: bytes | None = None,
        encoding: Encoding = Encoding.MSGPACK,
        id: str | None = None,
        reply_to: str | None = None,
        node: str = NODE,
        timeout: float = WAIT,
    ) -> Reply:
        reply_to = reply_to or self.replies + uuid.uuid4().hex[:12]
        if payload is None:
            assert inputs is not None
            payload = encode_request(inputs, encoding, id=id, reply_to=reply_to)
        info = self.client.publish(
            f"{self.root}/nodes/{node}/invoke/{fid(function)}", payload, qos=1
        )
        await asyncio.to_thread(info.wait_for_publish, timeout)
        return await self.mail.get(reply_to, timeout)


# -- status and heartbeats -------------------------------------------------------------------


class Watcher:
    """Collects a node's retained status and its heartbeats (JSON bodies) as they arrive."""

    def __init__(self, fleet: Fleet, broker: Broker, root: str, node: str = NODE) -> None:
        ident = fleet.device("watcher")
        self.status: list[dict[str, Any]] = []
        self.heartbeats: list[dict[str, Any]] = []
        self._changed = asyncio.Event()
        self.client = MqttClient(
            broker.tls_url,
            f"{ident.cn}-{uuid.uuid4().hex[:6]}",
            ssl_context=client_context(ident, fleet.home.ca_cert),
            persistent=False,
        )
        self.client.subscribe(f"{root}/nodes/{node}/status", self._on(self.status))
        self.client.subscribe(f"{root}/nodes/{node}/heartbeat", self._on(self.heartbeats))

    def _on(self, into: list[dict[str, Any]]) -> Callable[[paho.MQTTMessage], None]:
        def handle(msg: paho.MQTTMessage) -> None:
            if msg.payload:
                into.append(json.loads(msg.payload))
                self._changed.set()

        return handle

    async def __aenter__(self) -> Watcher:
        try:
            await self.client.async_start()
        except BaseException:
            await self.client.async_stop()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.client.async_stop()

    async def wait_for(
        self,
        pred: Callable[[dict[str, Any]], bool],
        *,
        heartbeat: bool = False,
        timeout: float = WAIT,
        since: int = 0,
        also: asyncio.Future[Any] | None = None,
    ) -> dict[str, Any]:
        """The first body (from index ``since``) that satisfies ``pred``.

        ``also``: a future (a process exiting) that ends the wait with an error first.
        """
        seen = self.heartbeats if heartbeat else self.status
        end = time.monotonic() + timeout
        i = since
        while True:
            while i < len(seen):
                if pred(seen[i]):
                    return seen[i]
                i += 1
            if also is not None and also.done():
                raise AssertionError(f"gave up waiting: {also.result()!r}")
            left = end - time.monotonic()
            if left <= 0:
                raise AssertionError(
                    f"no matching {'heartbeat' if heartbeat else 'status'} in {timeout:.0f} s; "
                    f"saw {seen[-3:]}"
                )
            self._changed.clear()
            waiters: list[asyncio.Future[Any]] = [asyncio.ensure_future(self._changed.wait())]
            if also is not None:
                waiters.append(also)
            await asyncio.wait(waiters, timeout=left, return_when=asyncio.FIRST_COMPLETED)
            waiters[0].cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await waiters[0]


# -- an agent in its own process ---------------------------------------------------------------


@dataclass
class AgentProcess:
    """``fnmesh agent`` running as a child process."""

    proc: asyncio.subprocess.Process
    watcher: Watcher
    log: Path
    node: str
    state: Path
    started: float
    exited: asyncio.Future[Any] = field(repr=False)

    def output(self) -> str:
        try:
            return self.log.read_text(errors="replace")[-3000:]
        except OSError:
            return ""

    async def wait_ready(self, timeout: float = 30.0 * max(1.0, SCALE)) -> dict[str, Any]:
        """The retained status saying ``ready``, published by this process."""
        try:
            return await self.watcher.wait_for(
                lambda s: s.get("state") == "ready" and s.get("ts", 0) >= self.started,
                timeout=timeout,
                also=self.exited,
            )
        except AssertionError as e:
            raise AssertionError(f"{e}\nagent output:\n{self.output()}") from None

    async def wait_exit(self, timeout: float) -> int:
        try:
            async with asyncio.timeout(timeout):
                return await asyncio.shield(self.exited)
        except TimeoutError:
            raise AssertionError(f"agent still running after {timeout:.0f} s") from None


@contextlib.asynccontextmanager
async def agent_process(
    fleet: Fleet,
    broker: Broker,
    root: str,
    serve: Iterable[Path] = (),
    *,
    node: str = NODE,
    args: Iterable[str] = (),
    env: Mapping[str, str] | None = None,
    wait_ready: bool = True,
) -> AsyncIterator[AgentProcess]:
    """Run ``fnmesh agent --serve ...``; wait for its ``ready`` status; always kill it after."""
    fleet.node(node)
    home = fleet.home
    home.save_config(home.load_config().override(topic_root=root, broker=broker.tls_url))
    log = home.root / f"agent-{node}-{uuid.uuid4().hex[:6]}.log"
    cmd = [str(FNMESH), "agent", "--home", str(home.root), "--broker", broker.tls_url]
    cmd += ["--name", node, "--heartbeat", "0.5", *args]
    for p in serve:
        cmd += ["--serve", str(p)]
    async with Watcher(fleet, broker, root, node) as watcher:
        started = time.time()
        with open(log, "wb") as out:
            proc = await asyncio.create_subprocess_exec(
                *cmd,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=out,
                stderr=asyncio.subprocess.STDOUT,
                env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
            )
        exited = asyncio.ensure_future(proc.wait())
        ap = AgentProcess(proc, watcher, log, node, home.root / "agent" / node, started, exited)
        try:
            if wait_ready:
                await ap.wait_ready()
            yield ap
        finally:
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
            async with asyncio.timeout(WAIT):
                await asyncio.shield(exited)


async def poll(
    cond: Callable[[], Any], what: str, timeout: float = WAIT, every: float = 0.005
) -> Any:
    """Poll state outside the loop's control (files, processes, the warm pool's clock)."""
    end = time.monotonic() + timeout
    while True:
        got = cond()
        if got:
            return got
        if time.monotonic() > end:
            raise AssertionError(f"{what}: not within {timeout:.0f} s")
        await asyncio.sleep(every)
