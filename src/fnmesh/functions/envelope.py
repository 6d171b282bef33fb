"""Signing a manifest and checking its signature: the ``{signed, signatures}`` envelope.

The signature covers the canonical manifest bytes exactly as they travel; a
verifier checks the bytes it received, never a re-serialised copy. The
publisher's certificate travels with the signature and must chain to the
fleet CA, be in date, unrevoked, allowed to sign code, and bound to the
manifest's namespace.
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fnmesh.certs.errors import TrustError
from fnmesh.certs.identity import CertInfo, Identity, Role
from fnmesh.certs.trust import CODE_SIGNING, TrustStore
from fnmesh.functions.errors import BundleFormatError, SignatureError
from fnmesh.functions.manifest import Manifest, canonical_json

#: Domain separation: a manifest signature can never be mistaken for another fnmesh signature.
SIGNING_CONTEXT = b"fnmesh/v1 manifest\x00"


@dataclass(frozen=True, slots=True)
class Signature:
    cert: x509.Certificate
    sig: bytes


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def unb64(text: Any, what: str) -> bytes:
    """Strict base64: the text must be exactly what encoding the result gives back."""
    if not isinstance(text, str):
        raise BundleFormatError(f"{what} must be a base64 string")
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as e:
        raise BundleFormatError(f"{what} is not valid base64") from e
    if b64(raw) != text:
        raise BundleFormatError(f"{what} is not canonical base64")
    return raw


def sign_manifest(manifest_bytes: bytes, publisher: Identity) -> bytes:
    """The signatures section for ``manifest_bytes``, signed by ``publisher``."""
    sig = publisher.key.sign(SIGNING_CONTEXT + manifest_bytes, ec.ECDSA(hashes.SHA256()))
    cert_der = publisher.cert.public_bytes(serialization.Encoding.DER)
    return canonical_json({"signatures": [{"cert": b64(cert_der), "sig": b64(sig)}]})


def parse_signatures(section: bytes) -> list[Signature]:
    try:
        obj = json.loads(section)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise BundleFormatError(f"signatures section is not JSON: {e}") from e
    if (
        not isinstance(obj, dict)
        or set(obj) != {"signatures"}
        or not isinstance(obj["signatures"], list)
    ):
        raise BundleFormatError("signatures section must be {'signatures': [...]}")
    if canonical_json(obj) != section:
        raise BundleFormatError("signatures section is not in canonical form")
    out = []
    for i, entry in enumerate(obj["signatures"]):
        if not isinstance(entry, dict) or set(entry) != {"cert", "sig"}:
            raise BundleFormatError(f"signature {i} must have exactly 'cert' and 'sig'")
        der = unb64(entry["cert"], f"signature {i} certificate")
        try:
            cert = x509.load_der_x509_certificate(der)
        except ValueError as e:
            raise BundleFormatError(f"signature {i} certificate does not parse: {e}") from e
        out.append(Signature(cert, unb64(entry["sig"], f"signature {i}")))
    if not out:
        raise SignatureError("bundle is unsigned")
    return out


def verify_manifest(
    manifest_bytes: bytes,
    manifest: Manifest,
    signatures: list[Signature],
    trust: TrustStore,
    *,
    at: datetime | None = None,
) -> tuple[CertInfo, x509.Certificate]:
    """Check the publisher's certificate and signature; returns who signed, and their certificate.

    The publisher must be the fleet's, in date, unrevoked, a code signer, the
    one the manifest names, and bound to the manifest's namespace.
    """
    errors: list[str] = []
    for s in signatures:
        try:
            info = trust.verify(s.cert, role=Role.PUBLISHER, purpose=CODE_SIGNING, at=at)
        except TrustError as e:
            errors.append(f"publisher certificate refused: {e}")
            continue
        pub = s.cert.public_key()
        if not isinstance(pub, ec.EllipticCurvePublicKey):
            errors.append("publisher key is not an EC key")
            continue
        try:
            pub.verify(s.sig, SIGNING_CONTEXT + manifest_bytes, ec.ECDSA(hashes.SHA256()))
        except InvalidSignature:
            errors.append(f"signature by {info.cn} does not match the manifest bytes")
            continue
        if info.cn != manifest.publisher:
            errors.append(
                f"manifest names publisher {manifest.publisher!r} but {info.cn} signed it"
            )
            continue
        if info.namespace != manifest.namespace:
            errors.append(
                f"publisher {info.cn} may sign only for namespace {info.namespace!r}, "
                f"not {manifest.namespace!r}"
            )
            continue
        return info, s.cert
    raise SignatureError("; ".join(errors) or "no valid signature")
