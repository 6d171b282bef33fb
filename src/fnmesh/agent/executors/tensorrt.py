"""TensorRT plans on NVIDIA GPUs, and the encrypted cache of engines built on this node.

``tensorrt`` and cuda-python are optional and imported only when a plan is
loaded or built. A plan is tied to the GPU architecture and TensorRT version
it was built with, so a plan whose stated ``gpu_arch`` is not this GPU's is
refused before TensorRT sees it.

Engines this node builds from ONNX models are cached in ``EngineCache``:
AES-256-GCM files named by a hash of (model digest, GPU arch, TensorRT
version), decrypted in memory only, so a stolen disk yields no model.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import logging
import os
import secrets
import tempfile
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from fnmesh.agent.errors import (
    EngineCacheError,
    ExecutorError,
    InferenceError,
    UnsupportedHardwareError,
)
from fnmesh.agent.executors.base import MIB, check_input_names
from fnmesh.agent.probe import Hardware, cuda_runtime_module
from fnmesh.functions.manifest import Manifest

_log = logging.getLogger(__name__)

PROVIDER = "TensorRT"
#: GPU the executors use; one agent drives one device.
DEVICE_ID = 0
#: Smallest device buffer allocated, so zero-sized tensors still get a valid address.
_MIN_BUFFER = 256


# --- the encrypted engine cache -------------------------------------------------------------

_MAGIC = b"FNENG\x00\x01\x00"
_NONCE_LEN = 12


class EngineCache:
    """An on-disk cache of TensorRT engines, encrypted with AES-256-GCM under a node key.

    Each file is ``magic | nonce | ciphertext+tag``; the additional data binds it
    to its entry name, so a file copied over another entry fails to open. Writes
    go to a temporary file in the same directory and are renamed into place, so
    a reader sees the whole old entry or the whole new one.
    """

    __slots__ = ("_aead", "directory")

    def __init__(self, directory: str | os.PathLike[str], key: bytes) -> None:
        if len(key) != 32:
            raise ValueError("EngineCache key must be 32 bytes (AES-256)")
        self.directory = Path(directory)
        self._aead = AESGCM(key)

    def __repr__(self) -> str:
        return f"EngineCache({str(self.directory)!r})"

    @staticmethod
    def entry_name(model_digest: str, gpu_arch: str, trt_version: str) -> str:
        """File name of an entry: sha256 of what makes an engine reusable."""
        ident = f"{model_digest}\x00{gpu_arch}\x00{trt_version}".encode()
        return hashlib.sha256(ident).hexdigest() + ".engine"

    def path_for(self, model_digest: str, gpu_arch: str, trt_version: str) -> Path:
        return self.directory / self.entry_name(model_digest, gpu_arch, trt_version)

    def get(self, model_digest: str, gpu_arch: str, trt_version: str) -> bytes | None:
        """The decrypted engine, or None if absent. Raises ``EngineCacheError`` if it does not open."""
        name = self.entry_name(model_digest, gpu_arch, trt_version)
        try:
            blob = (self.directory / name).read_bytes()
        except FileNotFoundError:
            return None
        except OSError as e:
            raise EngineCacheError(f"cached engine {name} is unreadable: {e}") from e
        head = len(_MAGIC) + _NONCE_LEN
        if len(blob) < head + 16 or not blob.startswith(_MAGIC):
            raise EngineCacheError(f"cached engine {name} is truncated or not an fnmesh engine")
        nonce = blob[len(_MAGIC) : head]
        try:
            return self._aead.decrypt(nonce, blob[head:], _MAGIC + name.encode())
        except InvalidTag as e:
            raise EngineCacheError(
                f"cached engine {name} does not authenticate (other key, or changed on disk)"
            ) from e

    def put(self, model_digest: str, gpu_arch: str, trt_version: str, engine: bytes) -> Path:
        """Encrypt and store an engine atomically; returns its path."""
        name = self.entry_name(model_digest, gpu_arch, trt_version)
        nonce = secrets.token_bytes(_NONCE_LEN)
        blob = _MAGIC + nonce + self._aead.encrypt(nonce, engine, _MAGIC + name.encode())
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        # mkstemp creates the file 0600; only ciphertext is ever written to it.
        fd, tmp = tempfile.mkstemp(dir=self.directory, prefix=".tmp-", suffix=".part")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(blob)
                f.flush()
                os.fsync(f.fileno())
            final = self.directory / name
            os.replace(tmp, final)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        return final

    def discard(self, model_digest: str, gpu_arch: str, trt_version: str) -> None:
        """Remove an entry (after it failed to open, or its model was retired)."""
        with contextlib.suppress(FileNotFoundError):
            self.path_for(model_digest, gpu_arch, trt_version).unlink()


# --- fitting a plan to this node ------------------------------------------------------------


def check_plan_fits(manifest: Manifest, hardware: Hardware) -> str:
    """Refuse a plan this node cannot run; returns the GPU architecture it will run on.

    Pure: decides from the manifest and the probe alone, so it is testable without a GPU.
    """
    fn = f"{manifest.name}@{manifest.version}"
    if not hardware.has_gpu or hardware.gpu_arch is None:
        raise UnsupportedHardwareError(
            f"{fn} is a TensorRT plan and needs an NVIDIA GPU: {hardware.gpu_reason}"
        )
    if hardware.tensorrt_version is None:
        raise UnsupportedHardwareError(
            f"{fn} is a TensorRT plan but {hardware.tensorrt_reason or 'tensorrt is not importable'}"
            " (pip install fnmesh[tensorrt])"
        )
    if not hardware.cuda_python:
        raise UnsupportedHardwareError(
            f"{fn} is a TensorRT plan but cuda-python is not installed "
            "(pip install cuda-python; the plan executor uses it for device memory and streams)"
        )
    wanted = manifest.requirements.gpu_arch
    if wanted is None:
        raise ExecutorError(f"{fn} is a TensorRT plan but its manifest states no gpu_arch")
    if wanted != hardware.gpu_arch:
        raise UnsupportedHardwareError(
            f"{fn} was built for {wanted}, this node's GPU ({hardware.gpus[0].name}) "
            f"is {hardware.gpu_arch}; a TensorRT plan runs only on the architecture it was built for"
        )
    built_with = manifest.parameters.get("tensorrt_version")
    if built_with is not None and built_with != hardware.tensorrt_version:
        raise UnsupportedHardwareError(
            f"{fn} was built with TensorRT {built_with}, this node has {hardware.tensorrt_version}"
        )
    return wanted


def _import_tensorrt() -> Any:
    try:
        return importlib.import_module("tensorrt")
    except Exception as e:  # a broken native install fails in many ways
        raise UnsupportedHardwareError(f"tensorrt is not importable: {e}") from e


def _import_cudart() -> ModuleType:
    cudart = cuda_runtime_module()
    if cudart is None:
        raise UnsupportedHardwareError(
            "cuda-python is not installed (pip install cuda-python); "
            "the TensorRT plan executor needs it for device memory and streams"
        )
    return cudart


def _cuda(cudart: Any, result: Any, what: str) -> Any:
    """Unwrap a cuda-python ``(err, *values)`` result, raising on error."""
    err, *values = result if isinstance(result, tuple) else (result,)
    if err != cudart.cudaError_t.cudaSuccess:
        raise InferenceError(f"CUDA {what} failed: {err}")
    return values[0] if len(values) == 1 else tuple(values)


# --- running a plan -------------------------------------------------------------------------


class TensorRTPlanExecutor:
    """A deserialised TensorRT engine with one execution context and one CUDA stream.

    An execution context is not re-entrant, so ``run`` holds a lock: calls from
    several threads run one after another. Device buffers grow to the largest
    batch seen and are reused.
    """

    def __init__(self, plan: bytes, *, function: str, memory_bytes: int | None = None) -> None:
        trt = _import_tensorrt()
        cudart = _import_cudart()
        self._trt = trt
        self._cudart = cudart
        self._function = function
        self._lock = threading.Lock()
        self._buffers: dict[str, tuple[int, int]] = {}
        _cuda(cudart, cudart.cudaSetDevice(DEVICE_ID), "cudaSetDevice")
        # The logger must outlive the runtime, engine and context made through it.
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        self._engine = self._runtime.deserialize_cuda_engine(plan)
        if self._engine is None:
            raise ExecutorError(
                f"{function}: TensorRT could not deserialise the plan "
                "(built with another TensorRT version, for another GPU, or with plugins)"
            )
        self._context = self._engine.create_execution_context()
        if self._context is None:
            raise ExecutorError(f"{function}: TensorRT could not create an execution context")
        self._inputs: dict[str, np.dtype[Any]] = {}
        self._outputs: dict[str, np.dtype[Any]] = {}
        for i in range(self._engine.num_io_tensors):
            name = self._engine.get_tensor_name(i)
            try:
                dtype = np.dtype(trt.nptype(self._engine.get_tensor_dtype(name)))
            except TypeError as e:
                raise ExecutorError(f"{function}: tensor {name!r} has a type numpy lacks") from e
            if self._engine.get_tensor_location(name) != trt.TensorLocation.DEVICE:
                raise ExecutorError(f"{function}: host (shape) tensor {name!r} is not supported")
            if self._engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT:
                self._inputs[name] = dtype
            else:
                self._outputs[name] = dtype
        self._stream = _cuda(cudart, cudart.cudaStreamCreate(), "cudaStreamCreate")
        device = getattr(self._engine, "device_memory_size_v2", None)
        if device is None:  # TensorRT < 10.1
            device = self._engine.device_memory_size
        #: Plan size (weights live on the GPU) plus activation memory, in *device* bytes.
        self._memory_bytes = (
            memory_bytes if memory_bytes is not None else len(plan) + int(device or 0)
        )

    @property
    def provider(self) -> str:
        return PROVIDER

    @property
    def memory_bytes(self) -> int:
        """Device bytes: the manifest's memory_mb if declared, else plan size + activation memory."""
        return self._memory_bytes

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        check_input_names(inputs, self._inputs, function=self._function)
        with self._lock:
            if self._context is None:
                raise ExecutorError(f"{self._function}: executor is closed")
            return self._run_locked(inputs)

    def _run_locked(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        cudart, ctx = self._cudart, self._context
        h2d = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
        d2h = cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        # cudaSetDevice is per thread, and run is called from whichever worker is free.
        _cuda(cudart, cudart.cudaSetDevice(DEVICE_ID), "cudaSetDevice")
        # Pageable copies are staged before cudaMemcpyAsync returns; keeping the arrays
        # until the sync anyway stays correct if these ever become pinned buffers.
        keep: list[np.ndarray] = []
        for name, dtype in self._inputs.items():
            arr = np.ascontiguousarray(inputs[name])
            if arr.dtype != dtype:
                raise InferenceError(
                    f"{self._function}: input {name!r} is {arr.dtype}, expected {dtype}"
                )
            if not ctx.set_input_shape(name, arr.shape):
                raise InferenceError(
                    f"{self._function}: input {name!r} shape {arr.shape} is outside the plan's "
                    f"profile ({tuple(self._engine.get_tensor_shape(name))})"
                )
            ptr = self._buffer(name, arr.nbytes)
            _cuda(
                cudart,
                cudart.cudaMemcpyAsync(ptr, arr.ctypes.data, arr.nbytes, h2d, self._stream),
                "copy to device",
            )
            ctx.set_tensor_address(name, ptr)
            keep.append(arr)
        outputs: dict[str, np.ndarray] = {}
        for name, dtype in self._outputs.items():
            shape = tuple(ctx.get_tensor_shape(name))
            if any(d < 0 for d in shape):
                raise InferenceError(
                    f"{self._function}: output {name!r} has a data-dependent shape {shape}"
                )
            out = np.empty(shape, dtype=dtype)
            ctx.set_tensor_address(name, self._buffer(name, out.nbytes))
            outputs[name] = out
        if not ctx.execute_async_v3(int(self._stream)):
            raise InferenceError(f"{self._function}: TensorRT failed to enqueue the inference")
        for name, out in outputs.items():
            ptr = self._buffers[name][0]
            _cuda(
                cudart,
                cudart.cudaMemcpyAsync(out.ctypes.data, ptr, out.nbytes, d2h, self._stream),
                "copy to host",
            )
        _cuda(cudart, cudart.cudaStreamSynchronize(self._stream), "stream synchronise")
        del keep
        return outputs

    def _buffer(self, name: str, nbytes: int) -> int:
        ptr, capacity = self._buffers.get(name, (0, 0))
        if nbytes <= capacity:
            return ptr
        if ptr:
            _cuda(self._cudart, self._cudart.cudaFree(ptr), "cudaFree")
            del self._buffers[name]
        size = max(nbytes, _MIN_BUFFER)
        ptr = int(_cuda(self._cudart, self._cudart.cudaMalloc(size), "cudaMalloc"))
        self._buffers[name] = (ptr, size)
        return ptr

    def close(self) -> None:
        with self._lock:
            if self._context is None:
                return
            for ptr, _ in self._buffers.values():
                self._cudart.cudaFree(ptr)
            self._buffers.clear()
            self._cudart.cudaStreamDestroy(self._stream)
            # Context before engine before runtime: each depends on the next.
            self._context = None
            self._engine = None
            self._runtime = None


def load_plan(model_bytes: bytes, manifest: Manifest, hardware: Hardware) -> TensorRTPlanExecutor:
    """Load a published TensorRT plan after checking it fits this GPU. Blocks; call off the loop."""
    check_plan_fits(manifest, hardware)
    return TensorRTPlanExecutor(
        model_bytes,
        function=f"{manifest.name}@{manifest.version}",
        memory_bytes=manifest.requirements.memory_mb * MIB or None,
    )


# --- building engines on the node -----------------------------------------------------------


def build_plan(model_bytes: bytes, manifest: Manifest, *, workspace_bytes: int = 1 << 30) -> bytes:
    """Build a TensorRT engine from an ONNX model, with a profile for batch 1..limits.max_batch.

    Only the first (batch) dimension may be symbolic: TensorRT needs a range for
    every dynamic dimension and the manifest gives one only for the batch.
    Takes seconds to minutes; call it off the event loop.
    """
    trt = _import_tensorrt()
    fn = f"{manifest.name}@{manifest.version}"
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    # TensorRT 10 networks are always explicit-batch (flag 0); 8.x must ask for it.
    flags = 0
    if int(str(trt.__version__).split(".")[0]) < 10:
        flags = 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(model_bytes):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ExecutorError(f"{fn}: TensorRT cannot parse the ONNX model: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes)
    profile = builder.create_optimization_profile()
    max_batch = manifest.limits.max_batch
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        dims = tuple(tensor.shape)
        if all(d >= 0 for d in dims):
            continue
        if not dims or any(d < 0 for d in dims[1:]):
            raise ExecutorError(
                f"{fn}: input {tensor.name!r} shape {dims} has a dynamic dimension other than "
                "the batch; TensorRT cannot build a profile for it"
            )
        rest = dims[1:]
        profile.set_shape(tensor.name, (1, *rest), (max_batch, *rest), (max_batch, *rest))
    config.add_optimization_profile(profile)
    started = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise ExecutorError(f"{fn}: TensorRT failed to build an engine (see its log)")
    _log.info("%s: built TensorRT engine in %.1f s", fn, time.perf_counter() - started)
    return bytes(memoryview(serialized))


def load_cached_engine(
    model_bytes: bytes, manifest: Manifest, hardware: Hardware, cache: EngineCache
) -> TensorRTPlanExecutor:
    """Run an ONNX model as a TensorRT engine built here, reusing the encrypted cache entry."""
    arch, version = hardware.gpu_arch, hardware.tensorrt_version
    if arch is None or version is None:
        raise UnsupportedHardwareError("building a TensorRT engine needs a GPU and tensorrt")
    # The algorithm is part of the identity: the same hex under another scheme is another model.
    digest = f"{manifest.digests.algorithm}:{manifest.digests.plaintext}"
    try:
        plan = cache.get(digest, arch, version)
    except EngineCacheError as e:
        # A bad entry is rebuilt, never trusted; say so, since tampering is one cause.
        _log.warning("%s; rebuilding it", e)
        cache.discard(digest, arch, version)
        plan = None
    if plan is None:
        plan = build_plan(model_bytes, manifest)
        try:
            cache.put(digest, arch, version, plan)
        except OSError as e:
            # The engine is built and good; only the next load will have to build it again.
            _log.warning("%s: could not cache the TensorRT engine: %s", manifest.name, e)
    return TensorRTPlanExecutor(plan, function=f"{manifest.name}@{manifest.version}")
