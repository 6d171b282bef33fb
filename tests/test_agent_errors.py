"""Bad input gets its error code and a message naming what was wrong, and the agent goes on
answering; reply topics outside ``replies/`` are refused (no answer, a counter); a function that
needs a GPU on this CPU machine is an ``internal`` error, not a crash."""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest
from agent_support import (
    NODE,
    Device,
    Device311,
    Reply,
    assert_same_outputs,
    build_bundle,
    metric,
    new_root,
    ort_run,
    running_agent,
)
from conftest import Broker, Fleet
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fnmesh.agent.errors import UnsupportedHardwareError
from fnmesh.agent.main import Agent
from fnmesh.agent.probe import probe
from fnmesh.functions.examples.models import build_example
from fnmesh.functions.manifest import GpuRequirement
from fnmesh.functions.messages import Encoding, ErrorCode, ErrorReply, encode_request

DIGITS = build_example("digits")
IMAGE = DIGITS.sample_inputs(2, seed=1)
SMALL_LIMIT = 4096
REFUSED = "fnmesh_agent_refused_reply_topics_total"


def image(dtype: Any = np.float32, shape: tuple[int, ...] = (1, 64)) -> np.ndarray:
    return np.resize(IMAGE["image"], shape).astype(dtype)


def bundles(fleet: Fleet) -> list[bytes]:
    """digits, and the same model as ``examples/small`` with a 4096-byte payload limit."""
    return [
        build_bundle(fleet, "digits"),
        build_bundle(fleet, DIGITS.onnx_bytes, name="examples/small", max_payload=SMALL_LIMIT),
    ]


async def assert_still_serving(dev: Device, function: str = "digits") -> Reply:
    """A valid request right after is answered, and correctly."""
    x = {"image": image(shape=(2, 64))}
    r = await dev.call(function, x, id=f"next-{uuid.uuid4().hex[:6]}")
    assert_same_outputs(r.ok().outputs, ort_run("digits", x), "next request")
    return r


@dataclass(frozen=True)
class Case:
    """One bad request: how it is sent, and the error it must get."""

    code: ErrorCode
    words: tuple[str, ...]
    function: str = "digits"
    payload: Callable[[], bytes] | None = None
    inputs: dict[str, Any] | None = None
    kw: dict[str, Any] = field(default_factory=dict)
    #: The answer's encoding; None: the request's.
    answer_encoding: Encoding | None = None
    #: True when the request's id cannot be read at all (the answer uses the CorrelationData).
    id_lost: bool = False


def oversized() -> bytes:
    return encode_request({"image": image(shape=(20, 64))}, Encoding.MSGPACK, id="case")


CASES: dict[str, Case] = {
    "malformed_msgpack": Case(
        ErrorCode.BAD_REQUEST,
        ("msgpack",),
        payload=lambda: b"\x82\xa2id\xa4case\xa6inputs\xc1\xc1",
        kw={"content_type": None},
        answer_encoding=Encoding.MSGPACK,
    ),
    "malformed_json": Case(
        ErrorCode.BAD_REQUEST,
        ("JSON",),
        payload=lambda: b'{"id": "case", "inputs": {"image": {"dtype": "float32", "shape": [1,',
        kw={"content_type": None},
        answer_encoding=Encoding.JSON,
    ),
    "unknown_function": Case(
        ErrorCode.NOT_FOUND,
        ("examples/nowhere", NODE),
        function="nowhere",
        inputs={"image": image()},
    ),
    "wrong_dtype": Case(
        ErrorCode.BAD_REQUEST,
        ("'image'", "float32[N, 64]", "float64[1, 64]"),
        inputs={"image": image(np.float64)},
    ),
    "wrong_shape": Case(
        ErrorCode.BAD_REQUEST,
        ("'image'", "float32[N, 64]", "float32[1, 63]", "dimension 1 must be 64"),
        inputs={"image": image(shape=(1, 63))},
    ),
    "wrong_rank": Case(
        ErrorCode.BAD_REQUEST,
        ("'image'", "float32[N, 64]", "float32[64]"),
        inputs={"image": image(shape=(64,))},
    ),
    "missing_input": Case(
        ErrorCode.BAD_REQUEST,
        ("missing input 'image'", "float32[N, 64]"),
        inputs={"img": image()},
    ),
    "extra_unknown_input": Case(
        ErrorCode.BAD_REQUEST,
        ("unexpected input 'bogus'", "'image'"),
        inputs={"image": image(), "bogus": image()},
    ),
    "oversized_payload": Case(
        ErrorCode.BAD_REQUEST,
        (str(SMALL_LIMIT), "limit"),
        function="small",
        payload=oversized,
    ),
    "expired_deadline_zero": Case(
        ErrorCode.TIMEOUT,
        ("deadline_ms",),
        inputs={"image": image()},
        kw={"deadline_ms": 0},
    ),
    "expired_deadline_negative": Case(
        ErrorCode.TIMEOUT,
        ("deadline_ms",),
        inputs={"image": image()},
        kw={"deadline_ms": -250},
    ),
    "unsupported_content_type": Case(
        ErrorCode.BAD_REQUEST,
        ("text/plain", "application/json"),
        inputs={"image": image()},
        kw={"content_type": "text/plain"},
        answer_encoding=Encoding.JSON,
    ),
    "content_type_contradicts_payload": Case(
        ErrorCode.BAD_REQUEST,
        ("msgpack",),
        inputs={"image": image()},
        kw={"encoding": Encoding.JSON, "content_type": "application/msgpack"},
        answer_encoding=Encoding.MSGPACK,
        id_lost=True,
    ),
}


@pytest.mark.parametrize("case", list(CASES))
async def test_bad_request_gets_its_error_then_agent_answers_next(
    fleet: Fleet, broker: Broker, case: str
) -> None:
    c = CASES[case]
    root = new_root()
    async with (
        running_agent(fleet, broker, root, bundles(fleet)) as agent,
        Device(fleet, broker, root) as dev,
    ):
        kw: dict[str, Any] = {"encoding": Encoding.MSGPACK, "id": "case", **c.kw}
        if c.payload is not None:
            kw["payload"] = c.payload()
        topic, corr = await dev.send(c.function, c.inputs, **kw)
        assert topic is not None and corr is not None
        r = await dev.mail.get(topic)
        err = r.error()
        assert err.code == c.code, err
        for w in c.words:
            assert w in err.message, f"{w!r} not in {err.message!r}"
        assert err.id == (corr.hex() if c.id_lost else "case")
        assert r.correlation == corr
        want = c.answer_encoding or kw["encoding"]
        assert r.content_type == want.content_type
        label = "(unknown)" if c.code is ErrorCode.NOT_FOUND else f"examples/{c.function}"
        answers = "fnmesh_agent_answers_total"
        assert metric(agent, answers, function=label, code=c.code.value) == 1
        await assert_still_serving(dev, c.function if c.function == "small" else "digits")


async def test_bad_inputs_never_stop_the_agent(fleet: Fleet, broker: Broker) -> None:
    """Every bad request in a row, then good ones: each gets exactly its own answer."""
    root = new_root()
    async with (
        running_agent(fleet, broker, root, bundles(fleet)) as agent,
        Device(fleet, broker, root) as dev,
    ):
        sent: list[tuple[str, str, ErrorCode]] = []
        for name, c in CASES.items():
            kw: dict[str, Any] = {"encoding": Encoding.MSGPACK, "id": name, **c.kw}
            if c.payload is not None:
                kw["payload"] = c.payload()
            topic, _ = await dev.send(c.function, c.inputs, **kw)
            assert topic is not None
            sent.append((name, topic, c.code))
        for name, topic, code in sent:
            assert (await dev.mail.get(topic)).error().code == code, name
        for _ in range(3):
            await assert_still_serving(dev)
        for _, topic, _ in sent:
            assert dev.mail.pending(topic) == 0
        assert metric(agent, "fnmesh_agent_answers_total", code="ok") == 3


# -- MQTT 3.1.1: the reply topic is in the payload, even when the payload is bad -------------


@pytest.mark.parametrize(
    "payload",
    [
        pytest.param(
            lambda rt: b'{"id": "p1", "reply_to": "%s", "inputs": {"image": ' % rt.encode(),
            id="truncated_json",
        ),
        pytest.param(
            lambda rt: encode_request(
                {"image": image(shape=(20, 64))}, Encoding.MSGPACK, id="p1", reply_to=rt
            ),
            id="oversized_msgpack",
        ),
    ],
)
async def test_mqtt311_bad_payload_still_answered_on_its_reply_to(
    fleet: Fleet, broker: Broker, payload: Callable[[str], bytes]
) -> None:
    """A 3.1.1 device has no ResponseTopic: the agent must find ``reply_to`` in what it could
    read, or the device waits forever on a request that was dropped silently."""
    root = new_root()
    async with (
        running_agent(fleet, broker, root, bundles(fleet)) as agent,
        Device311(fleet, broker, root) as dev,
    ):
        rt = dev.replies + "bad"
        r = await dev.call("small", payload=payload(rt), reply_to=rt)
        err = r.error()
        assert err.code is ErrorCode.BAD_REQUEST
        assert err.id == "p1"
        assert metric(agent, REFUSED) == 0
        x = {"image": image()}
        ok = await dev.call("small", x, id="p2")
        assert ok.ok().id == "p2"
        assert_same_outputs(ok.ok().outputs, ort_run("digits", x), "after")


# -- reply topics: the mesh must not publish anywhere a request asks ---------------------------


def outside_topics(root: str) -> list[str]:
    return [
        f"{root}/nodes/{NODE}/status",  # overwrite the node's own retained status
        f"{root}/nodes/{NODE}/invoke/examples/digits",  # loop back into the inbox
        f"{root}/replies",  # the prefix itself, not under it
        f"{root}/repliesx/meter-1/a",
        f"{root}/fn/examples/digits/invoke",
        "elsewhere/meter-1/inbox",
        f"other-root/{root}/replies/meter-1",
    ]


async def assert_nothing_answered_but(spy: Device, allowed: set[str]) -> None:
    for m in spy.mail.all:
        if m.topic in allowed:
            continue
        try:
            body = m.raw
        except Exception:
            continue
        assert "error" not in body and "outputs" not in body, f"answer leaked to {m.topic}"


@pytest.mark.parametrize("mqtt311", [False, True], ids=["response_topic", "reply_to"])
async def test_reply_topic_outside_replies_refused(
    fleet: Fleet, broker: Broker, mqtt311: bool
) -> None:
    root = new_root()
    targets = outside_topics(root)
    async with (
        running_agent(fleet, broker, root, bundles(fleet)) as agent,
        Device(fleet, broker, root) as dev,
        Device(fleet, broker, root, name="spy") as spy,
    ):
        await spy.watch_everything()
        for n, target in enumerate(targets):
            x = {"image": image()}
            if mqtt311:
                payload = encode_request(x, Encoding.JSON, id="hijack", reply_to=target)
                await dev.send(
                    "digits",
                    payload=payload,
                    encoding=Encoding.JSON,
                    response_topic=None,
                    correlation=None,
                )
            else:
                await dev.send("digits", x, id="hijack", response_topic=target)
            # The next valid request is answered; had the bad one been, that came first.
            barrier = await assert_still_serving(dev)
            assert metric(agent, REFUSED, reason="outside") == n + 1
        await assert_nothing_answered_but(spy, {m.topic for m in dev.mail.all} | {barrier.topic})
        assert metric(agent, REFUSED, reason="missing") == 0
        # Refused requests are not answered, so they are not counted as answers either.
        assert metric(agent, "fnmesh_agent_answers_total") == len(targets)


async def test_request_without_reply_topic_dropped_and_counted(
    fleet: Fleet, broker: Broker
) -> None:
    root = new_root()
    async with (
        running_agent(fleet, broker, root, bundles(fleet)) as agent,
        Device(fleet, broker, root) as dev,
        Device(fleet, broker, root, name="spy") as spy,
    ):
        await spy.watch_everything()
        x = {"image": image()}
        await dev.send("digits", x, id="nowhere", response_topic=None)
        await dev.send(
            "digits", payload=b"\xc1 not even msgpack", response_topic=None, content_type=None
        )
        barrier = await assert_still_serving(dev)
        assert metric(agent, REFUSED, reason="missing") == 2
        assert metric(agent, REFUSED, reason="outside") == 0
        await assert_nothing_answered_but(spy, {barrier.topic})


# -- hardware ------------------------------------------------------------------------------------


async def test_gpu_required_on_cpu_node_is_internal_error_naming_the_gpu(
    fleet: Fleet, broker: Broker
) -> None:
    root = new_root()
    gpu_only = build_bundle(
        fleet, DIGITS.onnx_bytes, name="examples/gpu-digits", gpu=GpuRequirement.REQUIRED
    )
    async with running_agent(fleet, broker, root, [build_bundle(fleet, "digits")]) as agent:
        if agent.hardware.has_gpu:
            pytest.skip("this machine has an NVIDIA GPU")
        await agent.async_serve_bundle(gpu_only, prewarm=False)
        async with Device(fleet, broker, root) as dev:
            for _ in range(2):  # and again: a failed load is not cached as a success
                err = (await dev.call("gpu-digits", {"image": image()}, id="g")).error()
                assert err.code is ErrorCode.INTERNAL
                assert "GPU" in err.message
                assert "examples/gpu-digits@1.0.0" in err.message
                assert err.id == "g"
            await assert_still_serving(dev)
        assert not agent.pool.is_warm(("examples/gpu-digits", "1.0.0"))


HW = probe()


@pytest.mark.skipif(HW.has_gpu, reason="needs a node without a GPU")
async def test_function_that_cannot_load_here_is_not_advertised(
    fleet: Fleet, broker: Broker
) -> None:
    root = new_root()
    gpu_only = build_bundle(
        fleet, DIGITS.onnx_bytes, name="examples/gpu-digits", gpu=GpuRequirement.REQUIRED
    )
    async with running_agent(fleet, broker, root, [build_bundle(fleet, "digits")]) as agent:
        with pytest.raises(UnsupportedHardwareError, match="GPU"):
            await agent.async_serve_bundle(gpu_only)
        assert "examples/digits" in agent.describe()["functions"]
        assert "examples/gpu-digits" not in agent.describe()["functions"]


@pytest.mark.gpu
@pytest.mark.skipif(not HW.has_gpu, reason="no NVIDIA GPU on this machine")
async def test_gpu_required_function_answers_on_a_gpu_node(fleet: Fleet, broker: Broker) -> None:
    root = new_root()
    gpu_only = build_bundle(
        fleet, DIGITS.onnx_bytes, name="examples/gpu-digits", gpu=GpuRequirement.REQUIRED
    )
    async with (
        running_agent(fleet, broker, root, [gpu_only]) as agent,
        Device(fleet, broker, root) as dev,
    ):
        assert isinstance(agent, Agent) and agent.hardware.has_gpu
        x = DIGITS.sample_inputs(8, seed=4)
        r = await dev.call("gpu-digits", x)
        assert_same_outputs(r.ok().outputs, ort_run("digits", x), "gpu")


# -- whatever bytes arrive, exactly one answer and the agent goes on -----------------------------

VALID = [
    encode_request({"image": image()}, Encoding.MSGPACK, id="fuzz"),
    encode_request({"image": image()}, Encoding.JSON, id="fuzz"),
]


def _flip(b: bytes, i: int, v: int) -> bytes:
    i %= len(b)
    return b[:i] + bytes([v]) + b[i + 1 :]


PAYLOADS = st.one_of(
    st.binary(max_size=200),
    st.builds(_flip, st.sampled_from(VALID), st.integers(0, 1 << 16), st.integers(0, 255)),
    st.builds(lambda b, n: b[: n % len(b)], st.sampled_from(VALID), st.integers(0, 1 << 16)),
    st.builds(
        lambda obj: json.dumps(obj).encode(),
        st.dictionaries(
            st.sampled_from(["inputs", "id", "deadline_ms", "reply_to", "x"]),
            st.recursive(
                st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
                lambda inner: (
                    st.lists(inner, max_size=4)
                    | st.dictionaries(st.text(max_size=6), inner, max_size=4)
                ),
                max_leaves=12,
            ),
        ),
    ),
)


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(payload=PAYLOADS)
async def test_any_payload_gets_exactly_one_answer_and_agent_survives(
    fleet: Fleet, broker: Broker, payload: bytes
) -> None:
    root = new_root()
    async with (
        running_agent(fleet, broker, root, bundles(fleet)[:1]) as agent,
        Device(fleet, broker, root) as dev,
    ):
        topic, corr = await dev.send("digits", payload=payload, content_type=None)
        assert topic is not None
        r = await dev.mail.get(topic)
        assert r.correlation == corr
        body = r.body  # a well-formed answer or error, whatever came in
        if isinstance(body, ErrorReply):
            assert body.code in (ErrorCode.BAD_REQUEST, ErrorCode.TIMEOUT), body
            assert body.message
        await assert_still_serving(dev)
        assert dev.mail.pending(topic) == 0
        assert metric(agent, "fnmesh_agent_answers_total", code="internal") == 0


@pytest.mark.parametrize("tail", ["digits", "examples/digits/v2", "examples/"])
@pytest.mark.parametrize("mqtt311", [False, True], ids=["mqtt5", "mqtt311"])
async def test_topic_naming_no_function_gets_not_found_with_id_and_encoding(
    fleet: Fleet, broker: Broker, tail: str, mqtt311: bool
) -> None:
    """The function is the topic's tail; a tail that is not ``ns/name`` is answered
    ``not_found`` like any unknown function: same id rules, same encoding, same reply topic."""
    root = new_root()
    topic = f"{root}/nodes/{NODE}/invoke/{tail}"
    async with (
        running_agent(fleet, broker, root, bundles(fleet)) as agent,
        Device(fleet, broker, root) as dev,
    ):
        x = {"image": image()}
        if mqtt311:
            rt = dev.reply_topic()
            payload = encode_request(x, Encoding.MSGPACK, id="case", reply_to=rt)
            sent = await dev.send(
                "", payload=payload, reply_to=rt, topic=topic, response_topic=None, correlation=None
            )
        else:
            sent = await dev.send("", x, id="case", topic=topic)
        assert sent[0] is not None
        r = await dev.mail.get(sent[0])
        err = r.error()
        assert err.code is ErrorCode.NOT_FOUND
        assert tail in err.message
        assert err.id == "case"
        assert r.content_type == Encoding.MSGPACK.content_type
        assert metric(agent, REFUSED) == 0
        await assert_still_serving(dev)
