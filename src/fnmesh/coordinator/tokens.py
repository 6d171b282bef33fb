"""Short-lived API tokens for browsers and scripts that hold no client certificate.

``fnmesh token`` asks the coordinator (over mutual TLS, with the caller's own
certificate) for a token. The token carries the caller's identity (CN, role,
namespace, certificate serial) and an expiry, signed with the coordinator's
key; it grants exactly what that certificate grants, until it expires or the
certificate is revoked (each use is checked against the current revocation
list by serial).
"""

from __future__ import annotations

import base64
import binascii
import json
import time
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from fnmesh.certs.errors import TrustError
from fnmesh.certs.identity import CertInfo, Identity, Role
from fnmesh.certs.trust import TrustStore
from fnmesh.functions.manifest import canonical_json

CONTEXT = b"fnmesh/v1 api token\x00"
#: Longest lifetime a token may ask for.
MAX_TTL_S = 12 * 3600
DEFAULT_TTL_S = 900


@dataclass(frozen=True, slots=True)
class Token:
    cn: str
    role: str
    namespace: str | None
    serial: int
    expires: float


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def mint(
    coordinator: Identity, holder: CertInfo, ttl_s: float = DEFAULT_TTL_S
) -> tuple[str, float]:
    """A token for ``holder``, valid ``ttl_s`` seconds; returns it and its expiry (epoch)."""
    if not 0 < ttl_s <= MAX_TTL_S:
        raise TrustError(f"a token lives between 1 s and {MAX_TTL_S} s")
    expires = time.time() + ttl_s
    body = canonical_json(
        {
            "cn": holder.cn,
            "role": holder.role.value,
            "ns": holder.namespace,
            "serial": f"{holder.serial:x}",
            "exp": expires,
        }
    )
    sig = coordinator.key.sign(CONTEXT + body, ec.ECDSA(hashes.SHA256()))
    return f"{_b64(body)}.{_b64(sig)}", expires


def verify(
    text: str, coordinator: Identity, trust: TrustStore, now: float | None = None
) -> CertInfo:
    """The identity a token stands for; raises :class:`TrustError` naming why not."""
    try:
        body_b64, sig_b64 = text.split(".")
        body, sig = _unb64(body_b64), _unb64(sig_b64)
        fields = json.loads(body)
        token = Token(
            cn=str(fields["cn"]),
            role=str(fields["role"]),
            namespace=fields.get("ns"),
            serial=int(fields["serial"], 16),
            expires=float(fields["exp"]),
        )
        role = Role(token.role)
    except (ValueError, KeyError, TypeError, binascii.Error) as e:
        raise TrustError("the token is malformed") from e
    pub = coordinator.cert.public_key()
    try:
        if not isinstance(pub, ec.EllipticCurvePublicKey):
            raise InvalidSignature
        pub.verify(sig, CONTEXT + body, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature as e:
        raise TrustError("the token's signature does not check out") from e
    if (now or time.time()) > token.expires:
        raise TrustError("the token has expired")
    if token.serial in trust.revoked:
        raise TrustError(f"the certificate behind the token ({token.cn}) is revoked")
    return CertInfo(
        cn=token.cn,
        role=role,
        name=token.cn.split(".", 1)[-1],
        serial=token.serial,
        fingerprint="",
        namespace=token.namespace,
        x25519=None,
    )
