"""``fnmesh up``: a whole mesh on one machine, in one command.

Creates the fleet if the home is new, starts a Mosquitto with fnmesh's
generated config (mutual TLS, ``set_tcp_nodelay``, persistence) on a free port
unless ``--broker`` names one, then the coordinator, a router and N agents with
different labels (sites, regions, one ``tier=cloud``) as child processes. It
builds, pushes and deploys the example functions, issues a demo device, and
prints how to invoke them. Ctrl-C (or the end of ``--demo``) stops everything
it started.
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

import numpy as np

from fnmesh.agent.mqtt import MqttClient, properties
from fnmesh.certs.ca import FleetCA, init_home
from fnmesh.certs.home import Home
from fnmesh.certs.identity import Role, load_identity
from fnmesh.certs.tls import client_context
from fnmesh.coordinator.acl import acl_for_home, write_acl
from fnmesh.coordinator.broker import Mosquitto, free_port, settings_for_home, write_config
from fnmesh.coordinator.client import ApiError, Client
from fnmesh.errors import MeshError
from fnmesh.functions import bundle as fnb
from fnmesh.functions.examples.models import EXAMPLE_NAMES, build_example
from fnmesh.functions.messages import Encoding, Response, decode_reply, encode_request

#: Sites for the edge agents, in order; the last agent is always the cloud node.
EDGE_SITES = (
    ("lyon-1", "eu-west"),
    ("paris-1", "eu-west"),
    ("berlin-1", "eu-central"),
    ("milan-1", "eu-south"),
)
DEMO_DEVICE = "demo"


class UpError(MeshError):
    """The local mesh could not be started."""


@dataclass
class Mesh:
    home: Home
    broker_url: str
    api_url: str
    procs: list[tuple[str, subprocess.Popen[bytes]]] = field(default_factory=list)
    broker: Mosquitto | None = None
    logs: Path | None = None

    def stop(self, timeout: float = 10.0) -> None:
        """Stop everything started, in reverse order; a second Ctrl-C cannot cut this short."""
        try:
            previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
        except ValueError:  # not the main thread: nothing to guard
            previous = None
        try:
            self._stop(timeout)
        finally:
            if previous is not None:
                signal.signal(signal.SIGINT, previous)

    def _stop(self, timeout: float) -> None:
        for _, p in reversed(self.procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        end = time.monotonic() + timeout
        for _, p in reversed(self.procs):
            try:
                p.wait(max(0.1, end - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)
        self.procs.clear()
        if self.broker is not None:
            self.broker.stop()
            self.broker = None


def agent_layout(n: int) -> list[tuple[str, dict[str, str]]]:
    """Names and labels for ``n`` agents: edge sites first, the last one in the cloud."""
    if n < 1:
        raise UpError("--agents must be at least 1")
    out: list[tuple[str, dict[str, str]]] = []
    edges = n - 1 if n > 1 else 1
    for i in range(edges):
        site, region = EDGE_SITES[i % len(EDGE_SITES)]
        name = site if i < len(EDGE_SITES) else f"{site.split('-')[0]}-{i // len(EDGE_SITES) + 1}"
        out.append((name, {"region": region, "site": name, "tier": "edge"}))
    if n > 1:
        out.append(("cloud-1", {"region": "eu-west", "site": "cloud-eu", "tier": "cloud"}))
    return out


def prepare_home(home: Home, layout: list[tuple[str, dict[str, str]]]) -> FleetCA:
    """Create the fleet if new; issue whatever identities are missing."""
    if not home.ca_key.exists():
        init_home(home)
    ca = FleetCA.load(home)
    want = [
        (Role.PUBLISHER, "examples", "examples"),
        (Role.DEVICE, DEMO_DEVICE, None),
        (Role.ROUTER, "main", None),
        *[(Role.NODE, name, None) for name, _ in layout],
    ]
    for role, name, ns in want:
        if not home.identity_dir(f"{role.value}.{name}").exists():
            # Agents serve HTTPS on loopback here: their certificates name it.
            sans = ["localhost", "127.0.0.1", "::1"] if role == Role.NODE else None
            ca.issue(role, name, namespace=ns, sans=sans)
    return ca


def _spawn(args: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    logf = open(log, "ab")  # noqa: SIM115 - the child owns it
    try:
        return subprocess.Popen(
            [sys.executable, "-m", "fnmesh.coordinator.cli.main", *args],
            stdout=logf,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
        )
    finally:
        logf.close()


def _wait(what: str, check: Callable[[], bool], timeout: float, mesh: Mesh) -> None:
    end = time.monotonic() + timeout
    while not check():
        for name, p in mesh.procs:
            if p.poll() is not None:
                raise UpError(f"{name} exited with status {p.returncode} (see {mesh.logs})")
        if time.monotonic() > end:
            raise UpError(f"timed out waiting for {what} (see {mesh.logs})")
        time.sleep(0.1)


def start(
    home: Home,
    *,
    agents: int = 3,
    broker: str | None = None,
    mdns_interfaces: tuple[str, ...] = ("127.0.0.1",),
    progress: Callable[[str], None] = print,
    acl: bool = True,
) -> Mesh:
    """Start broker, coordinator, router and agents; the coordinator advertises itself over
    mDNS on ``mdns_interfaces`` only (loopback unless told otherwise)."""
    layout = agent_layout(agents)
    prepare_home(home, layout)
    logs = home.root / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    cfg = home.load_config()
    api_port = free_port()
    mesh = Mesh(home, broker or "", f"https://127.0.0.1:{api_port}", logs=logs)
    try:
        coordinator_args: list[str] = []
        if broker is None:
            port = free_port()
            bdir = home.root / "broker"
            bdir.mkdir(exist_ok=True)
            acl_path = bdir / "acl"
            # Role-based ACL from the start; the coordinator regenerates it on grants
            # and revocations and signals the broker to reload it. (Only benchmarks that
            # need a bare echo baseline on the same broker turn it off.)
            write_acl(acl_path, acl_for_home(home, {}, cfg.topic_root))
            conf = write_config(
                settings_for_home(home, bdir, tls_port=port, acl_file=acl_path if acl else None),
                bdir,
            )
            progress(
                f"starting Mosquitto on 127.0.0.1:{port} (mutual TLS"
                + (", role-based ACL)" if acl else ", no ACL)")
            )
            mesh.broker = Mosquitto(conf, port, log=logs / "mosquitto.log").start()
            mesh.broker_url = f"mqtts://127.0.0.1:{port}"
            pid_file = bdir / "mosquitto.pid"
            assert mesh.broker.proc is not None
            pid_file.write_text(str(mesh.broker.proc.pid))
            coordinator_args = ["--broker-pid-file", str(pid_file)]
            if acl:
                coordinator_args += ["--acl-file", str(acl_path)]
        home.save_config(cfg.override(broker=mesh.broker_url, coordinator=mesh.api_url))
        for iface in mdns_interfaces:
            coordinator_args += ["--discover-interfaces", iface]
        env = {**os.environ, "FNMESH_HOME": str(home.root), "PYTHONUNBUFFERED": "1"}
        progress(f"starting the coordinator on {mesh.api_url}")
        mesh.procs.append(
            (
                "coordinator",
                _spawn(
                    ["coordinator", "--home", str(home.root), "-v", *coordinator_args],
                    logs / "coordinator.log",
                    env,
                ),
            )
        )
        mesh.procs.append(
            ("router", _spawn(["router", "--home", str(home.root), "-v"], logs / "router.log", env))
        )
        for name, labels in layout:
            lbl = ",".join(f"{k}={v}" for k, v in labels.items())
            mesh.procs.append(
                (
                    f"agent {name}",
                    _spawn(
                        ["agent", "--home", str(home.root), "--name", name, "--labels", lbl, "-v"],
                        logs / f"agent-{name}.log",
                        env,
                    ),
                )
            )
        client = Client(home, home.load_config())
        _wait(
            "the coordinator",
            lambda: _ok(lambda: client.call("GET", "/v1/health", timeout=2)),
            30,
            mesh,
        )
        progress(f"waiting for {len(layout)} agent(s) to join")
        _wait(
            "the agents",
            lambda: len([n for n in _nodes(client) if n["state"] == "ready"]) >= len(layout),
            60,
            mesh,
        )
        return mesh
    except BaseException:
        mesh.stop()
        raise


def _ok(fn: Callable[[], Any]) -> bool:
    try:
        fn()
        return True
    except MeshError:
        return False


def _nodes(client: Client) -> list[dict[str, Any]]:
    try:
        out: list[dict[str, Any]] = client.call("GET", "/v1/nodes", timeout=2)
        return out
    except MeshError:
        return []


def deploy_examples(mesh: Mesh, progress: Callable[[str], None] = print) -> list[str]:
    """Build, push and deploy every example; returns the function ids."""
    home = mesh.home
    client = Client(home, home.load_config())
    pub = load_identity(home.identity_dir("publisher.examples"))
    coord = load_identity(home.identity_dir("coordinator.main"))
    assert coord.info.x25519 is not None
    pushed = {f["function"]: f["versions"] for f in client.call("GET", "/v1/functions")}
    bundles = home.root / "bundles"
    bundles.mkdir(exist_ok=True)
    out = []
    for name in EXAMPLE_NAMES:
        ex = build_example(name)
        if ex.version not in pushed.get(ex.function_id, []):
            progress(f"building and pushing {ex.function_id}@{ex.version}")
            b = fnb.build(
                ex.onnx_bytes,
                name=ex.function_id,
                version=ex.version,
                publisher=pub,
                recipients={coord.cn: coord.info.x25519},
                regions=ex.regions,
                max_batch=64,
            )
            data = b.to_bytes()
            (bundles / f"{name}.fnb").write_bytes(data)
            client.push(data)
        try:
            client.call(
                "POST",
                "/v1/deployments",
                json_body={
                    "function": ex.function_id,
                    "version": ex.version,
                    "min": 1,
                    "max": 2,
                },
            )
            client.call(
                "POST",
                "/v1/grants",
                json_body={"subject": f"device.{DEMO_DEVICE}", "function": ex.function_id},
            )
        except ApiError as e:
            raise UpError(f"cannot deploy {ex.function_id}: {e}") from e
        out.append(ex.function_id)
    progress("waiting for the examples to be ready")
    want = {f for f in out}

    def ready() -> bool:
        serving = {f for n in _nodes(client) if n["state"] == "ready" for f in n["functions"]}
        return want <= serving

    _wait("the examples to be ready", ready, 90, mesh)
    return out


def device_files(home: Home) -> dict[str, str]:
    d = home.identity_dir(f"device.{DEMO_DEVICE}")
    return {"cert": str(d / "cert.pem"), "key": str(d / "key.pem"), "ca": str(d / "ca.pem")}


def instructions(mesh: Mesh) -> str:
    files = device_files(mesh.home)
    port = mesh.broker_url.rsplit(":", 1)[-1]
    root = mesh.home.load_config().topic_root
    sample = json.dumps(
        {
            "inputs": {
                "image": {
                    "dtype": "float32",
                    "shape": [1, 64],
                    "data": build_example("digits").sample_inputs(1)["image"].ravel().tolist(),
                }
            }
        }
    )
    return "\n".join(
        [
            f"broker  {mesh.broker_url}",
            f"API     {mesh.api_url}",
            f"home    {mesh.home.root}",
            "",
            "Invoke the digits function over MQTT 5 (Debian's mosquitto_rr):",
            f"  mosquitto_rr -h 127.0.0.1 -p {port} --cafile {files['ca']} --cert {files['cert']} --key {files['key']} \\",
            f"    -t {root}/fn/examples/digits/invoke -e {root}/replies/{DEMO_DEVICE}/1 -W 10 \\",
            f"    -m '{sample}'",
            "",
            "or over HTTP through the coordinator:",
            f"  FNMESH_HOME={mesh.home.root} fnmesh invoke examples/digits --input '{json.dumps(json.loads(sample)['inputs'])}'",
        ]
    )


async def async_demo(mesh: Mesh, functions: list[str]) -> list[dict[str, Any]]:
    """Invoke each example as the demo device (device -> router -> agent) and check the answers."""
    home = mesh.home
    root = home.load_config().topic_root
    dev = load_identity(home.identity_dir(f"device.{DEMO_DEVICE}"))
    client = MqttClient(
        mesh.broker_url,
        f"device.{DEMO_DEVICE}",
        ssl_context=client_context(dev, home.ca_cert),
        persistent=False,
    )
    replies: asyncio.Queue[Any] = asyncio.Queue()
    client.subscribe(f"{root}/replies/{DEMO_DEVICE}/#", replies.put_nowait)
    await client.async_start()
    results = []
    try:
        for fid in functions:
            ex = build_example(fid.split("/", 1)[1])
            inputs = ex.sample_inputs(5, seed=7)
            ref = ex.reference(inputs)
            t = time.perf_counter()
            client.publish(
                f"{root}/fn/{fid}/invoke",
                encode_request(inputs, Encoding.MSGPACK, id=f"demo-{fid}"),
                1,
                False,
                properties(
                    response_topic=f"{root}/replies/{DEMO_DEVICE}/demo", correlation=fid.encode()
                ),
            )
            async with asyncio.timeout(30):
                msg = await replies.get()
            ms = (time.perf_counter() - t) * 1000
            reply = decode_reply(msg.payload)
            if not isinstance(reply, Response):
                results.append(
                    {"function": fid, "ok": False, "error": f"{reply.code}: {reply.message}"}
                )
                continue
            label = reply.outputs.get("label")
            ok = label is not None and np.array_equal(label, ref["label"])
            results.append(
                {
                    "function": fid,
                    "ok": bool(ok),
                    "node": reply.node,
                    "version": reply.version,
                    "labels": label.tolist() if label is not None else None,
                    "expected": ref["label"].tolist(),
                    "ms": round(ms, 2),
                    "cold_start": reply.timing.cold_start,
                }
            )
    finally:
        await client.async_stop()
    return results


def run_up(
    home: Home,
    *,
    agents: int,
    broker: str | None,
    demo: bool,
    as_json: bool,
    progress: Callable[[str], None],
    show: Callable[[str], None],
    mdns_interfaces: tuple[str, ...] = ("127.0.0.1",),
) -> int:
    mesh = start(
        home, agents=agents, broker=broker, mdns_interfaces=mdns_interfaces, progress=progress
    )
    try:
        functions = deploy_examples(mesh, progress)
        if as_json:
            show(
                json.dumps(
                    {
                        "ready": True,
                        "broker": mesh.broker_url,
                        "api": mesh.api_url,
                        "home": str(home.root),
                        "device": device_files(home),
                        "functions": functions,
                    }
                )
            )
        if demo:
            results = asyncio.run(async_demo(mesh, functions))
            if as_json:
                show(json.dumps({"demo": results}))
            else:
                for r in results:
                    if r["ok"]:
                        show(
                            f"{r['function']}: {r['labels']} (expected {r['expected']}) from {r['node']} in {r['ms']} ms"
                        )
                    else:
                        show(f"{r['function']}: FAILED {r.get('error') or r}")
            return 0 if all(r["ok"] for r in results) else 1
        if not as_json:
            show(instructions(mesh))
            show("\nCtrl-C stops the mesh.")
        stop = {"now": False}

        def on_signal(*_: Any) -> None:
            stop["now"] = True

        signal.signal(signal.SIGTERM, on_signal)
        with contextlib.suppress(KeyboardInterrupt):
            while not stop["now"]:
                for name, p in mesh.procs:
                    if p.poll() is not None:
                        raise UpError(f"{name} exited with status {p.returncode} (see {mesh.logs})")
                time.sleep(0.5)
        return 0
    finally:
        mesh.stop()
