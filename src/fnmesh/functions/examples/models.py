"""The example functions: small real models, trained at build time and exported to ONNX.

Every model is fitted on data that ships with scikit-learn (``load_digits``,
``load_breast_cancer``) or that this module generates, with fixed seeds, so a
build is reproducible and needs no network. Every graph promises:

- a symbolic first (batch) dimension named ``"N"`` on every input and output,
  the other dimensions fixed;
- plain tensor outputs (no ZipMap), named as documented per example;
- only the default domains (``""`` and ``"ai.onnx.ml"``) and no external data.

The examples:

``examples/digits``
    8x8 handwritten-digit classifier (standardise + MLP, 32 hidden units).
    In ``image`` float32 [N, 64], pixels 0..16 as in ``load_digits``.
    Out ``label`` int64 [N], ``probabilities`` float32 [N, 10].
``examples/cancer``
    Breast-cancer risk scorer (standardise + logistic regression), residency
    ``("eu-west",)``. In ``features`` float32 [N, 30], the columns of
    ``load_breast_cancer``. Out ``label`` int64 [N] with **1 = malignant**,
    0 = benign (the reverse of the dataset's own coding, so that the positive
    class is the risk), and ``probabilities`` float32 [N, 2]; column 1 is the
    malignancy risk.
``examples/anomaly``
    Sensor anomaly detector (window features + IsolationForest) on generated
    machine telemetry. In ``window`` float32 [N, 96]: 32 readings each of
    temperature, vibration and pressure, sensor-major (``[:, 0:32]`` is
    temperature). Out ``label`` int64 [N], 1 normal / -1 anomaly as sklearn's
    ``predict``, and ``score`` float32 [N], sklearn's ``decision_function``
    (negative means anomalous). skl2onnx emits both as [N, 1]; the graph
    flattens them.
``examples/mlp``
    A deliberately heavy digits MLP (64-672-672-10, about 2 MB) for
    benchmarks: one sample costs about 40 us in ONNX Runtime on one core
    (``intra_op_num_threads=1``; measured on the 2-core development box).
    In ``image`` float32 [N, 64]. Out ``label`` int64 [N], ``probabilities``
    float32 [N, 10].
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

# sklearn, skl2onnx and threadpoolctl are imported inside the builders, so that importing
# this module for its names and types stays cheap.

#: The example names, in build order; ``examples/<name>`` is the function id.
EXAMPLE_NAMES: tuple[str, ...] = ("digits", "cancer", "anomaly", "mlp")

NAMESPACE = "examples"
VERSION = "1.0.0"
BATCH_DIM = "N"

# Opset 17 / ai.onnx.ml 3 cover every op these graphs use and still load on the
# oldest onnxruntime the project accepts (1.20), which edge devices may run.
TARGET_OPSET: Mapping[str, int] = MappingProxyType({"": 17, "ai.onnx.ml": 3})

#: Sensors in an ``examples/anomaly`` window, in input order.
SENSORS: tuple[str, ...] = ("temperature", "vibration", "pressure")
#: Readings per sensor in one window.
WINDOW = 32

_SEED = 0

Inputs = dict[str, np.ndarray]


@dataclass(frozen=True)
class Example:
    """One example function: its ONNX graph plus what is needed to feed and check it."""

    function_id: str
    version: str
    onnx_bytes: bytes
    description: str
    regions: tuple[str, ...]
    #: Held-out quality of the fitted model, e.g. ``{"accuracy": 0.98}``; informational.
    metrics: Mapping[str, float] = field(default_factory=dict, compare=False)
    _sample: Callable[[int, int], Inputs] = field(kw_only=True, repr=False, compare=False)
    _reference: Callable[[Inputs], Inputs] = field(kw_only=True, repr=False, compare=False)

    def sample_inputs(self, n: int, seed: int = 0) -> dict[str, np.ndarray]:
        """``n`` input rows (real dataset rows or generated windows) ready for the graph."""
        if n < 1:
            raise ValueError(f"n must be at least 1, not {n}")
        return self._sample(n, seed)

    def reference(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The fitted sklearn model's outputs for ``inputs``, named and typed as in ONNX."""
        return self._reference(inputs)


@functools.cache
def build_example(name: str) -> Example:
    """Train and export the example ``name`` (one of ``EXAMPLE_NAMES``); cached per process."""
    if name not in _BUILDERS:
        raise KeyError(f"no example {name!r}; choose from {', '.join(EXAMPLE_NAMES)}")
    from threadpoolctl import threadpool_limits

    # One BLAS thread: these fits are too small to gain from more, a busy host made
    # multi-threaded training 4x slower, and results cannot vary with the core count.
    with threadpool_limits(limits=1):
        return _BUILDERS[name]()


def build_all() -> dict[str, Example]:
    """Every example, keyed by name."""
    return {name: build_example(name) for name in EXAMPLE_NAMES}


# --- shared helpers ---------------------------------------------------------------------------


def _rows(pool: np.ndarray, n: int, seed: int) -> np.ndarray:
    """``n`` rows of ``pool`` picked by ``seed``; rows repeat only when ``n`` exceeds the pool."""
    rng = np.random.default_rng(seed)
    idx = rng.choice(len(pool), size=n, replace=n > len(pool))
    return np.ascontiguousarray(pool[idx], dtype=np.float32)


def _frozen(a: np.ndarray) -> np.ndarray:
    # Cached datasets are shared by every caller in the process; make mutation loud.
    a.setflags(write=False)
    return a


def _convert(
    estimator: Any,
    classifier: Any | None,
    input_name: str,
    n_features: int,
    outputs: list[tuple[str, Any]] | None,
) -> onnx.ModelProto:
    """skl2onnx conversion with our input and output names; ``classifier`` loses its ZipMap."""
    from skl2onnx import convert_sklearn
    from skl2onnx.common.data_types import FloatTensorType

    model: onnx.ModelProto = convert_sklearn(
        estimator,
        initial_types=[(input_name, FloatTensorType([None, n_features]))],
        final_types=outputs,
        options={} if classifier is None else {id(classifier): {"zipmap": False}},
        target_opset=dict(TARGET_OPSET),
        # Its identity-removal pass is quadratic; _drop_identities does it in one pass.
        model_optim=False,
    )
    _drop_identities(model.graph)
    return model


def _classifier_outputs(n_classes: int) -> list[tuple[str, Any]]:
    from skl2onnx.common.data_types import FloatTensorType, Int64TensorType

    return [
        ("label", Int64TensorType([None])),
        ("probabilities", FloatTensorType([None, n_classes])),
    ]


def _finalize(model: onnx.ModelProto, function_id: str, description: str) -> bytes:
    """Name the batch dimension, stamp identity, validate, serialise.

    The bytes depend only on the fitted model: skl2onnx names graphs with a
    random UUID and lists opsets in set order, so both are pinned here.
    """
    model.graph.name = function_id.replace("/", "_")
    opsets = sorted((o.domain, o.version) for o in model.opset_import)
    del model.opset_import[:]
    model.opset_import.extend(helper.make_opsetid(domain, v) for domain, v in opsets)
    for value in (*model.graph.input, *model.graph.output):
        value.type.tensor_type.shape.dim[0].dim_param = BATCH_DIM
    model.doc_string = description
    helper.set_model_props(model, {"fnmesh.function_id": function_id, "fnmesh.version": VERSION})
    onnx.checker.check_model(model, full_check=True)
    return bytes(model.SerializeToString())


def _classifier_reference(model: Any, input_name: str) -> Callable[[Inputs], Inputs]:
    def reference(inputs: Inputs) -> Inputs:
        x = np.asarray(inputs[input_name], dtype=np.float32)
        return {
            "label": np.asarray(model.predict(x), dtype=np.int64),
            "probabilities": np.asarray(model.predict_proba(x), dtype=np.float32),
        }

    return reference


@functools.lru_cache(maxsize=1)
def _digits_split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    parts = train_test_split(x, y, test_size=0.25, random_state=_SEED, stratify=y)
    return tuple(_frozen(p) for p in parts)  # type: ignore[return-value]


@functools.lru_cache(maxsize=1)
def _digits_images() -> np.ndarray:
    from sklearn.datasets import load_digits

    return _frozen(np.asarray(load_digits().data))


def _digits_rows(n: int, seed: int) -> Inputs:
    return {"image": _rows(_digits_images(), n, seed)}


# --- examples/digits --------------------------------------------------------------------------


def _build_digits() -> Example:
    from sklearn.neural_network import MLPClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x_train, x_test, y_train, y_test = _digits_split()
    # alpha=1.0 was the best of a small cross-validated grid (97.9 % CV accuracy);
    # 32 hidden units is enough, more did not help.
    mlp = MLPClassifier(hidden_layer_sizes=(32,), alpha=1.0, max_iter=1000, random_state=_SEED)
    model = make_pipeline(StandardScaler(), mlp).fit(x_train, y_train)
    function_id = f"{NAMESPACE}/digits"
    description = (
        "Handwritten digit (8x8, pixels 0..16) to label 0-9 and class probabilities; "
        "standardise + MLP(32) trained on scikit-learn's digits."
    )
    onx = _convert(model, mlp, "image", 64, _classifier_outputs(10))
    return Example(
        function_id=function_id,
        version=VERSION,
        onnx_bytes=_finalize(onx, function_id, description),
        description=description,
        regions=(),
        metrics=MappingProxyType({"accuracy": float(model.score(x_test, y_test))}),
        _sample=_digits_rows,
        _reference=_classifier_reference(model, "image"),
    )


# --- examples/cancer --------------------------------------------------------------------------


def _build_cancer() -> Example:
    from sklearn.datasets import load_breast_cancer
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import train_test_split
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    data = load_breast_cancer()
    features = _frozen(np.asarray(data.data))
    # The dataset codes malignant as 0; a risk scorer's positive class is the risk.
    malignant = (data.target == 0).astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(
        features, malignant, test_size=0.25, random_state=_SEED, stratify=malignant
    )
    clf = LogisticRegression(max_iter=1000)
    model = make_pipeline(StandardScaler(), clf).fit(x_train, y_train)
    function_id = f"{NAMESPACE}/cancer"
    description = (
        "Breast-cancer risk from 30 cell-nucleus measurements (load_breast_cancer columns): "
        "label 1 = malignant, 0 = benign; probabilities[:, 1] is the malignancy risk. "
        "Standardise + logistic regression. Patient data: stays in eu-west."
    )
    onx = _convert(model, clf, "features", features.shape[1], _classifier_outputs(2))
    risk = model.predict_proba(x_test)[:, 1]
    return Example(
        function_id=function_id,
        version=VERSION,
        onnx_bytes=_finalize(onx, function_id, description),
        description=description,
        regions=("eu-west",),
        metrics=MappingProxyType(
            {
                "accuracy": float(model.score(x_test, y_test)),
                "roc_auc": float(roc_auc_score(y_test, risk)),
            }
        ),
        _sample=lambda n, seed: {"features": _rows(features, n, seed)},
        _reference=_classifier_reference(model, "features"),
    )


# --- examples/anomaly -------------------------------------------------------------------------

#: Kinds of fault injected into generated windows.
ANOMALY_KINDS: tuple[str, ...] = ("spike", "drift", "burst", "dropout")

# Typical swing of each sensor (degC, g, bar): faults are sized in these units, so a
# spike means the same thing on a 50 degC reading as on a 3 bar one.
_SENSOR_SCALE = np.array([1.0, 1.0, 0.1])
_FEATURES_PER_SENSOR = 6  # mean, std, peak deviation, largest step, mean step, slope


def sensor_windows(
    rng: np.random.Generator, n: int, anomaly_rate: float
) -> tuple[np.ndarray, np.ndarray]:
    """``n`` generated telemetry windows, float32 [n, 96], and each one's fault (``""`` = none).

    Normal machines run at a random operating point: temperature 40-60 degC with
    a slow swing, vibration a 0.2-0.3 cycles/sample hum of about 1 g, pressure
    near 3 bar, all with sensor noise. A fault hits one sensor: a ``spike``
    (one wild reading), a ``drift`` (a ramp), a ``burst`` (extra noise for half
    the window) or a ``dropout`` (the sensor reads 0 from some point on).
    """
    t = np.arange(WINDOW, dtype=np.float64)
    phase = rng.uniform(0, 2 * np.pi, size=(n, 2))
    temperature = (
        rng.uniform(40, 60, size=(n, 1))
        + 0.5 * np.sin(2 * np.pi * rng.uniform(0.5, 1.5, size=(n, 1)) * t / WINDOW + phase[:, :1])
        + rng.normal(0, 0.1, size=(n, WINDOW))
    )
    vibration = rng.uniform(0.8, 1.2, size=(n, 1)) * np.sin(
        2 * np.pi * rng.uniform(0.2, 0.3, size=(n, 1)) * t + phase[:, 1:]
    ) + rng.normal(0, 0.1, size=(n, WINDOW))
    pressure = rng.normal(3.0, 0.05, size=(n, 1)) + rng.normal(0, 0.02, size=(n, WINDOW))
    x = np.stack([temperature, vibration, pressure], axis=1)

    kinds = np.full(n, "", dtype=object)
    for i in np.flatnonzero(rng.random(n) < anomaly_rate):
        kind = ANOMALY_KINDS[rng.integers(len(ANOMALY_KINDS))]
        s = rng.integers(len(SENSORS))
        scale = _SENSOR_SCALE[s]
        sign = rng.choice([-1.0, 1.0])
        if kind == "spike":
            x[i, s, rng.integers(WINDOW)] += sign * rng.uniform(3, 6) * scale
        elif kind == "drift":
            x[i, s] += sign * rng.uniform(2, 4) * scale * t / (WINDOW - 1)
        elif kind == "burst":
            start = rng.integers(WINDOW // 2)
            x[i, s, start : start + WINDOW // 2] += rng.normal(0, 0.6 * scale, size=WINDOW // 2)
        else:
            x[i, s, rng.integers(WINDOW // 4, 3 * WINDOW // 4) :] = 0.0
        kinds[i] = kind
    return x.reshape(n, -1).astype(np.float32), kinds


def window_features(windows: np.ndarray) -> np.ndarray:
    """The detector's features of [n, 96] windows: [n, 18], sensor-major.

    Per sensor: mean, std, peak |x - mean|, largest and mean |step| between
    readings, least-squares slope. The ONNX graph computes the same in float32;
    this is the reference.
    """
    x = np.asarray(windows, dtype=np.float64).reshape(-1, len(SENSORS), WINDOW)
    mean = x.mean(axis=2, keepdims=True)
    centred = x - mean
    std = np.sqrt((centred**2).mean(axis=2, keepdims=True))
    peak = np.abs(centred).max(axis=2, keepdims=True)
    steps = np.abs(np.diff(x, axis=2))
    slope = centred @ _slope_weights()
    feats = np.concatenate(
        [
            mean,
            std,
            peak,
            steps.max(axis=2, keepdims=True),
            steps.mean(axis=2, keepdims=True),
            slope,
        ],
        axis=2,
    )
    return feats.reshape(len(x), -1)


def _slope_weights() -> np.ndarray:
    """Least-squares slope per reading as a [WINDOW, 1] projection of centred readings."""
    t = np.arange(WINDOW, dtype=np.float64) - (WINDOW - 1) / 2
    return (t / (t @ t)).reshape(WINDOW, 1)


def _feature_nodes() -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    """ONNX nodes turning ``window`` [N, 96] into ``features`` [N, 18], as ``window_features``."""
    k = len(SENSORS)
    init = [
        numpy_helper.from_array(np.array([-1, k, WINDOW], dtype=np.int64), "win_shape3"),
        numpy_helper.from_array(np.array([-1, k * _FEATURES_PER_SENSOR], np.int64), "win_flat"),
        numpy_helper.from_array(_slope_weights().astype(np.float32), "win_slope_w"),
        numpy_helper.from_array(np.array([1], dtype=np.int64), "win_one"),
        numpy_helper.from_array(np.array([0], dtype=np.int64), "win_zero"),
        numpy_helper.from_array(np.array([WINDOW], dtype=np.int64), "win_len"),
        numpy_helper.from_array(np.array([WINDOW - 1], dtype=np.int64), "win_len_1"),
        numpy_helper.from_array(np.array([2], dtype=np.int64), "win_axis2"),
    ]

    def node(op: str, inputs: list[str], output: str, **attrs: Any) -> onnx.NodeProto:
        return helper.make_node(op, inputs, [output], name=f"win_{output}", **attrs)

    nodes = [
        node("Reshape", ["window", "win_shape3"], "w_x"),
        node("ReduceMean", ["w_x"], "w_mean", axes=[2], keepdims=1),
        node("Sub", ["w_x", "w_mean"], "w_centred"),
        node("Mul", ["w_centred", "w_centred"], "w_sq"),
        node("ReduceMean", ["w_sq"], "w_var", axes=[2], keepdims=1),
        node("Sqrt", ["w_var"], "w_std"),
        node("Abs", ["w_centred"], "w_abs"),
        node("ReduceMax", ["w_abs"], "w_peak", axes=[2], keepdims=1),
        node("Slice", ["w_x", "win_one", "win_len", "win_axis2"], "w_next"),
        node("Slice", ["w_x", "win_zero", "win_len_1", "win_axis2"], "w_prev"),
        node("Sub", ["w_next", "w_prev"], "w_diff"),
        node("Abs", ["w_diff"], "w_absdiff"),
        node("ReduceMax", ["w_absdiff"], "w_step", axes=[2], keepdims=1),
        node("ReduceMean", ["w_absdiff"], "w_rough", axes=[2], keepdims=1),
        node("MatMul", ["w_centred", "win_slope_w"], "w_slope"),
        node(
            "Concat",
            ["w_mean", "w_std", "w_peak", "w_step", "w_rough", "w_slope"],
            "w_feats",
            axis=2,
        ),
        node("Reshape", ["w_feats", "win_flat"], "features"),
    ]
    return nodes, init


def _drop_identities(graph: onnx.GraphProto) -> None:
    """Remove Identity nodes in one pass, rewiring their consumers to the source.

    Converting without skl2onnx's own optimiser (``model_optim=False``) leaves
    many Identity nodes; its optimiser is quadratic and took seconds here.
    """
    outputs = {o.name for o in graph.output}
    alias: dict[str, str] = {}
    kept = []
    for node in graph.node:  # topologically sorted, so a chain resolves as we go
        for i, name in enumerate(node.input):
            node.input[i] = alias.get(name, name)
        if node.op_type == "Identity" and node.output[0] not in outputs:
            alias[node.output[0]] = node.input[0]
        else:
            kept.append(node)
    del graph.node[:]
    graph.node.extend(kept)


def _rename_value(graph: onnx.GraphProto, old: str, new: str) -> None:
    """Rename a value everywhere it is produced or consumed in ``graph``."""
    for node in graph.node:
        for names in (node.input, node.output):
            for i, name in enumerate(names):
                if name == old:
                    names[i] = new
    for value in (*graph.output, *graph.value_info):
        if value.name == old:
            value.name = new


def _build_anomaly() -> Example:
    from sklearn.ensemble import IsolationForest

    contamination = 0.03
    windows, _ = sensor_windows(np.random.default_rng(_SEED), 2000, contamination)
    # 50 trees, not sklearn's 100: recall is within a few points, and skl2onnx's
    # conversion time grows faster than linearly in the number of trees.
    forest = IsolationForest(n_estimators=50, contamination=contamination, random_state=_SEED)
    forest.fit(window_features(windows))

    n_features = len(SENSORS) * _FEATURES_PER_SENSOR
    forest_onnx = _convert(forest, None, "features", n_features, None)
    # skl2onnx names its [N, 1] outputs "label" and "scores"; free those names for ours.
    _rename_value(forest_onnx.graph, "label", "forest_label")
    _rename_value(forest_onnx.graph, "scores", "forest_score")
    feat_nodes, feat_init = _feature_nodes()
    flat = numpy_helper.from_array(np.array([-1], dtype=np.int64), "out_flat")
    post = [
        helper.make_node("Reshape", ["forest_label", "out_flat"], ["label"], name="out_label"),
        helper.make_node("Reshape", ["forest_score", "out_flat"], ["score"], name="out_score"),
    ]
    fg = forest_onnx.graph
    graph = helper.make_graph(
        [*feat_nodes, *fg.node, *post],
        "anomaly",
        [helper.make_tensor_value_info("window", TensorProto.FLOAT, [None, len(SENSORS) * WINDOW])],
        [
            helper.make_tensor_value_info("label", TensorProto.INT64, [None]),
            helper.make_tensor_value_info("score", TensorProto.FLOAT, [None]),
        ],
        initializer=[*feat_init, *fg.initializer, flat],
    )
    model = helper.make_model(
        graph,
        opset_imports=list(forest_onnx.opset_import),
        ir_version=forest_onnx.ir_version,
        producer_name=forest_onnx.producer_name,
        producer_version=forest_onnx.producer_version,
    )

    # Held-out check on fresh windows with more faults, so per-kind recall means something.
    test_x, test_kinds = sensor_windows(np.random.default_rng(_SEED + 1), 4000, 0.2)
    flagged = forest.predict(window_features(test_x)) == -1
    normal = test_kinds == ""
    metrics = {"false_positive_rate": float(flagged[normal].mean())}
    metrics["recall"] = float(flagged[~normal].mean())
    for kind in ANOMALY_KINDS:
        metrics[f"recall_{kind}"] = float(flagged[test_kinds == kind].mean())

    def reference(inputs: Inputs) -> Inputs:
        feats = window_features(inputs["window"])
        return {
            "label": np.asarray(forest.predict(feats), dtype=np.int64),
            "score": np.asarray(forest.decision_function(feats), dtype=np.float32),
        }

    function_id = f"{NAMESPACE}/anomaly"
    description = (
        "Machine-telemetry anomaly detector: a window of 32 temperature, vibration and "
        "pressure readings (sensor-major, [N, 96]) to label 1 normal / -1 anomaly and "
        "score (IsolationForest decision_function; negative = anomalous)."
    )
    return Example(
        function_id=function_id,
        version=VERSION,
        onnx_bytes=_finalize(model, function_id, description),
        description=description,
        regions=(),
        metrics=MappingProxyType(metrics),
        # 10 % faults so a modest sample shows both labels.
        _sample=lambda n, seed: {"window": sensor_windows(np.random.default_rng(seed), n, 0.1)[0]},
        _reference=reference,
    )


# --- examples/mlp -----------------------------------------------------------------------------

#: Hidden layers of ``examples/mlp``, sized so one sample costs about 40 us on one core.
MLP_HIDDEN: tuple[int, ...] = (672, 672)


def _build_mlp() -> Example:
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.neural_network import MLPClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x_train, x_test, y_train, y_test = _digits_split()
    mlp = MLPClassifier(hidden_layer_sizes=MLP_HIDDEN, max_iter=6, random_state=_SEED)
    with warnings.catch_warnings():
        # A few epochs on purpose: this model exists to cost compute, and it is
        # already ~98 % accurate; full convergence would only slow the build.
        warnings.simplefilter("ignore", ConvergenceWarning)
        model = make_pipeline(StandardScaler(), mlp).fit(x_train, y_train)
    function_id = f"{NAMESPACE}/mlp"
    layers = "-".join(str(h) for h in (64, *MLP_HIDDEN, 10))
    description = (
        f"Benchmark load: a deliberately large digits MLP ({layers}); same contract as "
        "examples/digits, about 40 us per sample on one CPU core."
    )
    onx = _convert(model, mlp, "image", 64, _classifier_outputs(10))
    return Example(
        function_id=function_id,
        version=VERSION,
        onnx_bytes=_finalize(onx, function_id, description),
        description=description,
        regions=(),
        metrics=MappingProxyType({"accuracy": float(model.score(x_test, y_test))}),
        _sample=_digits_rows,
        _reference=_classifier_reference(model, "image"),
    )


_BUILDERS: Mapping[str, Callable[[], Example]] = MappingProxyType(
    {
        "digits": _build_digits,
        "cancer": _build_cancer,
        "anomaly": _build_anomaly,
        "mlp": _build_mlp,
    }
)
