"""Duplicate suppression: a retry is answered from the first execution, only on its own reply topic."""

from __future__ import annotations

from dataclasses import dataclass, field

from agent_support import Device, build_bundle, metric, new_root, running_agent
from conftest import Broker, Fleet

from fnmesh.agent.dedup import ReplyCache
from fnmesh.functions.examples.models import build_example
from fnmesh.functions.tensors import Encoding


@dataclass
class Sink:
    got: list[bytes] = field(default_factory=list)

    def send_encoded(self, payload: bytes, encoding: Encoding) -> None:
        self.got.append(payload)


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_first_runs_duplicates_wait_then_replay() -> None:
    c = ReplyCache()
    key = ("r/d/1", "id-1", "")
    first, dup, late = Sink(), Sink(), Sink()
    assert c.begin(key, first)
    assert not c.begin(key, dup)
    assert dup.got == []
    waiters = c.complete(key, b"answer", Encoding.JSON, store=True)
    assert waiters == [dup]
    assert not c.begin(key, late)
    assert late.got == [b"answer"]
    assert c.replayed == 1 and c.joined == 1


def test_errors_are_not_stored_so_a_retry_runs_again() -> None:
    c = ReplyCache()
    key = ("r/d/1", "id-1", "")
    assert c.begin(key, Sink())
    c.complete(key, b"saturated", Encoding.JSON, store=False)
    assert c.begin(key, Sink()), "a retry after an error deserves a fresh execution"


def test_stored_answer_never_replayed_to_another_topic() -> None:
    c = ReplyCache()
    a = ("r/alice/1", "same-id", "")
    b = ("r/mallory/1", "same-id", "")
    assert c.begin(a, Sink())
    c.complete(a, b"alice's answer", Encoding.JSON, store=True)
    other = Sink()
    assert c.begin(b, other), "another reply topic is another request"
    assert other.got == []


def test_window_and_bounds() -> None:
    clock = Clock()
    c = ReplyCache(ttl_s=10, max_entries=3, max_bytes=100, clock=clock)
    for i in range(5):
        k = ("t", str(i), "")
        assert c.begin(k, Sink())
        c.complete(k, b"x" * 10, Encoding.JSON, store=True)
    assert len(c) == 3 and c.size_bytes == 30
    assert c.begin(("t", "0", ""), Sink()), "evicted entries are forgotten"
    clock.now = 11
    assert c.begin(("t", "4", ""), Sink()), "expired entries are forgotten"
    big = ("t", "big", "")
    assert c.begin(big, Sink())
    c.complete(big, b"y" * 200, Encoding.JSON, store=True)
    assert c.size_bytes <= 100


async def test_retry_with_same_id_is_answered_from_first_execution(
    fleet: Fleet, broker: Broker
) -> None:
    root = new_root()
    inputs = build_example("digits").sample_inputs(1)
    async with (
        running_agent(fleet, broker, root, [build_bundle(fleet, "digits")]) as agent,
        Device(fleet, broker, root) as dev,
    ):
        topic = dev.reply_topic()
        before = metric(agent, "fnmesh_agent_batch_rows_count", function="examples/digits")
        first = await dev.call(
            "digits", inputs, id="retry-1", response_topic=topic, correlation=b"c1"
        )
        again = await dev.call(
            "digits", inputs, id="retry-1", response_topic=topic, correlation=b"c1"
        )
        assert first.payload == again.payload
        runs = metric(agent, "fnmesh_agent_batch_rows_count", function="examples/digits") - before
        assert runs == 1, "the retry must not run the function again"
        assert agent.service.dedup is not None and agent.service.dedup.replayed == 1
        # Same id from another reply topic: a different request, executed on its own.
        other = await dev.call("digits", inputs, id="retry-1", correlation=b"c1")
        assert other.topic != topic
        runs = metric(agent, "fnmesh_agent_batch_rows_count", function="examples/digits") - before
        assert runs == 2
