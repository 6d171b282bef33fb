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
import contextlib
import hmac
import json
import logging
import mmap
import os
import secrets
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Generic, Protocol, TypeVar

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from fnmesh.agent.errors import AgentError
from fnmesh.certs import keywrap
from fnmesh.certs.home import write_atomic
from fnmesh.certs.trust import TrustStore
from fnmesh.functions.bundle import Bundle, Verdict
from fnmesh.functions.errors import BundleError
from fnmesh.functions.manifest import Manifest, Runtime, semver_key

L = TypeVar("L")
L_co = TypeVar("L_co", covariant=True)

log = logging.getLogger(__name__)

_writes: ThreadPoolExecutor | None = None
#: A sealed copy: magic | form length (2 bytes) | form | nonce | AES-256-GCM(model), under
#: the node's own key; the form ("" for the bundle's own model) is authenticated with it.
_SEAL_MAGIC = b"FNSEAL\x00\x02"
_FORM_MAX = 1024
_SEAL_INFO = b"fnmesh/v1 node cache seal"
_NONCE_BYTES = 12
#: Read-only, shared, with the pages mapped up front (one call, not a fault per page).
_MAP_FLAGS = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)


def _writer() -> ThreadPoolExecutor:
    """One thread per process writing sealed copies, off the loads' path."""
    global _writes
    if _writes is None:
        _writes = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fnmesh-seal")
        atexit.register(_writes.shutdown, wait=True)
    return _writes


class RollbackError(BundleError):
    """An older version than the highest already run, without a rollback order."""


class _OtherForm(ValueError):
    """A sealed copy holds a prepared form this node's runtime no longer takes."""


class Loader(Protocol[L_co]):
    """How a runtime takes a verified model, for :meth:`BundleCache.load`.

    A runtime may have a form of the model of its own, prepared on this node
    (ONNX Runtime's optimised graph, for this build of it and this CPU), that
    loads faster than the bundle's: the cache then seals that form instead.
    """

    def form(self, manifest: Manifest) -> str:
        """The form this loader prepares of ``manifest``'s model, naming what it depends on
        (runtime, version, hardware); "" if it prepares none."""
        ...

    def __call__(self, model: bytes, manifest: Manifest, form: str) -> tuple[L_co, bytes | None]:
        """Load ``model``, given in ``form`` ("" for the bundle's own model). From the bundle's
        own model, also return the prepared form (None if it made none)."""
        ...


@dataclass(frozen=True, slots=True)
class PlainLoader(Generic[L]):
    """A :class:`Loader` with no form of its own: ``fn(model, manifest)``."""

    fn: Callable[[bytes, Manifest], L]

    def form(self, manifest: Manifest) -> str:
        return ""

    def __call__(self, model: bytes, manifest: Manifest, form: str) -> tuple[L, None]:
        return self.fn(model, manifest), None


@dataclass(frozen=True, slots=True)
class Opened:
    """A verified, decrypted function: the manifest and the model bytes (memory only)."""

    manifest: Manifest
    model: bytes
    digest: str


@dataclass(frozen=True, slots=True)
class _Known:
    """A cached bundle checked whole in this process: its parsed head (no ciphertext) and
    the verdict on its signature."""

    head: Bundle
    verdict: Verdict


def _form_field(form: bytes) -> bytes:
    """A sealed copy's form as its header and AAD carry it: 2-byte length, then the form."""
    return len(form).to_bytes(2, "big") + form


def _read_header(buf: bytes | memoryview) -> tuple[bytes, int]:
    """A sealed copy's form and the offset of its nonce; ValueError if ``buf`` is not one."""
    at = len(_SEAL_MAGIC) + 2
    if len(buf) < at or bytes(buf[: len(_SEAL_MAGIC)]) != _SEAL_MAGIC:
        raise ValueError("not a sealed copy")
    n = int.from_bytes(buf[len(_SEAL_MAGIC) : at], "big")
    if n > _FORM_MAX or len(buf) < at + n:
        raise ValueError("truncated")
    return bytes(buf[at : at + n]), at + n


def _node_seal_key(enc_key: X25519PrivateKey) -> bytes:
    """The node's own key for its sealed copies, derived from its X25519 key (never stored)."""
    raw = enc_key.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=_SEAL_INFO).derive(raw)


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
        self._seal = AESGCM(_node_seal_key(enc_key))

    def path(self, digest: str) -> Path:
        if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
            raise AgentError(f"not a bundle digest: {digest!r}")
        return self.root / "bundles" / f"{digest}.fnb"

    def sealed_path(self, digest: str) -> Path:
        """The node's sealed copy of a cached bundle's model (see :meth:`load`)."""
        return self.path(digest).with_suffix(".sealed")

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
        loader: Loader[L],
        *,
        allow_rollback: bool = False,
    ) -> tuple[Manifest, L]:
        """What :meth:`open` guarantees, handing the model to ``loader`` (the runtime's parse).

        The first load of a cached ONNX bundle in this process is checked whole
        (:meth:`open`), graph included. It leaves in memory the bundle's parsed
        head and the verdict on its signature, and on disk (once) a sealed copy
        of the verified model, or of the form the loader prepared from it:
        AES-256-GCM under a key only this node has, derived from its X25519
        key, bound to the bundle and plaintext digests and to the form. A later
        load (a cold start after scale to zero) checks the verdict still holds
        (the same trust store, so the same revocation list, and every date
        still good; otherwise the signature is checked again) and opens the
        sealed copy: its tag proves this node wrote it, from a model it had
        verified, so the plaintext digest need not be hashed again. A sealed
        copy that is missing, does not authenticate, or holds a form the loader
        no longer takes (another runtime version, another CPU) is dropped, and
        the bundle is checked whole again. TensorRT plans are always checked
        whole.
        """
        known = self._known.get(digest)
        if known is not None:
            head = known.head
            self.check_version(head.manifest, allow_rollback=allow_rollback)
            if not known.verdict.holds(self.trust):
                self._known[digest] = replace(known, verdict=head.verify_signed(self.trust))
            sealed = self._open_sealed(head, loader.form(head.manifest))
            if sealed is not None:
                model, form = sealed
                return head.manifest, loader(model, head.manifest, form)[0]
        bundle = self._read(digest)
        self.check_version(bundle.manifest, allow_rollback=allow_rollback)
        opened = self._open(bundle)
        loaded, prepared = loader(opened.model, opened.manifest, "")
        if bundle.manifest.runtime is Runtime.ONNX:
            form = loader.form(opened.manifest) if prepared is not None else ""
            # Off the load's path: the runtime need not wait for the disk.
            _writer().submit(
                self._write_sealed,
                opened.manifest,
                opened.model if prepared is None else prepared,
                form,
            )
        return opened.manifest, loaded

    def _seal_aad(self, m: Manifest, form: bytes) -> bytes:
        return (
            _SEAL_MAGIC
            + m.digests.ciphertext.encode()
            + m.digests.plaintext.encode()
            + _form_field(form)
        )

    def _write_sealed(self, m: Manifest, model: bytes, form: str) -> None:
        path = self.sealed_path(m.digests.ciphertext)
        if not self.path(m.digests.ciphertext).exists() or self._sealed_form(path) == form:
            return
        f = form.encode()
        nonce = secrets.token_bytes(_NONCE_BYTES)
        sealed = self._seal.encrypt(nonce, model, self._seal_aad(m, f))
        try:
            write_atomic(path, _SEAL_MAGIC + _form_field(f) + nonce + sealed, mode=0o600)
        except OSError as e:
            log.warning("no sealed copy of %s@%s: %s", m.name, m.version, e)

    @staticmethod
    def _sealed_form(path: Path) -> str | None:
        """The form a sealed copy says it holds (not authenticated), or None if there is none."""
        try:
            with path.open("rb") as f:
                form, _ = _read_header(f.read(len(_SEAL_MAGIC) + 2 + _FORM_MAX))
        except (FileNotFoundError, ValueError):
            return None
        return form.decode(errors="replace")

    def _open_sealed(self, head: Bundle, form: str) -> tuple[bytes, str] | None:
        """The model and its form from this node's sealed copy, or None (absent, or it does not
        open, or it holds a form other than the bundle's own model or ``form``).

        The file is mapped for the decryption, not read: a 2 MB read buffer is
        2 MB of fresh pages to fault in, dearer here than the decryption itself.
        Cache files are only ever replaced whole (renamed over), never changed
        in place, so the mapping cannot shrink under the decryption.
        """
        m = head.manifest
        path = self.sealed_path(head.digest)
        try:
            os.utime(self.path(head.digest))  # the bundle is still cached (and just used)
            with path.open("rb") as f:
                mapped = mmap.mmap(f.fileno(), 0, flags=_MAP_FLAGS, prot=mmap.PROT_READ)
            try:
                with memoryview(mapped) as whole:
                    got, at = _read_header(whole)
                    if len(whole) < at + _NONCE_BYTES + 16:
                        raise ValueError("truncated")
                    if got and got != form.encode():
                        raise _OtherForm(got.decode(errors="replace"))
                    nonce = bytes(whole[at : at + _NONCE_BYTES])
                    with whole[at + _NONCE_BYTES :] as sealed:
                        model = self._seal.decrypt(nonce, sealed, self._seal_aad(m, got))
            finally:
                mapped.close()
        except FileNotFoundError:
            return None
        except _OtherForm as e:
            # Expected after an upgrade of the runtime, or a move to another CPU.
            log.info(
                "sealed copy of %s@%s holds %s, not %s: checking the bundle whole",
                m.name,
                m.version,
                e,
                form or "the model",
            )
            path.unlink(missing_ok=True)
            return None
        except (OSError, ValueError, InvalidTag) as e:
            why = str(e) or "does not authenticate"
            log.warning(
                "sealed copy of %s@%s refused (%s): checking the bundle whole",
                m.name,
                m.version,
                why,
            )
            path.unlink(missing_ok=True)
            return None
        return model, form if got else ""

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

    def _open(self, bundle: Bundle) -> Opened:
        verdict = bundle.verify(self.trust, ciphertext_digest=False)
        data_key = bundle.data_key(self.node_cn, self._key)
        model = bundle.decrypt(data_key)
        self._check_model(bundle, model)
        if bundle.manifest.runtime is Runtime.ONNX:
            head = replace(bundle, ciphertext=memoryview(b""))
            self._known[bundle.digest] = _Known(head, verdict)
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
        """Bytes on disk: bundles and the sealed copies beside them."""
        return sum(self._size_with_copy(p) for p in (self.root / "bundles").glob("*.fnb"))

    def _size_with_copy(self, bundle_path: Path) -> int:
        size = bundle_path.stat().st_size
        with contextlib.suppress(FileNotFoundError):
            size += bundle_path.with_suffix(".sealed").stat().st_size
        return size

    def cleanup(self, pinned: set[str] | frozenset[str]) -> list[str]:
        """Remove least recently used, unpinned bundles (each with its sealed copy) until the
        cache fits its budget."""
        bundles = self.root / "bundles"
        files = sorted(((p.stat().st_mtime, p) for p in bundles.glob("*.fnb")), key=lambda t: t[0])
        total = sum(self._size_with_copy(p) for _, p in files)
        removed = []
        for _, p in files:
            if total <= self.budget_bytes:
                break
            digest = p.stem
            if digest in pinned:
                continue
            total -= self._size_with_copy(p)
            p.unlink(missing_ok=True)
            p.with_suffix(".sealed").unlink(missing_ok=True)
            self._known.pop(digest, None)
            removed.append(digest)
        # A sealed copy whose bundle went (a write that raced a removal) is of no use.
        for sealed in bundles.glob("*.sealed"):
            if not sealed.with_suffix(".fnb").exists():
                sealed.unlink(missing_ok=True)
        # Leftovers of writes interrupted by a crash are never valid bundles.
        for tmp in (self.root / "bundles").glob(".*.tmp"):
            if time.time() - tmp.stat().st_mtime > 60:
                tmp.unlink(missing_ok=True)
        return removed
