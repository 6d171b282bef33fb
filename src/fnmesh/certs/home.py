"""The home folder: where a fleet's keys, certificates and ``fnmesh.toml`` live.

Every command takes ``--home DIR`` (default ``$FNMESH_HOME``, then ``~/.fnmesh``).
The config is read once into a frozen :class:`Config`; flags override it.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import tomllib
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

import tomli_w

from fnmesh.certs.errors import HomeError

DEFAULT_TOPIC_ROOT = "fnmesh/v1"
CONFIG_NAME = "fnmesh.toml"


def resolve_home(home: str | os.PathLike[str] | None = None) -> Path:
    """The home folder: the argument, else ``$FNMESH_HOME``, else ``~/.fnmesh``."""
    if home:
        return Path(home).expanduser().resolve()
    env = os.environ.get("FNMESH_HOME")
    if env:
        return Path(env).expanduser().resolve()
    return (Path.home() / ".fnmesh").resolve()


@dataclass(frozen=True, slots=True)
class Config:
    """What every verb needs to find the rest of the mesh."""

    coordinator: str = "https://127.0.0.1:8443"
    broker: str = "mqtts://127.0.0.1:8883"
    #: The identity (certificate CN) to act as by default.
    identity: str = "operator.admin"
    topic_root: str = DEFAULT_TOPIC_ROOT

    def override(self, **changes: Any) -> Config:
        """A copy with the given non-None values replaced (flags beat the file)."""
        return replace(self, **{k: v for k, v in changes.items() if v is not None})


@dataclass(frozen=True, slots=True)
class Home:
    """Paths inside one home folder."""

    root: Path

    @property
    def config_path(self) -> Path:
        return self.root / CONFIG_NAME

    @property
    def ca_dir(self) -> Path:
        return self.root / "ca"

    @property
    def ca_cert(self) -> Path:
        return self.ca_dir / "ca.pem"

    @property
    def ca_key(self) -> Path:
        return self.ca_dir / "ca.key"

    @property
    def crl(self) -> Path:
        return self.ca_dir / "crl.pem"

    @property
    def issued(self) -> Path:
        return self.ca_dir / "issued.json"

    def identity_dir(self, cn: str) -> Path:
        return self.root / "identities" / cn

    def load_config(self) -> Config:
        """Read ``fnmesh.toml``; a missing file gives the defaults."""
        path = self.config_path
        if not path.exists():
            return Config()
        try:
            data = tomllib.loads(path.read_text())
        except (OSError, tomllib.TOMLDecodeError) as e:
            raise HomeError(f"cannot read {path}: {e}") from e
        known = {f.name for f in fields(Config)}
        unknown = set(data) - known
        if unknown:
            raise HomeError(f"{path}: unknown settings {', '.join(sorted(unknown))}")
        for k, v in data.items():
            if not isinstance(v, str):
                raise HomeError(f"{path}: setting {k!r} must be a string")
        return Config(**data)

    def save_config(self, config: Config) -> None:
        data = {f.name: getattr(config, f.name) for f in fields(Config)}
        write_atomic(self.config_path, tomli_w.dumps(data).encode(), mode=0o644)


def open_home(home: str | os.PathLike[str] | None = None) -> Home:
    return Home(resolve_home(home))


def write_atomic(path: Path, data: bytes, *, mode: int = 0o644) -> None:
    """Write a file so that readers see the old bytes or the new ones, never half.

    Private keys pass ``mode=0o600``: the file is created with that mode, so
    there is no moment where it is readable by others.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
