"""The coordinator's audit log: append-only and hash-chained, in the coordinator's store.

Each entry's ``hash`` is SHA-256 over the canonical JSON (sorted keys, no
spaces, UTF-8) of ``{seq, ts, who, action, detail, prev_hash}``, and
``prev_hash`` is the previous entry's hash (64 zeros for the first). A head row
holding the last ``seq`` and ``hash`` advances in the same transaction as each
append. :meth:`AuditLog.verify` therefore notices an edited entry (its hash no
longer matches), a deleted or renumbered one (a gap in ``seq``), and a
truncated tail (the head is ahead of the last entry).

What it cannot notice on its own: someone with write access to the database
who rewrites an entry *and* every hash after it *and* the head. Anchor against
that by copying :meth:`AuditLog.head` somewhere the database's writers cannot
reach (``fnmesh audit`` prints it).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from fnmesh.coordinator.errors import InvalidRequestError
from fnmesh.coordinator.store import AuditEntry, Store
from fnmesh.coordinator.store.schema import AUDIT_GENESIS

__all__ = ["GENESIS", "AuditEntry", "AuditLog", "VerifyResult", "canonical_json", "entry_hash"]

GENESIS = AUDIT_GENESIS
#: Entries read per query while verifying.
_PAGE = 5000


def canonical_json(obj: Any) -> bytes:
    """The one byte form of ``obj`` that is hashed: sorted keys, no whitespace, UTF-8."""
    return json.dumps(
        obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode()


def entry_hash(
    seq: int, ts: float, who: str, action: str, detail: dict[str, Any], prev_hash: str
) -> str:
    """SHA-256 (hex) of the canonical JSON of one entry's fields other than its hash."""
    body = {
        "seq": seq,
        "ts": ts,
        "who": who,
        "action": action,
        "detail": detail,
        "prev_hash": prev_hash,
    }
    return hashlib.sha256(canonical_json(body)).hexdigest()


@dataclass(frozen=True, slots=True)
class VerifyResult:
    """What :meth:`AuditLog.verify` found: ``ok``, or the first entry that is wrong and why."""

    ok: bool
    first_bad_seq: int | None = None
    reason: str = ""
    #: Entries checked and found sound (all of them when ``ok``).
    checked: int = 0


class AuditLog:
    """Appends to and checks the audit log held in a :class:`Store`."""

    def __init__(self, store: Store) -> None:
        self.store = store

    async def append(self, action: str, who: str, detail: dict[str, Any]) -> AuditEntry:
        """Record that ``who`` did ``action``; ``detail`` must be a JSON object."""
        if not isinstance(detail, dict):
            raise InvalidRequestError("an audit detail must be a JSON object")
        if not action or not who:
            raise InvalidRequestError("an audit entry needs an action and who did it")
        try:
            # What is hashed is exactly what the database gives back: tuples become
            # lists, keys become strings, before the hash is taken.
            clean: dict[str, Any] = json.loads(canonical_json(detail))
        except (TypeError, ValueError) as e:
            raise InvalidRequestError(f"audit detail is not plain JSON: {e}") from e

        def seal(seq: int, ts: float, prev_hash: str) -> str:
            return entry_hash(seq, ts, who, action, clean, prev_hash)

        return await self.store.append_audit(who, action, clean, seal)

    async def entries(self, limit: int = 100, since: int = 0) -> list[AuditEntry]:
        """Entries after seq ``since``, oldest first, at most ``limit``."""
        if limit <= 0:
            return []
        return await self.store.audit_entries(since=max(0, since), limit=limit)

    async def head(self) -> tuple[int, str]:
        """The last entry's (seq, hash): the value to anchor elsewhere."""
        return await self.store.audit_head()

    async def verify(self) -> VerifyResult:
        """Walk the chain from the first entry to the head; stop at the first fault.

        Entries appended while this runs (beyond the head read at the start)
        are left for the next check.
        """
        head_seq, head_hash = await self.store.audit_head()
        prev, expected = GENESIS, 1
        while expected <= head_seq:
            page = await self.store.audit_entries(since=expected - 1, limit=_PAGE, upto=head_seq)
            if not page:
                return VerifyResult(
                    False,
                    expected,
                    f"entry {expected} is missing: the log ends at {expected - 1} "
                    f"but the head says {head_seq}",
                    expected - 1,
                )
            for e in page:
                if e.seq != expected:
                    return VerifyResult(
                        False,
                        expected,
                        f"entry {expected} is missing (the next one is {e.seq})",
                        expected - 1,
                    )
                if entry_hash(e.seq, e.ts, e.who, e.action, e.detail, e.prev_hash) != e.hash:
                    return VerifyResult(
                        False, e.seq, f"entry {e.seq} does not match its hash", expected - 1
                    )
                if e.prev_hash != prev:
                    return VerifyResult(
                        False,
                        e.seq,
                        f"entry {e.seq} does not follow entry {e.seq - 1} (prev_hash differs)",
                        expected - 1,
                    )
                prev, expected = e.hash, expected + 1
        if prev != head_hash:
            return VerifyResult(
                False, head_seq, f"the head's hash disagrees with entry {head_seq}", head_seq
            )
        # Every append moves the head in its own transaction, so an entry beyond the
        # head (read together with it) means the head was moved back.
        top, now_head = await self.store.audit_extent()
        if top > now_head:
            return VerifyResult(
                False,
                now_head + 1,
                f"entries up to {top} lie beyond the head ({now_head}): the head was moved back",
                head_seq,
            )
        return VerifyResult(True, None, "", head_seq)
