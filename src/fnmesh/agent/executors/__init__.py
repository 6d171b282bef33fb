"""Executors: one small interface over ONNX Runtime and TensorRT."""

from __future__ import annotations

import logging

from fnmesh.agent.errors import ExecutorError
from fnmesh.agent.executors.base import Executor
from fnmesh.agent.executors.onnx import OnnxExecutor, choose_providers, load_onnx
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
) -> Executor:
    """Load a function's model on the best executor this node has for it. Blocks: run off the loop.

    - ``runtime: tensorrt``: the plan runs natively, if it was built for this GPU.
    - ``runtime: onnx`` on a GPU node with TensorRT, cuda-python and an engine
      ``cache``: a TensorRT engine is built here (or read back from the encrypted
      cache); if TensorRT cannot take the model, ONNX Runtime runs it instead.
    - otherwise ONNX Runtime, on the providers ``choose_providers`` picks.
    """
    if manifest.runtime is Runtime.TENSORRT:
        return load_plan(model_bytes, manifest, hardware)
    native_trt = (
        cache is not None
        and manifest.requirements.gpu is not GpuRequirement.NONE
        and hardware.has_gpu
        and hardware.tensorrt_version is not None
        and hardware.cuda_python
    )
    if native_trt and cache is not None:
        try:
            return load_cached_engine(model_bytes, manifest, hardware, cache)
        except ExecutorError as e:
            _log.warning(
                "%s@%s: native TensorRT unavailable (%s); using ONNX Runtime",
                manifest.name,
                manifest.version,
                e,
            )
    return load_onnx(model_bytes, manifest, hardware, intra_op_threads=intra_op_threads)
