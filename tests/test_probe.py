"""The hardware probe: real on this machine, plus NVML faked where no GPU can answer."""

from __future__ import annotations

import json
import platform
import sys
from types import SimpleNamespace
from typing import Any

import pytest

from fnmesh.agent import probe as probe_mod
from fnmesh.agent.probe import GpuInfo, Hardware, probe, utilisation

HW = probe()


def test_probe_sees_this_machine() -> None:
    assert HW.cores_logical >= 1
    assert HW.cores_physical is None or 1 <= HW.cores_physical <= HW.cores_logical
    assert HW.memory_total_mib > 0
    assert 0 < HW.memory_available_mib <= HW.memory_total_mib
    assert HW.arch == platform.machine()
    assert "CPUExecutionProvider" in HW.ort_providers
    assert HW.ort_version


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/cpuinfo is Linux only")
def test_cpu_flags_read_from_proc_cpuinfo() -> None:
    assert HW.cpu_model
    assert HW.cpu_flags == tuple(sorted(HW.cpu_flags))
    if HW.arch == "x86_64":
        assert HW.has_flag("sse2")


def test_to_dict_is_json_and_summary_is_one_short_line() -> None:
    d = json.loads(json.dumps(HW.to_dict()))
    assert d["cores_logical"] == HW.cores_logical
    assert d["has_gpu"] is HW.has_gpu
    assert d["cpu_flags"] == list(HW.cpu_flags)
    summary = HW.summary()
    assert "\n" not in summary
    assert len(summary) < 300
    assert HW.arch in summary


@pytest.mark.skipif(HW.has_gpu, reason="this machine has a GPU")
def test_no_gpu_comes_back_empty_with_a_reason() -> None:
    assert HW.gpus == ()
    assert not HW.has_gpu
    assert HW.gpu_arch is None
    assert HW.gpu_reason
    assert HW.gpu_reason in HW.summary()


@pytest.mark.skipif(HW.tensorrt_version is not None, reason="tensorrt is importable here")
def test_missing_tensorrt_is_reported_not_raised() -> None:
    assert "not importable" in HW.tensorrt_reason


def test_utilisation_is_json_able() -> None:
    u = json.loads(json.dumps(utilisation()))
    assert "cpu_percent" in u
    assert u["memory_total_mib"] > 0
    assert 0 <= u["memory_percent"] <= 100


def test_gpu_properties_of_a_described_node() -> None:
    gpu = GpuInfo(0, "NVIDIA L4", 23034, 22000, "sm_89", 3)
    hw = Hardware(
        gpus=(gpu,),
        gpu_reason="",
        ort_providers=("CUDAExecutionProvider", "CPUExecutionProvider"),
        memory_total_mib=8192,
        memory_limit_mib=2048,
    )
    assert hw.has_gpu
    assert hw.gpu_arch == "sm_89"
    assert hw.gpu_providers == ("CUDAExecutionProvider",)
    assert hw.memory_usable_mib == 2048
    assert "NVIDIA L4" in hw.summary()
    assert json.loads(json.dumps(hw.to_dict()))["gpus"][0]["compute_capability"] == "sm_89"


ARM_CPUINFO = """\
processor\t: 0
BogoMIPS\t: 108.00
Features\t: fp asimd evtstrm crc32 cpuid
CPU implementer\t: 0x41
CPU part\t: 0xd08

processor\t: 1
BogoMIPS\t: 108.00
Features\t: fp asimd evtstrm crc32 cpuid

Hardware\t: BCM2835
Model\t\t: Raspberry Pi 4 Model B Rev 1.4
"""


def test_arm_cpuinfo_gives_board_model_and_features(tmp_path: Any) -> None:
    path = tmp_path / "cpuinfo"
    path.write_text(ARM_CPUINFO)
    model, flags = probe_mod._cpuinfo(str(path))
    assert model == "Raspberry Pi 4 Model B Rev 1.4"
    assert flags == ("asimd", "cpuid", "crc32", "evtstrm", "fp")


def test_unreadable_cpuinfo_is_not_an_error(tmp_path: Any) -> None:
    _model, flags = probe_mod._cpuinfo(str(tmp_path / "absent"))
    assert flags == ()


@pytest.mark.parametrize(
    ("content", "physical", "expected"),
    [
        ("536870912\n", 8 << 30, 512),  # a 512 MiB container
        ("max\n", 8 << 30, None),  # cgroup v2 unlimited
        ("9223372036854771712\n", 8 << 30, None),  # cgroup v1 "unlimited"
    ],
)
def test_cgroup_memory_limit(
    tmp_path: Any, content: str, physical: int, expected: int | None
) -> None:
    path = tmp_path / "memory.max"
    path.write_text(content)
    assert probe_mod._cgroup_memory_limit_mib(physical, (str(path),)) == expected


# --- NVML, faked: no NVIDIA GPU or driver exists on CI machines ---------------------------


class _NVMLError(Exception):
    pass


def _fake_pynvml(*, init_fails: bool = False, util_fails: bool = False) -> SimpleNamespace:
    calls: list[str] = []

    def init() -> None:
        calls.append("init")
        if init_fails:
            raise _NVMLError("Driver Not Loaded")

    def util(_h: Any) -> Any:
        if util_fails:
            raise _NVMLError("Not Supported")
        return SimpleNamespace(gpu=42, memory=7)

    return SimpleNamespace(
        calls=calls,
        NVMLError=_NVMLError,
        nvmlInit=init,
        nvmlShutdown=lambda: calls.append("shutdown"),
        nvmlDeviceGetCount=lambda: 2,
        nvmlDeviceGetHandleByIndex=lambda i: i,
        # nvidia-ml-py before 11.5 returned bytes; both must work.
        nvmlDeviceGetName=lambda h: b"Tesla T4" if h == 0 else "NVIDIA A10G",
        nvmlDeviceGetMemoryInfo=lambda h: SimpleNamespace(
            total=16 << 30, free=15 << 30, used=1 << 30
        ),
        nvmlDeviceGetCudaComputeCapability=lambda h: (7, 5) if h == 0 else (8, 6),
        nvmlDeviceGetUtilizationRates=util,
    )


def test_gpus_read_through_nvml(monkeypatch: pytest.MonkeyPatch) -> None:
    """NVML faked (no NVIDIA GPU on this machine): names, memory, sm_XY, utilisation."""
    fake = _fake_pynvml()
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    gpus, reason = probe_mod._gpus()
    assert reason == ""
    assert [g.name for g in gpus] == ["Tesla T4", "NVIDIA A10G"]
    assert [g.compute_capability for g in gpus] == ["sm_75", "sm_86"]
    assert gpus[0].memory_total_mib == 16384
    assert gpus[0].memory_free_mib == 15360
    assert gpus[0].utilisation_percent == 42
    assert fake.calls == ["init", "shutdown"]
    u = utilisation()
    assert [g["utilisation_percent"] for g in u["gpus"]] == [42, 42]


def test_missing_nvml_is_looked_for_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every heartbeat asks for GPUs; a library that is not installed is not searched again."""
    monkeypatch.delitem(sys.modules, "pynvml", raising=False)
    monkeypatch.setattr(probe_mod, "_nvml_missing", None)
    tries: list[str] = []

    def no_such_module(name: str) -> object:
        tries.append(name)
        raise ModuleNotFoundError(f"No module named {name!r}")

    monkeypatch.setattr(probe_mod.importlib, "import_module", no_such_module)
    for _ in range(3):
        gpus, reason = probe_mod._gpus()
        assert gpus == () and reason == "nvidia-ml-py is not installed (ModuleNotFoundError)"
    assert tries == ["pynvml"]
    # Installed later (a module put in place, as a test does): it is used.
    monkeypatch.setitem(sys.modules, "pynvml", _fake_pynvml())
    assert len(probe_mod._gpus()[0]) == 2


def test_gpu_without_utilisation_reading(monkeypatch: pytest.MonkeyPatch) -> None:
    """NVML faked (no NVIDIA GPU on this machine): MIG slices do not report utilisation."""
    monkeypatch.setitem(sys.modules, "pynvml", _fake_pynvml(util_fails=True))
    gpus, _ = probe_mod._gpus()
    assert [g.utilisation_percent for g in gpus] == [None, None]


def test_nvml_init_failure_is_a_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    """NVML faked (no NVIDIA GPU on this machine): installed library, no driver."""
    monkeypatch.setitem(sys.modules, "pynvml", _fake_pynvml(init_fails=True))
    hw = probe()
    assert hw.gpus == ()
    assert "Driver Not Loaded" in hw.gpu_reason
