"""Pending enrolments: requests from nodes with no certificate, until an operator approves them.

The one thing the cert-less ``POST /v1/enrol`` may do is add a request here. The queue
holds at most ``max_pending`` requests (a new one beyond that is refused, never one
evicted), keeps nothing across restarts, and trusts nothing: a request is only a CSR and
a hardware summary until :meth:`EnrolmentQueue.approve` signs it with the fleet CA's key
(role node) and stores the certificate at ``home/enrolled/{cn}.pem``.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization

from fnmesh.certs.ca import FleetCA
from fnmesh.certs.enrolment import EnrolmentClaim, EnrolmentError, read_csr
from fnmesh.certs.home import Home, write_atomic
from fnmesh.certs.identity import Role, fingerprint

#: Pending requests kept at once (beyond that, new ones are refused with 429).
MAX_PENDING = 32
#: Bytes of hardware summary and labels kept from a request.
MAX_INFO_BYTES = 4096


@dataclass(frozen=True, slots=True)
class Enrolment:
    """One request: pending until approved (then it holds the signed certificate)."""

    id: str
    claim: EnrolmentClaim
    hardware: Mapping[str, Any]
    labels: Mapping[str, str]
    received: float
    peer: str = ""
    state: str = "pending"
    certificate_pem: str | None = None
    approved_by: str | None = None
    cert_fingerprint: str | None = None

    @property
    def name(self) -> str:
        return self.claim.name

    def to_json(self, *, with_certificate: bool = False) -> dict[str, Any]:
        out: dict[str, Any] = {
            "id": self.id,
            "node": self.claim.name,
            "cn": self.claim.cn,
            "state": self.state,
            "key_fingerprint": self.claim.key_fingerprint,
            "hardware": dict(self.hardware),
            "labels": dict(self.labels),
            "received": self.received,
            "peer": self.peer,
        }
        if self.cert_fingerprint is not None:
            out["fingerprint"] = self.cert_fingerprint
        if with_certificate and self.certificate_pem is not None:
            out["certificate"] = self.certificate_pem
        return out


def _clean_info(raw: Any, what: str) -> dict[str, Any]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise EnrolmentError(f"{what} must be an object")
    import json

    if len(json.dumps(raw)) > MAX_INFO_BYTES:
        raise EnrolmentError(f"{what} is larger than {MAX_INFO_BYTES} bytes")
    return raw


@dataclass
class EnrolmentQueue:
    """Requests by id; at most ``max_pending`` of them pending, one per node name."""

    home: Home
    max_pending: int = MAX_PENDING
    _by_id: dict[str, Enrolment] = field(default_factory=dict)

    def submit(self, body: Any, peer: str = "") -> Enrolment:
        """Queue a request ``{"csr": PEM, "hardware": {...}, "labels": {...}}``; nothing is trusted.

        A node that asks again with the same key gets its existing request back; another
        key for a name already pending or enrolled is refused.
        """
        if not isinstance(body, dict) or not isinstance(body.get("csr"), str):
            raise EnrolmentError('the body must be {"csr": PEM, ...}')
        claim = read_csr(body["csr"].encode())
        hardware = _clean_info(body.get("hardware"), "hardware")
        labels = {str(k): str(v) for k, v in _clean_info(body.get("labels"), "labels").items()}
        for e in self._by_id.values():
            if e.name == claim.name:
                if e.claim.key_fingerprint == claim.key_fingerprint:
                    return e
                if e.state == "pending":
                    raise EnrolmentError(f"node {claim.name!r} already has a pending request")
        if self.home.identity_dir(claim.cn).exists() or self.enrolled_path(claim.cn).exists():
            raise EnrolmentError(f"node {claim.name!r} is already enrolled")
        if len(self.pending()) >= self.max_pending:
            raise OverflowError(f"{self.max_pending} enrolment requests are already pending")
        e = Enrolment(
            id=secrets.token_urlsafe(18),
            claim=claim,
            hardware=hardware,
            labels=labels,
            received=time.time(),
            peer=peer,
        )
        self._by_id[e.id] = e
        return e

    def get(self, request_id: str) -> Enrolment | None:
        return self._by_id.get(request_id)

    def pending(self) -> list[Enrolment]:
        return sorted(
            (e for e in self._by_id.values() if e.state == "pending"), key=lambda e: e.received
        )

    def by_node(self, name: str) -> Enrolment | None:
        found = [e for e in self._by_id.values() if e.name == name]
        found.sort(key=lambda e: (e.state != "pending", -e.received))
        return found[0] if found else None

    def enrolled_path(self, cn: str) -> Path:
        return self.home.root / "enrolled" / f"{cn}.pem"

    def approve(self, name: str, operator: str) -> Enrolment:
        """Sign node ``name``'s pending request with the fleet CA (role node); store the certificate."""
        e = self.by_node(name)
        if e is None or e.state != "pending":
            raise KeyError(name)
        ca = FleetCA.load(self.home)
        cert = ca.sign(
            Role.NODE,
            e.claim.cn,
            e.claim.public_key,
            enc_public=e.claim.x25519,
            sans=list(e.claim.sans),
        )
        pem = cert.public_bytes(serialization.Encoding.PEM)
        write_atomic(self.enrolled_path(e.claim.cn), pem)
        done = replace(
            e,
            state="approved",
            certificate_pem=pem.decode(),
            approved_by=operator,
            cert_fingerprint=fingerprint(cert),
        )
        self._by_id[e.id] = done
        return done
