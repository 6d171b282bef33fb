"""Enrolment in one step: a node with no certificate asks the coordinator for one and waits.

The node makes its EC key and its X25519 encryption key, sends a CSR carrying the latter
(``urn:fnmesh:x25519:HEX``) to ``POST /v1/enrol`` without a client certificate, and polls
``GET /v1/enrol/{id}`` until an operator approves it (``fnmesh nodes approve NAME``). It
pins the coordinator: TLS to it is verified against the fleet CA file the operator copied
to this machine (``--ca FILE``), the one thing a new box needs. The certificate it gets
back is checked against that CA, its name and its keys before the identity folder
(``cert.pem``, ``key.pem`` 0600, ``enc.key`` 0600, ``ca.pem``) is written.

Keys and the request id wait in ``{state}/enrolment/`` meanwhile, so an agent restarted
while pending resumes the same request instead of filing a new one.
"""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from fnmesh.agent.errors import AgentError
from fnmesh.certs.enrolment import build_csr, key_fingerprint
from fnmesh.certs.home import Home, write_atomic
from fnmesh.certs.identity import Identity, Role, common_name, load_identity
from fnmesh.certs.tls import client_context
from fnmesh.certs.trust import TrustStore

log = logging.getLogger("fnmesh.agent.enrol")


class EnrolmentFailed(AgentError):
    """The coordinator refused the enrolment request, or returned a certificate that does not fit."""


def _pem_private(key: ec.EllipticCurvePrivateKey | X25519PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


class Enroller:
    """One node's enrolment: keys (kept across restarts while pending), request, wait, identity."""

    def __init__(
        self,
        home: Home,
        name: str,
        ca_file: Path,
        state_dir: Path,
        *,
        sans: tuple[str, ...] = ("localhost", "127.0.0.1", "::1"),
    ) -> None:
        self.home = home
        self.name = name
        self.cn = common_name(Role.NODE, name)
        self.ca_file = ca_file
        self.dir = state_dir / "enrolment"
        self.sans = sans
        self.key, self.enc = self._keys()
        self.key_fingerprint = key_fingerprint(self.key.public_key())
        self.request_id: str | None = self._saved_request()

    def _keys(self) -> tuple[ec.EllipticCurvePrivateKey, X25519PrivateKey]:
        kp, ep = self.dir / "key.pem", self.dir / "enc.key"
        if kp.exists() and ep.exists():
            key = serialization.load_pem_private_key(kp.read_bytes(), None)
            enc = serialization.load_pem_private_key(ep.read_bytes(), None)
            if isinstance(key, ec.EllipticCurvePrivateKey) and isinstance(enc, X25519PrivateKey):
                return key, enc
        key = ec.generate_private_key(ec.SECP256R1())
        enc = X25519PrivateKey.generate()
        write_atomic(kp, _pem_private(key), mode=0o600)
        write_atomic(ep, _pem_private(enc), mode=0o600)
        return key, enc

    def _saved_request(self) -> str | None:
        try:
            return str(json.loads((self.dir / "request.json").read_text())["id"])
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def csr_pem(self) -> str:
        csr = build_csr(self.name, self.key, self.enc.public_key(), list(self.sans))
        return csr.public_bytes(serialization.Encoding.PEM).decode()

    async def async_enrol(
        self,
        coordinator_url: str,
        hardware: Mapping[str, Any],
        labels: Mapping[str, str],
        *,
        poll_s: float = 1.0,
        on_pending: Callable[[str], Awaitable[None]] | None = None,
    ) -> Identity:
        """Send the request (or resume it), wait for approval, write and return the identity."""
        import aiohttp

        # Pinned: only a server whose certificate the fleet CA signed (for its address).
        ssl_ctx = client_context(None, self.ca_file)
        base = coordinator_url.rstrip("/")
        timeout = aiohttp.ClientTimeout(total=15)
        async with aiohttp.ClientSession(timeout=timeout) as http:
            while True:
                if self.request_id is None:
                    body = {
                        "csr": self.csr_pem(),
                        "hardware": dict(hardware),
                        "labels": dict(labels),
                    }
                    try:
                        async with http.post(f"{base}/v1/enrol", json=body, ssl=ssl_ctx) as r:
                            got = await r.json(content_type=None)
                            if r.status == 429:
                                log.warning("coordinator has too many pending requests; retrying")
                                await asyncio.sleep(max(poll_s, 5.0))
                                continue
                            if r.status != 202:
                                raise EnrolmentFailed(f"enrolment refused ({r.status}): {got}")
                    except (aiohttp.ClientError, TimeoutError) as e:
                        log.warning("cannot reach %s to enrol: %s", base, e)
                        await asyncio.sleep(poll_s)
                        continue
                    self.request_id = str(got["id"])
                    write_atomic(
                        self.dir / "request.json", json.dumps({"id": self.request_id}).encode()
                    )
                    log.info(
                        "enrolment request %s sent; waiting for `fnmesh nodes approve %s` (key %s)",
                        self.request_id,
                        self.name,
                        self.key_fingerprint,
                    )
                    if on_pending is not None:
                        await on_pending(self.key_fingerprint)
                try:
                    async with http.get(f"{base}/v1/enrol/{self.request_id}", ssl=ssl_ctx) as r:
                        got = await r.json(content_type=None)
                        status = r.status
                except (aiohttp.ClientError, TimeoutError, ValueError) as e:
                    log.warning("enrolment poll failed: %s", e)
                    await asyncio.sleep(poll_s)
                    continue
                if status == 404:
                    # The coordinator restarted and forgot it: ask again with the same key.
                    self.request_id = None
                    continue
                if status == 200 and got.get("state") == "approved" and got.get("certificate"):
                    return self._install(got["certificate"].encode())
                await asyncio.sleep(poll_s)

    def _install(self, cert_pem: bytes) -> Identity:
        """Check the signed certificate (CA, role, name, both keys), then write the identity folder."""
        try:
            cert = x509.load_pem_x509_certificate(cert_pem)
        except ValueError as e:
            raise EnrolmentFailed(f"the coordinator sent no valid certificate: {e}") from e
        trust = TrustStore.from_files(self.ca_file)
        info = trust.verify(cert, role=Role.NODE)
        ours = self.key.public_key().public_numbers()
        theirs = cert.public_key()
        if info.cn != self.cn or not isinstance(theirs, ec.EllipticCurvePublicKey):
            raise EnrolmentFailed(f"the certificate names {info.cn}, not {self.cn}")
        if theirs.public_numbers() != ours:
            raise EnrolmentFailed("the certificate is for another key")
        raw = serialization.Encoding.Raw, serialization.PublicFormat.Raw
        if info.x25519 is None or info.x25519.public_bytes(
            *raw
        ) != self.enc.public_key().public_bytes(*raw):
            raise EnrolmentFailed("the certificate carries another encryption key")
        d = self.home.identity_dir(self.cn)
        ca_pem = self.ca_file.read_bytes()
        write_atomic(d / "key.pem", _pem_private(self.key), mode=0o600)
        write_atomic(d / "enc.key", _pem_private(self.enc), mode=0o600)
        write_atomic(d / "cert.pem", cert_pem)
        write_atomic(d / "ca.pem", ca_pem)
        if not self.home.ca_cert.exists():
            write_atomic(self.home.ca_cert, ca_pem)
        shutil.rmtree(self.dir, ignore_errors=True)
        log.info("enrolled as %s (certificate %s)", self.cn, info.fingerprint)
        return load_identity(d)
