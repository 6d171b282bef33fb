"""Encrypting a model with a fresh data key, and decrypting it into memory only."""

from __future__ import annotations

import hashlib
import hmac
import os
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from fnmesh.functions.digest import tree_sha256
from fnmesh.functions.errors import IntegrityError

KEY_BYTES = 32
NONCE_BYTES = 12


@dataclass(frozen=True, slots=True)
class Sealed:
    ciphertext: bytes
    data_key: bytes
    nonce: bytes
    plaintext_digest: str
    ciphertext_digest: str
    plaintext_size: int


def aad_for(function_id: str, version: str) -> bytes:
    """Additional data binding a ciphertext to its function and version."""
    return f"fnmesh-bundle:{function_id}@{version}".encode()


def seal(plaintext: bytes, aad: bytes) -> Sealed:
    """Encrypt with AES-256-GCM under a random data key."""
    key = AESGCM.generate_key(bit_length=256)
    nonce = os.urandom(NONCE_BYTES)
    ct = AESGCM(key).encrypt(nonce, plaintext, aad)
    return Sealed(
        ciphertext=ct,
        data_key=key,
        nonce=nonce,
        plaintext_digest=tree_sha256(plaintext),
        ciphertext_digest=tree_sha256(ct),
        plaintext_size=len(plaintext),
    )


def unseal(
    ciphertext: bytes | memoryview, data_key: bytes, nonce: bytes, aad: bytes, plaintext_digest: str
) -> bytes:
    """Decrypt and check the plaintext digest; the plaintext never touches disk."""
    try:
        pt = AESGCM(data_key).decrypt(nonce, ciphertext, aad)
    except InvalidTag as e:
        raise IntegrityError("model ciphertext fails authentication (tampered or wrong key)") from e
    if not hmac.compare_digest(tree_sha256(pt), plaintext_digest):
        raise IntegrityError("decrypted model does not match the manifest's plaintext digest")
    return pt


def keys_mac(data_key: bytes, keys_section: bytes) -> bytes:
    """MAC over the wrapped-keys section, keyed from the data key.

    Wrapped keys sit outside the signature (the coordinator re-wraps them), so
    this MAC is what lets any recipient detect a change to another recipient's
    entry once it has unwrapped its own key.
    """
    mac_key = hmac.new(data_key, b"fnmesh keys mac v1", hashlib.sha256).digest()
    return hmac.new(mac_key, keys_section, hashlib.sha256).digest()
