"""ONNX Runtime executor: a session built from model bytes held in memory only.

The plaintext model never touches the disk: the session is created from bytes,
the optimised model ORT can save is written only to an anonymous in-memory
file (``memfd_create``) and handed back to the caller (the bundle cache seals
it, see :func:`prepared_form`), and TensorRT's engine and timing caches are
kept off, because ONNX Runtime writes those as plaintext files. Engines built
on the node are cached encrypted by the native TensorRT path instead
(``executors.tensorrt.EngineCache``).
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import onnxruntime as ort

from fnmesh.agent.errors import ExecutorError, InferenceError, UnsupportedHardwareError
from fnmesh.agent.executors.base import (
    ONNX_MEMORY_FACTOR,
    check_input_names,
    declared_or_estimated_bytes,
)
from fnmesh.agent.probe import Hardware
from fnmesh.functions.manifest import GpuRequirement, Manifest

_log = logging.getLogger(__name__)

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
TENSORRT = "TensorrtExecutionProvider"

#: GPU the executors use; one agent drives one device (run one agent per GPU otherwise).
DEVICE_ID = 0
#: Larger models are not prepared: protobuf cannot serialise a graph of 2 GiB or more.
PREPARE_MAX_BYTES = 1 << 30


def _ort_errors() -> tuple[type[BaseException], ...]:
    # ORT's pybind exceptions derive from Exception directly, with no common base.
    from onnxruntime.capi import onnxruntime_pybind11_state as state

    names = (
        *("Fail", "InvalidArgument", "InvalidGraph", "InvalidProtobuf", "NoSuchFile"),
        *("NoModel", "RuntimeException", "EPFail", "NotImplemented", "ModelLoaded"),
    )
    found = tuple(getattr(state, n) for n in names if isinstance(getattr(state, n, None), type))
    return (*found, RuntimeError, ValueError, TypeError)


ORT_ERRORS = _ort_errors()


def choose_providers(gpu: GpuRequirement | str, hardware: Hardware) -> list[str]:
    """Execution providers to ask ORT for, best first, for a function's ``gpu`` requirement.

    ``none`` runs on CPU even on a GPU node (the GPU is kept for functions that
    asked). ``preferred`` uses TensorRT then CUDA when the node has a GPU and
    this ORT build offers them, else CPU. ``required`` is the same but raises
    ``UnsupportedHardwareError`` naming the reason when no GPU provider can work.
    CPU stays last in every list so nodes a GPU provider cannot take still run.
    """
    gpu = GpuRequirement(gpu)
    if gpu is GpuRequirement.NONE:
        return [CPU]
    usable = list(hardware.gpu_providers) if hardware.has_gpu else []
    if not usable and gpu is GpuRequirement.REQUIRED:
        if not hardware.has_gpu:
            why = f"this node has no usable NVIDIA GPU ({hardware.gpu_reason})"
        else:
            why = (
                f"this node has a GPU but its onnxruntime offers only "
                f"{', '.join(hardware.ort_providers) or 'no providers'} "
                "(install onnxruntime-gpu instead of onnxruntime)"
            )
        raise UnsupportedHardwareError(f"function requires a GPU, but {why}")
    return [*usable, CPU]


def provider_options(provider: str) -> dict[str, str]:
    """Options for one provider: TensorRT caches off (plaintext on disk), modest CUDA arena growth."""
    if provider == TENSORRT:
        return {
            "device_id": str(DEVICE_ID),
            # ORT would write built engines and timing data unencrypted to disk.
            "trt_engine_cache_enable": "False",
            "trt_timing_cache_enable": "False",
            "trt_dump_ep_context_model": "False",
        }
    if provider == CUDA:
        # Several functions share one GPU: grow the arena by what is asked, not to the next
        # power of two, so one model does not reserve memory its neighbours need.
        return {"device_id": str(DEVICE_ID), "arena_extend_strategy": "kSameAsRequested"}
    return {}


def prepared_form(manifest: Manifest, hardware: Hardware) -> str:
    """The form of a model :func:`load_onnx` prepares on this node, or "" for none.

    On the CPU provider, ORT's graph optimisations (fusions, and layouts
    chosen for this CPU's vector units) cost about a third of a session's
    creation, every time. Done once and saved, the optimised graph loads with
    the optimisations off. It is only good for the ORT build and the CPU
    features it was made with, which the form names (the features as a
    digest), so a node that changes either drops its prepared copies. GPU
    providers are not prepared: their graphs are partitioned at load.
    """
    if not hasattr(os, "memfd_create"):  # Linux only: elsewhere nothing is prepared
        return ""
    try:
        if choose_providers(manifest.requirements.gpu, hardware) != [CPU]:
            return ""
    except UnsupportedHardwareError:
        return ""
    return _cpu_form(hardware.arch, hardware.cpu_flags)


@functools.cache
def _cpu_form(arch: str, cpu_flags: tuple[str, ...]) -> str:
    """The prepared form for one kind of CPU (asked on every load: hashed once)."""
    cpu = hashlib.sha256("\n".join((arch, *cpu_flags)).encode()).hexdigest()
    return f"onnxruntime {ort.__version__} optimised for {arch or 'cpu'} {cpu[:16]}"


def session_options(intra_op_threads: int = 1) -> ort.SessionOptions:
    """Session options for a node running several functions on few cores."""
    if intra_op_threads < 1:
        raise ValueError("intra_op_threads must be >= 1")
    so = ort.SessionOptions()
    so.intra_op_num_threads = intra_op_threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # Spinning workers would steal the few cores the other sessions on this node need.
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.add_session_config_entry("session.inter_op.allow_spinning", "0")
    # Left unset on purpose: optimized_model_filepath and profiling would write to disk.
    return so


class OnnxExecutor:
    """An ONNX Runtime session over in-memory model bytes; ``run`` is thread-safe (ORT's promise)."""

    __slots__ = (
        "_direct",
        "_finish",
        "_function",
        "_inputs",
        "_manifest",
        "_memory_bytes",
        "_out_list",
        "_outputs",
        "_prepared",
        "_run_options",
        "_session",
        "_swap",
        "form",
        "inline_ok",
        "load_seconds",
    )

    def __init__(
        self,
        session: ort.InferenceSession,
        *,
        function: str,
        memory_bytes: int,
        load_seconds: float,
        intra_op_threads: int = 1,
        prepared: bytes | None = None,
        manifest: Manifest | None = None,
        form: str = "",
        finish: Callable[[], ort.InferenceSession] | None = None,
    ) -> None:
        self._session: ort.InferenceSession | None = session
        #: Builds the session this one stands in for (see ``finish_load``).
        self._finish = finish
        self._swap = threading.Lock()
        self._prepared = prepared
        self._manifest = manifest
        #: The form the session was made from: "" for the bundle's model (see ``prepared_form``).
        self.form = form
        self._function = function
        self._inputs = tuple(i.name for i in session.get_inputs())
        self._outputs = tuple(o.name for o in session.get_outputs())
        self._out_list = list(self._outputs)
        # Passed to every run: given None, the binding builds default options for each
        # run, about 6 us of a small model's run after an idle spell. ORT only reads them.
        self._run_options = ort.RunOptions()
        self._memory_bytes = memory_bytes
        #: Wall time spent creating the session (for cold-start metrics).
        self.load_seconds = load_seconds
        #: A short run may be made on the caller's (event loop) thread: the model runs on
        #: that thread alone (CPU provider, one intra-op thread), so the CPU time the
        #: caller measures is the whole cost.
        self.inline_ok = intra_op_threads == 1 and self.providers == (CPU,)
        self._direct = _direct_run(session)

    @property
    def provider(self) -> str:
        return self.providers[0] if self.providers else "closed"

    @property
    def providers(self) -> tuple[str, ...]:
        """Providers the session really got, best first (ORT drops ones that failed to start)."""
        return tuple(self._session.get_providers()) if self._session is not None else ()

    @property
    def memory_bytes(self) -> int:
        """``requirements.memory_mb`` if declared, else model size x 2 + 4 MiB (see base.py)."""
        return self._memory_bytes

    @property
    def input_names(self) -> tuple[str, ...]:
        return self._inputs

    @property
    def output_names(self) -> tuple[str, ...]:
        return self._outputs

    @property
    def deferred(self) -> bool:
        """True while the session runs without pre-packed weights (``load_onnx(prepack=False)``)."""
        return self._finish is not None

    def finish_load(self) -> None:
        """Build the session with pre-packed weights and run on it from now on (blocks).

        Runs under way finish on the session they started on. A failure keeps the
        session there is, which answers the same, a little slower.
        """
        finish = self._finish
        if finish is None:
            return
        try:
            session = finish()
        except ExecutorError as e:
            _log.warning("%s: kept the session without pre-packed weights: %s", self._function, e)
            session = None
        with self._swap:
            self._finish = None
            if session is not None and self._session is not None:  # not closed meanwhile
                self._session = session
                self._direct = _direct_run(session)

    def warm_up(self) -> None:
        """One run on zeros, so that the next run finds a warm session (see ``_warm_up``)."""
        if self._session is not None and self._manifest is not None:
            _warm_up(self._session, self._manifest)

    def take_prepared(self) -> bytes | None:
        """The optimised model ``load_onnx(..., prepare=True)`` made, once (then None)."""
        prepared, self._prepared = self._prepared, None
        return prepared

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        session = self._session
        if session is None:
            raise ExecutorError(f"{self._function}: executor is closed")
        names = self._inputs
        if len(inputs) != len(names) or any(n not in inputs for n in names):
            check_input_names(inputs, names, function=self._function)  # raises, naming them
        feed = inputs if type(inputs) is dict else dict(inputs)
        try:
            if self._direct is not None:
                results = self._direct(self._out_list, feed, self._run_options)
            else:
                results = session.run(None, feed, self._run_options)
        except ORT_ERRORS as e:
            raise InferenceError(f"{self._function}: {e}") from e
        # Tensor outputs come back as arrays already; anything else is made one.
        return {
            name: value if type(value) is np.ndarray else np.asarray(value)
            for name, value in zip(self._outputs, results, strict=True)
        }

    def close(self) -> None:
        # ORT frees the session's memory when the last reference goes.
        with self._swap:
            self._session = None
            self._direct = None
            self._finish = None

    def __repr__(self) -> str:
        return f"OnnxExecutor({self._function!r}, provider={self.provider!r})"


def _direct_run(session: ort.InferenceSession) -> Callable[..., list[Any]] | None:
    """On CPU, the binding's own ``run``: the Python wrapper around it checks the inputs
    again (``OnnxExecutor.run`` checks them first) and handles GPU provider failures,
    about 8 us of a small model's run on a busy node."""
    if tuple(session.get_providers()) != (CPU,):
        return None
    run = getattr(getattr(session, "_sess", None), "run", None)
    return run if callable(run) else None


def _warm_up(session: ort.InferenceSession, manifest: Manifest) -> None:
    """One run on zeros (symbolic dimensions as 1), on the loading thread.

    A session's first run pays one-off costs (buffers, kernel state), about as
    much again as the run itself; paid here, off the request's path, the first
    request finds a warm session. A model that refuses zeros is simply not
    warmed up.
    """
    try:
        feed = {
            s.name: np.zeros(tuple(1 if isinstance(d, str) else d for d in s.shape), s.dtype)
            for s in manifest.inputs
        }
        session.run(None, feed)
    except ORT_ERRORS as e:
        _log.debug("%s@%s: no warm-up run (%s)", manifest.name, manifest.version, e)


def load_onnx(
    model_bytes: bytes,
    manifest: Manifest,
    hardware: Hardware,
    *,
    intra_op_threads: int = 1,
    form: str = "",
    prepare: bool = False,
    warm_up: bool = True,
    prepack: bool = True,
) -> OnnxExecutor:
    """Create an ORT session for the function on the best provider its ``gpu`` requirement allows.

    ``form`` says the bytes are a model prepared earlier (see :func:`prepared_form`);
    with ``prepare``, the executor also holds this node's prepared form of the
    model (``take_prepared``), where there is one. Without ``warm_up``, the
    caller runs the session first (a request's run, or ``warm_up()``).

    Without ``prepack`` (CPU only), the session skips pre-packing its weights
    for the CPU's matrix kernels, a third of a session's creation and of a cold
    start; its runs cost a little more (a quarter more for a batch of 64) until
    ``finish_load()`` swaps in the session with packed weights. For a request
    waiting on a cold start: answer it first, pack after.

    Blocks (tens of milliseconds for small models, much longer when TensorRT
    builds an engine): call it off the event loop.
    """
    gpu = manifest.requirements.gpu
    providers = choose_providers(gpu, hardware)
    options: list[tuple[str, dict[str, str]] | str] = [
        (p, provider_options(p)) if provider_options(p) else p for p in providers
    ]
    so = session_options(intra_op_threads)
    mine = prepared_form(manifest, hardware) if form or prepare else ""
    if form:
        if form != mine:
            raise ExecutorError(
                f"{manifest.name}@{manifest.version}: the model was prepared as {form!r}, "
                "which this node cannot load"
            )
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    finish: Callable[[], ort.InferenceSession] | None = None
    if not prepack and providers == [CPU]:
        packed_so = session_options(intra_op_threads)
        packed_so.graph_optimization_level = so.graph_optimization_level

        def finish() -> ort.InferenceSession:
            try:
                return ort.InferenceSession(model_bytes, sess_options=packed_so, providers=options)
            except ORT_ERRORS as e:
                raise ExecutorError(f"{manifest.name}@{manifest.version}: {e}") from e

        so.add_session_config_entry("session.disable_prepacking", "1")
    memfd = None
    if prepare and not form and len(model_bytes) < PREPARE_MAX_BYTES and mine:
        memfd = os.memfd_create("fnmesh-prepared", os.MFD_CLOEXEC)
        so.optimized_model_filepath = f"/proc/self/fd/{memfd}"
        # ORT warns that the saved graph suits this machine only: the form says so.
        so.log_severity_level = 3
    started = time.perf_counter()
    try:
        session = ort.InferenceSession(model_bytes, sess_options=so, providers=options)
        prepared = _read_all(memfd) if memfd is not None else None
    except ORT_ERRORS as e:
        raise ExecutorError(
            f"{manifest.name}@{manifest.version}: ORT refused the model: {e}"
        ) from e
    except OSError as e:  # the in-memory file: the session is fine, only unprepared
        _log.warning("%s@%s: no prepared form (%s)", manifest.name, manifest.version, e)
        prepared = None
    finally:
        if memfd is not None:
            os.close(memfd)
    elapsed = time.perf_counter() - started
    got = session.get_providers()
    if gpu is GpuRequirement.REQUIRED and not any(p in got for p in (TENSORRT, CUDA)):
        # ORT falls back to CPU with only a warning when a GPU provider fails to start.
        raise UnsupportedHardwareError(
            f"{manifest.name}@{manifest.version} requires a GPU, but ONNX Runtime could not "
            f"start {' or '.join(providers[:-1])} (session got {', '.join(got)}); "
            "check the CUDA/cuDNN/TensorRT libraries match this onnxruntime-gpu build"
        )
    if got and got[0] != providers[0]:
        _log.warning(
            "%s@%s: wanted %s, ONNX Runtime gave %s",
            manifest.name,
            manifest.version,
            providers,
            got,
        )
    if warm_up:
        _warm_up(session, manifest)
    executor = OnnxExecutor(
        session,
        function=f"{manifest.name}@{manifest.version}",
        memory_bytes=declared_or_estimated_bytes(manifest, len(model_bytes), ONNX_MEMORY_FACTOR),
        load_seconds=elapsed,
        intra_op_threads=intra_op_threads,
        prepared=prepared or None,
        manifest=manifest,
        form=form,
        finish=finish,
    )
    _log.debug("%r loaded in %.1f ms", executor, elapsed * 1000)
    return executor


def _read_all(fd: int) -> bytes:
    size = os.fstat(fd).st_size
    chunks = []
    at = 0
    while at < size:
        chunk = os.pread(fd, size - at, at)
        if not chunk:
            break
        chunks.append(chunk)
        at += len(chunk)
    return b"".join(chunks)
