"""Wrapping data keys for one recipient with HPKE (RFC 9180).

Suite: DHKEM(X25519, HKDF-SHA256), HKDF-SHA256, AES-256-GCM, base mode. The
``info`` binds a wrapped key to the bundle's ciphertext digest, so a key lifted
from one bundle cannot be replayed onto another.
"""

from __future__ import annotations

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hpke
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

from fnmesh.certs.errors import KeyWrapError

SUITE_NAME = "DHKEM-X25519-HKDF-SHA256/HKDF-SHA256/AES-256-GCM"
_SUITE = hpke.Suite(hpke.KEM.X25519, hpke.KDF.HKDF_SHA256, hpke.AEAD.AES_256_GCM)
_INFO = b"fnmesh/v1 data key\x00"


def wrap(data_key: bytes, recipient: X25519PublicKey, bound_to: bytes) -> bytes:
    """Encrypt ``data_key`` for ``recipient``, bound to ``bound_to`` (a bundle digest)."""
    return _SUITE.encrypt(data_key, recipient, info=_INFO + bound_to)


def unwrap(
    wrapped: bytes, key: X25519PrivateKey, bound_to: bytes, *, suite: str = SUITE_NAME
) -> bytes:
    """Recover a data key; fails if it was wrapped for someone else or for another bundle."""
    if suite != SUITE_NAME:
        raise KeyWrapError(f"unknown key wrapping suite {suite!r}")
    try:
        return _SUITE.decrypt(wrapped, key, info=_INFO + bound_to)
    except (InvalidTag, ValueError) as e:
        raise KeyWrapError(
            "data key does not unwrap with this key (not a recipient, or tampered)"
        ) from e
