"""A coordinator killed mid-write leaves a store that opens, checks clean, and serves."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

from conftest import SCALE

from fnmesh.certs.home import Home
from fnmesh.certs.identity import load_identity
from fnmesh.coordinator.bench.bundle import sized_model
from fnmesh.coordinator.broker import Mosquitto, free_port, settings_for_home, write_config
from fnmesh.coordinator.client import ApiError, Client
from fnmesh.coordinator.store import BlobStore, Store, sqlite_url
from fnmesh.coordinator.up import prepare_home
from fnmesh.errors import MeshError
from fnmesh.functions import bundle as fnb


def spawn_coordinator(home: Home, log: Path) -> subprocess.Popen[bytes]:
    with open(log, "ab") as f:
        return subprocess.Popen(
            [
                sys.executable,
                "-m",
                "fnmesh.coordinator.cli.main",
                "coordinator",
                "--home",
                str(home.root),
            ],
            stdout=f,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, "FNMESH_HOME": str(home.root)},
        )


async def wait_healthy(client: Client, proc: subprocess.Popen[bytes], timeout: float = 30) -> None:
    end = time.monotonic() + timeout
    while True:
        assert proc.poll() is None, "the coordinator exited"
        try:
            await client.async_call("GET", "/v1/health", timeout=2)
            return
        except MeshError:
            assert time.monotonic() < end, "the coordinator never answered"
            await asyncio.sleep(0.05)


async def burst(client: Client, bundles: list[bytes], stop: asyncio.Event, done: list[str]) -> None:
    """Push versions and deploy them as fast as the coordinator takes them."""
    for data in bundles:
        if stop.is_set():
            return
        b = fnb.Bundle.parse(data)
        try:
            await client.async_call(
                "POST",
                "/v1/bundles",
                data=data,
                headers={"Content-Type": "application/octet-stream"},
            )
            await client.async_call(
                "POST",
                "/v1/deployments",
                json_body={
                    "function": b.manifest.name,
                    "version": b.manifest.version,
                    "min": 0,
                    "max": 1,
                },
            )
            done.append(f"{b.manifest.name}@{b.manifest.version}")
        except (MeshError, ApiError):
            return  # the coordinator is gone


async def test_coordinator_killed_mid_burst_leaves_a_sound_store(tmp_path: Path) -> None:
    home = Home(tmp_path / "home")
    prepare_home(home, [])
    port, bport = free_port(), free_port()
    bdir = tmp_path / "broker"
    bdir.mkdir()
    broker = Mosquitto(
        write_config(settings_for_home(home, bdir, tls_port=bport), bdir), bport
    ).start()
    home.save_config(
        home.load_config().override(
            coordinator=f"https://127.0.0.1:{port}", broker=f"mqtts://127.0.0.1:{bport}"
        )
    )
    try:
        await _kill_and_check(home, tmp_path)
    finally:
        broker.stop()


async def _kill_and_check(home: Home, tmp_path: Path) -> None:
    client = Client(home, home.load_config())
    pub = load_identity(home.identity_dir("publisher.examples"))
    coord = load_identity(home.identity_dir("coordinator.main"))
    assert coord.info.x25519 is not None
    rng = random.Random(4)
    kills = max(1, int(3 * SCALE))
    pushed_total: list[str] = []
    for k in range(kills):
        bundles = [
            fnb.build(
                sized_model(20_000 + rng.randrange(50_000), seed=k * 100 + i),
                name=f"examples/crash{i % 3}",
                version=f"{k + 1}.{i}.0",
                publisher=pub,
                recipients={coord.cn: coord.info.x25519},
            ).to_bytes()
            for i in range(40)
        ]
        proc = spawn_coordinator(home, tmp_path / "coordinator.log")
        try:
            await wait_healthy(client, proc)
            stop = asyncio.Event()
            done: list[str] = []
            task = asyncio.get_running_loop().create_task(burst(client, bundles, stop, done))
            # Kill it in the middle: after some writes went through, while more are on their way.
            end = time.monotonic() + 30
            while len(done) < 3 + rng.randrange(6) and not task.done():
                assert time.monotonic() < end
                await asyncio.sleep(0.01)
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(10)
            stop.set()
            await task
            pushed_total += done
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
        # The store opens, passes its own checks, and holds every acknowledged write.
        state = home.root / "coordinator"
        store = await Store.open(sqlite_url(state / "coordinator.db"))
        try:
            assert await store.check(BlobStore(state / "blobs")) == []
            known = {f"{f.function}@{v}" for f in await store.list_functions() for v in f.versions}
            assert set(pushed_total) <= known, set(pushed_total) - known
            raw = sqlite3.connect(state / "coordinator.db")
            assert raw.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
            raw.close()
        finally:
            await store.close()
    # And a restarted coordinator serves what it had.
    proc = spawn_coordinator(home, tmp_path / "coordinator.log")
    try:
        await wait_healthy(client, proc)
        functions = await client.async_call("GET", "/v1/functions")
        assert {f["function"] for f in functions} >= {p.split("@")[0] for p in pushed_total}
        print(f"{kills} kills, {len(pushed_total)} acknowledged push+deploy pairs all survived")
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
