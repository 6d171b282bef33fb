"""The whole mesh end to end, every part a real process: Mosquitto, ``fnmesh coordinator``,
``fnmesh router`` and ``fnmesh agent``s, driven through the CLI as a new user would, with devices
on fnmesh's MQTT client, Debian's ``mosquitto_rr`` and HTTP.

Shown here: answers equal scikit-learn's; a coordinator restart (clean or ``kill -9``) loses
nothing and republishes nothing, while requests keep being answered; bad pushes are refused
with a reason and leave nothing behind; a node that dies is replaced within seconds;
undeploying stops the function everywhere; ``fnmesh up --demo`` cleans up after itself; the
CLI's ``--json`` agrees with the REST API.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import re
import signal
import subprocess
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import pytest
from mesh_support import (
    DIGITS,
    FNMESH,
    PYTHON,
    WAIT,
    ControlWatcher,
    LocalMesh,
    MeshDevice,
    build_bundle,
    clean_env,
    cli,
    cli_json,
    foreign_fleet,
    generations,
    labels_of,
    launch,
    local_mesh,
    make_home,
    now,
    running,
)

from fnmesh.certs.ca import FleetCA
from fnmesh.certs.home import Home
from fnmesh.certs.identity import Role
from fnmesh.coordinator.client import ApiError
from fnmesh.coordinator.store import BlobStore, Store, sqlite_url
from fnmesh.functions.bundle import Bundle
from fnmesh.functions.examples.models import build_example
from fnmesh.functions.messages import ErrorCode, ErrorReply, Response

CANCER = "examples/cancer"
#: The CLI-built mesh: one edge node and one cloud node. "lyon-1" sorts last: see the restart test.
NODES = {
    "cloud-1": {"region": "eu-west", "site": "cloud-eu", "tier": "cloud"},
    "lyon-1": {"region": "eu-west", "site": "lyon-1", "tier": "edge"},
}


def digits_rows(n: int, seed: int = 0) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """``n`` digit images and what scikit-learn says of them."""
    ex = build_example("digits")
    inputs = ex.sample_inputs(n, seed=seed)
    return inputs, ex.reference(inputs)


def json_request(image: np.ndarray, rid: str) -> str:
    """One image as the JSON request a device without fnmesh's SDK would write."""
    row = np.asarray(image, dtype=np.float32).reshape(1, 64)
    return json.dumps(
        {
            "id": rid,
            "inputs": {
                "image": {"dtype": "float32", "shape": [1, 64], "data": row.ravel().tolist()}
            },
        }
    )


def json_label(reply: dict[str, Any]) -> int:
    """The label of a JSON answer (fails with the answer when it is an error)."""
    assert "outputs" in reply, f"expected an answer, got {reply}"
    t = reply["outputs"]["label"]
    assert t["dtype"] == "int64" and t["shape"] == [1], t
    return int(np.asarray(t["data"]).ravel()[0])


#: What a node is, as opposed to how it is doing (load, heartbeat age, RTT move all the time).
NODE_FIELDS = ("name", "cn", "state", "labels", "hardware", "functions", "fingerprint", "http")


def comparable_nodes(nodes: list[dict[str, Any]]) -> list[dict[str, Any]]:
    for n in nodes:
        assert set(NODE_FIELDS) <= set(n), n
    return [{k: n[k] for k in NODE_FIELDS} for n in nodes]


# == a mesh set up through the CLI, step by step =============================================


@pytest.fixture(scope="module")
def cli_mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalMesh]:
    """A new user's mesh: fleet, identities, config, processes, the digits bundle built, pushed
    and deployed, each step a real ``fnmesh`` (or ``python -m``) command that must succeed."""
    base = tmp_path_factory.mktemp("cli-mesh")
    home = Home(base / "home")
    mesh = LocalMesh(home, heartbeat=2.0)
    try:
        made = json.loads(cli(home, "certs", "init", "--json").stdout)
        assert made["coordinator"] == "coordinator.main" and made["operator"] == "operator.admin"
        cli(home, "certs", "issue", "publisher", "examples", "--namespace", "examples")
        for node in NODES:
            cli(home, "certs", "issue", "node", node, "--san", "127.0.0.1", "--san", "localhost")
        dev = cli_json(home, "certs", "issue", "device", "d1")
        assert dev["cn"] == "device.d1" and Path(dev["key"]).stat().st_mode & 0o077 == 0
        cli(home, "certs", "issue", "router", "main")
        # fnmesh.toml, as a user edits it: where the broker and the coordinator are.
        text = home.config_path.read_text()
        assert "coordinator" in text and "broker" in text
        home.config_path.write_text(
            re.sub(
                r'(?m)^coordinator = ".*"$',
                f'coordinator = "{mesh.api_url}"',
                re.sub(r'(?m)^broker = ".*"$', f'broker = "{mesh.broker_url}"', text),
            )
        )
        assert home.load_config().broker == mesh.broker_url
        assert home.load_config().coordinator == mesh.api_url
        # The broker's config and ACL, written by fnmesh for this fleet.
        broker = cli_json(
            home, "broker", "config", "-o", str(mesh.broker_dir), "--port", str(mesh.broker_port)
        )
        assert Path(broker["acl"]) == mesh.acl_file and broker["devices_with_grants"] == 0
        # The processes come up while the model is trained and the bundle built.
        launch(mesh, NODES, broker_conf=Path(broker["config"]))

        models = base / "models"
        built = subprocess.run(
            [str(PYTHON), "-m", "fnmesh.functions.examples.build", str(models), "--only", "digits"],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert built.returncode == 0, built.stderr
        assert built.stdout.startswith("examples/digits 1.0.0 "), built.stdout
        fnb = base / "digits-1.0.0.fnb"
        out = cli_json(
            home,
            "bundle",
            "build",
            str(models / "digits.onnx"),
            "--name",
            DIGITS,
            "--version",
            "1.0.0",
            "--publisher",
            "examples",
            "-o",
            str(fnb),
        )
        assert out["recipients"] == ["coordinator.main"]
        asyncio.run(mesh.wait_ready())
        pushed = cli_json(home, "push", str(fnb), "--as", "publisher.examples")
        assert (pushed["function"], pushed["version"], pushed["digest"]) == (
            DIGITS,
            "1.0.0",
            out["digest"],
        )
        deployed = cli_json(home, "deploy", f"{DIGITS}@1.0.0", "--timeout", str(WAIT))
        assert deployed["function"] == DIGITS and deployed["ready"], deployed
        # min 1, max 2, two nodes that fit: both serve it.
        asyncio.run(mesh.wait_serving(DIGITS, "1.0.0", 2))
        # Devices invoke what they are granted, on the broker as over HTTP.
        granted = cli_json(home, "grant", "device.d1", DIGITS)
        assert granted["added"] is True, granted
        asyncio.run(first_answer(mesh, "d1"))
        yield mesh
    finally:
        mesh.stop()
    assert not mesh.hung, "\n".join(mesh.hung)


async def first_answer(mesh: LocalMesh, device: str) -> None:
    """Once the broker took the device's grant, a request of its gets the right answer."""
    inputs, want = digits_rows(1)
    async with MeshDevice(mesh, device) as dev:
        reply = await dev.wait_granted(DIGITS, inputs)
    assert isinstance(reply, Response), reply
    assert reply.outputs["label"].tolist() == want["label"].tolist()


async def ensure_digits(mesh: LocalMesh) -> None:
    """Digits 1.0.0 deployed (min 1, max 2) and served by both nodes."""
    deployments = {d["function"] for d in await mesh.api("GET", "/v1/deployments")}
    if DIGITS not in deployments:
        await mesh.deploy(DIGITS, "1.0.0", min=1, max=2)
    await mesh.wait_serving(DIGITS, "1.0.0", len(NODES))


# -- 1. a new user's first invocations ---------------------------------------------------------


async def test_new_user_invokes_digits_over_mqtt_and_http(cli_mesh: LocalMesh) -> None:
    mesh = cli_mesh
    inputs, want = digits_rows(100)
    # 100 images, each a request of its own, through the router.
    async with MeshDevice(mesh, "d1") as dev:
        replies = await dev.call_rows(DIGITS, inputs)
        np.testing.assert_array_equal(labels_of(replies), want["label"])
        probs = np.concatenate([r.outputs["probabilities"] for r in replies])  # type: ignore[union-attr]
        np.testing.assert_allclose(probs, want["probabilities"], rtol=1e-4, atol=1e-5)
        assert {r.version for r in replies} == {"1.0.0"}  # type: ignore[union-attr]
        assert {r.node for r in replies} <= set(NODES)  # type: ignore[union-attr]
        assert all(len(s.answers) == 1 for s in dev.sent.values())

    # Debian's mosquitto_rr, as the device d1: MQTT 5 request/response, JSON payload.
    ident = mesh.home.identity_dir("device.d1")
    root = mesh.root
    for i in range(3):
        rr = await asyncio.to_thread(
            subprocess.run,
            [
                "mosquitto_rr",
                "-h",
                "127.0.0.1",
                "-p",
                str(mesh.broker_port),
                "--cafile",
                str(ident / "ca.pem"),
                "--cert",
                str(ident / "cert.pem"),
                "--key",
                str(ident / "key.pem"),
                "-q",
                "1",
                "-t",
                f"{root}/fn/{DIGITS}/invoke",
                "-e",
                f"{root}/replies/d1/rr-{i}",
                "-W",
                "10",
                "-m",
                json_request(inputs["image"][i], f"rr-{i}"),
            ],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert rr.returncode == 0, rr.stderr
        reply = json.loads(rr.stdout)
        assert reply["id"] == f"rr-{i}" and reply["version"] == "1.0.0"
        assert json_label(reply) == want["label"][i]

    # HTTP: the CLI, then a plain aiohttp POST to the coordinator as the device.
    cli_reply = await asyncio.to_thread(
        cli_json,
        mesh.home,
        "invoke",
        DIGITS,
        "--input",
        json.dumps(json.loads(json_request(inputs["image"][3], "x"))["inputs"]),
    )
    assert json_label(cli_reply) == want["label"][3]
    for i in range(4, 7):
        status, body, ctype = await mesh.api(
            "POST",
            f"/v1/functions/{DIGITS}/invoke",
            identity="device.d1",
            data=json_request(inputs["image"][i], f"http-{i}").encode(),
            headers={"Content-Type": "application/json"},
            raw=True,
        )
        assert status == 200 and ctype.startswith("application/json"), body
        reply = json.loads(body)
        assert reply["id"] == f"http-{i}"
        assert json_label(reply) == want["label"][i]


# -- 7. the CLI's --json says what the REST API says ------------------------------------------------


async def test_cli_json_agrees_with_rest(cli_mesh: LocalMesh) -> None:
    mesh = cli_mesh
    await ensure_digits(mesh)
    for verb, path in (("functions", "/v1/functions"), ("placements", "/v1/placements")):
        got = await asyncio.to_thread(cli_json, mesh.home, verb)
        assert got == await mesh.api("GET", path), verb
    assert {p["node"] for p in got if p["function"] == DIGITS} == set(NODES)
    nodes = await asyncio.to_thread(cli_json, mesh.home, "nodes")
    rest = await mesh.api("GET", "/v1/nodes")
    assert comparable_nodes(nodes) == comparable_nodes(rest)
    assert {n["name"]: n["state"] for n in nodes} == dict.fromkeys(NODES, "ready")
    assert all(n["functions"].get(DIGITS) == "1.0.0" for n in nodes)
    assert {n["name"]: n["labels"] for n in nodes} == NODES


# -- 3. bad pushes: refused with a reason, nothing half-stored -------------------------------------


def blob_listing(mesh: LocalMesh) -> list[str]:
    root = mesh.home.root / "coordinator" / "blobs"
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


async def store_problems(mesh: LocalMesh) -> list[str]:
    state = mesh.home.root / "coordinator"
    store = await Store.open(sqlite_url(state / "coordinator.db"))
    try:
        return await store.check(BlobStore(state / "blobs"))
    finally:
        await store.close()


def strip_signatures(data: bytes) -> bytes:
    """The bundle with its signatures section cut out altogether."""
    b = Bundle.parse(data)
    whole = b.to_bytes()
    start = 8 + 4 + len(b.manifest_bytes)
    end = start + 4 + len(b.signatures_bytes)
    return whole[:start] + whole[end:]


def flip(data: bytes, at: int) -> bytes:
    out = bytearray(data)
    out[at] ^= 0x01
    return bytes(out)


async def test_bad_pushes_refused_and_nothing_half_stored(
    cli_mesh: LocalMesh, tmp_path: Path
) -> None:
    mesh = cli_mesh
    home = mesh.home
    ca = FleetCA.load(home)
    ca.issue(Role.PUBLISHER, "other", namespace="other")
    ca.issue(Role.PUBLISHER, "rogue", namespace="examples")
    elsewhere = foreign_fleet(tmp_path / "elsewhere")

    # A higher version first, so that an older one has something to be older than.
    good = build_bundle(home, version="1.1.0")
    assert (await mesh.push(good))["version"] == "1.1.0"

    fresh = build_bundle(home, version="1.2.0")
    rogue = build_bundle(home, version="1.3.0", publisher="publisher.rogue")
    ca.revoke("publisher.rogue")
    ct_last = len(fresh) - 1  # the file ends with the ciphertext
    cases: list[tuple[str, bytes, str, int, str]] = [
        ("signatures stripped", strip_signatures(fresh), "publisher.examples", 400, "section"),
        (
            "no signature",
            dataclasses.replace(
                Bundle.parse(fresh), signatures_bytes=b'{"signatures":[]}'
            ).to_bytes(),
            "publisher.examples",
            400,
            "unsigned",
        ),
        (
            "signed by another fleet's CA",
            build_bundle(home, version="1.2.0", ca_home=elsewhere),
            "publisher.examples",
            400,
            "not the fleet CA",
        ),
        ("pushed by a publisher of another namespace", fresh, "publisher.other", 403, "namespace"),
        (
            "bundle of another namespace",
            build_bundle(home, version="1.0.0", publisher="publisher.other", name="other/digits"),
            "publisher.examples",
            403,
            "namespace",
        ),
        ("ciphertext byte flipped", flip(fresh, ct_last), "publisher.examples", 400, "digest"),
        ("manifest byte flipped", flip(fresh, 8 + 4 + 20), "publisher.examples", 400, "manifest"),
        (
            "manifest edited, still valid JSON",
            fresh.replace(b'"version":"1.2.0"', b'"version":"1.2.1"', 1),
            "publisher.examples",
            400,
            "signature",
        ),
        ("signed by a revoked publisher", rogue, "operator.admin", 400, "revoked"),
        ("pushed by a revoked publisher", fresh, "publisher.rogue", 401, "revoked"),
        (
            "same version, other content",
            build_bundle(home, version="1.0.0"),
            "publisher.examples",
            409,
            "different content",
        ),
        (
            "older than the highest",
            build_bundle(home, version="0.9.0"),
            "operator.admin",
            409,
            "older",
        ),
    ]

    functions = await mesh.api("GET", "/v1/functions")
    blobs = blob_listing(mesh)
    assert await store_problems(mesh) == []
    assert [f["versions"] for f in functions if f["function"] == DIGITS] == [["1.0.0", "1.1.0"]]
    for what, data, who, status, reason in cases:
        with pytest.raises(ApiError) as err:
            await mesh.push(data, identity=who)
        assert err.value.status == status, f"{what}: {err.value}"
        assert reason.lower() in str(err.value).lower(), f"{what}: {err.value}"
        assert len(str(err.value)) > len(f"{status}: ") + 5, f"{what}: no reason given"
        assert await mesh.api("GET", "/v1/functions") == functions, what
        assert blob_listing(mesh) == blobs, what
        assert await store_problems(mesh) == [], what
    # The same bytes again are fine (idempotent), and store nothing new.
    assert (await mesh.push(good))["version"] == "1.1.0"
    assert blob_listing(mesh) == blobs


# -- 2. the coordinator restarts; routing never notices ---------------------------------------------


async def snapshot(mesh: LocalMesh) -> dict[str, Any]:
    return {
        "functions": await mesh.api("GET", "/v1/functions"),
        "deployments": await mesh.api("GET", "/v1/deployments"),
        "placements": await mesh.api("GET", "/v1/placements"),
        "nodes": comparable_nodes(await mesh.api("GET", "/v1/nodes")),
    }


async def keep_invoking(
    dev: MeshDevice, inputs: dict[str, np.ndarray], want: np.ndarray, log: list[tuple[float, bool]]
) -> None:
    """One request after another until cancelled; each answer is checked as it comes."""
    i = 0
    while True:
        k = i % len(want)
        s = dev.send(DIGITS, {"image": inputs["image"][k : k + 1]})
        reply = await dev.answer(s, WAIT)
        ok = isinstance(reply, Response) and int(reply.outputs["label"][0]) == int(want[k])
        assert ok, f"request {i} got {reply}"
        log.append((s.at, ok))
        i += 1
        await asyncio.sleep(0.01)  # pacing, not waiting: a steady trickle of requests


async def test_coordinator_restart_changes_nothing(cli_mesh: LocalMesh) -> None:
    mesh = cli_mesh
    await ensure_digits(mesh)
    inputs, want = digits_rows(50, seed=3)
    cancer = build_bundle(mesh.home, "cancer")
    log: list[tuple[float, bool]] = []
    async with (
        MeshDevice(mesh, "d1") as dev,
        running(keep_invoking(dev, inputs, want["label"], log)) as sender,
    ):
        for sig, change in ((signal.SIGTERM, "deploy"), (signal.SIGKILL, "undeploy")):
            before = await snapshot(mesh)
            async with ControlWatcher(mesh, NODES) as watch:
                gens = generations(watch.latest("assign"))
                assert set(gens) == set(NODES) and None not in gens.values(), gens
                mark = len(watch.messages)
                rc = mesh.signal("coordinator", sig)
                assert rc == (0 if sig == signal.SIGTERM else -signal.SIGKILL), rc
                down_at = time.monotonic()
                # Requests are still answered while no coordinator runs.
                want_n = len(log) + 20
                await mesh.wait_until(
                    "answers with the coordinator down",
                    now(lambda: len(log) >= want_n),  # noqa: B023 - used at once
                    every=0.02,
                )
                assert not sender.done()
                mesh.start_coordinator()
                await mesh.wait_ready(list(NODES))
                assert any(t >= down_at for t, _ in log)
                after = await snapshot(mesh)
                for key in before:
                    assert after[key] == before[key], (
                        f"{key} after {sig!r}:\n{after[key]}\n!=\n{before[key]}\n{mesh.tails()}"
                    )
                # Something that must change exactly one node, the last in the reconciler's
                # order: its new assignment is then the first and only one published since the
                # restart began, and its generation follows the highest before.
                if change == "deploy":
                    assert (await mesh.push(cancer))["version"] == "1.0.0"
                    await mesh.deploy(CANCER, "1.0.0", min=1, max=1, where={"site": "lyon-1"})
                else:
                    await mesh.api("DELETE", f"/v1/deployments/{CANCER}")
                _, _, body = await watch.wait_for(
                    "a new assignment for lyon-1",
                    lambda n, k, b: k == "assign" and n == "lyon-1",
                    since=mark,
                )
                assert body is not None
                assert watch.since(mark, "assign") == [("lyon-1", body)]
                assert body["generation"] == max(g for g in gens.values() if g) + 1
                fns = {f["function"] for f in body["functions"]}
                assert fns == ({DIGITS, CANCER} if change == "deploy" else {DIGITS})
                assert generations(watch.latest("assign"))["cloud-1"] == gens["cloud-1"]
                # Settled before the next round's snapshot: lyon-1 serves what it was given.
                want_fns = {DIGITS: "1.0.0"} | ({CANCER: "1.0.0"} if change == "deploy" else {})
                await mesh.wait_until(
                    f"lyon-1 serving {sorted(want_fns)}", serving_exactly(mesh, "lyon-1", want_fns)
                )
        assert not sender.done(), sender
    assert len(log) > 40 and all(ok for _, ok in log)
    assert all(len(s.answers) <= 1 for s in dev.sent.values())


def serving_exactly(
    mesh: LocalMesh, node: str, functions: dict[str, str]
) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        v = (await mesh.nodes()).get(node)
        return v is not None and v["state"] == "ready" and v["functions"] == functions

    return check


# -- 5. undeploy ---------------------------------------------------------------------------------


async def test_undeploy_stops_serving_everywhere(cli_mesh: LocalMesh) -> None:
    mesh = cli_mesh
    await ensure_digits(mesh)
    out = await asyncio.to_thread(cli_json, mesh.home, "undeploy", DIGITS)
    assert out == {"function": DIGITS, "deployed": False}

    async def gone() -> bool:
        nodes = await mesh.nodes()
        return all(
            v["state"] == "ready" and DIGITS not in v["functions"] for v in nodes.values()
        ) and set(nodes) == set(NODES)

    await mesh.wait_until("digits gone from every node's status", gone)
    assert [p for p in await mesh.api("GET", "/v1/placements") if p["function"] == DIGITS] == []
    assert [
        f["deployed"] for f in await mesh.api("GET", "/v1/functions") if f["function"] == DIGITS
    ] == [None]
    inputs, _ = digits_rows(20)
    async with ControlWatcher(mesh, NODES) as watch:
        for node, status in watch.latest("status").items():
            assert status is not None and DIGITS not in status["functions"], node
        for node, assign in watch.latest("assign").items():
            assert assign is not None
            assert DIGITS not in {f["function"] for f in assign["functions"]}, node
    async with MeshDevice(mesh, "d1") as dev:
        replies = await asyncio.gather(
            *(dev.call(DIGITS, {"image": inputs["image"][i : i + 1]}) for i in range(20))
        )
        for r in replies:
            assert isinstance(r, ErrorReply), r
            assert r.code in (ErrorCode.NOT_FOUND, ErrorCode.SATURATED), r
            assert DIGITS in r.message or "examples" in r.message, r
        # One more round trip through the router, then nothing else may have arrived.
        last = await dev.call(DIGITS, {"image": inputs["image"][:1]})
        assert isinstance(last, ErrorReply)
        assert [len(s.answers) for s in dev.sent.values()] == [1] * 21
        assert dev.stray == []


# == 4. a node dies ===============================================================================


async def test_node_killed_function_moves_within_seconds(tmp_path: Path) -> None:
    agents = {
        "lyon-1": {"region": "eu-west", "site": "lyon-1", "tier": "edge"},
        "paris-1": {"region": "eu-west", "site": "paris-1", "tier": "edge"},
    }
    offline_timeout = 6.0
    home = make_home(tmp_path / "home", list(agents))
    async with local_mesh(home, agents, heartbeat=0.5, offline_timeout=offline_timeout) as mesh:
        await mesh.push(build_bundle(home))
        await mesh.deploy(DIGITS, "1.0.0", min=1, max=1)
        await mesh.grant("device.d1", DIGITS)
        (holder,) = await mesh.wait_serving(DIGITS, "1.0.0", 1)
        (other,) = set(agents) - {holder}
        inputs, want = digits_rows(100, seed=5)
        labels = want["label"]

        async with MeshDevice(mesh, "d1") as dev:
            assert isinstance(
                await dev.wait_granted(DIGITS, {"image": inputs["image"][:1]}), Response
            )
            np.testing.assert_array_equal(labels_of(await dev.call_rows(DIGITS, inputs)), labels)
            sent: list[tuple[int, Any]] = []

            async def trickle() -> None:
                i = 0
                while True:
                    k = i % len(labels)
                    sent.append((k, dev.send(DIGITS, {"image": inputs["image"][k : k + 1]})))
                    i += 1
                    await asyncio.sleep(0.02)  # pacing: a request every 20 ms

            def correct(k: int, s: Any) -> bool:
                return any(
                    isinstance(r, Response) and int(r.outputs["label"][0]) == int(labels[k])
                    for r in s.answers
                )

            async with running(trickle()):
                n0 = len(sent)
                await mesh.wait_until(
                    "answers before the kill",
                    now(lambda: any(correct(k, s) for k, s in sent[n0:])),
                )
                killed_at = time.monotonic()
                assert mesh.signal(f"agent {holder}", signal.SIGKILL) == -signal.SIGKILL
                n_kill = len(sent)

                # A replica is added elsewhere; the dead node keeps its placement for now.
                async def both_placed() -> bool:
                    placed = {p["node"] for p in await mesh.api("GET", "/v1/placements")}
                    return placed == {holder, other}

                await mesh.wait_until("a second placement", both_placed)

                async def recovered() -> float | None:
                    times = [
                        s.answered_at
                        for k, s in sent[n_kill:]
                        if s.answered_at is not None and correct(k, s)
                    ]
                    return min(times) if times else None

                back_at = await mesh.wait_until(
                    "a correct answer after the kill", recovered, every=0.01
                )
                n_back = len(sent)
                # Keep the trickle going for a while after the recovery.
                await mesh.wait_until(
                    "25 requests sent after the recovery",
                    now(lambda: sum(1 for _, s in sent[n_back:] if s.answers) >= 25),
                )
            recovery = back_at - killed_at
            print(f"\nrecovery after kill -9 of {holder}: {recovery:.2f} s")
            assert recovery < 10.0, recovery
            # Every request sent once answers came back got exactly one correct answer.
            after = [(k, s) for k, s in sent[n_kill:] if s.at >= back_at]
            assert after, "no request was sent after the recovery"
            for _, s in after:
                await dev.answer(s, WAIT)
            # A last round trip through the same node: a second answer would be there by now.
            assert isinstance(await dev.call(DIGITS, {"image": inputs["image"][:1]}), Response)
            assert all(len(s.answers) == 1 and correct(k, s) for k, s in after)
            assert all(len(s.answers) <= 1 for _, s in sent), "a request was answered twice"
            gap = [s.answers[0] if s.answers else None for _, s in sent[n_kill:n_back]]
            kinds = Counter(
                "unanswered" if r is None else "ok" if isinstance(r, Response) else r.code.value
                for r in gap
            )
            print(f"requests sent in the gap: {dict(kinds)}")

            nodes = await mesh.nodes()
            assert nodes[holder]["state"] == "offline" and nodes[other]["state"] == "ready"
            assert nodes[other]["functions"] == {DIGITS: "1.0.0"}
            replies = await dev.call_rows(DIGITS, {"image": inputs["image"][:50]})
            np.testing.assert_array_equal(labels_of(replies), labels[:50])
            assert {r.node for r in replies} == {other}  # type: ignore[union-attr]

            # The dead node's placement goes once the offline timeout has passed, not before.
            async def dropped() -> bool:
                return {p["node"] for p in await mesh.api("GET", "/v1/placements")} == {other}

            await mesh.wait_until("the dead node's placement dropped", dropped, every=0.1)
            assert time.monotonic() - killed_at >= offline_timeout
        mesh.check_alive()


# == 6. fnmesh up --demo =============================================================================


def test_up_demo_runs_and_leaves_nothing_behind(tmp_path: Path) -> None:
    home = tmp_path / "up-home"
    proc = subprocess.Popen(
        [str(FNMESH), "up", "--demo", "--home", str(home), "--agents", "3"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        env=clean_env(),
    )
    children: dict[int, float] = {}
    try:
        me = psutil.Process(proc.pid)
        end = time.monotonic() + 120
        while proc.poll() is None:
            assert time.monotonic() < end, "fnmesh up --demo did not finish in 120 s"
            try:
                for c in me.children(recursive=True):
                    children.setdefault(c.pid, c.create_time())
            except psutil.NoSuchProcess:
                break
            time.sleep(0.1)  # polling another process's children: nothing to wait on
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    text = out.decode()
    assert proc.returncode == 0, f"exit {proc.returncode}\n{text}\n{err.decode()[-3000:]}"
    results = re.findall(
        r"^(examples/\w+): \[([\d, ]+)\] \(expected \[([\d, ]+)\]\) from ([\w-]+) in [\d.]+ ms$",
        text,
        re.M,
    )
    assert len(results) == 4, text
    assert {r[0] for r in results} == {
        "examples/digits",
        "examples/cancer",
        "examples/anomaly",
        "examples/mlp",
    }
    assert all(got == expected for _, got, expected, _ in results), text
    assert {r[3] for r in results} <= {"lyon-1", "paris-1", "cloud-1"}
    # Mosquitto, the coordinator, the router and three agents ran as its children...
    assert len(children) >= 6, children
    # ...and none of them outlived it.
    alive = []
    for pid, created in children.items():
        try:
            p = psutil.Process(pid)
            if p.create_time() == created and p.status() != psutil.STATUS_ZOMBIE:
                alive.append((pid, p.cmdline()))
        except psutil.NoSuchProcess:
            pass
    assert alive == [], alive
    conf = str(home / "broker" / "mosquitto.conf")
    leftovers = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        cmd = p.info["cmdline"] or []
        if any(conf in a or str(home) in a for a in cmd):
            leftovers.append((p.info["pid"], cmd))
    assert leftovers == [], leftovers
