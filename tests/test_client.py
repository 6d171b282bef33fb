"""The invoking client (``fnmesh.functions.client``), sync and async, against a real agent and a
real router (in this process) over real Mosquitto with mutual TLS: answers equal the examples'
references over MQTT 5 and 3.1.1; error answers raise InvokeError with their code; a request whose
first answer is lost, or whose agent stalls before it, is retried with the SAME id and answered
from the first execution, and the client returns one answer and drops the late duplicate; no
thread outlives a client.

The sync client blocks its caller, so it runs in a worker thread here (the agent and the router
live on the test's event loop)."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import numpy as np
import pytest
from agent_support import (
    NODE,
    WAIT,
    assert_same_outputs,
    build_bundle,
    fid,
    metric,
    new_root,
    ort_run,
    running_agent,
)
from conftest import Broker, Fleet

from fnmesh.agent.inbox import Inbox, MqttSink
from fnmesh.agent.main import Agent
from fnmesh.certs.identity import Role
from fnmesh.certs.tls import client_context
from fnmesh.coordinator.bench.mesh import reference_mismatch
from fnmesh.coordinator.broker import free_port
from fnmesh.coordinator.router import Router, RouterConfig
from fnmesh.functions.client import (
    AsyncMeshClient,
    Backoff,
    ConnectError,
    InvokeError,
    InvokeTimeout,
    MeshClient,
)
from fnmesh.functions.examples.models import build_example
from fnmesh.functions.messages import Encoding, ErrorCode

DIGITS = fid("digits")
CANCER = fid("cancer")
FAST = Backoff(base_s=0.01, max_s=0.05)


# -- the mesh under the client -------------------------------------------------------------------


@contextlib.asynccontextmanager
async def mesh(
    fleet: Fleet, broker: Broker, examples: tuple[str, ...] = ("digits", "cancer")
) -> AsyncIterator[tuple[Agent, str]]:
    """An agent serving ``examples`` and a router, on this loop; yields the agent and the root."""
    root = new_root()
    if not fleet.home.identity_dir("router.r1").exists():
        fleet.ca.issue(Role.ROUTER, "r1")
    router = Router(
        RouterConfig(home=fleet.home.root, broker=broker.tls_url, name="r1", topic_root=root)
    )
    async with running_agent(fleet, broker, root, [build_bundle(fleet, e) for e in examples]) as a:
        try:
            await router.async_start()
            want = {fid(e) for e in examples}
            await router.async_wait_until(
                lambda: all(router.table.live_replicas(f, time.monotonic()) for f in want),
                WAIT,
            )
            yield a, root
        finally:
            await router.async_stop()


def client_kw(fleet: Fleet, root: str, device: str = "meter-1", **kw: Any) -> dict[str, Any]:
    ident = fleet.device(device)
    return {
        "client_id": f"{ident.cn}-{uuid.uuid4().hex[:6]}",
        "tls": client_context(ident, fleet.home.ca_cert),
        "root": root,
        "device_name": device,
        **kw,
    }


def batches(agent: Agent, function: str = DIGITS) -> float:
    """How many batches of ``function`` the agent has run."""
    return metric(agent, "fnmesh_agent_batch_rows_count", function=function)


def paho_threads(client: MeshClient | AsyncMeshClient) -> list[threading.Thread]:
    t = client._link.thread
    return [t] if t is not None and t.is_alive() else []


def check(name: str, inputs: dict[str, np.ndarray], outputs: dict[str, np.ndarray]) -> None:
    """Equal to the sklearn reference (labels exactly) and to ONNX Runtime's own run."""
    why = reference_mismatch(name, inputs, outputs)
    assert why is None, f"{name}: {why}"
    assert_same_outputs(outputs, ort_run(name, inputs), name)


# -- answers -----------------------------------------------------------------------------------


@pytest.mark.parametrize("protocol", [5, 311])
@pytest.mark.parametrize("encoding", [Encoding.MSGPACK, Encoding.JSON], ids=str)
async def test_sync_client_answers_equal_the_reference(
    fleet: Fleet, broker: Broker, protocol: int, encoding: Encoding
) -> None:
    digits = build_example("digits").sample_inputs(5, seed=1)
    cancer = build_example("cancer").sample_inputs(3, seed=2)
    async with mesh(fleet, broker) as (_agent, root):
        kw = client_kw(fleet, root, protocol=protocol)

        def device() -> tuple[Any, ...]:
            with MeshClient(broker.tls_url, **kw) as c:
                a = c.invoke(DIGITS, digits, id="d-1", encoding=encoding)
                b = c.invoke(CANCER, cancer, encoding=encoding, deadline_ms=5000)
            return a, b, c.stats, paho_threads(c)

        a, b, stats, threads = await asyncio.to_thread(device)
    assert a.id == "d-1" and a.node == NODE and a.version == "1.0.0"
    assert len(b.id) == 32 and b.node == NODE
    check("digits", digits, a.outputs)
    check("cancer", cancer, b.outputs)
    assert (stats.sent, stats.retries, stats.answered, stats.duplicates) == (2, 0, 2, 0)
    assert threads == [], "the network thread outlived the client"


@pytest.mark.parametrize("protocol", [5, 311])
async def test_async_client_answers_many_at_once(
    fleet: Fleet, broker: Broker, protocol: int
) -> None:
    digits = build_example("digits").sample_inputs(24, seed=3)
    cancer = build_example("cancer").sample_inputs(24, seed=4)
    async with mesh(fleet, broker) as (_agent, root):
        async with AsyncMeshClient(
            broker.tls_url, **client_kw(fleet, root, protocol=protocol)
        ) as c:
            calls = []
            for i in range(24):
                enc = Encoding.JSON if i % 3 == 0 else Encoding.MSGPACK
                calls.append(c.invoke(DIGITS, {"image": digits["image"][i : i + 1]}, encoding=enc))
                calls.append(c.invoke(CANCER, {"features": cancer["features"][i : i + 1]}))
            got = await asyncio.gather(*calls)
            stats = c.stats
        assert paho_threads(c) == []
    labels_d = np.concatenate([r.outputs["label"] for r in got[0::2]])
    labels_c = np.concatenate([r.outputs["label"] for r in got[1::2]])
    np.testing.assert_array_equal(labels_d, build_example("digits").reference(digits)["label"])
    np.testing.assert_array_equal(labels_c, build_example("cancer").reference(cancer)["label"])
    assert len({r.id for r in got}) == 48
    assert (stats.sent, stats.answered, stats.retries, stats.duplicates) == (48, 48, 0, 0)


# -- errors ------------------------------------------------------------------------------------


async def test_error_answers_raise_invoke_error_with_their_code(
    fleet: Fleet, broker: Broker
) -> None:
    x = build_example("digits").sample_inputs(2, seed=5)
    async with (
        mesh(fleet, broker) as (agent, root),
        AsyncMeshClient(
            broker.tls_url, **client_kw(fleet, root, retries=2, backoff=FAST, timeout_s=WAIT)
        ) as c,
    ):
        # The wrong dtype: bad_request, naming the input; never retried.
        with pytest.raises(InvokeError) as e:
            await c.invoke(DIGITS, {"image": x["image"].astype(np.float64)}, id="bad-1")
        assert e.value.code is ErrorCode.BAD_REQUEST and e.value.id == "bad-1"
        assert "'image'" in e.value.message and "float32" in e.value.message
        # No such function: the router answers not_found.
        with pytest.raises(InvokeError) as e:
            await c.invoke("examples/nothing", x)
        assert e.value.code is ErrorCode.NOT_FOUND
        # An expired deadline: the mesh's own timeout answer, not the client's.
        with pytest.raises(InvokeError) as e:
            await c.invoke(DIGITS, x, deadline_ms=0)
        assert e.value.code is ErrorCode.TIMEOUT and not isinstance(e.value, InvokeTimeout)
        assert c.stats.retries == 0 and c.stats.sent == 3

        # saturated is retried with backoff (same id), then raised.
        agent.service.stop_accepting()
        before = c.stats.sent
        with pytest.raises(InvokeError) as e:
            await c.invoke(DIGITS, x, id="sat-1")
        assert e.value.code is ErrorCode.SATURATED and e.value.id == "sat-1"
        assert c.stats.sent - before == 3 and c.stats.retries == 2

        # ... and a retry that finds the node accepting again gets the answer.
        def resume(rid: str, attempt: int, reason: str) -> None:
            assert (rid, attempt, reason) == ("sat-2", 1, "saturated")
            agent.service._accepting = True  # no public way back: a test-only undo

        kw = client_kw(fleet, root, retries=2, backoff=FAST, timeout_s=WAIT, on_retry=resume)
        async with AsyncMeshClient(broker.tls_url, **kw) as c2:
            r = await c2.invoke(DIGITS, x, id="sat-2")
        assert r.id == "sat-2" and c2.stats.retries == 1
        check("digits", x, r.outputs)

        # The sync client raises the same way.
        def sync_bad() -> InvokeError:
            with MeshClient(broker.tls_url, **client_kw(fleet, root)) as s:
                try:
                    s.invoke(DIGITS, {"image": x["image"][:, :10]})
                except InvokeError as err:
                    return err
            raise AssertionError("no error")

        err = await asyncio.to_thread(sync_bad)
        assert err.code is ErrorCode.BAD_REQUEST and "dimension 1 must be 64" in err.message


# -- retries with the same id ------------------------------------------------------------------------


@pytest.fixture
def lose_first_answer(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The agent's first answer on each reply topic is lost on the way out (it was computed and
    stored all the same). Returns the topics whose answer was dropped."""
    dropped: list[str] = []
    original = MqttSink.send_encoded

    def send_encoded(self: MqttSink, payload: bytes, encoding: Encoding) -> None:
        if self.topic not in dropped:
            assert self.topic is not None
            dropped.append(self.topic)
            return
        original(self, payload, encoding)

    monkeypatch.setattr(MqttSink, "send_encoded", send_encoded)
    return dropped


@pytest.mark.parametrize("protocol", [5, 311])
@pytest.mark.parametrize("flavour", ["sync", "async"])
async def test_lost_answer_is_retried_with_the_same_id_and_replayed(
    fleet: Fleet, broker: Broker, lose_first_answer: list[str], protocol: int, flavour: str
) -> None:
    x = build_example("digits").sample_inputs(3, seed=6)
    retried: list[tuple[str, int, str]] = []
    async with mesh(fleet, broker, ("digits",)) as (agent, root):
        kw = client_kw(
            fleet,
            root,
            protocol=protocol,
            timeout_s=1.0,
            retries=3,
            on_retry=lambda *a: retried.append(a),
        )
        if flavour == "sync":

            def device() -> Any:
                with MeshClient(broker.tls_url, **kw) as c:
                    return c.invoke(DIGITS, x, id="once-1"), c.stats, c.reply_topic

            r, stats, topic = await asyncio.to_thread(device)
        else:
            async with AsyncMeshClient(broker.tls_url, **kw) as ac:
                r, stats, topic = await ac.invoke(DIGITS, x, id="once-1"), ac.stats, ac.reply_topic
        assert lose_first_answer == [topic], "the first answer was not the one lost"
        assert r.id == "once-1"
        check("digits", x, r.outputs)
        assert retried == [("once-1", 1, "timeout")]
        assert (stats.sent, stats.retries, stats.answered) == (2, 1, 1)
        # One execution: the retry was answered from the stored first answer.
        assert batches(agent) == 1
        assert agent.service.dedup is not None and agent.service.dedup.replayed == 1
        assert metric(agent, "fnmesh_agent_duplicates_total") == 1


async def test_agent_stalled_before_the_first_send_runs_it_once(
    fleet: Fleet, broker: Broker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The agent takes no message until the client has timed out and is about to retry; then it
    gets the first attempt and the retry. It runs the function once, answers both; the client
    returns one answer and drops the late duplicate."""
    held: list[tuple[Inbox, Any]] = []
    paused = [True]
    original = Inbox._on_message

    def on_message(self: Inbox, msg: Any) -> None:
        if paused[0]:
            held.append((self, msg))
        else:
            original(self, msg)

    def resume(*_: Any) -> None:
        paused[0] = False
        for inbox, msg in held:
            original(inbox, msg)

    monkeypatch.setattr(Inbox, "_on_message", on_message)
    x = build_example("digits").sample_inputs(2, seed=8)
    async with (
        mesh(fleet, broker, ("digits",)) as (agent, root),
        AsyncMeshClient(
            broker.tls_url, **client_kw(fleet, root, timeout_s=1.0, retries=3, on_retry=resume)
        ) as c,
    ):
        r = await c.invoke(DIGITS, x, id="stall-1")
        assert len(held) == 1, "the first attempt should have been held"
        assert r.id == "stall-1"
        check("digits", x, r.outputs)
        # A later request's answer comes after the duplicate: by then it has been dropped.
        await c.invoke(DIGITS, x, id="fence")
        assert (c.stats.sent, c.stats.retries, c.stats.answered) == (3, 1, 2)
        assert c.stats.duplicates == 1 and c.stats.strays == 0
        assert batches(agent) == 2  # stall-1 once, the fence once
        dedup = agent.service.dedup
        assert dedup is not None and dedup.joined + dedup.replayed == 1


async def test_no_answer_at_all_raises_invoke_timeout_after_every_attempt(
    fleet: Fleet, broker: Broker
) -> None:
    # A root nobody serves: every attempt goes unanswered.
    attempts: list[int] = []
    kw = client_kw(
        fleet, new_root(), timeout_s=0.2, retries=2, on_retry=lambda _i, n, _r: attempts.append(n)
    )
    async with AsyncMeshClient(broker.tls_url, **kw) as c:
        with pytest.raises(InvokeTimeout) as e:
            await c.invoke(DIGITS, build_example("digits").sample_inputs(1), id="void")
    assert e.value.code is ErrorCode.TIMEOUT and e.value.attempts == 3 and e.value.id == "void"
    assert attempts == [1, 2] and c.stats.sent == 3


# -- life cycle -------------------------------------------------------------------------------------


async def test_clients_close_cleanly_and_leave_no_thread(fleet: Fleet, broker: Broker) -> None:
    before = set(threading.enumerate())
    x = build_example("digits").sample_inputs(1)
    root = new_root()  # nobody answers there: invokes wait until closed

    def sync_side() -> tuple[BaseException | None, bool]:
        c = MeshClient(broker.tls_url, **client_kw(fleet, root, timeout_s=WAIT))
        # An exception inside the block still closes the client.
        with contextlib.suppress(RuntimeError), c:
            assert paho_threads(c)
            raise RuntimeError("boom")
        alive = bool(paho_threads(c))
        # Closing under a waiting invoke wakes it with ConnectError.
        c2 = MeshClient(broker.tls_url, **client_kw(fleet, root, timeout_s=WAIT)).connect()
        out: list[BaseException] = []
        started = threading.Event()

        def waiter() -> None:
            started.set()
            try:
                c2.invoke(DIGITS, x)
            except BaseException as e:
                out.append(e)

        t = threading.Thread(target=waiter)
        t.start()
        started.wait(WAIT)
        # Whether the invoke is already waiting or not yet registered, it ends in ConnectError.
        c2.close()
        t.join(WAIT)
        return (out[0] if out else None), alive or bool(paho_threads(c2))

    err, alive = await asyncio.to_thread(sync_side)
    assert isinstance(err, ConnectError) and not alive

    ac = AsyncMeshClient(broker.tls_url, **client_kw(fleet, root, timeout_s=WAIT))
    async with ac:
        task = asyncio.ensure_future(ac.invoke(DIGITS, x))
        while ac.stats.sent == 0:
            await asyncio.sleep(0)
    with pytest.raises(ConnectError):
        await task
    assert paho_threads(ac) == []

    # Nothing listening: ConnectError in time, and no thread left behind.
    def unreachable() -> MeshClient:
        c = MeshClient(
            f"mqtts://127.0.0.1:{free_port()}", **client_kw(fleet, root, connect_timeout_s=1.0)
        )
        with pytest.raises(ConnectError, match="cannot connect"):
            c.connect()
        return c

    c3 = await asyncio.to_thread(unreachable)
    assert paho_threads(c3) == []
    leaked = [t for t in threading.enumerate() if t not in before and t.name.startswith("paho")]
    assert leaked == []
