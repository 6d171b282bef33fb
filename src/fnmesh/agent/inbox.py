"""The node's MQTT inbox: ``{root}/nodes/{node}/invoke/{ns}/{name}`` in, ``replies/...`` out.

The function is the topic's tail, never guessed from the payload. The reply
topic is the MQTT 5 ResponseTopic, or ``reply_to`` in the payload (MQTT 3.1.1);
it must lie under ``{root}/replies/``: any other is refused with a log line
and a counter, so the mesh cannot be used to publish anywhere else. An answer
goes out in the request's encoding and at its QoS, with its CorrelationData.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

import paho.mqtt.client as mqtt

from fnmesh.agent.metrics import AgentMetrics
from fnmesh.agent.mqtt import MqttClient, properties, reply_properties
from fnmesh.agent.replies import Result, encode_result
from fnmesh.agent.service import InvocationService
from fnmesh.functions.messages import (
    Encoding,
    ErrorCode,
    ErrorReply,
)

if TYPE_CHECKING:
    from paho.mqtt.properties import Properties

log = logging.getLogger("fnmesh.agent.inbox")


class MqttSink:
    """The reply address of one MQTT request."""

    __slots__ = ("_correlation", "_inbox", "_msg", "_qos", "_response_topic", "topic")

    def __init__(
        self,
        inbox: Inbox,
        response_topic: str | None,
        correlation: bytes | None,
        qos: int,
        msg: mqtt.MQTTMessage | None = None,
    ):
        self._inbox = inbox
        self._response_topic = response_topic
        self._correlation = correlation
        self._qos = qos
        self._msg = msg
        self.topic: str | None = None

    def accept(self, reply_to: str | None) -> bool:
        topic = self._response_topic or reply_to
        if not topic:
            self._inbox.refuse("missing", "request has no reply topic (ResponseTopic or reply_to)")
            return False
        if not self._inbox.reply_allowed(topic):
            self._inbox.refuse(
                "outside", f"reply topic {topic[:200]!r} is outside {self._inbox.replies}"
            )
            return False
        self.topic = topic
        return True

    def send(self, result: Result, encoding: Encoding) -> None:
        self.send_encoded(encode_result(result, encoding), encoding)

    def spill(self, function_id: str) -> bool:
        """Hand the request, unchanged, to the routers' spill topic; False if it cannot be."""
        msg = self._msg
        if msg is None:
            return False
        props = getattr(msg, "properties", None)
        expiry = getattr(props, "MessageExpiryInterval", None) if props else None
        self._inbox.client.publish(
            f"{self._inbox.spill_prefix}{function_id}",
            msg.payload,
            msg.qos,
            False,
            properties(
                content_type=getattr(props, "ContentType", None) if props else None,
                correlation=self._correlation,
                response_topic=self._response_topic,
                expiry=expiry,
            ),
        )
        return True

    def send_encoded(self, payload: bytes, encoding: Encoding) -> None:
        assert self.topic is not None
        props = reply_properties(encoding.content_type, self._correlation)
        self._inbox.client.publish(self.topic, payload, self._qos, False, props)


class Inbox:
    """Subscribes to this node's invoke topic and feeds the invocation service."""

    def __init__(
        self,
        client: MqttClient,
        service: InvocationService,
        metrics: AgentMetrics,
        *,
        root: str,
        node: str,
    ) -> None:
        self.client = client
        self.service = service
        self.metrics = metrics
        self.prefix = f"{root}/nodes/{node}/invoke/"
        self.spill_inbox = f"{root}/nodes/{node}/spill/"
        self.spill_prefix = f"{root}/spill/"
        self.replies = f"{root}/replies/"

    def start(self) -> None:
        self.client.subscribe(self.prefix + "#", self._on_message, qos=1)
        # Requests spilled here by routers (this node is a cloud replica): never spilled again.
        self.client.subscribe(self.spill_inbox + "#", self._on_spilled, qos=1)

    def reply_allowed(self, topic: str) -> bool:
        return (
            topic.startswith(self.replies)
            and len(topic) > len(self.replies)
            and "+" not in topic
            and "#" not in topic
            and "\x00" not in topic
        )

    def refuse(self, reason: str, message: str) -> None:
        self.metrics.refused(reason)
        log.warning("dropped a request: %s", message)

    def _on_spilled(self, msg: mqtt.MQTTMessage) -> None:
        self._on_message(msg, spilled=True)

    def _on_message(self, msg: mqtt.MQTTMessage, spilled: bool = False) -> None:
        received = time.monotonic()
        props: Properties | None = getattr(msg, "properties", None)
        response_topic = getattr(props, "ResponseTopic", None) if props else None
        correlation = getattr(props, "CorrelationData", None) if props else None
        content_type = getattr(props, "ContentType", None) if props else None
        expiry = getattr(props, "MessageExpiryInterval", None) if props else None
        sink = MqttSink(self, response_topic, correlation, msg.qos, None if spilled else msg)
        # A tail that is not ``ns/name`` names no served function: the service answers it
        # ``not_found`` like any other, with the request's id, encoding and reply topic.
        fid = msg.topic[len(self.spill_inbox if spilled else self.prefix) :]
        try:
            self.service.submit(
                fid,
                msg.payload,
                content_type,
                sink,
                received=received,
                correlation_id=correlation.hex() if correlation else None,
                expires=received + expiry if expiry else None,
                spilled=spilled,
            )
        except Exception:  # nothing a request carries may stop the inbox
            log.exception("unexpected failure handling a request on %s", msg.topic)
            if sink.topic is not None:
                sink.send(ErrorReply("", ErrorCode.INTERNAL, "internal error"), Encoding.JSON)
