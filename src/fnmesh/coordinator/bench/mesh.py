"""A mesh of real processes for resilience runs: Mosquitto, one router, N agents.

Two ways to start it:

- ``coordinator=False`` (the default): what ``fnmesh up`` starts minus the
  coordinator. Each agent serves every example from bundle files (``fnmesh
  agent --serve``, keyed for every node), so the data path is all there is:
  an agent killed with SIGKILL comes back serving the same functions.
- ``coordinator=True``: ``fnmesh up`` itself (:func:`fnmesh.coordinator.up.start`
  and :func:`~fnmesh.coordinator.up.deploy_examples`): agents get their
  functions from the coordinator's retained assignments, and a restarted agent
  from the same again.

Either way the broker can be killed and restarted on the same port with the
same persistence folder. Every process is a child of this one and is stopped
by :meth:`ProcessMesh.stop`, whatever happened.
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
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import psutil

from fnmesh.agent.mqtt import MqttClient
from fnmesh.certs.home import Home
from fnmesh.certs.identity import load_identity
from fnmesh.certs.tls import client_context
from fnmesh.coordinator.broker import Mosquitto, free_port, settings_for_home, write_config
from fnmesh.coordinator.up import DEMO_DEVICE, UpError, agent_layout, prepare_home
from fnmesh.functions import bundle as fnb
from fnmesh.functions.client import AsyncMeshClient
from fnmesh.functions.examples.models import EXAMPLE_NAMES, build_example


@dataclass
class Child:
    """One process of the mesh and how to start it again."""

    name: str
    args: list[str]
    log: Path
    popen: subprocess.Popen[bytes] | None = None
    started: float = 0.0

    @property
    def pid(self) -> int | None:
        return self.popen.pid if self.popen is not None else None

    def running(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def tail(self, n: int = 2000) -> str:
        try:
            return self.log.read_text(errors="replace")[-n:]
        except OSError:
            return ""


@dataclass
class ProcessMesh:
    """Broker, router and agents as child processes, in one home folder."""

    root_dir: Path
    agents: int = 2
    #: The agents' heartbeat period; a node silent for three of them gets no requests.
    heartbeat_s: float = 1.0
    examples: tuple[str, ...] = EXAMPLE_NAMES
    progress: Callable[[str], None] = lambda _s: None
    #: Start with ``fnmesh up`` (coordinator, deployments) rather than ``--serve``.
    coordinator: bool = False
    home: Home = field(init=False)
    broker: Mosquitto | None = field(init=False, default=None)
    broker_port: int = field(init=False, default=0)
    router: Child | None = field(init=False, default=None)
    nodes: dict[str, Child] = field(init=False, default_factory=dict)
    #: The functions each agent serves (every example without a coordinator).
    serves: dict[str, set[str]] = field(init=False, default_factory=dict)
    coordinator_proc: Child | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        self.home = Home(self.root_dir)

    @property
    def broker_url(self) -> str:
        return f"mqtts://127.0.0.1:{self.broker_port}"

    @property
    def topic_root(self) -> str:
        return self.home.load_config().topic_root

    @property
    def logs(self) -> Path:
        return self.home.root / "logs"

    @property
    def functions(self) -> list[str]:
        return [build_example(n).function_id for n in self.examples]

    # -- starting -------------------------------------------------------------------------------

    def start(self) -> ProcessMesh:
        """Fleet, broker, bundles, router and agents; returns once the processes are spawned
        (see :meth:`async_wait_ready`). Everything is stopped again if any step fails."""
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self) -> None:
        if self.coordinator:
            self._start_with_up()
            return
        layout = agent_layout(self.agents)
        prepare_home(self.home, layout)
        self.logs.mkdir(parents=True, exist_ok=True)
        self.broker_port = free_port()
        bdir = self.home.root / "broker"
        bdir.mkdir(exist_ok=True)
        conf = write_config(settings_for_home(self.home, bdir, tls_port=self.broker_port), bdir)
        self.progress(f"starting Mosquitto on 127.0.0.1:{self.broker_port}")
        self.broker = Mosquitto(conf, self.broker_port, log=self.logs / "mosquitto.log").start()
        cfg = self.home.load_config()
        self.home.save_config(cfg.override(broker=self.broker_url))
        bundles = self._bundles([name for name, _ in layout])
        hb = str(self.heartbeat_s)
        home = str(self.home.root)
        self.router = Child(
            "router", ["router", "--home", home, "--heartbeat", hb, "-v"], self.logs / "router.log"
        )
        self._spawn(self.router)
        for name, labels in layout:
            lbl = ",".join(f"{k}={v}" for k, v in labels.items())
            args = ["agent", "--home", home, "--name", name, "--labels", lbl, "--heartbeat", hb]
            for b in bundles:
                args += ["--serve", str(b)]
            child = Child(f"agent {name}", [*args, "-v"], self.logs / f"agent-{name}.log")
            self.nodes[name] = child
            self.serves[name] = set(self.functions)
            self._spawn(child)

    def _start_with_up(self) -> None:
        from fnmesh.coordinator.up import deploy_examples, start

        if set(self.examples) != set(EXAMPLE_NAMES):
            raise UpError("a mesh started with fnmesh up deploys every example")
        up = start(self.home, agents=self.agents, progress=self.progress)
        assert up.broker is not None
        # From here on, stop() stops what fnmesh up started.
        self.broker = up.broker
        self.broker_port = up.broker.port
        home = str(self.home.root)
        for (label, popen), (name, labels) in zip(
            [(n, p) for n, p in up.procs if n.startswith("agent ")],
            agent_layout(self.agents),
            strict=True,
        ):
            lbl = ",".join(f"{k}={v}" for k, v in labels.items())
            args = ["agent", "--home", home, "--name", name, "--labels", lbl, "-v"]
            self.nodes[name] = Child(label, args, self.logs / f"agent-{name}.log", popen)
        self.router = Child("router", [], self.logs / "router.log", dict(up.procs)["router"])
        self.coordinator_proc = Child(
            "coordinator", [], self.logs / "coordinator.log", dict(up.procs)["coordinator"]
        )
        deploy_examples(up, self.progress)
        # With a coordinator, placement (node loss, autoscaling) decides what each node
        # serves from one moment to the next: readiness is a fresh "ready", not a fixed set.
        self.serves = {}

    def _bundles(self, nodes: list[str]) -> list[Path]:
        pub = load_identity(self.home.identity_dir("publisher.examples"))
        recipients = {}
        for cn in ("coordinator.main", *(f"node.{n}" for n in nodes)):
            ident = load_identity(self.home.identity_dir(cn))
            assert ident.info.x25519 is not None
            recipients[cn] = ident.info.x25519
        out = self.home.root / "bundles"
        out.mkdir(exist_ok=True)
        paths = []
        for name in self.examples:
            ex = build_example(name)
            self.progress(f"building {ex.function_id}@{ex.version}")
            b = fnb.build(
                ex.onnx_bytes,
                name=ex.function_id,
                version=ex.version,
                publisher=pub,
                recipients=recipients,
                regions=ex.regions,
                max_batch=64,
            )
            path = out / f"{name}.fnb"
            path.write_bytes(b.to_bytes())
            paths.append(path)
        return paths

    def _spawn(self, child: Child) -> None:
        assert not child.running(), f"{child.name} is already running"
        env = {k: v for k, v in os.environ.items() if k != "FNMESH_HOME"}
        env["PYTHONUNBUFFERED"] = "1"
        with open(child.log, "ab") as out:
            child.popen = subprocess.Popen(
                [sys.executable, "-m", "fnmesh.coordinator.cli.main", *child.args],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
            )
        child.started = time.time()

    # -- faults ---------------------------------------------------------------------------------

    def kill_agent(self, name: str) -> None:
        """SIGKILL, and reap it."""
        child = self.nodes[name]
        if child.popen is not None and child.popen.poll() is None:
            child.popen.send_signal(signal.SIGKILL)
            child.popen.wait(10)

    def start_agent(self, name: str) -> None:
        self._spawn(self.nodes[name])

    def kill_broker(self) -> None:
        assert self.broker is not None
        self.broker.kill()

    def start_broker(self) -> None:
        """The same config: same port, same persistence folder."""
        assert self.broker is not None
        self.broker.start()

    # -- watching -------------------------------------------------------------------------------

    def children(self) -> list[Child]:
        """The router and the agents (the processes requests go through)."""
        return [c for c in (self.router, *self.nodes.values()) if c is not None]

    def check_alive(self, skip: set[str] | None = None) -> None:
        for c in self.children():
            if skip and c.name in skip:
                continue
            if not c.running():
                code = c.popen.returncode if c.popen is not None else None
                raise UpError(f"{c.name} exited with status {code}:\n{c.tail()}")

    def rss(self, child: Child) -> int:
        """Resident memory of ``child`` in bytes."""
        assert child.pid is not None
        return int(psutil.Process(child.pid).memory_info().rss)

    def device_client(self, **kw: Any) -> AsyncMeshClient:
        """An async client acting as the demo device."""
        return AsyncMeshClient.from_home(
            self.home.root, DEMO_DEVICE, broker_url=self.broker_url, **kw
        )

    def device_mqtt(self, suffix: str, cn: str = f"device.{DEMO_DEVICE}") -> MqttClient:
        """A raw MQTT 5 client as ``cn`` (default: the demo device), for sending what no SDK
        would, or watching what a device may not (with ``fnmesh up``'s ACL)."""
        ident = load_identity(self.home.identity_dir(cn))
        return MqttClient(
            self.broker_url,
            f"{cn}-{suffix}",
            ssl_context=client_context(ident, self.home.ca_cert),
            persistent=False,
        )

    async def async_wait_ready(self, names: list[str] | None = None, timeout: float = 60) -> None:
        """Until each agent (default: all) has said ``ready`` with every example since it was
        last started; fails early if a process of the mesh exits."""
        want = {n: self.nodes[n] for n in (names if names is not None else list(self.nodes))}
        seen: dict[str, dict[str, Any]] = {}
        changed = asyncio.Event()

        def on_status(msg: paho.MQTTMessage) -> None:
            node = msg.topic.split("/")[-2]
            with contextlib.suppress(ValueError):
                seen[node] = json.loads(msg.payload) if msg.payload else {}
                changed.set()

        def ready(n: str) -> bool:
            s = seen.get(n) or {}
            return (
                s.get("state") == "ready"
                and s.get("ts", 0) >= want[n].started
                and self.serves.get(n, set()) <= set(s.get("functions") or {})
            )

        # As the router: with fnmesh up's ACL a device may not read the nodes' status.
        watcher = self.device_mqtt(f"watch-{os.getpid()}-{time.monotonic_ns()}", "router.main")
        watcher.subscribe(f"{self.topic_root}/nodes/+/status", on_status)
        await watcher.async_start()
        end = time.monotonic() + timeout
        try:
            while not all(ready(n) for n in want):
                self.check_alive()
                left = end - time.monotonic()
                if left <= 0:
                    raise UpError(
                        f"agents not ready in {timeout:.0f} s: "
                        + ", ".join(f"{n}={(seen.get(n) or {}).get('state')}" for n in want)
                    )
                changed.clear()
                # Also wake up now and then to notice a process that died.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(min(left, 0.5)):
                        await changed.wait()
        finally:
            await watcher.async_stop()

    # -- stopping -------------------------------------------------------------------------------

    def stop(self, timeout: float = 10.0) -> None:
        """Agents, then the router and the coordinator (SIGTERM, SIGKILL after ``timeout``),
        then the broker."""
        kids = [*self.nodes.values(), *([self.router] if self.router else [])]
        if self.coordinator_proc is not None:
            kids.append(self.coordinator_proc)
        for c in kids:
            if c.running():
                assert c.popen is not None
                with contextlib.suppress(ProcessLookupError):
                    c.popen.send_signal(signal.SIGTERM)
        end = time.monotonic() + timeout
        for c in kids:
            if c.popen is None:
                continue
            try:
                c.popen.wait(max(0.1, end - time.monotonic()))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    c.popen.kill()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    c.popen.wait(5)
        if self.broker is not None:
            self.broker.stop()


#: Float outputs may differ from the sklearn reference by float32 rounding (observed < 5e-7).
REFERENCE_ATOL = 1e-5


def reference_mismatch(example: str, inputs: dict[str, Any], outputs: dict[str, Any]) -> str | None:
    """Why ``outputs`` are not the example's reference answer for ``inputs`` (None: they are).

    Integer outputs (labels) must be equal; floats within :data:`REFERENCE_ATOL`.
    """
    import numpy as np

    want = build_example(example).reference(inputs)
    if set(want) != set(outputs):
        return f"outputs {sorted(outputs)} != {sorted(want)}"
    for k, w in want.items():
        g = np.asarray(outputs[k])
        if g.dtype != w.dtype or g.shape != w.shape:
            return f"{k}: {g.dtype}{list(g.shape)} != {w.dtype}{list(w.shape)}"
        if np.issubdtype(w.dtype, np.floating):
            if not np.allclose(g, w, rtol=0, atol=REFERENCE_ATOL):
                return f"{k}: off by up to {float(np.max(np.abs(g - w))):.3g}"
        elif not np.array_equal(g, w):
            return f"{k}: {g.tolist()} != {w.tolist()}"
    return None
