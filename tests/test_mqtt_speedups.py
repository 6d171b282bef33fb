"""The Properties speed-ups behave exactly like paho's own methods."""

from __future__ import annotations

from typing import Any

import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import MQTTException, Properties

import fnmesh.agent.mqtt  # noqa: F401 - applies the speed-ups
from fnmesh.agent.mqtt_speedups import ORIGINALS

CASES: list[tuple[int, dict[str, Any]]] = [
    (PacketTypes.PUBLISH, {}),
    (PacketTypes.PUBLISH, {"ContentType": "application/json"}),
    (
        PacketTypes.PUBLISH,
        {
            "ContentType": "application/msgpack",
            "CorrelationData": b"\x00\x01corr",
            "ResponseTopic": "fnmesh/v1/replies/d/1",
            "MessageExpiryInterval": 30,
        },
    ),
    (PacketTypes.PUBLISH, {"UserProperty": [("a", "1"), ("b", "2")], "SubscriptionIdentifier": 7}),
    (PacketTypes.PUBLISH, {"PayloadFormatIndicator": 1, "TopicAlias": 3}),
    (PacketTypes.CONNECT, {"SessionExpiryInterval": 3600, "ReceiveMaximum": 100}),
]


def _original(packet: int, values: dict[str, Any]) -> Properties:
    p = object.__new__(Properties)
    ORIGINALS["__init__"](p, packet)
    for k, v in values.items():
        ORIGINALS["__setattr__"](p, k, v)
    return p


def _fast(packet: int, values: dict[str, Any]) -> Properties:
    p = Properties(packet)
    for k, v in values.items():
        setattr(p, k, v)
    return p


@pytest.mark.parametrize(("packet", "values"), CASES)
def test_pack_matches_paho(packet: int, values: dict[str, Any]) -> None:
    assert _fast(packet, values).pack() == ORIGINALS["pack"](_original(packet, values))


@pytest.mark.parametrize(("packet", "values"), CASES)
def test_unpack_round_trip_matches_paho(packet: int, values: dict[str, Any]) -> None:
    raw = ORIGINALS["pack"](_original(packet, values))
    fast = Properties(packet)
    fast.unpack(raw)
    orig = object.__new__(Properties)
    ORIGINALS["__init__"](orig, packet)
    ORIGINALS["unpack"](orig, raw)
    names = {n.replace(" ", "") for n in orig.names}
    assert {n: getattr(fast, n) for n in names if hasattr(fast, n)} == {
        n: getattr(orig, n) for n in names if hasattr(orig, n)
    }
    assert fast.isEmpty() == ORIGINALS["isEmpty"](orig) == (not values)


@pytest.mark.parametrize(
    ("packet", "name", "value"),
    [
        (PacketTypes.PUBLISH, "NotAProperty", 1),
        (PacketTypes.PUBLISH, "SessionExpiryInterval", 5),  # wrong packet type
        (PacketTypes.CONNECT, "ContentType", "x"),  # wrong packet type
        (PacketTypes.PUBLISH, "TopicAlias", 0),  # out of range
        (PacketTypes.CONNECT, "ReceiveMaximum", 70000),
    ],
)
def test_refusals_match_paho(packet: int, name: str, value: Any) -> None:
    with pytest.raises(MQTTException):
        setattr(Properties(packet), name, value)
    with pytest.raises(MQTTException):
        ORIGINALS["__setattr__"](_original(packet, {}), name, value)


def test_clear_and_multiple() -> None:
    p = _fast(PacketTypes.PUBLISH, {"UserProperty": [("a", "1")], "ContentType": "x"})
    p.UserProperty = ("b", "2")
    assert p.UserProperty == [("a", "1"), ("b", "2")]
    p.clear()
    assert p.isEmpty()
    assert p.pack() == b"\x00"


def test_publish_info_waits_without_a_condition_made_up_front() -> None:
    """``MQTTMessageInfo`` makes its condition only for a waiter, and waiting still works:
    before, during (from another thread) and after the acknowledgement."""
    import threading

    from paho.mqtt.client import MQTTMessageInfo

    done = MQTTMessageInfo(1)
    assert done._condition is None
    done._set_as_published()
    done.wait_for_publish(1)
    assert done.is_published()

    later = MQTTMessageInfo(2)
    assert not later.is_published() and later._condition is not None
    waiter = threading.Thread(target=later.wait_for_publish, args=(10,))
    waiter.start()
    later._set_as_published()
    waiter.join(10)
    assert not waiter.is_alive() and later.is_published()

    never = MQTTMessageInfo(3)
    never.wait_for_publish(0.05)  # times out quietly, as paho's does
    assert not never.is_published()


def test_caching_matcher_matches_like_paho_and_forgets_on_change() -> None:
    """The per-topic memory gives paho's matches, and a filter added or removed is seen."""
    from paho.mqtt.matcher import MQTTMatcher

    from fnmesh.agent.mqtt import _CachingMatcher

    ours, theirs = _CachingMatcher(), MQTTMatcher()
    topics = ["a/b/c", "a/x/c", "a/b", "z", "$SYS/x"]

    def same() -> None:
        for _ in range(2):  # the second pass is answered from memory
            for t in topics:
                assert sorted(ours.iter_match(t)) == sorted(theirs.iter_match(t)), t

    for f, v in [("a/#", 1), ("a/+/c", 2), ("z", 3)]:
        ours[f], theirs[f] = v, v
        same()
    del ours["a/#"], theirs["a/#"]
    same()
    assert list(ours.iter_match("a/b")) == []


@pytest.mark.parametrize("correlation", [None, b"", b"\x00\x01corr"])
def test_reply_properties_pack_as_paho_would(correlation: bytes | None) -> None:
    from fnmesh.agent.mqtt import reply_properties

    values: dict[str, Any] = {"ContentType": "application/msgpack"}
    if correlation is not None:
        values["CorrelationData"] = correlation
    made = reply_properties("application/msgpack", correlation)
    assert made.pack() == ORIGINALS["pack"](_original(PacketTypes.PUBLISH, values))
    assert made.ContentType == "application/msgpack"
    assert getattr(made, "CorrelationData", None) == correlation
