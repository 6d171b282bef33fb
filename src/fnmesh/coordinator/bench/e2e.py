"""``fnmesh bench e2e``: the whole mesh, device to answer, next to its baselines.

One machine runs what ``fnmesh up`` runs (Mosquitto with fnmesh's config, the
coordinator, one router, one agent) plus a bare MQTT echo process. This
process is the device. Printed from the same run:

- raw ``InferenceSession.run`` of the digits function;
- the bare MQTT echo round trip (device -> broker -> echo -> broker -> device);
- MQTT invocation, device -> router -> agent -> device: p50/p99 one at a time,
  and throughput with 64 in flight;
- HTTP invocation through the coordinator (routed like MQTT) and straight
  to the agent's own endpoint.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp

from fnmesh.agent.mqtt import MqttClient
from fnmesh.certs.home import Home
from fnmesh.certs.identity import load_identity
from fnmesh.certs.tls import client_context
from fnmesh.coordinator.bench.invoke import Device, pct, raw_onnx
from fnmesh.coordinator.client import Client
from fnmesh.coordinator.up import DEMO_DEVICE, deploy_examples, start
from fnmesh.functions.examples.models import build_example
from fnmesh.functions.messages import Encoding, encode_request


async def _http_rtt(url: str, ssl: Any, payloads: list[bytes], n: int) -> list[float]:
    out = []
    async with aiohttp.ClientSession() as s:
        for i in range(n):
            t = time.perf_counter()
            async with s.post(
                url,
                data=payloads[i % len(payloads)],
                ssl=ssl,
                headers={"Content-Type": "application/msgpack"},
            ) as r:
                await r.read()
                if r.status != 200:
                    raise RuntimeError(f"HTTP {r.status}")
            out.append((time.perf_counter() - t) * 1000)
    return out


async def _http_rps(url: str, ssl: Any, payloads: list[bytes], n: int, inflight: int) -> float:
    conn = aiohttp.TCPConnector(limit=inflight)
    async with aiohttp.ClientSession(connector=conn) as s:
        sem = asyncio.Semaphore(inflight)

        async def one(i: int) -> None:
            async with (
                sem,
                s.post(
                    url,
                    data=payloads[i % len(payloads)],
                    ssl=ssl,
                    headers={"Content-Type": "application/msgpack"},
                ) as r,
            ):
                await r.read()

        t = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(n)))
        return n / (time.perf_counter() - t)


def run(
    n: int = 2000, inflight: int = 64, progress: Callable[[str], None] = lambda s: None
) -> dict[str, Any]:
    f: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        home = Home(Path(tmp) / "home")
        # No ACL: the bare echo baseline needs topics no role may use; the mesh and its
        # baseline then run on the same broker configuration (mutual TLS either way).
        mesh = start(home, agents=1, progress=progress, acl=False)
        echo: subprocess.Popen[bytes] | None = None
        try:
            os.environ.pop("FNMESH_HOME", None)
            deploy_examples(mesh, progress)
            root = home.load_config().topic_root
            echo = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "fnmesh.coordinator.bench.echo",
                    "--broker",
                    mesh.broker_url,
                    "--topic",
                    f"{root}/echo",
                    "--home",
                    str(home.root),
                    "--as",
                    f"device.{DEMO_DEVICE}",
                    "--ready",
                    f"{root}/replies/{DEMO_DEVICE}/echo-ready",
                ],
                stdin=subprocess.DEVNULL,
            )
            f.update(asyncio.run(_measure(mesh.home, mesh.broker_url, n, inflight, progress)))
        finally:
            if echo is not None:
                echo.terminate()
                echo.wait(10)
            mesh.stop()
    f["mqtt_vs_echo_p50"] = f["mqtt_p50_ms"] / f["echo_p50_ms"]
    return f


async def _measure(
    home: Home, broker: str, n: int, inflight: int, progress: Callable[[str], None]
) -> dict[str, Any]:
    f: dict[str, Any] = {}
    root = home.load_config().topic_root
    dev = load_identity(home.identity_dir(f"device.{DEMO_DEVICE}"))
    ssl = client_context(dev, home.ca_cert)
    client = MqttClient(broker, f"device.{DEMO_DEVICE}-bench", ssl_context=ssl, persistent=False)
    device = Device(client, f"{root}/replies/{DEMO_DEVICE}/")
    ready = asyncio.Event()
    client.subscribe(f"{root}/replies/{DEMO_DEVICE}/echo-ready", lambda m: ready.set())
    await client.async_start()
    async with asyncio.timeout(30):
        await ready.wait()
    digits = build_example("digits")
    x = digits.sample_inputs(64, seed=3)["image"]
    payloads = [encode_request({"image": x[i : i + 1]}, Encoding.MSGPACK) for i in range(64)]
    fn_topic = f"{root}/fn/examples/digits/invoke"
    progress("raw ONNX Runtime")
    f["raw_digits_us"] = raw_onnx(digits.onnx_bytes, x[:1], "image") * 1e6
    progress("MQTT round trips")
    await device.rtt(f"{root}/echo", payloads, 200)
    await device.rtt(fn_topic, payloads, 200)
    echo = await device.rtt(f"{root}/echo", payloads, n)
    mqtt = await device.rtt(fn_topic, payloads, n)
    f.update(
        echo_p50_ms=pct(echo, 50),
        echo_p99_ms=pct(echo, 99),
        mqtt_p50_ms=pct(mqtt, 50),
        mqtt_p99_ms=pct(mqtt, 99),
    )
    progress(f"MQTT throughput at {inflight} in flight")
    f["echo_rps"] = await device.throughput(f"{root}/echo", payloads, n * 2, inflight)
    f["mqtt_rps"] = await device.throughput(fn_topic, payloads, n * 3, inflight)
    await client.async_stop()
    progress("HTTP")
    api = Client(home, home.load_config().override(identity=f"device.{DEMO_DEVICE}"))
    coord_url = f"{api.base}/v1/functions/examples/digits/invoke"
    f["http_coord_p50_ms"] = pct(await _http_rtt(coord_url, ssl, payloads, max(200, n // 4)), 50)
    f["http_coord_rps"] = await _http_rps(coord_url, ssl, payloads, n, inflight)
    nodes = await api.async_call("GET", "/v1/nodes")
    agent_base = next((x["http"] for x in nodes if x["state"] == "ready" and x.get("http")), None)
    if agent_base:
        url = f"{agent_base}/v1/functions/examples/digits/invoke"
        f["http_agent_p50_ms"] = pct(await _http_rtt(url, ssl, payloads, max(200, n // 4)), 50)
        f["http_agent_rps"] = await _http_rps(url, ssl, payloads, n, inflight)
    return f
