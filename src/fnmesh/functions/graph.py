"""Reading an ONNX graph's contract, and refusing graphs that could reach outside it.

A bundle carries no executable code: ONNX operators from the standard domains
only, every weight inside the model (no external-data references that would
make a runtime open files), no model-local functions in custom domains.
"""

from __future__ import annotations

from collections.abc import Iterator

import onnx
from onnx import helper

from fnmesh.functions.errors import GraphError, ManifestError
from fnmesh.functions.manifest import DTYPES, TensorSpec

ALLOWED_DOMAINS = frozenset({"", "ai.onnx", "ai.onnx.ml"})


def load_graph(model_bytes: bytes) -> onnx.ModelProto:
    try:
        model = onnx.load_model_from_string(model_bytes)
    except Exception as e:  # onnx raises DecodeError and friends from protobuf
        raise GraphError(f"model is not a readable ONNX graph: {e}") from e
    if not model.graph.node and not model.graph.output:
        raise GraphError("model is not a readable ONNX graph: it has no nodes or outputs")
    return model


def _tensors(model: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    graphs = [model.graph]
    while graphs:
        g = graphs.pop()
        yield from g.initializer
        for sparse in g.sparse_initializer:
            # The indices are a tensor too, and ONNX Runtime loads their external data.
            yield sparse.values
            yield sparse.indices
        for node in g.node:
            for attr in node.attribute:
                if attr.HasField("t"):
                    yield attr.t
                yield from attr.tensors
                sparse_attrs = [attr.sparse_tensor] if attr.HasField("sparse_tensor") else []
                for sparse in [*sparse_attrs, *attr.sparse_tensors]:
                    yield sparse.values
                    yield sparse.indices
                if attr.HasField("g"):
                    graphs.append(attr.g)
                graphs.extend(attr.graphs)


def _nodes(model: onnx.ModelProto) -> Iterator[onnx.NodeProto]:
    graphs = [model.graph]
    while graphs:
        g = graphs.pop()
        for node in g.node:
            yield node
            for attr in node.attribute:
                if attr.HasField("g"):
                    graphs.append(attr.g)
                graphs.extend(attr.graphs)


def check_graph(model: onnx.ModelProto) -> None:
    """Refuse external data references and operators outside the standard domains."""
    for t in _tensors(model):
        if t.data_location == onnx.TensorProto.EXTERNAL or len(t.external_data) > 0:
            raise GraphError(
                f"tensor {t.name!r} refers to external data; bundles must carry every weight inside"
            )
    for op in model.opset_import:
        if op.domain not in ALLOWED_DOMAINS:
            raise GraphError(f"custom operator domain {op.domain!r} is not allowed")
    for node in _nodes(model):
        if node.domain not in ALLOWED_DOMAINS:
            raise GraphError(f"operator {node.op_type!r} is in custom domain {node.domain!r}")
    if len(model.functions) > 0:
        raise GraphError("model-local functions are not allowed")


def _spec(value: onnx.ValueInfoProto) -> TensorSpec:
    tt = value.type.tensor_type
    if not value.type.HasField("tensor_type"):
        raise GraphError(
            f"{value.name!r} is not a plain tensor (sequence/map outputs need ZipMap off)"
        )
    try:
        dtype = helper.tensor_dtype_to_np_dtype(tt.elem_type).name
    except (KeyError, ValueError) as e:
        raise GraphError(f"{value.name!r} has an unsupported element type {tt.elem_type}") from e
    if dtype not in DTYPES:
        raise GraphError(f"{value.name!r} has element type {dtype}, not one fnmesh carries")
    dims: list[int | str] = []
    for i, d in enumerate(tt.shape.dim):
        if d.HasField("dim_value"):
            dims.append(int(d.dim_value))
        else:
            dims.append(d.dim_param or f"d{i}")
    return TensorSpec(name=value.name, dtype=dtype, shape=tuple(dims))


def graph_io(model: onnx.ModelProto) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
    """The graph's real inputs (initializers excluded) and outputs as tensor specs."""
    inits = {t.name for t in model.graph.initializer}
    inputs = tuple(_spec(v) for v in model.graph.input if v.name not in inits)
    outputs = tuple(_spec(v) for v in model.graph.output)
    return inputs, outputs


def _same(a: TensorSpec, b: TensorSpec) -> bool:
    if a.name != b.name or a.dtype != b.dtype or len(a.shape) != len(b.shape):
        return False
    return all(
        x == y or (isinstance(x, str) and isinstance(y, str))
        for x, y in zip(a.shape, b.shape, strict=True)
    )


def check_matches(
    model: onnx.ModelProto, inputs: tuple[TensorSpec, ...], outputs: tuple[TensorSpec, ...]
) -> None:
    """Refuse a manifest whose declared inputs or outputs disagree with the graph."""
    g_in, g_out = graph_io(model)
    for kind, declared, actual in (("inputs", inputs, g_in), ("outputs", outputs, g_out)):
        d = {s.name: s for s in declared}
        a = {s.name: s for s in actual}
        if set(d) != set(a):
            raise ManifestError(
                f"manifest {kind} {sorted(d)} disagree with the graph's {sorted(a)}"
            )
        for name, spec in d.items():
            if not _same(spec, a[name]):
                raise ManifestError(
                    f"manifest declares {kind[:-1]} {name!r} as {spec.describe()}, "
                    f"the graph has {a[name].describe()}"
                )
