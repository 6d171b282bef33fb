"""Bundle files on disk, addressed by their digest.

Layout: ``root/ab/abcdef….fnb`` (the first two hex digits name the folder). A put
writes a temp file beside its target, fsyncs it, renames it into place and
fsyncs the folder, so a reader sees the whole file or none; a writer killed
mid-put leaves only a ``.tmp`` file, which readers never look at and
:meth:`BlobStore.sweep_temp` removes.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import time
from collections.abc import Iterator
from pathlib import Path

from fnmesh.coordinator.errors import InvalidRequestError, NotFoundError, StoreError

_DIGEST_RE = re.compile(r"[0-9a-f]{64}")
SUFFIX = ".fnb"
TEMP_SUFFIX = ".tmp"


def check_digest(digest: str) -> str:
    """Return ``digest`` if it is 64 lowercase hex characters, else refuse it."""
    if not isinstance(digest, str) or not _DIGEST_RE.fullmatch(digest):
        raise InvalidRequestError(f"digest {digest!r:.80} is not 64 lowercase hex characters")
    return digest


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class BlobStore:
    """Content-addressed bundle files under one root folder."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def path(self, digest: str) -> Path:
        """Where the blob for ``digest`` lives (whether or not it exists)."""
        check_digest(digest)
        return self.root / digest[:2] / f"{digest}{SUFFIX}"

    def has(self, digest: str) -> bool:
        """Whether the blob for ``digest`` is stored."""
        return self.path(digest).is_file()

    def put(self, digest: str, data: bytes) -> Path:
        """Store ``data`` under ``digest`` atomically; a digest already stored is left as it is."""
        target = self.path(digest)
        if target.is_file():
            return target
        folder = target.parent
        try:
            folder.mkdir(parents=True, exist_ok=True)
            temp = folder / f".{digest}.{secrets.token_hex(8)}{TEMP_SUFFIX}"
            fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(temp, target)
            except BaseException:
                with contextlib.suppress(OSError):
                    temp.unlink()
                raise
            _fsync_dir(folder)
        except OSError as e:
            raise StoreError(f"cannot store blob {digest}: {e}") from e
        return target

    def get(self, digest: str) -> bytes:
        """The bytes stored under ``digest``."""
        target = self.path(digest)
        try:
            return target.read_bytes()
        except FileNotFoundError as e:
            raise NotFoundError(f"no blob {digest}") from e
        except OSError as e:
            raise StoreError(f"cannot read blob {digest}: {e}") from e

    def delete(self, digest: str) -> bool:
        """Remove the blob for ``digest``; False if there was none."""
        target = self.path(digest)
        try:
            target.unlink()
        except FileNotFoundError:
            return False
        except OSError as e:
            raise StoreError(f"cannot delete blob {digest}: {e}") from e
        _fsync_dir(target.parent)
        return True

    def digests(self) -> Iterator[str]:
        """Every stored digest (temp files and stray names are skipped)."""
        for folder in sorted(self.root.iterdir()):
            if not folder.is_dir() or len(folder.name) != 2:
                continue
            for entry in sorted(folder.iterdir()):
                name = entry.name
                if name.endswith(SUFFIX) and _DIGEST_RE.fullmatch(name[: -len(SUFFIX)]):
                    yield name[: -len(SUFFIX)]

    def sweep_temp(self, min_age: float = 0.0) -> int:
        """Remove temp files left by killed writers; returns how many.

        Call it at start-up. When other processes may be writing into the same
        root, pass ``min_age`` (seconds) so their puts in progress are spared.
        """
        now = time.time()
        removed = 0
        for temp in self.root.glob(f"*/.*{TEMP_SUFFIX}"):
            try:
                if min_age > 0 and now - temp.stat().st_mtime < min_age:
                    continue
                temp.unlink()
                removed += 1
            except FileNotFoundError:
                continue
        return removed
