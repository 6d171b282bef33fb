"""A bounded flood of bad input: malformed invocations mixed with valid ones, against a live mesh.

:func:`make_cases` draws ``n`` requests from a seed: valid ones (answers are
checked against the examples' references) and malformed ones (random bytes,
wrong types, huge shapes, deep nesting, wrong content types, truncated
msgpack, over-size payloads, unknown functions, reply topics missing or
outside ``replies/``). Each goes to the router's ``fn/`` topic or straight to
an agent's inbox, with a reply topic of its own, so every answer is matched
to its request by topic. :func:`async_flood` sends them (a bounded number in
flight), waits for every answer that must come, and reports what came, the
processes that died, and the resident memory of the agents and the router
before and after.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import msgpack
import numpy as np
import paho.mqtt.client as paho

from fnmesh.agent.mqtt import properties
from fnmesh.coordinator.bench.mesh import REFERENCE_ATOL, ProcessMesh
from fnmesh.coordinator.up import DEMO_DEVICE
from fnmesh.functions.errors import MessageError
from fnmesh.functions.examples.models import build_example
from fnmesh.functions.messages import Encoding, ErrorReply, Response, decode_reply, encode_request

VALID = "valid"
#: What a case must get back.
OK, ERROR, NOTHING = "ok", "error", "nothing"
#: Share of valid requests in the flood.
VALID_SHARE = 0.25
#: Rows in each example's pool of valid inputs.
_POOL = 64


@dataclass(frozen=True, slots=True)
class Case:
    """One request of the flood."""

    index: int
    kind: str
    #: "router" (``fn/{function}/invoke``) or the agent whose inbox it goes to.
    to: str
    function: str
    payload: bytes
    content_type: str | None
    #: The MQTT 5 ResponseTopic (None: not set).
    response_topic: str | None
    #: Where an answer, if any, will come (ResponseTopic or ``reply_to`` in the payload).
    reply: str | None
    expect: str
    #: For valid cases: (example, first row, rows).
    rows: tuple[str, int, int] | None = None


@dataclass
class FloodReport:
    n: int
    seconds: float = 0.0
    by_kind: Counter[str] = field(default_factory=Counter)
    valid: int = 0
    valid_ok: int = 0
    #: Valid requests answered with an error or wrong outputs: (index, why).
    valid_wrong: list[tuple[int, str]] = field(default_factory=list)
    must_answer: int = 0
    answered: int = 0
    #: Cases that must have been answered and were not: (index, kind).
    missing: list[tuple[int, str]] = field(default_factory=list)
    #: Malformed cases answered with a success.
    accepted_malformed: list[tuple[int, str]] = field(default_factory=list)
    #: Answers beyond the first for one case.
    duplicates: int = 0
    #: Answers to cases that must get none (no usable reply topic).
    unexpected: int = 0
    undecodable: int = 0
    codes: Counter[str] = field(default_factory=Counter)
    rss_before: dict[str, int] = field(default_factory=dict)
    rss_after: dict[str, int] = field(default_factory=dict)
    died: list[str] = field(default_factory=list)

    @property
    def growth_mb(self) -> dict[str, float]:
        return {
            k: (self.rss_after[k] - self.rss_before[k]) / 2**20
            for k in self.rss_before
            if k in self.rss_after
        }

    def ok(self) -> bool:
        return not (
            self.valid_wrong
            or self.missing
            or self.accepted_malformed
            or self.duplicates
            or self.unexpected
            or self.undecodable
            or self.died
        )

    def summary(self) -> dict[str, Any]:
        return {
            "n": self.n,
            "seconds": round(self.seconds, 2),
            "valid": self.valid,
            "valid_ok": self.valid_ok,
            "valid_wrong": len(self.valid_wrong),
            "must_answer": self.must_answer,
            "answered": self.answered,
            "missing": len(self.missing),
            "accepted_malformed": len(self.accepted_malformed),
            "duplicates": self.duplicates,
            "unexpected": self.unexpected,
            "undecodable": self.undecodable,
            "codes": dict(sorted(self.codes.items())),
            "kinds": dict(sorted(self.by_kind.items())),
            "rss_growth_mb": {k: round(v, 1) for k, v in self.growth_mb.items()},
            "died": self.died,
        }


# -- the cases ----------------------------------------------------------------------------------


class InputPool:
    """Valid inputs per example and their reference outputs, computed once."""

    def __init__(self, examples: list[str]) -> None:
        self.examples = examples
        self.inputs: dict[str, dict[str, np.ndarray]] = {}
        self.want: dict[str, dict[str, np.ndarray]] = {}
        for name in examples:
            ex = build_example(name)
            self.inputs[name] = ex.sample_inputs(_POOL, seed=11)
            self.want[name] = ex.reference(self.inputs[name])

    def rows(self, name: str, i: int, k: int) -> dict[str, np.ndarray]:
        return {n: np.ascontiguousarray(v[i : i + k]) for n, v in self.inputs[name].items()}


def _deep_json(depth: int) -> bytes:
    return b'{"inputs":' + b"[" * depth + b"]" * depth + b"}"


def _deep_msgpack(depth: int) -> bytes:
    return b"\x81\xa6inputs" + b"\x91" * depth + b"\xc0"


def make_cases(
    n: int, *, root: str, agents: list[str], examples: list[str], seed: int = 0, run: str = ""
) -> tuple[list[Case], InputPool]:
    """``n`` requests, about a quarter of them valid, drawn from ``seed``."""
    rng = random.Random(seed)
    pools = InputPool(examples)
    run = run or uuid.uuid4().hex[:8]
    replies = f"{root}/replies/{DEMO_DEVICE}/fuzz-{run}"
    cases: list[Case] = []
    for i in range(n):
        to = "router" if rng.random() < 0.5 else rng.choice(agents)
        name = rng.choice(examples)
        fid = build_example(name).function_id
        enc = rng.choice((Encoding.MSGPACK, Encoding.JSON))
        reply = f"{replies}/{i}"
        k = rng.randint(1, 4)
        first = rng.randrange(_POOL - k)
        good = encode_request(pools.rows(name, first, k), enc, id=f"fz-{i}")
        ct: str | None = enc.content_type if rng.random() < 0.7 else None
        rt: str | None = reply
        where: str | None = reply
        expect = ERROR
        rows = None
        if rng.random() < VALID_SHARE:
            kind, payload, expect, rows = VALID, good, OK, (name, first, k)
        else:
            kind = rng.choices(_MALFORMED, _WEIGHTS)[0]
            payload, ct, rt, where, fid, expect = _malform(
                kind, rng, good, enc, ct, reply, fid, pools, name, k
            )
        cases.append(Case(i, kind, to, fid, payload, ct, rt, where, expect, rows))
    return cases, pools


#: Malformations and their relative frequency (over-size payloads are a megabyte each).
_KINDS = {
    "random_bytes": 1.0,
    "wrong_types": 1.5,
    "huge_shape": 1.0,
    "deep_nesting": 1.0,
    "wrong_content_type": 1.0,
    "truncated_msgpack": 1.0,
    "oversize": 0.2,
    "unknown_function": 0.7,
    "reply_to_in_payload": 1.0,
    "no_reply_topic": 0.5,
    "reply_outside_replies": 0.5,
}
_MALFORMED = tuple(_KINDS)
_WEIGHTS = tuple(_KINDS.values())


def _malform(
    kind: str,
    rng: random.Random,
    good: bytes,
    enc: Encoding,
    ct: str | None,
    reply: str,
    fid: str,
    pools: InputPool,
    name: str,
    k: int,
) -> tuple[bytes, str | None, str | None, str | None, str, str]:
    """(payload, content type, ResponseTopic, where the answer comes, function, expectation)."""
    rt: str | None = reply
    if kind == "random_bytes":
        payload = rng.randbytes(rng.randint(0, 2048))
        ct = rng.choice((None, "application/msgpack", "application/json"))
    elif kind == "wrong_types":
        first_input = next(iter(pools.inputs[name]))
        x = pools.rows(name, 0, k)[first_input]
        variants: list[Any] = [
            {"inputs": [1, 2, 3]},
            {"inputs": {first_input: "not a tensor"}},
            {"inputs": {first_input: {"dtype": "float64", "shape": list(x.shape), "data": []}}},
            {"inputs": {first_input: {"dtype": "float32", "shape": "1x64", "data": []}}},
            {"inputs": {first_input: {"dtype": 7, "shape": [1], "data": [1]}}},
            {"id": 12, "inputs": {}},
            {"deadline_ms": "soon", "inputs": {}},
            {"inputs": {first_input: {"dtype": "float32", "shape": [1, 2], "data": [True, None]}}},
            {"inputs": {"someone_else": {"dtype": "float32", "shape": [1], "data": [1.0]}}},
            [1, 2, 3],
            "inputs",
        ]
        obj: Any = rng.choice(variants)
        if rng.random() < 0.5:
            # A well-formed tensor of the wrong dtype (names the input and the dtype expected).
            obj = {"inputs": {first_input: {"dtype": "int32", "shape": list(x.shape), "data": []}}}
            obj["inputs"][first_input]["data"] = (
                x.astype(np.int32).tobytes() if enc == Encoding.MSGPACK else x.ravel().tolist()
            )
        payload = _dump(obj, enc)
    elif kind == "huge_shape":
        shape = rng.choice(
            ([2**31, 2**31], [1, 10**12], [1] * 64, [2**40], [-1, 64], [65536, 65536, 65536])
        )
        first_input = next(iter(pools.inputs[name]))
        payload = _dump(
            {
                "inputs": {
                    first_input: {
                        "dtype": "float32",
                        "shape": shape,
                        "data": b"\0" * 16 if enc == Encoding.MSGPACK else [0.0] * 4,
                    }
                }
            },
            enc,
        )
    elif kind == "deep_nesting":
        depth = rng.choice((1_000, 10_000, 100_000))
        payload = _deep_json(depth) if enc == Encoding.JSON else _deep_msgpack(depth)
    elif kind == "wrong_content_type":
        other = Encoding.JSON if enc == Encoding.MSGPACK else Encoding.MSGPACK
        ct = rng.choice((other.content_type, "text/plain", "application/x-protobuf", "\u2603"))
        payload = good
    elif kind == "truncated_msgpack":
        full = encode_request(pools.rows(name, 0, k), Encoding.MSGPACK, id="cut")
        payload = full[: rng.randrange(1, len(full))]
        ct = rng.choice((None, Encoding.MSGPACK.content_type))
    elif kind == "oversize":
        # Just over the functions' 1 MiB payload limit.
        extra = (1 << 20) + rng.randint(1, 1 << 16)
        if enc == Encoding.JSON:
            payload = good[:-1] + b" " * extra + b"}"
        else:
            first_input = next(iter(pools.inputs[name]))
            tensor = {"dtype": "uint8", "shape": [1, extra], "data": bytes(extra)}
            payload = msgpack.packb({"inputs": {first_input: tensor}}, use_bin_type=True)
    elif kind == "unknown_function":
        fid = rng.choice(("examples/nope", "nobody/home", "examples/" + "x" * 200))
        payload = good
        return payload, ct, rt, reply, fid, ERROR
    elif kind == "reply_to_in_payload":
        # MQTT 3.1.1 style: no ResponseTopic, the reply topic first in a broken payload.
        obj = {"reply_to": reply, "id": "r", "inputs": {"x": {"dtype": "float32"}}}
        payload = _dump(obj, enc)
        if rng.random() < 0.5:
            # Cut anywhere after the reply topic.
            after = payload.index(reply.encode()) + len(reply) + 1
            payload = payload[: rng.randrange(after, len(payload))]
        return payload, ct, None, reply, fid, ERROR
    elif kind == "no_reply_topic":
        payload = rng.choice((rng.randbytes(64), good, _deep_json(1000)))
        return payload, ct, None, None, fid, NOTHING
    elif kind == "reply_outside_replies":
        payload = rng.choice((rng.randbytes(64), good))
        outside = rng.choice(("elsewhere/x", reply.replace("/replies/", "/nodes/"), "a/+/b"))
        if "+" in outside:
            # An invalid topic name cannot be a ResponseTopic: put it in the payload.
            payload = _dump({"reply_to": outside, "inputs": {}}, enc)
            return payload, ct, None, None, fid, NOTHING
        return payload, ct, outside, None, fid, NOTHING
    else:  # pragma: no cover - the list above is closed
        raise ValueError(kind)
    return payload, ct, rt, reply, fid, ERROR


def _dump(obj: Any, enc: Encoding) -> bytes:
    if enc == Encoding.JSON:
        return json.dumps(obj, default=lambda b: list(b)).encode()
    return msgpack.packb(obj, use_bin_type=True)  # type: ignore[no-any-return]


# -- sending --------------------------------------------------------------------------------------


async def async_flood(
    mesh: ProcessMesh,
    n: int,
    *,
    seed: int = 0,
    inflight: int = 64,
    warmup: int = 200,
    answer_timeout: float = 60.0,
    progress: Callable[[str], None] = lambda _s: None,
) -> FloodReport:
    """Send ``n`` cases (after ``warmup`` not counted), and check what came back."""
    root = mesh.topic_root
    agents = list(mesh.nodes)
    examples = list(mesh.examples)
    if warmup:
        progress(f"warm-up: {warmup} cases")
        await _run(mesh, root, agents, examples, warmup, seed + 1, inflight, answer_timeout)
    before = {c.name: mesh.rss(c) for c in mesh.children()}
    progress(f"flood: {n} cases")
    report = await _run(mesh, root, agents, examples, n, seed, inflight, answer_timeout)
    report.rss_before = before
    for c in mesh.children():
        if c.running():
            report.rss_after[c.name] = mesh.rss(c)
        else:
            report.died.append(c.name)
    return report


async def _run(
    mesh: ProcessMesh,
    root: str,
    agents: list[str],
    examples: list[str],
    n: int,
    seed: int,
    inflight: int,
    answer_timeout: float,
) -> FloodReport:
    run = uuid.uuid4().hex[:8]
    cases, pools = make_cases(n, root=root, agents=agents, examples=examples, seed=seed, run=run)
    report = FloodReport(n)
    report.by_kind.update(c.kind for c in cases)
    prefix = f"{root}/replies/{DEMO_DEVICE}/fuzz-{run}/"
    got: dict[int, list[paho.MQTTMessage]] = {}
    waiting: dict[int, asyncio.Future[None]] = {}
    window = asyncio.Semaphore(inflight)

    def on_reply(msg: paho.MQTTMessage) -> None:
        try:
            i = int(msg.topic[len(prefix) :])
        except ValueError:
            return
        got.setdefault(i, []).append(msg)
        fut = waiting.pop(i, None)
        if fut is not None and not fut.done():
            fut.set_result(None)
            window.release()

    client = mesh.device_mqtt(f"fuzz-{run}")
    client.subscribe(prefix + "#", on_reply)
    await client.async_start()
    loop = asyncio.get_running_loop()
    started = time.monotonic()
    try:
        for c in cases:
            topic = (
                f"{root}/fn/{c.function}/invoke"
                if c.to == "router"
                else f"{root}/nodes/{c.to}/invoke/{c.function}"
            )
            props = properties(content_type=c.content_type, response_topic=c.response_topic)
            if c.expect == NOTHING:
                await client.async_publish(topic, c.payload, qos=1, props=props)
                continue
            await window.acquire()
            waiting[c.index] = loop.create_future()
            client.publish(topic, c.payload, 1, False, props)
        pending = [f for f in waiting.values() if not f.done()]
        if pending:
            await asyncio.wait(pending, timeout=answer_timeout)
        # A last valid request through the router: answers sent before its answer have arrived.
        await _fence(client, root, prefix, pools, examples[0], got)
    finally:
        await client.async_stop()
    report.seconds = time.monotonic() - started
    _check(cases, pools, got, report)
    return report


async def _fence(
    client: Any, root: str, prefix: str, pools: InputPool, example: str, got: dict[int, Any]
) -> None:
    fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    topic = prefix + "fence"

    def on(msg: paho.MQTTMessage) -> None:
        if not fut.done():
            fut.set_result(None)

    client.subscribe(topic, on)
    fid = build_example(example).function_id
    await client.async_publish(
        f"{root}/fn/{fid}/invoke",
        encode_request(pools.rows(example, 0, 1), Encoding.MSGPACK),
        qos=1,
        props=properties(response_topic=topic),
    )
    async with asyncio.timeout(30):
        await fut


def _check(
    cases: list[Case], pools: InputPool, got: dict[int, list[paho.MQTTMessage]], r: FloodReport
) -> None:
    for c in cases:
        msgs = got.get(c.index, [])
        if c.expect == NOTHING:
            r.unexpected += len(msgs)
            continue
        r.must_answer += 1
        if c.kind == VALID:
            r.valid += 1
        if not msgs:
            r.missing.append((c.index, c.kind))
            continue
        r.answered += 1
        r.duplicates += len(msgs) - 1
        msg = msgs[0]
        try:
            reply = decode_reply(bytes(msg.payload), getattr(msg.properties, "ContentType", None))
        except MessageError:
            r.undecodable += 1
            continue
        r.codes[reply.code.value if isinstance(reply, ErrorReply) else "ok"] += 1
        if c.kind != VALID:
            if isinstance(reply, Response):
                r.accepted_malformed.append((c.index, c.kind))
            continue
        if isinstance(reply, ErrorReply):
            r.valid_wrong.append((c.index, f"{reply.code.value}: {reply.message}"))
            continue
        assert c.rows is not None
        name, first, k = c.rows
        why = compare_rows(reply.outputs, pools.want[name], first, k)
        if why:
            r.valid_wrong.append((c.index, why))
        else:
            r.valid_ok += 1


def compare_rows(
    got: dict[str, np.ndarray], want: dict[str, np.ndarray], i: int, k: int
) -> str | None:
    if set(got) != set(want):
        return f"outputs {sorted(got)} != {sorted(want)}"
    for name, w in want.items():
        w = w[i : i + k]
        g = np.asarray(got[name])
        if g.shape != w.shape or g.dtype != w.dtype:
            return f"{name}: {g.dtype}{list(g.shape)} != {w.dtype}{list(w.shape)}"
        if np.issubdtype(w.dtype, np.floating):
            if not np.allclose(g, w, rtol=0, atol=REFERENCE_ATOL):
                return f"{name}: values differ"
        elif not np.array_equal(g, w):
            return f"{name}: {g.tolist()} != {w.tolist()}"
    return None
