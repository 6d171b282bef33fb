"""Rollback orders: an operator's signed permission to run an older version.

Versions only go up: agents and the coordinator refuse a version older than
the highest they have run. Going back is an explicit act, signed by an
operator's key, naming the function and the version to return to; the
coordinator passes the order on in the assignment and every agent checks it
(operator role, fleet CA, not revoked, in date) before it accepts the older
version.
"""

from __future__ import annotations

import base64
import binascii
import json
import time
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fnmesh.certs.errors import TrustError
from fnmesh.certs.identity import CertInfo, Identity, Role
from fnmesh.certs.trust import TrustStore
from fnmesh.functions.errors import SignatureError
from fnmesh.functions.manifest import canonical_json

CONTEXT = b"fnmesh/v1 rollback order\x00"
#: How long an order may be used after it was signed.
VALID_S = 7 * 24 * 3600


@dataclass(frozen=True, slots=True)
class RollbackOrder:
    function: str
    version: str
    from_version: str
    issued_at: float


def sign_order(
    operator: Identity, function: str, version: str, from_version: str
) -> dict[str, str]:
    """An order to go back from ``from_version`` to ``version``, signed by ``operator``."""
    body = canonical_json(
        {
            "function": function,
            "version": version,
            "from_version": from_version,
            "issued_at": time.time(),
        }
    )
    sig = operator.key.sign(CONTEXT + body, ec.ECDSA(hashes.SHA256()))
    der = operator.cert.public_bytes(serialization.Encoding.DER)
    return {
        "order": base64.b64encode(body).decode(),
        "sig": base64.b64encode(sig).decode(),
        "cert": base64.b64encode(der).decode(),
    }


def verify_order(
    obj: Any, trust: TrustStore, *, function: str, version: str, now: float | None = None
) -> tuple[RollbackOrder, CertInfo]:
    """Check an order for ``function``@``version``; raises :class:`SignatureError` naming why."""
    try:
        if not isinstance(obj, dict) or set(obj) != {"order", "sig", "cert"}:
            raise ValueError("an order has exactly 'order', 'sig' and 'cert'")
        body = base64.b64decode(obj["order"], validate=True)
        sig = base64.b64decode(obj["sig"], validate=True)
        cert = x509.load_der_x509_certificate(base64.b64decode(obj["cert"], validate=True))
        fields = json.loads(body)
        order = RollbackOrder(
            function=str(fields["function"]),
            version=str(fields["version"]),
            from_version=str(fields["from_version"]),
            issued_at=float(fields["issued_at"]),
        )
    except (ValueError, KeyError, TypeError, binascii.Error) as e:
        raise SignatureError(f"rollback order is malformed: {e}") from e
    try:
        info = trust.verify(cert, role=Role.OPERATOR)
    except TrustError as e:
        raise SignatureError(f"rollback order refused: {e}") from e
    pub = cert.public_key()
    try:
        if not isinstance(pub, ec.EllipticCurvePublicKey):
            raise InvalidSignature
        pub.verify(sig, CONTEXT + body, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature as e:
        raise SignatureError("rollback order signature does not match") from e
    if (order.function, order.version) != (function, version):
        raise SignatureError(
            f"rollback order is for {order.function}@{order.version}, not {function}@{version}"
        )
    if (now or time.time()) - order.issued_at > VALID_S:
        raise SignatureError("rollback order has expired")
    return order, info
