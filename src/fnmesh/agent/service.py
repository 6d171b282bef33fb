"""Invocation on one node, whatever carried the request (MQTT or HTTP).

For each request: decode and check it against the function's inputs, refuse
what cannot finish before its deadline, batch it with others for the same
function, run the batch on a worker thread (or, when its measured CPU cost is
below what the hand-off to a thread costs, at once on the loop thread), and
answer each caller with its own slice. Every failure becomes an error reply
naming what was wrong; nothing a caller sends can stop the service.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from fnmesh.agent.admission import ServiceTime, admit
from fnmesh.agent.batcher import Batcher, Pending, RunBatch
from fnmesh.agent.dedup import Key, ReplyCache
from fnmesh.agent.executors.base import Executor
from fnmesh.agent.metrics import AgentMetrics
from fnmesh.agent.replies import Result, encode_result
from fnmesh.agent.runner import Runner
from fnmesh.agent.warm_pool import PoolKey, WarmPool
from fnmesh.errors import MeshError
from fnmesh.functions.manifest import Manifest
from fnmesh.functions.messages import (
    BadRequestError,
    Encoding,
    ErrorCode,
    ErrorReply,
    Response,
    Timing,
    decode_request,
    validate_inputs,
)

log = logging.getLogger("fnmesh.agent")

#: How long after a function leaves this node its requests are told to retry.
MOVED_WINDOW_S = 120.0

#: Input signatures remembered per function as checked (the set starts over when full).
CHECKED_SIGNATURES = 256
#: Default bound for running a batch on the loop thread: below what a thread hop costs.
INLINE_RUN_S = 30e-6
#: Runs go on the loop only while requests arrive at most this often (on average): a
#: request in a stream is better served by the batches that build up on workers. A
#: caller that waits for each answer sends its next request a round trip later, 0.3 to
#: 0.6 ms on a node's own network: under this bound, a busy node's requests overlap.
INLINE_MIN_GAP_S = 200e-6
#: The average weighs the newest gap by GAP_ALPHA, and counts no gap as longer than
#: GAP_CAP_S, so that a burst after an idle spell is seen as one within a few requests.
GAP_ALPHA = 0.25
GAP_CAP_S = 4 * INLINE_MIN_GAP_S
#: An inline run that took this many times the bound sends the function back to workers
#: until it is measured again.
INLINE_GIVE_UP = 20
#: Calibration re-runs a first warm batch up to this many times, if it took at most
#: CALIBRATE_MAX_S, and for at most CALIBRATE_BUDGET_S of CPU in all.
CALIBRATE_RUNS = 32
CALIBRATE_MAX_S = 200e-6
CALIBRATE_BUDGET_S = 2e-3
CALIBRATE_TRIES = 16
#: A function measured at most this many times the bound is measured again after
#: RECALIBRATE_EVERY batches on workers.
RECALIBRATE_BELOW = 3.0
RECALIBRATE_EVERY = 2000

#: Payload limit applied before the function is known (an unknown function's request).
DEFAULT_MAX_PAYLOAD = 1 << 20


class _Recording:
    """Wraps the first execution's sink: stores the answer and answers waiting duplicates.

    The answer goes out first; storing it and answering the duplicates waiting for
    it are left to ``later`` (the service's after-the-answer work).
    """

    __slots__ = ("_cache", "_inner", "_key", "_later", "topic")

    def __init__(self, inner: Any, cache: ReplyCache, key: Key, later: Callable[..., None]) -> None:
        self._inner = inner
        self._cache = cache
        self._key = key
        self._later = later
        self.topic = key[0]

    def accept(self, reply_to: str | None) -> bool:
        return True

    def send_encoded(self, payload: bytes, encoding: Encoding) -> None:
        self._inner.send_encoded(payload, encoding)

    def send(self, result: Result, encoding: Encoding) -> None:
        payload = encode_result(result, encoding)
        self._inner.send_encoded(payload, encoding)
        self._later(self._complete, payload, encoding, type(result) is Response)

    def _complete(self, payload: bytes, encoding: Encoding, store: bool) -> None:
        for w in self._cache.complete(self._key, payload, encoding, store=store):
            w.send_encoded(payload, encoding)


class Sink(Protocol):
    """Where one request's answer goes (an MQTT reply topic, an HTTP response)."""

    def accept(self, reply_to: str | None) -> bool:
        """Called once the request is decoded as far as it goes; False drops it (no address)."""
        ...

    def send(self, result: Result, encoding: Encoding) -> None: ...

    def send_encoded(self, payload: bytes, encoding: Encoding) -> None:
        """Send bytes already encoded (a replayed answer)."""
        ...


@dataclass(slots=True)
class Slot:
    """One function served here: its manifest, bundle, batcher and service-time estimate."""

    manifest: Manifest
    digest: str
    batcher: Batcher[_Call]
    allow_rollback: bool = False
    stats: ServiceTime = field(default_factory=ServiceTime)
    batchable: bool = True
    #: False once its executor said it must not run on the loop thread.
    inline: bool = True
    #: Input signatures (name, dtype, shape of each) that passed ``validate_inputs``: rows.
    checked: dict[tuple[tuple[str, np.dtype[Any], tuple[int, ...]], ...], int] = field(
        default_factory=dict
    )
    #: CPU seconds of a warm single-row run, measured on a worker (None: not yet).
    floor_s: float | None = None
    calibrations: int = 0
    since_calibration: int = 0
    #: The warm pool's key for this version, (name, version).
    key: PoolKey = field(init=False)
    #: Bytes the manifest says a loaded model needs (0: not said), for the warm pool.
    size_hint: int = field(init=False)

    def __post_init__(self) -> None:
        self.key = (self.manifest.name, self.manifest.version)
        self.size_hint = self.manifest.requirements.memory_mb << 20


@dataclass(slots=True, eq=False)
class _Call(Pending):
    """One admitted request: what the batcher needs (rows, arrival), and the rest."""

    inputs: dict[str, np.ndarray]
    deadline: float | None
    id: str
    sink: Sink
    encoding: Encoding
    spilled: bool


def _timed_run(ex: Executor, inputs: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], float]:
    """Run, and measure the CPU time of the calling thread (not time spent waiting)."""
    t = time.thread_time()
    outputs = ex.run(inputs)
    return outputs, time.thread_time() - t


def _worker_run(
    ex: Executor, inputs: dict[str, np.ndarray], calibrate: bool
) -> tuple[dict[str, np.ndarray], float | None]:
    """Run on a worker; with ``calibrate``, also measure the model's warm CPU cost.

    Calibration uses a single-row batch: if the run was quick, it is repeated
    back to back and the cheapest run is the model's cost (a run after an idle
    gap starts with cold caches and costs two or three times as much). A run
    that was not quick returns None, and the service tries a later batch (see
    ``InvocationService._calibration_due``).
    """
    if not calibrate:
        return ex.run(inputs), None
    outputs, floor = _timed_run(ex, inputs)
    if floor > CALIBRATE_MAX_S:
        return outputs, None  # too long to be worth it now; a later batch tries again
    spent = floor
    for _ in range(CALIBRATE_RUNS):
        cpu = _timed_run(ex, inputs)[1]
        floor = min(floor, cpu)
        spent += cpu
        if spent > CALIBRATE_BUDGET_S:
            break
    return outputs, floor


def _first_run(inputs: dict[str, np.ndarray], ex: Executor) -> tuple[dict[str, np.ndarray], float]:
    """A cold start's batch, on the loading thread (see ``WarmPool.ride``): outputs and seconds."""
    t = time.perf_counter()
    outputs = ex.run(inputs)
    return outputs, time.perf_counter() - t


def _batchable(m: Manifest) -> bool:
    """Requests can be stacked only if every tensor has a symbolic leading (batch) axis."""
    return all(s.shape and isinstance(s.shape[0], str) for s in (*m.inputs, *m.outputs))


class InvocationService:
    """Serves the functions assigned to this node."""

    def __init__(
        self,
        node: str,
        pool: WarmPool,
        metrics: AgentMetrics,
        *,
        threads: int = 2,
        max_queue: int = 1024,
        dedup: ReplyCache | None = None,
        spill_allowed: Callable[[str], bool] = lambda _fid: False,
        clock: Callable[[], float] = time.monotonic,
        inline_run_s: float = INLINE_RUN_S,
    ) -> None:
        self.node = node
        #: Batches measured to take at most this much CPU run on the loop thread (0: never).
        self.inline_run_s = inline_run_s
        #: Moving average of the time between requests (any function), see GAP_CAP_S.
        self._gap_s = GAP_CAP_S
        self._last_arrival = clock()
        self.dedup = dedup
        self.spill_allowed = spill_allowed
        self.pool = pool
        self.metrics = metrics
        self.max_queue = max_queue
        self._clock = clock
        self._slots: dict[str, Slot] = {}
        self._by_key: dict[PoolKey, Slot] = {}
        self._staged: dict[PoolKey, Slot] = {}
        self._runner = Runner(threads)
        self._accepting = True
        #: Until the node's first assignment is applied (or a grace period ends), an
        #: unknown function is "not loaded yet" (saturated), not "not found".
        self.starting = True
        #: function -> when it stopped being served here (requests routed before the move).
        self._removed: dict[str, float] = {}
        #: Work left until the answers of this loop pass are written (see ``_after``).
        self._later: list[tuple[Callable[..., None], tuple[Any, ...]]] = []
        self._loop: asyncio.AbstractEventLoop | None = None

    # -- what is served -------------------------------------------------------------

    def slots(self) -> dict[str, Slot]:
        return dict(self._slots)

    def max_payload_for(self, function_id: str) -> int:
        slot = self._slots.get(function_id)
        return slot.manifest.limits.max_payload if slot else DEFAULT_MAX_PAYLOAD

    def slot_for_key(self, key: PoolKey) -> Slot | None:
        return self._by_key.get(key)

    def _make_slot(self, manifest: Manifest, digest: str, allow_rollback: bool) -> Slot:
        batchable = _batchable(manifest)
        return Slot(
            manifest=manifest,
            digest=digest,
            allow_rollback=allow_rollback,
            batchable=batchable,
            batcher=Batcher(
                self._run_batch_for(manifest.name),
                max_batch=manifest.limits.max_batch if batchable else 1,
                max_delay_s=manifest.limits.max_delay_ms / 1000.0,
                max_queue=self.max_queue,
                clock=self._clock,
                inline=functools.partial(self._try_inline, manifest.name),
            ),
        )

    def stage(self, manifest: Manifest, digest: str, *, allow_rollback: bool = False) -> Slot:
        """Make a version loadable (for pre-warming) without sending it requests yet."""
        slot = self._by_key.get((manifest.name, manifest.version))
        if slot is not None and slot.digest == digest:
            return slot
        slot = self._make_slot(manifest, digest, allow_rollback)
        self._staged[slot.key] = slot
        self._by_key.setdefault(slot.key, slot)
        return slot

    def unstage(self, manifest: Manifest, digest: str) -> None:
        key = (manifest.name, manifest.version)
        slot = self._staged.pop(key, None)
        if slot is not None and self._by_key.get(key) is slot:
            del self._by_key[key]

    def serve(self, manifest: Manifest, digest: str, *, allow_rollback: bool = False) -> Slot:
        """Start serving (or switch to) this version of a function."""
        old = self._slots.get(manifest.name)
        if old is not None and old.digest == digest:
            return old
        key = (manifest.name, manifest.version)
        staged = self._staged.pop(key, None)
        slot = (
            staged
            if staged is not None and staged.digest == digest
            else self._make_slot(manifest, digest, allow_rollback)
        )
        self._slots[manifest.name] = slot
        self._by_key[slot.key] = slot
        if old is not None and old.key != slot.key:
            # Requests already queued for the old version are still answered by it.
            asyncio.get_running_loop().create_task(self._retire(old))
        return slot

    async def async_remove(self, function_id: str, *, moved: bool = True) -> None:
        """Stop serving a function; ``moved`` (not revoked) makes late requests retryable."""
        slot = self._slots.pop(function_id, None)
        if slot is not None and moved:
            self._removed[function_id] = self._clock()
        if slot is not None:
            await self._retire(slot)

    async def _retire(self, slot: Slot, timeout: float = 30.0) -> None:
        await slot.batcher.async_drain(timeout)
        if self._by_key.get(slot.key) is slot:
            del self._by_key[slot.key]
        await self.pool.async_unload(slot.key)

    # -- the request path -----------------------------------------------------------

    def submit(
        self,
        function_id: str,
        payload: bytes | bytearray,
        content_type: str | None,
        sink: Sink,
        *,
        received: float | None = None,
        correlation_id: str | None = None,
        expires: float | None = None,
        spilled: bool = False,
    ) -> None:
        """Take one request; its answer (or error) will reach ``sink`` exactly once."""
        now = self._clock()
        self._gap_s += GAP_ALPHA * (min(now - self._last_arrival, GAP_CAP_S) - self._gap_s)
        self._last_arrival = now
        received = received if received is not None else now
        slot = self._slots.get(function_id)
        limit = slot.manifest.limits.max_payload if slot else DEFAULT_MAX_PAYLOAD
        try:
            req = decode_request(bytes(payload), content_type, max_payload=limit)
        except BadRequestError as e:
            if sink.accept(e.reply_to):
                rid = e.id or correlation_id or ""
                self._fail(
                    function_id,
                    sink,
                    e.encoding or Encoding.JSON,
                    rid,
                    ErrorCode.BAD_REQUEST,
                    str(e),
                )
            return
        rid = req.id if req.id is not None else (correlation_id or "")
        if not sink.accept(req.reply_to):
            return
        # A retry of a request already running or answered is taken care of here,
        # before it could be refused afresh.
        key: Key | None = None
        scope = getattr(sink, "topic", None)
        if self.dedup is not None and scope and (req.id is not None or correlation_id):
            key = (scope, req.id or "", correlation_id or "")
            if self.dedup.join(key, sink):
                self.metrics.duplicate()
                return
        enc = req.encoding
        if slot is None or not self._accepting:
            if not self._accepting:
                code, why = ErrorCode.SATURATED, f"node {self.node} is shutting down"
            elif now - self._removed.get(function_id, -1e9) < MOVED_WINDOW_S:
                # Routed here just before the function moved away: retryable.
                code = ErrorCode.SATURATED
                why = f"{function_id} moved off node {self.node}; try again"
            elif self.starting:
                # A restarted node's persistent session delivers requests before its
                # assignment is back: retryable, not "this function does not exist".
                code = ErrorCode.SATURATED
                why = f"node {self.node} is starting; {function_id} is not loaded yet"
            else:
                code = ErrorCode.NOT_FOUND
                why = f"function {function_id} is not served on node {self.node}"
            self._fail(function_id, sink, enc, rid, code, why)
            return
        deadline = expires
        if req.deadline_ms is not None:
            if req.deadline_ms <= 0:
                self._fail(
                    function_id,
                    sink,
                    enc,
                    rid,
                    ErrorCode.TIMEOUT,
                    "deadline_ms <= 0: the request had already expired",
                )
                return
            d = received + req.deadline_ms / 1000.0
            deadline = d if deadline is None else min(deadline, d)
        if deadline is not None and deadline <= now:
            self._fail(
                function_id,
                sink,
                enc,
                rid,
                ErrorCode.TIMEOUT,
                "the request expired before it reached the function",
            )
            return
        m = slot.manifest
        # Callers send the same shapes again and again: a signature checked once is known.
        signature = tuple((name, a.dtype, a.shape) for name, a in req.inputs.items())
        rows = slot.checked.get(signature)
        if rows is None:
            try:
                rows = validate_inputs(
                    req, m.inputs, max_batch=m.limits.max_batch if slot.batchable else None
                )
            except BadRequestError as e:
                self._fail(function_id, sink, enc, rid, ErrorCode.BAD_REQUEST, str(e))
                return
            if len(slot.checked) >= CHECKED_SIGNATURES:
                slot.checked.clear()
            slot.checked[signature] = rows
        b = slot.batcher
        verdict = admit(
            slot.stats,
            queue_full=b.full(),
            running_rows=b.running_rows,
            queued_rows=b.queued_rows,
            rows=rows,
            max_batch=b.max_batch,
            now=now,
            deadline=deadline,
        )
        if not verdict.admitted:
            if not spilled and self.spill_allowed(function_id):
                spill = getattr(sink, "spill", None)
                if spill is not None and spill(function_id):
                    self.metrics.spill(function_id)
                    return
            self._fail(
                function_id,
                sink,
                enc,
                rid,
                ErrorCode.SATURATED,
                f"{function_id} on {self.node}: {verdict.reason}",
            )
            return
        if key is not None and self.dedup is not None:
            self.dedup.start(key)
            sink = _Recording(sink, self.dedup, key, self._after)
        # A cold start begins here, not once the batch is formed: the load is under way
        # while the request goes through the batcher.
        self.pool.prefetch(slot.key, size_hint=slot.size_hint)
        b.submit(_Call(rows, received, req.inputs, deadline, rid, sink, enc, spilled))

    def _fail_all(self, fid: str, pending: list[_Call], code: ErrorCode, message: str) -> None:
        """Answer each of ``pending`` with the same error."""
        for p in pending:
            self._fail(fid, p.sink, p.encoding, p.id, code, message)

    def _fail(
        self, fid: str, sink: Sink, enc: Encoding, rid: str, code: ErrorCode, message: str
    ) -> None:
        # Topics can name anything: only served functions get a label of their own.
        self.metrics.answer(fid if fid in self._slots else "(unknown)", code.value)
        sink.send(ErrorReply(rid, code, message), enc)

    # -- running batches ------------------------------------------------------------

    def _run_batch_for(self, function_id: str) -> RunBatch[_Call]:
        return functools.partial(self._run_batch, function_id)

    def _live(self, function_id: str, slot: Slot | None, batch: list[_Call]) -> list[_Call]:
        """Answer the requests that expired or lost their function; return the rest."""
        now = self._clock()
        live: list[_Call] = []
        for p in batch:
            if p.deadline is not None and now > p.deadline:
                self._fail(
                    function_id,
                    p.sink,
                    p.encoding,
                    p.id,
                    ErrorCode.TIMEOUT,
                    "the deadline passed while the request was queued",
                )
            else:
                live.append(p)
        if live and slot is None:
            self._fail_all(
                function_id,
                live,
                ErrorCode.SATURATED,
                f"function {function_id} moved off node {self.node}; try again",
            )
            return []
        return live

    @staticmethod
    def _stack(m: Manifest, live: list[_Call]) -> dict[str, np.ndarray]:
        if len(live) == 1:
            return live[0].inputs
        return {s.name: np.concatenate([p.inputs[s.name] for p in live]) for s in m.inputs}

    def _try_inline(self, function_id: str, batch: list[_Call]) -> bool:
        """Run ``batch`` now, on the loop thread, if that is cheaper than handing it off.

        Handing a batch to a worker thread and back costs two GIL hand-offs and
        a loop wake-up: more than 100 us on a small node, ten times what a
        small model's run costs. A batch runs here only when its executor says
        it can (CPU, one thread), it is loaded, its compute cost is within
        ``inline_run_s``, and requests are not arriving as a stream (a moving
        average of at least ``INLINE_MIN_GAP_S`` between them: a stream is
        better served by batches growing on workers beside the loop's work).
        The compute cost is the floor of a single-row run measured on a worker
        (``_worker_run``), times the batch's rows; a run that follows an idle
        gap may take two or three times as long, and one that takes far longer
        than the bound (wall time here: a run on the loop is measured by the
        clock the answer's timing uses, without two more system calls) sends
        the function back to workers until it is measured again. False leaves
        the batch to a worker.

        The executor is taken with ``WarmPool.warm``, not leased: the run ends
        before the loop runs anything else, so nothing could see the lease.
        This is the path of most requests on a node that is not busy, and after
        an idle gap every step of it is slow (each step's code and data have
        left the CPU's caches): it takes as few steps as it can.
        """
        slot = self._slots.get(function_id)
        if slot is None or not self._may_inline(slot):
            return False
        floor = slot.floor_s
        one = len(batch) == 1
        rows = batch[0].rows if one else sum(p.rows for p in batch)
        if floor is None or floor * rows > self.inline_run_s or self._gap_s < INLINE_MIN_GAP_S:
            return False
        ex = self.pool.warm(slot.key)
        if ex is None:
            return False
        if not getattr(ex, "inline_ok", False):
            slot.inline = False
            return False
        live = batch if one and batch[0].deadline is None else self._live(function_id, slot, batch)
        if not live:
            return True
        started = self._clock()
        try:
            outputs = ex.run(self._stack(slot.manifest, live))
        except Exception as e:  # answered, never raised into the transport
            self._crashed(function_id, slot.manifest, live, e)
            return True
        ended = self._clock()
        if ended - started > INLINE_GIVE_UP * self.inline_run_s:
            # Far dearer than measured: back to workers, which measure it again.
            log.debug("%s: a run took %.0f us", function_id, (ended - started) * 1e6)
            slot.floor_s = None
            slot.calibrations = 0
        self._answer(function_id, slot, live, outputs, started, ended, False, True)
        return True

    async def _run_batch(self, function_id: str, batch: list[_Call]) -> None:
        slot = self._slots.get(function_id)
        live = self._live(function_id, slot, batch)
        if not live or slot is None:
            return
        m = slot.manifest
        try:
            inputs = self._stack(m, live)
            ridden = self.pool.ride(
                slot.key, functools.partial(_first_run, inputs), size_hint=slot.size_hint
            )
            if ridden is not None:
                # A cold start: the batch runs on the loading thread, straight after the load.
                outputs, run_s = await ridden
                ended = self._clock()
                started = ended - run_s
                cold = True
            else:
                outputs, started, ended, cold = await self._lease_and_run(
                    function_id, slot, live, inputs
                )
        except Exception as e:  # a bug or a runtime failure must not stop the batcher
            self._crashed(function_id, m, live, e)
            return
        self._answer(function_id, slot, live, outputs, started, ended, cold, False)

    async def _lease_and_run(
        self, function_id: str, slot: Slot, live: list[_Call], inputs: dict[str, np.ndarray]
    ) -> tuple[dict[str, np.ndarray], float, float, bool]:
        """Run a batch on a worker under a lease (loading the executor first if it must)."""
        async with self.pool.lease(slot.key, size_hint=slot.size_hint) as (
            ex,
            cold,
        ):
            calibrate = (
                len(live) == 1
                and live[0].rows == 1
                and not cold
                and self._calibration_due(slot)
                and getattr(ex, "inline_ok", False)
            )
            started = self._clock()
            outputs, floor = await self._runner.run(_worker_run, ex, inputs, calibrate)
            ended = self._clock()
            slot.since_calibration += 1
            if calibrate:
                slot.calibrations += 1
                slot.since_calibration = 0
            if floor is not None:
                slot.floor_s = floor
                log.info(
                    "%s: %.1f us of CPU per row, warm; %s",
                    function_id,
                    slot.floor_s * 1e6,
                    "runs on the event loop"
                    if slot.floor_s <= self.inline_run_s
                    else "runs on workers",
                )
        return outputs, started, ended, cold

    def _may_inline(self, slot: Slot) -> bool:
        return self.inline_run_s > 0 and slot.inline

    def _calibration_due(self, slot: Slot) -> bool:
        """Measure a single-row run's cost now? Until known, and now and then when close."""
        if not self._may_inline(slot):
            return False
        if slot.floor_s is None:
            return slot.calibrations < CALIBRATE_TRIES
        # Measured just over the bound (a busy moment can do that): look again later.
        return (
            self.inline_run_s < slot.floor_s <= RECALIBRATE_BELOW * self.inline_run_s
            and slot.since_calibration >= RECALIBRATE_EVERY
        )

    def _crashed(self, function_id: str, m: Manifest, live: list[_Call], e: Exception) -> None:
        if isinstance(e, MeshError):
            log.warning("%s@%s failed: %s", m.name, m.version, e)
            why = str(e)
        else:
            log.exception("%s@%s crashed", m.name, m.version)
            why = f"internal error ({type(e).__name__})"
        self._fail_all(
            function_id, live, ErrorCode.INTERNAL, f"{m.name}@{m.version} on {self.node}: {why}"
        )

    def _answer(
        self,
        function_id: str,
        slot: Slot,
        live: list[_Call],
        outputs: dict[str, np.ndarray],
        started: float,
        ended: float,
        cold: bool,
        inline: bool,
    ) -> None:
        """Send each caller its own rows of the batch's outputs (the accounting comes after)."""
        m = slot.manifest
        run_ms = (ended - started) * 1000.0
        one = len(live) == 1
        offset = 0
        for p in live:
            mine = outputs if one else {k: v[offset : offset + p.rows] for k, v in outputs.items()}
            offset += p.rows
            p.sink.send(
                Response(
                    id=p.id,
                    version=m.version,
                    outputs=mine,
                    node=self.node,
                    timing=Timing(
                        queue_ms=(started - p.received) * 1000.0,
                        run_ms=run_ms,
                        cold_start=cold,
                        spilled=p.spilled,
                    ),
                ),
                p.encoding,
            )
        self._after(self._account, function_id, slot, offset, len(live), run_ms, cold, inline)

    def _account(
        self,
        function_id: str,
        slot: Slot,
        rows: int,
        answers: int,
        run_ms: float,
        cold: bool,
        inline: bool,
    ) -> None:
        slot.stats.observe(run_ms, rows)
        self.metrics.batch(function_id, rows, run_ms, cold, inline)
        self.metrics.answer(function_id, "ok", answers)

    def _after(self, fn: Callable[..., None], *args: Any) -> None:
        """Do ``fn(*args)`` once the answers sent in this loop pass are written.

        Bookkeeping (metrics, service times, the duplicate store) is not on the
        caller's path. The MQTT client writes in the loop's next pass, and this
        work is queued behind that write, ahead of anything read in that pass:
        no later request can see the work undone.
        """
        if not self._later:
            loop = self._loop
            if loop is None:
                loop = self._loop = asyncio.get_running_loop()
            loop.call_soon(self._settle)
        self._later.append((fn, args))

    def _settle(self) -> None:
        later, self._later = self._later, []
        for fn, args in later:
            try:
                fn(*args)
            except Exception:  # bookkeeping must not stop the answers that follow
                log.exception("after-the-answer work failed")

    # -- load -----------------------------------------------------------------------

    def load(self) -> dict[str, dict[str, float]]:
        """In-flight and queued requests per function, for heartbeats and routers."""
        return {
            fid: {
                "in_flight": s.batcher.running_rows,
                "queued": s.batcher.queued,
                "batch_ms": round(s.stats.batch_ms, 3),
                "row_ms": round(s.stats.row_ms, 4),
            }
            for fid, s in self._slots.items()
        }

    # -- shutdown -------------------------------------------------------------------

    def stop_accepting(self) -> None:
        self._accepting = False

    async def async_close(self, timeout: float = 10.0) -> None:
        """Stop taking work, let queued batches finish, answer the rest ``saturated``."""
        self._accepting = False
        deadline = self._clock() + timeout
        for slot in list(self._slots.values()):
            await slot.batcher.async_drain(max(0.0, deadline - self._clock()))
        for slot in list(self._slots.values()):
            self._fail_all(
                slot.manifest.name,
                slot.batcher.take_all(),
                ErrorCode.SATURATED,
                f"node {self.node} is shutting down",
            )
            await slot.batcher.async_cancel()
        # Batches are drained or cancelled above; a run still going is left to end on its own.
        await asyncio.to_thread(self._runner.shutdown, 5.0)
