"""What this node has: CPU, memory, GPUs and the inference runtimes that can use them.

``probe()`` never raises: a missing library, driver or file becomes an empty
value plus a reason string, because an agent on a bare edge box must still
start and advertise what it *does* have. NVIDIA's libraries (nvidia-ml-py,
TensorRT, cuda-python) are optional and imported only here, lazily.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import platform
import sys
from dataclasses import asdict, dataclass
from types import ModuleType
from typing import Any

import psutil

_log = logging.getLogger(__name__)

_MIB = 1024 * 1024

#: CPU flags worth naming in a one-line summary (the full list is kept in ``cpu_flags``).
_NOTABLE_FLAGS = ("avx2", "avx512f", "avx512_vnni", "amx_tile", "sha_ni", "aes", "neon", "asimd")

GPU_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider")


@dataclass(frozen=True, slots=True)
class GpuInfo:
    """One NVIDIA GPU as NVML reports it."""

    index: int
    name: str
    memory_total_mib: int
    memory_free_mib: int
    #: Compute capability as a TensorRT plan names it, e.g. "sm_89".
    compute_capability: str
    #: Percent of the last sample period a kernel was running; None when NVML cannot say.
    utilisation_percent: int | None = None


@dataclass(frozen=True, slots=True)
class Hardware:
    """A snapshot of this node's hardware and inference runtimes.

    Every field has a harmless default so a test can describe a node it does not have.
    """

    cores_logical: int = 1
    #: None when the OS does not say (psutil returns None on some ARM boards).
    cores_physical: int | None = None
    memory_total_mib: int = 0
    memory_available_mib: int = 0
    #: The container's (cgroup) memory limit when it is below physical memory, else None.
    memory_limit_mib: int | None = None
    #: ``platform.machine()``: x86_64, aarch64, arm64, ...
    arch: str = ""
    cpu_model: str = ""
    #: CPU feature flags (/proc/cpuinfo "flags" on x86, "Features" on ARM), sorted.
    cpu_flags: tuple[str, ...] = ()
    gpus: tuple[GpuInfo, ...] = ()
    #: Why ``gpus`` is empty; "" when GPUs were found.
    gpu_reason: str = "not probed"
    #: ``onnxruntime.get_available_providers()``: what this ORT build offers, not what works.
    ort_providers: tuple[str, ...] = ("CPUExecutionProvider",)
    ort_version: str | None = None
    #: ``tensorrt.__version__`` when ``import tensorrt`` works, else None.
    tensorrt_version: str | None = None
    tensorrt_reason: str = ""
    #: Whether cuda-python's runtime bindings import (the TensorRT plan executor needs them).
    cuda_python: bool = False

    @property
    def has_gpu(self) -> bool:
        return bool(self.gpus)

    @property
    def gpu_arch(self) -> str | None:
        """Compute capability of the GPU executors use (device 0), e.g. "sm_86"."""
        return self.gpus[0].compute_capability if self.gpus else None

    @property
    def gpu_providers(self) -> tuple[str, ...]:
        """The GPU execution providers this ORT build offers, best first."""
        return tuple(p for p in GPU_PROVIDERS if p in self.ort_providers)

    @property
    def memory_usable_mib(self) -> int:
        """Physical memory, capped by the cgroup limit: what a warm pool budget is sized from."""
        if self.memory_limit_mib is None:
            return self.memory_total_mib
        return min(self.memory_total_mib, self.memory_limit_mib)

    def has_flag(self, flag: str) -> bool:
        return flag in self.cpu_flags

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form for advertising; ``has_gpu`` is included for readers that do not derive it."""
        d = asdict(self)
        d["cpu_flags"] = list(self.cpu_flags)
        d["gpus"] = [asdict(g) for g in self.gpus]
        d["ort_providers"] = list(self.ort_providers)
        d["has_gpu"] = self.has_gpu
        return d

    def summary(self) -> str:
        """One line for logs and ``fnmesh nodes list``."""
        cores = f"{self.cores_physical or '?'}c/{self.cores_logical}t"
        mem = (
            f"{self.memory_total_mib / 1024:.1f} GiB ({self.memory_available_mib / 1024:.1f} free)"
        )
        if self.memory_limit_mib is not None:
            mem += f" limit {self.memory_limit_mib / 1024:.1f} GiB"
        flags = " ".join(f for f in _NOTABLE_FLAGS if f in self.cpu_flags)
        cpu = f"{self.arch or '?'} {cores} {mem}" + (f" [{flags}]" if flags else "")
        if self.gpus:
            gpu = ", ".join(
                f"{g.name} {g.memory_total_mib // 1024} GiB {g.compute_capability}"
                for g in self.gpus
            )
        else:
            gpu = f"none ({self.gpu_reason})"
        providers = ",".join(p.removesuffix("ExecutionProvider") for p in self.ort_providers)
        trt = f" TensorRT {self.tensorrt_version}" if self.tensorrt_version else ""
        return f"{cpu}; GPU: {gpu}; ORT: {providers}{trt}"


def probe() -> Hardware:
    """Look at this machine once. Never raises; absent parts come back empty with a reason."""
    vm = _safe(psutil.virtual_memory, None)
    model, flags = _cpuinfo()
    gpus, gpu_reason = _gpus()
    ort_version, providers = _ort()
    trt_version, trt_reason = _tensorrt()
    return Hardware(
        cores_logical=_safe(lambda: psutil.cpu_count(logical=True), None) or os.cpu_count() or 1,
        cores_physical=_safe(lambda: psutil.cpu_count(logical=False), None),
        memory_total_mib=vm.total // _MIB if vm else 0,
        memory_available_mib=vm.available // _MIB if vm else 0,
        memory_limit_mib=_cgroup_memory_limit_mib(vm.total if vm else None),
        arch=platform.machine(),
        cpu_model=model,
        cpu_flags=flags,
        gpus=gpus,
        gpu_reason=gpu_reason,
        ort_providers=providers,
        ort_version=ort_version,
        tensorrt_version=trt_version,
        tensorrt_reason=trt_reason,
        cuda_python=cuda_runtime_module() is not None,
    )


def utilisation() -> dict[str, Any]:
    """Current load for heartbeats: CPU percent, memory, and GPU utilisation where NVML reads.

    ``cpu_percent`` covers the time since the previous call (the first call in a
    process reports 0.0), so calling this once per heartbeat gives the heartbeat's average.
    """
    out: dict[str, Any] = {"cpu_percent": _safe(lambda: psutil.cpu_percent(interval=None), None)}
    vm = _safe(psutil.virtual_memory, None)
    if vm is not None:
        out["memory_total_mib"] = vm.total // _MIB
        out["memory_available_mib"] = vm.available // _MIB
        out["memory_percent"] = vm.percent
    with contextlib.suppress(OSError, AttributeError):
        out["load_avg_1m"] = os.getloadavg()[0]
    gpus, _reason = _gpus()
    if gpus:
        out["gpus"] = [
            {
                "index": g.index,
                "utilisation_percent": g.utilisation_percent,
                "memory_used_mib": g.memory_total_mib - g.memory_free_mib,
                "memory_total_mib": g.memory_total_mib,
            }
            for g in gpus
        ]
    return out


def cuda_runtime_module() -> ModuleType | None:
    """cuda-python's runtime API module (``cuda.bindings.runtime``, or ``cuda.cudart`` before 12.6)."""
    for name in ("cuda.bindings.runtime", "cuda.cudart"):
        try:
            return importlib.import_module(name)
        except Exception:  # an optional native package may fail in any way on import
            continue
    return None


def _safe(fn: Any, default: Any) -> Any:
    try:
        return fn()
    except Exception as e:  # probing must not take the agent down
        _log.debug("probe: %s failed: %s", getattr(fn, "__name__", fn), e)
        return default


def _cpuinfo(path: str = "/proc/cpuinfo") -> tuple[str, tuple[str, ...]]:
    """CPU model and flags from /proc/cpuinfo; elsewhere platform's model guess and no flags."""
    fields: dict[str, str] = {}
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            # First occurrence wins: that is processor 0, plus the board-wide "Model" and
            # "Hardware" lines ARM kernels print after the last processor block.
            for line in f:
                key, sep, value = line.partition(":")
                if sep:
                    fields.setdefault(key.strip().lower(), value.strip())
    except OSError:
        pass
    # x86 says "model name"; ARM boards say "Model" (whole board) or only "CPU part".
    model = (
        fields.get("model name")
        or fields.get("model")
        or fields.get("hardware")
        or platform.processor()
        or ""
    )
    flags = fields.get("flags") or fields.get("features") or ""
    return model, tuple(sorted(set(flags.split())))


_CGROUP_MEMORY_LIMITS = ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes")


def _cgroup_memory_limit_mib(
    physical: int | None, paths: tuple[str, ...] = _CGROUP_MEMORY_LIMITS
) -> int | None:
    # psutil reports the host's memory; inside a container the cgroup limit is what the
    # OOM killer enforces (v2 memory.max, v1 memory.limit_in_bytes, "unlimited" is huge).
    for path in paths:
        try:
            with open(path, encoding="ascii") as f:
                raw = f.read().strip()
        except OSError:
            continue
        if not raw.isdigit():
            return None
        limit = int(raw)
        if physical is not None and limit >= physical:
            return None
        return limit // _MIB
    return None


#: Why nvidia-ml-py could not be imported, once known. Python does not remember a failed
#: import, and every heartbeat asks (about 60 us of the event loop's time each).
_nvml_missing: str | None = None


def _import_nvml() -> tuple[Any, str]:
    """The ``pynvml`` module, or None and why not."""
    global _nvml_missing
    module = sys.modules.get("pynvml")
    if module is not None:
        return module, ""
    if _nvml_missing is not None:
        return None, _nvml_missing
    try:
        return importlib.import_module("pynvml"), ""
    except Exception as e:
        _nvml_missing = f"nvidia-ml-py is not installed ({type(e).__name__})"
        return None, _nvml_missing


def _gpus() -> tuple[tuple[GpuInfo, ...], str]:
    """NVIDIA GPUs via NVML, or () with the reason there are none."""
    pynvml, missing = _import_nvml()
    if pynvml is None:
        return (), missing
    try:
        pynvml.nvmlInit()
    except Exception as e:
        return (), f"NVML did not initialise (no NVIDIA driver?): {e}"
    try:
        count = int(pynvml.nvmlDeviceGetCount())
        gpus = tuple(_gpu(pynvml, i) for i in range(count))
    except Exception as e:
        return (), f"NVML could not list devices: {e}"
    finally:
        with contextlib.suppress(Exception):
            pynvml.nvmlShutdown()
    return gpus, "" if gpus else "NVML reports no devices"


def _gpu(pynvml: Any, index: int) -> GpuInfo:
    handle = pynvml.nvmlDeviceGetHandleByIndex(index)
    name = pynvml.nvmlDeviceGetName(handle)
    if isinstance(name, bytes):  # nvidia-ml-py < 11.5 returns bytes
        name = name.decode(errors="replace")
    mem = pynvml.nvmlDeviceGetMemoryInfo(handle)
    major, minor = pynvml.nvmlDeviceGetCudaComputeCapability(handle)
    util: int | None
    try:
        util = int(pynvml.nvmlDeviceGetUtilizationRates(handle).gpu)
    except Exception:  # MIG slices and some vGPUs do not report utilisation
        util = None
    return GpuInfo(
        index=index,
        name=str(name),
        memory_total_mib=int(mem.total) // _MIB,
        memory_free_mib=int(mem.free) // _MIB,
        compute_capability=f"sm_{major}{minor}",
        utilisation_percent=util,
    )


def _ort() -> tuple[str | None, tuple[str, ...]]:
    try:
        import onnxruntime
    except Exception as e:
        _log.warning("onnxruntime does not import: %s", e)
        return None, ()
    return onnxruntime.__version__, tuple(onnxruntime.get_available_providers())


def _tensorrt() -> tuple[str | None, str]:
    try:
        trt = importlib.import_module("tensorrt")
    except Exception as e:
        return None, f"tensorrt is not importable: {type(e).__name__}: {e}"
    return str(getattr(trt, "__version__", "unknown")), ""
