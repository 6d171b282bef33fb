"""The fleet CA: create it, issue certificates per role, revoke them.

Keys are ECDSA P-256 with SHA-256 signatures: accepted by Mosquitto's TLS
(OpenSSL), the ``openssl`` CLI, Python's ``ssl`` and aiohttp alike. Every
certificate issued is recorded in ``ca/issued.json`` so revocation can go by
name as well as by serial. The revocation list is an X.509 CRL signed by the
CA (``ca/crl.pem``): Mosquitto reads it as its ``crlfile``, and every verifier
in fnmesh checks it through :mod:`fnmesh.certs.trust`.
"""

from __future__ import annotations

import ipaddress
import json
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.x509.oid import NameOID

from fnmesh.certs.errors import IdentityError
from fnmesh.certs.home import Config, Home, write_atomic
from fnmesh.certs.identity import (
    NAMESPACE_URI,
    ROLE_SPECS,
    X25519_URI,
    Identity,
    Role,
    check_name,
    common_name,
    load_cert,
    load_identity,
)

CA_DAYS = 3650
DEFAULT_DAYS = 365
#: How long a signed revocation list stays valid; also the grace period a node
#: cut off from the coordinator keeps serving with its last list.
CRL_DAYS = 7


def _pem_key(key: ec.EllipticCurvePrivateKey | X25519PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _now() -> datetime:
    return datetime.now(UTC)


def _sans(names: list[str]) -> list[x509.GeneralName]:
    out: list[x509.GeneralName] = []
    for n in names:
        try:
            out.append(x509.IPAddress(ipaddress.ip_address(n)))
        except ValueError:
            out.append(x509.DNSName(n))
    return out


@dataclass(frozen=True, slots=True)
class Issued:
    """One certificate in the CA's record."""

    cn: str
    serial: int
    role: str
    not_after: str
    revoked_at: str | None = None


class FleetCA:
    """The fleet's certificate authority, backed by a home folder."""

    def __init__(self, home: Home, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey):
        self.home = home
        self.cert = cert
        self.key = key

    # -- creation and loading -------------------------------------------------

    @classmethod
    def create(cls, home: Home, *, fleet: str = "fnmesh") -> FleetCA:
        if home.ca_key.exists():
            raise IdentityError(f"{home.root} already has a fleet CA")
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, fleet),
                x509.NameAttribute(NameOID.COMMON_NAME, f"{fleet} fleet CA"),
            ]
        )
        now = _now()
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(minutes=5))
            .not_valid_after(now + timedelta(days=CA_DAYS))
            .add_extension(x509.BasicConstraints(ca=True, path_length=1), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
            .sign(key, hashes.SHA256())
        )
        write_atomic(home.ca_key, _pem_key(key), mode=0o600)
        write_atomic(home.ca_cert, cert.public_bytes(serialization.Encoding.PEM))
        ca = cls(home, cert, key)
        ca._save_issued([])
        ca.write_crl()
        return ca

    @classmethod
    def load(cls, home: Home) -> FleetCA:
        cert = load_cert(home.ca_cert)
        try:
            key = serialization.load_pem_private_key(home.ca_key.read_bytes(), password=None)
        except FileNotFoundError as e:
            raise IdentityError(
                f"no fleet CA key at {home.ca_key} (only the coordinator's home holds it)"
            ) from e
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise IdentityError(f"{home.ca_key}: expected an EC private key")
        return cls(home, cert, key)

    # -- issuing --------------------------------------------------------------

    def issue(
        self,
        role: Role,
        name: str,
        *,
        namespace: str | None = None,
        sans: list[str] | None = None,
        days: int = DEFAULT_DAYS,
        not_before: datetime | None = None,
    ) -> Identity:
        """Make a key pair (and an encryption key where the role has one) and a certificate.

        Writes ``identities/{cn}/`` in the home: ``cert.pem``, ``key.pem`` (0600)
        and ``enc.key`` (0600).
        """
        cn = common_name(role, name)
        if self._find(cn, live_only=True):
            raise IdentityError(f"{cn} already has a live certificate; revoke it first")
        key = ec.generate_private_key(ec.SECP256R1())
        enc = X25519PrivateKey.generate() if ROLE_SPECS[role].encryption_key else None
        cert = self.sign(
            role,
            cn,
            key.public_key(),
            enc_public=enc.public_key() if enc else None,
            namespace=namespace,
            sans=sans or [],
            days=days,
            not_before=not_before,
        )
        d = self.home.identity_dir(cn)
        write_atomic(d / "key.pem", _pem_key(key), mode=0o600)
        if enc is not None:
            write_atomic(d / "enc.key", _pem_key(enc), mode=0o600)
        write_atomic(d / "cert.pem", cert.public_bytes(serialization.Encoding.PEM))
        # The CA certificate beside every identity makes a folder self-contained
        # for TLS clients such as mosquitto_rr (--cafile).
        write_atomic(d / "ca.pem", self.cert.public_bytes(serialization.Encoding.PEM))
        return load_identity(d)

    def sign(
        self,
        role: Role,
        cn: str,
        public_key: ec.EllipticCurvePublicKey,
        *,
        enc_public: X25519PublicKey | None = None,
        namespace: str | None = None,
        sans: list[str] | None = None,
        days: int = DEFAULT_DAYS,
        not_before: datetime | None = None,
    ) -> x509.Certificate:
        """Sign a certificate for ``cn`` in ``role`` (also used for approved enrolments)."""
        spec = ROLE_SPECS[role]
        if spec.namespace:
            if not namespace:
                raise IdentityError(f"a {role.value} certificate needs --namespace")
            check_name(namespace, "namespace")
        elif namespace:
            raise IdentityError(f"a {role.value} certificate takes no namespace")
        if spec.encryption_key and enc_public is None:
            raise IdentityError(f"a {role.value} certificate needs an encryption key")
        if days <= 0:
            raise IdentityError("--days must be positive")
        start = not_before or (_now() - timedelta(minutes=5))
        general: list[x509.GeneralName] = _sans(sans or [])
        if namespace:
            general.append(x509.UniformResourceIdentifier(NAMESPACE_URI + namespace))
        if enc_public is not None:
            raw = enc_public.public_bytes(
                serialization.Encoding.Raw, serialization.PublicFormat.Raw
            )
            general.append(x509.UniformResourceIdentifier(X25519_URI + raw.hex()))
        builder = (
            x509.CertificateBuilder()
            .subject_name(
                x509.Name(
                    [
                        x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, role.value),
                        x509.NameAttribute(NameOID.COMMON_NAME, cn),
                    ]
                )
            )
            .issuer_name(self.cert.subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(start + timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=spec.key_agreement,
                    key_cert_sign=False,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.ExtendedKeyUsage(list(spec.eku)), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()), False
            )
        )
        if general:
            builder = builder.add_extension(x509.SubjectAlternativeName(general), critical=False)
        cert = builder.sign(self.key, hashes.SHA256())
        records = self._load_issued()
        records.append(
            Issued(cn, cert.serial_number, role.value, cert.not_valid_after_utc.isoformat())
        )
        self._save_issued(records)
        return cert

    # -- revocation -----------------------------------------------------------

    def revoke(self, name_or_serial: str) -> list[Issued]:
        """Revoke every live certificate of a CN (or role-less name) or one serial."""
        records = self._load_issued()
        live = [i for i, r in enumerate(records) if not r.revoked_at]
        # A name wins over a serial: "node.x", or the bare name "x".
        hits = [
            i for i in live if name_or_serial in (records[i].cn, records[i].cn.split(".", 1)[-1])
        ]
        if not hits:
            text = name_or_serial.lower().removeprefix("0x")
            try:
                serial = int(text, 16)
            except ValueError:
                serial = None
            hits = [i for i in live if serial is not None and records[i].serial == serial]
        if not hits:
            raise IdentityError(f"no live certificate matches {name_or_serial!r}")
        if len({records[i].cn for i in hits}) > 1:
            roles = {records[i].role for i in hits}
            raise IdentityError(
                f"{name_or_serial!r} matches several identities ({', '.join(sorted(roles))}); "
                "give the full name, e.g. node.NAME"
            )
        now = _now().isoformat()
        for i in hits:
            r = records[i]
            records[i] = Issued(r.cn, r.serial, r.role, r.not_after, revoked_at=now)
        self._save_issued(records)
        self.write_crl()
        return [records[i] for i in hits]

    def build_crl(self) -> x509.CertificateRevocationList:
        """Sign a new list. Each carries a CRL Number one higher than the last, so a
        holder can always tell a newer list from an older one."""
        now = _now()
        number_path = self.home.ca_dir / "crlnumber"
        try:
            number = int(number_path.read_text().strip()) + 1
        except FileNotFoundError:
            number = 1
        write_atomic(number_path, str(number).encode())
        builder = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(self.cert.subject)
            .last_update(now - timedelta(minutes=5))
            .next_update(now + timedelta(days=CRL_DAYS))
            .add_extension(x509.CRLNumber(number), critical=False)
        )
        for r in self._load_issued():
            if r.revoked_at:
                builder = builder.add_revoked_certificate(
                    x509.RevokedCertificateBuilder()
                    .serial_number(r.serial)
                    .revocation_date(datetime.fromisoformat(r.revoked_at))
                    .build()
                )
        return builder.sign(self.key, hashes.SHA256())

    def write_crl(self) -> x509.CertificateRevocationList:
        crl = self.build_crl()
        write_atomic(self.home.crl, crl.public_bytes(serialization.Encoding.PEM))
        return crl

    def issued(self) -> list[Issued]:
        return self._load_issued()

    # -- the record -----------------------------------------------------------

    def _find(self, cn: str, *, live_only: bool) -> list[Issued]:
        now = _now()
        return [
            r
            for r in self._load_issued()
            if r.cn == cn
            and not (live_only and (r.revoked_at or datetime.fromisoformat(r.not_after) < now))
        ]

    def _load_issued(self) -> list[Issued]:
        path = self.home.issued
        if not path.exists():
            return []
        raw: list[dict[str, Any]] = json.loads(path.read_text())
        return [Issued(**r) for r in raw]

    def _save_issued(self, records: list[Issued]) -> None:
        data = [
            {
                "cn": r.cn,
                "serial": r.serial,
                "role": r.role,
                "not_after": r.not_after,
                "revoked_at": r.revoked_at,
            }
            for r in records
        ]
        write_atomic(self.home.issued, json.dumps(data, indent=1).encode())


def init_home(
    home: Home, *, sans: list[str] | None = None, fleet: str = "fnmesh"
) -> tuple[FleetCA, dict[str, Identity]]:
    """Create a fleet in a new home: CA, coordinator, broker and a first operator."""
    ca = FleetCA.create(home, fleet=fleet)
    names = ["localhost", "127.0.0.1", "::1", *(sans or [])]
    made = {
        "coordinator": ca.issue(Role.COORDINATOR, "main", sans=names),
        "broker": ca.issue(Role.BROKER, "main", sans=names),
        "operator": ca.issue(Role.OPERATOR, "admin"),
    }
    if not home.config_path.exists():
        home.save_config(Config())
    return ca, made
