"""Enrolment requests and trust decisions, without a network: CSR checks, the pending queue,
approval with the fleet CA, and which registry views placement may use."""

from __future__ import annotations

from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.x509.oid import NameOID

from fnmesh.certs.ca import init_home
from fnmesh.certs.enrolment import EnrolmentError, build_csr, key_fingerprint, read_csr
from fnmesh.certs.home import Home
from fnmesh.certs.identity import X25519_URI, CertInfo, Role
from fnmesh.coordinator.enrolment import EnrolmentQueue
from fnmesh.coordinator.registry import NodeView, Registry
from fnmesh.coordinator.scheduling import trusted


def _pem(csr: x509.CertificateSigningRequest) -> bytes:
    return csr.public_bytes(serialization.Encoding.PEM)


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def test_csr_round_trip_carries_the_encryption_key() -> None:
    key, enc = _key(), X25519PrivateKey.generate()
    claim = read_csr(_pem(build_csr("edge-7", key, enc.public_key(), ["127.0.0.1", "localhost"])))
    raw = serialization.Encoding.Raw, serialization.PublicFormat.Raw
    assert claim.name == "edge-7" and claim.cn == "node.edge-7"
    assert claim.x25519.public_bytes(*raw) == enc.public_key().public_bytes(*raw)
    assert claim.key_fingerprint == key_fingerprint(key.public_key())
    assert set(claim.sans) == {"127.0.0.1", "localhost"}


def _raw_csr(cn: str, general: list[x509.GeneralName] | None) -> bytes:
    b = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    )
    if general is not None:
        b = b.add_extension(x509.SubjectAlternativeName(general), critical=False)
    return _pem(b.sign(_key(), hashes.SHA256()))


def _enc_uri() -> x509.UniformResourceIdentifier:
    raw = (
        X25519PrivateKey.generate()
        .public_key()
        .public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    )
    return x509.UniformResourceIdentifier(X25519_URI + raw.hex())


@pytest.mark.parametrize(
    ("pem", "message"),
    [
        (b"garbage", "not a PEM"),
        (b"x" * 9000, "larger than"),
        (_raw_csr("operator.admin", [_enc_uri()]), "enrols as node.NAME"),
        (_raw_csr("node.Bad Name", [_enc_uri()]), "node name"),
        (_raw_csr("node.ok", None), "no encryption key"),
        (_raw_csr("node.ok", [_enc_uri(), _enc_uri()]), "more than one encryption key"),
        (
            _raw_csr(
                "node.ok", [_enc_uri(), x509.UniformResourceIdentifier("urn:fnmesh:namespace:x")]
            ),
            "does not issue",
        ),
    ],
)
def test_malformed_enrolment_request_refused(pem: bytes, message: str) -> None:
    with pytest.raises(EnrolmentError, match=message):
        read_csr(pem)


def _body(name: str) -> dict[str, object]:
    csr = build_csr(name, _key(), X25519PrivateKey.generate().public_key())
    return {"csr": _pem(csr).decode(), "hardware": {"cores": 2}, "labels": {"tier": "edge"}}


def test_enrolment_flood_capped_and_approval_signs_with_the_fleet_ca(tmp_path: Path) -> None:
    home = Home(tmp_path / "home")
    ca, _ = init_home(home)
    queue = EnrolmentQueue(home, max_pending=2)
    first = queue.submit(_body("n1"))
    queue.submit(_body("n2"))
    with pytest.raises(OverflowError):
        queue.submit(_body("n3"))
    with pytest.raises(EnrolmentError, match="already has a pending request"):
        queue.submit(_body("n1"))
    done = queue.approve("n1", "operator.admin")
    assert done.id == first.id and done.state == "approved" and done.certificate_pem
    cert = x509.load_pem_x509_certificate(done.certificate_pem.encode())
    info = CertInfo.of(cert)
    assert info.cn == "node.n1" and info.role is Role.NODE and info.x25519 is not None
    cert.verify_directly_issued_by(ca.cert)
    assert (home.root / "enrolled" / "node.n1.pem").read_text() == done.certificate_pem
    with pytest.raises(EnrolmentError, match="already enrolled"):
        queue.submit(_body("n1"))
    with pytest.raises(KeyError):
        queue.approve("n1", "operator.admin")  # nothing pending any more


FP_A, FP_B = "a" * 64, "b" * 64


@pytest.mark.parametrize(
    ("view", "expected"),
    [
        (NodeView("n", cn="node.n", state="ready", fingerprint=FP_A), True),
        (NodeView("n", cn="", state="discovered"), False),
        (NodeView("n", cn="node.other", state="ready", fingerprint=FP_A), False),
        (NodeView("n", cn="node.n", state="untrusted", fingerprint=FP_A), False),
        (
            NodeView(
                "n", cn="node.n", state="ready", fingerprint=FP_A, advertised_fingerprint=FP_A
            ),
            True,
        ),
        (
            NodeView(
                "n", cn="node.n", state="ready", fingerprint=FP_A, advertised_fingerprint=FP_B
            ),
            False,
        ),
    ],
)
def test_only_verified_matching_nodes_trusted(view: NodeView, expected: bool) -> None:
    assert trusted(view) is expected


def test_lan_record_with_another_fingerprint_kept_apart_and_untrusted() -> None:
    reg = Registry()
    reg.on_status(
        "n", b'{"state": "ready", "cn": "node.n", "fingerprint": "' + FP_A.encode() + b'"}'
    )
    reg.on_lan_record(
        "n", "spoof._fnmesh-agent._tcp.local.", FP_B, labels={}, untrusted_reason=None
    )
    assert reg.untrusted["spoof._fnmesh-agent._tcp.local."].state == "untrusted"
    assert "n" in reg.snapshot() and trusted(reg.snapshot()["n"])
    assert all(v.state != "untrusted" for v in reg.snapshot().values())
    reg.on_lan_record("n", "n._fnmesh-agent._tcp.local.", FP_A, labels={}, untrusted_reason=None)
    assert reg.snapshot()["n"].advertised_fingerprint == FP_A and trusted(reg.snapshot()["n"])
