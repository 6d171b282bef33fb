"""Roles, and what a certificate says about its holder.

A certificate's CN is ``{role}.{name}`` (``node.lyon-1``, ``device.meter-17``),
unique across roles; Mosquitto takes it as the username. The role is also in
the subject's OU. fnmesh-specific facts ride in URI subject alternative names,
so they are covered by the CA's signature and visible to ``openssl x509``:

- ``urn:fnmesh:namespace:NS``: the namespace a publisher may sign for;
- ``urn:fnmesh:x25519:HEX``: the holder's HPKE encryption public key
  (coordinator and nodes), so whoever wraps a data key for a node takes the key
  from a certificate the fleet CA signed.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fnmesh.certs.errors import IdentityError

NAMESPACE_URI = "urn:fnmesh:namespace:"
X25519_URI = "urn:fnmesh:x25519:"
_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")


class Role(StrEnum):
    COORDINATOR = "coordinator"
    BROKER = "broker"
    NODE = "node"
    ROUTER = "router"
    PUBLISHER = "publisher"
    OPERATOR = "operator"
    DEVICE = "device"


@dataclass(frozen=True, slots=True)
class RoleSpec:
    """Key usages and extras of one role (DESIGN.md's identity table)."""

    eku: tuple[x509.ObjectIdentifier, ...]
    key_agreement: bool = False
    #: Holds an X25519 key for receiving wrapped data keys.
    encryption_key: bool = False
    namespace: bool = False


ROLE_SPECS: dict[Role, RoleSpec] = {
    Role.COORDINATOR: RoleSpec(
        (ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH),
        key_agreement=True,
        encryption_key=True,
    ),
    Role.BROKER: RoleSpec((ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH)),
    Role.NODE: RoleSpec(
        (ExtendedKeyUsageOID.CLIENT_AUTH, ExtendedKeyUsageOID.SERVER_AUTH),
        key_agreement=True,
        encryption_key=True,
    ),
    Role.ROUTER: RoleSpec((ExtendedKeyUsageOID.CLIENT_AUTH,)),
    Role.PUBLISHER: RoleSpec(
        (ExtendedKeyUsageOID.CODE_SIGNING, ExtendedKeyUsageOID.CLIENT_AUTH), namespace=True
    ),
    Role.OPERATOR: RoleSpec((ExtendedKeyUsageOID.CLIENT_AUTH,)),
    Role.DEVICE: RoleSpec((ExtendedKeyUsageOID.CLIENT_AUTH,)),
}


def check_name(name: str, what: str = "name") -> str:
    if not _NAME_RE.fullmatch(name):
        raise IdentityError(
            f"{what} {name!r} must be 1-63 lowercase letters, digits, '-' or '_', "
            "starting with a letter or digit"
        )
    return name


def common_name(role: Role, name: str) -> str:
    """The CN for ``name`` in ``role``; accepts ``name`` already prefixed with its role."""
    prefix = f"{role.value}."
    if name.startswith(prefix):
        name = name[len(prefix) :]
    return f"{prefix}{check_name(name)}"


def bare_name(cn: str) -> str:
    """``node.lyon-1`` -> ``lyon-1`` (how nodes and devices appear in topics)."""
    return cn.split(".", 1)[1] if "." in cn else cn


@dataclass(frozen=True, slots=True)
class CertInfo:
    """What fnmesh reads from a certificate (after it has been verified)."""

    cn: str
    role: Role
    name: str
    serial: int
    fingerprint: str
    namespace: str | None
    x25519: X25519PublicKey | None

    @classmethod
    def of(cls, cert: x509.Certificate) -> CertInfo:
        try:
            cn_attr = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
            ou_attr = cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)
            cn = str(cn_attr[0].value)
            role = Role(str(ou_attr[0].value))
        except (IndexError, ValueError) as e:
            raise IdentityError("certificate has no fnmesh role (OU) or CN") from e
        if not cn.startswith(f"{role.value}."):
            raise IdentityError(f"certificate CN {cn!r} does not match its role {role.value!r}")
        namespace = None
        x_pub = None
        try:
            san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            for uri in san.get_values_for_type(x509.UniformResourceIdentifier):
                if uri.startswith(NAMESPACE_URI):
                    namespace = uri[len(NAMESPACE_URI) :]
                elif uri.startswith(X25519_URI):
                    x_pub = X25519PublicKey.from_public_bytes(bytes.fromhex(uri[len(X25519_URI) :]))
        except x509.ExtensionNotFound:
            pass
        except ValueError as e:
            raise IdentityError(f"certificate {cn}: malformed fnmesh SAN: {e}") from e
        return cls(
            cn=cn,
            role=role,
            name=bare_name(cn),
            serial=cert.serial_number,
            fingerprint=fingerprint(cert),
            namespace=namespace,
            x25519=x_pub,
        )


def fingerprint(cert: x509.Certificate) -> str:
    """SHA-256 of the certificate's DER, hex: what agents advertise and operators compare."""
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


@dataclass(frozen=True, slots=True)
class Identity:
    """One identity's files in a home folder, loaded."""

    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey
    cert_path: Path
    key_path: Path
    enc_key: X25519PrivateKey | None
    info: CertInfo

    @property
    def cn(self) -> str:
        return self.info.cn


def load_cert(path: Path) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(path.read_bytes())
    except FileNotFoundError as e:
        raise IdentityError(f"no certificate at {path}") from e
    except ValueError as e:
        raise IdentityError(f"{path} is not a PEM certificate: {e}") from e


def load_identity(identity_dir: Path) -> Identity:
    """Load ``cert.pem``, ``key.pem`` and, where present, ``enc.key`` from a folder."""
    cert_path = identity_dir / "cert.pem"
    key_path = identity_dir / "key.pem"
    cert = load_cert(cert_path)
    try:
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    except FileNotFoundError as e:
        raise IdentityError(f"no private key at {key_path}") from e
    except ValueError as e:
        raise IdentityError(f"{key_path} is not a PEM private key: {e}") from e
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise IdentityError(f"{key_path}: expected an EC private key")
    enc_key = None
    enc_path = identity_dir / "enc.key"
    if enc_path.exists():
        k = serialization.load_pem_private_key(enc_path.read_bytes(), password=None)
        if not isinstance(k, X25519PrivateKey):
            raise IdentityError(f"{enc_path}: expected an X25519 private key")
        enc_key = k
    return Identity(cert, key, cert_path, key_path, enc_key, CertInfo.of(cert))
