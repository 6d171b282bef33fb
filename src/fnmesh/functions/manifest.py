"""The bundle manifest: what a function is, what it needs, and what it accepts.

The manifest is a schema with a documented default for every field. It is
serialised canonically (sorted keys, no spaces, UTF-8) and those bytes are what
a publisher signs. Unknown fields survive a round trip (``extra="allow"``), so an
older reader never silently drops what a newer writer added.
"""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from fnmesh.functions.errors import ManifestError

#: The bundle format's major version. A reader refuses any other.
FORMAT_MAJOR = 1

#: Element types a tensor may have on the wire (numpy names, little endian).
DTYPES = (
    "float16",
    "float32",
    "float64",
    "int8",
    "int16",
    "int32",
    "int64",
    "uint8",
    "uint16",
    "uint32",
    "uint64",
    "bool",
)

_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}/[a-z0-9][a-z0-9_.-]{0,62}$")
_SEMVER_RE = re.compile(
    r"^(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)"
    r"(?:-((?:0|[1-9]\d*|\d*[a-zA-Z-][0-9a-zA-Z-]*)(?:\.(?:0|[1-9]\d*|\d*[a-zA-Z-][0-9a-zA-Z-]*))*))?"
    r"(?:\+([0-9a-zA-Z-]+(?:\.[0-9a-zA-Z-]+)*))?$"
)


def semver_key(version: str) -> tuple[Any, ...]:
    """Sort key for a semantic version: releases sort after their pre-releases."""
    m = _SEMVER_RE.fullmatch(version)
    if not m:
        raise ManifestError(f"version {version!r} is not semver (X.Y.Z)")
    major, minor, patch, pre, _build = m.groups()
    if pre is None:
        pre_key: tuple[Any, ...] = ((1,),)
    else:
        parts: list[tuple[int, int | str]] = []
        for p in pre.split("."):
            parts.append((0, int(p)) if p.isdigit() else (1, p))
        pre_key = ((0,), *parts)
    return (int(major), int(minor), int(patch), pre_key)


def split_function_id(fid: str) -> tuple[str, str]:
    """Split ``ns/name`` into its parts, refusing anything else."""
    if not _NAME_RE.fullmatch(fid):
        raise ManifestError(
            f"function id {fid!r} must be 'ns/name' (lowercase letters, digits, '-', '_')"
        )
    ns, name = fid.split("/", 1)
    return ns, name


class _Strict(BaseModel):
    model_config = ConfigDict(frozen=True, extra="allow")


class GpuRequirement(StrEnum):
    """Whether a function needs a GPU. The safe zero value is ``none``."""

    NONE = "none"
    PREFERRED = "preferred"
    REQUIRED = "required"


class Runtime(StrEnum):
    ONNX = "onnx"
    TENSORRT = "tensorrt"


class TensorSpec(_Strict):
    """One input or output: name, element type, and shape.

    A dimension is an ``int`` (fixed) or a ``str`` (symbolic, such as the batch
    dimension ``"N"``). The first dimension of every input is the batch axis.
    """

    name: str = Field(min_length=1, max_length=128)
    dtype: str
    shape: tuple[int | str, ...]

    @field_validator("dtype")
    @classmethod
    def _dtype_known(cls, v: str) -> str:
        if v not in DTYPES:
            raise ValueError(f"dtype {v!r} is not one of {', '.join(DTYPES)}")
        return v

    @field_validator("shape")
    @classmethod
    def _dims_ok(cls, v: tuple[int | str, ...]) -> tuple[int | str, ...]:
        for d in v:
            if isinstance(d, int) and d < 0:
                raise ValueError("fixed dimensions must be >= 0 (use a name for a symbolic one)")
        return v

    def describe(self) -> str:
        dims = ", ".join(str(d) for d in self.shape)
        return f"{self.dtype}[{dims}]"


class Requirements(_Strict):
    """What a node must have to run the function."""

    #: Resident memory the loaded function needs, in MiB; 0 = estimate from model size.
    memory_mb: int = Field(default=0, ge=0)
    gpu: GpuRequirement = GpuRequirement.NONE
    #: For TensorRT plans: the GPU architecture (compute capability, e.g. "sm_89") it was built for.
    gpu_arch: str | None = None


class Limits(_Strict):
    """Per-request limits that every component enforces."""

    timeout_ms: int = Field(default=5000, gt=0)
    max_batch: int = Field(default=32, ge=1, le=4096)
    #: How long the batcher may hold a request to fill a batch when one is already running.
    max_delay_ms: float = Field(default=2.0, ge=0)
    #: Largest accepted request payload, in bytes.
    max_payload: int = Field(default=1 << 20, gt=0)


class DataRules(_Strict):
    """Where the function's data may go. Empty ``regions`` means anywhere."""

    regions: tuple[str, ...] = ()


class Digests(_Strict):
    """Digests binding the manifest to the model bytes (see :mod:`fnmesh.functions.digest`)."""

    algorithm: str = "sha256-tree-256KiB"
    plaintext: str = Field(pattern=r"^[0-9a-f]{64}$")
    ciphertext: str = Field(pattern=r"^[0-9a-f]{64}$")
    plaintext_size: int = Field(ge=0)
    cipher: str = "AES-256-GCM"
    #: The AES-GCM nonce, hex.
    nonce: str = Field(pattern=r"^[0-9a-f]{24}$")


class Manifest(_Strict):
    """The signed description of a function bundle."""

    format: int = FORMAT_MAJOR
    name: str
    version: str
    runtime: Runtime = Runtime.ONNX
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    requirements: Requirements = Requirements()
    limits: Limits = Limits()
    data: DataRules = DataRules()
    not_before: datetime
    not_after: datetime
    digests: Digests
    publisher: str
    #: Free-form executor settings (e.g. ONNX Runtime session options).
    parameters: dict[str, str] = Field(default_factory=dict)

    @field_validator("name")
    @classmethod
    def _name_ok(cls, v: str) -> str:
        split_function_id(v)
        return v

    @field_validator("version")
    @classmethod
    def _version_ok(cls, v: str) -> str:
        semver_key(v)
        return v

    @field_validator("not_before", "not_after")
    @classmethod
    def _utc(cls, v: datetime) -> datetime:
        if v.tzinfo is None:
            raise ValueError("validity dates must carry a UTC offset")
        return v.astimezone(UTC)

    @property
    def function_id(self) -> str:
        return self.name

    @property
    def namespace(self) -> str:
        return self.name.split("/", 1)[0]

    def input(self, name: str) -> TensorSpec | None:
        for spec in self.inputs:
            if spec.name == name:
                return spec
        return None

    def canonical_bytes(self) -> bytes:
        """The bytes a publisher signs: sorted keys, no spaces, UTF-8."""
        return canonical_json(self.model_dump(mode="json"))

    @classmethod
    def from_bytes(cls, raw: bytes) -> Manifest:
        """Parse manifest bytes as received, refusing an unknown major version."""
        try:
            obj = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
            raise ManifestError(f"manifest is not valid JSON: {e}") from e
        if not isinstance(obj, dict):
            raise ManifestError("manifest must be a JSON object")
        fmt = obj.get("format")
        if fmt != FORMAT_MAJOR:
            raise ManifestError(
                f"bundle format major version {fmt!r} is not supported (this reader knows {FORMAT_MAJOR})"
            )
        try:
            return cls.model_validate(obj)
        except ValidationError as e:
            raise ManifestError(f"manifest is invalid: {_first_error(e)}") from e


def canonical_json(obj: Any) -> bytes:
    """Deterministic JSON bytes: sorted keys, compact separators, UTF-8."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def _first_error(e: ValidationError) -> str:
    err = e.errors()[0]
    loc = ".".join(str(p) for p in err["loc"])
    return f"{loc}: {err['msg']}"
