"""Enrolment requests: what a new node sends (a CSR), and what the coordinator reads from it.

A node with no certificate makes an EC key (P-256) and an X25519 encryption key, and sends
a certificate signing request whose subject CN is ``node.NAME`` and whose SAN carries its
encryption key as ``urn:fnmesh:x25519:HEX`` (the same form the fleet CA writes into
certificates, :mod:`fnmesh.certs.identity`). Nothing in a request is trusted: the CSR's
self-signature only proves the sender holds the key; an operator approves the name.
"""

from __future__ import annotations

import hashlib
import ipaddress
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PublicKey
from cryptography.x509.oid import NameOID

from fnmesh.certs.errors import IdentityError
from fnmesh.certs.identity import X25519_URI, Role, check_name, common_name

#: A CSR larger than this is refused before it is parsed.
MAX_CSR_BYTES = 8192
#: DNS and IP names a request may ask for (the node's own HTTPS endpoint).
MAX_SANS = 8


class EnrolmentError(IdentityError):
    """An enrolment request is malformed, too large, or asks for something it may not have."""


@dataclass(frozen=True, slots=True)
class EnrolmentClaim:
    """What a CSR asks for, once its self-signature checked out (an unapproved claim)."""

    name: str
    cn: str
    public_key: ec.EllipticCurvePublicKey
    x25519: X25519PublicKey
    sans: tuple[str, ...]
    #: SHA-256 of the EC public key (SubjectPublicKeyInfo DER), hex: what the operator compares.
    key_fingerprint: str


def key_fingerprint(public_key: ec.EllipticCurvePublicKey) -> str:
    """SHA-256 of a public key's SubjectPublicKeyInfo DER, as lowercase hex."""
    der = public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(der).hexdigest()


def build_csr(
    name: str,
    key: ec.EllipticCurvePrivateKey,
    enc_public: X25519PublicKey,
    sans: list[str] | None = None,
) -> x509.CertificateSigningRequest:
    """A CSR for node ``name`` carrying its X25519 key as a SAN URI, signed with ``key``."""
    cn = common_name(Role.NODE, name)
    raw = enc_public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    general: list[x509.GeneralName] = [x509.UniformResourceIdentifier(X25519_URI + raw.hex())]
    for s in sans or []:
        try:
            general.append(x509.IPAddress(ipaddress.ip_address(s)))
        except ValueError:
            general.append(x509.DNSName(s))
    return (
        x509.CertificateSigningRequestBuilder()
        .subject_name(
            x509.Name(
                [
                    x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, Role.NODE.value),
                    x509.NameAttribute(NameOID.COMMON_NAME, cn),
                ]
            )
        )
        .add_extension(x509.SubjectAlternativeName(general), critical=False)
        .sign(key, hashes.SHA256())
    )


def read_csr(pem: bytes) -> EnrolmentClaim:
    """Parse and check a node's CSR: size, signature, CN ``node.NAME``, one X25519 key, a few names."""
    if len(pem) > MAX_CSR_BYTES:
        raise EnrolmentError(f"the CSR is larger than {MAX_CSR_BYTES} bytes")
    try:
        csr = x509.load_pem_x509_csr(pem)
    except ValueError as e:
        raise EnrolmentError(f"not a PEM certificate signing request: {e}") from e
    if not csr.is_signature_valid:
        raise EnrolmentError("the CSR's signature does not match its key")
    public_key = csr.public_key()
    if not isinstance(public_key, ec.EllipticCurvePublicKey) or not isinstance(
        public_key.curve, ec.SECP256R1
    ):
        raise EnrolmentError("the CSR's key must be an EC P-256 key")
    cns = csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if len(cns) != 1:
        raise EnrolmentError("the CSR must name exactly one CN")
    cn = str(cns[0].value)
    prefix = f"{Role.NODE.value}."
    if not cn.startswith(prefix):
        raise EnrolmentError(f"a node enrols as node.NAME, not {cn!r}")
    try:
        name = check_name(cn[len(prefix) :], "node name")
    except IdentityError as e:
        raise EnrolmentError(str(e)) from e
    x_pub: X25519PublicKey | None = None
    sans: list[str] = []
    try:
        san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound as e:
        raise EnrolmentError("the CSR carries no encryption key (urn:fnmesh:x25519:HEX)") from e
    for g in san:
        if isinstance(g, x509.UniformResourceIdentifier) and g.value.startswith(X25519_URI):
            if x_pub is not None:
                raise EnrolmentError("the CSR carries more than one encryption key")
            try:
                x_pub = X25519PublicKey.from_public_bytes(bytes.fromhex(g.value[len(X25519_URI) :]))
            except ValueError as e:
                raise EnrolmentError(f"malformed encryption key in the CSR: {e}") from e
        elif isinstance(g, x509.DNSName | x509.IPAddress):
            sans.append(str(g.value))
        else:
            raise EnrolmentError(f"the CSR asks for a name fnmesh does not issue: {g}")
    if x_pub is None:
        raise EnrolmentError("the CSR carries no encryption key (urn:fnmesh:x25519:HEX)")
    if len(sans) > MAX_SANS:
        raise EnrolmentError(f"the CSR asks for more than {MAX_SANS} names")
    return EnrolmentClaim(
        name=name,
        cn=cn,
        public_key=public_key,
        x25519=x_pub,
        sans=tuple(sans),
        key_fingerprint=key_fingerprint(public_key),
    )
