"""RingBuffer: variable-length byte records in a shared-memory segment.

The byte layer: it never blocks (beyond the microseconds a peer holds the
producer or consumer lock), never pickles and never sleeps.  Every ``try_*``
method answers at once: the record, or ``None``/``False`` meaning "would block".

Protocol (see ``_layout`` for the byte map):

* write: claim room at TAIL, copy the payload, write the record's header word,
  bump the counters, then publish TAIL with one aligned int64 store.
* read: look at HEAD against TAIL, copy (or view) the payload, then publish
  HEAD.  A reader killed before publishing HEAD leaves the record for the next
  reader; a writer killed before publishing TAIL leaves nothing visible.

A ring created with ``multi_producer=False`` / ``multi_consumer=False`` takes
no lock on that side: one process (and one thread) may write / read.  With
several, each side serialises through a :class:`~shmq._sync.RobustLock`.
On x86-64 (total store order) publishing after writing needs no fence; other
architectures are not supported yet.
"""
from __future__ import annotations

import os
import weakref
from threading import get_ident
from typing import Any, Callable, Dict, Iterable, List, Optional

from . import _layout as L
from . import _platform as P
from ._errors import ClosedError, MessageTooLarge
from . import _sync
from ._segment import Segment
from ._sync import Doorbell, RobustLock

__all__ = ("RingBuffer", "DEFAULT_CAPACITY_BYTES")

DEFAULT_CAPACITY_BYTES = 1 << 20
_REPAIR_WAIT = 2.0  # seconds a counter repair waits for each lock

_TAIL = L.W_TAIL
_HEAD = L.W_HEAD
_MSGS_IN = L.W_MSGS_IN
_MSGS_OUT = L.W_MSGS_OUT
_PEAK = L.W_PEAK_BYTES
_CWAIT = L.W_CONSUMER_WAITING
_PWAIT = L.W_PRODUCER_WAITING
# RobustLock's owner words, for its acquire/release inlined in the per-record
# paths.  A ring's locks show progress by their side's message counter, which
# every holder that writes or reads a record moves anyway (see _sync), so
# those paths store the owner and never touch the generation.
_POWNER = L.W_PRODUCER_LOCK
_COWNER = L.W_CONSUMER_LOCK


def _as_bytes(data: Any) -> Any:
    if type(data) is bytes:
        return data
    mv = memoryview(data)
    return mv if (mv.format == "B" and mv.ndim == 1) else mv.cast("B")


# Open rings, so a forked child starts them stale (see _forget_seen).
_live_rings: "weakref.WeakSet[RingBuffer]" = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for ring in list(_live_rings):
        if not ring._closed:
            ring._forget_seen()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


class RingBuffer:
    """A named ring of byte records shared by any number of processes.

    Create with :meth:`create`, attach from any process with :meth:`attach`
    (the handle pickles as its name).  ``close()`` ends this handle;
    ``unlink()`` removes the name (the creator does that at exit otherwise).
    """

    _closed = True

    def __init__(self, segment: Segment) -> None:
        self._segment = segment
        w = self._w = segment.words
        self._buf = segment.buf
        self._rbuf = segment.buf.toreadonly()
        self.name = segment.name
        self.capacity_bytes = cap = w[L.W_CAPACITY]
        self.max_messages = w[L.W_MAX_MESSAGES]
        self.max_payload = L.max_payload(cap)
        flags = w[L.W_FLAGS]
        self.multi_producer = bool(flags & L.FLAG_MULTI_PRODUCER)
        self.multi_consumer = bool(flags & L.FLAG_MULTI_CONSUMER)
        self._cap = cap
        self._base = L.DATA_OFFSET
        self._maxm = self.max_messages
        name = segment.name
        create = segment.is_creator
        self._not_empty = Doorbell(P.semaphore(name + "-ne", create), w, _CWAIT)
        self._not_full = Doorbell(P.semaphore(name + "-nf", create), w, _PWAIT)
        self._plock = self._clock = None
        if self.multi_producer:
            self._plock = RobustLock(
                P.semaphore(name + "-pl", create, lock=True), segment, L.W_PRODUCER_LOCK, w_progress=_MSGS_IN
            )
        if self.multi_consumer:
            self._clock = RobustLock(
                P.semaphore(name + "-cl", create, lock=True), segment, L.W_CONSUMER_LOCK, w_progress=_MSGS_OUT
            )
        if self._plock is not None and self._clock is not None:
            self._plock.on_recover = self._clock.on_recover = self._repair_counters
        # The semaphores of the locks, for try_write/try_read (None: no lock).
        self._psem = None if self._plock is None else self._plock._sem
        self._csem = None if self._clock is None else self._clock._sem
        # size + 1 of the record reserve() / peek() opened on this handle, 0 if
        # none, and where it starts: each side has its own, so commit()/abort()
        # can never act on a peeked record nor release() on a reserved one.
        self._reserved = self._reserved_pos = 0
        self._peeked = self._peeked_pos = 0
        self._repairing = 0  # thread repairing the counters (see _repair_counters)
        self._forget_seen()
        self._closed = False
        _live_rings.add(self)

    def _forget_seen(self) -> None:
        # Start stale, so each side's first operation in a process takes the
        # refresh branch, which records the process's role in the participant
        # table (before a reader takes its first record: see docs/zero_copy.md).
        self._head_seen = self._w[_HEAD] - self._cap
        self._tail_seen = 0

    # -- construction ---------------------------------------------------
    @classmethod
    def create(
        cls,
        capacity_bytes: int = DEFAULT_CAPACITY_BYTES,
        *,
        max_messages: int = 0,
        name: Optional[str] = None,
        multi_producer: bool = True,
        multi_consumer: bool = True,
    ) -> "RingBuffer":
        """Create a ring whose data area holds ``capacity_bytes`` (rounded up
        to a multiple of 8; records take 8 header bytes plus padding to 8).
        ``max_messages`` > 0 also caps the number of records held.

        Raises ValueError/TypeError for bad arguments, FileExistsError if
        ``name`` is taken, SharedMemoryFull if /dev/shm has no room.
        """
        if not isinstance(capacity_bytes, int) or isinstance(capacity_bytes, bool):
            raise TypeError(f"'capacity_bytes' must be an int, got {type(capacity_bytes).__name__}")
        if capacity_bytes < L.MIN_CAPACITY:
            raise ValueError(f"'capacity_bytes' must be at least {L.MIN_CAPACITY}, got {capacity_bytes}")
        if not isinstance(max_messages, int) or max_messages < 0:
            raise ValueError(f"'max_messages' must be an int >= 0, got {max_messages!r}")
        cap = (capacity_bytes + 7) & ~7
        seg = Segment.create(L.KIND_RING, L.ring_segment_size(cap), name)
        try:
            w = seg.words
            w[L.W_CAPACITY] = cap
            w[L.W_MAX_MESSAGES] = max_messages
            w[L.W_FLAGS] = (L.FLAG_MULTI_PRODUCER if multi_producer else 0) | (
                L.FLAG_MULTI_CONSUMER if multi_consumer else 0
            )
            self = cls(seg)
            seg.register(L.ROLE_CREATOR)
            seg.publish()
        except BaseException:
            seg.unlink()
            seg.close()
            raise
        return self

    @classmethod
    def attach(cls, name: str) -> "RingBuffer":
        """Attach to the ring ``name`` created by any process.

        Raises FileNotFoundError, PermissionError, or LayoutError if ``name``
        is not an shmq ring of this layout version.
        """
        seg = Segment.attach(name, L.KIND_RING)
        try:
            self = cls(seg)
            seg.register(L.ROLE_ATTACHED)
        except BaseException:
            seg.close()
            raise
        return self

    def __reduce__(self):
        if self._closed:
            raise ClosedError(f"{type(self).__mro__[1].__name__} {self.name!r} is closed")
        return (type(self).attach, (self.name,))

    # -- writing --------------------------------------------------------
    def try_write(self, data: Any) -> bool:
        """Append one record.  True if written, False if the ring is full
        (in bytes or in messages).  Raises MessageTooLarge if it can never fit."""
        w = self._w
        sem = self._psem
        if sem is not None and not sem.acquire(False):  # RobustLock.acquire, inlined
            self._plock._acquire_slow(None)
        try:
            if sem is not None:
                w[_POWNER] = _sync._PID
            if type(data) is not bytes:
                data = _as_bytes(data)
            n = len(data)
            need = (n + 15) & -8
            tail = w[_TAIL]
            cap = self._cap
            # HEAD is the consumers' cache line: read it only when the last value
            # seen says there is no room (it only grows, so a stale one is safe).
            free = cap - tail + self._head_seen
            if need > free:
                free = self._refresh_free(tail, need, n)
                if need > free:
                    return False
            if self._maxm and w[_MSGS_IN] - w[_MSGS_OUT] >= self._maxm:
                return False
            off = tail % cap
            if need > cap - off:
                if cap - off + need > free:  # the HEAD seen may be old: look again first
                    free = self._refresh_free(tail, need, n)
                tail = self._pad(tail, cap - off, need, free)
                if tail < 0:
                    return False
                off = 0
            pos = self._base + off
            self._buf[pos + 8 : pos + 8 + n] = data
            w[pos >> 3] = n
            w[_MSGS_IN] += 1
            w[_TAIL] = tail + need
            if w[_CWAIT]:
                self._not_empty.ring()
            return True
        finally:
            if sem is not None:
                try:
                    w[_POWNER] = 0
                finally:  # (a closed ring under a hoisted try_write: still free the lock)
                    sem.release()

    def _refresh_free(self, tail: int, need: int, n: int) -> int:
        """Re-read HEAD; record peak occupancy; raise if ``n`` never fits."""
        w = self._w
        cap = self._cap
        self._head_seen = head = w[_HEAD]
        if not self._segment.roles_marked & L.ROLE_PRODUCER:
            self._segment.add_role(L.ROLE_PRODUCER)
        used = tail - head
        if used > w[_PEAK]:
            w[_PEAK] = used
        if n > cap - 8:
            raise MessageTooLarge(f"record of {n} bytes can never fit a ring of {cap} bytes (max {cap - 8})")
        return cap - used

    def _pad(self, tail: int, room: int, need: int, free: int) -> int:
        """Fill the end of the data area so the record can start at offset 0.
        Returns the new tail, or -1 if even the pad could not be published."""
        w = self._w
        w[(self._base + tail % self._cap) >> 3] = -room
        start = tail
        tail += room
        w[_TAIL] = tail
        clock = self._clock
        if w[_HEAD] == start and clock is not None and clock.acquire(0):
            # Nothing was unread: skip our own pad rather than wait for a
            # reader to.  Only under the consumer lock: a reader that loaded
            # HEAD before our store would read the pad's place after we reuse
            # it (so a single-consumer ring keeps its pad for the reader).
            try:
                if w[_HEAD] == start:
                    w[_HEAD] = self._head_seen = tail
                    return tail
            finally:
                clock.release()
        if w[_CWAIT]:
            self._not_empty.ring()
        return tail if room + need <= free else -1

    def try_write_many(self, items: Iterable[Any]) -> int:
        """Append records from ``items`` until one does not fit; publish once.
        Returns how many were written (a prefix of ``items``)."""
        lock = self._plock
        if lock is not None:
            lock.acquire()
        try:
            return self._write_many(items)
        finally:
            if lock is not None:
                lock.release()

    def _write_many(self, items: Iterable[Any]) -> int:
        if not self._segment.roles_marked & L.ROLE_PRODUCER:
            self._segment.add_role(L.ROLE_PRODUCER)
        w = self._w
        buf = self._buf
        cap = self._cap
        base = self._base
        maxm = self._maxm
        tail = start_tail = w[_TAIL]
        head = w[_HEAD]
        msgs = w[_MSGS_IN]
        room_msgs = (maxm - (msgs - w[_MSGS_OUT])) if maxm else -1
        count = 0
        nbytes = 0
        for data in items:
            if type(data) is not bytes:
                data = _as_bytes(data)
            n = len(data)
            need = (n + 15) & -8
            free = cap - tail + head
            if need > free or count == room_msgs:
                if n > cap - 8:
                    if count:
                        break
                    raise MessageTooLarge(f"record of {n} bytes can never fit a ring of {cap} bytes (max {cap - 8})")
                if need > free:
                    head = w[_HEAD]
                    free = cap - tail + head
                if need > free or count == room_msgs:
                    break
            off = tail % cap
            if need > cap - off:
                if count == 0:  # as try_write does: the pad may be skipped at once
                    tail = self._pad(tail, cap - off, need, free)
                    if tail < 0:
                        return 0
                    start_tail = tail  # _pad published it
                    head = w[_HEAD]
                elif cap - off + need <= free:
                    w[(base + off) >> 3] = off - cap
                    tail += cap - off
                else:
                    break
                off = 0
            pos = base + off
            buf[pos + 8 : pos + 8 + n] = data
            w[pos >> 3] = n
            tail += need
            count += 1
            nbytes += n
        if tail != start_tail:
            w[_MSGS_IN] = msgs + count
            used = tail - head
            if used > w[_PEAK]:
                w[_PEAK] = used
            w[_TAIL] = tail
            if w[_CWAIT]:
                self._not_empty.ring()
        return count

    def reserve(self, nbytes: int) -> Optional[memoryview]:
        """Claim room for a record of up to ``nbytes`` and return a writable
        view to build it in place; None if full.  Finish with :meth:`commit`
        or :meth:`abort`.  On a multi-producer ring the producer lock is held
        in between: keep it short.  Release the view before ``close()``."""
        if self._reserved:
            raise RuntimeError("a reserved record is still open: commit() or abort() it first")
        if not self._segment.roles_marked & L.ROLE_PRODUCER:
            self._segment.add_role(L.ROLE_PRODUCER)
        lock = self._plock
        if lock is not None:
            lock.acquire()
        try:
            n = int(nbytes)
            need = (n + 15) & -8
            w = self._w
            cap = self._cap
            tail = w[_TAIL]
            free = cap - tail + w[_HEAD]
            if n < 0 or n > cap - 8:
                raise MessageTooLarge(f"record of {n} bytes can never fit a ring of {cap} bytes (max {cap - 8})")
            if need > free or (self._maxm and w[_MSGS_IN] - w[_MSGS_OUT] >= self._maxm):
                view = None
            else:
                off = tail % cap
                if need > cap - off:
                    tail = self._pad(tail, cap - off, need, free)
                    off = 0
                if tail < 0:
                    view = None
                else:
                    pos = self._base + off
                    self._reserved = n + 1
                    self._reserved_pos = tail - tail % cap + off
                    return self._buf[pos + 8 : pos + 8 + n]
        except BaseException:
            if lock is not None:
                lock.release()
            raise
        if lock is not None:
            lock.release()
        return view

    def commit(self, nbytes: Optional[int] = None) -> None:
        """Publish the reserved record, ``nbytes`` long (default: as reserved)."""
        reserved = self._reserved - 1
        if reserved < 0:
            raise RuntimeError("commit() without reserve()")
        n = reserved if nbytes is None else int(nbytes)
        if not 0 <= n <= reserved:
            raise ValueError(f"'nbytes' must be between 0 and {reserved}, got {nbytes}")
        w = self._w
        start = self._reserved_pos
        self._reserved = 0
        try:
            w[(self._base + start % self._cap) >> 3] = n
            w[_MSGS_IN] += 1
            tail = start + ((n + 15) & -8)
            used = tail - w[_HEAD]
            if used > w[_PEAK]:
                w[_PEAK] = used
            w[_TAIL] = tail
            if w[_CWAIT]:
                self._not_empty.ring()
        finally:
            if self._plock is not None:
                self._plock.release()

    def abort(self) -> None:
        """Drop the reserved record without publishing anything."""
        if not self._reserved:
            return
        self._reserved = 0
        if self._plock is not None:
            self._plock.release()

    # -- reading --------------------------------------------------------
    def try_read(self) -> Optional[bytes]:
        """Remove and return the oldest record, or None if the ring is empty."""
        w = self._w
        sem = self._csem
        if sem is not None:
            head = w[_HEAD]
            if head >= self._tail_seen and head == w[_TAIL]:
                return None  # empty: no need for the lock
            if not sem.acquire(False):  # RobustLock.acquire, inlined
                self._clock._acquire_slow(None)
        try:
            if sem is not None:
                w[_COWNER] = _sync._PID
            head = w[_HEAD]
            # TAIL is the producers' cache line: read it only when caught up.
            if head >= self._tail_seen:  # >=: other consumers may be ahead of it
                self._tail_seen = w[_TAIL]
                if not self._segment.roles_marked & L.ROLE_CONSUMER:
                    self._segment.add_role(L.ROLE_CONSUMER)
                if head == self._tail_seen:
                    return None
            pos = self._base + head % self._cap
            n = w[pos >> 3]
            if n < 0:
                head = self._skip_pad(head, n)
                if head < 0:
                    return None
                pos = self._base
                n = w[pos >> 3]
            data = self._buf[pos + 8 : pos + 8 + n].tobytes()
            w[_MSGS_OUT] += 1
            w[_HEAD] = head + ((n + 15) & -8)
            if w[_PWAIT]:
                self._not_full.ring()
            return data
        finally:
            if sem is not None:
                try:
                    w[_COWNER] = 0
                finally:
                    sem.release()

    def _skip_pad(self, head: int, pad: int) -> int:
        """Consume a pad record; the new head, or -1 if nothing follows it yet."""
        w = self._w
        head -= pad
        self._tail_seen = w[_TAIL]
        if head == self._tail_seen:
            w[_HEAD] = head
            if w[_PWAIT]:
                self._not_full.ring()
            return -1
        return head

    # -- one record per object: try_write/try_read with the codec inlined --
    # shmq.Queue's put and get are these closures, bound to the queue handle
    # as methods (types.MethodType: they pickle as the handle's put and get):
    # with the encoding, the lock and the record in one Python frame (and the
    # ring's fields in cells, not attributes), an item costs about 70 ns less
    # on each side than a method that calls try_write / try_read.  They follow
    # try_write / try_read line for line (tests/test_crash.py kills a process
    # before each line of all four); the ring still never pickles: ``dumps``
    # and ``loads`` are the caller's.
    def encoding_writer(
        self,
        dumps: Callable[..., Any],
        protocol: int,
        buffer_callback: Optional[Callable[[Any], Any]],
        on_error: Callable[[Any, Exception], Any],
        limit: int,
        on_long: Callable[[Any, Any, Any, bool, Optional[float]], Any],
        on_full: Callable[[Any, Any, bool, Optional[float]], Any],
    ) -> Callable[..., Any]:
        """A function ``put(owner, obj, block=True, timeout=None)`` that
        appends ``dumps(obj, protocol, buffer_callback=buffer_callback)`` as
        one record (bind it to ``owner`` with types.MethodType).

        If ``dumps`` raises an Exception, ``on_error(obj, exc)`` gives the
        record (or raises).  A record longer than ``limit`` (at most
        ``max_payload``) is handed to ``on_long(owner, obj, data, block,
        timeout)``; when the ring is full, ``on_full(owner, data, block,
        timeout)`` is called once the lock is released.  ``put`` returns None
        when it wrote the record, else what the handler returned."""
        if limit > self.max_payload:
            raise ValueError(f"'limit' must be at most {self.max_payload}, got {limit}")
        ring = self
        w, buf, cap, base, maxm = self._w, self._buf, self._cap, self._base, self._maxm
        sem, lock = self._psem, self._plock
        refresh, pad, ring_bell = self._refresh_free, self._pad, self._not_empty.ring

        def put(owner: Any, obj: Any, block: bool = True, timeout: Optional[float] = None) -> Any:
            try:
                data = dumps(obj, protocol, buffer_callback=buffer_callback)
            except Exception as exc:
                data = on_error(obj, exc)
            n = len(data)
            if n > limit:
                return on_long(owner, obj, data, block, timeout)
            if sem is not None and not sem.acquire(False):  # RobustLock.acquire, inlined
                lock._acquire_slow(None)
            try:
                if sem is not None:
                    w[_POWNER] = _sync._PID
                need = (n + 15) & -8
                tail = w[_TAIL]
                free = cap - tail + ring._head_seen
                if need > free:
                    free = refresh(tail, need, n)
                if need <= free and not (maxm and w[_MSGS_IN] - w[_MSGS_OUT] >= maxm):
                    off = tail % cap
                    if need > cap - off:
                        if cap - off + need > free:
                            free = refresh(tail, need, n)
                        tail = pad(tail, cap - off, need, free)
                        off = 0
                    if tail >= 0:
                        pos = base + off
                        buf[pos + 8 : pos + 8 + n] = data
                        w[pos >> 3] = n
                        w[_MSGS_IN] += 1
                        w[_TAIL] = tail + need
                        if w[_CWAIT]:
                            ring_bell()
                        return None
            finally:
                if sem is not None:
                    try:
                        w[_POWNER] = 0
                    finally:  # (a handle closed under a hoisted put: still free the lock)
                        sem.release()
            return on_full(owner, data, block, timeout)

        return put

    def decoding_reader(
        self,
        loads: Callable[[Any], Any],
        on_error: Callable[[Any, Any, Exception], Any],
        on_empty: Callable[[Any, Optional[bytes], bool, Optional[float]], Any],
        held: Any = (),
        on_held: Optional[Callable[[Any, bool, Optional[float]], Any]] = None,
    ) -> Callable[..., Any]:
        """A function ``get(owner, block=True, timeout=None)`` that removes the
        oldest record and returns ``loads(record)`` (bind it to ``owner`` with
        types.MethodType).

        If ``loads`` raises an Exception, ``on_error(owner, record, exc)``
        gives the result.  When the ring is empty (record None) or the record
        is empty (b""), ``get`` returns ``on_empty(owner, record, block,
        timeout)``.  While ``held`` (records the caller took earlier, to return
        first) is not empty, ``get`` returns ``on_held(owner, block, timeout)``
        instead."""
        ring = self
        w, buf, cap, base = self._w, self._buf, self._cap, self._base
        sem, lock = self._csem, self._clock
        segment, skip_pad, ring_bell = self._segment, self._skip_pad, self._not_full.ring

        def get(owner: Any, block: bool = True, timeout: Optional[float] = None) -> Any:
            if held:
                return on_held(owner, block, timeout)
            if sem is not None:
                head = w[_HEAD]
                if head >= ring._tail_seen and head == w[_TAIL]:
                    return on_empty(owner, None, block, timeout)  # empty: no need for the lock
                if not sem.acquire(False):  # RobustLock.acquire, inlined
                    lock._acquire_slow(None)
            data = None
            try:
                if sem is not None:
                    w[_COWNER] = _sync._PID
                head = w[_HEAD]
                tail_seen = ring._tail_seen
                if head >= tail_seen:
                    ring._tail_seen = tail_seen = w[_TAIL]
                    if not segment.roles_marked & L.ROLE_CONSUMER:
                        segment.add_role(L.ROLE_CONSUMER)
                if head != tail_seen:
                    pos = base + head % cap
                    n = w[pos >> 3]
                    if n < 0:
                        head = skip_pad(head, n)
                        if head >= 0:
                            pos = base
                            n = w[pos >> 3]
                    if head >= 0:
                        data = buf[pos + 8 : pos + 8 + n].tobytes()
                        w[_MSGS_OUT] += 1
                        w[_HEAD] = head + ((n + 15) & -8)
                        if w[_PWAIT]:
                            ring_bell()
            finally:
                if sem is not None:
                    try:
                        w[_COWNER] = 0
                    finally:
                        sem.release()
            if data:
                try:
                    return loads(data)
                except Exception as exc:
                    return on_error(owner, data, exc)
            return on_empty(owner, data, block, timeout)

        return get

    def try_read_many(self, max_items: int = 1 << 30, max_bytes: int = 1 << 62) -> List[bytes]:
        """Remove up to ``max_items`` records (and about ``max_bytes`` of
        payload, always at least one record); publish once.  [] if empty."""
        lock = self._clock
        if lock is not None:
            w = self._w
            if w[_HEAD] == w[_TAIL]:
                return []
            lock.acquire()
        try:
            return self._read_many(max_items, max_bytes)
        finally:
            if lock is not None:
                lock.release()

    def _read_many(self, max_items: int, max_bytes: int) -> List[bytes]:
        if not self._segment.roles_marked & L.ROLE_CONSUMER:
            self._segment.add_role(L.ROLE_CONSUMER)
        w = self._w
        buf = self._buf
        cap = self._cap
        base = self._base
        head = start = w[_HEAD]
        tail = w[_TAIL]
        out: List[bytes] = []
        append = out.append
        nbytes = 0
        while head != tail and len(out) < max_items and nbytes < max_bytes:
            pos = base + head % cap
            n = w[pos >> 3]
            if n < 0:
                head -= n
                continue
            append(buf[pos + 8 : pos + 8 + n].tobytes())
            nbytes += n
            head += (n + 15) & -8
        if head != start:
            w[_MSGS_OUT] += len(out)
            w[_HEAD] = head
            if w[_PWAIT]:
                self._not_full.ring()
        return out

    def peek(self) -> Optional[memoryview]:
        """A read-only view of the oldest record, in place, or None if empty.
        The record stays until :meth:`release`; on a multi-consumer ring the
        consumer lock is held until then.  Release the view before ``close()``."""
        if self._peeked:
            raise RuntimeError("a peeked record is still open: release() it first")
        if not self._segment.roles_marked & L.ROLE_CONSUMER:
            self._segment.add_role(L.ROLE_CONSUMER)
        lock = self._clock
        w = self._w
        if lock is not None:
            if w[_HEAD] == w[_TAIL]:
                return None
            lock.acquire()
        head = w[_HEAD]
        if head != w[_TAIL]:
            pos = self._base + head % self._cap
            n = w[pos >> 3]
            if n < 0:
                head = self._skip_pad(head, n)
                pos = self._base
                n = w[pos >> 3] if head >= 0 else 0
            if head >= 0:
                self._peeked = n + 1
                self._peeked_pos = head  # the record's own position
                return self._rbuf[pos + 8 : pos + 8 + n]
        if lock is not None:
            lock.release()
        return None

    def release(self) -> None:
        """Remove the record returned by :meth:`peek`."""
        n = self._peeked - 1
        if n < 0:
            raise RuntimeError("release() without peek()")
        self._peeked = 0
        w = self._w
        try:
            w[_MSGS_OUT] += 1
            w[_HEAD] = self._peeked_pos + ((n + 15) & -8)
            if w[_PWAIT]:
                self._not_full.ring()
        finally:
            if self._clock is not None:
                self._clock.release()

    def _repair_counters(self) -> None:
        """Make MSGS_IN - MSGS_OUT equal the records between HEAD and TAIL.

        A process killed between bumping its side's message counter and
        publishing its index leaves the counter one off.  With both locks held
        nobody is between the two, so counting the records gives the truth;
        the side whose lock was recovered is the one corrected by the caller's
        choice of lock, but fixing whichever differs is equivalent."""
        me = get_ident()
        if self._repairing == me:
            # Taking the second lock below recovered it from a dead holder too
            # (killed holding both): the repair under way counts for both.
            return
        self._repairing = me
        try:
            self._repair_counters_locked()
        finally:
            self._repairing = 0

    def _repair_counters_locked(self) -> None:
        plock, clock = self._plock, self._clock
        # Best effort, bounded: this thread may itself hold one of the locks
        # (an open reserve() or peek()); then the counters stay as they are.
        if not plock.acquire(_REPAIR_WAIT):
            return
        try:
            if not clock.acquire(_REPAIR_WAIT):
                return
            try:
                w = self._w
                cap, base = self._cap, self._base
                head, tail = w[_HEAD], w[_TAIL]
                records = 0
                while head < tail:
                    n = w[(base + head % cap) >> 3]
                    if n < 0:
                        head -= n
                    else:
                        records += 1
                        head += (n + 15) & -8
                if w[_MSGS_IN] - w[_MSGS_OUT] != records:
                    # Producers bump MSGS_IN before TAIL: an excess there is a
                    # producer's; consumers bump MSGS_OUT before HEAD: a
                    # deficit is a consumer's.
                    if w[_MSGS_IN] - w[_MSGS_OUT] > records:
                        w[_MSGS_IN] = w[_MSGS_OUT] + records
                    else:
                        w[_MSGS_OUT] = w[_MSGS_IN] - records
            finally:
                clock.release()
        finally:
            plock.release()

    # -- state ----------------------------------------------------------
    def qsize(self) -> int:
        """Records in the ring now (exact when no operation is in flight)."""
        w = self._w
        n = w[_MSGS_IN] - w[_MSGS_OUT]
        return n if n > 0 else 0

    def bytes_used(self) -> int:
        """Ring bytes held by unread records, headers and padding included."""
        w = self._w
        return w[_TAIL] - w[_HEAD]

    def empty(self) -> bool:
        w = self._w
        return w[_HEAD] == w[_TAIL]

    def full(self) -> bool:
        """True if not even an empty record fits now."""
        w = self._w
        if self._maxm and w[_MSGS_IN] - w[_MSGS_OUT] >= self._maxm:
            return True
        return self._cap - (w[_TAIL] - w[_HEAD]) < 8

    def can_write(self, nbytes: int) -> bool:
        """Whether a record of ``nbytes`` would fit now (a hint: no lock)."""
        w = self._w
        if self._maxm and w[_MSGS_IN] - w[_MSGS_OUT] >= self._maxm:
            return False
        tail = w[_TAIL]
        need = (nbytes + 15) & -8
        free = self._cap - tail + w[_HEAD]
        room = self._cap - tail % self._cap
        return need <= free and (need <= room or room + need <= free or room <= free)

    def can_read(self) -> bool:
        w = self._w
        return w[_HEAD] != w[_TAIL]

    def counters(self) -> Dict[str, int]:
        """A snapshot of the header counters (see ``_layout``)."""
        w = self._w
        return {
            "capacity_bytes": self._cap,
            "max_messages": self._maxm,
            "messages_in": w[_MSGS_IN],
            "bytes_in": w[_TAIL],
            "messages_out": w[_MSGS_OUT],
            "bytes_out": w[_HEAD],
            "bytes_used": w[_TAIL] - w[_HEAD],
            "peak_bytes": w[_PEAK],
            "full_waits": w[L.W_FULL_WAITS],
            "full_wait_ns": w[L.W_FULL_WAIT_NS],
            "empty_waits": w[L.W_EMPTY_WAITS],
            "empty_wait_ns": w[L.W_EMPTY_WAIT_NS],
        }

    @property
    def segment(self) -> Segment:
        return self._segment

    def participants(self):
        return self._segment.participants()

    def creator_alive(self) -> bool:
        return self._segment.creator_alive()

    # -- lifetime -------------------------------------------------------
    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """End this handle (idempotent).  The ring stays for other processes."""
        if self._closed:
            return
        self._closed = True
        for opened, lock in ((self._reserved, self._plock), (self._peeked, self._clock)):
            if opened and lock is not None and lock.holder() == os.getpid():
                lock.release()
        self._reserved = self._peeked = 0
        self._rbuf.release()
        self._w = self._buf = self._rbuf = None  # type: ignore[assignment]
        self._segment.close()
        # Any later operation fails on None; make it a clear ClosedError instead.
        self.__class__ = _closed_class(type(self))

    def unlink(self) -> None:
        """Remove the ring's name and semaphores for every process."""
        self._segment.unlink()

    def __enter__(self):
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        if self._closed:
            return f"<{type(self).__name__} {self.name!r} closed>"
        return f"<{type(self).__name__} {self.name!r} {self.bytes_used()}/{self._cap} bytes, {self.qsize()} records>"


_CLOSED_CLASSES: Dict[type, type] = {}
_KEEP_OPEN = {"close", "unlink", "__repr__", "__exit__", "__enter__", "__reduce__", "closed", "name"}


def _closed_class(cls: type, keep: Iterable[str] = ()) -> type:
    """A subclass of ``cls`` whose operations raise ClosedError (except the
    methods in ``keep``, and close/unlink/...)."""
    if cls in _CLOSED_CLASSES or getattr(cls, "_is_closed_class", False):
        return _CLOSED_CLASSES.get(cls, cls)

    def make(attr: str):
        def closed(self, *args: Any, **kwargs: Any):
            raise ClosedError(f"{type(self).__mro__[1].__name__} {self.name!r} is closed")

        closed.__name__ = attr
        return closed

    ns: Dict[str, Any] = {"_is_closed_class": True}
    for klass in cls.__mro__:
        for attr, value in vars(klass).items():
            if attr in ns or attr in _KEEP_OPEN or attr in keep or attr.startswith("__"):
                continue
            if callable(value) and not isinstance(value, (staticmethod, classmethod, type)):
                ns[attr] = make(attr)
    new = type(cls.__name__, (cls,), ns)
    new.__qualname__ = cls.__qualname__
    _CLOSED_CLASSES[cls] = new
    return new
