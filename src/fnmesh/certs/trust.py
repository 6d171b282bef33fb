"""Deciding whether to believe a certificate: chain, dates, role, revocation.

Every verifier in fnmesh (bundle verify, the coordinator's API, agents loading
bundles) goes through :class:`TrustStore`, so the revocation list is honoured
in one place.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID

from fnmesh.certs.errors import IdentityError, RevokedError, TrustError
from fnmesh.certs.home import Home
from fnmesh.certs.identity import CertInfo, Role, load_cert


@dataclass(frozen=True, slots=True)
class TrustStore:
    """The fleet CA and its current revocation list.

    Chain checks are remembered per certificate for the life of this store;
    a new revocation list makes a new store (:meth:`with_crl`), so nothing
    verified under an older list is reused. Dates and role are checked on
    every call.
    """

    ca: x509.Certificate
    crl: x509.CertificateRevocationList | None = None
    revoked: frozenset[int] = field(default=frozenset())
    _chain_ok: dict[bytes, CertInfo] = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def from_files(cls, ca_path: Path, crl_path: Path | None = None) -> TrustStore:
        ca = load_cert(ca_path)
        crl = None
        if crl_path is not None and crl_path.exists():
            crl = load_crl(crl_path.read_bytes(), ca)
        return cls.build(ca, crl)

    @classmethod
    def from_home(cls, home: Home) -> TrustStore:
        return cls.from_files(home.ca_cert, home.crl)

    @classmethod
    def build(cls, ca: x509.Certificate, crl: x509.CertificateRevocationList | None) -> TrustStore:
        revoked = frozenset(r.serial_number for r in crl) if crl is not None else frozenset()
        return cls(ca, crl, revoked)

    def with_crl(self, crl: x509.CertificateRevocationList) -> TrustStore:
        """A store with a newer list; an older or foreign list is refused."""
        check_crl(crl, self.ca)
        if self.crl is not None:
            held, new = crl_number(self.crl), crl_number(crl)
            if new < held or (new == held and crl.last_update_utc < self.crl.last_update_utc):
                raise TrustError(
                    f"revocation list number {new} is older than the one held ({held})"
                )
            if new == held and frozenset(r.serial_number for r in crl) != self.revoked:
                raise TrustError(
                    f"revocation list number {new} differs from the one held with that number"
                )
        return TrustStore.build(self.ca, crl)

    def verify(
        self,
        cert: x509.Certificate,
        *,
        role: Role | None = None,
        purpose: x509.ObjectIdentifier | None = None,
        at: datetime | None = None,
    ) -> CertInfo:
        """Check that ``cert`` is the fleet's, in date, unrevoked, and fit for ``role``/``purpose``.

        Returns what the certificate says about its holder; raises
        :class:`TrustError` (or :class:`RevokedError`) naming the reason.
        """
        when = at or datetime.now(UTC)
        info = self._chain(cert)
        if when < cert.not_valid_before_utc:
            raise TrustError(
                f"certificate {info.cn} is not valid before {cert.not_valid_before_utc.isoformat()}"
            )
        if when > cert.not_valid_after_utc:
            raise TrustError(
                f"certificate {info.cn} expired at {cert.not_valid_after_utc.isoformat()}"
            )
        if cert.serial_number in self.revoked:
            raise RevokedError(f"certificate {info.cn} (serial {cert.serial_number:x}) is revoked")
        if role is not None and info.role != role:
            raise TrustError(f"certificate {info.cn} has role {info.role.value}, not {role.value}")
        if purpose is not None:
            try:
                eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
            except x509.ExtensionNotFound as e:
                raise TrustError(f"certificate {info.cn} has no extended key usage") from e
            if purpose not in eku:
                raise TrustError(f"certificate {info.cn} is not allowed for {purpose._name}")
        return info

    def _chain(self, cert: x509.Certificate) -> CertInfo:
        # Keyed on the whole DER: the outer signature algorithm is not covered
        # by the signature, so tbs + signature alone would let a changed
        # certificate ride on an earlier check.
        key = cert.public_bytes(serialization.Encoding.DER)
        hit = self._chain_ok.get(key)
        if hit is not None:
            return hit
        try:
            issuer = cert.issuer
        except ValueError as e:  # names are parsed lazily
            raise TrustError(f"certificate issuer does not parse: {e}") from e
        if issuer != self.ca.subject:
            raise TrustError(f"certificate issuer {issuer.rfc4514_string()} is not the fleet CA")
        try:
            cert.verify_directly_issued_by(self.ca)
        except (ValueError, TypeError, InvalidSignature) as e:
            raise TrustError("certificate was not signed by the fleet CA") from e
        try:
            info = CertInfo.of(cert)
        except IdentityError as e:
            raise TrustError(str(e)) from e
        if len(self._chain_ok) < 4096:
            self._chain_ok[key] = info
        return info


def crl_number(crl: x509.CertificateRevocationList) -> int:
    """The list's CRL Number (0 when it has none)."""
    try:
        return int(crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number)
    except x509.ExtensionNotFound:
        return 0


def load_crl(raw: bytes, ca: x509.Certificate) -> x509.CertificateRevocationList:
    """Parse a PEM or DER CRL and check the CA signed it."""
    try:
        crl = (
            x509.load_pem_x509_crl(raw)
            if raw.lstrip().startswith(b"-----")
            else x509.load_der_x509_crl(raw)
        )
    except ValueError as e:
        raise TrustError(f"revocation list does not parse: {e}") from e
    check_crl(crl, ca)
    return crl


def check_crl(crl: x509.CertificateRevocationList, ca: x509.Certificate) -> None:
    if crl.issuer != ca.subject or not crl.is_signature_valid(ca.public_key()):  # type: ignore[arg-type]
        raise TrustError("revocation list is not signed by the fleet CA")


CODE_SIGNING = ExtendedKeyUsageOID.CODE_SIGNING
CLIENT_AUTH = ExtendedKeyUsageOID.CLIENT_AUTH
SERVER_AUTH = ExtendedKeyUsageOID.SERVER_AUTH
