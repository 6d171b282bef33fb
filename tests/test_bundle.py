"""Building, verifying and opening function bundles; each refusal named after its attack."""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import Fleet, make_fleet
from onnx import TensorProto, helper, numpy_helper

from fnmesh.certs import keywrap
from fnmesh.certs.errors import KeyWrapError
from fnmesh.certs.identity import Identity, Role
from fnmesh.functions import bundle as fnb
from fnmesh.functions.bundle import MAGIC_PREFIX, Bundle
from fnmesh.functions.envelope import sign_manifest
from fnmesh.functions.errors import (
    BundleFormatError,
    ExpiredError,
    GraphError,
    IntegrityError,
    ManifestError,
    SignatureError,
)
from fnmesh.functions.manifest import FORMAT_MAJOR, Manifest, TensorSpec, canonical_json

RNG = np.random.default_rng(11)
W = RNG.standard_normal((4, 3)).astype(np.float32)
B = RNG.standard_normal(3).astype(np.float32)


def tiny_graph() -> onnx.ModelProto:
    """y = x @ W + B, x float32[N, 4], y float32[N, 3]."""
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "W"], ["xw"]),
            helper.make_node("Add", ["xw", "B"], ["y"]),
        ],
        "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])],
        [numpy_helper.from_array(W, "W"), numpy_helper.from_array(B, "B")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


MODEL = tiny_graph().SerializeToString()
NOW = datetime.now(UTC)


def recipients(*ids: Identity) -> dict[str, Any]:
    return {i.cn: i.info.x25519 for i in ids}


def build(fleet: Fleet, *extra: Identity, publisher: Identity | None = None, **kw: Any) -> Bundle:
    kw.setdefault("name", "examples/tiny")
    kw.setdefault("version", "1.0.0")
    return fnb.build(
        kw.pop("model", MODEL),
        publisher=publisher or fleet.publisher,
        recipients=recipients(fleet.coordinator, *extra),
        **kw,
    )


def open_as(fleet: Fleet, b: Bundle | bytes, who: Identity | None = None, **kw: Any) -> bytes:
    """Verify then decrypt, from bytes as received."""
    who = who or fleet.coordinator
    assert who.enc_key is not None
    data = b.to_bytes() if isinstance(b, Bundle) else b
    return Bundle.parse(data).open(fleet.trust, who.cn, who.enc_key, **kw)


def resign(b: Bundle, signer: Identity, **changes: Any) -> Bundle:
    """The bundle with its manifest changed and signed again by ``signer``'s real key."""
    obj = json.loads(b.manifest_bytes)
    obj.update(changes)
    mb = canonical_json(obj)
    return replace(
        b,
        manifest_bytes=mb,
        manifest=Manifest.from_bytes(mb),
        signatures_bytes=sign_manifest(mb, signer),
    )


def run(model: bytes, x: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})[0]


# -- the happy path --------------------------------------------------------------------


def test_build_open_round_trip_runs(fleet: Fleet) -> None:
    b = build(fleet, fleet.nodes["lyon-1"], regions=("eu",), max_batch=8)
    data = b.to_bytes()
    assert data.startswith(MAGIC_PREFIX + bytes([FORMAT_MAJOR]))
    parsed = Bundle.parse(data)
    assert parsed.to_bytes() == data
    assert parsed.manifest_bytes == b.manifest_bytes
    m = parsed.manifest
    assert m.name == "examples/tiny" and m.version == "1.0.0"
    assert m.publisher == fleet.publisher.cn
    assert m.inputs == (TensorSpec(name="x", dtype="float32", shape=("N", 4)),)
    assert m.outputs == (TensorSpec(name="y", dtype="float32", shape=("N", 3)),)
    assert m.data.regions == ("eu",) and m.limits.max_batch == 8
    assert sorted(parsed.wrapped) == sorted([fleet.coordinator.cn, "node.lyon-1"])
    assert parsed.verify(fleet.trust).publisher.cn == fleet.publisher.cn
    model = open_as(fleet, data)
    assert model == MODEL
    x = np.ones((2, 4), np.float32)
    np.testing.assert_allclose(run(model, x), x @ W + B, rtol=1e-5)
    # The model is encrypted: the plaintext does not appear in the bundle.
    assert W.tobytes() not in data


def test_unknown_manifest_fields_survive_a_round_trip(fleet: Fleet) -> None:
    b = resign(build(fleet), fleet.publisher, future_field={"a": 1})
    again = Bundle.parse(b.to_bytes())
    assert json.loads(again.manifest.canonical_bytes())["future_field"] == {"a": 1}
    assert again.manifest.canonical_bytes() == again.manifest_bytes
    assert open_as(fleet, again) == MODEL


def test_resigned_unchanged_manifest_opens(fleet: Fleet) -> None:
    """Control for the crafted bundles below: re-signing by hand by itself is accepted."""
    assert open_as(fleet, resign(build(fleet), fleet.publisher)) == MODEL


# -- who may sign ------------------------------------------------------------------------


def test_publisher_from_foreign_ca_refused(fleet: Fleet, tmp_path: Path) -> None:
    foreign = make_fleet(tmp_path / "foreign")
    assert foreign.publisher.cn == fleet.publisher.cn  # same name, other CA
    b = build(fleet, publisher=foreign.publisher)
    with pytest.raises(SignatureError, match="fleet CA"):
        open_as(fleet, b)
    with pytest.raises(SignatureError):
        Bundle.parse(b.to_bytes()).verify(fleet.trust)


def test_publisher_outside_namespace(fleet: Fleet) -> None:
    with pytest.raises(ManifestError, match="namespace"):
        build(fleet, name="other/tiny")


def test_publisher_outside_namespace_crafted_by_hand(fleet: Fleet) -> None:
    """A manifest naming another namespace, truly signed by the examples publisher."""
    b = resign(build(fleet), fleet.publisher, name="other/tiny")
    assert b.manifest.namespace == "other"
    with pytest.raises(SignatureError, match="namespace"):
        Bundle.parse(b.to_bytes()).verify(fleet.trust)
    with pytest.raises(SignatureError, match="namespace"):
        open_as(fleet, b)


def test_publisher_of_other_namespace_signing_for_examples(fleet: Fleet) -> None:
    bob = fleet.ca.issue(Role.PUBLISHER, "bob", namespace="other")
    b = resign(build(fleet), bob, publisher=bob.cn)
    with pytest.raises(SignatureError, match="namespace"):
        open_as(fleet, b)


def test_signature_by_other_publisher_than_named_refused(fleet: Fleet) -> None:
    """Same namespace, but the manifest names someone else as its publisher."""
    carol = fleet.ca.issue(Role.PUBLISHER, "carol", namespace="examples")
    b = resign(build(fleet), carol)  # still names publisher.examples
    with pytest.raises(SignatureError, match="names publisher"):
        open_as(fleet, b)


@pytest.mark.parametrize("who", ["operator", "node", "device", "coordinator"])
def test_non_publisher_signing_refused(fleet: Fleet, who: str) -> None:
    signer = {
        "operator": fleet.operator,
        "node": fleet.nodes["lyon-1"],
        "device": fleet.device("meter-1"),
        "coordinator": fleet.coordinator,
    }[who]
    with pytest.raises(ManifestError, match="not a publisher"):
        build(fleet, publisher=signer)
    # Crafted: the manifest names the signer, who really signed it.
    b = resign(build(fleet), signer, publisher=signer.cn)
    with pytest.raises(SignatureError, match="role"):
        open_as(fleet, b)


def test_signature_over_other_bytes_refused(fleet: Fleet) -> None:
    """Signature swapped in from another bundle of the same publisher."""
    a = build(fleet)
    b = build(fleet, version="1.0.1")
    forged = replace(a, signatures_bytes=b.signatures_bytes)
    with pytest.raises(SignatureError, match="does not match"):
        open_as(fleet, forged)


def test_verdict_holds_only_under_the_same_trust_and_within_every_date(fleet: Fleet) -> None:
    """A verdict may stand in for checking the same bytes again: same store, inside all dates."""
    b = build(fleet, valid_days=30)
    v = b.verify(fleet.trust)
    cert = fleet.publisher.cert
    assert v.valid_until == min(b.manifest.not_after, cert.not_valid_after_utc)
    assert v.valid_from == max(b.manifest.not_before, cert.not_valid_before_utc)
    assert v.holds(v.trust)
    assert not v.holds(fleet.trust), "another trust store (say, a new CRL) must check again"
    assert not v.holds(v.trust, at=v.valid_until + timedelta(seconds=1))
    assert not v.holds(v.trust, at=v.valid_from - timedelta(seconds=1))


def test_revoked_publisher_refused(fleet: Fleet) -> None:
    b = build(fleet)
    assert open_as(fleet, b) == MODEL
    fleet.ca.revoke(fleet.publisher.cn)
    with pytest.raises(SignatureError, match="revoked"):
        open_as(fleet, b)  # a fresh TrustStore.from_home sees the new list


def test_expired_publisher_certificate_refused(fleet: Fleet) -> None:
    start = NOW - timedelta(days=10)
    old = fleet.ca.issue(Role.PUBLISHER, "old", namespace="examples", days=1, not_before=start)
    b = build(fleet, publisher=old, not_before=start + timedelta(hours=1), valid_days=365)
    # While the certificate was valid the bundle was fine ...
    assert Bundle.parse(b.to_bytes()).verify(fleet.trust, at=start + timedelta(hours=2))
    # ... and now that it has expired, it is not.
    with pytest.raises(SignatureError, match="expired"):
        open_as(fleet, b)


def test_not_yet_valid_publisher_certificate_refused(fleet: Fleet) -> None:
    start = NOW + timedelta(days=10)
    early = fleet.ca.issue(Role.PUBLISHER, "early", namespace="examples", not_before=start)
    b = build(fleet, publisher=early, not_before=NOW - timedelta(days=1))
    with pytest.raises(SignatureError, match="not valid before"):
        open_as(fleet, b)
    assert Bundle.parse(b.to_bytes()).verify(fleet.trust, at=start + timedelta(days=1))


# -- validity dates and versions -----------------------------------------------------------


def test_expired_bundle_refused(fleet: Fleet) -> None:
    b = build(fleet, not_before=NOW - timedelta(days=3), valid_days=1)
    with pytest.raises(ExpiredError, match="expired"):
        open_as(fleet, b)


def test_not_yet_valid_bundle_refused(fleet: Fleet) -> None:
    b = build(fleet, not_before=NOW + timedelta(days=2))
    with pytest.raises(ExpiredError, match="not valid before"):
        open_as(fleet, b)
    assert open_as(fleet, b, at=NOW + timedelta(days=3)) == MODEL


def test_bundle_verified_after_its_expiry_refused(fleet: Fleet) -> None:
    b = Bundle.parse(build(fleet, valid_days=1).to_bytes())
    assert b.verify(fleet.trust)
    with pytest.raises(ExpiredError):
        b.verify(fleet.trust, at=NOW + timedelta(days=2))


def test_unknown_container_major_version_refused(fleet: Fleet) -> None:
    data = bytearray(build(fleet).to_bytes())
    data[len(MAGIC_PREFIX)] = FORMAT_MAJOR + 1
    with pytest.raises(BundleFormatError, match="major version 2"):
        Bundle.parse(bytes(data))


def test_unknown_manifest_major_version_refused(fleet: Fleet) -> None:
    b = build(fleet)
    obj = json.loads(b.manifest_bytes)
    obj["format"] = 2
    mb = canonical_json(obj)
    forged = replace(b, manifest_bytes=mb, signatures_bytes=sign_manifest(mb, fleet.publisher))
    with pytest.raises(ManifestError, match="major version 2"):
        Bundle.parse(forged.to_bytes())


# -- what the bundle says about its model ---------------------------------------------------


@pytest.mark.parametrize(
    "inputs",
    [
        [{"name": "x", "dtype": "float32", "shape": ["N", 5]}],
        [{"name": "x", "dtype": "float64", "shape": ["N", 4]}],
        [{"name": "input", "dtype": "float32", "shape": ["N", 4]}],
        [
            {"name": "x", "dtype": "float32", "shape": ["N", 4]},
            {"name": "z", "dtype": "float32", "shape": ["N", 1]},
        ],
    ],
    ids=["shape", "dtype", "name", "extra"],
)
def test_manifest_inputs_disagreeing_with_graph_refused(fleet: Fleet, inputs: list[Any]) -> None:
    b = resign(build(fleet), fleet.publisher, inputs=inputs)
    assert Bundle.parse(b.to_bytes()).verify(fleet.trust)  # signature and digests are fine
    with pytest.raises(ManifestError, match="graph"):
        open_as(fleet, b)


def test_manifest_outputs_disagreeing_with_graph_refused(fleet: Fleet) -> None:
    b = resign(
        build(fleet),
        fleet.publisher,
        outputs=[{"name": "y", "dtype": "float32", "shape": ["N", 2]}],
    )
    with pytest.raises(ManifestError, match="graph"):
        open_as(fleet, b)


def test_renamed_function_cannot_reuse_ciphertext(fleet: Fleet) -> None:
    """The AES-GCM additional data binds the ciphertext to its name and version."""
    b = resign(build(fleet), fleet.publisher, version="9.9.9")
    assert Bundle.parse(b.to_bytes()).verify(fleet.trust)
    with pytest.raises(IntegrityError, match="authentication"):
        open_as(fleet, b)


def test_graph_with_external_data_refused(fleet: Fleet) -> None:
    m = tiny_graph()
    external(m.graph.initializer[0], "../../etc/weights.bin")
    with pytest.raises(GraphError, match="external data"):
        build(fleet, model=m.SerializeToString())


def test_graph_with_external_data_in_subgraph_refused(fleet: Fleet) -> None:
    then = helper.make_graph(
        [helper.make_node("Identity", ["c"], ["out"])],
        "then",
        [],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1])],
        [numpy_helper.from_array(np.ones(1, np.float32), "c")],
    )
    then.initializer[0].data_location = TensorProto.EXTERNAL
    then.initializer[0].external_data.add(key="location", value="w.bin")
    graph = helper.make_graph(
        [helper.make_node("If", ["cond"], ["y"], then_branch=then, else_branch=then)],
        "g",
        [helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    with pytest.raises(GraphError, match="external data"):
        build(fleet, model=model.SerializeToString())


def external(t: onnx.TensorProto, location: str = "weights.bin") -> onnx.TensorProto:
    """Point ``t`` at a file instead of carrying its bytes."""
    for field in ("raw_data", "float_data", "int64_data"):
        t.ClearField(field)
    t.data_location = TensorProto.EXTERNAL
    for k, v in (("location", location), ("offset", "0"), ("length", "16")):
        t.external_data.add(key=k, value=v)
    return t


def sparse_graph(which: str) -> onnx.ModelProto:
    """y = x @ W with W a sparse initializer whose ``which`` part refers to external data."""
    values = numpy_helper.from_array(np.ones(2, np.float32), "W")
    indices = numpy_helper.from_array(np.array([0, 5], np.int64), "W_indices")
    external(values if which == "values" else indices)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["y"])],
        "sparse",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])],
        sparse_initializer=[helper.make_sparse_tensor(values, indices, [4, 3])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


@pytest.mark.parametrize("which", ["values", "indices"])
def test_graph_with_external_data_in_sparse_initializer_refused(fleet: Fleet, which: str) -> None:
    """ONNX Runtime reads a sparse tensor's external indices from the working directory."""
    with pytest.raises(GraphError, match="external data"):
        build(fleet, model=sparse_graph(which).SerializeToString())


def test_graph_with_external_data_in_sparse_constant_refused(fleet: Fleet) -> None:
    values = numpy_helper.from_array(np.ones(2, np.float32), "c_values")
    indices = external(numpy_helper.from_array(np.array([0, 5], np.int64), "c_indices"))
    const = helper.make_node(
        "Constant", [], ["W"], sparse_value=helper.make_sparse_tensor(values, indices, [4, 3])
    )
    m = tiny_graph()
    m.graph.node.insert(0, const)
    del m.graph.initializer[0]
    with pytest.raises(GraphError, match="external data"):
        build(fleet, model=m.SerializeToString())


def test_graph_with_external_data_refused_when_opened(
    fleet: Fleet, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bundle built by a tool that skipped the check is refused by whoever opens it."""
    m = tiny_graph()
    external(m.graph.initializer[0])
    with monkeypatch.context() as mp:
        mp.setattr(fnb.graph, "check_graph", lambda _g: None)
        b = build(fleet, model=m.SerializeToString())
    with pytest.raises(GraphError, match="external data"):
        open_as(fleet, b)


def test_graph_with_custom_operator_domain_refused(fleet: Fleet) -> None:
    m = tiny_graph()
    m.graph.node[1].domain = "com.evil"
    m.opset_import.append(helper.make_opsetid("com.evil", 1))
    with pytest.raises(GraphError, match=r"com\.evil"):
        build(fleet, model=m.SerializeToString())
    # A node in a custom domain is refused even without the opset import.
    m2 = tiny_graph()
    m2.graph.node[0].domain = "com.microsoft"
    with pytest.raises(GraphError, match=r"com\.microsoft"):
        build(fleet, model=m2.SerializeToString())


def test_unreadable_model_refused(fleet: Fleet) -> None:
    with pytest.raises(GraphError):
        build(fleet, model=b"\x00not an onnx model")


# -- key wrapping --------------------------------------------------------------------------


def test_node_not_a_recipient_cannot_decrypt(fleet: Fleet) -> None:
    b = build(fleet)
    assert sorted(b.wrapped) == [fleet.coordinator.cn]
    with pytest.raises(KeyWrapError, match=r"node\.lyon-1"):
        open_as(fleet, b, fleet.nodes["lyon-1"])
    # Claiming to be the coordinator with the node's key fails too.
    node = fleet.nodes["lyon-1"]
    assert node.enc_key is not None
    with pytest.raises(KeyWrapError):
        Bundle.parse(b.to_bytes()).open(fleet.trust, fleet.coordinator.cn, node.enc_key)


def test_recipient_node_can_decrypt(fleet: Fleet) -> None:
    b = build(fleet, fleet.nodes["lyon-1"])
    assert open_as(fleet, b, fleet.nodes["lyon-1"]) == MODEL


def test_rewrapped_node_can_decrypt(fleet: Fleet) -> None:
    paris = fleet.node("paris-1")
    b = Bundle.parse(build(fleet).to_bytes())
    with pytest.raises(KeyWrapError):
        open_as(fleet, b, paris)
    assert fleet.coordinator.enc_key is not None
    dk = b.data_key(fleet.coordinator.cn, fleet.coordinator.enc_key)
    again = b.rewrap(dk, recipients(paris))
    assert sorted(again.wrapped) == sorted([fleet.coordinator.cn, paris.cn])
    assert open_as(fleet, again.to_bytes(), paris) == MODEL
    assert open_as(fleet, again.to_bytes()) == MODEL
    assert again.manifest_bytes == b.manifest_bytes  # the signature is untouched


def test_rewrap_with_wrong_data_key_refused(fleet: Fleet) -> None:
    b = build(fleet)
    with pytest.raises(IntegrityError):
        b.rewrap(bytes(32), recipients(fleet.nodes["lyon-1"]))


def test_only_for_leaves_a_single_recipient(fleet: Fleet) -> None:
    node = fleet.nodes["lyon-1"]
    b = build(fleet)
    assert fleet.coordinator.enc_key is not None
    dk = b.data_key(fleet.coordinator.cn, fleet.coordinator.enc_key)
    assert node.info.x25519 is not None
    mine = Bundle.parse(b.only_for(dk, node.cn, node.info.x25519).to_bytes())
    assert list(mine.wrapped) == [node.cn]
    assert fnb.inspect(mine)["recipients"] == [node.cn]
    assert open_as(fleet, mine, node) == MODEL
    with pytest.raises(KeyWrapError):
        open_as(fleet, mine)


def test_wrapped_key_copied_between_bundles_refused(fleet: Fleet) -> None:
    """HPKE's info binds each wrapped key to its own bundle's digest."""
    node = fleet.nodes["lyon-1"]
    a = build(fleet, node)
    b = build(fleet, node, version="1.0.1")
    assert node.enc_key is not None
    stolen = a.wrapped[node.cn]
    assert keywrap.unwrap(stolen, node.enc_key, bytes.fromhex(a.digest))
    with pytest.raises(KeyWrapError):
        keywrap.unwrap(stolen, node.enc_key, bytes.fromhex(b.digest))
    wrapped = dict(b.wrapped)
    wrapped[node.cn] = stolen
    keys_bytes = fnb._keys_section(b.suite, wrapped)
    forged = replace(b, keys_bytes=keys_bytes, wrapped=wrapped)
    with pytest.raises(KeyWrapError):
        open_as(fleet, forged, node)
    # The whole keys section of A, MAC included, on B: refused as well.
    forged = replace(b, keys_bytes=a.keys_bytes, wrapped=a.wrapped, keys_mac=a.keys_mac)
    with pytest.raises(KeyWrapError):
        open_as(fleet, forged, node)


def test_unknown_key_wrapping_suite_refused(fleet: Fleet) -> None:
    b = build(fleet)
    suite = "DHKEM-P256-HKDF-SHA256/HKDF-SHA256/AES-128-GCM"
    keys_bytes = fnb._keys_section(suite, b.wrapped)
    forged = replace(b, keys_bytes=keys_bytes, suite=suite)
    with pytest.raises(KeyWrapError, match="suite"):
        open_as(fleet, forged)


def test_bundle_needs_a_recipient(fleet: Fleet) -> None:
    with pytest.raises(ManifestError, match="recipient"):
        fnb.build(
            MODEL, name="examples/tiny", version="1.0.0", publisher=fleet.publisher, recipients={}
        )


@pytest.mark.parametrize("name", ["tiny", "Examples/tiny", "examples/", "a/b/c"])
def test_bad_function_id_refused(fleet: Fleet, name: str) -> None:
    with pytest.raises(ManifestError, match="ns/name"):
        build(fleet, name=name)


@pytest.mark.parametrize("version", ["1", "1.0", "v1.0.0", "01.0.0"])
def test_bad_version_refused(fleet: Fleet, version: str) -> None:
    with pytest.raises(ManifestError, match="semver"):
        build(fleet, version=version)


def test_read_missing_file_is_a_bundle_error(tmp_path: Path) -> None:
    with pytest.raises(fnb.BundleError, match="cannot read"):
        Bundle.read(tmp_path / "nope.fnb")
