"""The example functions: real ONNX Runtime agrees with the fitted sklearn models, and every
graph keeps the contract the mesh relies on (names, dtypes, symbolic batch dim, no external
data, default domains only)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from fnmesh.functions.examples import build
from fnmesh.functions.examples.models import (
    EXAMPLE_NAMES,
    Example,
    build_example,
    sensor_windows,
)
from fnmesh.functions.manifest import split_function_id

Spec = dict[str, tuple[type[np.generic], list[int]]]

# name -> (inputs, outputs), each {tensor name: (numpy dtype, shape after the batch dim)},
# in graph order. This is the published contract; other packages hard-code these names.
CONTRACT: dict[str, tuple[Spec, Spec]] = {
    "digits": (
        {"image": (np.float32, [64])},
        {"label": (np.int64, []), "probabilities": (np.float32, [10])},
    ),
    "cancer": (
        {"features": (np.float32, [30])},
        {"label": (np.int64, []), "probabilities": (np.float32, [2])},
    ),
    "anomaly": (
        {"window": (np.float32, [96])},
        {"label": (np.int64, []), "score": (np.float32, [])},
    ),
    "mlp": (
        {"image": (np.float32, [64])},
        {"label": (np.int64, []), "probabilities": (np.float32, [10])},
    ),
}

# Observed float32-vs-float64 gaps are below 5e-7; 1e-5 leaves headroom for other CPUs
# and ORT kernels while still catching a wrong scaler, class order or score sign.
ATOL = 1e-5

_ORT_TYPES: dict[type[np.generic], str] = {np.float32: "tensor(float)", np.int64: "tensor(int64)"}


@pytest.fixture(scope="module")
def sessions() -> dict[str, ort.InferenceSession]:
    opts = ort.SessionOptions()
    # The suite shares a small box with others; one thread is plenty for 200 rows.
    opts.intra_op_num_threads = 1
    return {
        name: ort.InferenceSession(
            build_example(name).onnx_bytes, opts, providers=["CPUExecutionProvider"]
        )
        for name in EXAMPLE_NAMES
    }


def _run(session: ort.InferenceSession, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, inputs), strict=True))


def test_example_names_are_the_published_set() -> None:
    assert EXAMPLE_NAMES == ("digits", "cancer", "anomaly", "mlp")
    assert set(CONTRACT) == set(EXAMPLE_NAMES)


@pytest.mark.parametrize("name", EXAMPLE_NAMES)
def test_identity_and_regions(name: str) -> None:
    example = build_example(name)
    assert isinstance(example, Example)
    assert example.function_id == f"examples/{name}"
    assert split_function_id(example.function_id) == ("examples", name)
    assert example.version == "1.0.0"
    assert example.description
    assert example.regions == (("eu-west",) if name == "cancer" else ())


@pytest.mark.parametrize("name", EXAMPLE_NAMES)
def test_inputs_outputs_match_contract(
    name: str, sessions: dict[str, ort.InferenceSession]
) -> None:
    inputs, outputs = CONTRACT[name]
    session = sessions[name]
    for got, want in ((session.get_inputs(), inputs), (session.get_outputs(), outputs)):
        assert [arg.name for arg in got] == list(want)
        for arg in got:
            dtype, rest = want[arg.name]
            assert arg.type == _ORT_TYPES[dtype], arg.name
            assert arg.shape == ["N", *rest], arg.name


@pytest.mark.parametrize("name", EXAMPLE_NAMES)
def test_graph_is_self_contained_in_default_domains(name: str) -> None:
    model = onnx.load_from_string(build_example(name).onnx_bytes)
    onnx.checker.check_model(model, full_check=True)
    assert {o.domain for o in model.opset_import} <= {"", "ai.onnx.ml"}
    assert {n.domain for n in model.graph.node} <= {"", "ai.onnx.ml"}
    assert not model.functions
    assert not any(
        t.data_location == onnx.TensorProto.EXTERNAL or t.external_data
        for t in model.graph.initializer
    )
    # A ZipMap would turn probabilities into a sequence of maps.
    assert "ZipMap" not in {n.op_type for n in model.graph.node}
    for value in (*model.graph.input, *model.graph.output):
        assert value.type.HasField("tensor_type"), value.name
        assert value.type.tensor_type.shape.dim[0].dim_param == "N", value.name


@pytest.mark.parametrize("name", EXAMPLE_NAMES)
def test_onnx_agrees_with_sklearn(name: str, sessions: dict[str, ort.InferenceSession]) -> None:
    example = build_example(name)
    inputs = example.sample_inputs(200, seed=7)
    got = _run(sessions[name], inputs)
    want = example.reference(inputs)
    assert set(want) == set(got)
    for key, expected in want.items():
        assert got[key].dtype == expected.dtype, key
        assert got[key].shape == expected.shape, key
        if expected.dtype == np.int64:
            # Labels agree on every row, not just most of them.
            np.testing.assert_array_equal(got[key], expected, err_msg=key)
        else:
            np.testing.assert_allclose(got[key], expected, rtol=0, atol=ATOL, err_msg=key)


@pytest.mark.parametrize("name", EXAMPLE_NAMES)
def test_sample_inputs_have_the_contract_shape(name: str) -> None:
    inputs, _ = CONTRACT[name]
    sample = build_example(name).sample_inputs(5, seed=3)
    assert list(sample) == list(inputs)
    for key, (dtype, rest) in inputs.items():
        assert sample[key].dtype == dtype
        assert sample[key].shape == (5, *rest)
        assert np.isfinite(sample[key]).all()


@pytest.mark.parametrize("name", EXAMPLE_NAMES)
def test_sample_inputs_follow_the_seed(name: str) -> None:
    example = build_example(name)
    (key,) = CONTRACT[name][0]
    a = example.sample_inputs(20, seed=1)[key]
    np.testing.assert_array_equal(a, example.sample_inputs(20, seed=1)[key])
    assert not np.array_equal(a, example.sample_inputs(20, seed=2)[key])


def test_sample_of_nothing_refused() -> None:
    with pytest.raises(ValueError):
        build_example("digits").sample_inputs(0)


@pytest.mark.parametrize("name", EXAMPLE_NAMES)
def test_batch_of_one_matches_batch_of_64(
    name: str, sessions: dict[str, ort.InferenceSession]
) -> None:
    batch = build_example(name).sample_inputs(64, seed=11)
    many = _run(sessions[name], batch)
    one = _run(sessions[name], {k: v[:1] for k, v in batch.items()})
    for key, value in one.items():
        assert value.shape == (1, *many[key].shape[1:]), key
        np.testing.assert_allclose(value, many[key][:1], rtol=0, atol=ATOL, err_msg=key)


@pytest.mark.parametrize("name", ["digits", "cancer", "mlp"])
def test_probabilities_are_distributions(
    name: str, sessions: dict[str, ort.InferenceSession]
) -> None:
    out = _run(sessions[name], build_example(name).sample_inputs(100))
    probs = out["probabilities"]
    assert (probs >= 0).all()
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(out["label"], probs.argmax(axis=1))


def test_cancer_label_one_means_malignant() -> None:
    from sklearn.datasets import load_breast_cancer

    data = load_breast_cancer()
    example = build_example("cancer")
    out = example.reference({"features": data.data.astype(np.float32)})
    malignant = data.target == 0
    # A scorer with its classes swapped would score near 0 here, not near 1.
    assert (out["label"] == malignant).mean() > 0.95
    assert out["probabilities"][malignant, 1].mean() > 0.8


def test_anomaly_flags_an_injected_spike(sessions: dict[str, ort.InferenceSession]) -> None:
    windows, kinds = sensor_windows(np.random.default_rng(5), 50, anomaly_rate=0.0)
    assert (kinds == "").all()
    normal = _run(sessions["anomaly"], {"window": windows})
    spiked = windows.copy()
    spiked[:, 40] += 6.0  # one vibration reading, 6 g off
    faulty = _run(sessions["anomaly"], {"window": spiked})
    assert (normal["label"] == 1).mean() > 0.9
    assert (faulty["label"] == -1).all()
    assert (faulty["score"] < normal["score"]).all()


def test_anomaly_sample_shows_both_labels(sessions: dict[str, ort.InferenceSession]) -> None:
    out = _run(sessions["anomaly"], build_example("anomaly").sample_inputs(200))
    assert set(np.unique(out["label"])) == {-1, 1}
    np.testing.assert_array_equal(out["label"] == -1, out["score"] < 0)


@pytest.mark.parametrize(
    ("name", "metric", "floor"),
    [
        ("digits", "accuracy", 0.97),
        ("cancer", "accuracy", 0.95),
        ("cancer", "roc_auc", 0.98),
        ("mlp", "accuracy", 0.95),
        ("anomaly", "recall", 0.75),
        ("anomaly", "recall_spike", 0.95),
    ],
)
def test_held_out_quality(name: str, metric: str, floor: float) -> None:
    assert build_example(name).metrics[metric] >= floor


def test_anomaly_false_alarms_are_rare() -> None:
    assert build_example("anomaly").metrics["false_positive_rate"] <= 0.02


def test_unknown_example_refused() -> None:
    with pytest.raises(KeyError):
        build_example("nope")


@pytest.mark.parametrize("name", EXAMPLE_NAMES)
def test_rebuild_in_process_is_identical(name: str) -> None:
    # Bypass the cache: a second fit and conversion must give the same bytes.
    assert build_example.__wrapped__(name).onnx_bytes == build_example(name).onnx_bytes


def test_build_script_writes_loadable_files(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out_dir = tmp_path / "nested" / "out"
    assert build.main([str(out_dir)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == [f"examples/{n}" for n in EXAMPLE_NAMES]
    assert sorted(p.name for p in out_dir.iterdir()) == sorted(f"{n}.onnx" for n in EXAMPLE_NAMES)
    for name in EXAMPLE_NAMES:
        path = out_dir / f"{name}.onnx"
        assert path.read_bytes() == build_example(name).onnx_bytes
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        session.run(None, build_example(name).sample_inputs(1))


def test_build_script_only(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert build.main([str(tmp_path), "--only", "cancer"]) == 0
    assert [p.name for p in tmp_path.iterdir()] == ["cancer.onnx"]
    assert len(capsys.readouterr().out.splitlines()) == 1
    with pytest.raises(SystemExit):
        build.main([str(tmp_path), "--only", "nope"])


def test_build_is_reproducible_across_processes(tmp_path: Path) -> None:
    # A fresh interpreter with another hash seed: set-ordered or random names would show here.
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    cmd = [sys.executable, "-m", "fnmesh.functions.examples.build", str(tmp_path)]
    cmd += ["--only", "cancer", "--only", "anomaly"]
    subprocess.run(cmd, env=env, check=True, capture_output=True, timeout=120)
    for name in ("cancer", "anomaly"):
        assert (tmp_path / f"{name}.onnx").read_bytes() == build_example(name).onnx_bytes
