"""The agent's Prometheus metrics, in a registry of its own (several agents may share a process).

The metrics every request touches (answers, batch sizes and run times, cold
starts, inline batches) are plain numbers that only the event loop writes,
turned into metric families when ``/metrics`` is scraped: a request pays a
dictionary lookup and an addition, not ``prometheus_client``'s locks and
label lookups (several microseconds a request on a small node, a visible
share of a small model's round trip). Rare events use ``prometheus_client``
directly.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
_MS_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 50, 100, 250, 1000, 5000)
#: Function ids come from topics: past this many label sets, answers count under "other".
MAX_ANSWER_LABELS = 10_000


class _Histogram:
    """Bucket counts (not cumulative; the last is +Inf) and a sum."""

    __slots__ = ("bounds", "counts", "total")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.total = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.total += value

    def add_to(self, family: HistogramMetricFamily, labels: list[str]) -> None:
        buckets, running = [], 0
        for bound, n in zip((*self.bounds, float("inf")), self.counts, strict=True):
            running += n
            buckets.append((_le(bound), running))
        family.add_metric(labels, buckets, sum_value=self.total)


def _le(bound: float) -> str:
    return "+Inf" if bound == float("inf") else repr(float(bound))


class _Batches:
    """One function's batch metrics."""

    __slots__ = ("colds", "inlines", "rows", "run_ms")

    def __init__(self) -> None:
        self.rows = _Histogram(_BATCH_BUCKETS)
        self.run_ms = _Histogram(_MS_BUCKETS)
        self.colds = 0
        self.inlines = 0


class _PerRequest(Collector):
    """The per-request metrics, as numbers the loop updates and a scrape reads."""

    def __init__(self) -> None:
        self.answers: dict[tuple[str, str], int] = {}
        self.batches: dict[str, _Batches] = {}

    def collect(self) -> Iterator[Metric]:
        answers = CounterMetricFamily(
            "fnmesh_agent_answers",
            "Answers sent, by function and code (ok or an error code).",
            labels=["function", "code"],
        )
        for (function, code), n in sorted(list(self.answers.items())):
            answers.add_metric([function, code], n)
        yield answers
        batches = sorted(list(self.batches.items()))
        rows = HistogramMetricFamily(
            "fnmesh_agent_batch_rows", "Rows per executed batch.", labels=["function"]
        )
        run_ms = HistogramMetricFamily(
            "fnmesh_agent_batch_run_ms", "Executor time per batch, ms.", labels=["function"]
        )
        colds = CounterMetricFamily(
            "fnmesh_agent_cold_starts",
            "Batches that had to load their model first.",
            labels=["function"],
        )
        inlines = CounterMetricFamily(
            "fnmesh_agent_inline_batches",
            "Batches run on the event loop thread (measured cheaper than a thread hop).",
            labels=["function"],
        )
        for function, b in batches:
            b.rows.add_to(rows, [function])
            b.run_ms.add_to(run_ms, [function])
            colds.add_metric([function], b.colds)
            inlines.add_metric([function], b.inlines)
        yield from (rows, run_ms, colds, inlines)


class AgentMetrics:
    def __init__(self, node: str) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._per_request = _PerRequest()
        self.registry.register(self._per_request)
        self.refused_reply = Counter(
            "fnmesh_agent_refused_reply_topics",
            "Requests dropped because their reply topic was missing or outside replies/.",
            ["reason"],
            registry=self.registry,
        )
        self.duplicates = Counter(
            "fnmesh_agent_duplicates",
            "Retried requests answered from their first execution.",
            registry=self.registry,
        )
        self.spills = Counter(
            "fnmesh_agent_spilled",
            "Requests handed back to the routers for the cloud, by function.",
            ["function"],
            registry=self.registry,
        )
        self.node = node

    def answer(self, function: str, code: str, count: int = 1) -> None:
        answers = self._per_request.answers
        key = (function, code)
        if key not in answers and len(answers) >= MAX_ANSWER_LABELS:
            key = ("other", code)  # never let topics grow the metrics without bound
        answers[key] = answers.get(key, 0) + count

    def batch(
        self, function: str, rows: int, run_ms: float, cold: bool, inline: bool = False
    ) -> None:
        b = self._per_request.batches.get(function)
        if b is None:  # only served functions run batches: the set stays small
            b = self._per_request.batches[function] = _Batches()
        b.rows.observe(rows)
        b.run_ms.observe(run_ms)
        if cold:
            b.colds += 1
        if inline:
            b.inlines += 1

    def spill(self, function: str) -> None:
        self.spills.labels(function).inc()

    def duplicate(self) -> None:
        self.duplicates.inc()

    def refused(self, reason: str) -> None:
        self.refused_reply.labels(reason).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
