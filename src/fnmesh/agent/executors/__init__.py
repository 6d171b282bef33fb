"""Executors: one small interface over ONNX Runtime and TensorRT."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from fnmesh.agent.errors import ExecutorError
from fnmesh.agent.executors.base import Executor
from fnmesh.agent.executors.onnx import OnnxExecutor, choose_providers, load_onnx, prepared_form
from fnmesh.agent.executors.tensorrt import (
    EngineCache,
    TensorRTPlanExecutor,
    load_cached_engine,
    load_plan,
)
from fnmesh.agent.probe import Hardware
from fnmesh.functions.manifest import GpuRequirement, Manifest, Runtime

__all__ = [
    "EngineCache",
    "Executor",
    "NodeLoader",
    "OnnxExecutor",
    "TensorRTPlanExecutor",
    "choose_providers",
    "load_executor",
]

_log = logging.getLogger(__name__)


def load_executor(
    model_bytes: bytes,
    manifest: Manifest,
    hardware: Hardware,
    *,
    intra_op_threads: int = 1,
    cache: EngineCache | None = None,
    form: str = "",
    prepare: bool = False,
    warm_up: bool = True,
    prepack: bool = True,
) -> Executor:
    """Load a function's model on the best executor this node has for it. Blocks: run off the loop.

    - ``runtime: tensorrt``: the plan runs natively, if it was built for this GPU.
    - ``runtime: onnx`` on a GPU node with TensorRT, cuda-python and an engine
      ``cache``: a TensorRT engine is built here (or read back from the encrypted
      cache); if TensorRT cannot take the model, ONNX Runtime runs it instead.
    - otherwise ONNX Runtime, on the providers ``choose_providers`` picks;
      ``form``, ``prepare``, ``warm_up`` and ``prepack`` are as for ``load_onnx``.
    """
    if manifest.runtime is Runtime.TENSORRT:
        return load_plan(model_bytes, manifest, hardware)
    if _native_trt(manifest, hardware, cache) and cache is not None:
        try:
            return load_cached_engine(model_bytes, manifest, hardware, cache)
        except ExecutorError as e:
            _log.warning(
                "%s@%s: native TensorRT unavailable (%s); using ONNX Runtime",
                manifest.name,
                manifest.version,
                e,
            )
    return load_onnx(
        model_bytes,
        manifest,
        hardware,
        intra_op_threads=intra_op_threads,
        form=form,
        prepare=prepare,
        warm_up=warm_up,
        prepack=prepack,
    )


def _native_trt(manifest: Manifest, hardware: Hardware, cache: EngineCache | None) -> bool:
    return (
        cache is not None
        and manifest.requirements.gpu is not GpuRequirement.NONE
        and hardware.has_gpu
        and hardware.tensorrt_version is not None
        and hardware.cuda_python
    )


@dataclass(frozen=True, slots=True)
class NodeLoader:
    """``load_executor`` as the bundle cache's loader: it prepares ONNX Runtime's optimised
    form of CPU models (``prepared_form``) and takes it back on later loads. ONNX Runtime
    sessions come back cold: the warm pool runs them first (a waiting request, or
    ``warm_up()``). With ``prepack`` off, CPU sessions come back without pre-packed
    weights, for a request that waits on the load (``OnnxExecutor.finish_load``)."""

    hardware: Hardware
    intra_op_threads: int = 1
    engines: EngineCache | None = None
    prepack: bool = True

    def form(self, manifest: Manifest) -> str:
        if manifest.runtime is not Runtime.ONNX or _native_trt(
            manifest, self.hardware, self.engines
        ):
            return ""
        return prepared_form(manifest, self.hardware)

    def __call__(
        self, model: bytes, manifest: Manifest, form: str
    ) -> tuple[Executor, bytes | None]:
        ex = load_executor(
            model,
            manifest,
            self.hardware,
            intra_op_threads=self.intra_op_threads,
            cache=self.engines,
            form=form,
            prepare=not form and bool(self.form(manifest)),
            warm_up=False,
            prepack=self.prepack,
        )
        return ex, ex.take_prepared() if isinstance(ex, OnnxExecutor) else None
