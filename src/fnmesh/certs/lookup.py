"""Finding identities and recipients in a home folder by name."""

from __future__ import annotations

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PublicKey

from fnmesh.certs.errors import IdentityError
from fnmesh.certs.home import Home
from fnmesh.certs.identity import Identity, Role, common_name, load_cert, load_identity
from fnmesh.certs.trust import TrustStore

COORDINATOR_CN = "coordinator.main"


def identity(home: Home, role: Role, name: str) -> Identity:
    """Load ``{role}.{name}`` (keys included) from the home."""
    cn = common_name(role, name)
    d = home.identity_dir(cn)
    if not d.exists():
        raise IdentityError(
            f"no identity {cn} in {home.root} (fnmesh certs issue {role.value} ...)"
        )
    return load_identity(d)


def identity_by_cn(home: Home, cn: str) -> Identity:
    d = home.identity_dir(cn)
    if not d.exists():
        raise IdentityError(f"no identity {cn} in {home.root}")
    return load_identity(d)


def recipient(home: Home, trust: TrustStore, role: Role, name: str) -> tuple[str, X25519PublicKey]:
    """The CN and verified encryption key of a node or coordinator, from its certificate."""
    cn = common_name(role, name)
    cert_path = home.identity_dir(cn) / "cert.pem"
    if not cert_path.exists():
        raise IdentityError(f"no certificate for {cn} in {home.root}")
    info = trust.verify(load_cert(cert_path), role=role)
    if info.x25519 is None:
        raise IdentityError(f"{cn} has no encryption key in its certificate")
    return cn, info.x25519
