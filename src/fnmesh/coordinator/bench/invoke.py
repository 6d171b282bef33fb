"""``fnmesh bench invoke``: MQTT invocation of real functions on a real agent.

Everything runs as on a node: a Mosquitto with fnmesh's config (mutual TLS,
``set_tcp_nodelay true``), an agent process serving bundles, and, as the
baseline, a bare MQTT echo process using the same client code. This process
is the device. Printed next to each other, from the same run:

- raw ``InferenceSession.run`` per sample;
- the bare echo round trip, and the digits invocation round trip (p50/p99),
  measured in alternating blocks of 100 so that both see the same machine;
- throughput at 64 requests in flight, with batching and without, for the
  compute-heavy ``mlp`` example (and the tiny ``digits``, where the per-message
  cost dominates);
- cold start: bundle in cache to first answer, next to a bare
  ``InferenceSession(bytes)`` plus its first run, timed after the same idle
  spell that precedes a cold start (and back to back, for reference).
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from fnmesh.agent.mqtt import MqttClient, properties
from fnmesh.certs.ca import init_home
from fnmesh.certs.home import Home
from fnmesh.certs.identity import Role
from fnmesh.certs.tls import client_context
from fnmesh.coordinator.broker import Mosquitto, free_port, settings_for_home, write_config
from fnmesh.functions import bundle as fnb
from fnmesh.functions.examples.models import build_example
from fnmesh.functions.messages import Encoding, encode_request

ROOT = "bench/v1"
#: The agent unloads a function idle this long (s): each cold start follows such a spell.
IDLE_TTL_S = 2.0
#: Cold starts timed (each with a bare load beside it); the median is reported.
COLD_RUNS = 9


def pct(xs: list[float], p: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, round(p / 100 * (len(s) - 1)))]


@dataclass
class Results:
    figures: dict[str, Any] = field(default_factory=dict)

    def put(self, key: str, value: Any) -> None:
        self.figures[key] = value


class Device:
    """The benchmark's client: sends requests with correlation ids and collects answers."""

    def __init__(self, client: MqttClient, reply_prefix: str) -> None:
        self.client = client
        self.reply_prefix = reply_prefix
        self.waiting: dict[bytes, asyncio.Future[bytes]] = {}
        self.counter = 0
        client.subscribe(reply_prefix + "#", self._on_reply, qos=1)

    def _on_reply(self, msg: Any) -> None:
        corr = getattr(msg.properties, "CorrelationData", None)
        fut = self.waiting.pop(corr, None) if isinstance(corr, bytes) else None
        if fut is not None and not fut.done():
            fut.set_result(msg.payload)

    def send(self, topic: str, payload: bytes) -> asyncio.Future[bytes]:
        self.counter += 1
        corr = self.counter.to_bytes(8, "big")
        fut: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self.waiting[corr] = fut
        self.client.publish(
            topic,
            payload,
            1,
            False,
            properties(
                content_type="application/msgpack",
                correlation=corr,
                response_topic=self.reply_prefix + "r",
            ),
        )
        return fut

    async def rtt(self, topic: str, payloads: list[bytes], n: int) -> list[float]:
        out = []
        for i in range(n):
            t = time.perf_counter()
            async with asyncio.timeout(10):
                await self.send(topic, payloads[i % len(payloads)])
            out.append((time.perf_counter() - t) * 1000)
        return out

    async def rtt_pair(
        self, a: str, b: str, payloads: list[bytes], n: int, block: int = 100
    ) -> tuple[list[float], list[float]]:
        """Round trips to topics ``a`` and ``b``, in alternating blocks: both see the same machine."""
        out_a: list[float] = []
        out_b: list[float] = []
        while len(out_a) < n:
            k = min(block, n - len(out_a))
            out_a += await self.rtt(a, payloads, k)
            out_b += await self.rtt(b, payloads, k)
        return out_a, out_b

    async def throughput(self, topic: str, payloads: list[bytes], n: int, inflight: int) -> float:
        sent = 0
        done = 0
        finished = asyncio.get_running_loop().create_future()

        def one_done(_f: asyncio.Future[bytes]) -> None:
            nonlocal sent, done
            done += 1
            if done == n and not finished.done():
                finished.set_result(None)
            elif sent < n:
                sent += 1
                self.send(topic, payloads[sent % len(payloads)]).add_done_callback(one_done)

        t = time.perf_counter()
        for _ in range(min(inflight, n)):
            sent += 1
            self.send(topic, payloads[sent % len(payloads)]).add_done_callback(one_done)
        async with asyncio.timeout(120):
            await finished
        return n / (time.perf_counter() - t)


def _time_per_call(fn: Callable[[], object], seconds: float = 0.5) -> float:
    fn()
    n = 0
    t = time.perf_counter()
    while time.perf_counter() - t < seconds:
        fn()
        n += 1
    return (time.perf_counter() - t) / n


def raw_onnx(model: bytes, x: np.ndarray, name: str) -> float:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    s = ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])
    return _time_per_call(lambda: s.run(None, {name: x}))


def raw_cold(model: bytes, x: np.ndarray, name: str, repeat: int = 5, idle_s: float = 0.0) -> float:
    """Median of ``InferenceSession(bytes)`` plus a first run, each after ``idle_s`` of idling."""
    times = []
    for _ in range(repeat):
        if idle_s:
            time.sleep(idle_s)
        t = time.perf_counter()
        so = ort.SessionOptions()
        so.intra_op_num_threads = 1
        s = ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])
        s.run(None, {name: x})
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1000


async def wait_status(
    client: MqttClient, node: str, pred: Callable[[dict[str, Any]], bool], timeout: float = 60
) -> dict[str, Any]:
    got: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    client.subscribe(f"{ROOT}/nodes/{node}/status", lambda m: got.put_nowait(json.loads(m.payload)))
    client.subscribe(
        f"{ROOT}/nodes/{node}/heartbeat", lambda m: got.put_nowait(json.loads(m.payload))
    )
    end = time.monotonic() + timeout
    while True:
        async with asyncio.timeout(max(0.1, end - time.monotonic())):
            msg = await got.get()
        if pred(msg):
            return msg


def run(
    n: int = 2000, inflight: int = 64, progress: Callable[[str], None] = lambda s: None
) -> dict[str, Any]:
    return asyncio.run(_run(n, inflight, progress))


async def _run(n: int, inflight: int, progress: Callable[[str], None]) -> dict[str, Any]:
    res = Results()
    with tempfile.TemporaryDirectory() as tmp:
        home = Home(Path(tmp) / "home")
        ca, _ = init_home(home)
        pub = ca.issue(Role.PUBLISHER, "examples", namespace="examples")
        node = ca.issue(Role.NODE, "bench-1")
        dev = ca.issue(Role.DEVICE, "bench")
        ca.issue(Role.DEVICE, "echo")
        assert node.info.x25519 is not None
        port = free_port()
        bdir = Path(tmp) / "broker"
        bdir.mkdir()
        broker = Mosquitto(
            write_config(settings_for_home(home, bdir, tls_port=port), bdir), port
        ).start()
        url = f"mqtts://127.0.0.1:{port}"
        home.save_config(home.load_config().override(broker=url, topic_root=ROOT))
        procs: list[subprocess.Popen[bytes]] = []
        client: MqttClient | None = None
        try:
            digits = build_example("digits")
            mlp = build_example("mlp")
            files = []
            for fid, model, mb in (
                ("examples/digits", digits.onnx_bytes, 64),
                ("examples/mlp", mlp.onnx_bytes, 64),
                ("examples/mlp-unbatched", mlp.onnx_bytes, 1),
            ):
                b = fnb.build(
                    model,
                    name=fid,
                    version="1.0.0",
                    publisher=pub,
                    recipients={node.cn: node.info.x25519},
                    max_batch=mb,
                )
                f = Path(tmp) / (fid.replace("/", "_") + ".fnb")
                f.write_bytes(b.to_bytes())
                files.append(f)
            env = {**os.environ, "PYTHONUNBUFFERED": "1"}
            agent_cmd = [
                sys.executable,
                "-m",
                "fnmesh.coordinator.cli.main",
                "agent",
                "--home",
                str(home.root),
                "--name",
                "bench-1",
                "--broker",
                url,
                "--idle-ttl",
                str(IDLE_TTL_S),
                "--heartbeat",
                "0.5",
                *[a for f in files for a in ("--serve", str(f))],
            ]
            procs.append(subprocess.Popen(agent_cmd, env=env, stdin=subprocess.DEVNULL))
            procs.append(
                subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        "fnmesh.coordinator.bench.echo",
                        "--broker",
                        url,
                        "--topic",
                        f"{ROOT}/echo",
                        "--home",
                        str(home.root),
                        "--as",
                        "device.echo",
                        "--ready",
                        f"{ROOT}/echo-ready",
                    ],
                    env=env,
                    stdin=subprocess.DEVNULL,
                )
            )
            client = MqttClient(
                url, "device.bench", ssl_context=client_context(dev, home.ca_cert), persistent=False
            )
            device = Device(client, f"{ROOT}/replies/bench/")
            echo_ready = asyncio.Event()
            client.subscribe(f"{ROOT}/echo-ready", lambda m: echo_ready.set())
            await client.async_start()
            progress("waiting for the agent and the echo responder")
            await wait_status(
                client,
                "bench-1",
                lambda s: len(s.get("functions", {})) == 3 and s.get("state") == "ready",
            )
            async with asyncio.timeout(30):
                await echo_ready.wait()

            x1 = digits.sample_inputs(64, seed=1)["image"]
            dig_payloads = [
                encode_request({"image": x1[i : i + 1]}, Encoding.MSGPACK) for i in range(64)
            ]
            mx = mlp.sample_inputs(64, seed=2)
            mname = next(iter(mx))
            mlp_payloads = [
                encode_request({mname: mx[mname][i : i + 1]}, Encoding.MSGPACK) for i in range(64)
            ]

            progress("raw ONNX Runtime")
            res.put("raw_digits_us", raw_onnx(digits.onnx_bytes, x1[:1], "image") * 1e6)
            res.put("raw_mlp_us", raw_onnx(mlp.onnx_bytes, mx[mname][:1], mname) * 1e6)
            res.put(
                "raw_mlp_batch64_us_per_sample",
                raw_onnx(mlp.onnx_bytes, mx[mname], mname) * 1e6 / 64,
            )

            progress("round trips")
            await device.rtt(f"{ROOT}/echo", dig_payloads, 200)
            await device.rtt(f"{ROOT}/nodes/bench-1/invoke/examples/digits", dig_payloads, 200)
            echo, inv = await device.rtt_pair(
                f"{ROOT}/echo", f"{ROOT}/nodes/bench-1/invoke/examples/digits", dig_payloads, n
            )
            res.put("echo_p50_ms", pct(echo, 50))
            res.put("echo_p99_ms", pct(echo, 99))
            res.put("invoke_p50_ms", pct(inv, 50))
            res.put("invoke_p99_ms", pct(inv, 99))

            progress(f"throughput at {inflight} in flight")
            res.put(
                "echo_rps", await device.throughput(f"{ROOT}/echo", dig_payloads, n * 2, inflight)
            )
            res.put(
                "digits_rps",
                await device.throughput(
                    f"{ROOT}/nodes/bench-1/invoke/examples/digits", dig_payloads, n * 2, inflight
                ),
            )
            res.put(
                "mlp_rps",
                await device.throughput(
                    f"{ROOT}/nodes/bench-1/invoke/examples/mlp", mlp_payloads, n * 2, inflight
                ),
            )
            res.put(
                "mlp_unbatched_rps",
                await device.throughput(
                    f"{ROOT}/nodes/bench-1/invoke/examples/mlp-unbatched", mlp_payloads, n, inflight
                ),
            )

            progress("cold starts (waiting for scale to zero between runs)")
            # Each cold start follows an idle spell (the agent unloads after IDLE_TTL_S), and
            # so does each bare load it is compared with: the two alternate, so both see the
            # machine in the same state.
            colds, raws = [], []
            for _ in range(COLD_RUNS):
                await wait_status(
                    client,
                    "bench-1",
                    lambda s: "loaded" in s and "examples/mlp@1.0.0" not in s["loaded"],
                )
                t = time.perf_counter()
                async with asyncio.timeout(30):
                    await device.send(f"{ROOT}/nodes/bench-1/invoke/examples/mlp", mlp_payloads[0])
                colds.append((time.perf_counter() - t) * 1000)
                raws.append(
                    raw_cold(mlp.onnx_bytes, mx[mname][:1], mname, repeat=1, idle_s=IDLE_TTL_S)
                )
            res.put("cold_mlp_ms", statistics.median(colds))
            res.put("raw_cold_mlp_ms", statistics.median(raws))
            # Back to back (hot caches), for reference.
            res.put("raw_cold_hot_mlp_ms", raw_cold(mlp.onnx_bytes, mx[mname][:1], mname))
        finally:
            if client is not None:
                await client.async_stop()
            for p in procs:
                p.terminate()
            for p in procs:
                try:
                    p.wait(15)
                except subprocess.TimeoutExpired:
                    p.kill()
            broker.stop()
    fig = res.figures
    fig["invoke_vs_echo_p50"] = fig["invoke_p50_ms"] / fig["echo_p50_ms"]
    fig["mlp_batching_gain"] = fig["mlp_rps"] / fig["mlp_unbatched_rps"]
    fig["digits_vs_echo_rps"] = fig["digits_rps"] / fig["echo_rps"]
    fig["cold_vs_raw"] = fig["cold_mlp_ms"] / fig["raw_cold_mlp_ms"]
    return fig
