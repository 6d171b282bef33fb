"""Dynamic batching and admission on a real agent: concurrent callers share batches but each
gets exactly its own rows; a lone request is never held back; a full queue or an impossible
deadline is answered ``saturated`` (or ``timeout``) at once, and nothing goes unanswered."""

from __future__ import annotations

import asyncio
from collections import Counter

import pytest
from agent_support import (
    Device,
    Reply,
    assert_same_outputs,
    build_bundle,
    metric,
    new_root,
    ort_run,
    rows,
    running_agent,
)
from conftest import SCALE, Broker, Fleet

from fnmesh.agent.main import Agent
from fnmesh.functions.examples.models import build_example
from fnmesh.functions.messages import Encoding, ErrorCode

MLP = build_example("mlp")
CALLERS = 64


def batches(agent: Agent, function: str) -> tuple[float, float, float]:
    """(executed batches, rows executed, batches of exactly one row) for ``function``."""
    name = "fnmesh_agent_batch_rows"
    return (
        metric(agent, f"{name}_count", function=function),
        metric(agent, f"{name}_sum", function=function),
        metric(agent, f"{name}_bucket", function=function, le="1.0"),
    )


async def test_concurrent_callers_share_batches_and_get_their_own_rows(
    fleet: Fleet, broker: Broker
) -> None:
    root = new_root()
    x = MLP.sample_inputs(CALLERS, seed=11)
    assert len({row.tobytes() for row in x["image"]}) == CALLERS, "inputs must be distinct"
    async with (
        running_agent(fleet, broker, root, [build_bundle(fleet, "mlp")]) as agent,
        Device(fleet, broker, root) as dev,
    ):
        # Callers alternate encodings: a batch mixes them, each answer keeps its own.
        enc = [Encoding.MSGPACK if i % 2 else Encoding.JSON for i in range(CALLERS)]
        sent = await asyncio.gather(
            *(
                dev.send("mlp", rows(x, i), id=f"caller-{i}", encoding=enc[i])
                for i in range(CALLERS)
            )
        )
        replies: list[Reply] = await asyncio.gather(*(dev.mail.get(t) for t, _ in sent))  # type: ignore[arg-type]
        for i, (r, (_, corr)) in enumerate(zip(replies, sent, strict=True)):
            assert r.correlation == corr
            assert r.content_type == enc[i].content_type
            ans = r.ok()
            assert ans.id == f"caller-{i}"
            assert_same_outputs(ans.outputs, ort_run("mlp", rows(x, i)), f"caller {i}")

        count, total, ones = batches(agent, "examples/mlp")
        assert total == CALLERS, "every row ran exactly once"
        assert count < CALLERS and ones < count, "no batch had more than one row"

        # Idle again: a lone request goes at once, in a batch of its own.
        lone = await dev.call("mlp", rows(x, 7), id="lone")
        assert_same_outputs(lone.ok().outputs, ort_run("mlp", rows(x, 7)), "lone")
        assert batches(agent, "examples/mlp") == (count + 1, total + 1, ones + 1)
        assert all(dev.mail.pending(t) == 0 for t, _ in sent)  # type: ignore[arg-type]


async def test_lone_request_not_held_for_batch_delay(fleet: Fleet, broker: Broker) -> None:
    """With a minute of allowed batching delay, a request that finds the function idle is
    still answered well within the device's timeout."""
    root = new_root()
    patient = build_bundle(fleet, MLP.onnx_bytes, name="examples/patient", max_delay_ms=60_000)
    x = MLP.sample_inputs(3, seed=2)
    async with (
        running_agent(fleet, broker, root, [patient]) as agent,
        Device(fleet, broker, root) as dev,
    ):
        for i in range(3):
            r = await dev.call("patient", rows(x, i), timeout=10.0)
            assert_same_outputs(r.ok().outputs, ort_run("mlp", rows(x, i)), f"lone {i}")
            assert batches(agent, "examples/patient") == (i + 1, i + 1, i + 1)


async def test_flood_over_max_queue_is_saturated_and_every_request_answered_once(
    fleet: Fleet, broker: Broker
) -> None:
    root = new_root()
    n = int(48 * SCALE)
    per = 32  # a full batch each: every request is a run of its own
    x = MLP.sample_inputs(per * 2, seed=3)
    chunks = [rows(x, (i % 2) * per, (i % 2 + 1) * per) for i in range(n)]
    want = [ort_run("mlp", c) for c in chunks[:2]]
    async with (
        running_agent(fleet, broker, root, [build_bundle(fleet, "mlp")], max_queue=2) as agent,
        Device(fleet, broker, root) as dev,
    ):
        sent = await asyncio.gather(
            *(dev.send("mlp", chunks[i], id=f"flood-{i}") for i in range(n))
        )
        replies: list[Reply] = await asyncio.gather(*(dev.mail.get(t) for t, _ in sent))  # type: ignore[arg-type]
        codes: Counter[str] = Counter()
        for i, r in enumerate(replies):
            body = r.body
            assert body.id == f"flood-{i}"
            if r.raw.get("error") is None:
                codes["ok"] += 1
                assert_same_outputs(r.ok().outputs, want[i % 2], f"flood {i}")
            else:
                err = r.error()
                codes[err.code] += 1
                assert err.code is ErrorCode.SATURATED, err
                assert "examples/mlp" in err.message and "queue" in err.message, err.message
        assert codes["ok"] >= 1 and codes[ErrorCode.SATURATED] >= 1, codes
        assert sum(codes.values()) == n

        # A last request, answered after anything the flood could still have caused.
        last = await dev.call("mlp", chunks[0], id="last")
        assert_same_outputs(last.ok().outputs, want[0], "after the flood")
        assert all(dev.mail.pending(t) == 0 for t, _ in sent), "a request was answered twice"  # type: ignore[arg-type]
        answers = "fnmesh_agent_answers_total"
        assert metric(agent, answers, function="examples/mlp", code="ok") == codes["ok"] + 1
        assert (
            metric(agent, answers, function="examples/mlp", code="saturated")
            == codes[ErrorCode.SATURATED]
        )


@pytest.mark.parametrize("encoding", [Encoding.MSGPACK, Encoding.JSON], ids=str)
async def test_deadline_that_cannot_be_met_is_refused(
    fleet: Fleet, broker: Broker, encoding: Encoding
) -> None:
    root = new_root()
    big = 256
    bundle = build_bundle(fleet, MLP.onnx_bytes, name="examples/wide", max_batch=big)
    x = MLP.sample_inputs(big, seed=4)
    async with (
        running_agent(fleet, broker, root, [bundle]) as agent,
        Device(fleet, broker, root) as dev,
    ):
        # One full batch teaches the agent what a batch costs (several ms for 256 rows).
        r = await dev.call("wide", x, id="warm", encoding=encoding)
        assert_same_outputs(r.ok().outputs, ort_run("mlp", x), "warm-up")
        r = await dev.call("wide", x, id="hurry", deadline_ms=1, encoding=encoding)
        err = r.error()
        assert err.code in (ErrorCode.SATURATED, ErrorCode.TIMEOUT), err
        assert err.id == "hurry"
        assert r.content_type == encoding.content_type
        # A generous deadline is met.
        r = await dev.call("wide", x, id="relaxed", deadline_ms=60_000, encoding=encoding)
        assert r.ok().id == "relaxed"
        assert batches(agent, "examples/wide")[1] == 2 * big


# -- small models run on the event loop --------------------------------------------------------


def inline_batches(agent: Agent, function: str) -> float:
    return metric(agent, "fnmesh_agent_inline_batches_total", function=function)


async def test_small_model_runs_on_the_loop_once_measured(fleet: Fleet, broker: Broker) -> None:
    """A model measured cheaper than a thread hop runs on the loop thread, with the same answers;
    the first warm batches run on a worker, which measures it. The bound here is generous
    (1 ms) so that a slow machine still qualifies the digits model (about 15 us)."""
    root = new_root()
    digits = build_example("digits")
    x = digits.sample_inputs(24, seed=5)
    async with (
        running_agent(
            fleet, broker, root, [build_bundle(fleet, "digits")], inline_run_us=1000
        ) as agent,
        Device(fleet, broker, root) as dev,
    ):
        for i in range(24):
            r = await dev.call("digits", rows(x, i), id=f"d-{i}")
            assert r.ok().id == f"d-{i}"
            assert_same_outputs(r.ok().outputs, ort_run("digits", rows(x, i)), f"request {i}")
        slot = agent.service.slots()["examples/digits"]
        assert slot.floor_s is not None and 0 < slot.floor_s <= 1e-3
        ran_inline = inline_batches(agent, "examples/digits")
        count, total, _ = batches(agent, "examples/digits")
        assert total == 24, "every request ran once"
        assert 0 < ran_inline < count, "the first warm batch ran on a worker, later ones inline"

        # A stream of requests goes back to workers (where batches can build up), each
        # caller still getting its own answer.
        burst = digits.sample_inputs(48, seed=8)
        sent = await asyncio.gather(
            *(dev.send("digits", rows(burst, i), id=f"b-{i}") for i in range(48))
        )
        seen = set()
        for topic, _ in sent:
            ans = (await dev.mail.get(topic)).ok()  # type: ignore[arg-type]
            i = int(ans.id.removeprefix("b-"))
            seen.add(i)
            assert_same_outputs(ans.outputs, ort_run("digits", rows(burst, i)), f"burst {i}")
        assert seen == set(range(48))
        assert batches(agent, "examples/digits")[1] == 24 + 48
        assert inline_batches(agent, "examples/digits") - ran_inline < 48, "all ran on the loop"


@pytest.mark.parametrize("bound_us", [0.0, 0.001])
async def test_inline_off_or_too_dear_stays_on_workers(
    fleet: Fleet, broker: Broker, bound_us: float
) -> None:
    """``--inline-run-us 0`` turns the fast path off; a bound no model can meet keeps every
    batch on a worker (the model is measured, and found dearer)."""
    root = new_root()
    digits = build_example("digits")
    x = digits.sample_inputs(12, seed=6)
    async with (
        running_agent(
            fleet, broker, root, [build_bundle(fleet, "digits")], inline_run_us=bound_us
        ) as agent,
        Device(fleet, broker, root) as dev,
    ):
        for i in range(12):
            r = await dev.call("digits", rows(x, i))
            assert_same_outputs(r.ok().outputs, ort_run("digits", rows(x, i)), f"request {i}")
        assert inline_batches(agent, "examples/digits") == 0
        assert batches(agent, "examples/digits")[1] == 12
        slot = agent.service.slots()["examples/digits"]
        if bound_us == 0:
            assert slot.floor_s is None, "nothing is measured when the fast path is off"
        else:
            assert slot.floor_s is not None and slot.floor_s > bound_us / 1e6
