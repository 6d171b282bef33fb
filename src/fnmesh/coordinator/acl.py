"""The broker's ACL file, generated from the fleet's live identities and the grants.

Mosquitto takes a client certificate's CN as the username
(``use_identity_as_username``); the file has one ``user CN`` block per live
identity with the topics of its role (DESIGN.md's topic table) under the topic
root, written out per identity (no ``%u`` patterns, no groups: Mosquitto has
neither for certificates, so a group grant is listed under each member).

- ``node.X`` reads ``nodes/X/#`` and ``crl``; writes ``nodes/X/status``,
  ``nodes/X/heartbeat``, ``spill/#`` and ``replies/#``.
- a router reads ``fn/#`` (its shared subscription ``$share/G/{root}/fn/...``
  is checked by Mosquitto without the ``$share/G/`` prefix), ``spill/#``, every
  node's ``status``, ``assign`` and ``heartbeat``, and ``crl``; writes into
  nodes' ``invoke/#`` and ``spill/#``, and ``replies/#``.
- the coordinator reads nodes' ``status`` and ``heartbeat`` and
  ``replies/coordinator/#``; writes ``nodes/+/assign``, ``crl`` and ``fn/#``.
- ``device.D`` writes ``fn/NS/NAME/invoke`` for each function granted to it
  (directly or through a group) and reads ``replies/D/#``.
- a broker identity (a site broker's bridge, DESIGN.md's broker section)
  carries nodes' ``status``/``heartbeat`` and ``replies/#`` both ways, writes
  ``nodes/+/spill/#``, and reads ``nodes/+/assign`` and ``crl``.
- operators and publishers get nothing on the broker; neither does a revoked
  or expired identity (and the CRL refuses its certificate at the handshake).

Mosquitto re-reads the file on SIGHUP (:meth:`Mosquitto.reload`).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from fnmesh.certs.ca import FleetCA, Issued
from fnmesh.certs.home import DEFAULT_TOPIC_ROOT, Home, write_atomic
from fnmesh.certs.identity import Role
from fnmesh.coordinator.broker import BrokerError

#: The identity whose replies come back under ``replies/coordinator/`` (see invoker.py).
COORDINATOR_REPLIES = "coordinator"

# fullmatch, never ``$``: ``$`` accepts a trailing newline, and a newline in a name
# would add lines of its own to the ACL file.
_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}")
_FUNCTION = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}/[a-z0-9][a-z0-9_.-]{0,62}")
_ROOT = re.compile(r"[A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+)*")


class AclError(BrokerError):
    """The ACL cannot be generated: a malformed topic root, identity name or function id."""


@dataclass(frozen=True, slots=True)
class Rule:
    """One ``topic ACCESS TOPIC`` line."""

    access: str  # read | write | readwrite
    topic: str


def check_root(root: str) -> str:
    """A topic root: levels of letters, digits, ``_ . -`` joined by ``/``; no wildcards."""
    if not _ROOT.fullmatch(root):
        raise AclError(f"topic root {root!r} must be plain topic levels such as fnmesh/v1")
    return root


def _split_cn(cn: str, role: str) -> str:
    try:
        r = Role(role)
    except ValueError:
        raise AclError(f"identity {cn!r} has an unknown role {role!r}") from None
    prefix = f"{r.value}."
    name = cn.removeprefix(prefix)
    if not cn.startswith(prefix) or not _NAME.fullmatch(name):
        raise AclError(f"identity {cn!r} is not a well-formed {r.value} name")
    return name


def rules_for(
    role: Role, name: str, root: str = DEFAULT_TOPIC_ROOT, functions: Iterable[str] = ()
) -> list[Rule]:
    """The topics one identity may use; empty for roles with no business on the broker."""
    r = root
    if role is Role.NODE:
        return [
            Rule("read", f"{r}/nodes/{name}/#"),
            Rule("read", f"{r}/crl"),
            Rule("write", f"{r}/nodes/{name}/status"),
            Rule("write", f"{r}/nodes/{name}/heartbeat"),
            Rule("write", f"{r}/spill/#"),
            Rule("write", f"{r}/replies/#"),
        ]
    if role is Role.ROUTER:
        return [
            Rule("read", f"{r}/fn/#"),
            Rule("read", f"{r}/spill/#"),
            Rule("read", f"{r}/nodes/+/status"),
            Rule("read", f"{r}/nodes/+/assign"),
            Rule("read", f"{r}/nodes/+/heartbeat"),
            Rule("read", f"{r}/crl"),
            Rule("write", f"{r}/nodes/+/invoke/#"),
            Rule("write", f"{r}/nodes/+/spill/#"),
            Rule("write", f"{r}/replies/#"),
        ]
    if role is Role.COORDINATOR:
        return [
            Rule("read", f"{r}/nodes/+/status"),
            Rule("read", f"{r}/nodes/+/heartbeat"),
            Rule("read", f"{r}/replies/{COORDINATOR_REPLIES}/#"),
            Rule("write", f"{r}/nodes/+/assign"),
            Rule("write", f"{r}/crl"),
            Rule("write", f"{r}/fn/#"),
        ]
    if role is Role.DEVICE:
        out = [Rule("read", f"{r}/replies/{name}/#")]
        for fid in sorted(set(functions)):
            if not _FUNCTION.fullmatch(fid):
                raise AclError(f"function {fid!r} granted to device.{name} is not 'ns/name'")
            out.append(Rule("write", f"{r}/fn/{fid}/invoke"))
        return out
    if role is Role.BROKER:
        return [
            Rule("readwrite", f"{r}/nodes/+/status"),
            Rule("readwrite", f"{r}/nodes/+/heartbeat"),
            Rule("readwrite", f"{r}/replies/#"),
            Rule("write", f"{r}/nodes/+/spill/#"),
            Rule("read", f"{r}/nodes/+/assign"),
            Rule("read", f"{r}/crl"),
        ]
    return []


def live_identities(
    issued: Iterable[Issued], now: datetime | None = None
) -> list[tuple[str, Role]]:
    """(CN, role) of every identity holding a certificate neither revoked nor expired.

    A CN whose every certificate is revoked or expired is left out, so it gets no
    ACL block: the broker lets it do nothing even if its certificate were accepted.
    """
    when = now or datetime.now(UTC)
    live: dict[str, Role] = {}
    for rec in issued:
        if rec.revoked_at or datetime.fromisoformat(rec.not_after) < when:
            continue
        _split_cn(rec.cn, rec.role)
        live[rec.cn] = Role(rec.role)
    return sorted(live.items())


def render_acl(
    identities: Iterable[tuple[str, Role]],
    grants: Mapping[str, Iterable[str]],
    root: str = DEFAULT_TOPIC_ROOT,
) -> str:
    """The ACL file for these identities; ``grants`` maps a device CN to its functions.

    Grants to identities not listed (revoked, unknown) are ignored.
    """
    check_root(root)
    lines = [
        "# Generated by fnmesh: do not edit by hand (fnmesh broker config).",
        f"# Topic root: {root}",
        "",
    ]
    for cn, role in identities:
        name = _split_cn(cn, role.value)
        rules = rules_for(role, name, root, grants.get(cn, ()) if role is Role.DEVICE else ())
        if not rules:
            continue
        lines.append(f"user {cn}")
        lines.extend(f"topic {rule.access} {rule.topic}" for rule in rules)
        lines.append("")
    return "\n".join(lines)


def acl_for_home(
    home: Home,
    grants: Mapping[str, Iterable[str]],
    root: str = DEFAULT_TOPIC_ROOT,
    now: datetime | None = None,
) -> str:
    """The ACL file for the fleet recorded in ``home``'s CA."""
    return render_acl(live_identities(FleetCA.load(home).issued(), now), grants, root)


def write_acl(path: Path, text: str) -> Path:
    """Write the file atomically (Mosquitto never reads half of it), owner-only."""
    write_atomic(path, text.encode(), mode=0o600)
    return path
