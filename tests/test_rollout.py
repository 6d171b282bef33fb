"""Rolling updates under load lose nothing; going back needs an operator-signed order."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from fnmesh.agent.mqtt import MqttClient, properties
from fnmesh.certs.home import Home
from fnmesh.certs.identity import load_identity
from fnmesh.certs.tls import client_context
from fnmesh.coordinator.client import ApiError, Client
from fnmesh.coordinator.up import DEMO_DEVICE, Mesh, start
from fnmesh.functions import bundle as fnb
from fnmesh.functions.examples.models import build_example
from fnmesh.functions.messages import Encoding, Response, decode_reply, encode_request
from fnmesh.functions.rollback import sign_order

FID = "examples/digits"


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    home = Home(tmp_path_factory.mktemp("rollout") / "home")
    m = start(home, agents=2, progress=lambda s: None)
    try:
        yield m
    finally:
        m.stop()


async def push_version(mesh: Mesh, version: str, model: bytes) -> None:
    home = mesh.home
    pub = load_identity(home.identity_dir("publisher.examples"))
    coord = load_identity(home.identity_dir("coordinator.main"))
    assert coord.info.x25519 is not None
    b = fnb.build(
        model, name=FID, version=version, publisher=pub, recipients={coord.cn: coord.info.x25519}
    )
    await Client(home, home.load_config()).async_call(
        "POST",
        "/v1/bundles",
        data=b.to_bytes(),
        headers={"Content-Type": "application/octet-stream"},
    )


class Load:
    """A device sending requests one after another, recording every answer."""

    def __init__(self, mesh: Mesh) -> None:
        home = mesh.home
        root = home.load_config().topic_root
        dev = load_identity(home.identity_dir(f"device.{DEMO_DEVICE}"))
        self.client = MqttClient(
            mesh.broker_url,
            f"device.{DEMO_DEVICE}-load",
            ssl_context=client_context(dev, home.ca_cert),
            persistent=False,
        )
        self.topic = f"{root}/fn/{FID}/invoke"
        self.reply = f"{root}/replies/{DEMO_DEVICE}/load"
        self.answers: list[Any] = []
        self.waiting: dict[bytes, asyncio.Future[bytes]] = {}
        self.client.subscribe(self.reply, self._on)
        self.x = build_example("digits").sample_inputs(32, seed=11)["image"]
        self.ids = itertools.count()
        self.stop = asyncio.Event()

    def _on(self, msg: Any) -> None:
        fut = self.waiting.pop(msg.properties.CorrelationData, None)
        if fut is not None and not fut.done():
            fut.set_result(msg.payload)

    async def run(self) -> None:
        while not self.stop.is_set():
            i = next(self.ids)
            corr = i.to_bytes(8, "big")
            fut = asyncio.get_running_loop().create_future()
            self.waiting[corr] = fut
            row = self.x[i % len(self.x) : i % len(self.x) + 1]
            self.client.publish(
                self.topic,
                encode_request({"image": row}, Encoding.MSGPACK, id=str(i)),
                1,
                False,
                properties(response_topic=self.reply, correlation=corr),
            )
            async with asyncio.timeout(15):
                answer = await fut
            self.answers.append((i % len(self.x), decode_reply(answer)))

    def versions(self) -> set[str]:
        return {a.version for _, a in self.answers[-5:] if isinstance(a, Response)}


async def _until(pred: Any, timeout: float) -> None:
    end = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < end, "condition not reached in time"
        await asyncio.sleep(0.05)


async def test_rolling_update_under_load_fails_nothing(mesh: Mesh) -> None:
    api = Client(mesh.home, mesh.home.load_config())
    digits, mlp = build_example("digits"), build_example("mlp")
    await push_version(mesh, "1.0.0", digits.onnx_bytes)
    await push_version(mesh, "2.0.0", mlp.onnx_bytes)
    await api.async_call(
        "POST",
        "/v1/deployments",
        json_body={"function": FID, "version": "1.0.0", "min": 2, "max": 2},
    )
    await api.async_call(
        "POST", "/v1/grants", json_body={"subject": f"device.{DEMO_DEVICE}", "function": FID}
    )
    ready: list[str] = []

    async def both_ready() -> bool:
        nodes = await api.async_call("GET", "/v1/nodes")
        ready[:] = [n["name"] for n in nodes if n["functions"].get(FID) == "1.0.0"]
        return len(ready) == 2

    end = time.monotonic() + 60
    while not await both_ready():
        assert time.monotonic() < end, f"1.0.0 ready on {ready} only"
        await asyncio.sleep(0.1)
    load = Load(mesh)
    await load.client.async_start()
    task = asyncio.get_running_loop().create_task(load.run())
    try:
        await _until(lambda: load.versions() == {"1.0.0"}, 60)
        await api.async_call(
            "POST",
            "/v1/deployments",
            json_body={"function": FID, "version": "2.0.0", "min": 2, "max": 2},
        )
        await _until(lambda: load.versions() == {"2.0.0"}, 60)
        n_at_switch = len(load.answers)
        await _until(lambda: len(load.answers) > n_at_switch + 20, 30)

        # Going back without a signed order is refused; with one it is done.
        with pytest.raises(ApiError) as e:
            await api.async_call(
                "POST",
                "/v1/deployments",
                json_body={"function": FID, "version": "1.0.0", "min": 2, "max": 2},
            )
        assert e.value.status == 409 and "rollback" in str(e.value)
        operator = load_identity(mesh.home.identity_dir("operator.admin"))
        bad = sign_order(operator, FID, "0.9.0", "2.0.0")
        with pytest.raises(ApiError) as e:
            await api.async_call(
                "POST",
                "/v1/deployments",
                json_body={
                    "function": FID,
                    "version": "1.0.0",
                    "min": 2,
                    "max": 2,
                    "rollback": bad,
                },
            )
        assert e.value.status == 403
        order = sign_order(operator, FID, "1.0.0", "2.0.0")
        await api.async_call(
            "POST",
            "/v1/deployments",
            json_body={"function": FID, "version": "1.0.0", "min": 2, "max": 2, "rollback": order},
        )
        await _until(lambda: load.versions() == {"1.0.0"}, 60)
    finally:
        load.stop.set()
        with contextlib.suppress(Exception):
            async with asyncio.timeout(20):
                await task
        await load.client.async_stop()
    failed = [a for _, a in load.answers if not isinstance(a, Response)]
    assert not failed, failed[:3]
    print(f"{len(load.answers)} requests across 1.0.0 -> 2.0.0 -> 1.0.0, none failed")
    # Answers carry the outputs of the version they name.
    refs = {"1.0.0": digits.reference({"image": load.x}), "2.0.0": mlp.reference({"image": load.x})}
    for row, a in load.answers:
        np.testing.assert_allclose(
            a.outputs["probabilities"][0], refs[a.version]["probabilities"][row], atol=1e-4
        )
    seen = [a.version for _, a in load.answers]
    assert seen[0] == "1.0.0" and "2.0.0" in seen and seen[-1] == "1.0.0"
    versions = (await api.async_call("GET", f"/v1/functions/{FID}"))["deployment"]
    assert versions["version"] == "1.0.0" and versions["rollback"] is not None


async def test_drain_moves_work_and_undo_brings_the_node_back(mesh: Mesh) -> None:
    api = Client(mesh.home, mesh.home.load_config())
    await api.async_call(
        "POST",
        "/v1/deployments",
        json_body={"function": FID, "version": "1.0.0", "min": 1, "max": 1},
    )

    async def holders() -> list[str]:
        rows = await api.async_call("GET", "/v1/placements")
        return [p["node"] for p in rows if p["function"] == FID]

    end = time.monotonic() + 30
    while len(await holders()) != 1:
        assert time.monotonic() < end
        await asyncio.sleep(0.05)
    (first,) = await holders()
    await api.async_call("POST", f"/v1/nodes/{first}/drain", json_body={"draining": True})
    end = time.monotonic() + 30
    while (h := await holders()) == [first] or not h:
        assert time.monotonic() < end, f"work never left {first}"
        await asyncio.sleep(0.05)
    assert first not in h
    nodes = {n["name"]: n for n in await api.async_call("GET", "/v1/nodes")}
    assert nodes[first]["state"] == "draining"
    await api.async_call("POST", f"/v1/nodes/{first}/drain", json_body={"draining": False})
    nodes = {n["name"]: n for n in await api.async_call("GET", "/v1/nodes")}
    assert nodes[first]["state"] == "ready"
    with pytest.raises(ApiError) as e:
        await api.async_call("POST", "/v1/nodes/nowhere/drain", json_body={"draining": True})
    assert e.value.status == 404
    entries = await api.async_call("GET", "/v1/audit")
    assert [x["action"] for x in entries][-2:] == ["drain", "undrain"]
