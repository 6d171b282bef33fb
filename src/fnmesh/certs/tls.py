"""``ssl.SSLContext`` factories for mutual TLS with the fleet CA (aiohttp and MQTT)."""

from __future__ import annotations

import ssl
from pathlib import Path

from fnmesh.certs.home import Home
from fnmesh.certs.identity import Identity


def server_context(identity: Identity, ca: Path, crl: Path | None = None) -> ssl.SSLContext:
    """A server context that requires a client certificate from the fleet CA.

    With ``crl``, revoked client certificates fail the handshake.
    """
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(identity.cert_path, identity.key_path)
    ctx.load_verify_locations(cafile=str(ca))
    if crl is not None and crl.exists():
        ctx.load_verify_locations(cafile=str(crl))
        ctx.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def client_context(
    identity: Identity | None, ca: Path, *, check_hostname: bool = True
) -> ssl.SSLContext:
    """A client context trusting only the fleet CA, presenting ``identity`` when given."""
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(ca))
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.check_hostname = check_hostname
    if identity is not None:
        ctx.load_cert_chain(identity.cert_path, identity.key_path)
    return ctx


def home_client_context(home: Home, identity: Identity | None) -> ssl.SSLContext:
    return client_context(identity, home.ca_cert)
