"""The invocation service in-process: answers first, the bookkeeping after them.

A warm, cheap function runs on the loop thread while the request is handled
(see ``InvocationService._try_inline``). Its answer is handed to the sink at
once; metrics, service times and the duplicate store are updated in the loop's
next pass, before anything read in that pass, so no later request sees them
undone.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import numpy as np
import pytest
from agent_support import build_bundle, ort_run
from conftest import Fleet

from fnmesh.agent.dedup import ReplyCache
from fnmesh.agent.executors.onnx import load_onnx
from fnmesh.agent.metrics import AgentMetrics
from fnmesh.agent.probe import Hardware
from fnmesh.agent.service import InvocationService
from fnmesh.agent.warm_pool import WarmPool, threaded
from fnmesh.functions.bundle import Bundle
from fnmesh.functions.examples.models import build_example
from fnmesh.functions.messages import Encoding, Response, decode_reply, encode_request

FID = "examples/digits"


@dataclass
class Sink:
    topic: str = "fnmesh/v1/replies/test/r"
    got: list[bytes] = field(default_factory=list)

    def accept(self, reply_to: str | None) -> bool:
        return True

    def send(self, result: object, encoding: Encoding) -> None:  # pragma: no cover - unused
        raise AssertionError("answers reach a sink through send_encoded")

    def send_encoded(self, payload: bytes, encoding: Encoding) -> None:
        self.got.append(payload)


@asynccontextmanager
async def warm_service(fleet: Fleet) -> AsyncIterator[InvocationService]:
    """A service with digits loaded and measured cheap enough to run on the loop."""
    example = build_example("digits")
    manifest = Bundle.parse(build_bundle(fleet, "digits")).manifest
    hardware = Hardware(gpu_reason="no GPU in this test")
    pool = WarmPool(
        1 << 30, 600.0, threaded(lambda key: load_onnx(example.onnx_bytes, manifest, hardware))
    )
    service = InvocationService(
        "node-1", pool, AgentMetrics("node-1"), dedup=ReplyCache(ttl_s=60.0), inline_run_s=1e-3
    )
    service.serve(manifest, "digest")
    service.starting = False
    payload = encode_request(example.sample_inputs(1), Encoding.MSGPACK)
    slot = service.slots()[FID]
    n = 0
    async with asyncio.timeout(30):
        while slot.floor_s is None:  # the first warm runs on a worker measure the model
            n += 1
            sink = Sink()
            service.submit(FID, payload, "application/msgpack", sink, correlation_id=f"w{n}")
            while not sink.got:
                await asyncio.sleep(0.001)
    try:
        yield service
    finally:
        await service.async_close()


def answers(service: InvocationService) -> int:
    return service.metrics._per_request.answers.get((FID, "ok"), 0)


def batches(service: InvocationService) -> int:
    b = service.metrics._per_request.batches.get(FID)
    return sum(b.rows.counts) if b else 0


async def test_answer_goes_out_at_once_and_is_counted_in_the_next_pass(fleet: Fleet) -> None:
    async with warm_service(fleet) as service:
        inputs = build_example("digits").sample_inputs(1, seed=3)
        sink = Sink()
        before_answers, before_batches = answers(service), batches(service)
        service.submit(
            FID,
            encode_request(inputs, Encoding.MSGPACK),
            "application/msgpack",
            sink,
            correlation_id="c-1",
        )
        assert len(sink.got) == 1, "a warm, cheap function answers while the request is handled"
        reply = decode_reply(sink.got[0], "application/msgpack")
        assert isinstance(reply, Response)
        want = ort_run("digits", inputs)
        np.testing.assert_array_equal(reply.outputs["label"], want["label"])
        assert answers(service) == before_answers, "counted after the answer, not before"
        await asyncio.sleep(0)  # one loop pass
        assert answers(service) == before_answers + 1
        assert batches(service) == before_batches + 1


async def test_duplicate_in_the_same_pass_gets_the_first_answer_without_a_second_run(
    fleet: Fleet,
) -> None:
    async with warm_service(fleet) as service:
        payload = encode_request(build_example("digits").sample_inputs(1, seed=4), Encoding.MSGPACK)
        first, retry = Sink(), Sink()
        runs = batches(service)
        service.submit(FID, payload, "application/msgpack", first, correlation_id="dup")
        # The retry arrives before the first answer is stored: it waits for it.
        service.submit(FID, payload, "application/msgpack", retry, correlation_id="dup")
        assert len(first.got) == 1 and retry.got == []
        await asyncio.sleep(0)
        assert retry.got == first.got
        assert batches(service) == runs + 1, "the retry must not run the function again"
        # Once stored, a later retry is answered from the store at once.
        late = Sink()
        service.submit(FID, payload, "application/msgpack", late, correlation_id="dup")
        assert late.got == first.got
        assert service.dedup is not None and service.dedup.replayed == 1


async def test_failing_bookkeeping_does_not_stop_the_answers(
    fleet: Fleet, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    async with warm_service(fleet) as service:

        def broken(*args: object, **kwargs: object) -> None:
            raise RuntimeError("metrics store is broken")

        monkeypatch.setattr(service.metrics, "batch", broken)
        payloads = [
            encode_request(build_example("digits").sample_inputs(1, seed=s), Encoding.MSGPACK)
            for s in (5, 6)
        ]
        sinks = [Sink(), Sink()]
        with caplog.at_level(logging.ERROR, logger="fnmesh.agent"):
            for i, (payload, sink) in enumerate(zip(payloads, sinks, strict=True)):
                service.submit(FID, payload, "application/msgpack", sink, correlation_id=f"b{i}")
                await asyncio.sleep(0)
        assert all(len(s.got) == 1 for s in sinks)
        assert "after-the-answer work failed" in caplog.text
        # The duplicate store still took both answers (its work is queued separately).
        retry = Sink()
        service.submit(FID, payloads[1], "application/msgpack", retry, correlation_id="b1")
        assert retry.got == sinks[1].got
