"""An offline site as real processes in network namespaces (for ``test_offline_site.py``).

Two hosts on a :class:`netns.Lan`::

    cloud   Mosquitto (broker.main), ``fnmesh coordinator``, ``fnmesh agent`` cloud1 (tier=cloud)
    site    Mosquitto (broker.site, bridged to the cloud broker), ``fnmesh router`` (router.site),
            ``fnmesh agent`` s1 and s2 (tier=edge), and a device helper process

One home folder holds every identity and is shared by all processes. Every fnmesh part
talks to its own host's broker on that host's address (local traffic, so cutting the
cloud's cable only cuts the site off).

The test process never opens a socket to either host: what it needs from inside a
namespace runs there as this file's helpers (``python site_support.py setup|nodes|device``):

- ``setup``: push and deploy the example functions through the coordinator's REST API;
- ``nodes``: print ``GET /v1/nodes`` as JSON;
- ``device``: a device (MQTT 3.1.1, ``reply_to``/``id`` in the payload, as behind a
  3.1.1 bridge) and a watcher (as ``router.watch``, reading the retained status and
  assignments) driven by JSON lines on stdin, answering JSON lines on stdout.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = "fnmesh/v1"
BROKER_PORT = 8883
API_PORT = 8443
DEVICE = "meter1"
EDGE_FN = "examples/digits"
CLOUD_FN = "examples/anomaly"
SITE_NODES = ("s1", "s2")
CLOUD_NODE = "cloud1"
HEARTBEAT_S = 1.0


# -- helpers that run inside a namespace ---------------------------------------------------------


def _wait_port(host: str, port: int, timeout: float) -> None:
    end = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            if time.monotonic() > end:
                raise SystemExit(
                    f"nothing listens on {host}:{port} after {timeout:.0f} s"
                ) from None
            time.sleep(0.05)


def _client(home: str) -> Any:
    from fnmesh.certs.home import Home
    from fnmesh.coordinator.client import Client

    h = Home(Path(home))
    return Client(h, h.load_config())


def _nodes(home: str) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = _client(home).call("GET", "/v1/nodes", timeout=5)
    return out


def helper_setup(home: str, timeout: float) -> None:
    """Wait for the coordinator and the three nodes, push and deploy, wait until served."""
    from fnmesh.certs.home import Home
    from fnmesh.certs.identity import load_identity
    from fnmesh.errors import MeshError
    from fnmesh.functions import bundle as fnb
    from fnmesh.functions.examples.models import build_example

    c = _client(home)
    h = Home(Path(home))
    end = time.monotonic() + timeout

    def until(what: str, pred: Any) -> Any:
        while True:
            try:
                got = pred()
                if got:
                    return got
            except MeshError:
                pass
            if time.monotonic() > end:
                raise SystemExit(f"timed out waiting for {what}")
            time.sleep(0.2)

    every = {*SITE_NODES, CLOUD_NODE}
    until(
        "the nodes to join",
        lambda: every <= {n["name"] for n in _nodes(home) if n["state"] == "ready"},
    )
    pub = load_identity(h.identity_dir("publisher.examples"))
    coord = load_identity(h.identity_dir("coordinator.main"))
    assert coord.info.x25519 is not None
    for fid, where, count in ((EDGE_FN, "edge", 2), (CLOUD_FN, "cloud", 1)):
        ex = build_example(fid.split("/", 1)[1])
        b = fnb.build(
            ex.onnx_bytes,
            name=ex.function_id,
            version=ex.version,
            publisher=pub,
            recipients={coord.cn: coord.info.x25519},
            regions=ex.regions,
            max_batch=64,
        )
        c.push(b.to_bytes())
        c.call(
            "POST",
            "/v1/deployments",
            json_body={
                "function": fid,
                "version": ex.version,
                "min": count,
                "max": count,
                "where": {"tier": where},
            },
        )

    def served() -> bool:
        nodes = {n["name"]: n for n in _nodes(home)}
        return all(
            nodes.get(n, {}).get("state") == "ready" and EDGE_FN in nodes[n]["functions"]
            for n in SITE_NODES
        ) and CLOUD_FN in nodes.get(CLOUD_NODE, {}).get("functions", {})

    until("the deployments to be served", served)
    print(json.dumps({"nodes": _nodes(home)}), flush=True)


class Device:
    """The device and the watcher of the ``device`` helper."""

    def __init__(self, home: str, broker: str) -> None:
        import paho.mqtt.client as paho
        from paho.mqtt.enums import CallbackAPIVersion

        from fnmesh.certs.home import Home
        from fnmesh.certs.identity import load_identity
        from fnmesh.certs.tls import client_context
        from fnmesh.functions.client import Backoff, MeshClient
        from fnmesh.functions.examples.models import build_example

        self.h = Home(Path(home))
        self.broker = broker
        ident = load_identity(self.h.identity_dir(f"device.{DEVICE}"))
        tls = client_context(ident, self.h.ca_cert)

        def client(**kw: Any) -> MeshClient:
            return MeshClient(
                broker,
                client_id=f"device.{DEVICE}-{kw.pop('suffix')}",
                tls=tls,
                device_name=DEVICE,
                root=ROOT,
                protocol=311,
                **kw,
            )

        # Retries on silence and on `saturated` (a replica restarting): the SDK's way.
        self.steady = client(
            suffix="steady", timeout_s=1.0, retries=20, backoff=Backoff(base_s=0.05, max_s=0.3)
        ).connect()
        # One attempt, nothing retried: what the site answers, or silence.
        self.once = client(suffix="once", timeout_s=3.0, retries=0, retry_on=frozenset()).connect()
        self.examples = {fid: build_example(fid.split("/", 1)[1]) for fid in (EDGE_FN, CLOUD_FN)}
        self._loop: threading.Thread | None = None
        self._stop = threading.Event()
        self.records: list[dict[str, Any]] = []
        # The watcher: retained status and assignments as the site broker holds them.
        self.status: dict[str, Any] = {}
        self.assign: dict[str, Any] = {}
        host, port = broker.split("://", 1)[1].rsplit(":", 1)
        w = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=f"router.watch-{os.getpid()}",
            protocol=paho.MQTTv311,
        )
        w.tls_set_context(
            client_context(load_identity(self.h.identity_dir("router.watch")), self.h.ca_cert)
        )

        def on_connect(c: Any, _u: Any, _f: Any, _rc: Any, _p: Any) -> None:
            c.subscribe([(f"{ROOT}/nodes/+/status", 1), (f"{ROOT}/nodes/+/assign", 1)])

        def on_message(_c: Any, _u: Any, msg: Any) -> None:
            node, kind = msg.topic[len(ROOT) + len("/nodes/") :].split("/", 1)
            with contextlib.suppress(ValueError):
                body = json.loads(msg.payload) if msg.payload else None
                (self.status if kind == "status" else self.assign)[node] = body

        w.on_connect = on_connect
        w.on_message = on_message
        w.connect(host, int(port), keepalive=10)
        w.loop_start()
        self.watcher = w

    def _invoke(self, client: Any, fid: str, i: int) -> dict[str, Any]:
        from fnmesh.functions.client import InvokeError, InvokeTimeout

        ex = self.examples[fid]
        inputs = ex.sample_inputs(2, seed=i)
        t0 = time.time()
        rec: dict[str, Any] = {"i": i, "function": fid, "t0": t0}
        try:
            r = client.invoke(fid, inputs, id=f"{fid.replace('/', '-')}-{i}-{os.getpid()}")
        except InvokeTimeout as e:
            rec.update(status="silence", message=str(e))
        except InvokeError as e:
            rec.update(status="error", code=e.code.value, message=str(e))
        else:
            want = ex.reference(inputs)
            import numpy as np

            ok = set(want) <= set(r.outputs) and all(
                np.allclose(np.asarray(r.outputs[k]), w, atol=1e-5)
                if np.issubdtype(w.dtype, np.floating)
                else np.array_equal(np.asarray(r.outputs[k]), w)
                for k, w in want.items()
            )
            rec.update(status="ok" if ok else "wrong", node=r.node, version=r.version)
        rec["t1"] = time.time()
        return rec

    def _run_loop(self, fid: str, period: float) -> None:
        i = 0
        while not self._stop.is_set():
            self.records.append(self._invoke(self.steady, fid, i))
            i += 1
            self._stop.wait(period)

    def handle(self, cmd: dict[str, Any]) -> dict[str, Any]:
        op = cmd["op"]
        if op == "loop_start":
            self._stop.clear()
            self.records = []
            self._loop = threading.Thread(
                target=self._run_loop, args=(cmd["function"], cmd.get("period", 0.05)), daemon=True
            )
            self._loop.start()
            return {"ok": True}
        if op == "loop_stop":
            self._stop.set()
            if self._loop is not None:
                self._loop.join(60)
            st = self.steady.stats
            stats = {"sent": st.sent, "retries": st.retries, "duplicates": st.duplicates}
            return {"records": self.records, "stats": stats}
        if op == "records":
            return {"records": list(self.records)}
        if op == "once":
            return self._invoke(self.once, cmd["function"], cmd.get("i", 0))
        if op == "state":
            return {"status": dict(self.status), "assign": dict(self.assign)}
        raise ValueError(f"unknown op {op!r}")

    def close(self) -> None:
        self._stop.set()
        self.steady.close()
        self.once.close()
        self.watcher.loop_stop()
        self.watcher.disconnect()


def helper_device(home: str, broker: str) -> None:
    dev = Device(home, broker)
    print(json.dumps({"ready": True}), flush=True)
    try:
        for line in sys.stdin:
            if not line.strip():
                continue
            cmd = json.loads(line)
            if cmd.get("op") == "quit":
                break
            try:
                out = dev.handle(cmd)
            except Exception as e:  # report, keep serving commands
                out = {"exception": f"{type(e).__name__}: {e}"}
            print(json.dumps(out), flush=True)
    finally:
        dev.close()


def main(argv: list[str]) -> None:
    what = argv[0]
    if what == "wait-port":
        _wait_port(argv[1], int(argv[2]), float(argv[3]))
    elif what == "setup":
        helper_setup(argv[1], float(argv[2]))
    elif what == "nodes":
        print(json.dumps(_nodes(argv[1])), flush=True)
    elif what == "device":
        helper_device(argv[1], argv[2])
    else:
        raise SystemExit(f"unknown helper {what!r}")


# -- the side the test process runs -------------------------------------------------------------


@dataclass
class Proc:
    """A process started inside a namespace, and how to start it again."""

    name: str
    host: str
    argv: list[str]
    log: Path
    popen: subprocess.Popen[bytes] | None = None
    started: float = 0.0

    def running(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def tail(self, n: int = 3000) -> str:
        try:
            return self.log.read_text(errors="replace")[-n:]
        except OSError:
            return ""


@dataclass
class OfflineSite:
    """The two hosts, their brokers and fnmesh processes, in one home folder."""

    lan: Any  # netns.Lan
    workdir: Path
    procs: dict[str, Proc] = field(default_factory=dict)
    device: subprocess.Popen[str] | None = None
    _lines: queue.Queue[str] = field(default_factory=queue.Queue)

    @property
    def cloud_ip(self) -> str:
        return str(self.lan["cld"].ipv4)

    @property
    def site_ip(self) -> str:
        return str(self.lan["site"].ipv4)

    @property
    def home_dir(self) -> Path:
        return self.workdir / "home"

    @property
    def cloud_broker(self) -> str:
        return f"mqtts://{self.cloud_ip}:{BROKER_PORT}"

    @property
    def site_broker(self) -> str:
        return f"mqtts://{self.site_ip}:{BROKER_PORT}"

    @property
    def logs(self) -> Path:
        return self.workdir / "logs"

    # -- building -------------------------------------------------------------------------------

    def prepare(self) -> None:
        """Fleet (one home), identities, ACL and both brokers' configs."""
        from fnmesh.certs.ca import init_home
        from fnmesh.certs.home import Home
        from fnmesh.certs.identity import Role
        from fnmesh.coordinator.acl import acl_for_home, write_acl
        from fnmesh.coordinator.broker import render, settings_for_home, write_config

        self.logs.mkdir(parents=True, exist_ok=True)
        home = Home(self.home_dir)
        # The coordinator's and the cloud broker's certificates name the cloud's address.
        ca, _ = init_home(home, sans=[self.cloud_ip])
        ca.issue(Role.PUBLISHER, "examples", namespace="examples")
        ca.issue(Role.BROKER, "site", sans=[self.site_ip])
        ca.issue(Role.ROUTER, "site")
        ca.issue(Role.ROUTER, "watch")
        ca.issue(Role.DEVICE, DEVICE)
        for n in (*SITE_NODES, CLOUD_NODE):
            ca.issue(Role.NODE, n)
        cfg = home.load_config()
        home.save_config(
            cfg.override(
                broker=self.cloud_broker,
                coordinator=f"https://{self.cloud_ip}:{API_PORT}",
                topic_root=ROOT,
            )
        )
        grants = {f"device.{DEVICE}": {EDGE_FN, CLOUD_FN}}
        self.configs: dict[str, Path] = {}
        for host, name, bind, bridge in (
            ("cld", "broker.main", self.cloud_ip, None),
            ("site", "broker.site", self.site_ip, self.cloud_broker),
        ):
            d = self.workdir / f"broker-{host}"
            d.mkdir()
            acl = write_acl(d / "acl", acl_for_home(home, grants, ROOT))
            s = settings_for_home(
                home,
                d,
                tls_port=BROKER_PORT,
                bind=bind,
                broker_name=name,
                acl_file=acl,
                bridge_to=bridge,
                root=ROOT,
            )
            if bridge is not None:
                assert f"address {self.cloud_ip}:{BROKER_PORT}" in render(s)
            self.configs[host] = write_config(s, d)

    def spawn(self, p: Proc) -> Proc:
        assert not p.running(), f"{p.name} is already running"
        env = {k: v for k, v in os.environ.items() if k != "FNMESH_HOME"}
        env["PYTHONUNBUFFERED"] = "1"
        with open(p.log, "ab") as out:
            p.popen = self.lan.popen(
                p.host,
                p.argv,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
            )
        p.started = time.time()
        self.procs[p.name] = p
        return p

    def fnmesh(self, name: str, host: str, *args: str) -> Proc:
        argv = [sys.executable, "-m", "fnmesh.coordinator.cli.main", *args]
        return self.spawn(Proc(name, host, argv, self.logs / f"{name}.log"))

    def helper(self, host: str, *args: str, timeout: float = 60) -> str:
        proc = self.lan.run(
            host,
            [sys.executable, str(HERE / "site_support.py"), *args],
            timeout=timeout,
            check=False,
        )
        if proc.returncode != 0:
            raise AssertionError(
                f"helper {args[0]} in {host} failed ({proc.returncode}):\n{proc.stderr[-3000:]}"
                + self.diagnostics()
            )
        return str(proc.stdout)

    def start_brokers(self) -> None:
        for host, ip in (("cld", self.cloud_ip), ("site", self.site_ip)):
            self.spawn(
                Proc(
                    f"mosquitto-{host}",
                    host,
                    ["/usr/sbin/mosquitto", "-c", str(self.configs[host])],
                    self.logs / f"mosquitto-{host}.log",
                )
            )
            self.helper(host, "wait-port", ip, str(BROKER_PORT), "10")

    def start_mesh(self) -> None:
        home = str(self.home_dir)
        hb = str(HEARTBEAT_S)
        self.fnmesh("coordinator", "cld", "coordinator", "--home", home, "--heartbeat", hb, "-v")
        self.fnmesh(
            f"agent-{CLOUD_NODE}", "cld", *self.agent_args(CLOUD_NODE, "tier=cloud,site=cloud")
        )
        self.fnmesh(
            "router",
            "site",
            "router",
            "--home",
            home,
            "--name",
            "site",
            "--site",
            "site",
            "--broker",
            self.site_broker,
            "--heartbeat",
            hb,
            "-v",
        )
        for n in SITE_NODES:
            self.fnmesh(f"agent-{n}", "site", *self.agent_args(n, "tier=edge,site=site"))

    def agent_args(self, name: str, labels: str) -> list[str]:
        broker = self.cloud_broker if name == CLOUD_NODE else self.site_broker
        return [
            "agent",
            "--home",
            str(self.home_dir),
            "--name",
            name,
            "--broker",
            broker,
            "--labels",
            f"region=eu-west,{labels}",
            "--heartbeat",
            str(HEARTBEAT_S),
            "--memory-budget-mb",
            "512",
            "--threads",
            "1",
            "-v",
        ]

    def check_alive(self) -> None:
        for p in self.procs.values():
            if not p.running():
                code = p.popen.returncode if p.popen is not None else None
                raise AssertionError(f"{p.name} exited ({code}):\n{p.tail()}")

    def stop_proc(self, name: str, timeout: float = 15.0) -> int | None:
        """SIGTERM (SIGKILL after ``timeout``); returns the exit status (None: not running)."""
        p = self.procs[name]
        if p.popen is None or p.popen.poll() is not None:
            return None
        # `ip netns exec` execs the command: the PID is the process itself.
        p.popen.send_signal(signal.SIGTERM)
        try:
            return p.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            p.popen.kill()
            return p.popen.wait(5)

    # -- the device -----------------------------------------------------------------------------

    def start_device(self) -> None:
        env = {k: v for k, v in os.environ.items() if k != "FNMESH_HOME"}
        with open(self.logs / "device.log", "ab") as err:
            self.device = self.lan.popen(
                "site",
                [
                    sys.executable,
                    str(HERE / "site_support.py"),
                    "device",
                    str(self.home_dir),
                    self.site_broker,
                ],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=err,
                text=True,
                env=env,
            )
        dev = self.device

        def read() -> None:
            assert dev.stdout is not None
            for line in dev.stdout:
                self._lines.put(line)

        threading.Thread(target=read, daemon=True).start()
        first = self._read(60)
        assert first.get("ready"), first

    def _read(self, timeout: float) -> dict[str, Any]:
        try:
            line = self._lines.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(
                f"the device helper said nothing in {timeout:.0f} s:\n"
                + (self.logs / "device.log").read_text(errors="replace")[-3000:]
            ) from None
        out: dict[str, Any] = json.loads(line)
        if "exception" in out:
            raise AssertionError(f"device helper: {out['exception']}")
        return out

    def ask(self, timeout: float = 60, **cmd: Any) -> dict[str, Any]:
        assert self.device is not None and self.device.stdin is not None
        self.device.stdin.write(json.dumps(cmd) + "\n")
        self.device.stdin.flush()
        return self._read(timeout)

    # -- observing ------------------------------------------------------------------------------

    def nodes(self) -> dict[str, dict[str, Any]]:
        """``GET /v1/nodes`` on the coordinator, asked from inside the cloud host."""
        return {n["name"]: n for n in json.loads(self.helper("cld", "nodes", str(self.home_dir)))}

    def cache_files(self, node: str) -> dict[str, tuple[int, int]]:
        """The node's cached bundles: name -> (inode, size).

        A bundle stored in the cache (after a fetch) is written to a new file renamed into
        place, so a new inode means it was fetched again; the modification time is no sign
        (opening a cached bundle touches it, for the cache's least-recently-used order).
        """
        d = self.home_dir / "agent" / node / "cache" / "bundles"
        return {p.name: (p.stat().st_ino, p.stat().st_size) for p in sorted(d.iterdir())}

    def diagnostics(self) -> str:
        return "".join(f"\n--- {p.name} ---\n{p.tail(1500)}" for p in self.procs.values())

    # -- stopping -------------------------------------------------------------------------------

    def close(self) -> None:
        """Device, then the fnmesh processes (SIGTERM), then the brokers; what is left is
        killed when the LAN closes."""
        if self.device is not None:
            with contextlib.suppress(Exception):
                assert self.device.stdin is not None
                self.device.stdin.write(json.dumps({"op": "quit"}) + "\n")
                self.device.stdin.flush()
            try:
                self.device.wait(10)
            except subprocess.TimeoutExpired:
                self.device.kill()
                self.device.wait(5)
            for pipe in (self.device.stdin, self.device.stdout):
                if pipe is not None:
                    with contextlib.suppress(OSError):
                        pipe.close()
            self.device = None
        names = [n for n in self.procs if not n.startswith("mosquitto")]
        for n in names:
            p = self.procs[n]
            if p.running():
                assert p.popen is not None
                with contextlib.suppress(ProcessLookupError):
                    p.popen.send_signal(signal.SIGTERM)
        for n in names:
            self.stop_proc(n, timeout=10)
        for n in [n for n in self.procs if n.startswith("mosquitto")]:
            self.stop_proc(n, timeout=10)


if __name__ == "__main__":
    main(sys.argv[1:])
