"""Invoking a function from the coordinator's HTTP API, routed like any MQTT request.

The request is published to ``fn/{ns}/{name}/invoke`` for the routers, with a
reply topic under ``replies/coordinator/`` and a fresh CorrelationData; the
answer comes back there. The payload is passed through untouched.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
from typing import Any

from fnmesh.agent.mqtt import MqttClient, properties
from fnmesh.functions.errors import MessageError
from fnmesh.functions.messages import (
    ErrorCode,
    ErrorReply,
    Response,
    decode_reply,
    encode_error,
    peek_envelope,
)
from fnmesh.functions.tensors import Encoding, detect_encoding


class MqttInvoker:
    """Sends requests into the mesh and matches answers by CorrelationData."""

    def __init__(self, client: MqttClient, root: str, client_name: str = "coordinator") -> None:
        self.client = client
        self.root = root
        self.reply_prefix = f"{root}/replies/{client_name}/"
        self._waiting: dict[bytes, asyncio.Future[tuple[bytes, str | None]]] = {}
        self._ids = itertools.count()
        self._salt = os.urandom(4)
        client.subscribe(self.reply_prefix + "#", self._on_reply, qos=1)

    def _on_reply(self, msg: Any) -> None:
        props = getattr(msg, "properties", None)
        corr = getattr(props, "CorrelationData", None)
        fut = self._waiting.pop(corr, None) if corr else None
        if fut is not None and not fut.done():
            fut.set_result((msg.payload, getattr(props, "ContentType", None)))

    async def invoke(
        self, function_id: str, payload: bytes, content_type: str | None, timeout: float
    ) -> tuple[int, bytes, str]:
        """Returns (HTTP status, body, content type)."""
        try:
            encoding = detect_encoding(payload, content_type)
        except MessageError as e:
            err = ErrorReply("", ErrorCode.BAD_REQUEST, str(e))
            return 400, encode_error(err, Encoding.JSON), "application/json"
        corr = self._salt + next(self._ids).to_bytes(8, "big")
        fut: asyncio.Future[tuple[bytes, str | None]] = asyncio.get_running_loop().create_future()
        self._waiting[corr] = fut
        self.client.publish(
            f"{self.root}/fn/{function_id}/invoke",
            payload,
            1,
            False,
            properties(
                content_type=encoding.content_type,
                correlation=corr,
                response_topic=self.reply_prefix + "http",
                expiry=max(1, int(timeout + 0.999)),
            ),
        )
        try:
            async with asyncio.timeout(timeout):
                body, ct = await fut
        except TimeoutError:
            self._waiting.pop(corr, None)
            rid, _ = peek_envelope(payload, content_type)
            err = ErrorReply(
                rid or corr.hex(),
                ErrorCode.TIMEOUT,
                f"no answer from {function_id} in {timeout:.1f} s",
            )
            return 504, encode_error(err, encoding), encoding.content_type
        status = 200
        with contextlib.suppress(MessageError):
            reply = decode_reply(body, ct)
            if not isinstance(reply, Response):
                status = ErrorCode(reply.code).http_status
        return status, body, ct or encoding.content_type
