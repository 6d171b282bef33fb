"""Helpers for the end-to-end tests of a whole mesh: Mosquitto, the coordinator, a router and
agents, each a real process started from the ``fnmesh`` CLI in a home of its own; devices on
fnmesh's own MQTT 5 client; watchers of the retained control topics.

Everything is stopped on the way out, whatever happened (:func:`local_mesh`). Waits poll REST or
process state with a deadline, or wait on MQTT messages; none is a fixed sleep.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import paho.mqtt.client as paho
from conftest import SCALE

from fnmesh.agent.mqtt import MqttClient, TransportError, properties
from fnmesh.certs.ca import FleetCA, init_home
from fnmesh.certs.home import Home
from fnmesh.certs.identity import Role, load_identity
from fnmesh.certs.tls import client_context
from fnmesh.coordinator.acl import acl_for_home, write_acl
from fnmesh.coordinator.broker import Mosquitto, free_port, settings_for_home, write_config
from fnmesh.coordinator.client import Client
from fnmesh.functions import bundle as fnb
from fnmesh.functions.errors import MessageError
from fnmesh.functions.examples.models import build_example
from fnmesh.functions.messages import (
    Encoding,
    ErrorReply,
    Response,
    decode_reply,
    encode_request,
)

T = TypeVar("T")

#: Upper bound (s) for what should happen within a second or two on an idle machine.
WAIT = 30.0 * max(1.0, SCALE)
VENV_BIN = Path(sys.executable).parent
FNMESH = VENV_BIN / "fnmesh"
if not FNMESH.exists():  # pragma: no cover - tests run from the project's venv
    FNMESH = Path(__file__).resolve().parents[1] / ".venv" / "bin" / "fnmesh"
PYTHON = FNMESH.parent / "python"
DIGITS = "examples/digits"
#: Names on node certificates: agents serve HTTPS on loopback.
LOOPBACK_SANS = ("localhost", "127.0.0.1", "::1")


def clean_env(**extra: str) -> dict[str, str]:
    """The environment for a child: no ``FNMESH_HOME`` from outside, so only ``--home`` counts."""
    env = {k: v for k, v in os.environ.items() if k != "FNMESH_HOME"}
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONFAULTHANDLER"] = "1"
    env.update(extra)
    return env


def cli(
    home: Home | Path,
    *args: str,
    timeout: float = 120.0,
    check: bool = True,
) -> subprocess.CompletedProcess[str]:
    """Run ``fnmesh ARGS --home HOME``; with ``check``, a non-zero exit fails with its output."""
    root = home.root if isinstance(home, Home) else home
    cmd = [str(FNMESH), *args, "--home", str(root)]
    out = subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=clean_env(),
        stdin=subprocess.DEVNULL,
        check=False,
    )
    if check and out.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd[1:])} exited {out.returncode}\n"
            f"stdout:\n{out.stdout[-3000:]}\nstderr:\n{out.stderr[-3000:]}"
        )
    return out


def cli_json(home: Home | Path, *args: str, **kw: Any) -> Any:
    """``cli(..., "--json")``, parsed."""
    out = cli(home, *args, "--json", **kw)
    try:
        return json.loads(out.stdout)
    except ValueError as e:
        raise AssertionError(
            f"fnmesh {' '.join(args)} --json printed no JSON: {out.stdout!r}"
        ) from e


# -- a fleet made with the Python API (fast; the CLI path is tested on its own) ---------------


def make_home(root: Path, nodes: list[str], devices: tuple[str, ...] = ("d1",)) -> Home:
    """A new fleet: CA, coordinator, broker, operator, publisher ``examples``, router ``main``,
    the nodes (with loopback SANs) and the devices."""
    home = Home(root)
    ca, _ = init_home(home)
    ca.issue(Role.PUBLISHER, "examples", namespace="examples")
    ca.issue(Role.ROUTER, "main")
    for n in nodes:
        ca.issue(Role.NODE, n, sans=list(LOOPBACK_SANS))
    for d in devices:
        ca.issue(Role.DEVICE, d)
    return home


def build_bundle(
    home: Home,
    example: str = "digits",
    *,
    version: str = "1.0.0",
    publisher: str = "publisher.examples",
    name: str | None = None,
    ca_home: Home | None = None,
) -> bytes:
    """An example's bundle, signed by ``publisher`` of ``ca_home`` (default: ``home``) and keyed
    for ``home``'s coordinator."""
    src = ca_home or home
    pub = load_identity(src.identity_dir(publisher))
    coord = load_identity(home.identity_dir("coordinator.main"))
    assert coord.info.x25519 is not None
    ex = build_example(example)
    return fnb.build(
        ex.onnx_bytes,
        name=name or ex.function_id,
        version=version,
        publisher=pub,
        recipients={coord.cn: coord.info.x25519},
        regions=ex.regions,
        max_batch=64,
    ).to_bytes()


# -- the processes ------------------------------------------------------------------------------


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    def tail(self, n: int = 2500) -> str:
        try:
            return self.log.read_text(errors="replace")[-n:]
        except OSError:
            return ""


class MeshDied(AssertionError):
    """A process of the mesh exited when it should not have."""


@dataclass
class LocalMesh:
    """Mosquitto plus ``fnmesh coordinator``, ``router`` and ``agent`` processes in one home."""

    home: Home
    #: Heartbeat period of the agents, and the coordinator's and router's default for it.
    heartbeat: float = 1.0
    offline_timeout: float = 300.0
    broker_port: int = field(default_factory=free_port)
    api_port: int = field(default_factory=free_port)
    procs: dict[str, Proc] = field(default_factory=dict)
    broker: Mosquitto | None = None
    #: Processes stopped on purpose: their exit is not a failure.
    stopped: set[str] = field(default_factory=set)
    #: What :meth:`stop` found: processes that would not stop, with their stacks.
    hung: list[str] = field(default_factory=list)

    @property
    def logs(self) -> Path:
        return self.home.root / "logs"

    @property
    def broker_url(self) -> str:
        return f"mqtts://127.0.0.1:{self.broker_port}"

    @property
    def api_url(self) -> str:
        return f"https://127.0.0.1:{self.api_port}"

    @property
    def root(self) -> str:
        return self.home.load_config().topic_root

    @property
    def agents(self) -> list[str]:
        return [n.split(" ", 1)[1] for n in self.procs if n.startswith("agent ")]

    def write_config(self) -> None:
        """Point the home's ``fnmesh.toml`` at this mesh's broker and coordinator."""
        cfg = self.home.load_config()
        self.home.save_config(cfg.override(broker=self.broker_url, coordinator=self.api_url))

    # -- starting -------------------------------------------------------------------------

    @property
    def broker_dir(self) -> Path:
        return self.home.root / "broker"

    @property
    def acl_file(self) -> Path:
        return self.broker_dir / "acl"

    @property
    def broker_pid_file(self) -> Path:
        return self.broker_dir / "mosquitto.pid"

    def write_broker_config(self) -> Path:
        """``mosquitto.conf`` and the role-based ACL (no grants yet), as ``fnmesh up`` writes them."""
        self.broker_dir.mkdir(parents=True, exist_ok=True)
        write_acl(self.acl_file, acl_for_home(self.home, {}, self.root))
        settings = settings_for_home(
            self.home, self.broker_dir, tls_port=self.broker_port, acl_file=self.acl_file
        )
        return write_config(settings, self.broker_dir)

    def start_broker(self, conf: Path | None = None) -> None:
        """Mosquitto with ``conf`` (default: :meth:`write_broker_config`); its PID goes where the
        coordinator looks for the broker to reload after grants and revocations."""
        self.logs.mkdir(parents=True, exist_ok=True)
        conf = conf or self.write_broker_config()
        self.broker = Mosquitto(conf, self.broker_port, log=self.logs / "mosquitto.log").start()
        assert self.broker.proc is not None
        self.broker_pid_file.parent.mkdir(parents=True, exist_ok=True)
        self.broker_pid_file.write_text(str(self.broker.proc.pid))

    def spawn(self, name: str, *args: str) -> Proc:
        """Start ``fnmesh ARGS --home HOME -v`` as ``name``, its output in ``logs/``."""
        old = self.procs.get(name)
        assert old is None or old.popen.poll() is not None, f"{name} is already running"
        self.logs.mkdir(parents=True, exist_ok=True)
        log = self.logs / f"{name.replace(' ', '-')}.log"
        with open(log, "ab") as out:
            popen = subprocess.Popen(
                [str(FNMESH), *args, "--home", str(self.home.root), "-v"],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=clean_env(),
            )
        proc = Proc(name, popen, log)
        self.procs[name] = proc
        self.stopped.discard(name)
        return proc

    def start_coordinator(self) -> Proc:
        return self.spawn(
            "coordinator",
            "coordinator",
            "--heartbeat",
            str(self.heartbeat),
            "--offline-timeout",
            str(self.offline_timeout),
            "--acl-file",
            str(self.acl_file),
            "--broker-pid-file",
            str(self.broker_pid_file),
        )

    def start_router(self) -> Proc:
        return self.spawn("router", "router", "--heartbeat", str(self.heartbeat))

    def start_agent(self, name: str, labels: Mapping[str, str]) -> Proc:
        lbl = ",".join(f"{k}={v}" for k, v in labels.items())
        return self.spawn(
            f"agent {name}",
            "agent",
            "--name",
            name,
            "--labels",
            lbl,
            "--heartbeat",
            str(self.heartbeat),
        )

    # -- stopping ---------------------------------------------------------------------------

    def signal(self, name: str, sig: int, timeout: float = WAIT) -> int:
        """Send ``sig`` to ``name`` and wait for it to exit; returns its exit status."""
        proc = self.procs[name]
        self.stopped.add(name)
        if proc.popen.poll() is None:
            proc.popen.send_signal(sig)
        try:
            return proc.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.popen.kill()
            proc.popen.wait(10)
            raise AssertionError(f"{name} did not exit within {timeout:.0f} s of {sig!r}") from None

    def stop(self) -> None:
        """Stop everything this mesh started (agents first, the broker last). Never raises."""
        for name in reversed(list(self.procs)):
            p = self.procs[name].popen
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    p.send_signal(signal.SIGTERM)
        end = time.monotonic() + 15
        for name in reversed(list(self.procs)):
            p = self.procs[name].popen
            try:
                p.wait(max(0.1, end - time.monotonic()))
            except subprocess.TimeoutExpired:
                # SIGABRT: faulthandler writes every thread's stack to the log, then it dies.
                with contextlib.suppress(ProcessLookupError):
                    p.send_signal(signal.SIGABRT)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    p.wait(5)
                if p.poll() is None:
                    p.kill()
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        p.wait(5)
                self.hung.append(f"{name} ignored SIGTERM for 15 s:\n{self.procs[name].tail(6000)}")
        if self.broker is not None:
            self.broker.stop()
            self.broker = None

    # -- watching -----------------------------------------------------------------------------

    def check_alive(self) -> None:
        for name, proc in self.procs.items():
            if name not in self.stopped and proc.popen.poll() is not None:
                raise MeshDied(f"{name} exited with status {proc.popen.returncode}:\n{proc.tail()}")

    def tails(self) -> str:
        return "\n".join(f"--- {n} ---\n{p.tail(1500)}" for n, p in self.procs.items())

    # -- the REST API ---------------------------------------------------------------------------

    def client(self, identity: str | None = None) -> Client:
        return Client(self.home, self.home.load_config().override(identity=identity))

    async def api(self, method: str, path: str, *, identity: str | None = None, **kw: Any) -> Any:
        """One REST call (as ``identity``, default the home's operator); errors raise ApiError."""
        kw.setdefault("timeout", WAIT)
        return await self.client(identity).async_call(method, path, **kw)

    async def wait_until(
        self,
        what: str,
        cond: Callable[[], Awaitable[T | None]],
        timeout: float = WAIT,
        every: float = 0.05,
    ) -> T:
        """Poll ``cond`` until it returns something true; fails if time runs out or a process
        of the mesh dies meanwhile. Exceptions from ``cond`` count as "not yet"."""
        end = time.monotonic() + timeout
        last: Any = None
        while True:
            self.check_alive()
            try:
                got = await cond()
            except Exception as e:
                got, last = None, e
            else:
                last = got
            if got:
                return got
            if time.monotonic() > end:
                raise AssertionError(
                    f"{what}: not within {timeout:.0f} s (last: {last!r})\n{self.tails()}"
                )
            await asyncio.sleep(every)

    async def nodes(self) -> dict[str, dict[str, Any]]:
        return {n["name"]: n for n in await self.api("GET", "/v1/nodes")}

    async def wait_ready(self, names: list[str] | None = None) -> dict[str, dict[str, Any]]:
        """Until the coordinator reports ``names`` (default: every agent) ``ready``."""
        want = set(self.agents if names is None else names)

        async def ready() -> dict[str, dict[str, Any]] | None:
            nodes = await self.nodes()
            ok = {n for n, v in nodes.items() if v["state"] == "ready"}
            return nodes if want <= ok else None

        return await self.wait_until(f"nodes {sorted(want)} ready", ready)

    async def wait_serving(
        self, fid: str, version: str, count: int, *, exactly: bool = False
    ) -> list[str]:
        """Until ``count`` ready nodes list ``fid@version`` in their status; returns them."""

        async def serving() -> list[str] | None:
            nodes = await self.nodes()
            got = sorted(
                n
                for n, v in nodes.items()
                if v["state"] == "ready" and v["functions"].get(fid) == version
            )
            ok = len(got) == count if exactly else len(got) >= count
            return got if ok else None

        return await self.wait_until(f"{fid}@{version} on {count} node(s)", serving)

    async def push(self, data: bytes, identity: str = "publisher.examples") -> Any:
        return await self.api(
            "POST",
            "/v1/bundles",
            identity=identity,
            data=data,
            headers={"Content-Type": "application/octet-stream"},
        )

    async def grant(self, subject: str, fid: str) -> Any:
        """Let ``subject`` invoke ``fid`` (the coordinator rewrites the ACL, the broker reloads)."""
        return await self.api("POST", "/v1/grants", json_body={"subject": subject, "function": fid})

    async def deploy(self, fid: str, version: str, **body: Any) -> Any:
        return await self.api(
            "POST", "/v1/deployments", json_body={"function": fid, "version": version, **body}
        )


def launch(
    mesh: LocalMesh, agents: Mapping[str, Mapping[str, str]], broker_conf: Path | None = None
) -> None:
    """Start the broker (with ``broker_conf``, default one written here), the coordinator, a
    router and ``agents`` (name -> labels), all found through the home's ``fnmesh.toml``, which
    must name this mesh's broker and coordinator."""
    cfg = mesh.home.load_config()
    assert (cfg.broker, cfg.coordinator) == (mesh.broker_url, mesh.api_url), cfg
    mesh.start_broker(broker_conf)
    mesh.start_coordinator()
    mesh.start_router()
    for name, labels in agents.items():
        mesh.start_agent(name, labels)


@contextlib.asynccontextmanager
async def local_mesh(
    home: Home, agents: Mapping[str, Mapping[str, str]], **kw: Any
) -> AsyncIterator[LocalMesh]:
    """A running mesh in ``home``; everything it started is stopped on the way out."""
    mesh = LocalMesh(home, **kw)
    try:
        mesh.write_config()
        launch(mesh, agents)
        await mesh.wait_ready()
        yield mesh
    finally:
        mesh.stop()
    assert not mesh.hung, "\n".join(mesh.hung)


# -- devices ---------------------------------------------------------------------------------------


@dataclass
class Sent:
    """One request a device sent, and every answer it got."""

    corr: bytes
    at: float
    answers: list[Response | ErrorReply] = field(default_factory=list)
    answered_at: float | None = None
    first: asyncio.Future[Response | ErrorReply] | None = None


class MeshDevice:
    """A device on fnmesh's MQTT 5 client: each request goes to ``fn/{ns}/{name}/invoke`` with a
    ResponseTopic under ``replies/{device}/`` and a CorrelationData of its own."""

    def __init__(self, mesh: LocalMesh, name: str = "d1") -> None:
        ident = load_identity(mesh.home.identity_dir(f"device.{name}"))
        self.root = mesh.root
        self.name = name
        self.replies = f"{self.root}/replies/{name}/"
        self.sent: dict[bytes, Sent] = {}
        self.stray: list[bytes] = []
        self.client = MqttClient(
            mesh.broker_url,
            f"device.{name}-{uuid.uuid4().hex[:6]}",
            ssl_context=client_context(ident, mesh.home.ca_cert),
            persistent=False,
        )
        self.client.subscribe(self.replies + "#", self._on_message)

    async def __aenter__(self) -> MeshDevice:
        try:
            # The SUBSCRIBE goes out before any request on this connection, so every answer
            # finds the subscription in place.
            await self.client.async_start()
        except BaseException:
            await self.client.async_stop()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.client.async_stop()

    def _on_message(self, msg: paho.MQTTMessage) -> None:
        props = getattr(msg, "properties", None)
        corr = getattr(props, "CorrelationData", None)
        s = self.sent.get(bytes(corr)) if corr else None
        if s is None:
            self.stray.append(bytes(msg.payload))
            return
        try:
            reply = decode_reply(bytes(msg.payload), getattr(props, "ContentType", None))
        except MessageError:
            self.stray.append(bytes(msg.payload))
            return
        s.answers.append(reply)
        if s.answered_at is None:
            s.answered_at = time.monotonic()
        if s.first is not None and not s.first.done():
            s.first.set_result(reply)

    async def wait_granted(
        self, fid: str, inputs: Mapping[str, np.ndarray], timeout: float = WAIT
    ) -> Response | ErrorReply:
        """Send ``inputs`` until the broker accepts the publish (a new grant reaches Mosquitto
        with its next ACL reload; until then the PUBACK says "not authorized"); its answer."""
        end = time.monotonic() + timeout
        while True:
            corr = uuid.uuid4().bytes
            s = Sent(corr, time.monotonic(), first=asyncio.get_running_loop().create_future())
            self.sent[corr] = s
            try:
                await self.client.async_publish(*self._request(fid, inputs, corr, Encoding.MSGPACK))
            except TransportError:
                del self.sent[corr]
                if time.monotonic() > end:
                    raise AssertionError(
                        f"device.{self.name} still may not invoke {fid} after {timeout:.0f} s"
                    ) from None
                await asyncio.sleep(0.05)  # polling the broker's ACL reload
                continue
            return await self.answer(s, timeout)

    def _request(
        self,
        fid: str,
        inputs: Mapping[str, np.ndarray],
        corr: bytes,
        encoding: Encoding,
        deadline_ms: int | None = None,
    ) -> tuple[str, bytes, int, bool, Any]:
        return (
            f"{self.root}/fn/{fid}/invoke",
            encode_request(inputs, encoding, id=corr.hex(), deadline_ms=deadline_ms),
            1,
            False,
            properties(
                content_type=encoding.content_type,
                correlation=corr,
                response_topic=self.replies + corr.hex()[:12],
            ),
        )

    def send(
        self,
        fid: str,
        inputs: Mapping[str, np.ndarray],
        *,
        encoding: Encoding = Encoding.MSGPACK,
        deadline_ms: int | None = None,
    ) -> Sent:
        """Publish one request (QoS 1, not awaited); its answers collect in the result."""
        corr = uuid.uuid4().bytes
        s = Sent(corr, time.monotonic(), first=asyncio.get_running_loop().create_future())
        self.sent[corr] = s
        self.client.publish(*self._request(fid, inputs, corr, encoding, deadline_ms))
        return s

    async def answer(self, s: Sent, timeout: float = WAIT) -> Response | ErrorReply:
        assert s.first is not None
        try:
            async with asyncio.timeout(timeout):
                return await asyncio.shield(s.first)
        except TimeoutError:
            raise AssertionError(
                f"no answer to request {s.corr.hex()} in {timeout:.0f} s"
            ) from None

    async def call(
        self, fid: str, inputs: Mapping[str, np.ndarray], timeout: float = WAIT, **kw: Any
    ) -> Response | ErrorReply:
        return await self.answer(self.send(fid, inputs, **kw), timeout)

    async def call_rows(
        self, fid: str, inputs: Mapping[str, np.ndarray], timeout: float = WAIT
    ) -> list[Response | ErrorReply]:
        """Every row of ``inputs`` as a request of its own, all in flight at once."""
        n = len(next(iter(inputs.values())))
        sent = [
            self.send(fid, {k: np.ascontiguousarray(v[i : i + 1]) for k, v in inputs.items()})
            for i in range(n)
        ]
        return list(await asyncio.gather(*(self.answer(s, timeout) for s in sent)))


def labels_of(replies: list[Response | ErrorReply], output: str = "label") -> np.ndarray:
    """The ``output`` of each answer (one row each), concatenated; any error fails."""
    bad = [r for r in replies if not isinstance(r, Response)]
    assert not bad, f"{len(bad)} request(s) failed, first: {bad[0]}"
    return np.concatenate([np.asarray(r.outputs[output]) for r in replies])  # type: ignore[union-attr]


# -- the retained control topics ---------------------------------------------------------------------


class ControlWatcher:
    """Every message on ``nodes/+/status`` and ``nodes/+/assign`` from when it connects, the
    retained ones first. It reads them as the router identity (the broker's ACL lets routers
    read both; devices may not)."""

    def __init__(
        self, mesh: LocalMesh, nodes: Iterable[str], identity: str = "router.main"
    ) -> None:
        ident = load_identity(mesh.home.identity_dir(identity))
        self.prefix = f"{mesh.root}/nodes/"
        self.nodes = set(nodes)
        self.messages: list[tuple[str, str, bool, dict[str, Any] | None]] = []
        self._changed = asyncio.Event()
        self.client = MqttClient(
            mesh.broker_url,
            f"{identity}-watch-{uuid.uuid4().hex[:6]}",
            ssl_context=client_context(ident, mesh.home.ca_cert),
            persistent=False,
        )
        self.client.subscribe(self.prefix + "+/status", self._on)
        self.client.subscribe(self.prefix + "+/assign", self._on)

    def _on(self, msg: paho.MQTTMessage) -> None:
        node, _, kind = msg.topic[len(self.prefix) :].partition("/")
        body = json.loads(msg.payload) if msg.payload else None
        self.messages.append((node, kind, bool(msg.retain), body))
        self._changed.set()

    async def __aenter__(self) -> ControlWatcher:
        try:
            await self.client.async_start()
            # The retained status and assignment of every node: then the snapshot is whole.
            for want in sorted((n, k) for n in self.nodes for k in ("status", "assign")):
                await self.wait_for(f"the retained {want}", _about(*want))
        except BaseException:
            await self.client.async_stop()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.client.async_stop()

    def latest(self, kind: str) -> dict[str, dict[str, Any] | None]:
        out: dict[str, dict[str, Any] | None] = {}
        for node, k, _retain, body in self.messages:
            if k == kind:
                out[node] = body
        return out

    def since(self, index: int, kind: str) -> list[tuple[str, dict[str, Any] | None]]:
        return [(n, b) for n, k, _r, b in self.messages[index:] if k == kind]

    async def wait_for(
        self,
        what: str,
        pred: Callable[[str, str, dict[str, Any] | None], bool],
        *,
        since: int = 0,
        timeout: float = WAIT,
    ) -> tuple[str, str, dict[str, Any] | None]:
        """The first message from index ``since`` on that satisfies ``pred(node, kind, body)``."""
        end = time.monotonic() + timeout
        i = since
        while True:
            while i < len(self.messages):
                node, kind, _retain, body = self.messages[i]
                if pred(node, kind, body):
                    return node, kind, body
                i += 1
            left = end - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no {what} within {timeout:.0f} s; saw {self.messages[-5:]}")
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(left):
                    await self._changed.wait()


def _about(node: str, kind: str) -> Callable[[str, str, dict[str, Any] | None], bool]:
    return lambda n, k, _body: (n, k) == (node, kind)


def generations(assigns: Mapping[str, dict[str, Any] | None]) -> dict[str, int | None]:
    return {n: (b or {}).get("generation") for n, b in sorted(assigns.items())}


# -- other fleets ------------------------------------------------------------------------------------


def foreign_fleet(root: Path) -> Home:
    """A second fleet with its own CA and a publisher for ``examples``: same names, other roots."""
    home = Home(root)
    init_home(home, fleet="elsewhere")
    FleetCA.load(home).issue(Role.PUBLISHER, "examples", namespace="examples")
    return home


@contextlib.asynccontextmanager
async def running(coro: Awaitable[Any]) -> AsyncIterator[asyncio.Task[Any]]:
    """Run ``coro`` as a task for the block; it is cancelled (and awaited) on the way out."""
    task = asyncio.ensure_future(coro)
    try:
        yield task
    finally:
        if not task.done():
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def now(pred: Callable[[], Any]) -> Callable[[], Awaitable[Any]]:
    """A plain predicate as a condition for :meth:`LocalMesh.wait_until`."""

    async def check() -> Any:
        return pred()

    return check
