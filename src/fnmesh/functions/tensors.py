"""Tensors on the wire: the two encodings, and strict conversion to and from numpy.

A tensor is ``{"dtype", "shape", "data"}``. In msgpack, ``data`` is the raw
bytes in C order, little endian; in JSON it is a list of numbers, flat or
nested to match the shape. Decoding refuses anything it cannot represent
exactly and says which tensor and what was wrong; it never allocates more
than the received bytes justify.

JSON cannot carry NaN or infinities, so float tensors use the strings
``"NaN"``, ``"Infinity"`` and ``"-Infinity"`` for them (as the protobuf JSON
mapping does). Decoding also accepts ``null`` as NaN (what JavaScript's
``JSON.stringify`` emits) and the bare ``NaN``/``Infinity`` tokens that
Python's ``json`` writes by default.

Decoded arrays are read-only and in native byte order. Msgpack data is not
copied: the array is a view of the received bytes (ONNX Runtime accepts
read-only inputs); copy before writing to one.
"""

from __future__ import annotations

import re
import sys
from enum import StrEnum
from functools import lru_cache
from typing import Any

import numpy as np

from fnmesh.functions.errors import MessageError
from fnmesh.functions.manifest import DTYPES

#: Largest rank a tensor may have on the wire.
MAX_RANK = 8
#: Largest element count (and largest single dimension) a tensor may have on the wire.
MAX_ELEMENTS = 2**31

_TENSOR_KEYS = frozenset(("dtype", "shape", "data"))
_LITTLE = sys.byteorder == "little"
#: Wire dtype (always little endian) and native dtype, per dtype name.
_WIRE_DTYPE = {name: np.dtype(name).newbyteorder("<") for name in DTYPES}
_NATIVE_DTYPE = {name: np.dtype(name) for name in DTYPES}
# Keyed by dtype object, both byte orders: dtype.name is a slow property (~2 µs).
_NAME_OF_DTYPE = {
    np.dtype(name).newbyteorder(order): name for name in DTYPES for order in ("<", ">")
}
#: Dtypes whose bytes in memory are already the wire's (little endian, or one byte).
_SENT_AS_IS = frozenset(d for d in _NAME_OF_DTYPE if d == d.newbyteorder("<"))
_FLOATS = frozenset(("float16", "float32", "float64"))
_INT_RANGE = {
    name: (int(np.iinfo(name).min), int(np.iinfo(name).max))
    for name in DTYPES
    if name not in _FLOATS and name != "bool"
}
_NONFINITE_IN = {"NaN": float("nan"), "Infinity": float("inf"), "-Infinity": float("-inf")}
_JSON_TYPE_NAMES = {
    str: "string",
    type(None): "null",
    bool: "boolean",
    list: "list",
    dict: "object",
    float: "non-integer number",
    int: "integer",
}
_JSON_START = re.compile(rb"[ \t\r\n]*\{")


class Encoding(StrEnum):
    """How a message is serialised. An answer uses its request's encoding."""

    JSON = "json"
    MSGPACK = "msgpack"

    @property
    def content_type(self) -> str:
        return _CONTENT_TYPES[self]


#: Looked up once: an enum member read through its class costs a few microseconds on
#: cold caches, and every message compares its encoding.
_MSGPACK = Encoding.MSGPACK
_CONTENT_TYPES = {Encoding.JSON: "application/json", Encoding.MSGPACK: "application/msgpack"}


_MEDIA_TYPES = {
    "application/json": Encoding.JSON,
    "application/msgpack": Encoding.MSGPACK,
    "application/x-msgpack": Encoding.MSGPACK,
    "application/vnd.msgpack": Encoding.MSGPACK,
}


# Content types repeat from message to message; the cache is bounded so that
# an attacker sending distinct ones cannot grow it.
@lru_cache(maxsize=64)
def _media_type(content_type: str) -> Encoding | None:
    return _MEDIA_TYPES.get(content_type.split(";", 1)[0].strip().lower())


def detect_encoding(payload: bytes, content_type: str | None) -> Encoding:
    """The payload's encoding: the content type when given, else JSON if it starts with ``{``."""
    if content_type is not None and content_type.strip():
        enc = _media_type(content_type)
        if enc is None:
            raise MessageError(
                f"unsupported content type {content_type[:100]!r} "
                "(use application/json or application/msgpack)"
            )
        return enc
    # A msgpack request is a map, whose first byte is never '{' or whitespace.
    return Encoding.JSON if _JSON_START.match(payload) else Encoding.MSGPACK


def dtype_name(dtype: np.dtype[Any]) -> str | None:
    """The wire name of a numpy dtype (either byte order), or ``None`` if the wire lacks it."""
    return _NAME_OF_DTYPE.get(dtype)


def encode_tensor(
    arr: np.ndarray, encoding: Encoding, *, name: str = "?", kind: str = "output"
) -> dict[str, Any]:
    """The wire form of ``arr``, which :func:`decode_tensor` turns back into an equal array."""
    dtype = _NAME_OF_DTYPE.get(arr.dtype)
    if dtype is None:
        raise MessageError(
            f"{kind} {name!r}: dtype {arr.dtype} cannot be sent (not one of {', '.join(DTYPES)})"
        )
    shape = list(arr.shape)
    if encoding is _MSGPACK:
        # tobytes() writes C order whatever the memory layout; byte-swapped only if need be.
        dt = arr.dtype
        data: Any = arr.tobytes() if dt in _SENT_AS_IS else arr.astype(_WIRE_DTYPE[dtype]).tobytes()
    else:
        flat = arr.ravel()
        data = flat.tolist()
        if dtype in _FLOATS:
            bad = ~np.isfinite(flat)
            if bad.any():
                for i in np.flatnonzero(bad).tolist():
                    v = data[i]
                    data[i] = "NaN" if v != v else ("Infinity" if v > 0 else "-Infinity")
    return {"dtype": dtype, "shape": shape, "data": data}


def decode_tensor(
    obj: object, encoding: Encoding, *, name: str = "?", kind: str = "input"
) -> np.ndarray:
    """A read-only, native-endian array from a wire tensor, or :class:`MessageError`.

    ``kind`` and ``name`` label the tensor in error messages ("input 'image': ...").
    """
    where = (kind, name)
    if type(obj) is not dict:
        raise MessageError(f"{_label(where)}: must be a map with dtype, shape and data")
    if obj.keys() != _TENSOR_KEYS:
        missing = sorted(_TENSOR_KEYS - obj.keys())
        if missing:
            raise MessageError(f"{_label(where)}: missing {', '.join(map(repr, missing))}")
        extra = next(k for k in obj if k not in _TENSOR_KEYS)
        raise MessageError(
            f"{_label(where)}: unexpected key {_short(extra)} (a tensor has only dtype, shape and data)"
        )
    dtype = obj["dtype"]
    if type(dtype) is not str or dtype not in _WIRE_DTYPE:
        raise MessageError(
            f"{_label(where)}: dtype {_short(dtype)} is not one of {', '.join(DTYPES)}"
        )
    shape, count = _check_shape(obj["shape"], where)
    data = obj["data"]
    if encoding is _MSGPACK:
        return _from_bytes(data, dtype, shape, count, where)
    return _from_json(data, dtype, shape, count, where)


#: A tensor named in error messages, ("input", "image") for "input 'image'": formatted
#: only if an error is raised (a message for every tensor costs more than its check).
Where = tuple[str, str]


def _label(where: Where) -> str:
    return f"{where[0]} {where[1]!r}"


def _check_shape(shape: object, where: Where) -> tuple[tuple[int, ...], int]:
    if type(shape) is not list and type(shape) is not tuple:
        raise MessageError(
            f"{_label(where)}: shape must be a list of dimensions, got {_short(shape)}"
        )
    if len(shape) > MAX_RANK:
        raise MessageError(f"{_label(where)}: rank {len(shape)} is over the limit of {MAX_RANK}")
    count = 1
    for d in shape:
        # type() rather than isinstance: a bool is an int to Python, not to us.
        if type(d) is not int or d < 0:
            raise MessageError(
                f"{_label(where)}: shape {_short(shape)} must hold non-negative integers"
            )
        if d > MAX_ELEMENTS:
            raise MessageError(
                f"{_label(where)}: dimension {d} is over the limit of {MAX_ELEMENTS}"
            )
        count *= d
    if count > MAX_ELEMENTS:
        raise MessageError(
            f"{_label(where)}: shape {list(shape)} has {count} elements, over the limit of {MAX_ELEMENTS}"
        )
    return tuple(shape), count


def _from_bytes(
    data: object, dtype: str, shape: tuple[int, ...], count: int, where: Where
) -> np.ndarray:
    if type(data) is not bytes:
        raise MessageError(
            f"{_label(where)}: msgpack data must be bin (raw bytes, C order, little endian), "
            f"got {type(data).__name__}"
        )
    wire = _WIRE_DTYPE[dtype]
    need = count * wire.itemsize
    if len(data) != need:
        raise MessageError(
            f"{_label(where)}: data is {len(data)} bytes, {dtype}{list(shape)} needs {need} "
            f"({count} elements of {wire.itemsize} bytes)"
        )
    if dtype == "bool" and count and np.frombuffer(data, np.uint8).max() > 1:
        raise MessageError(f"{_label(where)}: bool data must be bytes 0 or 1")
    # A view of immutable bytes: read-only and not copied.
    arr = np.ndarray(shape, wire, data)
    if not _LITTLE:
        arr = arr.astype(_NATIVE_DTYPE[dtype])
        arr.flags.writeable = False
    return arr


def _from_json(
    data: object, dtype: str, shape: tuple[int, ...], count: int, where: Where
) -> np.ndarray:
    flat = _flatten(data, shape, count, where)
    types = set(map(type, flat))
    if dtype in _FLOATS:
        if not types <= {float, int}:
            flat = _nonfinite_in(flat, types, dtype, where)
        try:
            wide = np.asarray(flat, dtype=np.float64)
        except OverflowError as e:
            raise MessageError(f"{_label(where)}: a value is too large for {dtype}") from e
        if dtype == "float64":
            arr = wide
        else:
            with np.errstate(over="ignore"):
                arr = wide.astype(dtype)
            finite = np.isfinite(arr)
            if not finite.all() and (np.isfinite(wide) & ~finite).any():
                raise MessageError(f"{_label(where)}: a value is too large for {dtype}")
    elif dtype == "bool":
        if not types <= {bool}:
            raise MessageError(
                f"{_label(where)}: bool data must be true or false, got {_names(types - {bool})}"
            )
        arr = np.asarray(flat, dtype=np.bool_)
    else:
        if not types <= {int}:
            raise MessageError(
                f"{_label(where)}: {dtype} data must be integers, got {_names(types - {int})}"
            )
        lo, hi = _INT_RANGE[dtype]
        if flat and (min(flat) < lo or max(flat) > hi):
            raise MessageError(
                f"{_label(where)}: a value is outside the range of {dtype} [{lo}, {hi}]"
            )
        arr = np.asarray(flat, dtype=dtype)
    arr = arr.reshape(shape)
    arr.flags.writeable = False
    return arr


def _flatten(data: object, shape: tuple[int, ...], count: int, where: Where) -> list[Any]:
    """The elements of flat or shape-nested JSON data, walked level by level (no recursion)."""
    if type(data) is not list:
        if not shape:
            return [data]  # a 0-d tensor's nested form is the bare value
        raise MessageError(f"{_label(where)}: data must be a list of numbers, got {_short(data)}")
    if not data or type(data[0]) is not list:
        if len(data) != count:
            raise MessageError(
                f"{_label(where)}: data has {len(data)} elements, shape {list(shape)} needs {count}"
            )
        return data
    if not shape:
        raise MessageError(f"{_label(where)}: data is nested but the shape is [] (one value)")
    level: list[Any] = [data]
    # The depth walked is the rank (at most MAX_RANK), so deep nesting cannot cost more.
    for depth, dim in enumerate(shape):
        nxt: list[Any] = []
        for item in level:
            if type(item) is not list or len(item) != dim:
                raise MessageError(
                    f"{_label(where)}: nested data does not match shape {list(shape)} at depth {depth} "
                    f"(expected a list of {dim}, got {_short(item)})"
                )
            nxt.extend(item)
        level = nxt
    return level


def _nonfinite_in(flat: list[Any], types: set[type], dtype: str, where: Where) -> list[Any]:
    unexpected = types - {float, int, str, type(None)}
    if unexpected:
        raise MessageError(
            f"{_label(where)}: {dtype} data must be numbers, got {_names(unexpected)}"
        )
    out: list[Any] = []
    for v in flat:
        if type(v) is str:
            if v not in _NONFINITE_IN:
                raise MessageError(
                    f"{_label(where)}: the only strings allowed in {dtype} data are "
                    f"'NaN', 'Infinity' and '-Infinity', got {_short(v)}"
                )
            v = _NONFINITE_IN[v]
        elif v is None:
            v = _NONFINITE_IN["NaN"]
        out.append(v)
    return out


def _names(types: set[type]) -> str:
    return ", ".join(sorted(_JSON_TYPE_NAMES.get(t, t.__name__) for t in types))


def _short(v: object) -> str:
    """A bounded description for error messages: the input is untrusted, huge or deep."""
    if v is None or type(v) in (bool, float):
        return repr(v)
    if type(v) is int:
        return repr(v) if v.bit_length() <= 128 else "a very large integer"
    if type(v) is str:
        return repr(v) if len(v) <= 40 else repr(v[:40]) + "..."
    if type(v) is list or type(v) is tuple:
        if len(v) <= MAX_RANK and all(x is None or type(x) in (bool, int, float, str) for x in v):
            return "[" + ", ".join(_short(x) for x in v) + "]"
        return f"a list of {len(v)} items"
    if type(v) is dict:
        return f"a map of {len(v)} entries"
    if type(v) is bytes:
        return f"{len(v)} bytes"
    return f"a {type(v).__name__}"
