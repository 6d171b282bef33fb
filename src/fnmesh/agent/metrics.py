"""The agent's Prometheus metrics, in a registry of its own (several agents may share a process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
_MS_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 50, 100, 250, 1000, 5000)


class AgentMetrics:
    def __init__(self, node: str) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        labels = {"node": node}
        self.answers = Counter(
            "fnmesh_agent_answers",
            "Answers sent, by function and code (ok or an error code).",
            ["function", "code"],
            registry=self.registry,
        ).labels
        self.refused_reply = Counter(
            "fnmesh_agent_refused_reply_topics",
            "Requests dropped because their reply topic was missing or outside replies/.",
            ["reason"],
            registry=self.registry,
        )
        self.batch_rows = Histogram(
            "fnmesh_agent_batch_rows",
            "Rows per executed batch.",
            ["function"],
            buckets=_BATCH_BUCKETS,
            registry=self.registry,
        )
        self.run_ms = Histogram(
            "fnmesh_agent_batch_run_ms",
            "Executor time per batch, ms.",
            ["function"],
            buckets=_MS_BUCKETS,
            registry=self.registry,
        )
        self.cold_starts = Counter(
            "fnmesh_agent_cold_starts",
            "Batches that had to load their model first.",
            ["function"],
            registry=self.registry,
        )
        self.inline_batches = Counter(
            "fnmesh_agent_inline_batches",
            "Batches run on the event loop thread (measured cheaper than a thread hop).",
            ["function"],
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
        self._node = labels
        self._answer_cache: dict[tuple[str, str], Counter] = {}
        self._batch_cache: dict[str, tuple[Histogram, Histogram, Counter, Counter]] = {}

    def answer(self, function: str, code: str) -> None:
        c = self._answer_cache.get((function, code))
        if c is None:
            if len(self._answer_cache) > 10_000:
                # Function ids come from topics; never let them grow the registry without bound.
                function = "other"
            c = self._answer_cache.setdefault((function, code), self.answers(function, code))
        c.inc()

    def batch(
        self, function: str, rows: int, run_ms: float, cold: bool, inline: bool = False
    ) -> None:
        children = self._batch_cache.get(function)
        if children is None:
            # Only served functions get here: one set of children each, looked up once.
            children = self._batch_cache[function] = (
                self.batch_rows.labels(function),
                self.run_ms.labels(function),
                self.cold_starts.labels(function),
                self.inline_batches.labels(function),
            )
        rows_h, run_h, colds, inlines = children
        rows_h.observe(rows)
        run_h.observe(run_ms)
        if cold:
            colds.inc()
        if inline:
            inlines.inc()

    def spill(self, function: str) -> None:
        self.spills.labels(function).inc()

    def duplicate(self) -> None:
        self.duplicates.inc()

    def refused(self, reason: str) -> None:
        self.refused_reply.labels(reason).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
