"""SlotPool: fixed-size slots in shared memory, lent by a source to holders
and returned to that source.  The byte layer: no pickling, no numpy.

Roles (one process may play several):

* **source**: the process that allocated a slot (``try_allocate`` /
  ``allocate``).  It writes into the slot, marks it sent, and is the only
  process that frees it again (``collect``) -- unless it died, in which case a
  janitor does (``reclaim``).
* **holder**: a process that received a reference ``(index, generation)`` and
  borrows the slot's bytes in place (``acquire`` ... ``release``).

Why it is safe without compare-and-swap (Python only has single aligned int64
loads and stores):

* Allocation scans the slot states under the pool's :class:`RobustLock`; no
  other word is shared between two writers.
* Holds are recorded per holder, never as one shared count: hold word
  ``[member][slot]`` = ``acquired << 32 | released`` for the slot's current
  generation, written only by that member.  A source frees slot *s* when every
  live member has released what it acquired and ``DELIVERIES`` holds were
  acquired in total; members found dead count as released.  Reading one word
  per member gives a consistent pair, and both halves only grow, so a stale
  read can only make the slot look busier than it is.
* After releasing, a holder pushes ``gen << 32 | slot`` onto its source's
  return queue (under the pool lock) and rings the return bell.  The source
  drains its queue, re-checks just those slots and frees them: the return
  path.  A notification is only a hint -- the hold words are the truth -- so a
  lost one (full queue, busy lock inside a finalizer, a holder killed between
  its store and its push) costs a re-check when the source runs short, never
  a leak.
* Finalizers of receive-side views may run anywhere (inside a garbage
  collection triggered in the middle of a pool call, in another thread).  They
  never block: :meth:`release_later` queues the release, and whoever holds the
  handle's thread lock next performs it.

Crash recovery (``reclaim``, run by sources at most every RECLAIM_INTERVAL
while they use the pool, and on demand): members whose process is gone
(pid + start time) are marked dead; their holds stop counting; slots they had
loaned but not sent are freed; slots they had sent are freed by the janitor
once the holders are done.  If the pool is linked to a ring (``fence``), a
slot whose message was consumed from that ring but never acquired is freed
after ``orphan_seconds`` -- only once a consumer of the ring has been found
dead (its receiver died between reading and decoding).

Member entries: a process takes one at its first move and gives it back
when it closes the pool, or the janitor does once it is gone -- as soon as
the entry sources no slot and holds nothing (every hold word balanced), even
while slots it read are still in flight: readers that come and go never
fill the table (see ``_holds_nothing``).  An entry that still holds a slot
is kept until its source frees the slot.

This module is the specification.  With the compiled core (shmq._core,
unless SHMQ_PURE is set) the hot moves -- ``try_allocate`` of one slot,
``mark_sent``, ``set_fence``, ``acquire``, ``release_later`` -- run in C
(``_core.PoolCore``, SlotPool's base class), mirroring the code below and
calling it (``_py_<name>``) for every case off the common path
(docs/core.md).
"""
from __future__ import annotations

import mmap
import os
import sys
import threading
import time
import weakref
from collections import deque
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from . import _layout as L
from . import _platform as P
from ._errors import BrokenError, ClosedError, Full, LayoutError, MessageTooLarge, ShmqError, SlotError
from ._segment import Segment
from ._sync import OwnFlagBell, RobustLock, deadline_for, full_fence, wait_until

__all__ = (
    "SlotPool",
    "SlotPoolStatistics",
    "SlotInfo",
    "view_statistics",
    "DEFAULT_MAX_MEMBERS",
    "RECLAIM_INTERVAL",
    "ORPHAN_SECONDS",
)

DEFAULT_MAX_MEMBERS = 32
#: seconds between two scans for dead members by one source
RECLAIM_INTERVAL = 0.1
#: default SlotPool.orphan_seconds: a slot whose message left the linked ring this
#: long ago, never acquired, is freed once a consumer of the ring was found dead
ORPHAN_SECONDS = 5.0

_MAX_GEN = (1 << 31) - 1
_MASK = L.HOLD_RELEASED_MASK
_ACQ = L.HOLD_ACQUIRE
_FREE, _LOANED, _SENT = L.SLOT_FREE, L.SLOT_LOANED, L.SLOT_SENT
_LIVE, _DEAD = L.MEMBER_LIVE, L.MEMBER_DEAD
#: word 7 of a member record (unused by _layout so far): 1 while the member
#: waits in allocate() for a slot; written only by that member.  RETURN_WAITING
#: is the hint "some member's flag may be up" (see _sync.OwnFlagBell)
_M_WAITING = 7
_monotonic = time.monotonic
_NONE: List[int] = []  # shared empty result: never appended to

#: madvise advice: MADV_POPULATE_WRITE (Linux 5.14+; the raw value where
#: Python does not name it)
_MADV_POPULATE_WRITE = getattr(mmap, "MADV_POPULATE_WRITE", 23)
#: slots a new pool pre-faults at creation: what a stream of depth 1 or 2
#: touches, as slots are reused most recently freed first
PREFAULT_SLOTS = 2
#: Warm reuse: ``allocate`` of one slot of at least WARM_MIN_BYTES first
#: waits up to WARM_SECONDS_PER_BYTE per byte of a slot (64 MiB: 0.34 ms)
#: for the slot this source sent last, when it is still out.  A receiver
#: that drops at once returns it in 0.11-0.15 ms (a futex wake-up each way on
#: the 2-core VM), and rewriting the same 64 MiB costs 4.7-5.0 ms against
#: 6.7-6.9 ms when alternating between two (the second no longer fits the
#: cache next to the source); at 16 MiB alternating costs nothing, so
#: waiting there would only add the 0.1 ms (docs/waiting.md).  After k
#: failed waits in a row the next 2**(k-1) - 1 allocations (at most
#: WARM_BACKOFF) do not wait (a receiver that keeps its arrays a while): at
#: most one in WARM_BACKOFF + 1 allocations waits in vain, for under a
#: tenth of its copy.
WARM_MIN_BYTES = 32 << 20
WARM_SECONDS_PER_BYTE = 1 / 200e9
WARM_BACKOFF = 8
_POPULATE_OK = sys.platform.startswith("linux")


def _load_core():
    """shmq._core if it is built, has the slot moves for this layout and
    SHMQ_PURE is not set; else None (the Python moves below run).  See
    docs/core.md."""
    if os.environ.get("SHMQ_PURE", "") not in ("", "0"):
        return None
    try:
        from . import _core
    except ImportError:
        return None
    layout = getattr(_core, "POOL_LAYOUT", None)
    if not isinstance(layout, dict) or not hasattr(_core, "PoolCore"):
        return None
    from . import _sync

    same = layout == {k: getattr(L, k, None) for k in layout}
    lock_gen = L.W_POOL_LOCK + getattr(_sync, "_GENERATION_AFTER_OWNER", -1)
    return _core if same and getattr(_core, "POOL_LOCK_GENERATION", None) == lock_gen else None


_core = _load_core()
#: which core runs the slot moves: "c" (shmq._core) or "python"
CORE = "python" if _core is None else "c"
_PoolBase = object if _core is None else _core.PoolCore


def _populate(segment: Segment, offset: int, length: int) -> None:
    """Pre-fault ``length`` bytes of ``segment`` from ``offset`` (page
    aligned) for writing; nothing where the kernel refuses (before 5.14)."""
    global _POPULATE_OK
    mm = getattr(segment, "_mmap", None)
    if mm is None or not _POPULATE_OK:
        return
    try:
        mm.madvise(_MADV_POPULATE_WRITE, offset, length)
    except (OSError, ValueError):
        _POPULATE_OK = False  # refused here: do not ask again


# Open pools, so a forked child starts with a clean per-process state.
_open_pools: "weakref.WeakSet[SlotPool]" = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for pool in list(_open_pools):
        pool._reset_after_fork()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


@dataclass(frozen=True)
class SlotInfo:
    """One slot as seen in the slot table."""

    index: int
    #: "free", "loaned" (allocated, not sent yet) or "sent"
    state: str
    generation: int
    #: pid of the source (0 for a free slot)
    source_pid: int
    nbytes: int
    #: (pid, holds) of every member that holds the slot now
    holders: Tuple[Tuple[int, int], ...]


@dataclass(frozen=True)
class SlotPoolStatistics:
    """A snapshot of one pool's counters."""

    #: segment name
    name: str
    slot_size: int
    slot_count: int
    #: slots neither loaned nor sent
    free: int
    #: slots allocated by a source and not sent yet
    loaned: int
    #: slots sent and not yet freed by their source
    sent: int
    #: allocations since creation
    allocations: int
    #: slots freed since creation (by their source or a janitor)
    frees: int
    #: return notifications pushed by holders
    returns: int
    #: slots freed by a janitor because their source or a holder died
    reclaimed: int
    #: slots freed because their message was consumed but never acquired
    orphaned: int
    #: notifications that named no slot of the receiving source
    corrupt_returns: int
    #: notifications dropped because a return queue was full (recovered by re-checks)
    lost_returns: int
    #: (pid, alive) of every registered member
    members: Tuple[Tuple[int, bool], ...]


class SlotPool(_PoolBase):
    """A named pool of ``slot_count`` slots of ``slot_size`` bytes.

    ``SlotPool.create(slot_size, slot_count)`` makes one (the creating process
    owns the name and unlinks it at normal exit); ``SlotPool.attach(name)``
    opens it from any process; a SlotPool pickles as its name.  ``close()``
    ends this handle (deferred while views from :meth:`acquire` are still
    held), ``unlink()`` removes the name.

    Attributes a source may set: ``on_return`` (called with the slot index for
    each slot it frees after holders returned it), ``fence`` (an object with
    ``position()``, ``passed(position)`` and ``someone_died()``, describing
    the ring the pool's messages travel through; see ``_codec.RingFence``),
    ``orphan_seconds`` (default ORPHAN_SECONDS).
    """

    _closed = True
    _segment: Optional[Segment] = None

    def __init__(self, segment: Segment, *, _token: object = None) -> None:
        if _token is not _TOKEN:
            raise TypeError("use SlotPool.create() or SlotPool.attach()")
        self._segment = segment
        w = self._w = segment.words
        self._buf = segment.buf
        self._rbuf = segment.buf.toreadonly()
        self.name = segment.name
        self.slot_size = w[L.W_SLOT_SIZE]
        self.slot_count = n = w[L.W_SLOT_COUNT]
        self.max_members = w[L.W_MAX_MEMBERS]
        self._q = w[L.W_RQ_CAPACITY]
        self._stride = w[L.W_SLOT_STRIDE]
        self._slots = w[L.W_SLOT_TABLE] >> 3
        self._members = w[L.W_MEMBER_TABLE] >> 3
        self._holdw = w[L.W_HOLD_TABLE] >> 3
        self._rqw = w[L.W_RETURN_QUEUES] >> 3
        self._data = w[L.W_SLOT_DATA]
        self._check_geometry(segment.size)
        create = segment.is_creator
        self._lock = RobustLock(P.semaphore(self.name + "-rl", create, lock=True), segment, L.W_POOL_LOCK)
        self._bell_sem = P.semaphore(self.name + "-rb", create)
        self.on_return: Optional[Callable[[int], object]] = None
        self.fence = None
        self.orphan_seconds = ORPHAN_SECONDS
        self._init_local()
        if _core is not None:  # the C moves' copies of the checked geometry (docs/core.md)
            self._c_setup(
                (self.slot_size, n, self.max_members, self._q, self._slots, self._members, self._holdw, self._rqw,
                 self._data, self._stride, L.pool_geometry(self.slot_size, n, self.max_members)["size"]),
                self._lock._sem,
            )
        self._closing = False
        self._closed = False
        _open_pools.add(self)

    def _check_geometry(self, size: int) -> None:
        """Every creator-written word must be what create() computes from
        SLOT_SIZE, SLOT_COUNT and MAX_MEMBERS, within the segment: the
        handle indexes its tables with them from now on."""
        w = self._w
        n, members, slot_size = self.slot_count, self.max_members, self.slot_size
        ok = 1 <= slot_size <= 1 << 40 and 1 <= n <= L.MAX_SLOT_COUNT and 1 <= members <= L.MAX_POOL_MEMBERS
        if ok:
            geo = L.pool_geometry(slot_size, n, members)
            ok = geo["size"] <= size and (
                self._q, self._stride, self._slots << 3, self._members << 3, self._holdw << 3, self._rqw << 3,
                self._data,
            ) == (
                geo["rq_capacity"], geo["stride"], geo["slot_table"], geo["member_table"], geo["hold_table"],
                geo["return_queues"], geo["data"],
            ) and (w[L.W_SLOT_TABLE] | w[L.W_MEMBER_TABLE] | w[L.W_HOLD_TABLE] | w[L.W_RETURN_QUEUES]) & 7 == 0
        if not ok:
            raise LayoutError(f"{self.name!r}: slot pool header is inconsistent with its size {size}")

    def _high(self) -> int:
        """1 + the highest member entry in use (MEMBERS_HIGH), checked."""
        high = self._w[L.W_MEMBERS_HIGH]
        if not 0 <= high <= self.max_members:
            raise BrokenError(
                f"slot pool {self.name!r} is corrupt: MEMBERS_HIGH is {high}, not within 0..{self.max_members}"
            )
        return high

    def _init_local(self) -> None:
        self._tlock = threading.Lock()
        self._pid = os.getpid()
        self._epoch = getattr(self, "_epoch", 0) + 1
        self._member = -1
        self._bell: Optional[OwnFlagBell] = None  # made with the member entry
        self._holds = 0  # holds of this handle not yet released
        self._loaned: Dict[int, int] = {}  # slot -> generation, allocated here, not sent
        self._outstanding: Dict[int, int] = {}  # slot -> generation, sent from here
        self._unfenced: set = set()  # sent, but the caller has not reported the ring position yet
        self._early: set = set()  # unfenced slots whose return notification already came
        self._pending_frees = 0  # freed slots not yet added to FREE_COUNT
        self._reused = -1  # the slot _collect_locked loaned again, for try_allocate
        self._last_sent = -1  # the slot this source marked sent last (warm reuse)
        self._warm_off = 0  # allocations left without the warm wait (after failed ones)
        self._warm_fails = 0  # warm waits in a row that failed
        self._warm = self._stride >= WARM_MIN_BYTES  # slots large enough for the warm wait
        self._orphan_seen: Dict[int, float] = {}
        self._deferred: deque = deque()  # (slot, generation, epoch) from finalizers
        self._notes: List[Tuple[int, int]] = []  # (source member, notification) to push
        self._next_reclaim = 0.0
        # slots this process has not written yet (pre-faulted at first use);
        # empty for slots too small to be worth it
        self._cold = set(range(self.slot_count)) if self._stride % L.PAGE == 0 and _POPULATE_OK else set()

    def _reset_after_fork(self) -> None:
        # The child is a different process: it holds nothing and sources nothing.
        self._init_local()

    # -- construction ---------------------------------------------------
    @classmethod
    def create(
        cls,
        slot_size: int,
        slot_count: int,
        *,
        name: Optional[str] = None,
        max_members: int = DEFAULT_MAX_MEMBERS,
        link: str = "",
    ) -> "SlotPool":
        """Create a pool of ``slot_count`` slots of ``slot_size`` bytes each
        (slots start cache-line aligned, page aligned from 4 KiB up).  At most
        ``max_members`` processes may use it at once.  ``link`` names the ring
        the pool's messages travel through (read back as :attr:`link`).

        Raises TypeError/ValueError for bad arguments, FileExistsError if
        ``name`` is taken, SharedMemoryFull if /dev/shm has no room.
        """
        for arg, value, low, high in (
            ("slot_size", slot_size, 1, 1 << 40),
            ("slot_count", slot_count, 1, L.MAX_SLOT_COUNT),
            ("max_members", max_members, 1, L.MAX_POOL_MEMBERS),
        ):
            if not isinstance(value, int) or isinstance(value, bool):
                raise TypeError(f"'{arg}' must be an int, got {type(value).__name__}")
            if not low <= value <= high:
                raise ValueError(f"'{arg}' must be between {low} and {high}, got {value}")
        link_bytes = link.encode()
        if len(link_bytes) >= L.LINK_BYTES:
            raise ValueError(f"'link' must be shorter than {L.LINK_BYTES} bytes, got {link!r}")
        geo = L.pool_geometry(slot_size, slot_count, max_members)
        seg = Segment.create(L.KIND_POOL, geo["size"], name)
        try:
            w = seg.words
            w[L.W_SLOT_SIZE] = slot_size
            w[L.W_SLOT_COUNT] = slot_count
            w[L.W_MAX_MEMBERS] = max_members
            w[L.W_RQ_CAPACITY] = geo["rq_capacity"]
            w[L.W_SLOT_STRIDE] = geo["stride"]
            w[L.W_SLOT_TABLE] = geo["slot_table"]
            w[L.W_MEMBER_TABLE] = geo["member_table"]
            w[L.W_HOLD_TABLE] = geo["hold_table"]
            w[L.W_RETURN_QUEUES] = geo["return_queues"]
            w[L.W_SLOT_DATA] = geo["data"]
            w[L.W_FREE_COUNT] = slot_count
            off = L.W_LINK * L.WORD
            seg.buf[off : off + len(link_bytes)] = link_bytes
            self = cls(seg, _token=_TOKEN)
            self._warm_up(list(range(min(slot_count, PREFAULT_SLOTS))))
            seg.register(L.ROLE_CREATOR)
            seg.publish()
        except BaseException:
            seg.unlink()
            seg.close()
            raise
        return self

    @classmethod
    def attach(cls, name: str) -> "SlotPool":
        """Attach to the pool ``name`` created by any process.

        Raises FileNotFoundError, PermissionError, or LayoutError if ``name``
        is not an shmq slot pool of this layout version.
        """
        seg = Segment.attach(name, L.KIND_POOL)
        try:
            self = cls(seg, _token=_TOKEN)
            seg.register(L.ROLE_ATTACHED)
        except BaseException:
            seg.close()
            raise
        return self

    def __reduce__(self):
        return (type(self).attach, (self.name,))

    @property
    def link(self) -> str:
        """Name of the ring this pool was created for ('' if none)."""
        off = L.W_LINK * L.WORD
        return bytes(self._buf[off : off + L.LINK_BYTES]).rstrip(b"\0").decode()

    @property
    def segment(self) -> Segment:
        return self._segment

    # -- per-process member entry -----------------------------------------
    def _ensure_member(self) -> int:
        m = self._member
        if m >= 0:
            return m
        w = self._w
        with self._segment.admin_lock():
            for m in range(self.max_members):
                mb = self._members + m * L.MEMBER_WORDS
                if w[mb + L.M_PID] == 0:
                    break
            else:
                m = self._unused_dead_entry()
                mb = self._members + m * L.MEMBER_WORDS
                if m >= 0:
                    self._lock.acquire()
                    try:
                        self._retire_entry_locked(m)
                    finally:
                        self._lock.release()
            if m < 0:
                raise ShmqError(
                    f"slot pool {self.name!r} has no free member entry: {self.max_members} processes use it "
                    f"(create it with a larger 'max_members')"
                )
            w[mb + L.M_RQ_HEAD] = 0
            w[mb + L.M_RQ_TAIL] = 0
            w[mb + L.M_RQ_LOST] = 0
            w[mb + L.M_REUSES] = 0
            w[mb + _M_WAITING] = 0
            w[mb + L.M_START_US] = P.my_start_us()
            w[mb + L.M_STATE] = _LIVE
            w[mb + L.M_PID] = os.getpid()
            if w[L.W_MEMBERS_HIGH] <= m:
                w[L.W_MEMBERS_HIGH] = m + 1
        self._member = m
        me = weakref.ref(self)  # (no cycle: the bell lives in the pool)
        self._bell = OwnFlagBell(
            self._bell_sem, w, mb + _M_WAITING, L.W_RETURN_WAITING,
            lambda: 0 if (pool := me()) is None else pool._waiters(),
        )
        return m

    def _unused_dead_entry(self) -> int:
        """A member entry whose process is gone (or closed it) and that
        holds nothing (the table is full; a janitor has not recycled it
        yet), or -1.  (admin lock held: nobody takes an entry meanwhile)"""
        w = self._w
        owners = self._source_entries()
        for m in range(self.max_members):
            mb = self._members + m * L.MEMBER_WORDS
            if m in owners or not self._holds_nothing(m):
                continue
            if w[mb + L.M_STATE] == _DEAD or not P.is_alive(w[mb + L.M_PID], w[mb + L.M_START_US]):
                return m
        return -1

    def _source_entries(self) -> set:
        """The member entries that source a slot now (its S_OWNER)."""
        w = self._w
        base = self._slots
        return {w[base + i * L.SLOT_WORDS + L.S_OWNER] - 1 for i in range(self.slot_count)
                if w[base + i * L.SLOT_WORDS + L.S_STATE] != _FREE}

    def _holds_nothing(self, m: int) -> bool:
        """Whether member entry ``m`` released every hold it acquired.

        Such an entry may be retired and reused while its hold words are
        still non-zero (balanced: the slot is still in flight, e.g. a
        Latest's newest value read by a reader that closed).  The words stay
        as they are: their acquired halves still count towards the slot's
        DELIVERIES (``_releasable``), and the next member of the entry takes
        them over balanced, holding nothing (its ``holding()`` is 0, it may
        not release what it did not acquire).  Only the slot's source zeroes
        them, when it frees the slot.  An unbalanced word (a hold a live view
        still needs, or one that died with its holder) keeps the entry until
        the slot is freed."""
        w = self._w
        row = self._holdw + m * self.slot_count
        for i in range(self.slot_count):
            v = w[row + i]
            if v and (v >> 32) != (v & _MASK):
                return False
        return True

    def _check_usable(self) -> None:
        if self._closed or self._closing:
            raise ClosedError(f"slot pool {self.name!r} is closed")

    # -- source side ------------------------------------------------------
    def try_allocate(self, count: int = 1) -> Optional[List[int]]:
        """Allocate ``count`` slots at once (all or none) for this process to
        fill; returns their indices, or None if not enough are free.
        Returned slots are collected first, so a closed loop keeps flowing.
        Raises MessageTooLarge if the pool has fewer than ``count`` slots, and
        SlotError if a corrupt return notification arrived (the pool stays
        intact; call again)."""
        if not 1 <= count <= self.slot_count:
            if count >= 1:
                raise MessageTooLarge(
                    f"a message needing {count} slots can never fit pool {self.name!r} of {self.slot_count} slots"
                )
            raise ValueError(f"'count' must be at least 1, got {count}")
        w = self._w
        with self._tlock:
            if self._closing:
                self._check_usable()
            m = self._member
            if m < 0:
                m = self._ensure_member()
            mb = self._members + m * L.MEMBER_WORDS
            freed = corrupt = _NONE
            got = None
            if w[mb + L.M_RQ_HEAD] != w[mb + L.M_RQ_TAIL] or w[mb + L.M_RQ_LOST]:
                # Frees are counted in the same lock hold as the allocation below;
                # one returned slot is reused at once when nobody else waits for slots.
                reuse = count == 1 and not w[L.W_RETURN_WAITING]
                freed, corrupt = self._collect_locked(defer_count=True, reuse=reuse)
                if self._reused >= 0:
                    got = [self._reused]
                    self._reused = -1
            if corrupt or got is not None:
                self._count_pending_frees()
            else:
                if w[L.W_FREE_COUNT] + self._pending_frees < count:
                    freed = self._when_short_locked(count, freed)
                got = self._take_locked(count, m)
            if self._deferred:
                self._drain_deferred_locked()
        if got and self._cold:
            self._warm_up(got)
        if freed or corrupt:
            try:
                self._after_collect(freed, corrupt)
            except BaseException:
                if got:
                    self.abort(got)  # the caller never sees them
                raise
        return got

    def _when_short_locked(self, count: int, freed: List[int]) -> List[int]:
        """No ``count`` slots free: count the frees, re-check every slot
        sent from here, and run the janitor when due.  Returns ``freed`` and
        what the re-checks freed.  (tlock held)"""
        now = _monotonic()
        self._count_pending_frees()
        freed = freed + self._check_outstanding_locked(now)
        if self._w[L.W_FREE_COUNT] < count and now >= self._next_reclaim:
            self._reclaim_locked(now, own=freed)
        return freed

    def allocate(self, count: int = 1, timeout: Optional[float] = None) -> List[int]:
        """Like :meth:`try_allocate`, but wait for returns (back-pressure).
        Raises Full if ``timeout`` (seconds) expires first, ValueError for a
        negative or NaN timeout."""
        deadline = deadline_for(timeout)
        if self._warm and count == 1 and self._last_sent >= 0 and (timeout is None or timeout > 0):
            self._wait_warm()
        got = self.try_allocate(count)
        if got is not None:
            return got
        ready = lambda: self._may_allocate(count)  # noqa: E731
        bell = self._bell  # (try_allocate made the member entry)
        while True:
            ok = wait_until(ready, bell, deadline)
            if ok:
                got = self.try_allocate(count)
                if got is not None:
                    return got
            if not ok or (deadline is not None and _monotonic() >= deadline):
                raise Full(f"slot pool {self.name!r} has no {count} free slot(s): all are in flight")

    def _wait_warm(self) -> None:
        """Give the slot sent last a moment to come back (see WARM_SECONDS_PER_BYTE):
        rewritten at once, it is still in cache."""
        if self._warm_off:
            self._warm_off -= 1
            return
        i = self._last_sent
        m = self._member
        bell = self._bell
        if i not in self._outstanding or m < 0 or bell is None or self._closing:
            return
        w = self._w
        mb = self._members + m * L.MEMBER_WORDS
        if w[mb + L.M_RQ_HEAD] != w[mb + L.M_RQ_TAIL] or w[mb + L.M_RQ_LOST]:
            return  # something came back already
        returned = lambda: w[mb + L.M_RQ_HEAD] != w[mb + L.M_RQ_TAIL] or w[mb + L.M_RQ_LOST]  # noqa: E731
        if wait_until(returned, bell, _monotonic() + self._stride * WARM_SECONDS_PER_BYTE):
            self._warm_fails = 0
        else:
            self._warm_fails = fails = min(self._warm_fails + 1, 8)
            self._warm_off = min(WARM_BACKOFF, (1 << (fails - 1)) - 1)

    def _warm_up(self, indices: List[int]) -> None:
        """Pre-fault slots this process writes for the first time: one
        madvise(MADV_POPULATE_WRITE) maps (and, for a fresh pool, allocates)
        a slot's pages in one go, about 35% faster than faulting them in
        one by one as the copy touches them (docs/waiting.md)."""
        cold = self._cold
        for i in indices:
            if i in cold:
                cold.discard(i)
                _populate(self._segment, self._data + i * self._stride, self._stride)

    def _may_allocate(self, count: int) -> bool:
        """Whether try_allocate may succeed now: slots are free, some came
        back to this source, or the janitor is due (slots of processes that
        died or closed come back only through it)."""
        w = self._w
        if w[L.W_FREE_COUNT] >= count:
            return True
        m = self._member
        if m >= 0:
            mb = self._members + m * L.MEMBER_WORDS
            if w[mb + L.M_RQ_TAIL] != w[mb + L.M_RQ_HEAD] or w[mb + L.M_RQ_LOST]:
                return True
        return _monotonic() >= self._next_reclaim

    def _take_locked(self, count: int, m: int) -> Optional[List[int]]:
        w = self._w
        n = self.slot_count
        base = self._slots
        got: List[int] = []
        self._lock.acquire()
        try:
            if self._pending_frees:
                self._apply_frees(self._pending_frees)
                self._pending_frees = 0
            if w[L.W_FREE_COUNT] < count:
                return None
            # LIFO: start at the slot freed last (still in cache, and mapped).
            start = w[L.W_ALLOC_HINT]
            if not 0 <= start < n:
                start = 0  # (a hint, written without the lock: never trusted)
            for k in range(n):
                i = start + k
                if i >= n:
                    i -= n
                if w[base + i * L.SLOT_WORDS + L.S_STATE] == _FREE:
                    got.append(i)
                    if len(got) == count:
                        break
            else:
                w[L.W_FREE_COUNT] = len(got)  # the hint had drifted: it is exact now
                return None
            for i in got:
                s = base + i * L.SLOT_WORDS
                gen = w[s + L.S_GEN] + 1
                if not 0 < gen <= _MAX_GEN:
                    gen = 1
                w[s + L.S_GEN] = gen
                w[s + L.S_OWNER] = m + 1
                w[s + L.S_NBYTES] = 0
                w[s + L.S_DELIVERIES] = 0
                w[s + L.S_FENCE] = 0
                w[s + L.S_STATE] = _LOANED
                self._loaned[i] = gen
            w[L.W_FREE_COUNT] -= count
            w[L.W_POOL_COUNTERS] += count
        finally:
            self._lock.release()
        return got

    def view(self, index: int, nbytes: Optional[int] = None) -> memoryview:
        """A writable view of a slot this process allocated and has not sent
        (its first ``nbytes``, default all ``slot_size``).  Release the view
        before ``close()``."""
        if index not in self._loaned:
            raise SlotError(f"slot {index} of pool {self.name!r} is not loaned by this process")
        off = self._data + index * self._stride
        return self._buf[off : off + (self.slot_size if nbytes is None else nbytes)]

    def generation(self, index: int) -> int:
        """The slot's current generation (changes at every allocation)."""
        self._check_index(index)
        return self._w[self._slots + index * L.SLOT_WORDS + L.S_GEN]

    def mark_sent(
        self, indices: Sequence[int], nbytes: Sequence[int], deliveries: int = 1, fenced: bool = False
    ) -> List[int]:
        """Declare loaned slots sent: holders may acquire them now.  ``nbytes``
        is the used size of each; ``deliveries`` how many holds in total the
        source expects (1 per receiver: several for a broadcast).  With
        ``fenced=True`` the slots are not freed before :meth:`set_fence`
        confirms the message was written (and where it ended in the linked
        ring), and :meth:`abort` may still take them back.  Returns the
        slots' generations (a reference is ``(index, generation)``)."""
        if deliveries < 1:
            raise ValueError(f"'deliveries' must be at least 1, got {deliveries}")
        w = self._w
        gens = []
        with self._tlock:
            for i, n in zip(indices, nbytes):
                gen = self._loaned.get(i)
                if gen is None:
                    raise SlotError(f"slot {i} of pool {self.name!r} is not loaned by this process")
                if not 0 <= n <= self.slot_size:
                    raise ValueError(f"'nbytes' must be between 0 and {self.slot_size}, got {n}")
                s = self._slots + i * L.SLOT_WORDS
                w[s + L.S_NBYTES] = n
                w[s + L.S_DELIVERIES] = deliveries
                w[s + L.S_FENCE] = 0
                w[s + L.S_STATE] = _SENT
                del self._loaned[i]
                self._outstanding[i] = gen
                self._last_sent = i
                gens.append(gen)
                if fenced:
                    self._unfenced.add(i)
        return gens

    def set_fence(self, indices: Sequence[int], position: int) -> None:
        """Confirm that the message carrying these slots was written, ending at
        or before ring position ``position`` (the ring's TAIL just after the
        write; 0 if it travels some other way)."""
        w = self._w
        freed: List[int] = []
        with self._tlock:
            unfenced = self._unfenced
            for i in indices:
                if i in unfenced:
                    unfenced.discard(i)
                    w[self._slots + i * L.SLOT_WORDS + L.S_FENCE] = position
                    if i in self._early:  # its holders were quicker than us
                        self._early.discard(i)
                        if self._releasable(i):
                            freed.append(i)
            if freed:
                self._free_own_locked(freed)
        if freed:
            self._after_collect(freed, _NONE)

    def unsend(self, indices: Sequence[int]) -> None:
        """Take slots marked sent with ``fenced=True`` back to loaned: their
        message could not be written (the ring stayed full)."""
        w = self._w
        with self._tlock:
            for i in indices:
                if i not in self._unfenced:
                    raise SlotError(f"slot {i} of pool {self.name!r} is not awaiting its write")
            for i in indices:
                self._unfenced.discard(i)
                self._loaned[i] = self._outstanding.pop(i)
                w[self._slots + i * L.SLOT_WORDS + L.S_STATE] = _LOANED

    def abort(self, indices: Sequence[int]) -> None:
        """Free slots this process allocated whose message was never written
        (loaned, or marked sent with ``fenced=True`` and no fence yet)."""
        with self._tlock:
            mine = []
            for i in indices:
                if i in self._loaned:
                    del self._loaned[i]
                elif i in self._unfenced:
                    self._unfenced.discard(i)
                    del self._outstanding[i]
                else:
                    raise SlotError(f"slot {i} of pool {self.name!r} was not loaned by this process, or was already sent")
                mine.append(i)
            if mine:
                self._free_slots_locked(mine, "frees")

    def collect(self) -> int:
        """Take back the slots holders have returned (running ``on_return``
        for each); returns how many.  Also scans for dead members every
        RECLAIM_INTERVAL.  Raises SlotError after processing everything else
        if a corrupt notification arrived."""
        with self._tlock:
            if self._closed or self._closing or self._member < 0:
                return 0
            freed, corrupt = self._collect_locked()
            now = _monotonic()
            if now >= self._next_reclaim and (self._outstanding or self._loaned):
                self._reclaim_locked(now, own=freed)
            self._drain_deferred_locked()
        self._after_collect(freed, corrupt)
        return len(freed)

    def reclaim(self) -> int:
        """Scan now for members that died: drop their holds, free the slots
        they loaned or sent (once nobody else holds them), and take back this
        process's slots they held.  Returns how many slots were freed."""
        with self._tlock:
            self._check_usable()
            self._ensure_member()
            freed, corrupt = self._collect_locked()
            now = _monotonic()
            freed += self._check_outstanding_locked(now)
            n = self._reclaim_locked(now, own=freed)
        self._after_collect(freed, corrupt)
        return n + len(freed)

    def _after_collect(self, freed: List[int], corrupt: List[int]) -> None:
        error: Optional[BaseException] = None
        cb = self.on_return
        if cb is not None:
            for i in freed:
                try:
                    cb(i)
                except BaseException as exc:  # run them all, then report the first
                    if error is None:
                        error = exc
        if corrupt:
            raise SlotError(
                f"pool {self.name!r} received {len(corrupt)} corrupt return notification(s), ignored: "
                + ", ".join(f"slot {v & _MASK} generation {v >> 32}" for v in corrupt[:4])
            )
        if error is not None:
            raise error

    def _collect_locked(self, defer_count: bool = False, reuse: bool = False) -> Tuple[List[int], List[int]]:
        """Drain this member's return queue; free what is free.  (tlock held;
        with ``defer_count`` the caller counts the frees under its own hold
        of the pool lock; with ``reuse`` one returned slot is loaned again at
        once, as ``self._reused``.)"""
        m = self._member
        if m < 0:
            return [], []
        w = self._w
        mb = self._members + m * L.MEMBER_WORDS
        head = w[mb + L.M_RQ_HEAD]
        tail = w[mb + L.M_RQ_TAIL]
        lost = w[mb + L.M_RQ_LOST]
        if head == tail and not lost:
            return [], []
        corrupt: List[int] = []
        if not 0 < tail - head <= self._q:
            if head != tail:
                # Not a queue any more: skip what it claims to hold and
                # re-check every slot this member sent (as for lost notices).
                corrupt.append(tail - head)
                w[mb + L.M_RQ_HEAD] = head = tail
            lost = 1
        cands: Dict[int, None] = {}  # ordered, and each slot once (a broadcast returns it several times)
        if head != tail:
            q = self._rqw + m * self._q
            mask = self._q - 1
            slots = self._slots
            n = self.slot_count
            outstanding = self._outstanding
            for pos in range(head, tail):
                v = w[q + (pos & mask)]
                i = v & _MASK
                gen = v >> 32
                if i >= n or not 0 < gen <= _MAX_GEN:
                    corrupt.append(v)
                    continue
                if outstanding.get(i) == gen:
                    cands[i] = None
                elif w[slots + i * L.SLOT_WORDS + L.S_GEN] == gen and w[slots + i * L.SLOT_WORDS + L.S_STATE] != _FREE:
                    corrupt.append(v)  # a live slot this member never sent
                # else: stale (the slot was freed already; another holder's notice)
            w[mb + L.M_RQ_HEAD] = tail
        if lost:
            w[mb + L.M_RQ_LOST] = 0
            cands = dict.fromkeys(self._outstanding)
        freed = []
        unfenced = self._unfenced
        for i in cands:
            if i in unfenced:
                self._early.add(i)
            elif i in self._outstanding and self._releasable(i):
                freed.append(i)
        if freed:
            if reuse and not corrupt:
                self._reloan_locked(freed[0])
                if len(freed) > 1:
                    self._free_own_locked(freed[1:], defer_count=defer_count)
            else:
                self._free_own_locked(freed, defer_count=defer_count)
        if corrupt:
            self._lock.acquire()
            try:
                w[L.W_POOL_COUNTERS + 5] += len(corrupt)
            finally:
                self._lock.release()
        return freed, corrupt

    def _reloan_locked(self, i: int) -> None:
        """Loan a returned slot of ours again without freeing it: nobody else
        may allocate a slot that is not FREE, so no pool lock is needed."""
        w = self._w
        s = self._clear_slot(i)
        gen = w[s + L.S_GEN] + 1
        if not 0 < gen <= _MAX_GEN:
            gen = 1
        w[s + L.S_GEN] = gen
        w[s + L.S_STATE] = _LOANED
        del self._outstanding[i]
        if self._orphan_seen:
            self._orphan_seen.pop(i, None)
        self._loaned[i] = gen
        self._reused = i
        w[self._members + self._member * L.MEMBER_WORDS + L.M_REUSES] += 1

    def _check_outstanding_locked(self, now: float) -> List[int]:
        """Re-check every slot this process sent (lost notifications, dead
        holders, orphans).  (tlock held)"""
        freed = []
        orphans = []
        for i in list(self._outstanding):
            if i in self._unfenced:
                continue
            if self._releasable(i):
                freed.append(i)
            elif self._orphaned(i, now):
                orphans.append(i)
        if freed:
            self._free_own_locked(freed)
        if orphans:
            self._free_own_locked(orphans, "orphaned")
        return freed + orphans

    def _releasable(self, i: int) -> bool:
        """All expected holds were taken and every live holder let go."""
        w = self._w
        s = self._slots + i * L.SLOT_WORDS
        if w[s + L.S_STATE] != _SENT:
            return False
        n = self.slot_count
        hw = self._holdw + i
        mt = self._members + L.M_STATE
        acquired = 0
        high = w[L.W_MEMBERS_HIGH]
        if not 0 <= high <= self.max_members:
            high = self._high()  # (raises BrokenError)
        for m in range(high):
            v = w[hw + m * n]
            if v:
                a = v >> 32
                if (v & _MASK) < a and w[mt + m * L.MEMBER_WORDS] != _DEAD:
                    return False
                acquired += a
        return acquired >= w[s + L.S_DELIVERIES]

    def _orphaned(self, i: int, now: float) -> bool:
        """The slot's message left the linked ring, nobody holds the slot, a
        consumer of the ring died, and this has been so for
        ``orphan_seconds``: its receiver died between read and decode."""
        fence = self.fence
        w = self._w
        s = self._slots + i * L.SLOT_WORDS
        pos = w[s + L.S_FENCE]
        if fence is None or not pos or w[s + L.S_STATE] != _SENT or not fence.passed(pos):
            self._orphan_seen.pop(i, None)
            return False
        n = self.slot_count
        for m in range(self._high()):
            v = w[self._holdw + m * n + i]
            if (v & _MASK) < (v >> 32) and w[self._members + m * L.MEMBER_WORDS + L.M_STATE] != _DEAD:
                self._orphan_seen.pop(i, None)
                return False
        if not fence.someone_died():
            return False
        first = self._orphan_seen.setdefault(i, now)
        return now - first >= self.orphan_seconds

    def _free_own_locked(self, indices: List[int], counter: str = "frees", defer_count: bool = False) -> None:
        for i in indices:
            self._outstanding.pop(i, None)
            if self._orphan_seen:
                self._orphan_seen.pop(i, None)
        self._free_slots_locked(indices, counter, defer_count=defer_count)

    def _clear_slot(self, i: int) -> int:
        """Zero a returned slot's hold words and message fields (before its
        STATE changes); returns its slot-table word."""
        w = self._w
        n = self.slot_count
        hw = self._holdw + i
        high = w[L.W_MEMBERS_HIGH]
        if not 0 <= high <= self.max_members:
            high = self._high()  # (raises BrokenError)
        for m in range(high):
            if w[hw + m * n]:
                w[hw + m * n] = 0
        s = self._slots + i * L.SLOT_WORDS
        w[s + L.S_FENCE] = 0
        w[s + L.S_DELIVERIES] = 0
        w[s + L.S_NBYTES] = 0
        return s

    def _apply_frees(self, count: int, counter: str = "frees") -> None:
        """Count freed slots (pool lock held)."""
        w = self._w
        w[L.W_FREE_COUNT] += count
        w[L.W_POOL_COUNTERS + 1] += count
        if counter != "frees":
            w[L.W_POOL_COUNTERS + L.POOL_COUNTER_NAMES.index(counter)] += count

    def _count_pending_frees(self) -> None:
        if self._pending_frees:
            self._lock.acquire()
            try:
                self._apply_frees(self._pending_frees)
                self._pending_frees = 0
            finally:
                self._lock.release()
            self._wake_waiters(False)  # (after the lock's release: a fence)

    def _free_slots_locked(
        self, indices: List[int], counter: str = "frees", have_lock: bool = False, defer_count: bool = False
    ) -> None:
        """Zero the hold words, then mark FREE (STATE last).  (tlock held)"""
        w = self._w
        for i in indices:
            w[self._clear_slot(i) + L.S_STATE] = _FREE
        # The next allocation starts here: the slot freed last is reused first.
        w[L.W_ALLOC_HINT] = indices[-1]
        if defer_count:
            self._pending_frees += len(indices)
            return
        if not have_lock:
            self._lock.acquire()
        try:
            self._apply_frees(len(indices), counter)
        finally:
            if not have_lock:
                self._lock.release()  # (a fence before the flag's load)
        self._wake_waiters(have_lock)

    def _reclaim_locked(self, now: float, own: Optional[List[int]] = None) -> int:
        """The janitor.  (tlock held)  Returns slots freed for dead sources;
        this process's own slots go through the normal free path."""
        self._next_reclaim = now + RECLAIM_INTERVAL
        w = self._w
        me = self._member
        dead = []
        for m in range(self._high()):
            mb = self._members + m * L.MEMBER_WORDS
            pid = w[mb + L.M_PID]
            if not pid or m == me:
                continue
            start = w[mb + L.M_START_US]
            state = w[mb + L.M_STATE]
            if state == _LIVE and not P.is_alive(pid, start):
                # Under the admin lock, after checking it is still that
                # process's entry: it may have been retired and taken by a
                # new member since the loads above (_ensure_member).
                with self._segment.admin_lock():
                    if w[mb + L.M_PID] == pid and w[mb + L.M_START_US] == start and w[mb + L.M_STATE] == _LIVE:
                        w[mb + L.M_STATE] = state = _DEAD
            if state == _DEAD:
                dead.append((m, pid, start))
        n = self.slot_count
        slots = self._slots
        reclaimed: List[int] = []
        mine: List[int] = []
        self._lock.acquire()
        try:
            for i in range(n):
                s = slots + i * L.SLOT_WORDS
                state = w[s + L.S_STATE]
                if state == _FREE:
                    continue
                owner = w[s + L.S_OWNER] - 1
                if owner == me:
                    if state == _SENT and i in self._outstanding and i not in self._unfenced and self._releasable(i):
                        mine.append(i)
                    continue
                if not 0 <= owner < self.max_members:
                    continue
                if w[self._members + owner * L.MEMBER_WORDS + L.M_STATE] != _DEAD:
                    # A live source: tell it about holds that died with their holder.
                    for m, _, _ in dead:
                        v = w[self._holdw + m * n + i]
                        if (v & _MASK) < (v >> 32):
                            self._notes.append((owner, w[s + L.S_GEN] << 32 | i))
                            break
                    continue
                if state == _LOANED:
                    reclaimed.append(i)
                elif state == _SENT:
                    if not w[s + L.S_FENCE] and self.fence is not None:
                        # A dead source writes no more: the ring's TAIL bounds its last message.
                        w[s + L.S_FENCE] = self.fence.position()
                    if self._releasable(i) or self._orphaned(i, now):
                        reclaimed.append(i)
            if reclaimed:
                self._free_slots_locked(reclaimed, "reclaimed", have_lock=True)
            if mine:
                for i in mine:
                    del self._outstanding[i]
                    self._orphan_seen.pop(i, None)
                self._free_slots_locked(mine, have_lock=True)
                if own is not None:
                    own.extend(mine)
            self._push_notes_locked(have_lock=True)
            if dead:
                self._recycle_dead_locked(dead)
            # FREE_COUNT drifts if a process dies inside an allocation: recount.
            free = 0
            for i in range(n):
                if w[slots + i * L.SLOT_WORDS + L.S_STATE] == _FREE:
                    free += 1
            w[L.W_FREE_COUNT] = free
            self._pending_frees = 0
        finally:
            self._lock.release()
        return len(reclaimed)

    def _retire_entry_locked(self, m: int) -> None:
        """Free member entry ``m``, folding its reuse count into the shared
        counters.  (pool lock held)"""
        w = self._w
        mb = self._members + m * L.MEMBER_WORDS
        reused = w[mb + L.M_REUSES]
        if reused:
            w[L.W_POOL_COUNTERS] += reused
            w[L.W_POOL_COUNTERS + 1] += reused
            w[mb + L.M_REUSES] = 0
        w[mb + _M_WAITING] = 0
        w[mb + L.M_STATE] = L.MEMBER_FREE
        w[mb + L.M_PID] = 0

    def _recycle_dead_locked(self, dead: List[Tuple[int, int, int]]) -> None:
        """Free the entries of dead members, ``(entry, pid, start)`` as the
        janitor found them, that source no slot and hold nothing (see
        _holds_nothing).  (pool lock held)  An entry is re-checked here: it
        may have been retired and taken by a new member since it was found."""
        w = self._w
        busy = self._source_entries()
        for m, pid, start in dead:
            mb = self._members + m * L.MEMBER_WORDS
            if (
                m in busy or w[mb + L.M_STATE] != _DEAD or w[mb + L.M_PID] != pid
                or w[mb + L.M_START_US] != start or not self._holds_nothing(m)
            ):
                continue
            self._retire_entry_locked(m)

    # -- holder side ------------------------------------------------------
    def acquire(self, index: int, generation: int) -> memoryview:
        """Borrow a sent slot: returns a read-only view of its ``nbytes``.
        Raises SlotError if ``(index, generation)`` does not name a slot in
        flight (a corrupt or stale reference)."""
        self._check_index(index)
        w = self._w
        with self._tlock:
            self._check_usable()
            m = self._ensure_member()
            s = self._slots + index * L.SLOT_WORDS
            if w[s + L.S_GEN] != generation or w[s + L.S_STATE] != _SENT:
                raise SlotError(
                    f"stale or corrupt slot reference: slot {index} generation {generation} of pool "
                    f"{self.name!r} is not in flight (it is {L.SLOT_STATE_NAMES.get(w[s + L.S_STATE], '?')}, "
                    f"generation {w[s + L.S_GEN]})"
                )
            nbytes = w[s + L.S_NBYTES]
            if not 0 <= nbytes <= self.slot_size:
                raise BrokenError(
                    f"slot pool {self.name!r} is corrupt: slot {index} claims {nbytes} bytes "
                    f"(slots hold {self.slot_size})"
                )
            w[self._holdw + m * self.slot_count + index] += _ACQ
            self._holds += 1
            if self._deferred:
                self._drain_deferred_locked()
        off = self._data + index * self._stride
        return self._rbuf[off : off + nbytes]

    def release(self, index: int, generation: int) -> None:
        """Give back one hold of a slot acquired by this process.  Raises
        SlotError if this process does not hold it (released twice, never
        acquired, or a slot of another pool)."""
        self._check_index(index)
        with self._tlock:
            if self._closed:
                raise ClosedError(f"slot pool {self.name!r} is closed")
            self._release_locked(index, generation)
            self._push_notes_locked(block=True)
            self._maybe_finish_close_locked()

    def release_later(self, index: int, generation: int, epoch: int) -> None:
        """Release from a finalizer: never blocks, never raises.  ``epoch`` is
        :attr:`epoch` at acquisition (a forked child's copies release nothing)."""
        tlock = self._tlock
        if not self._deferred and tlock.acquire(False):
            # The usual case, done at once: nobody in this process is inside the pool.
            try:
                if epoch == self._epoch and not self._closed:
                    try:
                        self._release_locked(index, generation)
                    except SlotError:
                        pass
                    self._push_notes_locked()
                    if self._closing:
                        self._maybe_finish_close_locked()
            finally:
                tlock.release()
            if not self._deferred:
                return
        else:
            self._deferred.append((index, generation, epoch))
        self._drain_deferred()

    def abort_later(self, index: int, epoch: int) -> None:
        """:meth:`abort` one loaned slot from a finalizer (a loaned array
        dropped unsent): never blocks on this process's own calls, never
        raises.  ``epoch`` is :attr:`epoch` at allocation (a forked child's
        copies abort nothing); a slot no longer loaned here is left alone."""
        self._deferred.append((index, None, epoch))
        self._drain_deferred()

    @property
    def epoch(self) -> int:
        return self._epoch

    def _drain_deferred(self) -> None:
        while self._deferred:
            if not self._tlock.acquire(blocking=False):
                return  # the holder of the thread lock drains before letting go
            try:
                self._drain_deferred_locked()
            finally:
                self._tlock.release()

    def _drain_deferred_locked(self) -> None:
        d = self._deferred
        epoch = self._epoch
        aborted: List[int] = []
        while d:
            i, gen, e = d.popleft()
            if e != epoch or self._closed:
                continue
            if gen is None:  # from abort_later
                if i in self._loaned and not self._closing:
                    del self._loaned[i]
                    aborted.append(i)
                continue
            try:
                self._release_locked(i, gen)
            except SlotError:
                pass
        if aborted:
            try:
                self._free_slots_locked(aborted, "frees")
            except (BrokenError, ValueError, IndexError):
                pass  # (a finalizer's work: the janitor frees them once this process is gone)
        self._push_notes_locked(block=False)
        self._maybe_finish_close_locked()

    def _release_locked(self, index: int, generation: int) -> None:
        w = self._w
        m = self._member
        s = self._slots + index * L.SLOT_WORDS
        hw = self._holdw + (m if m >= 0 else 0) * self.slot_count + index
        v = w[hw] if m >= 0 else 0
        if m < 0 or w[s + L.S_GEN] != generation or (v & _MASK) >= (v >> 32):
            raise SlotError(
                f"slot {index} generation {generation} of pool {self.name!r} is not held by this process "
                f"(released twice, never acquired here, or a slot of another pool)"
            )
        w[hw] = v + 1
        self._holds -= 1
        self._notes.append((w[s + L.S_OWNER] - 1, generation << 32 | index))

    def _push_notes_locked(self, block: bool = False, have_lock: bool = False) -> None:
        """Push pending return notifications to their sources' queues.
        (tlock held; without ``block`` a busy pool lock defers them.)"""
        notes = self._notes
        if not notes:
            return
        w = self._w
        if not have_lock and not self._lock.acquire(None if block else 0):
            return
        try:
            q = self._q
            mask = q - 1
            for owner, v in notes:
                if not 0 <= owner < self.max_members:
                    continue
                mb = self._members + owner * L.MEMBER_WORDS
                if w[mb + L.M_STATE] != _LIVE:
                    continue  # a dead or closed source: the janitor frees its slots
                tail = w[mb + L.M_RQ_TAIL]
                if tail - w[mb + L.M_RQ_HEAD] >= q:
                    w[mb + L.M_RQ_LOST] = 1
                    w[L.W_POOL_COUNTERS + 6] += 1
                    continue
                w[self._rqw + owner * q + (tail & mask)] = v
                w[mb + L.M_RQ_TAIL] = tail + 1
                w[L.W_POOL_COUNTERS + 2] += 1
            notes.clear()
        finally:
            if not have_lock:
                self._lock.release()  # (a fence before the flag's load)
        self._wake_waiters(have_lock)

    def _waiters(self) -> int:
        """How many live members wait in allocate() now."""
        w = self._w
        high = w[L.W_MEMBERS_HIGH]
        if not 0 <= high <= self.max_members:
            high = self._high()  # (raises BrokenError)
        mb = self._members
        n = 0
        for _ in range(high):
            if w[mb + _M_WAITING] and w[mb + L.M_STATE] == _LIVE:
                n += 1
            mb += L.MEMBER_WORDS
        return n

    def _wake_waiters(self, fence: bool) -> None:
        """Wake every source waiting for a slot: a free slot serves any of
        them, a return only the one it was pushed to, and the semaphore
        cannot tell them apart.  ``fence``: no lock release came since the
        store that freed or returned (it must be visible before the flags'
        loads)."""
        if fence:
            full_fence()
        if not self._w[L.W_RETURN_WAITING]:
            return
        n = self._waiters()
        if n:
            # Tokens already posted wake sleepers as well; posting only up to
            # one per waiter also bounds the semaphore when a waiter died
            # with its flag up (until the janitor retires its entry).
            sem = self._bell_sem
            n -= P.sem_value(sem)
            for _ in range(n):
                sem.release()

    def holding(self, index: int) -> int:
        """How many holds this process has on slot ``index`` now."""
        self._check_index(index)
        m = self._member
        if m < 0:
            return 0
        v = self._w[self._holdw + m * self.slot_count + index]
        return (v >> 32) - (v & _MASK)

    # -- inspection -------------------------------------------------------
    def _check_index(self, index: int) -> None:
        if not isinstance(index, int) or not 0 <= index < self.slot_count:
            raise SlotError(f"slot index {index!r} is out of range for pool {self.name!r} ({self.slot_count} slots)")

    def free_count(self) -> int:
        """Free slots now (a hint: exact when nothing is in flight)."""
        return self._w[L.W_FREE_COUNT]

    def slot_info(self, index: int) -> SlotInfo:
        self._check_index(index)
        w = self._w
        s = self._slots + index * L.SLOT_WORDS
        state = w[s + L.S_STATE]
        owner = w[s + L.S_OWNER] - 1
        pid = w[self._members + owner * L.MEMBER_WORDS + L.M_PID] if state and 0 <= owner < self.max_members else 0
        holders = []
        for m in range(self._high()):
            v = w[self._holdw + m * self.slot_count + index]
            held = (v >> 32) - (v & _MASK)
            if held > 0:
                holders.append((w[self._members + m * L.MEMBER_WORDS + L.M_PID], held))
        return SlotInfo(
            index, L.SLOT_STATE_NAMES.get(state, str(state)), w[s + L.S_GEN], pid, w[s + L.S_NBYTES], tuple(holders)
        )

    def statistics(self) -> SlotPoolStatistics:
        """A snapshot of the shared counters (any attached process sees the same)."""
        return _statistics(self.name, self._w)

    # -- lifetime ---------------------------------------------------------
    @property
    def closed(self) -> bool:
        return self._closed or self._closing

    def close(self) -> None:
        """End this handle (idempotent).  Loaned slots are freed; slots this
        process sent stay in flight and are freed by a janitor once returned.
        While views from :meth:`acquire` are alive the mapping stays, and
        their slots return when they die."""
        with self._tlock:
            if self._closed or self._closing:
                return
            self._closing = True
            if self._pid == os.getpid():
                if self._loaned:
                    self._free_slots_locked(list(self._loaned))
                    self._loaned.clear()
                self._drain_deferred_locked()
            self._maybe_finish_close_locked()

    def _maybe_finish_close_locked(self) -> None:
        if not self._closing or self._closed or (self._holds > 0 and self._pid == os.getpid()):
            return
        self._closed = True
        _open_pools.discard(self)
        m = self._member
        if m >= 0 and self._pid == os.getpid():
            try:
                self._push_notes_locked(block=True)
                w = self._w
                mb = self._members + m * L.MEMBER_WORDS
                if self._outstanding or m in self._source_entries() or not self._holds_nothing(m):
                    w[mb + L.M_STATE] = _DEAD  # retired: a janitor recycles the entry later
                else:  # (balanced hold words stay: see _holds_nothing)
                    self._lock.acquire()
                    try:
                        self._retire_entry_locked(m)
                    finally:
                        self._lock.release()
            except (ValueError, IndexError):
                pass
        self._member = -1
        try:
            self._rbuf.release()
        except BufferError:
            pass  # a view is still exported: the mapping lives until it goes
        self._segment.close()

    def unlink(self) -> None:
        """Remove the pool's name and semaphores for every process."""
        self._segment.unlink()

    def __enter__(self) -> "SlotPool":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        if self.closed:
            return f"<SlotPool {getattr(self, 'name', '?')!r} closed>"
        return f"<SlotPool {self.name!r} {self.free_count()}/{self.slot_count} slots free of {self.slot_size} bytes>"

    # -- read-only, for shmq.queue's back-pressure (added with the queue restructuring)
    def in_transit(self) -> Tuple[bool, tuple]:
        """``(in_transit, signature)``: whether some slot holds a message
        still on its way -- loaned (being written), or sent and not yet
        acquired by every receiver it was sent to -- and a value that changes
        whenever any slot changes hands.  Reads the tables within this
        handle's geometry; writes nothing."""
        w = self._w
        n = self.slot_count
        members = min(w[L.W_MEMBERS_HIGH], self.max_members)
        in_transit = False
        signature = []
        for i in range(n):
            s = self._slots + i * L.SLOT_WORDS
            state = w[s + L.S_STATE]
            acquired = released = 0
            for m in range(members):
                v = w[self._holdw + m * n + i]
                acquired += v >> 32
                released += v & _MASK
            signature.append((state, w[s + L.S_GEN], acquired, released))
            if state == _LOANED or (state == _SENT and acquired < w[s + L.S_DELIVERIES]):
                in_transit = True
        return in_transit, tuple(signature)

    def return_queue_intact(self) -> bool:
        """Whether this process's return queue has plausible indices
        (RQ_HEAD <= RQ_TAIL <= RQ_HEAD + capacity): a corrupt RQ_TAIL would
        make the next allocation drain it for ever.  Reads two words."""
        m = self._member
        if m < 0:
            return True
        mb = self._members + m * L.MEMBER_WORDS
        w = self._w
        head = w[mb + L.M_RQ_HEAD]
        return 0 <= w[mb + L.M_RQ_TAIL] - head <= self._q and head >= 0


_TOKEN = object()

# The Python moves stay reachable (the C ones fall back to them, the tests
# drive both); with the C core the class's own are the C ones.
SlotPool._py_try_allocate = SlotPool.try_allocate  # type: ignore[attr-defined]
SlotPool._py_mark_sent = SlotPool.mark_sent  # type: ignore[attr-defined]
SlotPool._py_set_fence = SlotPool.set_fence  # type: ignore[attr-defined]
SlotPool._py_acquire = SlotPool.acquire  # type: ignore[attr-defined]
SlotPool._py_release_later = SlotPool.release_later  # type: ignore[attr-defined]
if _core is not None:
    SlotPool.try_allocate = _core.PoolCore.try_allocate  # type: ignore[assignment]
    SlotPool.mark_sent = _core.PoolCore.mark_sent  # type: ignore[assignment]
    SlotPool.set_fence = _core.PoolCore.set_fence  # type: ignore[assignment]
    SlotPool.acquire = _core.PoolCore.acquire  # type: ignore[assignment]
    SlotPool.release_later = _core.PoolCore.release_later  # type: ignore[assignment]


def _statistics(name: str, w: memoryview) -> SlotPoolStatistics:
    """Read a pool's statistics from its header words (read-only access)."""
    count = w[L.W_SLOT_COUNT]
    slots = w[L.W_SLOT_TABLE] >> 3
    members = w[L.W_MEMBER_TABLE] >> 3
    high = min(w[L.W_MEMBERS_HIGH], w[L.W_MAX_MEMBERS])
    size = len(w)
    if not (
        0 <= count <= L.MAX_SLOT_COUNT and 0 < slots and slots + count * L.SLOT_WORDS <= size
        and 0 <= high and 0 < members and members + high * L.MEMBER_WORDS <= size
    ):
        raise LayoutError(f"{name!r}: slot pool header is inconsistent with its size {size * L.WORD}")
    states = {_FREE: 0, _LOANED: 0, _SENT: 0}
    for i in range(count):
        st = w[slots + i * L.SLOT_WORDS + L.S_STATE]
        states[st] = states.get(st, 0) + 1
    alive = []
    reused = 0
    for m in range(high):
        mb = members + m * L.MEMBER_WORDS
        pid = w[mb + L.M_PID]
        if pid:
            alive.append((pid, w[mb + L.M_STATE] == _LIVE and P.is_alive(pid, w[mb + L.M_START_US])))
            reused += w[mb + L.M_REUSES]
    counters = [w[L.W_POOL_COUNTERS + k] for k in range(len(L.POOL_COUNTER_NAMES))]
    counters[0] += reused  # allocations
    counters[1] += reused  # frees
    return SlotPoolStatistics(
        name, w[L.W_SLOT_SIZE], count, states[_FREE], states[_LOANED], states[_SENT], *counters,
        members=tuple(alive),
    )


def view_statistics(view) -> SlotPoolStatistics:
    """Statistics of the pool mapped by ``view`` (a read-only SegmentView)."""
    return _statistics(view.name, view.words)
