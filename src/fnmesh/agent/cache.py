"""The node's bundle cache: bundles stored by digest, encrypted at rest.

What is stored is the bundle as the node received it, reduced to the one data
key wrapped for this node: the model stays AES-GCM ciphertext on disk, and its
key is sealed to the node's X25519 key (``enc.key``, mode 0600). Every load
verifies again (signature, chain, revocation, dates, AES-GCM tag, plaintext
digest; see :meth:`BundleCache.open` and :meth:`BundleCache.load`) and
decrypts into memory only; no plaintext byte is ever written.

The cache also remembers, across restarts, the highest version it has run
for each function: an older one is refused unless the caller passes a
rollback order it has checked.
"""

from __future__ import annotations

import atexit
import hmac
import json
import mmap
import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Protocol, TypeVar

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from fnmesh.agent.errors import AgentError
from fnmesh.certs import keywrap
from fnmesh.certs.home import write_atomic
from fnmesh.certs.trust import TrustStore
from fnmesh.functions.bundle import Bundle, Verdict
from fnmesh.functions.errors import BundleError
from fnmesh.functions.manifest import Manifest, Runtime, semver_key


class _Closable(Protocol):
    def close(self) -> None: ...


L = TypeVar("L", bound=_Closable)

_checks: ThreadPoolExecutor | None = None
#: Read-only, shared, with the pages mapped up front (one call, not a fault per page).
_MAP_FLAGS = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)


def _checker() -> ThreadPoolExecutor:
    """One thread per process for the checks that run beside a runtime's parse."""
    global _checks
    if _checks is None:
        _checks = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fnmesh-check")
        atexit.register(_checks.shutdown, wait=False)
    return _checks


class RollbackError(BundleError):
    """An older version than the highest already run, without a rollback order."""


@dataclass(frozen=True, slots=True)
class Opened:
    """A verified, decrypted function: the manifest and the model bytes (memory only)."""

    manifest: Manifest
    model: bytes
    digest: str


@dataclass(frozen=True, slots=True)
class _Known:
    """A cached bundle checked whole once: its parsed head (no ciphertext) and data key."""

    head: Bundle
    data_key: bytes
    verdict: Verdict


class BundleCache:
    """Bundles by digest under ``root``, within a disk budget."""

    def __init__(
        self,
        root: Path,
        node_cn: str,
        enc_key: X25519PrivateKey,
        trust: TrustStore,
        *,
        budget_bytes: int = 2 << 30,
    ) -> None:
        self.root = root
        self.node_cn = node_cn
        self._key = enc_key
        self.trust = trust
        self.budget_bytes = budget_bytes
        (root / "bundles").mkdir(parents=True, exist_ok=True)
        self._versions_path = root / "versions.json"
        self._versions: dict[str, str] = self._read_versions()
        #: Plaintext digests whose graph passed the checks in this process.
        self._graph_checked: set[str] = set()
        #: Cached bundles loaded whole in this process, for :meth:`load` (memory only).
        self._known: dict[str, _Known] = {}

    def path(self, digest: str) -> Path:
        if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
            raise AgentError(f"not a bundle digest: {digest!r}")
        return self.root / "bundles" / f"{digest}.fnb"

    def has(self, digest: str) -> bool:
        return self.path(digest).exists()

    def put(self, data: bytes, *, pinned: set[str] | frozenset[str] = frozenset()) -> Bundle:
        """Check and store a bundle; returns it. Nothing is stored that does not verify."""
        bundle = Bundle.parse(data)
        bundle.verify(self.trust)
        if self.node_cn not in bundle.wrapped:
            raise AgentError(
                f"bundle {bundle.manifest.name}@{bundle.manifest.version} carries no key for {self.node_cn}"
            )
        # Prove the key unwraps (and the keys section is intact) before keeping it.
        dk = bundle.data_key(self.node_cn, self._key)
        mine = bundle.only_for(dk, self.node_cn, self._key.public_key())
        path = self.path(bundle.digest)
        if not path.exists():
            write_atomic(path, mine.to_bytes(), mode=0o600)
        self.cleanup(pinned | {bundle.digest})
        return mine

    def load(
        self,
        digest: str,
        loader: Callable[[bytes, Manifest], L],
        *,
        allow_rollback: bool = False,
    ) -> tuple[Manifest, L]:
        """What :meth:`open` checks, with ``loader`` (the runtime's parse) run alongside.

        The first load of a cached ONNX bundle in this process is checked whole,
        graph included, before ``loader`` sees a byte; it leaves in memory the
        bundle's parsed head, data key and signature verdict. Later loads map
        the file, decrypt the ciphertext under that key and hand the
        AES-GCM-authenticated bytes to ``loader`` while another thread checks
        the keys section's MAC, the verdict (the signature is checked again when
        the trust store changed or a date passed) and the plaintext digest; the
        loaded model is returned only when every check passes, and closed
        otherwise.
        Authenticated bytes were sealed by a holder of the data key (the
        publisher and this bundle's nodes), so the runtime never parses bytes
        from anyone else, and no request runs on them before the checks pass.
        TensorRT plans are always checked whole first.
        """
        known = self._known.get(digest)
        if known is not None:
            self.check_version(known.head.manifest, allow_rollback=allow_rollback)
        model = self._decrypt_known(digest, known) if known is not None else None
        if model is None or known is None:
            bundle = self._read(digest)
            self.check_version(bundle.manifest, allow_rollback=allow_rollback)
            opened = self._open(bundle)
            return opened.manifest, loader(opened.model, opened.manifest)
        m = known.head.manifest
        checking = _checker().submit(self._check_known, known, model)
        try:
            loaded = loader(model, m)
        except BaseException:
            checking.result()  # a failed check says more than the runtime's complaint
            raise
        try:
            checking.result()
        except BaseException:
            loaded.close()
            raise
        return m, loaded

    def _check_known(self, known: _Known, model: bytes) -> None:
        head = known.head
        head.check_data_key(known.data_key)
        # The head is the one checked before (it is kept in memory, not read again): while
        # its verdict holds (same trust store, within every date) it would pass again.
        if not known.verdict.holds(self.trust):
            verdict = head.verify_signed(self.trust)
            self._known[head.digest] = replace(known, verdict=verdict)
        head.check_plaintext(model)

    def open(self, digest: str, *, allow_rollback: bool = False) -> Opened:
        """Verify, then decrypt into memory. Refuses a version older than the highest run.

        Every load checks the signature, the publisher's chain and revocation,
        the dates, AES-GCM's tag over the ciphertext and the signed plaintext
        digest over the decrypted model: the bytes handed to the runtime are
        the ones the publisher signed. The signed ciphertext digest was checked
        when the bundle entered the cache (:meth:`put`); it is not hashed again
        here, because any change to the ciphertext fails the tag, and a
        ciphertext that decrypts to other bytes fails the plaintext digest.
        """
        bundle = self._read(digest)
        self.check_version(bundle.manifest, allow_rollback=allow_rollback)
        return self._open(bundle)

    def _read(self, digest: str) -> Bundle:
        path = self.path(digest)
        try:
            data = path.read_bytes()
        except FileNotFoundError as e:
            raise AgentError(f"bundle {digest[:12]} is not in the cache") from e
        os.utime(path)
        bundle = Bundle.parse(data)
        if bundle.digest != digest:
            raise AgentError(f"cached file {path.name} holds bundle {bundle.digest[:12]}")
        return bundle

    def _decrypt_known(self, digest: str, known: _Known) -> bytes | None:
        """The ciphertext decrypted under the known key (AES-GCM's tag checked), or None
        if the file's size changed on disk (the whole path then says how).

        The file is mapped for the decryption, not read: a 2 MB read buffer is
        2 MB of fresh pages to fault in, dearer here than the decryption itself.
        Cache files are only ever replaced whole (renamed over), never changed in
        place, so the mapping cannot shrink under the decryption.
        """
        path = self.path(digest)
        head = known.head
        offset = head.ciphertext_offset
        try:
            with path.open("rb") as f:
                if (
                    os.fstat(f.fileno()).st_size
                    != offset + head.manifest.digests.plaintext_size + 16
                ):
                    return None
                mapped = mmap.mmap(f.fileno(), 0, flags=_MAP_FLAGS, prot=mmap.PROT_READ)
        except FileNotFoundError as e:
            raise AgentError(f"bundle {digest[:12]} is not in the cache") from e
        try:
            with memoryview(mapped) as whole, whole[offset:] as ciphertext:
                model = replace(head, ciphertext=ciphertext).decrypt_authenticated(known.data_key)
        finally:
            mapped.close()
        os.utime(path)
        return model

    def _open(self, bundle: Bundle) -> Opened:
        verdict = bundle.verify(self.trust, ciphertext_digest=False)
        data_key = bundle.data_key(self.node_cn, self._key)
        model = bundle.decrypt(data_key)
        self._check_model(bundle, model)
        if bundle.manifest.runtime is Runtime.ONNX:
            head = replace(bundle, ciphertext=memoryview(b""))
            self._known[bundle.digest] = _Known(head, data_key, verdict)
        return Opened(bundle.manifest, model, bundle.digest)

    def _check_model(self, bundle: Bundle, model: bytes) -> None:
        """Check the graph once per process: the same plaintext digest means the same graph."""
        pt = bundle.manifest.digests.plaintext
        if pt not in self._graph_checked:
            bundle.check_model(model)
            self._graph_checked.add(pt)

    def bundle(self, digest: str) -> Bundle:
        """A cached bundle, parsed (not verified: :meth:`open` verifies)."""
        try:
            return Bundle.parse(self.path(digest).read_bytes())
        except FileNotFoundError as e:
            raise AgentError(f"bundle {digest[:12]} is not in the cache") from e

    def check_assigned_key(self, bundle: Bundle, wrapped: bytes) -> None:
        """Refuse a bundle whose data key is not the one the assignment carries."""
        assigned = keywrap.unwrap(
            wrapped, self._key, bytes.fromhex(bundle.digest), suite=bundle.suite
        )
        if not hmac.compare_digest(assigned, bundle.data_key(self.node_cn, self._key)):
            raise AgentError(
                f"the assignment's data key for {bundle.digest[:12]} does not match the bundle"
            )

    def manifest(self, digest: str) -> Manifest:
        """The manifest of a cached bundle, verified (no decryption)."""
        bundle = Bundle.parse(self.path(digest).read_bytes())
        bundle.verify(self.trust)
        return bundle.manifest

    # -- versions -----------------------------------------------------------------------

    def check_version(self, manifest: Manifest, *, allow_rollback: bool) -> None:
        highest = self._versions.get(manifest.name)
        if (
            highest is not None
            and semver_key(manifest.version) < semver_key(highest)
            and not allow_rollback
        ):
            raise RollbackError(
                f"{manifest.name}@{manifest.version} is older than {highest}, already run here; "
                "an operator-signed rollback order is needed"
            )

    def mark_run(self, manifest: Manifest) -> None:
        """Remember that this version ran (call once it has loaded)."""
        highest = self._versions.get(manifest.name)
        if highest is None or semver_key(manifest.version) > semver_key(highest):
            self._versions[manifest.name] = manifest.version
            write_atomic(self._versions_path, json.dumps(self._versions, sort_keys=True).encode())

    def highest(self, function_id: str) -> str | None:
        return self._versions.get(function_id)

    def _read_versions(self) -> dict[str, str]:
        try:
            data = json.loads(self._versions_path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as e:
            raise AgentError(f"{self._versions_path} is unreadable: {e}") from e
        if not isinstance(data, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in data.items()
        ):
            raise AgentError(f"{self._versions_path} is not a map of versions")
        return data

    # -- disk budget --------------------------------------------------------------------

    def usage(self) -> int:
        return sum(p.stat().st_size for p in (self.root / "bundles").glob("*.fnb"))

    def cleanup(self, pinned: set[str] | frozenset[str]) -> list[str]:
        """Remove least recently used, unpinned bundles until the cache fits its budget."""
        files = sorted(
            ((p.stat().st_mtime, p) for p in (self.root / "bundles").glob("*.fnb")),
            key=lambda t: t[0],
        )
        total = sum(p.stat().st_size for _, p in files)
        removed = []
        for _, p in files:
            if total <= self.budget_bytes:
                break
            digest = p.stem
            if digest in pinned:
                continue
            size = p.stat().st_size
            p.unlink(missing_ok=True)
            self._known.pop(digest, None)
            total -= size
            removed.append(digest)
        # Leftovers of writes interrupted by a crash are never valid bundles.
        for tmp in (self.root / "bundles").glob(".*.tmp"):
            if time.time() - tmp.stat().st_mtime > 60:
                tmp.unlink(missing_ok=True)
        return removed
