"""Invocation messages (v1): requests, responses and error replies, in JSON or msgpack.

Decoding outside bytes is strict and bounded: a payload over the size limit is
refused before it is parsed, and every failure is a :class:`BadRequestError`
(a :class:`MessageError`) that says what was wrong and carries the request's
id and reply topic whenever they can be found, so the caller can answer it.
Unknown top-level keys are ignored, so a newer client can talk to an older node.
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, TypeGuard

import msgpack
import numpy as np

from fnmesh.functions.errors import MessageError
from fnmesh.functions.manifest import TensorSpec
from fnmesh.functions.tensors import (
    Encoding,
    decode_tensor,
    detect_encoding,
    dtype_name,
    encode_tensor,
)

__all__ = [
    "BadRequestError",
    "Encoding",
    "ErrorCode",
    "ErrorReply",
    "Request",
    "Response",
    "Timing",
    "decode_reply",
    "decode_request",
    "encode_error",
    "encode_request",
    "encode_response",
    "peek_envelope",
    "validate_inputs",
]

#: Longest request id accepted, in characters.
MAX_ID_LEN = 256
#: Longest input or output name, in characters (as in the manifest's TensorSpec).
MAX_NAME_LEN = 128
#: Longest MQTT topic, in UTF-8 bytes (the protocol's own limit).
MAX_TOPIC_BYTES = 65535
#: Longest error message sent; longer ones are cut.
MAX_ERROR_MESSAGE = 4096

_INT64 = (-(2**63), 2**63 - 1)
# Looked up once: an enum member read through its class costs a few microseconds on
# cold caches, and every message compares its encoding.
_JSON = Encoding.JSON
#: Per thread: a reusable msgpack packer.
_local = threading.local()


class ErrorCode(StrEnum):
    """What went wrong, as the device sees it; each has one HTTP status."""

    BAD_REQUEST = "bad_request"
    NOT_FOUND = "not_found"
    FORBIDDEN = "forbidden"
    SATURATED = "saturated"
    TIMEOUT = "timeout"
    INTERNAL = "internal"

    @property
    def http_status(self) -> int:
        return _HTTP_STATUS[self]


_HTTP_STATUS = {
    ErrorCode.BAD_REQUEST: 400,
    ErrorCode.NOT_FOUND: 404,
    ErrorCode.FORBIDDEN: 403,
    ErrorCode.SATURATED: 429,
    ErrorCode.TIMEOUT: 504,
    ErrorCode.INTERNAL: 500,
}


class BadRequestError(MessageError):
    """A request is malformed or does not fit the function; answer it with ``bad_request``.

    ``id``, ``reply_to`` and ``encoding`` are the best known (``None`` if they
    could not be found), so the caller can address its answer.
    """

    code = ErrorCode.BAD_REQUEST

    def __init__(
        self,
        message: str,
        *,
        id: str | None = None,
        reply_to: str | None = None,
        encoding: Encoding | None = None,
    ) -> None:
        super().__init__(message)
        self.id = id
        self.reply_to = reply_to
        self.encoding = encoding


# Not frozen, though nothing changes them once made: a frozen dataclass sets each field
# through ``object.__setattr__``, and these are made for every request and answer (about
# 4 us apiece on a node whose caches the previous request's gap has emptied).
# eq=False: a dict of arrays has no meaningful ==, and these are never dict keys.
@dataclass(slots=True, eq=False)
class Request:
    """A decoded invocation request; its arrays are read-only."""

    inputs: dict[str, np.ndarray]
    deadline_ms: int | None = None
    id: str | None = None
    #: Reply topic carried in the payload (MQTT 3.1.1 only).
    reply_to: str | None = None
    encoding: Encoding = Encoding.MSGPACK


@dataclass(slots=True)
class Timing:
    """Where a request's time went, in milliseconds."""

    queue_ms: float
    run_ms: float
    cold_start: bool = False
    spilled: bool = False


@dataclass(slots=True, eq=False)
class Response:
    """A successful answer."""

    id: str
    version: str
    outputs: dict[str, np.ndarray]
    node: str
    timing: Timing


@dataclass(frozen=True, slots=True)
class ErrorReply:
    """A failed answer."""

    id: str
    code: ErrorCode
    message: str


def decode_request(
    payload: bytes, content_type: str | None = None, *, max_payload: int | None = None
) -> Request:
    """Parse and check a request's bytes, or raise :class:`BadRequestError`.

    Tensors are checked for well-formedness only; :func:`validate_inputs` checks
    them against the function. When the payload is too large or does not parse,
    the error's id and reply topic come from :func:`peek_envelope`, over at most
    ``max_payload`` bytes, so refusing never costs more than accepting would.
    """
    if max_payload is not None and len(payload) > max_payload:
        try:
            known: Encoding | None = detect_encoding(payload, content_type)
        except MessageError:
            known = None
        raise _unparsed(
            f"request is {len(payload)} bytes, over this function's limit of {max_payload}",
            payload[:max_payload],
            content_type,
            known,
        )
    try:
        encoding = detect_encoding(payload, content_type)
    except MessageError as e:
        raise _unparsed(str(e), payload, content_type, None) from e
    try:
        obj = _loads(payload, encoding, "request")
    except MessageError as e:
        raise _unparsed(str(e), payload, content_type, encoding) from e
    if type(obj) is not dict:
        raise BadRequestError(
            f"request must be a map with 'inputs', got {_kind(obj)}", encoding=encoding
        )

    rid = obj.get("id")
    reply_to = obj.get("reply_to")
    if rid is not None and not _valid_id(rid):
        raise BadRequestError(
            f"'id' must be a string of at most {MAX_ID_LEN} characters",
            reply_to=reply_to if _valid_topic(reply_to) else None,
            encoding=encoding,
        )
    if reply_to is not None and not _valid_topic(reply_to):
        raise BadRequestError(
            "'reply_to' must be an MQTT topic name (no wildcards, at most 65535 bytes)",
            id=rid,
            encoding=encoding,
        )
    deadline = obj.get("deadline_ms")
    if deadline is not None and (
        type(deadline) is not int or not _INT64[0] <= deadline <= _INT64[1]
    ):
        raise BadRequestError(
            f"'deadline_ms' must be an integer number of milliseconds, got {_kind(deadline)}",
            id=rid,
            reply_to=reply_to,
            encoding=encoding,
        )
    raw = obj.get("inputs")
    try:
        if type(raw) is not dict:
            raise MessageError(
                "request needs 'inputs', a map of input name to tensor"
                if raw is None
                else f"'inputs' must be a map of input name to tensor, got {_kind(raw)}"
            )
        inputs = _decode_tensors(raw, encoding, "input")
    except MessageError as e:
        raise BadRequestError(str(e), id=rid, reply_to=reply_to, encoding=encoding) from e
    return Request(inputs, deadline, rid, reply_to, encoding)


def _unparsed(
    message: str, payload: bytes, content_type: str | None, encoding: Encoding | None
) -> BadRequestError:
    rid, reply_to = peek_envelope(payload, content_type)
    return BadRequestError(message, id=rid, reply_to=reply_to, encoding=encoding)


def validate_inputs(
    request: Request, inputs: Sequence[TensorSpec], *, max_batch: int | None = None
) -> int:
    """Check a request's tensors against a function's inputs; return the batch size.

    No casting: dtype, rank and fixed dimensions must match exactly, dimensions
    with the same symbolic name must agree, and every input's first (batch)
    dimension must be the same. A function whose inputs are all 0-d has batch 1.
    """
    given = request.inputs

    def fail(message: str) -> BadRequestError:
        return BadRequestError(
            message, id=request.id, reply_to=request.reply_to, encoding=request.encoding
        )

    for spec in inputs:
        if spec.name not in given:
            raise fail(f"missing input {spec.name!r} (expected {spec.describe()})")
    declared = {spec.name for spec in inputs}
    if len(given) != len(declared):
        extra = next(name for name in given if name not in declared)
        takes = ", ".join(repr(spec.name) for spec in inputs) or "no inputs"
        raise fail(f"unexpected input {extra!r} (this function takes {takes})")

    batch: int | None = None
    batch_from = ""
    symbols: dict[str, tuple[int, str]] = {}
    for spec in inputs:
        name = spec.name
        arr = given[name]
        if dtype_name(arr.dtype) != spec.dtype or arr.ndim != len(spec.shape):
            raise fail(f"input {name!r}: expected {spec.describe()}, got {_describe(arr)}")
        for axis, (want, have) in enumerate(zip(spec.shape, arr.shape, strict=True)):
            if isinstance(want, int):
                if have != want:
                    raise fail(
                        f"input {name!r}: expected {spec.describe()}, got {_describe(arr)} "
                        f"(dimension {axis} must be {want})"
                    )
                continue
            seen, where = symbols.setdefault(want, (have, name))
            if seen != have:
                other = "an earlier dimension" if where == name else f"input {where!r}"
                raise fail(
                    f"input {name!r}: expected {spec.describe()}, got {_describe(arr)} "
                    f"({want} is {seen} in {other})"
                )
        if arr.ndim:
            if batch is None:
                batch, batch_from = arr.shape[0], name
            elif arr.shape[0] != batch:
                raise fail(
                    f"input {name!r}: batch size {arr.shape[0]}, but input {batch_from!r} has "
                    f"batch size {batch} (expected {spec.describe()})"
                )
    if batch is None:
        return 1
    if batch == 0:
        raise fail(f"input {batch_from!r}: batch size is 0, nothing to run")
    if max_batch is not None and batch > max_batch:
        raise fail(
            f"input {batch_from!r}: batch size {batch} is over this function's "
            f"max_batch of {max_batch}"
        )
    return batch


def encode_request(
    inputs: Mapping[str, np.ndarray],
    encoding: Encoding,
    *,
    id: str | None = None,
    deadline_ms: int | None = None,
    reply_to: str | None = None,
) -> bytes:
    """A request's bytes (for clients and tests)."""
    # The envelope goes first so that peek_envelope finds it even in a cut-off payload.
    obj: dict[str, Any] = {}
    if id is not None:
        obj["id"] = id
    if reply_to is not None:
        obj["reply_to"] = reply_to
    if deadline_ms is not None:
        obj["deadline_ms"] = deadline_ms
    obj["inputs"] = {
        name: encode_tensor(arr, encoding, name=name, kind="input") for name, arr in inputs.items()
    }
    return _dumps(obj, encoding)


def encode_response(resp: Response, encoding: Encoding) -> bytes:
    """A response's bytes. Raises :class:`MessageError` for an output dtype the wire lacks."""
    t = resp.timing
    outputs = {}
    for name, arr in resp.outputs.items():  # a loop, not a comprehension: one call fewer
        outputs[name] = encode_tensor(arr, encoding, name=name)
    obj = {
        "id": resp.id,
        "version": resp.version,
        "outputs": outputs,
        "node": resp.node,
        "timing": {
            "queue_ms": float(t.queue_ms),
            "run_ms": float(t.run_ms),
            "cold_start": bool(t.cold_start),
            "spilled": bool(t.spilled),
        },
    }
    return _dumps(obj, encoding)


def encode_error(err: ErrorReply, encoding: Encoding) -> bytes:
    """An error reply's bytes; never fails, whatever the message holds."""
    message = err.message
    if len(message) > MAX_ERROR_MESSAGE:
        message = message[: MAX_ERROR_MESSAGE - 3] + "..."
    obj = {
        "id": _utf8_clean(err.id),
        "error": {"code": ErrorCode(err.code).value, "message": _utf8_clean(message)},
    }
    return _dumps(obj, encoding)


def decode_reply(payload: bytes, content_type: str | None = None) -> Response | ErrorReply:
    """Parse an answer strictly (for clients and tests), or raise :class:`MessageError`."""
    encoding = detect_encoding(payload, content_type)
    obj = _loads(payload, encoding, "reply")
    if type(obj) is not dict:
        raise MessageError(f"reply must be a map, got {_kind(obj)}")
    rid = _field(obj, "id", str, "reply")
    if "error" in obj:
        err = obj["error"]
        if type(err) is not dict:
            raise MessageError(f"'error' must be a map, got {_kind(err)}")
        code = _field(err, "code", str, "error")
        if code not in _HTTP_STATUS:
            raise MessageError(f"error code {code[:40]!r} is not one of {', '.join(ErrorCode)}")
        return ErrorReply(rid, ErrorCode(code), _field(err, "message", str, "error"))
    outputs = _field(obj, "outputs", dict, "response")
    timing = _field(obj, "timing", dict, "response")
    return Response(
        id=rid,
        version=_field(obj, "version", str, "response"),
        outputs=_decode_tensors(outputs, encoding, "output"),
        node=_field(obj, "node", str, "response"),
        timing=Timing(
            queue_ms=_number(timing, "queue_ms"),
            run_ms=_number(timing, "run_ms"),
            cold_start=_field(timing, "cold_start", bool, "timing"),
            spilled=_field(timing, "spilled", bool, "timing"),
        ),
    )


def peek_envelope(payload: bytes, content_type: str | None) -> tuple[str | None, str | None]:
    """Best-effort ``(id, reply_to)`` of a request that may be malformed or cut off; never raises.

    For answering a request that :func:`decode_request` refused, including one
    too large to parse: the work done is bounded and top-level values other
    than the two wanted are skipped, not decoded.
    """
    found: dict[str, object] = {}
    try:
        try:
            encoding = detect_encoding(payload, content_type)
        except MessageError:
            encoding = detect_encoding(payload, None)
        if encoding is _JSON:
            _peek_json(payload, found)
        else:
            _peek_msgpack(payload, found)
    except Exception:  # best effort by contract: keep whatever was found
        pass
    rid = found.get("id")
    reply_to = found.get("reply_to")
    return (
        rid if _valid_id(rid) else None,
        reply_to if _valid_topic(reply_to) else None,
    )


# --- parsing and serialising -------------------------------------------------------------


def _loads(payload: bytes, encoding: Encoding, what: str) -> object:
    """Parse outside bytes; any failure is a MessageError."""
    if encoding is _JSON:
        try:
            return json.loads(payload.decode("utf-8"))
        except RecursionError as e:
            raise MessageError(f"{what} is not acceptable JSON: nested too deeply") from e
        except ValueError as e:  # also UnicodeDecodeError and over-long integers
            raise MessageError(f"{what} is not valid JSON: {str(e)[:200]}") from e
    n = len(payload)
    try:
        # Every element takes at least one byte, so no header can make the parser
        # allocate more than the payload justifies. (msgpack's own defaults agree;
        # being explicit keeps it true if they change.)
        return msgpack.unpackb(
            payload,
            raw=False,
            strict_map_key=True,
            max_str_len=n,
            max_bin_len=n,
            max_array_len=n,
            max_map_len=n // 2,
            max_ext_len=n,
        )
    except msgpack.StackError as e:
        raise MessageError(f"{what} is not acceptable msgpack: nested too deeply") from e
    except (ValueError, TypeError, OverflowError, RecursionError, msgpack.UnpackException) as e:
        raise MessageError(f"{what} is not valid msgpack: {str(e)[:200]}") from e


def _dumps(obj: object, encoding: Encoding) -> bytes:
    if encoding is _JSON:
        # ensure_ascii keeps any string encodable; non-finite floats never reach here.
        return json.dumps(obj, separators=(",", ":"), allow_nan=False).encode("ascii")
    packer = getattr(_local, "packer", None)
    if packer is None:
        # One per thread: ``packb`` makes a packer, and its buffer, for every message.
        packer = _local.packer = msgpack.Packer(use_bin_type=True)
    return packer.pack(obj)  # type: ignore[no-any-return]


def _decode_tensors(raw: dict[Any, Any], encoding: Encoding, kind: str) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    for name, tensor in raw.items():
        if type(name) is not str or not 0 < len(name) <= MAX_NAME_LEN:
            raise MessageError(
                f"{kind} names must be strings of 1 to {MAX_NAME_LEN} characters, got {_kind(name)}"
            )
        out[name] = decode_tensor(tensor, encoding, name=name, kind=kind)
    return out


def _field(obj: dict[Any, Any], key: str, typ: type, what: str) -> Any:
    value = obj.get(key)
    if type(value) is not typ:
        raise MessageError(f"{what} '{key}' must be a {typ.__name__}, got {_kind(value)}")
    return value


def _number(obj: dict[Any, Any], key: str) -> float:
    value = obj.get(key)
    if type(value) is not float and type(value) is not int:
        raise MessageError(f"timing '{key}' must be a number, got {_kind(value)}")
    return float(value)


def _valid_id(v: object) -> TypeGuard[str]:
    return type(v) is str and len(v) <= MAX_ID_LEN and _is_utf8(v)


def _valid_topic(v: object) -> TypeGuard[str]:
    # An invalid topic would make the answer's publish fail, so it is refused here.
    if type(v) is not str or not v or "+" in v or "#" in v or "\0" in v:
        return False
    try:
        return len(v.encode("utf-8")) <= MAX_TOPIC_BYTES
    except UnicodeEncodeError:  # a lone surrogate from a JSON \ud800 escape
        return False


def _is_utf8(s: str) -> bool:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _utf8_clean(s: str) -> str:
    return s if _is_utf8(s) else s.encode("utf-8", "replace").decode("utf-8")


def _describe(arr: np.ndarray) -> str:
    return f"{dtype_name(arr.dtype) or arr.dtype}[{', '.join(str(d) for d in arr.shape)}]"


def _kind(v: object) -> str:
    """A wire-level type name for error messages (never the untrusted value itself)."""
    if v is None:
        return "nothing"  # JSON null and a missing key look the same after parsing
    return {
        bool: "a boolean",
        int: "an integer",
        float: "a number",
        str: "a string",
        bytes: "binary data",
        list: "a list",
        dict: "a map",
    }.get(type(v), f"a {type(v).__name__}")


# --- peeking -------------------------------------------------------------------------------

_PEEK_KEYS = frozenset(("id", "reply_to"))
#: Most structural tokens (JSON) or top-level entries (msgpack) a peek examines.
_PEEK_BUDGET = 100_000
_WS = re.compile(rb"[ \t\r\n]*")
_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.S)
_STRUCTURAL = re.compile(rb'["\[\]{}]')
_SCALAR = re.compile(rb"[^,}\]]*")


def _peek_json(p: bytes, found: dict[str, object]) -> None:
    """Walk the top-level object, skipping values by bracket counting (no full parse)."""
    pos = _ws(p, 0)
    if p[pos : pos + 1] != b"{":
        return
    pos += 1
    budget = _PEEK_BUDGET
    while budget > 0 and len(found) < len(_PEEK_KEYS):
        pos = _ws(p, pos)
        m = _STRING.match(p, pos)
        if m is None:
            return
        key = json.loads(m.group())
        pos = _ws(p, m.end())
        if p[pos : pos + 1] != b":":
            return
        pos = _ws(p, pos + 1)
        if key in _PEEK_KEYS and p[pos : pos + 1] == b'"':
            m = _STRING.match(p, pos)
            if m is None:
                return
            found[key] = json.loads(m.group())
            pos = m.end()
        else:
            pos, budget = _skip_json(p, pos, budget)
            if pos < 0:
                return
        pos = _ws(p, pos)
        if p[pos : pos + 1] != b",":
            return
        pos += 1


def _skip_json(p: bytes, pos: int, budget: int) -> tuple[int, int]:
    """The end of the JSON value at ``pos`` (-1 if unclosed), and the budget left."""
    c = p[pos : pos + 1]
    if c == b'"':
        m = _STRING.match(p, pos)
        return (m.end() if m else -1), budget - 1
    if c not in (b"{", b"["):
        return _SCALAR.match(p, pos).end(), budget - 1  # type: ignore[union-attr]
    depth = 0
    while budget > 0:
        budget -= 1
        m = _STRUCTURAL.search(p, pos)
        if m is None:
            return -1, budget
        ch = p[m.start()]
        if ch == 0x22:  # a string may hold brackets: jump over it whole
            s = _STRING.match(p, m.start())
            if s is None:
                return -1, budget
            pos = s.end()
            continue
        depth += 1 if ch in (0x5B, 0x7B) else -1
        pos = m.end()
        if depth == 0:
            return pos, budget
    return -1, budget


def _ws(p: bytes, pos: int) -> int:
    return _WS.match(p, pos).end()  # type: ignore[union-attr]


def _peek_msgpack(p: bytes, found: dict[str, object]) -> None:
    """Read the top-level map's keys, skipping values other than the two wanted."""
    n = len(p)
    unpacker = msgpack.Unpacker(
        raw=False,
        strict_map_key=True,
        max_buffer_size=max(n, 1),
        max_str_len=n,
        max_bin_len=n,
        max_array_len=n,
        max_map_len=n // 2,
        max_ext_len=n,
    )
    unpacker.feed(p)
    for _ in range(min(unpacker.read_map_header(), _PEEK_BUDGET)):
        key = unpacker.unpack()
        if type(key) is str and key in _PEEK_KEYS:
            found[key] = unpacker.unpack()
            if len(found) == len(_PEEK_KEYS):
                return
        else:
            unpacker.skip()
