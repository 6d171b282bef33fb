"""Invocation messages: round trips, and hostile bytes that must only ever be refused cleanly."""

from __future__ import annotations

import json
import math
import os
import time
from typing import Any

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from fnmesh.functions.errors import MessageError
from fnmesh.functions.manifest import DTYPES, TensorSpec
from fnmesh.functions.messages import (
    BadRequestError,
    ErrorCode,
    ErrorReply,
    Request,
    Response,
    Timing,
    decode_reply,
    decode_request,
    encode_error,
    encode_request,
    encode_response,
    peek_envelope,
    validate_inputs,
)
from fnmesh.functions.tensors import (
    MAX_ELEMENTS,
    Encoding,
    decode_tensor,
    detect_encoding,
    dtype_name,
    encode_tensor,
)

#: Multiplies every property test's example count (FNMESH_TEST_SCALE=10 for a long soak).
SCALE = float(os.environ.get("FNMESH_TEST_SCALE", "1"))


def examples(n: int) -> settings:
    return settings(
        max_examples=max(1, int(n * SCALE)),
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


ENCODINGS = list(Encoding)
CONTENT_TYPES = {Encoding.JSON: "application/json", Encoding.MSGPACK: "application/msgpack"}

# --- strategies --------------------------------------------------------------------------


@st.composite
def wire_arrays(draw: st.DrawFn) -> np.ndarray:
    """Any array the wire can carry, in any byte order and memory layout."""
    dtype = np.dtype(draw(st.sampled_from(DTYPES)))
    shape = draw(hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=4))
    arr: np.ndarray = draw(hnp.arrays(dtype, shape))
    if dtype.itemsize > 1 and draw(st.booleans()):
        arr = arr.astype(dtype.newbyteorder(">"))
    if arr.ndim >= 2 and draw(st.booleans()):
        arr = arr.T  # not C-contiguous
    return arr


names = st.text(st.characters(codec="utf-8"), min_size=1, max_size=12)
ids = st.text(st.characters(codec="utf-8"), max_size=40)
topics = st.text(st.characters(codec="utf-8", exclude_characters="+#\0"), min_size=1, max_size=30)

scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats()
    | st.text(max_size=8)
    | st.binary(max_size=8)
)
junk = st.recursive(
    scalars,
    lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=6), c, max_size=4),
    max_leaves=12,
)
tensor_ish = st.fixed_dictionaries(
    {
        "dtype": st.sampled_from(DTYPES) | junk,
        "shape": st.lists(st.integers(-1, 5) | st.sampled_from([2**31, 2**40, True]), max_size=9)
        | junk,
        "data": junk
        | st.binary(max_size=64)
        | st.lists(
            st.integers(-300, 300)
            | st.floats()
            | st.booleans()
            | st.sampled_from(["NaN", "Infinity", "-Infinity", "nan", None]),
            max_size=20,
        ),
    },
    optional={"extra": junk},
)
request_ish = st.fixed_dictionaries(
    {},
    optional={
        "inputs": st.dictionaries(st.text(max_size=5), tensor_ish | junk, max_size=3) | junk,
        "id": ids | junk,
        "deadline_ms": st.integers(-(2**63), 2**63 - 1) | junk,
        "reply_to": topics | junk,
        "future_field": junk,
    },
)


def dumps(obj: Any, encoding: Encoding) -> bytes:
    """Serialise a test structure (bytes become hex strings in JSON)."""
    if encoding == Encoding.JSON:
        return json.dumps(obj, default=lambda b: b.hex()).encode()
    return msgpack.packb(obj, use_bin_type=True)


def through_the_wire(obj: Any, encoding: Encoding) -> Any:
    """Serialise and parse again, strictly: what encoders produce must be standard."""
    if encoding == Encoding.JSON:
        return json.loads(json.dumps(obj, allow_nan=False))
    return msgpack.unpackb(msgpack.packb(obj, use_bin_type=True), raw=False)


def assert_same_array(got: np.ndarray, want: np.ndarray) -> None:
    assert got.dtype == want.dtype.newbyteorder("=")
    assert got.dtype.isnative
    assert got.shape == want.shape
    assert not got.flags.writeable
    assert np.array_equal(got, want, equal_nan=want.dtype.kind == "f")


def assert_refusal_answerable(err: MessageError) -> None:
    """Whatever went wrong, an error reply for it can be encoded and read back."""
    assert isinstance(err, BadRequestError)
    for enc in ENCODINGS:
        reply = ErrorReply(err.id or "", err.code, str(err))
        back = decode_reply(encode_error(reply, enc), CONTENT_TYPES[enc])
        assert isinstance(back, ErrorReply)
        assert back.code is ErrorCode.BAD_REQUEST
        assert back.id == (err.id or "")


# --- round trips -------------------------------------------------------------------------


@examples(300)
@given(arr=wire_arrays(), encoding=st.sampled_from(ENCODINGS))
def test_tensor_round_trip(arr: np.ndarray, encoding: Encoding) -> None:
    assert_same_array(
        decode_tensor(through_the_wire(encode_tensor(arr, encoding), encoding), encoding), arr
    )


@examples(100)
@given(arr=wire_arrays())
def test_json_nested_data_equals_flat(arr: np.ndarray) -> None:
    nested = {"dtype": dtype_name(arr.dtype), "shape": list(arr.shape), "data": arr.tolist()}
    assert_same_array(decode_tensor(json.loads(json.dumps(nested)), Encoding.JSON), arr)


@examples(100)
@given(
    inputs=st.dictionaries(names, wire_arrays(), max_size=3),
    encoding=st.sampled_from(ENCODINGS),
    rid=st.none() | ids,
    deadline=st.none() | st.integers(-(2**63), 2**63 - 1),
    reply_to=st.none() | topics,
    with_content_type=st.booleans(),
)
def test_request_round_trip(
    inputs: dict[str, np.ndarray],
    encoding: Encoding,
    rid: str | None,
    deadline: int | None,
    reply_to: str | None,
    with_content_type: bool,
) -> None:
    payload = encode_request(inputs, encoding, id=rid, deadline_ms=deadline, reply_to=reply_to)
    req = decode_request(payload, CONTENT_TYPES[encoding] if with_content_type else None)
    assert (req.id, req.deadline_ms, req.reply_to, req.encoding) == (
        rid,
        deadline,
        reply_to,
        encoding,
    )
    assert req.inputs.keys() == inputs.keys()
    for name, arr in inputs.items():
        assert_same_array(req.inputs[name], arr)
    assert peek_envelope(payload, None) == (rid, reply_to)


@examples(100)
@given(
    outputs=st.dictionaries(names, wire_arrays(), max_size=3),
    encoding=st.sampled_from(ENCODINGS),
    rid=ids,
    timing=st.builds(
        Timing,
        st.floats(0, 1e6),
        st.floats(0, 1e6),
        st.booleans(),
        st.booleans(),
    ),
)
def test_response_round_trip(
    outputs: dict[str, np.ndarray], encoding: Encoding, rid: str, timing: Timing
) -> None:
    resp = Response(id=rid, version="1.2.3", outputs=outputs, node="edge-1", timing=timing)
    back = decode_reply(encode_response(resp, encoding))
    assert isinstance(back, Response)
    assert (back.id, back.version, back.node, back.timing) == (rid, "1.2.3", "edge-1", timing)
    assert back.outputs.keys() == outputs.keys()
    for name, arr in outputs.items():
        assert_same_array(back.outputs[name], arr)


@examples(200)
@given(
    rid=st.text(st.characters(exclude_categories=())),
    message=st.text(st.characters(exclude_categories=())),
    code=st.sampled_from(list(ErrorCode)),
    encoding=st.sampled_from(ENCODINGS),
)
def test_error_reply_always_encodes(
    rid: str, message: str, code: ErrorCode, encoding: Encoding
) -> None:
    """Lone surrogates (from JSON \\ud800 escapes) and huge messages still make a reply."""
    back = decode_reply(encode_error(ErrorReply(rid, code, message), encoding))
    assert isinstance(back, ErrorReply)
    assert back.code is code
    assert len(back.message) <= 4096


def test_non_finite_floats_in_json_are_strings() -> None:
    arr = np.array([np.nan, np.inf, -np.inf, 1.5], dtype=np.float32)
    wire = encode_tensor(arr, Encoding.JSON)
    assert wire["data"] == ["NaN", "Infinity", "-Infinity", 1.5]
    json.dumps(wire, allow_nan=False)  # strict JSON, no bare NaN tokens
    # What other writers send for them is read too: null (JavaScript) and bare tokens (Python).
    loose = json.loads('{"dtype": "float64", "shape": [3], "data": [null, NaN, -Infinity]}')
    out = decode_tensor(loose, Encoding.JSON)
    assert math.isnan(out[0]) and math.isnan(out[1]) and out[2] == -math.inf


def test_zero_dim_and_empty_tensors() -> None:
    for enc in ENCODINGS:
        for arr in (
            np.float32(2.5).reshape(()),
            np.zeros((0, 64), np.int8),
            np.zeros((3, 0), bool),
        ):
            req = decode_request(encode_request({"x": arr}, enc))
            assert_same_array(req.inputs["x"], arr)
    bare = {"dtype": "int32", "shape": [], "data": 7}  # a 0-d tensor's nested form
    assert decode_tensor(bare, Encoding.JSON) == 7
    assert decode_tensor(
        {"dtype": "int32", "shape": [2, 0], "data": [[], []]}, Encoding.JSON
    ).shape == (2, 0)


def test_msgpack_data_is_not_copied() -> None:
    payload = encode_request(
        {"x": np.arange(64, dtype=np.float32).reshape(1, 64)}, Encoding.MSGPACK
    )
    arr = decode_request(payload).inputs["x"]
    assert arr.base is not None and not arr.flags.writeable
    with pytest.raises(ValueError):
        arr[0, 0] = 1.0


# --- hostile input -----------------------------------------------------------------------


def check_hostile(payload: bytes, content_type: str | None) -> None:
    """decode_request either accepts or raises an answerable BadRequestError; peek agrees."""
    peeked = peek_envelope(payload, content_type)
    try:
        req = decode_request(payload, content_type, max_payload=1 << 20)
    except MessageError as e:
        assert_refusal_answerable(e)
        return
    assert isinstance(req, Request)
    assert peeked == (req.id, req.reply_to)
    for arr in req.inputs.values():
        assert dtype_name(arr.dtype) in DTYPES and not arr.flags.writeable


@examples(300)
@given(
    payload=st.binary(max_size=200),
    content_type=st.sampled_from(
        [None, "application/json", "application/msgpack", "text/plain", "", "application/json; x"]
    ),
)
def test_random_bytes_refused_cleanly(payload: bytes, content_type: str | None) -> None:
    check_hostile(payload, content_type)


@examples(300)
@given(obj=junk | request_ish, encoding=st.sampled_from(ENCODINGS), sniff=st.booleans())
def test_malformed_structures_refused_cleanly(obj: Any, encoding: Encoding, sniff: bool) -> None:
    check_hostile(dumps(obj, encoding), None if sniff else CONTENT_TYPES[encoding])


@examples(200)
@given(obj=request_ish, encoding=st.sampled_from(ENCODINGS), cut=st.integers(0, 400))
def test_truncated_payloads_refused_cleanly(obj: Any, encoding: Encoding, cut: int) -> None:
    payload = dumps(obj, encoding)
    assume(cut < len(payload))
    check_hostile(payload[:cut], None)


def _json(obj: Any) -> bytes:
    return json.dumps(obj).encode()


def _mp(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def _tensor(dtype: str = "float32", shape: Any = (1, 4), data: Any = None, **extra: Any) -> Any:
    if data is None:
        data = [0.5] * math.prod(shape)
    return {"dtype": dtype, "shape": list(shape), "data": data, **extra}


def _req(tensor: Any, **top: Any) -> bytes:
    return _json({"id": "req-1", "inputs": {"image": tensor}, **top})


DEEP = 100_000
HOSTILE: list[tuple[str, bytes, str | None, str]] = [
    # (what, payload, content type, a phrase the refusal must contain)
    ("huge shape", _req(_tensor(shape=[2**40, 2**40], data=[])), None, "over the limit"),
    ("many elements", _req(_tensor(shape=[2**16, 2**16, 2], data=[])), None, "elements, over"),
    ("rank 9", _req(_tensor(shape=[1] * 9, data=[1.0])), None, "rank 9"),
    ("negative dim", _req(_tensor(shape=[-1, 4], data=[])), None, "non-negative"),
    ("bool dim", _req(_tensor(shape=[True, 4], data=[0.5] * 4)), None, "non-negative integers"),
    ("float dim", _req(_tensor(shape=[1.0, 4], data=[0.5] * 4)), None, "non-negative integers"),
    ("shape not a list", _req(_tensor(shape=(), data=1) | {"shape": 4}), None, "shape must be"),
    ("unknown dtype", _req(_tensor(dtype="float128")), None, "'float128' is not one of"),
    ("dtype not a string", _req(_tensor() | {"dtype": 32}), None, "dtype 32 is not"),
    ("extra tensor key", _req(_tensor(order="F")), None, "unexpected key 'order'"),
    ("missing data", _req({"dtype": "float32", "shape": [1]}), None, "missing 'data'"),
    ("tensor not a map", _req([1, 2, 3]), None, "must be a map"),
    ("data a map", _req(_tensor(data={"a": 1})), None, "data must be a list of numbers, got a map"),
    ("data a string", _req(_tensor(data="AAAA")), None, "data must be a list of numbers, got 'AAAA'"),
    ("dtype binary", _mp({"inputs": {"x": _tensor(dtype=b"float32")}}), None, "dtype 7 bytes"),
    ("dtype a list", _req(_tensor() | {"dtype": ["float32"] * 20}), None, "a list of 20 items"),
    ("too few elements", _req(_tensor(shape=[1, 64], data=[0.5] * 63)), None,
     "input 'image': data has 63 elements, shape [1, 64] needs 64"),
    ("ragged nesting", _req(_tensor(shape=[2, 2], data=[[1.0, 2.0], [3.0]])), None,
     "does not match shape [2, 2] at depth 1"),
    ("too deep nesting", _req(_tensor(shape=[2], data=[[1.0], [2.0]])), None, "got list"),
    ("nested 0-d", _req(_tensor(shape=[], data=[[1.0]])), None, "nested"),
    ("string value", _req(_tensor(data=[0.5, "1", 0.5, 0.5])), None, "'1'"),
    ("lowercase nan", _req(_tensor(data=[0.5, "nan", 0.5, 0.5])), None, "'nan'"),
    ("uint8 overflow", _req(_tensor(dtype="uint8", data=[0, 1, 2, 256])), None, "range of uint8"),
    ("uint8 negative", _req(_tensor(dtype="uint8", data=[0, 1, 2, -1])), None, "range of uint8"),
    ("int64 overflow", _req(_tensor(dtype="int64", data=[2**63] * 4)), None, "range of int64"),
    ("bool as int", _req(_tensor(dtype="int32", data=[1, True, 0, 0])), None, "got boolean"),
    ("float as int", _req(_tensor(dtype="int32", data=[1, 1.5, 0, 0])), None, "integers"),
    ("int as bool", _req(_tensor(dtype="bool", data=[1, 0, 0, 0])), None, "true or false"),
    ("bool as float", _req(_tensor(data=[True, 0.5, 0.5, 0.5])), None, "boolean"),
    ("NaN in int", _req(_tensor(dtype="int8", data=["NaN", 0, 0, 0])), None, "got string"),
    ("float16 overflow", _req(_tensor(dtype="float16", data=[1e5, 0, 0, 0])), None,
     "too large for float16"),
    ("float64 overflow", b'{"inputs":{"x":{"dtype":"float64","shape":[1],"data":[1' + b"0" * 400
     + b"]}}}", None, "too large"),
    ("huge integer", b'{"inputs":{}, "deadline_ms": 1' + b"0" * 5000 + b"}", None, "not valid JSON"),
    ("msgpack data as list", _mp({"inputs": {"x": _tensor()}}), None, "must be bin"),
    ("msgpack short data", _mp({"inputs": {"x": _tensor(data=b"\0" * 15)}}), None,
     "data is 15 bytes, float32[1, 4] needs 16"),
    ("msgpack bool byte 2", _mp({"inputs": {"x": _tensor("bool", data=b"\0\1\2\0")}}), None,
     "0 or 1"),
    ("not a map", _json([1, 2]), "application/json", "must be a map with 'inputs', got a list"),
    ("no inputs", _json({"id": "a"}), None, "needs 'inputs'"),
    ("inputs a list", _json({"inputs": []}), None, "'inputs' must be a map"),
    ("empty input name", _json({"inputs": {"": _tensor()}}), None, "names must be strings"),
    ("long input name", _json({"inputs": {"x" * 129: _tensor()}}), None, "names must be"),
    ("binary input name", _mp({"inputs": {b"x": _tensor(data=b"\0" * 16)}}), None, "names"),
    ("int map key", b"\x81\x01\x02", None, "not valid msgpack"),
    ("id not a string", _json({"id": 7, "inputs": {}}), None, "'id' must be a string"),
    ("id too long", _json({"id": "x" * 257, "inputs": {}}), None, "at most 256"),
    ("id lone surrogate", b'{"id": "\\ud800", "inputs": {}}', None, "'id'"),
    ("deadline a float", _json({"deadline_ms": 1.5, "inputs": {}}), None, "deadline_ms"),
    ("deadline a bool", _json({"deadline_ms": True, "inputs": {}}), None, "deadline_ms"),
    ("deadline NaN", b'{"deadline_ms": NaN, "inputs": {}}', None, "deadline_ms"),
    ("deadline huge", _json({"deadline_ms": 2**70, "inputs": {}}), None, "deadline_ms"),
    ("reply_to wildcard", _json({"reply_to": "a/+/b", "inputs": {}}), None, "reply_to"),
    ("reply_to empty", _json({"reply_to": "", "inputs": {}}), None, "reply_to"),
    ("reply_to a list", _mp({"reply_to": ["a"], "inputs": {}}), None, "reply_to"),
    ("reply_to lone surrogate", b'{"reply_to": "\\udc00", "inputs": {}}', None, "reply_to"),
    ("deep JSON", b"[" * DEEP + b"]" * DEEP, "application/json", "nested too deeply"),
    ("deep JSON object", b'{"a":' * DEEP + b"1" + b"}" * DEEP, None, "nested too deeply"),
    ("deep JSON data", b'{"inputs":{"x":{"dtype":"float32","shape":[1],"data":'
     + b"[" * DEEP + b"]" * DEEP + b"}}}", None, "nested too deeply"),
    ("deep msgpack", b"\x91" * DEEP + b"\xc0", None, "nested too deeply"),
    ("deep msgpack maps", b"\x81\xa1a" * DEEP + b"\xc0", None, "nested too deeply"),
    ("huge array header", b"\xdd\xff\xff\xff\xff", None, "not valid msgpack"),
    ("huge bin header", b"\x81\xa6inputs\xc6\xff\xff\xff\xff", None, "not valid msgpack"),
    ("trailing bytes", _mp({"inputs": {}}) + b"\x00", None, "not valid msgpack"),
    ("truncated msgpack", _mp({"inputs": {"x": _tensor(data=b"\0" * 16)}})[:-3], None, "msgpack"),
    ("invalid UTF-8", b'{"inputs": {}, "id": "\xff"}', None, "not valid JSON"),
    ("UTF-8 BOM", b'\xef\xbb\xbf{"inputs": {}}', "application/json", "not valid JSON"),
    ("wrong content type", _json({"inputs": {}}), "text/plain", "unsupported content type"),
    ("form content type", _json({"inputs": {}}), "application/x-www-form-urlencoded",
     "use application/json"),
    ("msgpack said JSON", _mp({"inputs": {}}), "application/json", "not valid JSON"),
    ("JSON said msgpack", _json({"inputs": {}}), "application/msgpack", "msgpack"),
    ("empty payload", b"", None, "msgpack"),
    ("whitespace only", b"  \n", None, "msgpack"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("payload", "content_type", "phrase"),
    [pytest.param(p, ct, phrase, id=what) for what, p, ct, phrase in HOSTILE],
)
def test_hostile_request_refused(payload: bytes, content_type: str | None, phrase: str) -> None:
    t0 = time.perf_counter()
    with pytest.raises(BadRequestError) as caught:
        decode_request(payload, content_type, max_payload=1 << 20)
    assert phrase in str(caught.value)
    assert len(str(caught.value)) < 400  # never echoes a hostile payload back
    assert_refusal_answerable(caught.value)
    peek_envelope(payload, content_type)
    assert time.perf_counter() - t0 < 2.0


def test_refusal_carries_the_request_id() -> None:
    payload = _json({"id": "req-9", "reply_to": "dev/7/reply", "inputs": {"x": [1]}})
    with pytest.raises(BadRequestError) as caught:
        decode_request(payload)
    err = caught.value
    assert (err.id, err.reply_to, err.encoding) == ("req-9", "dev/7/reply", Encoding.JSON)
    assert "input 'x'" in str(err)


def test_refusal_of_unparsable_payload_still_finds_the_envelope() -> None:
    for enc in ENCODINGS:
        payload = encode_request(
            {"x": np.ones((4, 64), np.float32)}, enc, id="req-5", reply_to="dev/5/reply"
        )
        for broken, limit in ((payload[:-10], None), (payload, len(payload) - 1)):
            with pytest.raises(BadRequestError) as caught:
                decode_request(broken, max_payload=limit)
            err = caught.value
            assert (err.id, err.reply_to, err.encoding) == ("req-5", "dev/5/reply", enc)


def test_refusal_of_bad_id_keeps_the_reply_topic() -> None:
    with pytest.raises(BadRequestError) as caught:
        decode_request(_json({"id": 5, "reply_to": "dev/1/reply", "inputs": {}}))
    assert (caught.value.id, caught.value.reply_to) == (None, "dev/1/reply")


def test_oversized_refused_before_parsing(monkeypatch: pytest.MonkeyPatch) -> None:
    import fnmesh.functions.messages as messages

    def no_parse(*_: object) -> object:
        raise AssertionError("parsed an oversized payload")

    monkeypatch.setattr(messages, "_loads", no_parse)
    with pytest.raises(BadRequestError, match="2049 bytes, over this function's limit of 2048"):
        decode_request(b"{" + b" " * 2048, max_payload=2048)


def test_unknown_top_level_keys_ignored() -> None:
    arr = np.ones((1, 4), np.float32)
    for enc in ENCODINGS:
        payload = encode_request({"x": arr}, enc)
        obj = json.loads(payload) if enc == Encoding.JSON else msgpack.unpackb(payload)
        obj["priority"] = {"from": "the future"}
        req = decode_request(dumps(obj, enc))
        assert_same_array(req.inputs["x"], arr)


# --- peek_envelope -----------------------------------------------------------------------


@examples(100)
@given(
    encoding=st.sampled_from(ENCODINGS),
    rid=ids,
    reply_to=topics,
    cut=st.integers(0, 10_000),
)
def test_peek_never_wrong_on_cut_payloads(
    encoding: Encoding, rid: str, reply_to: str, cut: int
) -> None:
    payload = encode_request(
        {"image": np.ones((2, 64), np.float32)}, encoding, id=rid, reply_to=reply_to
    )
    got_id, got_reply = peek_envelope(payload[:cut], None)
    assert got_id in (None, rid)
    assert got_reply in (None, reply_to)
    if cut >= len(payload) - 1 or (encoding == Encoding.MSGPACK and cut > 400):
        assert (got_id, got_reply) == (rid, reply_to)


def test_peek_finds_envelope_after_a_broken_tensor() -> None:
    payload = (
        b'{"inputs": {"x": {"dtype": "float32", "shape": [2], "data": [1,,2 "]"]}},'
        b' "reply_to": "dev/1/reply", "id": "a\\"b"}'
    )
    assert peek_envelope(payload, "application/json") == ('a"b', "dev/1/reply")
    assert peek_envelope(payload, "text/weird") == ('a"b', "dev/1/reply")


def test_peek_refuses_unusable_reply_topics() -> None:
    for bad in ("a/#", "a/+/b", "", "x\0y"):
        payload = _json({"id": "a", "reply_to": bad, "inputs": {}})
        assert peek_envelope(payload, None) == ("a", None)


def test_peek_is_bounded_on_hostile_payloads() -> None:
    hostile = [
        b'{"inputs": ' + b"[" * 2_000_000,
        b'{"inputs": ' + b"[]," * 2_000_000,
        b"\xdf\xff\xff\xff\xff" + b"\xc0" * 2_000_000,
        b"\x91" * 2_000_000,
    ]
    for payload in hostile:
        t0 = time.perf_counter()
        assert peek_envelope(payload, None) == (None, None)
        assert time.perf_counter() - t0 < 2.0


# --- detect_encoding and error codes ---------------------------------------------------------


@pytest.mark.parametrize(
    ("payload", "content_type", "expected"),
    [
        (b"\x81", "application/json", Encoding.JSON),
        (b"{", "application/msgpack", Encoding.MSGPACK),
        (b"{", "application/x-msgpack", Encoding.MSGPACK),
        (b"{", "Application/MsgPack", Encoding.MSGPACK),
        (b"\x81", "application/json; charset=utf-8", Encoding.JSON),
        (b"\x81", " application/json ;charset=UTF-8", Encoding.JSON),
        (b'{"inputs": {}}', None, Encoding.JSON),
        (b' \r\n\t{"inputs": {}}', None, Encoding.JSON),
        (b'{"inputs": {}}', "", Encoding.JSON),
        (b"\x81\xa6inputs\x80", None, Encoding.MSGPACK),
        (b"[1]", None, Encoding.MSGPACK),
        (b"", None, Encoding.MSGPACK),
    ],
)
def test_detect_encoding(payload: bytes, content_type: str | None, expected: Encoding) -> None:
    assert detect_encoding(payload, content_type) is expected


@pytest.mark.parametrize("content_type", ["text/plain", "application/xml", "json", "*/*"])
def test_detect_encoding_refuses_unknown_content_types(content_type: str) -> None:
    with pytest.raises(MessageError, match="unsupported content type"):
        detect_encoding(b"{}", content_type)


def test_error_codes_and_http_status() -> None:
    assert {c.value: c.http_status for c in ErrorCode} == {
        "bad_request": 400,
        "not_found": 404,
        "forbidden": 403,
        "saturated": 429,
        "timeout": 504,
        "internal": 500,
    }


def test_content_type_of_an_encoding() -> None:
    for enc in ENCODINGS:
        assert detect_encoding(b"", enc.content_type) is enc


def test_long_error_message_is_cut() -> None:
    reply = ErrorReply("a", ErrorCode.INTERNAL, "x" * 100_000)
    back = decode_reply(encode_error(reply, Encoding.MSGPACK))
    assert isinstance(back, ErrorReply)
    assert len(back.message) == 4096 and back.message.endswith("...")


GOOD_TIMING = {"queue_ms": 1, "run_ms": 2.5, "cold_start": False, "spilled": True}
GOOD_RESPONSE = {"id": "a", "version": "1.0.0", "outputs": {}, "node": "n", "timing": GOOD_TIMING}
BAD_REPLIES: list[tuple[str, Any, str]] = [
    ("not a map", [1], "reply must be a map"),
    ("no id", {"error": {"code": "timeout", "message": "m"}}, "reply 'id' must be a str"),
    ("error not a map", {"id": "a", "error": "boom"}, "'error' must be a map"),
    ("unknown code", {"id": "a", "error": {"code": "oops", "message": "m"}}, "'oops' is not one"),
    ("message not a string", {"id": "a", "error": {"code": "timeout", "message": 1}}, "message"),
    ("no outputs", {k: v for k, v in GOOD_RESPONSE.items() if k != "outputs"}, "'outputs'"),
    ("timing bool", GOOD_RESPONSE | {"timing": GOOD_TIMING | {"run_ms": True}}, "'run_ms'"),
    ("cold_start int", GOOD_RESPONSE | {"timing": GOOD_TIMING | {"cold_start": 1}}, "cold_start"),
    ("bad output", GOOD_RESPONSE | {"outputs": {"y": {"dtype": "float32"}}}, "output 'y'"),
]  # fmt: skip


@pytest.mark.parametrize(("obj", "phrase"), [pytest.param(o, p, id=w) for w, o, p in BAD_REPLIES])
def test_decode_reply_is_strict(obj: Any, phrase: str) -> None:
    for enc in ENCODINGS:
        with pytest.raises(MessageError) as caught:
            decode_reply(dumps(obj, enc), CONTENT_TYPES[enc])
        assert phrase in str(caught.value)
    assert isinstance(decode_reply(dumps(GOOD_RESPONSE, Encoding.JSON)), Response)


def test_unsendable_output_dtype_is_a_message_error() -> None:
    resp = Response("a", "1.0.0", {"label": np.array(["cat"])}, "n", Timing(0.0, 0.0))
    with pytest.raises(MessageError, match="output 'label'"):
        encode_response(resp, Encoding.JSON)


# --- validate_inputs -----------------------------------------------------------------------


def spec(name: str, dtype: str, *shape: int | str) -> TensorSpec:
    return TensorSpec(name=name, dtype=dtype, shape=shape)


IMAGE = spec("image", "float32", "N", 64)
MASK = spec("mask", "uint8", "N", 8)
TWO = (IMAGE, MASK)


def f32(*shape: int) -> np.ndarray:
    return np.zeros(shape, np.float32)


def u8(*shape: int) -> np.ndarray:
    return np.zeros(shape, np.uint8)


VALID: list[tuple[str, tuple[TensorSpec, ...], dict[str, np.ndarray], int]] = [
    ("two inputs", TWO, {"image": f32(3, 64), "mask": u8(3, 8)}, 3),
    ("fixed batch", (spec("image", "float32", 1, 64),), {"image": f32(1, 64)}, 1),
    ("0-d only", (spec("t", "float64"),), {"t": np.zeros((), np.float64)}, 1),
    ("0-d and batched", (spec("t", "float64"), IMAGE), {"t": np.zeros(()), "image": f32(5, 64)}, 5),
    ("no inputs", (), {}, 1),
]  # fmt: skip


@pytest.mark.parametrize(
    ("specs", "inputs", "batch"), [pytest.param(*row[1:], id=row[0]) for row in VALID]
)
def test_validate_inputs_accepts(
    specs: tuple[TensorSpec, ...], inputs: dict[str, np.ndarray], batch: int
) -> None:
    assert validate_inputs(Request(inputs), specs, max_batch=32) == batch


INVALID: list[tuple[str, tuple[TensorSpec, ...], dict[str, np.ndarray], int | None, list[str]]] = [
    ("wrong dtype", TWO, {"image": np.zeros((1, 64)), "mask": u8(1, 8)}, None,
     ["input 'image': expected float32[N, 64], got float64[1, 64]"]),
    ("wrong rank", TWO, {"image": f32(1, 64, 1), "mask": u8(1, 8)}, None,
     ["input 'image': expected float32[N, 64], got float32[1, 64, 1]"]),
    ("0-d given", TWO, {"image": f32(), "mask": u8(1, 8)}, None,
     ["input 'image': expected float32[N, 64], got float32[]"]),
    ("wrong fixed dim", TWO, {"image": f32(1, 63), "mask": u8(1, 8)}, None,
     ["input 'image': expected float32[N, 64], got float32[1, 63]", "dimension 1 must be 64"]),
    ("missing input", TWO, {"image": f32(1, 64)}, None,
     ["missing input 'mask'", "expected uint8[N, 8]"]),
    ("extra input", TWO, {"image": f32(1, 64), "mask": u8(1, 8), "bias": f32(1)}, None,
     ["unexpected input 'bias'", "takes 'image', 'mask'"]),
    ("symbolic batch mismatch", TWO, {"image": f32(2, 64), "mask": u8(3, 8)}, None,
     ["input 'mask': expected uint8[N, 8], got uint8[3, 8]", "N is 2 in input 'image'"]),
    ("batch mismatch", (IMAGE, spec("mask", "uint8", "B", 8)),
     {"image": f32(2, 64), "mask": u8(3, 8)}, None,
     ["input 'mask': batch size 3, but input 'image' has batch size 2", "expected uint8[B, 8]"]),
    ("fixed batch mismatch", (IMAGE, spec("mask", "uint8", 1, 8)),
     {"image": f32(2, 64), "mask": u8(1, 8)}, None,
     ["input 'mask': batch size 1, but input 'image' has batch size 2"]),
    ("symbol disagrees within input", (spec("sq", "float32", "N", "K", "K"),),
     {"sq": f32(1, 2, 3)}, None, ["input 'sq'", "K is 2 in an earlier dimension"]),
    ("over max_batch", TWO, {"image": f32(33, 64), "mask": u8(33, 8)}, 32,
     ["input 'image': batch size 33 is over this function's max_batch of 32"]),
    ("empty batch", TWO, {"image": f32(0, 64), "mask": u8(0, 8)}, 32,
     ["input 'image': batch size is 0"]),
]  # fmt: skip


@pytest.mark.parametrize(
    ("specs", "inputs", "max_batch", "phrases"),
    [pytest.param(*row[1:], id=row[0]) for row in INVALID],
)
def test_validate_inputs_refuses(
    specs: tuple[TensorSpec, ...],
    inputs: dict[str, np.ndarray],
    max_batch: int | None,
    phrases: list[str],
) -> None:
    request = Request(inputs, id="req-3", reply_to="dev/3/reply", encoding=Encoding.JSON)
    with pytest.raises(BadRequestError) as caught:
        validate_inputs(request, specs, max_batch=max_batch)
    for phrase in phrases:
        assert phrase in str(caught.value)
    assert (caught.value.id, caught.value.reply_to) == ("req-3", "dev/3/reply")


def test_validate_accepts_what_the_wire_decodes() -> None:
    payload = encode_request({"image": f32(4, 64), "mask": u8(4, 8)}, Encoding.MSGPACK)
    assert validate_inputs(decode_request(payload), TWO, max_batch=4) == 4
    assert MAX_ELEMENTS == 2**31


@pytest.mark.parametrize(
    "arr",
    [
        np.arange(12, dtype=np.float32).reshape(3, 4),
        np.asfortranarray(np.arange(12, dtype=np.float64).reshape(3, 4)),
        np.arange(6, dtype=">i4").reshape(2, 3),
        np.arange(10, dtype=np.uint8)[::3],
        np.array([True, False]),
        np.zeros((0, 5), np.float16),
        np.array(7, dtype=np.int64),
    ],
    ids=["f32", "f64-fortran", "i32-big-endian", "u8-strided", "bool", "empty", "0-d"],
)
@pytest.mark.parametrize("encoding", [Encoding.MSGPACK, Encoding.JSON])
def test_response_bytes_are_those_of_each_tensor_encoded_alone(
    arr: np.ndarray, encoding: Encoding
) -> None:
    """encode_response writes common arrays itself: the bytes must be encode_tensor's."""
    resp = Response("r", "1.0.0", {"y": arr}, "n", Timing(0.5, 0.25, False, True))
    got = encode_response(resp, encoding)
    want_obj = {
        "id": "r",
        "version": "1.0.0",
        "outputs": {"y": encode_tensor(arr, encoding, name="y")},
        "node": "n",
        "timing": {"queue_ms": 0.5, "run_ms": 0.25, "cold_start": False, "spilled": True},
    }
    if encoding is Encoding.MSGPACK:
        assert got == msgpack.packb(want_obj, use_bin_type=True)
    else:
        assert json.loads(got) == want_obj
    back = decode_reply(got, encoding.content_type)
    assert isinstance(back, Response)
    np.testing.assert_array_equal(back.outputs["y"], arr)
    assert back.outputs["y"].shape == arr.shape


@pytest.mark.parametrize(
    ("tensor", "says"),
    [
        ({"dtype": "float32", "shape": [0, 2**40], "data": b""}, "dimension"),
        ({"dtype": "float32", "shape": [1] * 9, "data": b"\0" * 4}, "rank 9"),
        ({"dtype": "float32", "shape": [True, 4], "data": b"\0" * 16}, "non-negative integers"),
        ({"dtype": "float32", "shape": [-1, 4], "data": b"\0" * 16}, "non-negative integers"),
        ({"dtype": "float32", "shape": [2, 2], "data": b"\0" * 15}, "needs 16"),
        ({"dtype": "float32", "shape": [2, 2], "data": "x" * 16}, "must be bin"),
        ({"dtype": "bool", "shape": [2], "data": b"\x00\x02"}, "bytes 0 or 1"),
        ({"dtype": "float128", "shape": [1], "data": b"\0" * 16}, "is not one of"),
        ({"dtype": "float32", "shape": [1], "dat": b"\0" * 4}, "missing 'data'"),
    ],
)
def test_msgpack_tensors_that_fail_any_check_are_refused_by_name(
    tensor: dict[str, Any], says: str
) -> None:
    """Each way a msgpack tensor can be wrong is refused, with a message naming it."""
    with pytest.raises(MessageError, match=says):
        decode_tensor(tensor, Encoding.MSGPACK, name="image")


def test_well_formed_msgpack_tensor_is_a_read_only_view_of_its_bytes() -> None:
    data = np.arange(6, dtype="<f4").tobytes()
    arr = decode_tensor({"dtype": "float32", "shape": [2, 3], "data": data}, Encoding.MSGPACK)
    assert arr.shape == (2, 3) and arr.dtype == np.float32 and not arr.flags.writeable
    np.testing.assert_array_equal(arr.ravel(), np.arange(6, dtype=np.float32))
