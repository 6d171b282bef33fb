"""Turning an answer into bytes on the wire."""

from __future__ import annotations

from fnmesh.functions.errors import MessageError
from fnmesh.functions.messages import (
    Encoding,
    ErrorCode,
    ErrorReply,
    Response,
    encode_error,
    encode_response,
)

Result = Response | ErrorReply


def encode_result(result: Result, encoding: Encoding) -> bytes:
    """Bytes of an answer; an output the wire cannot carry becomes an ``internal`` error."""
    if isinstance(result, Response):
        try:
            return encode_response(result, encoding)
        except MessageError as e:
            result = ErrorReply(result.id, ErrorCode.INTERNAL, f"cannot encode the outputs: {e}")
    return encode_error(result, encoding)
