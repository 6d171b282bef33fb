"""Tampering with a bundle's bytes: every change is refused with an fnmesh error.

"Verify, then decrypt" (``Bundle.parse`` then ``.open``) is what a node does
with a bundle it received; these tests change bytes of a real bundle and check
that the result is always a named :class:`MeshError`, never success and never
another exception.
"""

from __future__ import annotations

import base64
import json
import os
import random
import struct
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from conftest import Fleet, make_fleet
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from fnmesh.certs.errors import KeyWrapError
from fnmesh.certs.identity import Identity
from fnmesh.errors import MeshError
from fnmesh.functions import bundle as fnb
from fnmesh.functions.bundle import MAC_BYTES, MAGIC, Bundle
from fnmesh.functions.digest import CHUNK
from fnmesh.functions.errors import BundleFormatError, IntegrityError, ManifestError

SCALE = float(os.environ.get("FNMESH_TEST_SCALE", "1"))

# A parsed tampered certificate may make cryptography warn about odd name
# attributes before fnmesh refuses it; the refusal is what these tests check.
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def tiny_model() -> bytes:
    """y = x @ W + B, x float32[N, 4]: well under 2 KB."""
    rng = np.random.default_rng(3)
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "W"], ["xw"]),
            helper.make_node("Add", ["xw", "B"], ["y"]),
        ],
        "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])],
        [
            numpy_helper.from_array(rng.standard_normal((4, 3)).astype(np.float32), "W"),
            numpy_helper.from_array(rng.standard_normal(3).astype(np.float32), "B"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


def sized_model(size: int) -> bytes:
    """y = x @ W with W large enough that the model is about ``size`` bytes."""
    cols = 64
    rows = size // (4 * cols)
    w = np.random.default_rng(5).standard_normal((rows, cols)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["y"])],
        "sized",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", rows])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", cols])],
        [numpy_helper.from_array(w, "W")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


class Opener:
    """Verify-then-decrypt as the coordinator, recording anything but a clean refusal."""

    def __init__(self, fleet: Fleet, as_: Identity | None = None):
        self.who = as_ or fleet.coordinator
        assert self.who.enc_key is not None
        self.fleet = fleet
        self.trust = fleet.trust

    def open(self, data: bytes) -> bytes:
        return Bundle.parse(data).open(self.trust, self.who.cn, self.who.enc_key)  # type: ignore[arg-type]

    def refusal(self, data: bytes) -> str | None:
        """None when the bytes were refused with a non-empty fnmesh error, else what went wrong."""
        try:
            self.open(data)
        except MeshError as e:
            if not str(e):
                return f"{type(e).__name__} with an empty message"
            return None
        except Exception as e:
            return f"{type(e).__name__}: {e}"
        return "accepted"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Fleet, bytes, bytes]:
    """A fleet, a tiny model, and its bundle for the coordinator and node lyon-1."""
    fleet = make_fleet(tmp_path_factory.mktemp("tamper") / "home")
    model = tiny_model()
    assert len(model) < 2048
    node = fleet.nodes["lyon-1"]
    b = fnb.build(
        model,
        name="examples/tiny",
        version="1.0.0",
        publisher=fleet.publisher,
        recipients={fleet.coordinator.cn: fleet.coordinator.info.x25519, node.cn: node.info.x25519},  # type: ignore[dict-item]
    )
    return fleet, model, b.to_bytes()


def test_untampered_bundle_opens(tiny: tuple[Fleet, bytes, bytes]) -> None:
    fleet, model, data = tiny
    assert Opener(fleet).open(data) == model
    assert Opener(fleet, fleet.nodes["lyon-1"]).open(data) == model


def test_every_single_byte_change_refused(tiny: tuple[Fleet, bytes, bytes]) -> None:
    fleet, _model, data = tiny
    opener = Opener(fleet)
    rng = random.Random(20240601)
    problems: list[str] = []
    for pos in range(len(data)):
        for mask in (0x01, 0xFF, rng.randrange(1, 256)):
            changed = bytearray(data)
            changed[pos] ^= mask
            why = opener.refusal(bytes(changed))
            if why is not None:
                problems.append(f"byte {pos} ^ {mask:#04x}: {why}")
    assert not problems, f"{len(problems)} changes not refused: {problems[:20]}"


def test_bit_flip_in_large_bundle_refused(tmp_path: Path) -> None:
    fleet = make_fleet(tmp_path / "home")
    model = sized_model(700_000)
    b = fnb.build(
        model,
        name="examples/large",
        version="1.0.0",
        publisher=fleet.publisher,
        recipients={fleet.coordinator.cn: fleet.coordinator.info.x25519},  # type: ignore[dict-item]
    )
    assert len(b.ciphertext) > 2 * CHUNK, "the tree digest should have several chunks"
    data = b.to_bytes()
    opener = Opener(fleet)
    assert opener.open(data) == model
    header = len(data) - len(b.ciphertext)
    rng = random.Random(7)
    count = max(20, int(2000 * SCALE))
    # Half in the header (sections, MAC, lengths), half in the ciphertext chunks.
    positions = [rng.randrange(header) for _ in range(count // 2)]
    positions += [rng.randrange(header, len(data)) for _ in range(count - count // 2)]
    buf = bytearray(data)
    problems: list[str] = []
    for pos in positions:
        mask = rng.choice((0x01, 0xFF, rng.randrange(1, 256)))
        buf[pos] ^= mask
        why = opener.refusal(bytes(buf))
        buf[pos] ^= mask
        if why is not None:
            problems.append(f"byte {pos} ^ {mask:#04x}: {why}")
    assert bytes(buf) == data
    assert not problems, f"{len(problems)} changes not refused: {problems[:20]}"


def test_truncated_bundle_refused(tiny: tuple[Fleet, bytes, bytes]) -> None:
    fleet, _model, data = tiny
    opener = Opener(fleet)
    for n in range(len(data)):
        with pytest.raises(BundleFormatError) as e:
            opener.open(data[:n])
        assert str(e.value)
    big = fnb.build(
        sized_model(40_000),
        name="examples/trunc",
        version="1.0.0",
        publisher=fleet.publisher,
        recipients={fleet.coordinator.cn: fleet.coordinator.info.x25519},  # type: ignore[dict-item]
    ).to_bytes()
    for n in range(0, len(big), 97):
        with pytest.raises(BundleFormatError, match=r"truncated|bad magic"):
            opener.open(big[:n])
    with pytest.raises(BundleFormatError, match="truncated"):
        opener.open(big[:-1])


@pytest.mark.parametrize("extra", [b"\x00", b"\x01" * 16, b"FNMESHB\x01", os.urandom(300)])
def test_trailing_bytes_refused(tiny: tuple[Fleet, bytes, bytes], extra: bytes) -> None:
    fleet, _model, data = tiny
    with pytest.raises(BundleFormatError, match="trailing"):
        Opener(fleet).open(data + extra)


def _keys_span(data: bytes) -> tuple[int, int]:
    """Start and end of the keys section's JSON inside the bundle bytes."""
    pos = len(MAGIC)
    for _ in range(2):
        (n,) = struct.unpack_from(">I", data, pos)
        pos += 4 + n
    (n,) = struct.unpack_from(">I", data, pos)
    return pos + 4, pos + 4 + n


def test_bit_flip_in_other_recipients_wrapped_key_refused(
    tiny: tuple[Fleet, bytes, bytes],
) -> None:
    """A change to lyon-1's wrapped key is caught by the coordinator, via the keys MAC."""
    fleet, _model, data = tiny
    node = fleet.nodes["lyon-1"]
    start, end = _keys_span(data)
    section = json.loads(data[start:end])
    text = section["keys"][node.cn]
    at = data.index(text.encode(), start, end) + len(text) // 2
    original = chr(data[at])
    swap = "B" if original != "B" else "C"
    changed = bytearray(data)
    changed[at] = ord(swap)
    tampered = bytes(changed)

    b = Bundle.parse(tampered)  # still well-formed: base64 stays canonical
    assert b.wrapped[node.cn] != base64.b64decode(text)
    assert b.wrapped[fleet.coordinator.cn] == Bundle.parse(data).wrapped[fleet.coordinator.cn]
    with pytest.raises(IntegrityError, match="MAC"):
        Opener(fleet).open(tampered)
    with pytest.raises(KeyWrapError):
        Opener(fleet, node).open(tampered)


def test_bit_flip_in_keys_mac_refused(tiny: tuple[Fleet, bytes, bytes]) -> None:
    fleet, _model, data = tiny
    _start, end = _keys_span(data)
    for i in range(MAC_BYTES):
        changed = bytearray(data)
        changed[end + i] ^= 0x01
        with pytest.raises(IntegrityError, match="MAC"):
            Opener(fleet).open(bytes(changed))


def test_bit_flip_in_ciphertext_refused(tiny: tuple[Fleet, bytes, bytes]) -> None:
    fleet, _model, data = tiny
    b = Bundle.parse(data)
    for i in range(len(b.ciphertext)):
        changed = bytearray(data)
        changed[len(data) - len(b.ciphertext) + i] ^= 0x80
        with pytest.raises(IntegrityError, match="digest"):
            Opener(fleet).open(bytes(changed))


def test_ciphertext_with_recomputed_length_and_digest_still_refused(
    tiny: tuple[Fleet, bytes, bytes],
) -> None:
    """Swapping the ciphertext for another bundle's breaks the signed digest."""
    fleet, _model, data = tiny
    b = Bundle.parse(data)
    other = fnb.build(
        tiny_model(),
        name="examples/tiny",
        version="1.0.0",
        publisher=fleet.publisher,
        recipients={fleet.coordinator.cn: fleet.coordinator.info.x25519},  # type: ignore[dict-item]
    )
    forged = replace(b, ciphertext=other.ciphertext).to_bytes()
    with pytest.raises(IntegrityError):
        Opener(fleet).open(forged)


@pytest.mark.parametrize("section", ["manifest_bytes", "signatures_bytes", "keys_bytes"])
@pytest.mark.parametrize("nesting", [b"[" * 100_000, b'{"a":' * 100_000])
def test_deeply_nested_json_section_refused(
    tiny: tuple[Fleet, bytes, bytes], section: str, nesting: bytes
) -> None:
    """JSON nested past the interpreter's recursion limit is a format error, not a crash."""
    fleet, _model, data = tiny
    forged = replace(Bundle.parse(data), **{section: nesting}).to_bytes()
    with pytest.raises(MeshError, match="JSON") as e:
        Opener(fleet).open(forged)
    assert isinstance(e.value, ManifestError if section == "manifest_bytes" else BundleFormatError)


# -- property tests: bytes from outside ---------------------------------------------


def _parse_refusal(data: bytes) -> None:
    try:
        Bundle.parse(data)
    except MeshError as e:
        assert str(e)
    # Any other exception propagates and fails the test.


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=4096))
def test_parse_arbitrary_bytes_raises_only_mesh_errors(data: bytes) -> None:
    _parse_refusal(data)


@settings(max_examples=300, deadline=None)
@given(
    st.binary(max_size=64),
    st.lists(st.integers(0, (1 << 32) - 1), min_size=1, max_size=4),
    st.binary(max_size=256),
)
def test_parse_magic_then_garbage_raises_only_mesh_errors(
    head: bytes, lengths: list[int], tail: bytes
) -> None:
    """Past the magic, with plausible section lengths, so the section parsers see the bytes."""
    data = MAGIC + b"".join(struct.pack(">I", n) + head for n in lengths) + tail
    _parse_refusal(data)


@st.composite
def mangled(draw: st.DrawFn, data: bytes) -> bytes:
    """The bundle with random slices cut out, bytes inserted, or spans overwritten."""
    out = bytearray(data)
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["cut", "insert", "overwrite"]))
        i = draw(st.integers(0, len(out)))
        if kind == "cut":
            j = draw(st.integers(i, min(len(out), i + 64)))
            del out[i:j]
        elif kind == "insert":
            out[i:i] = draw(st.binary(min_size=1, max_size=32))
        else:
            chunk = draw(st.binary(min_size=1, max_size=16))
            out[i : i + len(chunk)] = chunk
    return bytes(out)


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_mangled_valid_bundle_refused(
    tiny: tuple[Fleet, bytes, bytes], data: st.DataObject
) -> None:
    fleet, _model, original = tiny
    changed = data.draw(mangled(original))
    if changed == original:
        return
    why = Opener(fleet).refusal(changed)
    assert why is None, why
