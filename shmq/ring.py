"""Ring: the public, blocking face of :class:`~shmq._ring.RingBuffer`.

``write``/``read`` block until they can proceed, with an optional timeout in
seconds; ``*_nowait`` never block.  Everything else (``try_*``, ``reserve``/
``commit``, ``peek``/``release``) is inherited.
"""
from __future__ import annotations

import time
from typing import Any, Iterable, List, Optional

from . import _layout as L
from ._errors import Empty, Full, MessageTooLarge
from ._ring import DEFAULT_CAPACITY_BYTES, RingBuffer
from ._ring import RingStatistics, ring_statistics
from ._wait import SPIN_SECONDS, deadline_for, wait_until

__all__ = ("Ring", "DEFAULT_CAPACITY_BYTES")

_perf_ns = time.perf_counter_ns
_monotonic = time.monotonic


def _add_counter(w: Any, word: int, amount: int) -> None:
    """Add to a statistics word, wrapping at the int64 limit (a peer could
    have written any value there; a statistic must not stop a write or read)."""
    w[word] = (w[word] + amount + (1 << 63)) % (1 << 64) - (1 << 63)


def _expired(deadline: Optional[float]) -> bool:
    return deadline is not None and _monotonic() >= deadline


def _nbytes(data: Any) -> int:
    return len(data) if type(data) is bytes else memoryview(data).nbytes


class Ring(RingBuffer):
    """A named shared-memory ring of byte records with blocking operations.

    ``Ring.create(capacity_bytes, max_messages=0, name=None,
    multi_producer=True, multi_consumer=True)`` makes one;
    ``Ring.attach(name)`` opens it from any process; a Ring pickles as its name.
    ``spin`` is how long (seconds) a blocked call polls before it sleeps.
    """

    spin: float = SPIN_SECONDS

    def statistics(self) -> RingStatistics:
        """A snapshot of the shared counters (any attached process sees the same)."""
        self._check_open()
        return ring_statistics(self)

    def write(self, data: Any, timeout: Optional[float] = None) -> None:
        """Append one record, waiting for room.  Raises Full if ``timeout``
        expires, MessageTooLarge if the record can never fit."""
        if timeout is not None and timeout < 0:
            deadline_for(timeout)  # raises ValueError, even when there is room
        if self.try_write(data):
            return
        n = _nbytes(data)
        deadline = deadline_for(timeout)  # one deadline for every retry
        while True:
            self._block_writing(lambda: self.can_write(n), deadline)
            if self.try_write(data):
                return
            if _expired(deadline):  # (can_write is a hint: never retry past the deadline)
                raise Full(f"ring {self.name!r} stayed full")

    def write_nowait(self, data: Any) -> None:
        """Append one record or raise Full at once."""
        if not self.try_write(data):
            raise Full(f"ring {self.name!r} is full")

    def write_many(self, items: Iterable[Any], timeout: Optional[float] = None) -> None:
        """Append every record of ``items``, publishing in batches.  Raises
        Full if ``timeout`` expires first (the records before it were written)."""
        deadline = deadline_for(timeout)
        items = items if isinstance(items, list) else list(items)
        done = self.try_write_many(items)
        while done < len(items):
            n = _nbytes(items[done])
            if n > self.max_payload:  # a batch stops before it: never wait for room
                raise MessageTooLarge(
                    f"record of {n} bytes can never fit a ring of {self._cap} bytes (max {self.max_payload})"
                )
            self._block_writing(lambda: self.can_write(n), deadline)
            more = self.try_write_many(items[done:] if done else items)
            if not more and _expired(deadline):
                raise Full(f"ring {self.name!r} stayed full")
            done += more

    def read(self, timeout: Optional[float] = None) -> bytes:
        """Remove and return the oldest record, waiting for one.  Raises Empty
        if ``timeout`` expires."""
        if timeout is not None and timeout < 0:
            deadline_for(timeout)  # raises ValueError, even when a record is there
        data = self.try_read()
        if data is not None:
            return data
        deadline = deadline_for(timeout)
        while True:
            self._block_reading(deadline)
            data = self.try_read()
            if data is not None:
                return data
            if _expired(deadline):
                raise Empty(f"ring {self.name!r} stayed empty")

    def read_nowait(self) -> bytes:
        """Remove and return the oldest record or raise Empty at once."""
        data = self.try_read()
        if data is None:
            raise Empty(f"ring {self.name!r} is empty")
        return data

    def read_many(self, max_items: int = 1 << 30, timeout: Optional[float] = None) -> List[bytes]:
        """Wait for at least one record, then return up to ``max_items``."""
        if max_items < 1:
            raise ValueError(f"'max_items' must be at least 1, got {max_items!r}")
        deadline = deadline_for(timeout)
        out = self.try_read_many(max_items)
        if out:
            return out
        while True:
            self._block_reading(deadline)
            out = self.try_read_many(max_items)
            if out:
                return out
            if _expired(deadline):
                raise Empty(f"ring {self.name!r} stayed empty")

    def _block_writing(self, ready, deadline: Optional[float]) -> None:
        t0 = _perf_ns()
        ok = wait_until(ready, self._not_full, deadline, self.spin)
        w = self._w
        _add_counter(w, L.W_FULL_WAITS, 1)
        _add_counter(w, L.W_FULL_WAIT_NS, _perf_ns() - t0)
        if not ok:
            raise Full(f"ring {self.name!r} stayed full")

    def _block_reading(self, deadline: Optional[float], ready=None) -> None:
        t0 = _perf_ns()
        ok = wait_until(ready or self.can_read, self._not_empty, deadline, self.spin)
        w = self._w
        _add_counter(w, L.W_EMPTY_WAITS, 1)
        _add_counter(w, L.W_EMPTY_WAIT_NS, _perf_ns() - t0)
        if not ok:
            raise Empty(f"ring {self.name!r} stayed empty")
