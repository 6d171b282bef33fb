"""Admission control: say ``saturated`` at once rather than queue what cannot finish in time.

For each function the agent keeps an exponential moving average of how long
a batch takes; a new request's expected completion is the rest of the running
batch, plus the batches queued ahead of it, plus its own. A request is refused
when the queue is full, or when that estimate breaks its deadline.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

#: Weight of the newest sample in the moving averages.
ALPHA = 0.2


@dataclass(slots=True)
class ServiceTime:
    """Moving averages of one function's batch cost."""

    batch_ms: float = 0.0
    row_ms: float = 0.0
    samples: int = 0

    def observe(self, run_ms: float, rows: int) -> None:
        if self.samples == 0:
            self.batch_ms = run_ms
            self.row_ms = run_ms / max(rows, 1)
        else:
            self.batch_ms += ALPHA * (run_ms - self.batch_ms)
            self.row_ms += ALPHA * (run_ms / max(rows, 1) - self.row_ms)
        self.samples += 1

    def expected_ms(
        self, *, running_rows: int, queued_rows: int, rows: int, max_batch: int
    ) -> float:
        """Expected time until a request of ``rows`` rows would be answered, from now."""
        if self.samples == 0:
            return 0.0
        ahead = queued_rows + rows
        batches = math.ceil(ahead / max(max_batch, 1))
        per_batch = max(self.batch_ms, self.row_ms * min(ahead, max_batch))
        current = self.batch_ms / 2 if running_rows else 0.0
        return current + batches * per_batch


@dataclass(frozen=True, slots=True)
class Verdict:
    admitted: bool
    reason: str = ""


_ADMITTED = Verdict(True)


def admit(
    st: ServiceTime,
    *,
    queue_full: bool,
    running_rows: int,
    queued_rows: int,
    rows: int,
    max_batch: int,
    now: float,
    deadline: float | None,
) -> Verdict:
    """Decide whether a request may wait for this function on this node."""
    if queue_full:
        return Verdict(False, "the function's queue on this node is full")
    if deadline is not None:
        eta = st.expected_ms(
            running_rows=running_rows, queued_rows=queued_rows, rows=rows, max_batch=max_batch
        )
        if now + eta / 1000.0 > deadline:
            left = max(0.0, (deadline - now) * 1000.0)
            return Verdict(
                False, f"expected to finish in {eta:.1f} ms, deadline is in {left:.1f} ms"
            )
    return _ADMITTED
