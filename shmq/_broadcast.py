"""The broadcast ring under ``shmq.Topic`` and the value cell under ``shmq.Latest``.

Byte layer (L1b): record moves, cursors and the subscriber table, over a
:class:`~shmq._segment.Segment` of kind ``KIND_TOPIC`` / ``KIND_LATEST``
(byte maps in ``_layout``).  Nothing here pickles, sleeps or decides how long
to wait; every call returns at once with a status.

Broadcast ring.  Publishers (one at a time, under the producer lock the
caller holds) append records at TAIL.  Each subscriber reads at its own
CURSOR.  Before a publisher writes a byte it moves OLDEST past every record
the new one will overwrite; a reader copies a record, then checks that OLDEST
has not passed it (x86-64 keeps stores in order and loads in order, so a
reader that still sees the old OLDEST after its copy copied bytes written
before the eviction).  A record that was overwritten is *lost* to that reader,
never torn: it jumps to OLDEST and counts what it missed from the sequence
numbers the records carry.  Whether a publisher may evict records a live
subscriber has not read yet (``drop-oldest``) or must wait (``block``) is the
caller's policy (``gate`` of :meth:`BroadcastRing.try_write`).
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any, Callable, List, Optional, Tuple

from . import _layout as L
from . import _platform as P
from ._errors import BrokenError, EndOfChannel, LayoutError
from ._segment import ParticipantInfo, Segment, participant_infos
from . import _sync
from ._sync import Doorbell, RobustLock

__all__ = (
    "CORE",
    "BroadcastRing",
    "Cursor",
    "Iteration",
    "Receiver",
    "LatestStatistics",
    "SubscriberStatistics",
    "TopicStatistics",
    "SlotCursor",
    "ValueCell",
    "latest_statistics",
    "publishing_writer",
    "record_size",
    "topic_statistics",
)

_W = L.WORD
_HDR = L.T_RECORD_HEADER


def _load_core() -> Any:
    """shmq._core if it is built, has the broadcast moves for this layout and
    SHMQ_PURE is not set; else None (the moves below run).  See docs/core.md."""
    if os.environ.get("SHMQ_PURE", "") not in ("", "0"):
        return None
    try:
        from . import _core
    except ImportError:
        return None
    layout = getattr(_core, "TOPIC_LAYOUT", None)
    if not isinstance(layout, dict) or not hasattr(_core, "TopicIteration"):
        return None  # not a core of this version
    return _core if layout == {k: getattr(L, k, None) for k in layout} else None


_core = _load_core()
#: which core runs the topic's record moves: "c" (shmq._core) or "python"
CORE = "python" if _core is None else "c"
# With the C core, the fields the record moves read on every call are C
# members of these bases, and their try_write/try_read replace the Python
# ones (end of this module).
_RingBase: Any = object if _core is None else _core.BroadcastCore
_CursorBase: Any = object if _core is None else _core.CursorCore


def record_size(payload_bytes: int) -> int:
    """Bytes a record of ``payload_bytes`` takes in the data area."""
    return _HDR + ((payload_bytes + _W - 1) & -_W)


@dataclass(frozen=True)
class SubscriberStatistics:
    """One subscription's position in its topic."""

    #: the subscriber's process id
    pid: int
    #: messages still in the ring that it has not read yet
    lag_messages: int
    #: bytes of the ring between its cursor and the newest record
    lag_bytes: int
    #: messages it lost (overwritten before it read them; drop-oldest only)
    lost: int
    #: messages it received
    received: int


@dataclass(frozen=True)
class TopicStatistics:
    """A snapshot of a topic, as every attached process sees it (also what
    ``shmq stat`` reads, without attaching)."""

    #: the topic's name
    name: str
    #: "block" or "drop-oldest"
    overflow: str
    #: size of the ring's data area
    capacity_bytes: int
    #: messages published since the topic was created
    published: int
    #: messages still in the ring (readable by a ``start="oldest"`` subscriber)
    held_messages: int
    #: bytes those take in the ring (record headers and padding included)
    held_bytes: int
    #: open publisher handles in every process (dead ones not counted)
    publishers: int
    #: True once every publisher has closed (or died): the stream ended
    ended: bool
    #: the live subscriptions, one entry each
    subscribers: Tuple[SubscriberStatistics, ...]
    #: bytes written into the ring since the topic was created (record
    #: headers and padding included): the byte rate's counter
    bytes_published: int = 0
    #: pid of the creating process, and whether it still runs
    creator_pid: int = 0
    creator_alive: bool = False
    #: registered processes (publishers and subscribers)
    participants: Tuple[ParticipantInfo, ...] = ()
    #: time.monotonic() when the snapshot was taken
    taken_at: float = 0.0

    @property
    def fill_ratio(self) -> float:
        """The slowest subscriber's lag as a share of the ring (0.0 with no
        subscriber): near 1.0 it gates a ``block`` topic's publishers, or
        is about to lose messages under ``drop-oldest``.  (The ring itself
        keeps old records until they are overwritten, so ``held_bytes``
        says nothing about who keeps up.)"""
        lag = max((x.lag_bytes for x in self.subscribers), default=0)
        return min(1.0, lag / self.capacity_bytes) if self.capacity_bytes else 0.0


@dataclass(frozen=True)
class LatestStatistics:
    """A snapshot of a ``shmq.Latest``."""

    #: its name
    name: str
    #: the largest value (pickled) it holds
    capacity_bytes: int
    #: the newest version: 0 if never set, then one more per set
    version: int
    #: bytes of the newest value's pickle (0 if never set)
    value_bytes: int
    #: readers sleeping in ``wait()`` now
    waiters: int
    #: pid of the creating process, and whether it still runs
    creator_pid: int
    creator_alive: bool
    #: registered processes
    participants: Tuple[ParticipantInfo, ...]
    #: time.monotonic() when the snapshot was taken
    taken_at: float
    #: the slot pool ("<name>.p") large arrays travel through: bytes per
    #: slot and slots (0, 0: none, values are always pickled)
    slot_size: int = 0
    slot_count: int = 0
    #: slots in use now (the newest value's, older values' that readers
    #: still hold, one being written); -1 if not read (``shmq stat``)
    slots_in_use: int = -1
    #: reader entries (processes that took a value's slots at least once)
    readers: int = 0


def _alive(pid: int, start_us: int) -> bool:
    return 0 < pid < 1 << 31 and P.is_alive(pid, start_us)


def topic_statistics(seg: Any) -> TopicStatistics:
    """A snapshot of the topic in ``seg`` (a Segment, or a read-only
    SegmentView: nothing is written).  Publisher handles of dead processes
    are not counted (and, once none is left, the stream shows as ended:
    the next publisher scan will say so).  Raises LayoutError if the header
    contradicts itself."""
    w = seg.words
    cap = w[L.W_T_CAPACITY]
    if cap < L.MIN_CAPACITY or cap % _W or seg.size != L.topic_segment_size(cap):
        raise LayoutError(f"topic {seg.name!r} has a corrupt header: capacity {cap}, size {seg.size}")
    # As a subscriber reads them: the cursor words before the ring's.
    subs = []
    for i in range(L.T_SUBSCRIBERS):
        base = L.topic_sub_word(i)
        pid = w[base + L.TS_PID]
        if pid:
            subs.append((pid, w[base + L.TS_CURSOR], w[base + L.TS_NEXT_SEQ], w[base + L.TS_LOST],
                         w[base + L.TS_RECEIVED]))
    oldest, oldest_seq = w[L.W_T_OLDEST], w[L.W_T_OLDEST_SEQ]
    tail, published = w[L.W_T_TAIL], w[L.W_T_NEXT_SEQ]
    publishers, dead = 0, False
    for i in range(L.T_PUB_MEMBERS):
        base = L.topic_pub_word(i)
        pid = w[base]
        if pid:
            if _alive(pid, w[base + 1]):
                publishers += max(0, w[base + 2])
            elif w[base + 2] > 0:
                dead = True
    state = w[L.W_T_STATE]
    return TopicStatistics(
        name=seg.name,
        overflow="drop-oldest" if w[L.W_T_FLAGS] & L.T_DROP_OLDEST else "block",
        capacity_bytes=cap,
        published=published,
        held_messages=max(0, published - oldest_seq),
        held_bytes=max(0, tail - oldest),
        publishers=publishers,
        ended=bool(state & L.T_PUBLISHERS_DONE) or (dead and publishers == 0),
        subscribers=tuple(
            SubscriberStatistics(pid, max(0, published - max(seq, oldest_seq)), max(0, tail - max(cursor, oldest)),
                                 lost, received)
            for pid, cursor, seq, lost, received in subs
        ),
        bytes_published=tail,
        creator_pid=w[L.W_CREATOR_PID],
        creator_alive=seg.creator_alive(),
        participants=participant_infos(seg),
        taken_at=time.monotonic(),
    )


def latest_statistics(seg: Any) -> LatestStatistics:
    """A snapshot of the ``shmq.Latest`` in ``seg`` (a Segment or a
    read-only SegmentView).  Raises LayoutError if the header contradicts
    itself."""
    w = seg.words
    cap = w[L.W_L_CAPACITY]
    if cap < 0 or cap % _W or seg.size != L.latest_segment_size(cap):
        raise LayoutError(f"latest {seg.name!r} has a corrupt header: capacity {cap}, size {seg.size}")
    v = w[L.W_L_VERSION]
    hdr = L.W_L_BUFFERS + 2 * (v % L.LATEST_BUFFERS)
    n = w[hdr + 1] if v and w[hdr] == v else 0
    config = w[L.W_L_SLOT_CONFIG]
    return LatestStatistics(
        name=seg.name,
        capacity_bytes=cap,
        version=v,
        value_bytes=max(0, min(n, cap)),
        waiters=max(0, w[L.W_L_WAITERS]),
        creator_pid=w[L.W_CREATOR_PID],
        creator_alive=seg.creator_alive(),
        participants=participant_infos(seg),
        taken_at=time.monotonic(),
        slot_size=max(0, config) & ((1 << L.POOL_COUNT_SHIFT) - 1),
        slot_count=max(0, config) >> L.POOL_COUNT_SHIFT,
        readers=sum(1 for i in range(L.L_READERS) if w[L.latest_reader_word(i) + L.LR_PID]),
    )


class BroadcastRing(_RingBase):
    """One attachment's view of a topic's ring and tables."""

    def __init__(self, segment: Segment) -> None:
        self.segment = segment
        self.words = w = segment.words
        self.buf = segment.buf
        self.name = segment.name
        self.capacity_bytes = cap = w[L.W_T_CAPACITY]
        if cap < L.MIN_CAPACITY or cap % _W or segment.size != L.topic_segment_size(cap):
            raise BrokenError(f"topic {self.name!r} has a corrupt header: capacity {cap}, size {segment.size}")
        self.drop_oldest = bool(w[L.W_T_FLAGS] & L.T_DROP_OLDEST)
        #: the largest payload a record may carry (a pad before it never makes it wrap)
        self.max_payload = cap // 2 - _HDR
        self._base = L.TOPIC_DATA_OFFSET
        # the publisher's cached lowest live cursor and the epoch it was read in
        self._gate = -1
        self._gate_epoch = -1
        if _core is not None:  # the C moves' copies (C members of the base)
            self._c_cap, self._c_base, self._c_max_payload = cap, L.TOPIC_DATA_OFFSET, self.max_payload
            self._buf = segment.buf

    @staticmethod
    def initialise(segment: Segment, capacity_bytes: int, drop_oldest: bool, slot_config: int) -> None:
        """Creator only, before the segment is published."""
        w = segment.words
        w[L.W_T_CAPACITY] = capacity_bytes
        w[L.W_T_FLAGS] = L.T_DROP_OLDEST if drop_oldest else 0
        w[L.W_T_SLOT_CONFIG] = slot_config

    # -- publisher side (the caller holds the producer lock) ---------------
    def _span(self, n: int) -> Tuple[int, int, int]:
        """(tail, pad, size) for a record of ``n`` payload bytes."""
        t = self.words[L.W_T_TAIL]
        size = record_size(n)
        off = t % self.capacity_bytes
        pad = self.capacity_bytes - off if off + size > self.capacity_bytes else 0
        return t, pad, size

    def _corrupt(self, what: str) -> BrokenError:
        return BrokenError(f"topic {self.name!r} is corrupt: {what}")

    def lowest_cursor(self) -> int:
        """The lowest cursor of a subscriber entry (-1 if none), rescanned."""
        w = self.words
        low = -1
        for i in range(L.T_SUBSCRIBERS):
            base = L.topic_sub_word(i)
            if w[base + L.TS_PID]:
                c = w[base + L.TS_CURSOR]
                if low < 0 or c < low:
                    low = c
        return low

    def room_for(self, n: int) -> bool:
        """True if a record of ``n`` payload bytes can go in now without
        overwriting a record some subscriber has not read (block mode)."""
        t, pad, size = self._span(n)
        bound = t + pad + size - self.capacity_bytes  # records starting before this are overwritten
        w = self.words
        if self._gate_epoch == w[L.W_T_EPOCH] and (self._gate < 0 or self._gate >= bound):
            return True
        self._gate_epoch = w[L.W_T_EPOCH]
        self._gate = low = self.lowest_cursor()
        return low < 0 or low >= bound

    def gating(self, n: int) -> List[Tuple[int, int, int]]:
        """(entry, pid, start_us) of the subscribers that keep a record of
        ``n`` payload bytes out (their cursor is before what it overwrites)."""
        t, pad, size = self._span(n)
        bound = t + pad + size - self.capacity_bytes
        w = self.words
        out = []
        for i in range(L.T_SUBSCRIBERS):
            base = L.topic_sub_word(i)
            pid = w[base + L.TS_PID]
            if pid and w[base + L.TS_CURSOR] < bound:
                out.append((i, pid, w[base + L.TS_START_US]))
        return out

    def try_write(self, data: bytes, lock: RobustLock, gate: bool) -> bool:
        """Take ``lock``; append ``data`` as the next record, evicting the
        records it overwrites -- unless ``gate`` and a live subscriber has not
        read one of them: then False; release the lock.  One call (the
        lock's semaphore inlined): the publish fast path.
        ``len(data) <= max_payload``."""
        w = self.words
        sem = lock._sem
        if not sem.acquire(False):
            lock.acquire()
        else:
            w[lock._w_owner] = _sync._PID
            w[lock._w_gen] += 1
        try:
            buf, base, cap = self.buf, self._base, self.capacity_bytes
            n = len(data)
            t = w[L.W_T_TAIL]
            if t < 0:
                raise self._corrupt("TAIL out of range")
            size = _HDR + ((n + 7) & -8)
            off = t % cap
            pad = cap - off if off + size > cap else 0
            bound = t + pad + size - cap  # records starting before this are overwritten
            o = w[L.W_T_OLDEST]
            if o < bound:
                if gate and not (self._gate_epoch == w[L.W_T_EPOCH] and (self._gate < 0 or self._gate >= bound)):
                    self._gate_epoch = w[L.W_T_EPOCH]
                    self._gate = low = self.lowest_cursor()
                    if 0 <= low < bound:
                        return False
                seq = w[L.W_T_OLDEST_SEQ]
                while o < bound and o < t:
                    h = w[(base + o % cap) // _W]
                    if h < 0:
                        o -= h
                    else:
                        o += _HDR + ((h + 7) & -8)
                        seq += 1
                if o >= t:
                    o, seq = t, w[L.W_T_NEXT_SEQ]
                w[L.W_T_OLDEST_SEQ] = seq
                w[L.W_T_OLDEST] = o  # before any byte of the old records changes
            if pad:
                w[(base + off) // _W] = -pad
                t += pad
                off = 0
            at = base + off
            seq = w[L.W_T_NEXT_SEQ]
            w[at // _W] = n
            w[at // _W + 1] = seq
            buf[at + _HDR : at + _HDR + n] = data
            w[L.W_T_NEXT_SEQ] = seq + 1
            w[L.W_T_TAIL] = t + size  # publishes the record to every subscriber
        finally:
            w[lock._w_owner] = 0
            sem.release()
        return True

    def trim(self, upto: int) -> None:
        """Evict the records that end at or before ``upto`` (a record
        boundary: the lowest live cursor).  Holds: the producer lock.  Only
        records every live subscriber has read go, so nobody loses one; what
        changes is the history a ``start="oldest"`` subscriber sees."""
        w, base, cap = self.words, self._base, self.capacity_bytes
        o, t = w[L.W_T_OLDEST], w[L.W_T_TAIL]
        if o >= upto:
            return
        seq = w[L.W_T_OLDEST_SEQ]
        while o < upto and o < t:
            h = w[(base + o % cap) // _W]
            if h < 0:
                o -= h
            else:
                o += record_size(h)
                seq += 1
        w[L.W_T_OLDEST_SEQ] = seq
        w[L.W_T_OLDEST] = o

    def repair(self) -> None:
        """After a publisher died holding the lock (caller holds it now):
        recount OLDEST_SEQ and NEXT_SEQ from the records themselves."""
        w, base, cap = self.words, self._base, self.capacity_bytes
        t, o = w[L.W_T_TAIL], w[L.W_T_OLDEST]
        while o < t and w[(base + o % cap) // _W] < 0:
            o -= w[(base + o % cap) // _W]
        if o >= t:
            w[L.W_T_OLDEST_SEQ] = w[L.W_T_NEXT_SEQ]
            return
        seq = w[(base + o % cap) // _W + 1]
        w[L.W_T_OLDEST_SEQ] = seq
        while o < t:
            h = w[(base + o % cap) // _W]
            if h < 0:
                o -= h
            else:
                o += record_size(h)
                seq += 1
        w[L.W_T_NEXT_SEQ] = seq

    def wake_subscribers(self, sem) -> None:
        """Post ``sem`` once per subscriber that announced it sleeps, clearing
        its flag (the post takes its count; see topic._SubscriberBell)."""
        w = self.words
        w[L.W_T_SUB_WAITING] = 0
        # The clear before the scan: else a subscriber that announces in
        # between (entry flag, then SUB_WAITING) is missed by the scan and
        # its SUB_WAITING overwritten by this clear (x86-64 lets a store
        # wait behind later loads): it slept until its slice ran out.
        _sync.full_fence()
        count = 0
        for i in range(L.T_SUBSCRIBERS):
            word = L.topic_sub_word(i) + L.TS_WAITING
            if w[word]:
                w[word] = 0
                count += 1
        # a sleeper that timed out leaves a post behind: never pile them up
        for _ in range(max(0, count - P.sem_value(sem))):
            sem.release()

    # -- the subscriber table --------------------------------------------
    def join(self, pid: int, start_us: int, oldest: bool) -> Tuple[int, int, int]:
        """A new subscriber entry at TAIL (or OLDEST): ``(entry, cursor,
        next_seq)``, or entry -1 if the table is full.  Holds: the producer
        lock (so no record is half written) and the admin lock."""
        w = self.words
        if oldest:
            cursor, seq = w[L.W_T_OLDEST], w[L.W_T_OLDEST_SEQ]
        else:
            cursor, seq = w[L.W_T_TAIL], w[L.W_T_NEXT_SEQ]
        for i in range(L.T_SUBSCRIBERS):
            base = L.topic_sub_word(i)
            if w[base + L.TS_PID] == 0:
                for k in range(1, L.T_SUB_WORDS):
                    w[base + k] = 0
                w[base + L.TS_START_US] = start_us
                w[base + L.TS_CURSOR] = cursor
                w[base + L.TS_NEXT_SEQ] = seq
                w[base + L.TS_PID] = pid  # live from this store on
                w[L.W_T_EPOCH] += 1  # publishers re-read the cursors
                return i, cursor, seq
        return -1, 0, 0

    def free(self, entry: int, pid: int, start_us: int) -> bool:
        """Free ``entry`` if it still belongs to ``pid``/``start_us``
        (caller holds the admin lock)."""
        base = L.topic_sub_word(entry)
        w = self.words
        if w[base + L.TS_PID] != pid or w[base + L.TS_START_US] != start_us:
            return False
        w[base + L.TS_PID] = 0
        return True

    def entries(self) -> List[Tuple[int, ...]]:
        """(entry, pid, start_us, cursor, next_seq, lost, received) of every used entry."""
        w = self.words
        out = []
        for i in range(L.T_SUBSCRIBERS):
            base = L.topic_sub_word(i)
            if w[base + L.TS_PID]:
                out.append((i,) + tuple(w[base + k] for k in (L.TS_PID, L.TS_START_US, L.TS_CURSOR,
                                                              L.TS_NEXT_SEQ, L.TS_LOST, L.TS_RECEIVED)))
        return out


class Cursor(_CursorBase):
    """A subscriber's position: reads records one by one, counting the ones
    it lost to publishers that overwrote them.  One thread uses it.

    ``pos`` is where it reads next; the shared CURSOR word (what publishers
    gate on and return slots by) is stored lazily, with NEXT_SEQ and
    RECEIVED: when it has read every record up to the TAIL it last looked
    at, when it finds nothing to read, when it is ``flush_bytes`` ahead of
    what it stored, and whenever a publisher waits for room.  So a
    subscriber that keeps up holds nobody back, and one that reads a
    backlog writes its words once per ``flush_bytes`` (capacity / 16)
    instead of once per record.  TAIL, the publishers' cache line, is read
    once per batch (when ``pos`` reaches the TAIL seen last), and so is
    OLDEST in a ``block`` topic, where no live cursor is ever overwritten;
    a ``drop-oldest`` reader re-checks OLDEST after every copy."""

    __slots__: Tuple[str, ...] = ("ring", "entry", "_w", "_base")
    if _core is None:  # (with the C core these are members of CursorCore)
        __slots__ += ("pos", "next_seq", "lost", "received", "_tail_seen", "_stored", "_pending",
                      "_flush", "_drop", "_slot_records", "_not_full")

    def __init__(self, ring: BroadcastRing, entry: int, pos: int, next_seq: int, not_full: Doorbell,
                 slot_records: bool = False) -> None:
        self.ring = ring
        self.entry = entry
        self.pos = pos
        self.next_seq = next_seq
        self.lost = 0
        self.received = 0
        self._w = ring.words
        self._base = L.topic_sub_word(entry)
        self._not_full = not_full
        self._tail_seen = pos  # nothing seen yet: the first read looks at TAIL
        self._stored = pos  # what the CURSOR word says (join stored it)
        self._pending = 0
        self._flush = max(_W, ring.capacity_bytes // 16)
        self._drop = bool(ring.drop_oldest)
        # SlotCursor: records starting with byte 0 keep the stored cursor
        # before them until commit()
        self._slot_records = bool(slot_records)
        if _core is not None:
            self._c_cap, self._c_base, self._c_max_payload = ring.capacity_bytes, ring._base, ring.max_payload
            self._c_sub = self._base
            self._buf = ring.buf

    def can_read(self) -> bool:
        return self._w[L.W_T_TAIL] > self.pos

    def try_read(self) -> Optional[bytes]:
        """The next record's payload, or None if there is none yet.  Raises
        BrokenError if a record's length word is impossible."""
        ring, w = self.ring, self._w
        buf, cap, base = ring.buf, ring.capacity_bytes, ring._base
        drop = self._drop
        pos = self.pos
        while True:
            if pos >= self._tail_seen:
                t = w[L.W_T_TAIL]
                if pos >= t:
                    self.pos = pos
                    if pos != self._stored:
                        self._store(pos)
                    return None
                self._tail_seen = t
                if pos < w[L.W_T_OLDEST]:
                    pos = w[L.W_T_OLDEST]  # lapped: the records in between were overwritten
                    continue
            elif drop and pos < w[L.W_T_OLDEST]:
                pos = w[L.W_T_OLDEST]
                continue
            at = base + pos % cap
            h = w[at // _W]
            if h < 0:
                if drop and w[L.W_T_OLDEST] > pos:
                    continue  # overwritten under us: the loop's top jumps to the oldest
                if -h > cap - pos % cap or -h % _W:
                    o = w[L.W_T_OLDEST]
                    if o > pos:  # overwritten under us: look again from the oldest
                        pos = o
                        continue
                    raise BrokenError(f"topic {ring.name!r} is corrupt: pad of {-h} bytes at {pos}")
                pos -= h
                continue
            if h > ring.max_payload or pos % cap + _HDR + h > cap:
                o = w[L.W_T_OLDEST]
                if o > pos:
                    pos = o
                    continue
                raise BrokenError(f"topic {ring.name!r} is corrupt: record of {h} bytes at {pos}")
            seq = w[at // _W + 1]
            data = bytes(buf[at + _HDR : at + _HDR + h])
            if drop and w[L.W_T_OLDEST] > pos:
                continue  # overwritten while we copied: lost, look again
            if seq > self.next_seq:
                self.lost += seq - self.next_seq
                w[self._base + L.TS_LOST] = self.lost
            self.next_seq = seq + 1
            self.received += 1
            pos += _HDR + ((h + 7) & -8)
            self.pos = pos
            if self._slot_records and h and data[0] == 0:
                # A record that starts with byte 0 carries slot references the
                # reader takes before its stored cursor passes it: commit().
                self._pending = 1
                return data
            if pos >= self._tail_seen or pos - self._stored >= self._flush:
                self._store(pos)
            return data

    def _store(self, pos: int) -> None:
        """Publish ``pos`` (with NEXT_SEQ and RECEIVED) in the shared entry."""
        w, base = self._w, self._base
        self._stored = pos
        w[base + L.TS_NEXT_SEQ] = self.next_seq
        w[base + L.TS_RECEIVED] = self.received
        w[base + L.TS_CURSOR] = pos  # publishers gate on this word
        # the CURSOR store before the PUB_WAITING load: else a publisher that
        # announced and re-checked the cursors in between sleeps unrung
        _sync.full_fence()
        if w[L.W_T_PUB_WAITING]:
            self._not_full.ring()


class SlotCursor(Cursor):
    """A cursor of a topic with a slot pool.  A record whose payload starts
    with byte 0 (a slot message; a pickle starts with 0x80) carries slot
    references the reader must hold before its stored cursor passes the
    record (the publisher gives back its own hold once every live cursor
    passed it): :meth:`try_read` returns it without storing the cursor, and
    :meth:`commit` stores it."""

    __slots__ = ()

    def __init__(self, ring: BroadcastRing, entry: int, pos: int, next_seq: int, not_full: Doorbell) -> None:
        super().__init__(ring, entry, pos, next_seq, not_full, slot_records=True)

    def commit(self) -> None:
        """Store the cursor past the record :meth:`try_read` returned last,
        when it started with byte 0 (nothing to do otherwise)."""
        if self._pending:
            self._pending = 0
            self._store(self.pos)


class Receiver:
    """``receive(timeout=None)`` and iteration over a subscription of a topic
    without a slot pool: :meth:`Cursor.try_read`, then ``unpack`` (a record
    that starts with byte 1: a flat tuple) or ``loads`` (a pickle) in the
    same call; ``slow(timeout)`` (which waits, raises, and returns the object)
    when there is nothing to read, the timeout is not a number >= 0, or
    :meth:`close` was called.  Iteration ends (StopIteration) where
    ``slow`` raises ``end`` (EndOfChannel).  (The C core's TopicReceiver
    mirrors it.)"""

    __slots__ = ("cursor", "loads", "unpack", "slow", "end", "closed")

    def __init__(self, cursor: Cursor, loads: Callable[[bytes], Any], unpack: Callable[[bytes], Any],
                 slow: Callable[[Any], Any], end: type = EndOfChannel) -> None:
        self.cursor = cursor
        self.loads = loads
        self.unpack = unpack
        self.slow = slow
        self.end = end
        self.closed = False

    def __call__(self, timeout: Optional[float] = None) -> Any:
        if self.closed or not (timeout is None or (type(timeout) in (int, float) and timeout >= 0)):
            return self.slow(timeout)
        data = self.cursor.try_read()
        if data is None:
            return self.slow(timeout)
        if data[0] == 1:
            return self.unpack(data)
        return self.loads(data)

    def __iter__(self) -> "Receiver":
        return self

    def __next__(self) -> Any:
        try:
            return self(None)
        except self.end:
            raise StopIteration from None

    def close(self) -> None:
        """From now on every call goes to ``slow`` (which raises ClosedError)."""
        self.closed = True


class Iteration:
    """``iter(subscription)``: :meth:`Receiver.__next__`, holding ``owner``
    (the subscription) for as long as the loop runs -- ``for msg in
    topic.subscribe()`` keeps no other reference to it, and the Receiver
    must not (a subscription dropped without close() frees its entry when
    it is collected).  (The C core's TopicIteration mirrors it.)"""

    __slots__ = ("receiver", "owner")

    def __init__(self, receiver: Any, owner: Any) -> None:
        self.receiver = receiver
        self.owner = owner

    def __iter__(self) -> "Iteration":
        return self

    def __next__(self) -> Any:
        return self.receiver.__next__()


def publishing_writer(ring: BroadcastRing, lock: RobustLock, dumps: Callable[..., Any], protocol: int,
                      pack: Optional[Callable[[Any], Optional[bytes]]], wake: Callable[[], Any],
                      slow: Callable[[Any, Any, Any], Any]) -> Callable[..., None]:
    """The fast path of ``shmq.Topic.publish`` for a topic without a slot
    pool: ``publish(obj, timeout=None)`` encodes ``obj`` once (``pack(obj)``,
    a flat tuple, unless ``pack`` is None or gives None; else
    ``dumps(obj, protocol)``) and appends it with :meth:`BroadcastRing.try_write`
    (gated in a ``block`` topic), then ``wake()`` if a subscriber sleeps.
    ``slow(obj, timeout, data)`` takes over (and returns the result) when
    the calling process is not the one that made the closure (``data``
    None: a forked child publishes as itself), the pickle can never fit, or
    there is no room now.  (The C core's TopicPublisher mirrors it.)"""
    w = ring.words
    gate = not ring.drop_oldest
    max_payload = ring.max_payload
    try_write = ring.try_write
    pid = _sync._PID

    def publish(obj: Any, timeout: Optional[float] = None) -> None:
        if _sync._PID != pid:
            return slow(obj, timeout, None)
        data = pack(obj) if pack is not None else None
        if data is None:
            data = dumps(obj, protocol)
        if len(data) > max_payload or not try_write(data, lock, gate):
            return slow(obj, timeout, data)
        if w[L.W_T_SUB_WAITING]:
            wake()
        return None

    return publish


class ValueCell:
    """The buffers of a ``shmq.Latest`` and its reader table (see ``_layout``).

    The reader table holds one *pin* per reader handle: the version whose
    slots it is about to take.  A reader stores its pin, then (after a full
    fence) reads the version: if the version is still the pinned one, no
    process that gives back a replaced value's slots will give back that
    version's before the pin is cleared (a process that gives them back
    loads the version that replaced it first, then the pins: see ``pinned``).
    """

    def __init__(self, segment: Segment) -> None:
        self.segment = segment
        self.name = segment.name
        self.words = w = segment.words
        self.buf = segment.buf
        self.capacity_bytes = cap = w[L.W_L_CAPACITY]
        if cap < 0 or cap % _W or segment.size != L.latest_segment_size(cap):
            raise BrokenError(f"latest {self.name!r} has a corrupt header: capacity {cap}, size {segment.size}")

    @staticmethod
    def initialise(segment: Segment, capacity_bytes: int, slot_config: int = 0) -> None:
        """Creator only, before the segment is published."""
        segment.words[L.W_L_CAPACITY] = capacity_bytes
        segment.words[L.W_L_SLOT_CONFIG] = slot_config

    @property
    def slot_config(self) -> Tuple[int, int]:
        """(slot_size, slot_count) of the value's slot pool; (0, 0) if none."""
        config = self.words[L.W_L_SLOT_CONFIG]
        if config < 0:
            raise BrokenError(f"latest {self.name!r} has a corrupt header: slot config {config}")
        return config & ((1 << L.POOL_COUNT_SHIFT) - 1), config >> L.POOL_COUNT_SHIFT

    # -- the reader table (pins) ------------------------------------------
    def join_reader(self, pid: int, start_us: int) -> int:
        """Take a free reader entry for ``pid``; its index, or -1 if the
        table is full.  (Caller holds the admin lock.)"""
        w = self.words
        for i in range(L.L_READERS):
            base = L.latest_reader_word(i)
            if w[base + L.LR_PID] == 0:
                w[base + L.LR_PIN] = 0
                w[base + L.LR_START_US] = start_us
                w[base + L.LR_PID] = pid
                return i
        return -1

    def leave_reader(self, entry: int, pid: int, start_us: int) -> bool:
        """Free ``entry`` if it still belongs to ``pid``/``start_us``.
        (Caller holds the admin lock.)"""
        w = self.words
        base = L.latest_reader_word(entry)
        if w[base + L.LR_PID] != pid or w[base + L.LR_START_US] != start_us:
            return False
        w[base + L.LR_PIN] = 0
        w[base + L.LR_PID] = 0
        return True

    def pin(self, entry: int, version: int) -> None:
        """Store ``version`` as the pin of ``entry``, then a full fence: the
        store is visible before this process's next load (of the version)."""
        self.words[L.latest_reader_word(entry) + L.LR_PIN] = version
        _sync.full_fence()

    def unpin(self, entry: int) -> None:
        self.words[L.latest_reader_word(entry) + L.LR_PIN] = 0

    def pins(self) -> List[Tuple[int, int, int, int]]:
        """(entry, pid, start_us, version) of every reader entry with a pin.
        (A full fence first: the caller's earlier stores, such as the
        version it published, are visible before these loads.)"""
        _sync.full_fence()
        w = self.words
        out = []
        for i in range(L.L_READERS):
            base = L.latest_reader_word(i)
            v = w[base + L.LR_PIN]
            if v and w[base + L.LR_PID]:
                out.append((i, w[base + L.LR_PID], w[base + L.LR_START_US], v))
        return out

    @property
    def version(self) -> int:
        return self.words[L.W_L_VERSION]

    def write(self, data: bytes) -> int:
        """Store ``data`` as the next version; returns it.  Holds: the writer
        lock; ``len(data) <= capacity_bytes``."""
        w, cap = self.words, self.capacity_bytes
        v = w[L.W_L_VERSION] + 1
        b = v % L.LATEST_BUFFERS
        hdr = L.W_L_BUFFERS + 2 * b
        w[hdr] = 0  # readers of the version this buffer held see it change
        w[hdr + 1] = len(data)
        at = L.LATEST_DATA_OFFSET + b * cap
        self.buf[at : at + len(data)] = data
        w[hdr] = v
        w[L.W_L_VERSION] = v  # publishes it
        return v

    def read_version(self, v: int) -> Optional[bytes]:
        """The bytes of version ``v`` if its buffer still holds it (a newer
        version overwrote it, or is overwriting it: None)."""
        w, cap = self.words, self.capacity_bytes
        hdr = L.W_L_BUFFERS + 2 * (v % L.LATEST_BUFFERS)
        if v <= 0 or w[hdr] != v:
            return None
        n = w[hdr + 1]
        if not 0 <= n <= cap:
            return None
        at = L.LATEST_DATA_OFFSET + (v % L.LATEST_BUFFERS) * cap
        data = bytes(self.buf[at : at + n])
        return data if w[hdr] == v else None

    def try_read(self) -> Optional[Tuple[int, bytes]]:
        """(version, bytes) of the newest complete value, None if never set,
        or ``(-1, b"")`` if a writer overtook this read (try again)."""
        w, cap = self.words, self.capacity_bytes
        v = w[L.W_L_VERSION]
        if v == 0:
            return None
        b = v % L.LATEST_BUFFERS
        hdr = L.W_L_BUFFERS + 2 * b
        if w[hdr] != v:
            return -1, b""
        n = w[hdr + 1]
        if not 0 <= n <= cap:
            if w[hdr] != v:
                return -1, b""
            raise BrokenError(f"latest {self.name!r} is corrupt: value of {n} bytes")
        at = L.LATEST_DATA_OFFSET + b * cap
        data = bytes(self.buf[at : at + n])
        if w[hdr] != v:
            return -1, b""
        return v, data


# The Python moves above are the specification; with the C core its mirrors
# take their place (docs/core.md).  The Python ones stay reachable for the
# tests: BroadcastRing._py_try_write, _py_wake_subscribers, _py_lowest_cursor,
# Cursor._py_try_read, PyReceiver and py_publishing_writer.
BroadcastRing._py_try_write = BroadcastRing.try_write  # type: ignore[attr-defined]
BroadcastRing._py_wake_subscribers = BroadcastRing.wake_subscribers  # type: ignore[attr-defined]
BroadcastRing._py_lowest_cursor = BroadcastRing.lowest_cursor  # type: ignore[attr-defined]
Cursor._py_try_read = Cursor.try_read  # type: ignore[attr-defined]
PyReceiver = Receiver
PyIteration = Iteration
py_publishing_writer = publishing_writer

if _core is not None:
    BroadcastRing.try_write = _core.BroadcastCore.try_write  # type: ignore[assignment]
    BroadcastRing.wake_subscribers = _core.BroadcastCore.wake_subscribers  # type: ignore[assignment]
    BroadcastRing.lowest_cursor = _core.BroadcastCore.lowest_cursor  # type: ignore[assignment]
    Cursor.try_read = _core.CursorCore.try_read  # type: ignore[assignment]
    Receiver = _core.TopicReceiver  # type: ignore[misc]
    Iteration = _core.TopicIteration  # type: ignore[misc]
    publishing_writer = _core.TopicPublisher  # type: ignore[assignment]
