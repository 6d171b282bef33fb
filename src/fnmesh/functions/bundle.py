"""The ``.fnb`` function bundle: build it, read it, verify it, open it, re-wrap its key.

Layout (all lengths big-endian; the file ends exactly after the ciphertext)::

    magic        8 bytes   b"FNMESHB" + format major version (1)
    manifest     u32 len + canonical JSON            <- signed
    signatures   u32 len + canonical JSON {"signatures": [{"cert": b64 DER, "sig": b64}]}
    keys         u32 len + canonical JSON {"suite": ..., "keys": {CN: b64 HPKE ciphertext}}
    keys_mac     32 bytes  HMAC over the keys section, keyed from the data key
    ciphertext   u64 len + AES-256-GCM(model) (tag included)

Opening is "verify, then decrypt": signature, publisher chain, revocation,
namespace, validity dates and the ciphertext digest are checked before any
key is unwrapped; the keys MAC, the GCM tag and the plaintext digest after.
Every changed byte fails one of these checks.
"""

from __future__ import annotations

import hmac
import json
import struct
from collections.abc import Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

from fnmesh.certs import keywrap
from fnmesh.certs.errors import KeyWrapError
from fnmesh.certs.identity import CertInfo, Identity, Role
from fnmesh.certs.trust import TrustStore
from fnmesh.functions import graph
from fnmesh.functions.digest import ALGORITHM, tree_sha256
from fnmesh.functions.envelope import b64, parse_signatures, sign_manifest, unb64, verify_manifest
from fnmesh.functions.errors import (
    BundleError,
    BundleFormatError,
    ExpiredError,
    IntegrityError,
    ManifestError,
)
from fnmesh.functions.manifest import (
    FORMAT_MAJOR,
    DataRules,
    Digests,
    GpuRequirement,
    Limits,
    Manifest,
    Requirements,
    Runtime,
    canonical_json,
    split_function_id,
)
from fnmesh.functions.seal import aad_for, keys_mac, seal, unseal

MAGIC_PREFIX = b"FNMESHB"
MAGIC = MAGIC_PREFIX + bytes([FORMAT_MAJOR])
MAC_BYTES = 32
#: Upper bound on the JSON sections: a manifest or key list is never this large.
MAX_SECTION = 16 << 20


@dataclass(frozen=True, slots=True)
class Verdict:
    """A signed manifest that passed under one trust store, and the span in which that holds.

    The signature and the publisher's chain are facts about fixed bytes, and a
    trust store is never changed in place (a new revocation list makes a new
    one), so the same bytes under the same store pass again at any time within
    both the manifest's dates and the publisher certificate's.
    """

    publisher: CertInfo
    trust: TrustStore
    valid_from: datetime
    valid_until: datetime

    def holds(self, trust: TrustStore, at: datetime | None = None) -> bool:
        when = at or datetime.now(UTC)
        return trust is self.trust and self.valid_from <= when <= self.valid_until


@dataclass(frozen=True, slots=True)
class Bundle:
    """A parsed, not yet trusted, bundle. Fields hold the bytes exactly as received."""

    manifest_bytes: bytes
    manifest: Manifest
    signatures_bytes: bytes
    keys_bytes: bytes
    wrapped: Mapping[str, bytes]
    suite: str
    keys_mac: bytes
    ciphertext: memoryview

    # -- parsing ----------------------------------------------------------------

    @classmethod
    def parse(cls, data: bytes | memoryview) -> Bundle:
        view = memoryview(data)
        if len(view) < len(MAGIC) or bytes(view[: len(MAGIC_PREFIX)]) != MAGIC_PREFIX:
            raise BundleFormatError("not an fnmesh bundle (bad magic)")
        if view[len(MAGIC_PREFIX)] != FORMAT_MAJOR:
            raise BundleFormatError(
                f"bundle format major version {view[len(MAGIC_PREFIX)]} is not supported "
                f"(this reader knows {FORMAT_MAJOR})"
            )
        pos = len(MAGIC)
        manifest_bytes, pos = _section(view, pos, "manifest")
        sig_bytes, pos = _section(view, pos, "signatures")
        keys_bytes, pos = _section(view, pos, "keys")
        if len(view) < pos + MAC_BYTES + 8:
            raise BundleFormatError("bundle is truncated (keys MAC / ciphertext length)")
        mac = bytes(view[pos : pos + MAC_BYTES])
        pos += MAC_BYTES
        (ct_len,) = struct.unpack_from(">Q", view, pos)
        pos += 8
        if len(view) - pos < ct_len:
            raise BundleFormatError(
                f"bundle is truncated: ciphertext needs {ct_len} bytes, {len(view) - pos} remain"
            )
        if len(view) - pos > ct_len:
            raise BundleFormatError(f"bundle has {len(view) - pos - ct_len} trailing bytes")
        # No re-serialisation check here: the signature covers these exact bytes.
        manifest = Manifest.from_bytes(manifest_bytes)
        suite, wrapped = _parse_keys(keys_bytes)
        return cls(
            manifest_bytes=manifest_bytes,
            manifest=manifest,
            signatures_bytes=sig_bytes,
            keys_bytes=keys_bytes,
            wrapped=wrapped,
            suite=suite,
            keys_mac=mac,
            ciphertext=view[pos : pos + ct_len],
        )

    @classmethod
    def read(cls, path: str | Path) -> Bundle:
        try:
            data = Path(path).read_bytes()
        except OSError as e:
            raise BundleError(f"cannot read bundle {path}: {e.strerror}") from e
        return cls.parse(data)

    def to_bytes(self) -> bytes:
        return b"".join(
            (
                MAGIC,
                struct.pack(">I", len(self.manifest_bytes)),
                self.manifest_bytes,
                struct.pack(">I", len(self.signatures_bytes)),
                self.signatures_bytes,
                struct.pack(">I", len(self.keys_bytes)),
                self.keys_bytes,
                self.keys_mac,
                struct.pack(">Q", len(self.ciphertext)),
                self.ciphertext,
            )
        )

    @property
    def digest(self) -> str:
        """The bundle's identity: the signed ciphertext digest (hex)."""
        return self.manifest.digests.ciphertext

    # -- trust --------------------------------------------------------------------

    def verify(
        self, trust: TrustStore, *, at: datetime | None = None, ciphertext_digest: bool = True
    ) -> Verdict:
        """Everything that can be checked without a key. Says who published it.

        ``ciphertext_digest=False`` leaves out hashing the ciphertext, for a caller
        that decrypts next and relies on AES-GCM's tag and the signed plaintext
        digest instead (the node's cache, for a bundle checked whole on entry).
        """
        verdict = self.verify_signed(trust, at=at)
        m = self.manifest
        if len(self.ciphertext) != m.digests.plaintext_size + 16:
            raise IntegrityError("ciphertext length does not match the manifest")
        if ciphertext_digest and not hmac.compare_digest(
            tree_sha256(self.ciphertext), m.digests.ciphertext
        ):
            raise IntegrityError("ciphertext digest does not match the manifest (tampered)")
        return verdict

    def verify_signed(self, trust: TrustStore, *, at: datetime | None = None) -> Verdict:
        """The signed manifest alone: signature, publisher's chain and revocation, dates."""
        when = at or datetime.now(UTC)
        m = self.manifest
        publisher, cert = verify_manifest(
            self.manifest_bytes, m, parse_signatures(self.signatures_bytes), trust, at=when
        )
        if when < m.not_before:
            raise ExpiredError(
                f"bundle {m.name}@{m.version} is not valid before {m.not_before.isoformat()}"
            )
        if when > m.not_after:
            raise ExpiredError(f"bundle {m.name}@{m.version} expired at {m.not_after.isoformat()}")
        if m.digests.algorithm != ALGORITHM:
            raise IntegrityError(f"unknown digest algorithm {m.digests.algorithm!r}")
        return Verdict(
            publisher,
            trust,
            max(m.not_before, cert.not_valid_before_utc),
            min(m.not_after, cert.not_valid_after_utc),
        )

    def data_key(self, recipient: str, key: X25519PrivateKey) -> bytes:
        """Unwrap the data key for ``recipient`` (a CN) and check the keys section's MAC."""
        wrapped = self.wrapped.get(recipient)
        if wrapped is None:
            raise KeyWrapError(f"bundle has no data key wrapped for {recipient}")
        dk = keywrap.unwrap(wrapped, key, bytes.fromhex(self.digest), suite=self.suite)
        self.check_data_key(dk)
        return dk

    def check_data_key(self, data_key: bytes) -> None:
        """The keys section's MAC must check under ``data_key`` (a key unwrapped earlier)."""
        if not self._keys_mac_ok(data_key):
            raise IntegrityError("wrapped-keys section was changed (MAC mismatch)")

    def _keys_mac_ok(self, data_key: bytes) -> bool:
        return hmac.compare_digest(keys_mac(data_key, self.keys_bytes), self.keys_mac)

    def decrypt(self, data_key: bytes) -> bytes:
        d = self.manifest.digests
        return unseal(
            self.ciphertext,
            data_key,
            bytes.fromhex(d.nonce),
            aad_for(self.manifest.name, self.manifest.version),
            d.plaintext,
        )

    def open(
        self,
        trust: TrustStore,
        recipient: str,
        key: X25519PrivateKey,
        *,
        at: datetime | None = None,
        check_graph: bool = True,
    ) -> bytes:
        """Verify, then decrypt; returns the model bytes (memory only)."""
        self.verify(trust, at=at)
        model = self.decrypt(self.data_key(recipient, key))
        if check_graph:
            self.check_model(model)
        return model

    def check_model(self, model: bytes) -> None:
        """An ONNX model's graph must be safe to load and match the manifest's tensors."""
        if self.manifest.runtime == Runtime.ONNX:
            g = graph.load_graph(model)
            graph.check_graph(g)
            graph.check_matches(g, self.manifest.inputs, self.manifest.outputs)

    def rewrap(self, data_key: bytes, recipients: Mapping[str, X25519PublicKey]) -> Bundle:
        """A copy with the data key also wrapped for ``recipients`` (the caller holds the key)."""
        # Check the key is right before vouching for it with a new MAC.
        if not self._keys_mac_ok(data_key):
            raise IntegrityError("data key does not belong to this bundle")
        wrapped = dict(self.wrapped)
        bound = bytes.fromhex(self.digest)
        for cn, pub in recipients.items():
            wrapped[cn] = keywrap.wrap(data_key, pub, bound)
        keys_bytes = _keys_section(self.suite, wrapped)
        return replace(
            self, keys_bytes=keys_bytes, wrapped=wrapped, keys_mac=keys_mac(data_key, keys_bytes)
        )

    def only_for(self, data_key: bytes, recipient: str, pub: X25519PublicKey) -> Bundle:
        """A copy whose only wrapped key is for ``recipient``: what a node is given."""
        if not self._keys_mac_ok(data_key):
            raise IntegrityError("data key does not belong to this bundle")
        bound = bytes.fromhex(self.digest)
        wrapped = {recipient: keywrap.wrap(data_key, pub, bound)}
        keys_bytes = _keys_section(self.suite, wrapped)
        return replace(
            self, keys_bytes=keys_bytes, wrapped=wrapped, keys_mac=keys_mac(data_key, keys_bytes)
        )


def _section(view: memoryview, pos: int, what: str) -> tuple[bytes, int]:
    if len(view) < pos + 4:
        raise BundleFormatError(f"bundle is truncated ({what} length)")
    (n,) = struct.unpack_from(">I", view, pos)
    pos += 4
    if n > MAX_SECTION:
        raise BundleFormatError(f"{what} section is {n} bytes, over the {MAX_SECTION} limit")
    if len(view) < pos + n:
        raise BundleFormatError(f"bundle is truncated ({what} section)")
    return bytes(view[pos : pos + n]), pos + n


def _keys_section(suite: str, wrapped: Mapping[str, bytes]) -> bytes:
    return canonical_json({"suite": suite, "keys": {cn: b64(w) for cn, w in wrapped.items()}})


def _parse_keys(section: bytes) -> tuple[str, dict[str, bytes]]:
    try:
        obj = json.loads(section)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise BundleFormatError(f"keys section is not JSON: {e}") from e
    if (
        not isinstance(obj, dict)
        or set(obj) != {"suite", "keys"}
        or not isinstance(obj["suite"], str)
        or not isinstance(obj["keys"], dict)
    ):
        raise BundleFormatError("keys section must be {'suite': str, 'keys': {CN: base64}}")
    if canonical_json(obj) != section:
        raise BundleFormatError("keys section is not in canonical form")
    return obj["suite"], {cn: unb64(v, f"wrapped key for {cn}") for cn, v in obj["keys"].items()}


def build(
    model: bytes,
    *,
    name: str,
    version: str,
    publisher: Identity,
    recipients: Mapping[str, X25519PublicKey],
    runtime: Runtime = Runtime.ONNX,
    gpu: GpuRequirement = GpuRequirement.NONE,
    gpu_arch: str | None = None,
    regions: tuple[str, ...] = (),
    max_batch: int | None = None,
    max_delay_ms: float | None = None,
    timeout_ms: int | None = None,
    max_payload: int | None = None,
    memory_mb: int = 0,
    valid_days: int = 365,
    not_before: datetime | None = None,
    parameters: Mapping[str, str] | None = None,
) -> Bundle:
    """Read the graph's contract into a manifest, sign it, encrypt the model, wrap the key."""
    split_function_id(name)
    if publisher.info.role != Role.PUBLISHER:
        raise ManifestError(f"{publisher.cn} is not a publisher identity")
    if publisher.info.namespace != name.split("/", 1)[0]:
        raise ManifestError(
            f"publisher {publisher.cn} is bound to namespace {publisher.info.namespace!r}; "
            f"cannot sign {name}"
        )
    if not recipients:
        raise ManifestError("a bundle needs at least one recipient for its data key")
    if runtime == Runtime.ONNX:
        g = graph.load_graph(model)
        graph.check_graph(g)
        inputs, outputs = graph.graph_io(g)
    else:
        if not gpu_arch:
            raise ManifestError("a TensorRT plan needs the GPU architecture it was built for")
        raise ManifestError(
            "TensorRT plans need --input/--output specs (not supported by build yet)"
        )
    limits: dict[str, object] = {}
    for k, v in (
        ("max_batch", max_batch),
        ("max_delay_ms", max_delay_ms),
        ("timeout_ms", timeout_ms),
        ("max_payload", max_payload),
    ):
        if v is not None:
            limits[k] = v
    start = not_before or datetime.now(UTC).replace(microsecond=0) - timedelta(minutes=5)
    sealed = seal(model, aad_for(name, version))
    manifest = Manifest(
        name=name,
        version=version,
        runtime=runtime,
        inputs=inputs,
        outputs=outputs,
        requirements=Requirements(memory_mb=memory_mb, gpu=gpu, gpu_arch=gpu_arch),
        limits=Limits.model_validate(limits),
        data=DataRules(regions=tuple(regions)),
        not_before=start,
        not_after=start + timedelta(days=valid_days),
        digests=Digests(
            algorithm=ALGORITHM,
            plaintext=sealed.plaintext_digest,
            ciphertext=sealed.ciphertext_digest,
            plaintext_size=sealed.plaintext_size,
            nonce=sealed.nonce.hex(),
        ),
        publisher=publisher.cn,
        parameters=dict(parameters or {}),
    )
    manifest_bytes = manifest.canonical_bytes()
    bound = bytes.fromhex(sealed.ciphertext_digest)
    wrapped = {cn: keywrap.wrap(sealed.data_key, pub, bound) for cn, pub in recipients.items()}
    keys_bytes = _keys_section(keywrap.SUITE_NAME, wrapped)
    return Bundle(
        manifest_bytes=manifest_bytes,
        manifest=manifest,
        signatures_bytes=sign_manifest(manifest_bytes, publisher),
        keys_bytes=keys_bytes,
        wrapped=wrapped,
        suite=keywrap.SUITE_NAME,
        keys_mac=keys_mac(sealed.data_key, keys_bytes),
        ciphertext=memoryview(sealed.ciphertext),
    )


def inspect(bundle: Bundle) -> dict[str, object]:
    """The manifest plus the recipients, for ``fnmesh bundle inspect``."""
    out: dict[str, object] = json.loads(bundle.manifest_bytes)
    out["recipients"] = sorted(bundle.wrapped)
    out["size"] = len(bundle.ciphertext)
    return out
