"""The one interface every executor offers, and the checks they share."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Protocol, runtime_checkable

import numpy as np

from fnmesh.agent.errors import InferenceError
from fnmesh.functions.manifest import Manifest

MIB = 1024 * 1024

#: Resident cost of a loaded ONNX model per byte of model, when the manifest does not say.
#: ORT copies the initializers out of the protobuf into its own tensors (1x) and its arena,
#: pre-packed weights and optimised-graph copies cost about as much again (1x more).
ONNX_MEMORY_FACTOR = 2.0
#: Fixed per-session overhead (session state, thread-pool bookkeeping, kernel registry).
SESSION_OVERHEAD_BYTES = 4 * MIB


@runtime_checkable
class Executor(Protocol):
    """A loaded model that turns named input arrays into named output arrays.

    ``run`` blocks: call it from a worker thread, not on the event loop, unless
    the executor has an attribute ``inline_ok`` that is True (its run uses only
    the calling thread, so a caller that measured it short may run it in place).
    It is safe to call from any thread; an executor whose runtime is not
    re-entrant serialises calls itself. ``close`` frees the model; nothing may
    run after it.
    """

    @property
    def provider(self) -> str:
        """The execution provider actually running the model, e.g. "CPUExecutionProvider"."""
        ...

    @property
    def memory_bytes(self) -> int:
        """Estimated resident cost, for the warm pool's budget (each executor documents how)."""
        ...

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]: ...

    def close(self) -> None: ...


def declared_or_estimated_bytes(manifest: Manifest, model_size: int, factor: float) -> int:
    """The manifest's ``requirements.memory_mb`` when set, else ``model_size * factor`` + overhead."""
    if manifest.requirements.memory_mb > 0:
        return manifest.requirements.memory_mb * MIB
    return int(model_size * factor) + SESSION_OVERHEAD_BYTES


def check_input_names(given: Iterable[str], expected: Iterable[str], *, function: str) -> None:
    """Refuse missing or unexpected inputs with a message that names them."""
    given_set, expected_set = set(given), set(expected)
    if given_set == expected_set:
        return
    parts = []
    if missing := sorted(expected_set - given_set):
        parts.append(f"missing input(s) {', '.join(missing)}")
    if extra := sorted(given_set - expected_set):
        parts.append(f"unexpected input(s) {', '.join(extra)}")
    raise InferenceError(
        f"{function}: {'; '.join(parts)} (expects {', '.join(sorted(expected_set))})"
    )
