"""Executors on real ONNX Runtime; TensorRT and CUDA only where a GPU exists."""

from __future__ import annotations

import os
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from fnmesh.agent.errors import (
    EngineCacheError,
    ExecutorError,
    InferenceError,
    UnsupportedHardwareError,
)
from fnmesh.agent.executors import Executor, OnnxExecutor, choose_providers, load_executor
from fnmesh.agent.executors.onnx import (
    CPU,
    CUDA,
    TENSORRT,
    load_onnx,
    prepared_form,
    provider_options,
)
from fnmesh.agent.executors.tensorrt import EngineCache, check_plan_fits
from fnmesh.agent.probe import GpuInfo, Hardware, probe
from fnmesh.functions.manifest import GpuRequirement, Manifest, Runtime

HW = probe()

gpu = pytest.mark.gpu
needs_gpu = pytest.mark.skipif(
    not HW.has_gpu, reason="no NVIDIA GPU on this machine (nvidia-ml-py/CUDA not available)"
)
needs_tensorrt = pytest.mark.skipif(
    HW.tensorrt_version is None or not HW.cuda_python, reason="tensorrt is not importable"
)
no_gpu_here = pytest.mark.skipif(HW.has_gpu, reason="this machine has a GPU")

RNG = np.random.default_rng(7)
W = RNG.standard_normal((4, 3)).astype(np.float32)
B = RNG.standard_normal(3).astype(np.float32)


def matmul_add_model(w: np.ndarray = W, b: np.ndarray = B) -> bytes:
    """Y = X @ W + B with a symbolic batch dimension "N"."""
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["X", "W"], ["XW"]),
            helper.make_node("Add", ["XW", "B"], ["Y"]),
        ],
        "matmul_add",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["N", w.shape[0]])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["N", w.shape[1]])],
        initializer=[numpy_helper.from_array(w, "W"), numpy_helper.from_array(b, "B")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    onnx.checker.check_model(model)
    return bytes(model.SerializeToString())


def make_manifest(
    *,
    gpu: str = "none",
    runtime: str = "onnx",
    gpu_arch: str | None = None,
    memory_mb: int = 0,
    inputs: tuple[tuple[str, str, tuple[Any, ...]], ...] = (("X", "float32", ("N", 4)),),
    outputs: tuple[tuple[str, str, tuple[Any, ...]], ...] = (("Y", "float32", ("N", 3)),),
    parameters: dict[str, str] | None = None,
) -> Manifest:
    now = datetime.now(UTC)
    return Manifest.model_validate(
        {
            "name": "test/matmul",
            "version": "1.0.0",
            "runtime": runtime,
            "inputs": [{"name": n, "dtype": d, "shape": s} for n, d, s in inputs],
            "outputs": [{"name": n, "dtype": d, "shape": s} for n, d, s in outputs],
            "requirements": {"gpu": gpu, "gpu_arch": gpu_arch, "memory_mb": memory_mb},
            "not_before": now - timedelta(days=1),
            "not_after": now + timedelta(days=1),
            "digests": {
                "plaintext": "a" * 64,
                "ciphertext": "b" * 64,
                "plaintext_size": 1,
                "nonce": "c" * 24,
            },
            "publisher": "test",
            "parameters": parameters or {},
        }
    )


# --- ONNX Runtime on CPU --------------------------------------------------------------------


def test_matmul_add_equals_numpy() -> None:
    model = matmul_add_model()
    ex = load_executor(model, make_manifest(), HW)
    assert isinstance(ex, Executor)
    assert ex.provider == CPU
    for batch in (1, 7):
        x = RNG.standard_normal((batch, 4)).astype(np.float32)
        out = ex.run({"X": x})
        assert set(out) == {"Y"}
        np.testing.assert_allclose(out["Y"], x @ W + B, rtol=1e-5, atol=1e-6)
    ex.close()


def test_logistic_regression_equals_sklearn() -> None:
    from skl2onnx import to_onnx
    from sklearn.datasets import load_digits
    from sklearn.linear_model import LogisticRegression

    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32)
    clf = LogisticRegression(max_iter=300).fit(x[:1200], y[:1200])
    onx = to_onnx(clf, x[:1], options={id(clf): {"zipmap": False}}, target_opset=17)
    manifest = make_manifest(
        inputs=(("X", "float32", ("N", 64)),),
        outputs=(("label", "int64", ("N",)), ("probabilities", "float32", ("N", 10))),
    )
    ex = load_executor(onx.SerializeToString(), manifest, HW)
    test = x[1200:]
    out = ex.run({"X": test})
    np.testing.assert_array_equal(out["label"], clf.predict(test))
    np.testing.assert_allclose(out["probabilities"], clf.predict_proba(test), atol=1e-5)


def test_model_is_never_written_to_disk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    ex = load_executor(matmul_add_model(), make_manifest(gpu="preferred"), HW)
    ex.run({"X": np.ones((2, 4), np.float32)})
    assert os.listdir(tmp_path) == []


def test_missing_and_unexpected_inputs_are_named() -> None:
    ex = load_executor(matmul_add_model(), make_manifest(), HW)
    with pytest.raises(InferenceError, match=r"missing input\(s\) X; unexpected input\(s\) x"):
        ex.run({"x": np.ones((1, 4), np.float32)})


def test_wrong_dtype_is_an_inference_error() -> None:
    ex = load_executor(matmul_add_model(), make_manifest(), HW)
    with pytest.raises(InferenceError, match=r"test/matmul@1\.0\.0"):
        ex.run({"X": np.ones((1, 4), np.float64)})


def test_garbage_model_is_an_executor_error() -> None:
    with pytest.raises(ExecutorError, match="ORT refused the model"):
        load_executor(b"not an onnx model", make_manifest(), HW)


def test_run_after_close_is_refused() -> None:
    ex = load_executor(matmul_add_model(), make_manifest(), HW)
    ex.close()
    with pytest.raises(ExecutorError, match="closed"):
        ex.run({"X": np.ones((1, 4), np.float32)})


def test_memory_estimate_and_declared_memory() -> None:
    model = matmul_add_model()
    estimated = load_executor(model, make_manifest(), HW)
    assert estimated.memory_bytes == 2 * len(model) + 4 * 1024 * 1024
    declared = load_executor(model, make_manifest(memory_mb=64), HW)
    assert declared.memory_bytes == 64 * 1024 * 1024


def test_session_uses_the_thread_count_asked_for() -> None:
    ex = load_executor(matmul_add_model(), make_manifest(), HW, intra_op_threads=2)
    assert isinstance(ex, OnnxExecutor)
    assert ex.load_seconds > 0


def test_concurrent_runs_from_threads_are_correct() -> None:
    ex = load_executor(matmul_add_model(), make_manifest(), HW)
    xs = [RNG.standard_normal((3, 4)).astype(np.float32) for _ in range(8)]
    results: dict[int, np.ndarray] = {}
    start = threading.Barrier(len(xs))

    def work(i: int) -> None:
        start.wait(timeout=5)
        for _ in range(20):
            results[i] = ex.run({"X": xs[i]})["Y"]

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(xs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=10)
    for i, x in enumerate(xs):
        np.testing.assert_allclose(results[i], x @ W + B, rtol=1e-5, atol=1e-6)


@no_gpu_here
def test_gpu_required_without_gpu_is_refused_with_the_reason() -> None:
    with pytest.raises(UnsupportedHardwareError) as info:
        load_executor(matmul_add_model(), make_manifest(gpu="required"), HW)
    assert isinstance(info.value, ExecutorError)
    assert "requires a GPU" in str(info.value)
    assert HW.gpu_reason in str(info.value)


@no_gpu_here
def test_gpu_preferred_without_gpu_runs_on_cpu() -> None:
    ex = load_executor(matmul_add_model(), make_manifest(gpu="preferred"), HW)
    assert ex.provider == CPU


# --- provider choice: a table over described nodes ------------------------------------------

_GPU = (GpuInfo(0, "NVIDIA L4", 23034, 22000, "sm_89", 0),)
NO_GPU = Hardware(gpu_reason="nvidia-ml-py is not installed")
NO_GPU_GPU_ORT = Hardware(gpu_reason="NVML did not initialise", ort_providers=(TENSORRT, CUDA, CPU))
GPU_CPU_ORT = Hardware(gpus=_GPU, gpu_reason="", ort_providers=(CPU,))
GPU_CUDA = Hardware(gpus=_GPU, gpu_reason="", ort_providers=(CUDA, CPU))
GPU_TRT = Hardware(gpus=_GPU, gpu_reason="", ort_providers=(TENSORRT, CUDA, CPU))

REFUSED = "refused"
_NAMES = {
    id(h): n
    for n, h in [
        ("no_gpu", NO_GPU),
        ("no_gpu_gpu_ort", NO_GPU_GPU_ORT),
        ("gpu_cpu_ort", GPU_CPU_ORT),
        ("gpu_cuda", GPU_CUDA),
        ("gpu_trt", GPU_TRT),
    ]
}


def _case_id(v: Any) -> str | None:
    if isinstance(v, Hardware):
        return _NAMES.get(id(v))
    return v if isinstance(v, str) else None


@pytest.mark.parametrize(
    ("requirement", "hardware", "expected"),
    [
        ("none", NO_GPU, [CPU]),
        ("none", GPU_CUDA, [CPU]),
        ("none", GPU_TRT, [CPU]),
        ("preferred", NO_GPU, [CPU]),
        ("preferred", NO_GPU_GPU_ORT, [CPU]),
        ("preferred", GPU_CPU_ORT, [CPU]),
        ("preferred", GPU_CUDA, [CUDA, CPU]),
        ("preferred", GPU_TRT, [TENSORRT, CUDA, CPU]),
        ("required", NO_GPU, REFUSED),
        ("required", NO_GPU_GPU_ORT, REFUSED),
        ("required", GPU_CPU_ORT, REFUSED),
        ("required", GPU_CUDA, [CUDA, CPU]),
        ("required", GPU_TRT, [TENSORRT, CUDA, CPU]),
    ],
    ids=_case_id,
)
def test_choose_providers(requirement: str, hardware: Hardware, expected: Any) -> None:
    if expected == REFUSED:
        with pytest.raises(UnsupportedHardwareError, match="requires a GPU"):
            choose_providers(requirement, hardware)
    else:
        assert choose_providers(GpuRequirement(requirement), hardware) == expected


def test_refusal_says_why() -> None:
    with pytest.raises(UnsupportedHardwareError, match="nvidia-ml-py is not installed"):
        choose_providers("required", NO_GPU)
    with pytest.raises(UnsupportedHardwareError, match="install onnxruntime-gpu"):
        choose_providers("required", GPU_CPU_ORT)


def test_tensorrt_provider_never_writes_plaintext_engines() -> None:
    opts = provider_options(TENSORRT)
    assert opts["trt_engine_cache_enable"] == "False"
    assert opts["trt_timing_cache_enable"] == "False"
    assert "trt_engine_cache_path" not in opts


# --- TensorRT plans: fitting them to the node -----------------------------------------------

TRT_NODE = Hardware(
    gpus=_GPU, gpu_reason="", ort_providers=(CPU,), tensorrt_version="10.9.0", cuda_python=True
)


@pytest.mark.parametrize(
    ("hardware", "gpu_arch", "error", "match"),
    [
        (NO_GPU, "sm_89", UnsupportedHardwareError, "needs an NVIDIA GPU"),
        (GPU_CUDA, "sm_89", UnsupportedHardwareError, "tensorrt"),
        (
            Hardware(gpus=_GPU, gpu_reason="", tensorrt_version="10.9.0"),
            "sm_89",
            UnsupportedHardwareError,
            "cuda-python",
        ),
        (TRT_NODE, None, ExecutorError, "states no gpu_arch"),
        (TRT_NODE, "sm_86", UnsupportedHardwareError, "built for sm_86.*is sm_89"),
    ],
)
def test_plan_for_another_node_is_refused(
    hardware: Hardware, gpu_arch: str | None, error: type[Exception], match: str
) -> None:
    manifest = make_manifest(runtime="tensorrt", gpu="required", gpu_arch=gpu_arch)
    with pytest.raises(error, match=match):
        check_plan_fits(manifest, hardware)


def test_plan_built_with_another_tensorrt_is_refused() -> None:
    manifest = make_manifest(
        runtime="tensorrt", gpu_arch="sm_89", parameters={"tensorrt_version": "8.6.1"}
    )
    with pytest.raises(UnsupportedHardwareError, match=r"TensorRT 8\.6\.1"):
        check_plan_fits(manifest, TRT_NODE)


def test_plan_that_fits() -> None:
    assert check_plan_fits(make_manifest(runtime="tensorrt", gpu_arch="sm_89"), TRT_NODE) == "sm_89"


@no_gpu_here
def test_tensorrt_plan_on_this_node_is_refused() -> None:
    manifest = make_manifest(runtime=Runtime.TENSORRT.value, gpu="required", gpu_arch="sm_89")
    with pytest.raises(UnsupportedHardwareError, match="needs an NVIDIA GPU"):
        load_executor(b"plan", manifest, HW)


def test_engine_cache_without_gpu_falls_back_to_onnx_runtime(tmp_path: Path) -> None:
    cache = EngineCache(tmp_path / "engines", os.urandom(32))
    ex = load_executor(matmul_add_model(), make_manifest(gpu="preferred"), NO_GPU, cache=cache)
    assert ex.provider == CPU
    assert not (tmp_path / "engines").exists()


# --- the encrypted engine cache -------------------------------------------------------------

ENGINE = b"TRT-ENGINE-PLAINTEXT-MARKER" + os.urandom(4096) + b"TRT-ENGINE-PLAINTEXT-MARKER"
IDENT = ("sha256-tree-256KiB:" + "a" * 64, "sm_89", "10.9.0")


def test_engine_cache_round_trip(tmp_path: Path) -> None:
    cache = EngineCache(tmp_path, os.urandom(32))
    assert cache.get(*IDENT) is None
    path = cache.put(*IDENT, ENGINE)
    assert path.parent == tmp_path
    assert cache.get(*IDENT) == ENGINE
    cache.discard(*IDENT)
    assert cache.get(*IDENT) is None


def test_no_plaintext_engine_on_disk(tmp_path: Path) -> None:
    cache = EngineCache(tmp_path, os.urandom(32))
    cache.put(*IDENT, ENGINE)
    cache.put(*IDENT, ENGINE)  # overwrite goes through a temporary file too
    files = list(tmp_path.iterdir())
    assert [f.name for f in files] == [EngineCache.entry_name(*IDENT)]
    for f in files:
        data = f.read_bytes()
        assert b"TRT-ENGINE-PLAINTEXT-MARKER" not in data
        assert ENGINE[27:4123] not in data
        assert f.stat().st_mode & 0o077 == 0


def test_wrong_key_refused(tmp_path: Path) -> None:
    EngineCache(tmp_path, os.urandom(32)).put(*IDENT, ENGINE)
    with pytest.raises(EngineCacheError, match="does not authenticate"):
        EngineCache(tmp_path, os.urandom(32)).get(*IDENT)


def test_bit_flip_in_cached_engine_refused(tmp_path: Path) -> None:
    cache = EngineCache(tmp_path, os.urandom(32))
    path = cache.put(*IDENT, ENGINE)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(EngineCacheError, match="does not authenticate"):
        cache.get(*IDENT)


def test_truncated_cached_engine_refused(tmp_path: Path) -> None:
    cache = EngineCache(tmp_path, os.urandom(32))
    path = cache.put(*IDENT, ENGINE)
    path.write_bytes(path.read_bytes()[:20])
    with pytest.raises(EngineCacheError, match="truncated"):
        cache.get(*IDENT)


def test_engine_copied_over_another_entry_refused(tmp_path: Path) -> None:
    cache = EngineCache(tmp_path, os.urandom(32))
    other = (IDENT[0], "sm_86", IDENT[2])
    cache.put(*IDENT, ENGINE)
    cache.put(*other, b"another engine")
    cache.path_for(*other).write_bytes(cache.path_for(*IDENT).read_bytes())
    with pytest.raises(EngineCacheError):
        cache.get(*other)


def test_entry_name_covers_model_arch_and_tensorrt_version() -> None:
    names = {
        EngineCache.entry_name(*IDENT),
        EngineCache.entry_name("sha256-tree-256KiB:" + "b" * 64, "sm_89", "10.9.0"),
        EngineCache.entry_name(IDENT[0], "sm_86", "10.9.0"),
        EngineCache.entry_name(IDENT[0], "sm_89", "10.8.0"),
    }
    assert len(names) == 4


def test_engine_cache_key_must_be_256_bits_and_stays_out_of_repr(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        EngineCache(tmp_path, b"short")
    key = os.urandom(32)
    assert key.hex() not in repr(EngineCache(tmp_path, key))


# --- on a GPU node ---------------------------------------------------------------------------


@gpu
@needs_gpu
def test_gpu_required_runs_on_a_gpu_provider() -> None:
    ex = load_executor(matmul_add_model(), make_manifest(gpu="required"), HW)
    assert ex.provider in (TENSORRT, CUDA)
    x = RNG.standard_normal((5, 4)).astype(np.float32)
    np.testing.assert_allclose(ex.run({"X": x})["Y"], x @ W + B, rtol=1e-3, atol=1e-3)


@gpu
@needs_tensorrt
@needs_gpu
def test_tensorrt_plan_equals_numpy_and_cache_is_reused(tmp_path: Path) -> None:
    from fnmesh.agent.executors.tensorrt import TensorRTPlanExecutor, build_plan

    manifest = make_manifest(gpu="required", runtime="tensorrt", gpu_arch=HW.gpu_arch)
    plan = build_plan(matmul_add_model(), manifest)
    ex = load_executor(plan, manifest, HW)
    assert isinstance(ex, TensorRTPlanExecutor)
    for batch in (1, 9):
        x = RNG.standard_normal((batch, 4)).astype(np.float32)
        np.testing.assert_allclose(ex.run({"X": x})["Y"], x @ W + B, rtol=1e-3, atol=1e-3)
    ex.close()

    cache = EngineCache(tmp_path, os.urandom(32))
    onnx_manifest = make_manifest(gpu="required")
    first = load_executor(matmul_add_model(), onnx_manifest, HW, cache=cache)
    assert isinstance(first, TensorRTPlanExecutor)
    assert len(list(tmp_path.iterdir())) == 1
    second = load_executor(matmul_add_model(), onnx_manifest, HW, cache=cache)
    x = RNG.standard_normal((3, 4)).astype(np.float32)
    np.testing.assert_allclose(second.run({"X": x})["Y"], x @ W + B, rtol=1e-3, atol=1e-3)
    first.close()
    second.close()


@gpu
@needs_tensorrt
@needs_gpu
def test_plan_for_another_architecture_refused_on_this_gpu() -> None:
    other = "sm_50" if HW.gpu_arch != "sm_50" else "sm_52"
    manifest = make_manifest(gpu="required", runtime="tensorrt", gpu_arch=other)
    with pytest.raises(UnsupportedHardwareError, match=f"built for {other}"):
        load_executor(b"plan", manifest, HW)


# --- the prepared form (ORT's optimised graph, sealed by the bundle cache) ------------------


def test_prepared_form_loads_to_the_same_answers_and_only_here() -> None:
    from fnmesh.functions.examples.models import build_example

    example = build_example("mlp")
    name = next(iter(example.sample_inputs(1, seed=0)))
    m = make_manifest(
        inputs=((name, "float32", ("N", example.sample_inputs(1, seed=0)[name].shape[1])),),
        outputs=(),
    )
    made = load_onnx(example.onnx_bytes, m, HW, prepare=True)
    assert made.form == ""
    prepared = made.take_prepared()
    assert prepared and made.take_prepared() is None, "the prepared form is handed over once"
    onnx.load_from_string(prepared)  # a well-formed model
    form = prepared_form(m, HW)
    again = load_onnx(prepared, m, HW, form=form)
    assert again.form == form
    x = example.sample_inputs(16, seed=3)
    for a, b in zip(made.run(x).values(), again.run(x).values(), strict=True):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ExecutorError, match="cannot load"):
        load_onnx(prepared, m, HW, form=form.replace(ort.__version__, "0.0.1"))


def test_prepared_form_names_the_runtime_and_the_cpu() -> None:
    m = make_manifest()
    plain = Hardware(arch="x86_64", cpu_flags=("avx2", "fma"))
    wider = Hardware(arch="x86_64", cpu_flags=("avx2", "avx512f", "fma"))
    form = prepared_form(m, plain)
    assert ort.__version__ in form and "x86_64" in form
    assert form != prepared_form(m, wider), "another CPU needs its own prepared form"
    # GPU providers are not prepared; a CPU-only function on a GPU node is.
    assert prepared_form(make_manifest(gpu="preferred"), GPU_CUDA) == ""
    assert prepared_form(make_manifest(gpu="required"), NO_GPU) == ""
    assert prepared_form(make_manifest(gpu="none"), GPU_CUDA) != ""


def test_preparing_writes_nothing_to_disk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    ex = load_onnx(matmul_add_model(), make_manifest(), HW, prepare=True)
    assert ex.take_prepared()
    assert os.listdir(tmp_path) == []


def test_a_session_without_packed_weights_answers_the_same_and_packs_later() -> None:
    from fnmesh.functions.examples.models import build_example

    example = build_example("mlp")
    x = example.sample_inputs(64, seed=4)
    name = next(iter(x))
    m = make_manifest(inputs=((name, "float32", ("N", x[name].shape[1])),), outputs=())
    packed = load_onnx(example.onnx_bytes, m, HW)
    quick = load_onnx(example.onnx_bytes, m, HW, prepack=False)
    assert not packed.deferred and quick.deferred
    want = packed.run(x)
    for a, b in zip(want.values(), quick.run(x).values(), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)

    # Runs keep going, and stay right, while the packed session is built and swapped in.
    errors: list[BaseException] = []
    stop = threading.Event()

    def runner() -> None:
        while not stop.is_set():
            try:
                for a, b in zip(want.values(), quick.run(x).values(), strict=True):
                    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
            except BaseException as e:  # handed to the test thread
                errors.append(e)
                return

    threads = [threading.Thread(target=runner) for _ in range(2)]
    for t in threads:
        t.start()
    quick.finish_load()
    stop.set()
    for t in threads:
        t.join(10)
    assert not errors, errors[0]
    assert not quick.deferred
    for a, b in zip(want.values(), quick.run(x).values(), strict=True):
        np.testing.assert_array_equal(a, b)

    # Closed first: finishing does not bring the session back.
    late = load_onnx(example.onnx_bytes, m, HW, prepack=False)
    late.close()
    late.finish_load()
    with pytest.raises(ExecutorError, match="closed"):
        late.run(x)
