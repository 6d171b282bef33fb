"""Duplicate suppression: a retried request is answered from its first execution.

The key is (reply topic, request id, CorrelationData), so a stored answer is
only ever replayed to the reply topic that asked for it. While the first
execution runs, duplicates wait for its answer; once it succeeded, they get
the stored bytes. An error is not stored (a retry after ``saturated`` or
``timeout`` deserves a fresh try), but duplicates already waiting get it.
The cache is bounded in entries, bytes and time.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from fnmesh.functions.tensors import Encoding

Key = tuple[str, str, str]


class EncodedSink(Protocol):
    def send_encoded(self, payload: bytes, encoding: Encoding) -> None: ...


@dataclass(slots=True)
class _Entry:
    created: float
    payload: bytes | None = None
    encoding: Encoding | None = None
    waiters: list[EncodedSink] = field(default_factory=list)


class ReplyCache:
    def __init__(
        self,
        *,
        ttl_s: float = 300.0,
        max_entries: int = 100_000,
        max_bytes: int = 64 << 20,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.ttl_s = ttl_s
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self._clock = clock
        self._d: OrderedDict[Key, _Entry] = OrderedDict()
        self._bytes = 0
        self.replayed = 0
        self.joined = 0

    def __len__(self) -> int:
        return len(self._d)

    @property
    def size_bytes(self) -> int:
        return self._bytes

    def begin(self, key: Key, sink: EncodedSink) -> bool:
        """True if this is the first time ``key`` is seen (the caller runs it).

        Otherwise the duplicate is taken care of: answered from the store, or
        queued behind the running first execution.
        """
        if self.join(key, sink):
            return False
        self.start(key)
        return True

    def join(self, key: Key, sink: EncodedSink) -> bool:
        """Take care of a duplicate of a known request; False if ``key`` is new."""
        self._expire(self._clock())
        e = self._d.get(key)
        if e is None:
            return False
        if e.payload is not None and e.encoding is not None:
            self.replayed += 1
            sink.send_encoded(e.payload, e.encoding)
        else:
            self.joined += 1
            e.waiters.append(sink)
        return True

    def start(self, key: Key) -> None:
        """Remember that ``key`` is running (after it was admitted)."""
        self._d[key] = _Entry(self._clock())
        self._bound()

    def complete(
        self, key: Key, payload: bytes, encoding: Encoding, *, store: bool
    ) -> list[EncodedSink]:
        """Record the first execution's answer; returns the duplicates waiting for it."""
        e = self._d.get(key)
        if e is None:
            return []
        waiters, e.waiters = e.waiters, []
        if store:
            e.payload = payload
            e.encoding = encoding
            self._bytes += len(payload)
            self._bound()
        else:
            del self._d[key]
        return waiters

    def _expire(self, now: float) -> None:
        while self._d:
            key, e = next(iter(self._d.items()))
            if now - e.created < self.ttl_s or e.payload is None:
                return
            self._drop(key)

    def _bound(self) -> None:
        while self._d and (len(self._d) > self.max_entries or self._bytes > self.max_bytes):
            key = next(iter(self._d))
            e = self._d[key]
            if e.payload is None and e.waiters:
                # Never forget a running request that others wait on; age it instead.
                self._d.move_to_end(key)
                if all(x.payload is None for x in self._d.values()):
                    return
                continue
            self._drop(key)

    def _drop(self, key: Key) -> None:
        e = self._d.pop(key)
        if e.payload is not None:
            self._bytes -= len(e.payload)
