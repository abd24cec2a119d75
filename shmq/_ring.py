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

import dataclasses
import os
import time
import platform
import weakref
from threading import get_ident
from typing import Any, Callable, Iterable, List, Optional, Tuple

from . import _layout as L
from . import _platform as P
from ._errors import BrokenError, ClosedError, CorruptError, LayoutError, MessageTooLarge, ShmqError
from . import _sync
from ._segment import ParticipantInfo, Segment, participant_infos
from ._sync import Doorbell, RobustLock

__all__ = ("RingBuffer", "DEFAULT_CAPACITY_BYTES", "RingStatistics", "read_ring_statistics", "ring_statistics")

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


def _load_core() -> Any:
    """shmq._core if it is built, matches this layout and SHMQ_PURE is not
    set; else None (the pure-Python core).  See docs/core.md."""
    if os.environ.get("SHMQ_PURE", "") not in ("", "0"):
        # _platform let a non-x86-64 CPU through because the core is built;
        # the pure-Python moves still need x86-64's store order.
        problem = P.memory_order_problem(platform.machine(), compiled_core=False)
        if problem is not None:
            raise ImportError(problem + " (SHMQ_PURE is set)")
        return None
    try:
        from . import _core
    except ImportError:
        return None
    layout = getattr(_core, "LAYOUT", None)
    if not isinstance(layout, dict) or not hasattr(_core, "RingCore"):
        return None  # not a core of this version
    expected = {k: getattr(L, k, None) for k in layout}
    return _core if layout == expected else None


_core = _load_core()
#: which core runs the record moves: "c" (shmq._core) or "python"
CORE = "python" if _core is None else "c"
# With the C core, RingBuffer's per-record fields (_head_seen, _tail_seen,
# _buf, _psem, _csem, and copies of _cap, _base, _maxm) are C members of this base,
# and its try_write/try_read replace the Python ones (end of this module).
_RingBase: Any = object if _core is None else _core.RingCore


def _as_bytes(data: Any) -> Any:
    if type(data) is bytes:
        return data
    mv = memoryview(data)
    return mv if (mv.format == "B" and mv.ndim == 1) else mv.cast("B")


# Open rings, so a forked child starts them stale (see _forget_seen).
_live_rings: "weakref.WeakSet[RingBuffer]" = weakref.WeakSet()
# A HEAD / TAIL older than any (positions only grow from 0): a writer holding
# it re-reads HEAD, a reader TAIL, and checks both, before its first record.
_LONG_AGO = -(1 << 63)


def _after_fork_in_child() -> None:
    for ring in list(_live_rings):
        if not ring._closed:
            ring._forget_seen()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


class RingBuffer(_RingBase):
    """A named ring of byte records shared by any number of processes.

    Create with :meth:`create`, attach from any process with :meth:`attach`
    (the handle pickles as its name).  ``close()`` ends this handle;
    ``unlink()`` removes the name (the creator does that at exit otherwise).
    """

    _closed = True

    def __init__(self, segment: Segment) -> None:
        self._segment = segment
        self.name = segment.name
        w = segment.words
        cap, maxm, flags = w[L.W_CAPACITY], w[L.W_MAX_MESSAGES], w[L.W_FLAGS]
        # The geometry is read once, here: check it against the segment, so a
        # corrupt header fails the attach rather than a later read or write.
        if cap < L.MIN_CAPACITY or cap % L.WORD or L.ring_segment_size(cap) > segment.size:
            raise LayoutError(
                f"ring {self.name!r}: CAPACITY {cap} does not fit a segment of {segment.size} bytes "
                f"(expected a multiple of {L.WORD}, at least {L.MIN_CAPACITY}, at most "
                f"{segment.size - L.ring_segment_size(0)})"
            )
        if maxm < 0:
            raise LayoutError(f"ring {self.name!r}: MAX_MESSAGES {maxm} is negative")
        if flags & ~(L.FLAG_MULTI_PRODUCER | L.FLAG_MULTI_CONSUMER):
            raise LayoutError(f"ring {self.name!r}: unknown FLAGS {flags:#x}")
        self._w = w
        self._buf = segment.buf
        self._rbuf = segment.buf.toreadonly()
        self.capacity_bytes = cap
        self.max_messages = maxm
        self.max_payload = L.max_payload(cap)
        self.multi_producer = bool(flags & L.FLAG_MULTI_PRODUCER)
        self.multi_consumer = bool(flags & L.FLAG_MULTI_CONSUMER)
        self._cap = cap
        self._base = L.DATA_OFFSET
        self._maxm = self.max_messages
        if _core is not None:  # (the C moves' copies: see docs/core.md)
            self._c_cap, self._c_base, self._c_maxm = cap, L.DATA_OFFSET, maxm
        self._not_empty = Doorbell(self._semaphore("-ne"), w, _CWAIT)
        self._not_full = Doorbell(self._semaphore("-nf"), w, _PWAIT)
        self._plock = self._clock = None
        if self.multi_producer:
            self._plock = RobustLock(self._semaphore("-pl", lock=True), segment, L.W_PRODUCER_LOCK, w_progress=_MSGS_IN)
        if self.multi_consumer:
            self._clock = RobustLock(self._semaphore("-cl", lock=True), segment, L.W_CONSUMER_LOCK, w_progress=_MSGS_OUT)
        if self._plock is not None and self._clock is not None:
            self._plock.on_recover = self._clock.on_recover = self._repair_counters
        # The semaphores of the locks, for try_write/try_read (None: no lock).
        self._psem = None if self._plock is None else self._plock._sem
        self._csem = None if self._clock is None else self._clock._sem
        # size + 1 of the record reserve() / peek() opened on this handle, 0 if
        # none; where the reserved record's header goes (byte position, ring
        # position) and where the peeked one ends: each side has its own, so
        # commit()/abort() can never act on a peeked record nor release() on a
        # reserved one.
        self._reserved = self._reserved_pos = self._reserved_tail = 0
        self._peeked = self._peeked_end = 0
        self._repairing = 0  # thread repairing the counters (see _repair_counters)
        self._forget_seen()
        self._closed = False
        _live_rings.add(self)

    def _semaphore(self, suffix: str, lock: bool = False):
        """The ring's semaphore ``name + suffix``: created by the creator,
        opened by an attacher (BrokenError if it is missing)."""
        name = self._segment.name + suffix
        try:
            return P.semaphore(name, self._segment.is_creator, lock=lock)
        except FileNotFoundError as exc:
            raise BrokenError(
                f"ring {self.name!r}: semaphore {name!r} is missing (removed, for example by systemd's "
                "RemoveIPC, or FLAGS name a lock the ring was created without)"
            ) from exc

    def _forget_seen(self) -> None:
        # Start stale, so each side's first operation in a process takes the
        # refresh branch, which records the process's role in the participant
        # table (before a reader takes its first record: see docs/zero_copy.md).
        self._head_seen = self._tail_seen = _LONG_AGO

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
        self._check_open()
        return (type(self).attach, (self.name,))

    # -- checks -------------------------------------------------------------
    def _check_open(self) -> None:
        if self._closed:
            raise self._closed_error()

    def _closed_error(self) -> ClosedError:
        return ClosedError(f"{type(self).__name__} {self.name!r} is closed")

    def _failure(self, exc: ValueError) -> Exception:
        """What a ValueError inside a record move means: ``exc`` itself if it
        is shmq's (MessageTooLarge); else this handle was closed meanwhile
        (its views released), or a shared word overflowed int64."""
        if isinstance(exc, ShmqError):
            return exc
        err = self._closed_error() if self._closed else CorruptError(
            f"ring {self.name!r}: a shared word is out of range ({exc})"
        )
        err.__cause__ = exc
        return err

    def _corrupt_indices(self, head: int, tail: int) -> CorruptError:
        return CorruptError(
            f"ring {self.name!r} is corrupt: HEAD {head}, TAIL {tail} (capacity {self._cap}; "
            "0 <= HEAD <= TAIL <= HEAD + capacity, multiples of 8)"
        )

    def _corrupt_record(self, head: int, n: int, tail: int) -> CorruptError:
        return CorruptError(
            f"ring {self.name!r} is corrupt: the record at {head} has length word {n}, "
            f"which does not fit before TAIL {tail} (capacity {self._cap})"
        )

    # -- off the common path of a record move ------------------------------------
    def _refresh_free(self, tail: int, n: int) -> int:
        """Re-read HEAD; record peak occupancy; the free bytes.  Raises
        MessageTooLarge if ``n`` never fits, CorruptError for impossible
        indices."""
        w = self._w
        cap = self._cap
        head = w[_HEAD]
        used = tail - head
        if not 0 <= used <= cap or (head | tail) & 7:
            raise self._corrupt_indices(head, tail)
        self._head_seen = head
        if not self._segment.roles_marked & L.ROLE_PRODUCER:
            self._segment.add_role(L.ROLE_PRODUCER)
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

    def _check_pad(self, head: int, pad: int, tail: int) -> int:
        """Where the pad record (header word ``pad`` < 0) at ``head`` ends.
        Raises CorruptError unless it fills the rest of the data area and
        was published (ends by ``tail``)."""
        end = head - pad
        if end % self._cap or -pad >= self._cap or end > tail:
            raise self._corrupt_record(head, pad, tail)
        return end

    def _skip_pad(self, head: int, pad: int) -> Tuple[int, int, int]:
        """Pass the pad at ``head``: (head, length, end) of the record after
        it, at the start of the data area, or (-1, -1, -1) if none follows it
        yet (the pad is consumed).  Raises CorruptError for a bad pad or record."""
        w = self._w
        tail = w[_TAIL]
        end = self._check_pad(head, pad, tail)
        if tail > head + self._cap:
            raise self._corrupt_indices(head, tail)
        self._tail_seen = tail
        head = end
        if head == tail:
            w[_HEAD] = head
            if w[_PWAIT]:
                self._not_full.ring()
            return -1, -1, -1
        n = w[self._base >> 3]
        end = head + ((n + 15) & -8)
        if n < 0 or end > tail:
            raise self._corrupt_record(head, n, tail)
        return head, n, end

    # -- batches and split moves: the locking around the generated parts ---------
    def try_write_many(self, items: Iterable[Any]) -> int:
        """Append records from ``items`` until one does not fit; publish once
        (twice if the batch wraps around the end of the data area).  Returns
        how many were written (a prefix of ``items``)."""
        self._check_open()
        lock = self._plock
        if lock is not None:
            lock.acquire()
        try:
            return self._write_many(items)
        finally:
            if lock is not None:
                lock.release()

    def abort(self) -> None:
        """Drop the reserved record without publishing anything."""
        self._check_open()
        if not self._reserved:
            return
        self._reserved = 0
        if self._plock is not None:
            self._plock.release()

    def try_read_many(self, max_items: int = 1 << 30, max_bytes: int = 1 << 62) -> List[bytes]:
        """Remove up to ``max_items`` records (and about ``max_bytes`` of
        payload, always at least one record); publish once.  [] if empty."""
        self._check_open()
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

    # The record moves: written out by tools/gen_ring.py from one template
    # (see docs/ring-hot-path.md).  try_write/try_read are one function each,
    # with the lock inlined; shmq.Queue's put and get are the closures of
    # encoding_writer/decoding_reader, bound to the queue handle as methods
    # (types.MethodType: they pickle as the handle's put and get).  The ring
    # never pickles: ``dumps`` and ``loads`` are the caller's.
    # ---- generated by tools/gen_ring.py from its TEMPLATE: edit there, then run it ----
    # -- writing --------------------------------------------------------
    def try_write(self, data: Any) -> bool:
        """Append one record.  True if written, False if the ring is full
        (in bytes or in messages).  Raises MessageTooLarge if it can never fit."""
        if type(data) is not bytes:
            data = _as_bytes(data)
        n = len(data)
        w = self._w
        cap = self._cap
        sem = self._psem
        if sem is not None and not sem.acquire(False):  # RobustLock.acquire, inlined
            self._plock._acquire_slow(None)
        try:
            if sem is not None:
                w[_POWNER] = _sync._PID
            tail = w[_TAIL]
            need = (n + 15) & -8
            # HEAD is the consumers' cache line: read it only when the last value
            # seen says there is no room (it only grows, so a stale one is safe).
            free = cap - tail + self._head_seen
            if need > free:
                free = self._refresh_free(tail, n)  # (raises MessageTooLarge, CorruptError)
            off = tail % cap
            if need > free or (self._maxm and w[_MSGS_IN] - w[_MSGS_OUT] >= self._maxm):
                pos = -1
            elif need <= cap - off:
                pos = self._base + off
            else:  # the record would wrap: pad the end of the data area, start it at 0
                if cap - off + need > free:  # the HEAD seen may be old: look again first
                    free = self._refresh_free(tail, n)
                tail = self._pad(tail, cap - off, need, free)  # (-1: no room after the pad)
                pos = self._base if tail >= 0 else -1
            if pos < 0:
                return False
            self._buf[pos + 8 : pos + 8 + n] = data
            w[pos >> 3] = n
            w[_MSGS_IN] += 1
            w[_TAIL] = tail + need
            if w[_CWAIT]:
                self._not_empty.ring()
            return True
        except ValueError as exc:
            raise self._failure(exc)
        finally:
            if sem is not None:
                try:
                    w[_POWNER] = 0
                except ValueError:  # a closed handle's released view: nothing was stored
                    pass
                finally:
                    sem.release()

    def _write_many(self, items: Iterable[Any]) -> int:
        """try_write_many under the producer lock."""
        w = self._w
        buf = self._buf
        cap = self._cap
        base = self._base
        maxm = self._maxm
        tail = w[_TAIL]
        room_msgs = (maxm - (w[_MSGS_IN] - w[_MSGS_OUT])) if maxm else -1
        count = pending = 0  # records written; of those, not yet published
        try:
            for data in items:
                if type(data) is not bytes:
                    data = _as_bytes(data)
                n = len(data)
                if count and n > cap - 8:
                    break  # (the first record raises MessageTooLarge below)
                need = (n + 15) & -8
                # HEAD is the consumers' cache line: read it only when the last value
                # seen says there is no room (it only grows, so a stale one is safe).
                free = cap - tail + self._head_seen
                if need > free:
                    free = self._refresh_free(tail, n)  # (raises MessageTooLarge, CorruptError)
                off = tail % cap
                if need > free or count == room_msgs:
                    pos = -1
                elif need <= cap - off:
                    pos = base + off
                else:  # the record would wrap: pad the end of the data area, start it at 0
                    if cap - off + need > free:  # the HEAD seen may be old: look again first
                        free = self._refresh_free(tail, n)
                    if pending:
                        w[_MSGS_IN] += pending
                        w[_TAIL] = tail
                        if w[_CWAIT]:
                            self._not_empty.ring()
                        pending = 0
                    tail = self._pad(tail, cap - off, need, free)  # (-1: no room after the pad)
                    pos = base if tail >= 0 else -1
                if pos < 0:
                    break
                buf[pos + 8 : pos + 8 + n] = data
                w[pos >> 3] = n
                tail += need  # (tail is where the record went: past a pad, if any)
                count += 1
                pending += 1
            if pending:
                w[_MSGS_IN] += pending
                w[_TAIL] = tail
                if w[_CWAIT]:
                    self._not_empty.ring()
            return count
        except ValueError as exc:
            raise self._failure(exc)

    def reserve(self, nbytes: int) -> Optional[memoryview]:
        """Claim room for a record of up to ``nbytes`` and return a writable
        view to build it in place; None if full.  Finish with :meth:`commit`
        or :meth:`abort`.  On a multi-producer ring the producer lock is held
        in between: keep it short.  Release the view before ``close()``."""
        self._check_open()
        if self._reserved:
            raise RuntimeError("a reserved record is still open: commit() or abort() it first")
        n = int(nbytes)
        if n < 0:
            raise ValueError(f"'nbytes' must be >= 0, got {nbytes!r}")
        w = self._w
        buf = self._buf
        cap = self._cap
        base = self._base
        maxm = self._maxm
        lock = self._plock
        if lock is not None:
            lock.acquire()
        try:
            tail = w[_TAIL]
            need = (n + 15) & -8
            # HEAD is the consumers' cache line: read it only when the last value
            # seen says there is no room (it only grows, so a stale one is safe).
            free = cap - tail + self._head_seen
            if need > free:
                free = self._refresh_free(tail, n)  # (raises MessageTooLarge, CorruptError)
            off = tail % cap
            if need > free or (maxm and w[_MSGS_IN] - w[_MSGS_OUT] >= maxm):
                pos = -1
            elif need <= cap - off:
                pos = base + off
            else:  # the record would wrap: pad the end of the data area, start it at 0
                if cap - off + need > free:  # the HEAD seen may be old: look again first
                    free = self._refresh_free(tail, n)
                tail = self._pad(tail, cap - off, need, free)  # (-1: no room after the pad)
                pos = base if tail >= 0 else -1
        except BaseException:
            if lock is not None:
                lock.release()
            raise
        if pos < 0:
            if lock is not None:
                lock.release()
            return None
        self._reserved = n + 1
        self._reserved_pos = pos
        self._reserved_tail = tail
        return buf[pos + 8 : pos + 8 + n]

    def commit(self, nbytes: Optional[int] = None) -> None:
        """Publish the reserved record, ``nbytes`` long (default: as reserved)."""
        self._check_open()
        reserved = self._reserved - 1
        if reserved < 0:
            raise RuntimeError("commit() without reserve()")
        n = reserved if nbytes is None else int(nbytes)
        if not 0 <= n <= reserved:
            raise ValueError(f"'nbytes' must be between 0 and {reserved}, got {nbytes}")
        w, pos, tail = self._w, self._reserved_pos, self._reserved_tail
        need = (n + 15) & -8
        self._reserved = 0
        try:
            w[pos >> 3] = n
            w[_MSGS_IN] += 1
            w[_TAIL] = tail + need
            if w[_CWAIT]:
                self._not_empty.ring()
        except ValueError as exc:
            raise self._failure(exc)
        finally:
            if self._plock is not None:
                self._plock.release()

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
        one record (bind it to ``owner`` with types.MethodType): try_write
        with the encoding in the same frame.

        If ``dumps`` raises an Exception, ``on_error(obj, exc)`` gives the
        record (or raises).  A record longer than ``limit`` (at most
        ``max_payload``) is handed to ``on_long(owner, obj, data, block,
        timeout)``; when the ring is full, ``on_full(owner, data, block,
        timeout)`` is called once the lock is released.  ``put`` returns None
        when it wrote the record, else what the handler returned; ClosedError
        once this ring handle is closed."""
        if limit > self.max_payload:
            raise ValueError(f"'limit' must be at most {self.max_payload}, got {limit}")
        w = self._w
        buf = self._buf
        cap = self._cap
        base = self._base
        maxm = self._maxm
        sem = self._psem

        def put(owner: Any, obj: Any, block: bool = True, timeout: Optional[float] = None) -> Any:
            try:
                data = dumps(obj, protocol, buffer_callback=buffer_callback)
            except Exception as exc:
                data = on_error(obj, exc)
            n = len(data)
            if n > limit:
                return on_long(owner, obj, data, block, timeout)
            if sem is not None and not sem.acquire(False):  # RobustLock.acquire, inlined
                self._plock._acquire_slow(None)
            try:
                if sem is not None:
                    w[_POWNER] = _sync._PID
                tail = w[_TAIL]
                need = (n + 15) & -8
                # HEAD is the consumers' cache line: read it only when the last value
                # seen says there is no room (it only grows, so a stale one is safe).
                free = cap - tail + self._head_seen
                if need > free:
                    free = self._refresh_free(tail, n)  # (raises MessageTooLarge, CorruptError)
                off = tail % cap
                if need > free or (maxm and w[_MSGS_IN] - w[_MSGS_OUT] >= maxm):
                    pos = -1
                elif need <= cap - off:
                    pos = base + off
                else:  # the record would wrap: pad the end of the data area, start it at 0
                    if cap - off + need > free:  # the HEAD seen may be old: look again first
                        free = self._refresh_free(tail, n)
                    tail = self._pad(tail, cap - off, need, free)  # (-1: no room after the pad)
                    pos = base if tail >= 0 else -1
                if pos >= 0:
                    buf[pos + 8 : pos + 8 + n] = data
                    w[pos >> 3] = n
                    w[_MSGS_IN] += 1
                    w[_TAIL] = tail + need
                    if w[_CWAIT]:
                        self._not_empty.ring()
                    return None
            except ValueError as exc:
                raise self._failure(exc)
            finally:
                if sem is not None:
                    try:
                        w[_POWNER] = 0
                    except ValueError:  # a closed handle's released view: nothing was stored
                        pass
                    finally:
                        sem.release()
            return on_full(owner, data, block, timeout)

        return put

    # -- reading --------------------------------------------------------
    def try_read(self) -> Optional[bytes]:
        """Remove and return the oldest record, or None if the ring is empty.
        Raises CorruptError if the ring's indices or the record's length
        word are impossible."""
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
            tail_seen = self._tail_seen
            # TAIL is the producers' cache line: read it only when caught up.
            if head >= tail_seen:  # >=: other consumers may be ahead of it
                tail_seen = w[_TAIL]
                if not self._segment.roles_marked & L.ROLE_CONSUMER:
                    self._segment.add_role(L.ROLE_CONSUMER)
                if not 0 <= head <= tail_seen <= head + self._cap:
                    raise self._corrupt_indices(head, tail_seen)
                self._tail_seen = tail_seen  # (only once checked: later reads trust it)
                if head == tail_seen:
                    return None
            pos = self._base + head % self._cap
            n = w[pos >> 3]
            if n < 0:  # a pad fills the end of the data area: the record after it starts the area
                head, n, end = self._skip_pad(head, n)  # (validates the pad and that record)
                pos = self._base
                if n < 0:
                    return None
            else:
                end = head + ((n + 15) & -8)
                if end > tail_seen:
                    raise self._corrupt_record(head, n, tail_seen)
            data = self._buf[pos + 8 : pos + 8 + n].tobytes()
            w[_MSGS_OUT] += 1
            w[_HEAD] = end
            if w[_PWAIT]:
                self._not_full.ring()
            return data
        except ValueError as exc:
            raise self._failure(exc)
        finally:
            if sem is not None:
                try:
                    w[_COWNER] = 0
                except ValueError:  # a closed handle's released view: nothing was stored
                    pass
                finally:
                    sem.release()

    def _read_many(self, max_items: int, max_bytes: int) -> List[bytes]:
        """try_read_many under the consumer lock."""
        w = self._w
        buf = self._buf
        cap = self._cap
        base = self._base
        out: List[bytes] = []
        try:
            head = start = w[_HEAD]
            tail_seen = w[_TAIL]
            if not self._segment.roles_marked & L.ROLE_CONSUMER:
                self._segment.add_role(L.ROLE_CONSUMER)
            if not 0 <= head <= tail_seen <= head + cap:
                raise self._corrupt_indices(head, tail_seen)
            self._tail_seen = tail_seen  # (only once checked: later reads trust it)
            append = out.append
            nbytes = 0
            while head != tail_seen and len(out) < max_items and nbytes < max_bytes:
                pos = base + head % cap
                n = w[pos >> 3]
                if n < 0:
                    head = self._check_pad(head, n, tail_seen)
                    continue
                end = head + ((n + 15) & -8)
                if end > tail_seen:
                    raise self._corrupt_record(head, n, tail_seen)
                append(buf[pos + 8 : pos + 8 + n].tobytes())
                nbytes += n
                head = end
            if head != start:
                w[_MSGS_OUT] += len(out)
                w[_HEAD] = head
                if w[_PWAIT]:
                    self._not_full.ring()
            return out
        except ValueError as exc:
            raise self._failure(exc)

    def peek(self) -> Optional[memoryview]:
        """A read-only view of the oldest record, in place, or None if empty.
        The record stays until :meth:`release`; on a multi-consumer ring the
        consumer lock is held until then.  Release the view before ``close()``."""
        self._check_open()
        if self._peeked:
            raise RuntimeError("a peeked record is still open: release() it first")
        w, cap, base = self._w, self._cap, self._base
        lock = self._clock
        if lock is not None:
            if w[_HEAD] == w[_TAIL]:
                return None
            lock.acquire()
        try:
            head = w[_HEAD]
            tail_seen = self._tail_seen
            # TAIL is the producers' cache line: read it only when caught up.
            if head >= tail_seen:  # >=: other consumers may be ahead of it
                tail_seen = w[_TAIL]
                if not self._segment.roles_marked & L.ROLE_CONSUMER:
                    self._segment.add_role(L.ROLE_CONSUMER)
                if not 0 <= head <= tail_seen <= head + cap:
                    raise self._corrupt_indices(head, tail_seen)
                self._tail_seen = tail_seen  # (only once checked: later reads trust it)
            n = -1
            if head != tail_seen:
                pos = base + head % cap
                n = w[pos >> 3]
                if n < 0:  # a pad fills the end of the data area: the record after it starts the area
                    head, n, end = self._skip_pad(head, n)  # (validates the pad and that record)
                    pos = base
                else:
                    end = head + ((n + 15) & -8)
                    if end > tail_seen:
                        raise self._corrupt_record(head, n, tail_seen)
        except BaseException:
            if lock is not None:
                lock.release()
            raise
        if n < 0:
            if lock is not None:
                lock.release()
            return None
        self._peeked = n + 1
        self._peeked_end = end
        return self._rbuf[pos + 8 : pos + 8 + n]

    def release(self) -> None:
        """Remove the record returned by :meth:`peek`."""
        self._check_open()
        if not self._peeked:
            raise RuntimeError("release() without peek()")
        self._peeked = 0
        w = self._w
        try:
            w[_MSGS_OUT] += 1
            w[_HEAD] = self._peeked_end
            if w[_PWAIT]:
                self._not_full.ring()
        except ValueError as exc:
            raise self._failure(exc)
        finally:
            if self._clock is not None:
                self._clock.release()

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
        types.MethodType): try_read with the decoding in the same frame.

        If ``loads`` raises an Exception, ``on_error(owner, record, exc)``
        gives the result.  When the ring is empty (record None) or the record
        is empty (b""), ``get`` returns ``on_empty(owner, record, block,
        timeout)``.  While ``held`` (records the caller took earlier, to return
        first) is not empty, ``get`` returns ``on_held(owner, block, timeout)``
        instead.  Raises CorruptError as try_read does; ClosedError once this
        ring handle is closed."""
        w = self._w
        buf = self._buf
        cap = self._cap
        base = self._base
        sem = self._csem

        def get(owner: Any, block: bool = True, timeout: Optional[float] = None) -> Any:
            if held:
                return on_held(owner, block, timeout)
            if sem is not None:
                try:  # (the closure outlives the handle: this is where a closed one is noticed)
                    head = w[_HEAD]
                except ValueError as exc:
                    raise self._failure(exc)
                if head >= self._tail_seen and head == w[_TAIL]:
                    return on_empty(owner, None, block, timeout)  # empty: no need for the lock
                if not sem.acquire(False):  # RobustLock.acquire, inlined
                    self._clock._acquire_slow(None)
            data = None
            try:
                if sem is not None:
                    w[_COWNER] = _sync._PID
                head = w[_HEAD]
                tail_seen = self._tail_seen
                # TAIL is the producers' cache line: read it only when caught up.
                if head >= tail_seen:  # >=: other consumers may be ahead of it
                    tail_seen = w[_TAIL]
                    if not self._segment.roles_marked & L.ROLE_CONSUMER:
                        self._segment.add_role(L.ROLE_CONSUMER)
                    if not 0 <= head <= tail_seen <= head + cap:
                        raise self._corrupt_indices(head, tail_seen)
                    self._tail_seen = tail_seen  # (only once checked: later reads trust it)
                if head != tail_seen:
                    pos = base + head % cap
                    n = w[pos >> 3]
                    if n < 0:  # a pad fills the end of the data area: the record after it starts the area
                        head, n, end = self._skip_pad(head, n)  # (validates the pad and that record)
                        pos = base
                    else:
                        end = head + ((n + 15) & -8)
                        if end > tail_seen:
                            raise self._corrupt_record(head, n, tail_seen)
                    if n >= 0:
                        data = buf[pos + 8 : pos + 8 + n].tobytes()
                        w[_MSGS_OUT] += 1
                        w[_HEAD] = end
                        if w[_PWAIT]:
                            self._not_full.ring()
            except ValueError as exc:
                raise self._failure(exc)
            finally:
                if sem is not None:
                    try:
                        w[_COWNER] = 0
                    except ValueError:  # a closed handle's released view: nothing was stored
                        pass
                    finally:
                        sem.release()
            if data:
                try:
                    return loads(data)
                except Exception as exc:
                    return on_error(owner, data, exc)
            return on_empty(owner, data, block, timeout)

        return get
    # ---- end of generated code ----

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
                if not 0 <= tail - head <= cap:
                    return  # corrupt indices: the next record move raises CorruptError
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
        self._check_open()
        w = self._w
        n = w[_MSGS_IN] - w[_MSGS_OUT]
        return n if n > 0 else 0

    def bytes_used(self) -> int:
        """Ring bytes held by unread records, headers and padding included."""
        self._check_open()
        w = self._w
        return w[_TAIL] - w[_HEAD]

    def empty(self) -> bool:
        self._check_open()
        w = self._w
        return w[_HEAD] == w[_TAIL]

    def full(self) -> bool:
        """True if not even an empty record fits now."""
        self._check_open()
        w = self._w
        if self._maxm and w[_MSGS_IN] - w[_MSGS_OUT] >= self._maxm:
            return True
        return self._cap - (w[_TAIL] - w[_HEAD]) < 8

    def can_write(self, nbytes: int) -> bool:
        """Whether a record of ``nbytes`` would fit now (a hint: no lock)."""
        self._check_open()
        w = self._w
        if self._maxm and w[_MSGS_IN] - w[_MSGS_OUT] >= self._maxm:
            return False
        tail = w[_TAIL]
        need = (nbytes + 15) & -8
        free = self._cap - tail + w[_HEAD]
        room = self._cap - tail % self._cap
        return need <= free and (need <= room or room + need <= free or room <= free)

    def can_read(self) -> bool:
        self._check_open()
        w = self._w
        return w[_HEAD] != w[_TAIL]

    @property
    def segment(self) -> Segment:
        self._check_open()
        return self._segment

    def participants(self):
        self._check_open()
        return self._segment.participants()

    def creator_alive(self) -> bool:
        self._check_open()
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
        # A closed handle takes no lock, and its views are released: the
        # record moves (and the Queue's closures over them) meet a ValueError
        # on their first word, which _failure turns into ClosedError; every
        # other operation checks _closed first (_check_open).
        self._psem = self._csem = None
        self._rbuf.release()
        self._segment.close()  # (releases self._w and self._buf)

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


# The Python record moves above are the specification; with the C core its
# mirrors of try_write/try_read take their place (docs/core.md).  The C
# try_write hands anything but bytes to the Python one.
RingBuffer._py_try_write = RingBuffer.try_write
RingBuffer._py_try_read = RingBuffer.try_read
RingBuffer._py_read_many = RingBuffer._read_many
RingBuffer._py_write_many = RingBuffer._write_many
RingBuffer._py_encoding_writer = RingBuffer.encoding_writer
RingBuffer._py_decoding_reader = RingBuffer.decoding_reader


def _c_encoding_writer(self: RingBuffer, *args: Any) -> Callable[..., Any]:
    put = _core.Writer(self, *args)
    # The Python closure checks the arguments, and gives the C one its
    # signature (inspect.signature follows __wrapped__).
    put.__wrapped__ = self._py_encoding_writer(*args)
    return put


def _c_decoding_reader(self: RingBuffer, *args: Any) -> Callable[..., Any]:
    get = _core.Reader(self, *args)
    get.__wrapped__ = self._py_decoding_reader(*args)
    return get


if _core is not None:
    RingBuffer.try_write = _core.RingCore.try_write  # type: ignore[assignment]
    RingBuffer.try_read = _core.RingCore.try_read  # type: ignore[assignment]
    RingBuffer._read_many = _core.RingCore._read_many  # type: ignore[assignment]
    RingBuffer._write_many = _core.RingCore._write_many  # type: ignore[assignment]
    _c_encoding_writer.__doc__ = RingBuffer.encoding_writer.__doc__
    _c_decoding_reader.__doc__ = RingBuffer.decoding_reader.__doc__
    RingBuffer.encoding_writer = _c_encoding_writer  # type: ignore[assignment]
    RingBuffer.decoding_reader = _c_decoding_reader  # type: ignore[assignment]


# -- statistics: a snapshot of the ring's counters --------------------------------
@dataclasses.dataclass(frozen=True)
class RingStatistics:
    """A snapshot of one ring's counters."""

    #: segment name
    name: str
    #: size of the data area in bytes
    capacity_bytes: int
    #: maximum records held at once (0: limited by bytes only)
    max_messages: int
    #: records written since creation
    messages_in: int
    #: records read since creation
    messages_out: int
    #: ring bytes written since creation (payload + 8-byte headers + padding)
    bytes_in: int
    #: ring bytes released by readers since creation
    bytes_out: int
    #: records held now
    messages_used: int
    #: ring bytes held now
    bytes_used: int
    #: highest ``bytes_used`` seen (sampled when producers re-read the head)
    peak_bytes: int
    #: blocking writes that had to wait for room (back-pressure)
    full_waits: int
    #: total seconds writers spent waiting for room
    full_wait_seconds: float
    #: blocking reads that had to wait for a record
    empty_waits: int
    #: total seconds readers spent waiting for a record
    empty_wait_seconds: float
    #: pid of the creating process
    creator_pid: int
    #: the creating process still runs
    creator_alive: bool
    #: registered processes
    participants: Tuple[ParticipantInfo, ...]
    #: time.monotonic() when the snapshot was taken
    taken_at: float

    @property
    def fill_ratio(self) -> float:
        """``bytes_used / capacity_bytes`` (or by messages, whichever is fuller)."""
        ratio = self.bytes_used / self.capacity_bytes if self.capacity_bytes else 0.0
        if self.max_messages:
            ratio = max(ratio, self.messages_used / self.max_messages)
        return ratio


def read_ring_statistics(name: str, w: memoryview, seg: Any) -> RingStatistics:
    """A snapshot of the ring counters in ``w`` (the words of ``seg``, a
    Segment or a read-only SegmentView)."""
    # Consumer-side words first: every counter only grows, so "out" read
    # before "in" never makes the amount held negative.
    head, msgs_out = w[L.W_HEAD], w[L.W_MSGS_OUT]
    empty_waits, empty_ns = w[L.W_EMPTY_WAITS], w[L.W_EMPTY_WAIT_NS]
    tail, msgs_in = w[L.W_TAIL], w[L.W_MSGS_IN]
    used = tail - head
    return RingStatistics(
        name=name,
        capacity_bytes=w[L.W_CAPACITY],
        max_messages=w[L.W_MAX_MESSAGES],
        messages_in=msgs_in,
        messages_out=msgs_out,
        bytes_in=tail,
        bytes_out=head,
        messages_used=max(0, msgs_in - msgs_out),
        bytes_used=used,
        peak_bytes=max(w[L.W_PEAK_BYTES], used),
        full_waits=w[L.W_FULL_WAITS],
        full_wait_seconds=w[L.W_FULL_WAIT_NS] / 1e9,
        empty_waits=empty_waits,
        empty_wait_seconds=empty_ns / 1e9,
        creator_pid=w[L.W_CREATOR_PID],
        creator_alive=seg.creator_alive(),
        participants=participant_infos(seg),
        taken_at=time.monotonic(),
    )


def ring_statistics(ring: Any) -> RingStatistics:
    """Snapshot the counters of ``ring`` (a RingBuffer)."""
    seg = ring.segment
    return read_ring_statistics(ring.name, seg.words, seg)
