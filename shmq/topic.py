"""Topics: one stream, every subscriber gets every message.

(``Latest``, the newest value, lives in ``shmq.latest``; it is re-exported
here.)

A :class:`Topic` is a broadcast ring in one shared-memory segment: a message
is pickled and written once, whatever the number of subscribers, and every
subscriber reads it at its own cursor (``shmq._broadcast``)::

    topic = shmq.Topic()                      # the creator counts as a publisher
    sub = topic.subscribe()                   # any process: Topic.attach(name).subscribe()
    topic.publish({"frame": 1})
    sub.receive()                             # -> {"frame": 1}
    topic.close()                             # last publisher closed: subscribers
    for msg in sub: ...                       # drain, then the loop ends (EndOfChannel)

Back-pressure (``overflow="block"``, the default): the slowest live
subscriber gates the publishers.  ``overflow="drop-oldest"``: publishers never
wait; a subscriber that falls a whole ring behind loses the oldest messages,
and ``Subscription.lost`` counts exactly how many.  A subscriber's process
that dies stops gating within one slice (``SLICE_SECONDS``) of a publisher
waiting on it.

End of stream follows channels (docs/channels.md): publishers are counted
handles.  Every publisher closed -> subscribers drain, then EndOfChannel; a
publisher's process died without closing -> BrokenError naming it.
"""
from __future__ import annotations

import atexit
import functools
import os
import pickle
import struct
import sys
import threading
import time
import weakref
from collections import deque
from typing import Any, Deque, Iterator, List, Optional, Tuple

from . import _layout as L
from . import _platform as P
from ._broadcast import (  # the statistics classes live beside the bytes they read (shmq stat)
    _core,
    BroadcastRing,
    Cursor,
    Iteration,
    Receiver,
    SlotCursor,
    SubscriberStatistics,
    TopicStatistics,
    publishing_writer,
    topic_statistics,
)
from ._codec import LARGE, Codec, first_pass_failed, stop_at_large
from .latest import Latest, LatestStatistics  # re-exported (their home is shmq.latest)
from ._errors import (
    BrokenError,
    ClosedError,
    Empty,
    EndOfChannel,
    Full,
    MessageTooLarge,
    TooManyMembers,
)
from ._segment import Segment
from ._slots import SlotPool
from ._sync import SPIN_SECONDS, Doorbell, RobustLock, full_fence, slice_end
from ._wait import deadline_for, wait_until

__all__ = (
    "Latest",
    "LatestStatistics",
    "Subscription",
    "SubscriberStatistics",
    "Topic",
    "TopicStatistics",
    "DEFAULT_CAPACITY_BYTES",
    "SLICE_SECONDS",
)

DEFAULT_CAPACITY_BYTES = 1 << 20
#: blocked publish/receive/wait calls re-check the peers (dead? closed?) this often
SLICE_SECONDS = 0.1
#: how long a subscriber that caught up polls before it sleeps (the queues' adaptive
#: spin, shmq._sync.SPIN_SECONDS, is 100 us).  0: sleep at once.  Many readers wait for
#: one writer, and a polling reader takes the CPU the writer needs: on 2 cores,
#: bench_topic's 1/2/4 subscribers got 4.1-6.2M/3.4-4.3M/2.0-3.0M msgs/s each without
#: it against 4.1-4.6M/2.5-3.0M/1.4-2.7M with it (interleaved runs), and the delay
#: from publish to receive at one message per 20/200/1000 us was 2.2/2.3/4.3 us
#: median against 2.3/6.3/42.9 us (docs/topics.md).
SUBSCRIBER_SPIN_SECONDS = 0.0
_OVERFLOWS = ("block", "drop-oldest")
_STARTS = ("next", "oldest")
_LOW = (1 << 32) - 1
_SIZE_MASK = (1 << L.POOL_COUNT_SHIFT) - 1
#: a publisher short of slots re-checks which ones the subscribers are done with this often
#: (its own hold "for the ring" goes only when it looks: 10 ms gave 6 MiB frames to
#: 4 subscribers through 4 slots 631 frames/s per subscriber, 1 ms 1,494)
SLOT_RECHECK_SECONDS = 0.001
_dumps = pickle.dumps
_loads = pickle.loads


# -- flat tuples: the small messages' own encoding -----------------------------------
# A tuple of at most 255 items, each None, a bool, an int of 64 bits, a
# float, a str or bytes (exact types), travels as
#     0x01, item count, then per item a kind byte and its value:
#     N / T / F (None, True, False), i + int64, d + float64 (little-endian),
#     s + uint32 length + UTF-8, b + uint32 length + bytes
# instead of a pickle (which starts with 0x80; a slot message with 0x00).
# Why: decoding (1, "abc", 1.5) costs ~70 ns in C against ~200 ns for
# pickle.loads, and every subscriber decodes every message: at 4 subscribers
# on 2 cores that is most of the CPU a message costs (docs/topics.md).  The
# objects that come out equal the ones pickle would give (the same types,
# no identity shared between items).  Publishers on the C core use it;
# pure-Python ones publish pickles (packing in Python is slower than
# pickle.dumps); every subscriber decodes both.  _core.pack_flat /
# unpack_flat mirror the two functions below.
_FLAT = 1
_FLAT_MAX_ITEMS = 255
_INT64 = struct.Struct("<q")
_FLOAT64 = struct.Struct("<d")
_LENGTH = struct.Struct("<I")


def _pack_flat(obj: Any) -> Optional[bytes]:
    """``obj`` as a flat-tuple record, or None if it is not one."""
    if type(obj) is not tuple or len(obj) > _FLAT_MAX_ITEMS:
        return None
    out = bytearray((_FLAT, len(obj)))
    for x in obj:
        if x is None:
            out += b"N"
        elif x is True:
            out += b"T"
        elif x is False:
            out += b"F"
        elif type(x) is int:
            if not -(1 << 63) <= x < 1 << 63:
                return None
            out += b"i"
            out += _INT64.pack(x)
        elif type(x) is float:
            out += b"d"
            out += _FLOAT64.pack(x)
        elif type(x) is str or type(x) is bytes:
            if type(x) is str:
                try:
                    raw = x.encode()
                except UnicodeEncodeError:  # lone surrogates: pickle keeps them
                    return None
                out += b"s"
            else:
                raw = x
                out += b"b"
            if len(raw) >= 1 << 32:
                return None
            out += _LENGTH.pack(len(raw))
            out += raw
        else:
            return None
    return bytes(out)


def _unpack_flat(data: bytes) -> tuple:
    """The tuple a flat-tuple record carries.  Raises ValueError if the
    record is malformed (as pickle.loads raises UnpicklingError)."""
    n = len(data)
    if n < 2 or data[0] != _FLAT:
        raise ValueError("not a flat-tuple record")
    at = 2
    items: List[Any] = []
    for _ in range(data[1]):
        if at >= n:
            raise ValueError("flat-tuple record is truncated")
        kind = data[at]
        at += 1
        if kind == 0x4E:  # N
            items.append(None)
        elif kind == 0x54:  # T
            items.append(True)
        elif kind == 0x46:  # F
            items.append(False)
        elif kind == 0x69 or kind == 0x64:  # i, d
            if at + 8 > n:
                raise ValueError("flat-tuple record is truncated")
            items.append((_INT64 if kind == 0x69 else _FLOAT64).unpack_from(data, at)[0])
            at += 8
        elif kind == 0x73 or kind == 0x62:  # s, b
            if at + 4 > n:
                raise ValueError("flat-tuple record is truncated")
            length = _LENGTH.unpack_from(data, at)[0]
            at += 4
            if at + length > n:
                raise ValueError("flat-tuple record is truncated")
            raw = data[at : at + length]
            items.append(raw.decode() if kind == 0x73 else bytes(raw))
            at += length
        else:
            raise ValueError(f"flat-tuple record has an unknown item kind {kind}")
    if at != n:
        raise ValueError("flat-tuple record has bytes after its last item")
    return tuple(items)


if _core is not None:
    _pack = _core.pack_flat
    _unpack = _core.unpack_flat
else:
    _pack = None  # type: ignore[assignment]
    _unpack = _unpack_flat


def _decode(data: bytes) -> Any:
    """A record's object: a flat tuple or a pickle."""
    return _unpack(data) if data[0] == _FLAT else _loads(data)


def _encode(obj: Any) -> bytes:
    """A record for ``obj`` (no slot pool): a flat tuple where the core packs them, else its pickle."""
    data = _pack(obj) if _pack is not None else None
    return _dumps(obj, 5) if data is None else data

_monotonic = time.monotonic
_sched_yield = getattr(os, "sched_yield", lambda: time.sleep(0))


def _now_us() -> int:
    return time.monotonic_ns() // 1000


def _weak_method(obj: Any, name: str, what: str) -> Any:
    """``obj.<name>(*args)`` through a weak reference: the fast paths bound
    to a handle call back into it without a reference cycle (a Subscription
    dropped without close() must free its entry when it is collected, not at
    the next garbage collection)."""
    ref = weakref.ref(obj)

    def call(*args: Any) -> Any:
        target = ref()
        if target is None:
            raise ClosedError(f"{what} is closed")
        return getattr(target, name)(*args)

    return call


def _check_capacity(capacity_bytes: Any) -> int:
    if not isinstance(capacity_bytes, int) or isinstance(capacity_bytes, bool):
        raise TypeError(f"'capacity_bytes' must be an int, got {capacity_bytes!r}")
    if capacity_bytes < 1024 or capacity_bytes % 8:
        raise ValueError(f"'capacity_bytes' must be a multiple of 8 of at least 1024, got {capacity_bytes}")
    return capacity_bytes


# -- counting publishers -----------------------------------------------------------
class _Publishers:
    """The topic's publisher table (``_layout``): how many publisher handles
    each process holds, their total, and the stream's persistent state bits.
    The same bookkeeping as a channel's senders (``shmq.channel._Members``);
    every change happens under the segment's admin lock."""

    def __init__(self, segment: Segment) -> None:
        self._seg = segment
        self._w = segment.words
        self._next_scan = 0.0

    def state(self) -> int:
        return self._w[L.W_T_STATE]

    def count(self) -> int:
        return max(0, self._w[L.W_T_PUBLISHERS])

    def join(self) -> int:
        """Count one publisher handle of this process; its entry.  Raises
        TooManyMembers if the table is full of live publishers."""
        pid, start_us = os.getpid(), P.my_start_us()
        for attempt in range(2):
            with self._seg.admin_lock():
                w = self._w
                for i in range(L.T_PUB_MEMBERS):
                    base = L.topic_pub_word(i)
                    if w[base] == 0:
                        w[base + 2] = 0
                        w[base + 1] = start_us
                        w[base] = pid
                        self._change_locked(i, 1)
                        return i
            if attempt == 0:
                self.scan()
        raise TooManyMembers(
            f"topic {self._seg.name!r} has no free publisher entry: {L.T_PUB_MEMBERS} publisher handles are open"
        )

    def leave(self, index: int) -> int:
        """Close the handle of entry ``index``; the state bits this set."""
        with self._seg.admin_lock():
            base = L.topic_pub_word(index)
            if self._w[base] != os.getpid():
                return 0
            bits = self._change_locked(index, -1)
            self._w[base] = 0
            return bits

    def _change_locked(self, index: int, delta: int, died: int = 0) -> int:
        w = self._w
        base = L.topic_pub_word(index)
        w[base + 2] = max(0, w[base + 2] + delta)
        total = 0
        for i in range(L.T_PUB_MEMBERS):
            entry = L.topic_pub_word(i)
            if w[entry]:
                total += max(0, w[entry + 2])
        w[L.W_T_PUBLISHERS] = total
        old = w[L.W_T_STATE]
        new = old
        if died:
            new |= L.T_PUBLISHER_DIED
            if not w[L.W_T_DEAD_PUBLISHER]:
                w[L.W_T_DEAD_PUBLISHER] = died
        if delta < 0 and total == 0:
            new |= L.T_PUBLISHERS_DONE
        if new != old:
            w[L.W_T_STATE] = new  # one store: DONE is seen together with DIED
        return new & ~old

    def scan(self) -> int:
        """Count dead publishers' handles as closed, noting that they died;
        returns the state bits this set."""
        self._next_scan = _monotonic() + SLICE_SECONDS
        w = self._w
        gone = []
        for i in range(L.T_PUB_MEMBERS):
            base = L.topic_pub_word(i)
            pid, start = w[base], w[base + 1]
            if pid == 0:
                continue
            if not 0 < pid < 1 << 31 or not P.is_alive(pid, start):
                gone.append((i, pid, start))
        bits = 0
        if gone:
            with self._seg.admin_lock():
                for i, pid, start in gone:
                    base = L.topic_pub_word(i)
                    if w[base] != pid or w[base + 1] != start:
                        continue
                    bits |= self._change_locked(i, -1, pid)
                    w[base] = 0
        return bits

    def maybe_scan(self) -> int:
        if _monotonic() < self._next_scan:
            return 0
        return self.scan()


class _Shared:
    """One process's attachment to a topic: the segment, the ring, the lock
    and the bells, shared by its Topic handles and Subscriptions; and, for a
    topic with a slot pool, the pool, the codec and the slots this process
    published whose records the ring still shows (``held``)."""

    def __init__(self, segment: Segment, pool: Optional[SlotPool] = None) -> None:
        self.segment = segment
        self.name = segment.name
        self.ring = BroadcastRing(segment)
        create = segment.is_creator
        w = segment.words
        self.words = w
        self.lock = RobustLock(P.semaphore(self.name + "-pl", create, lock=True), segment, L.W_T_PRODUCER_LOCK)
        self.lock.on_recover = self._repair
        self.not_full = Doorbell(P.semaphore(self.name + "-nf", create), w, L.W_T_PUB_WAITING)
        self.not_empty_sem = P.semaphore(self.name + "-ne", create)
        self.publishers = _Publishers(segment)
        self.users = 0
        self.pid = os.getpid()
        self.mutex = threading.Lock()
        self.pool: Optional[SlotPool] = None
        self.codec: Optional[Codec] = None
        #: (end of the record, [(slot, generation)]) of this process's slot
        #: messages, oldest first: it holds each slot once for the ring
        self.held: Deque[Tuple[int, List[Tuple[int, int]]]] = deque()
        self.held_lock = threading.Lock()  # publishing threads share ``held``
        self.next_reap = 0.0
        if w[L.W_T_SLOT_CONFIG] & _SIZE_MASK:
            self.pool = pool if pool is not None else SlotPool.attach(P.part_name(self.name, "p"))
            self.codec = Codec(self.pool)

    def _repair(self) -> None:
        if self.lock.acquire(1.0):
            try:
                self.ring.repair()
            finally:
                self.lock.release()

    def retain(self) -> None:
        with self.mutex:
            self.users += 1

    def release(self) -> None:
        with self.mutex:
            self.users -= 1
            last = self.users <= 0
        if last and not self.segment.closed:
            _attachments.pop(self.name, None)
            if self.pool is not None and self.pid == os.getpid():
                try:
                    return_slots(self)
                except Exception:
                    pass
                # Slots still held for the ring stay held until this process
                # ends (the pool's mapping stays until then): subscribers may
                # still read their records.
                self.codec.close()
                self.pool.close()
            self.segment.close()

    def wake(self, bits: int) -> None:
        if bits & L.T_PUBLISHERS_DONE:
            self.ring.wake_subscribers(self.not_empty_sem)

    def why_ended(self) -> Exception:
        if self.publishers.state() & L.T_PUBLISHER_DIED:
            return BrokenError(
                f"topic {self.name!r} is broken: publisher process {self.words[L.W_T_DEAD_PUBLISHER]} died "
                f"without closing; everything published before was delivered"
            )
        return EndOfChannel(f"topic {self.name!r} ended: every publisher closed and everything was received")


def return_slots(shared: _Shared) -> None:
    """Give back this process's hold of the slots whose records no
    subscriber can read any more, then let the pool free what nobody holds.

    A slot message's slots are held once by its publisher "for the ring",
    from its write until both (a) its record is evicted (OLDEST passed it:
    no subscriber can start reading it) and (b) every live subscriber's
    cursor passed it (a subscriber takes its own hold before its cursor moves
    past the record, see ``Cursor.commit``).  Records every live subscriber
    has read are evicted here (``BroadcastRing.trim``): otherwise small slot
    records would wait for the ring to wrap.  Subscriber entries of dead
    processes that keep a record are freed here too (every SLICE_SECONDS)."""
    with shared.held_lock:
        _return_slots_locked(shared)


def _return_slots_locked(shared: _Shared) -> None:
    held = shared.held
    pool = shared.pool
    if held:
        ring, w = shared.ring, shared.words
        first_end = held[0][0]
        if _monotonic() >= shared.next_reap:
            shared.next_reap = _monotonic() + SLICE_SECONDS
            dead = [(i, pid, start) for i, pid, start, cursor, *_ in ring.entries()
                    if cursor < first_end and not P.is_alive(pid, start)]
            if dead:
                with shared.segment.admin_lock():
                    for i, pid, start in dead:
                        ring.free(i, pid, start)
                ring._gate_epoch = -1
        if w[L.W_T_OLDEST] < first_end:
            shared.lock.acquire()  # joins hold it too: no cursor appears below the lowest meanwhile
            try:
                low = ring.lowest_cursor()
                ring.trim(w[L.W_T_TAIL] if low < 0 else low)
            finally:
                shared.lock.release()
        low = ring.lowest_cursor()
        bound = w[L.W_T_OLDEST]
        if 0 <= low < bound:
            bound = low
        while held and held[0][0] <= bound:
            for index, gen in held.popleft()[1]:
                pool.release(index, gen)
    pool.collect()


# one attachment per topic per process (Topic handles and subscriptions share it)
_attachments: "dict[str, _Shared]" = {}
_attach_lock = threading.Lock()


def _attach_shared(name: str) -> _Shared:
    with _attach_lock:
        shared = _attachments.get(name)
        if shared is not None and shared.pid == os.getpid() and not shared.segment.closed:
            shared.retain()
            return shared
        segment = Segment.attach(name, L.KIND_TOPIC)
        try:
            shared = _Shared(segment)
        except BaseException:
            segment.close()
            raise
        shared.retain()
        _attachments[name] = shared
        return shared


# -- exit: a process that ends normally closes its publisher handles and subscriptions
_live_handles: "weakref.WeakSet[Any]" = weakref.WeakSet()
_exit_pid = 0
_atexit_done = False


def _close_all_at_exit() -> None:
    for handle in list(_live_handles):
        try:
            handle._exit_close()
        except Exception:  # a segment already unmapped: nothing left to count
            pass


class _AfterForkToken:
    """multiprocessing keeps after-fork callbacks by a weak reference to an object."""


_token = _AfterForkToken()
_after_fork_registered = False


def _hook_exit() -> None:
    """As shmq.channel: atexit (registered after the segments' finalizers, so
    it runs before they unmap), plus multiprocessing's exit finalizers for its
    children (which leave through os._exit), re-registered after its
    children clear them at start."""
    global _exit_pid, _atexit_done, _after_fork_registered
    if not _atexit_done:
        _atexit_done = True
        atexit.register(_close_all_at_exit)
    mp_util = sys.modules.get("multiprocessing.util")
    if mp_util is None or _exit_pid == os.getpid():
        return
    _exit_pid = os.getpid()
    mp_util.Finalize(None, _close_all_at_exit, exitpriority=10)
    if not _after_fork_registered:
        _after_fork_registered = True
        mp_util.register_after_fork(_token, _after_mp_child)


def _after_mp_child(_t: object) -> None:
    global _exit_pid
    _exit_pid = 0
    if len(_live_handles):
        _hook_exit()


def _after_fork_in_child() -> None:
    global _exit_pid
    _exit_pid = 0
    for shared in list(_attachments.values()):
        shared.mutex = threading.Lock()
        shared.held_lock = threading.Lock()
        shared.held = deque()  # the parent's holds: the parent gives them back
    _attachments.clear()  # a child attaches anew (its own users count)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


# -- Topic ----------------------------------------------------------------------
class Topic:
    """A broadcast stream in shared memory (see the module docstring).

    ``Topic(capacity_bytes, *, name=None, slot_size=None, slot_count=8,
    overflow="block")`` creates one; :meth:`attach` opens an existing one by
    name; the handle pickles as its name.  ``capacity_bytes``: the ring's
    data area; one message (pickled) may take up to half of it.
    ``slot_size``/``slot_count``: a slot pool (``<name>.p``) for large
    buffers: arrays of 64 KiB up to ``slot_size`` in a message go through a
    slot once and reach every subscriber as read-only zero-copy views (see
    ``return_slots`` for when a slot returns).  Without ``slot_size`` they
    travel pickled through the ring.

    Counted publishers: the handle ``Topic(...)`` returns counts as a
    publisher from its creation; any other handle (from :meth:`attach`,
    unpickled in a child, or inherited by a forked child) from its first
    :meth:`publish` in its process.  ``close()`` (or the end of the process)
    ends the handle's count; the last one ends the stream.  So a parent that
    hands publishing to children closes its own handle only once they have
    published (``statistics().publishers``) -- handing a topic to subscriber
    children never keeps the stream open.
    """

    _shared: Optional[_Shared] = None
    _entry = -1  # publisher entry, -1: not a counted publisher (yet)

    def __init__(
        self,
        capacity_bytes: int = DEFAULT_CAPACITY_BYTES,
        *,
        name: Optional[str] = None,
        slot_size: Optional[int] = None,
        slot_count: int = 8,
        overflow: str = "block",
    ) -> None:
        capacity_bytes = _check_capacity(capacity_bytes)
        if overflow not in _OVERFLOWS:
            raise ValueError(f"'overflow' must be 'block' or 'drop-oldest', got {overflow!r}")
        if slot_size is not None and (not isinstance(slot_size, int) or slot_size <= 0):
            raise ValueError(f"'slot_size' must be a positive int or None, got {slot_size!r}")
        if not isinstance(slot_count, int) or slot_count <= 0:
            raise ValueError(f"'slot_count' must be a positive int, got {slot_count!r}")
        segment = Segment.create(L.KIND_TOPIC, L.topic_segment_size(capacity_bytes), name)
        pool = None
        try:
            BroadcastRing.initialise(segment, capacity_bytes, overflow == "drop-oldest",
                                     slot_count << L.POOL_COUNT_SHIFT | (slot_size or 0))
            if slot_size:
                pool = SlotPool.create(slot_size, slot_count, name=P.part_name(segment.name, "p"),
                                       max_members=2 * L.T_SUBSCRIBERS, link=segment.name)
            shared = _Shared(segment, pool)
            segment.publish()
        except BaseException:
            if pool is not None:
                pool.unlink()
                pool.close()
            segment.unlink()
            segment.close()
            raise
        shared.retain()
        with _attach_lock:
            _attachments[segment.name] = shared
        self._setup(shared)
        self._count()

    @classmethod
    def attach(cls, name: str) -> "Topic":
        """Open the topic ``name`` created by any process (not a counted
        publisher until it publishes).  Raises FileNotFoundError,
        PermissionError, LayoutError if ``name`` is not an shmq topic."""
        self = cls.__new__(cls)
        self._setup(_attach_shared(name))
        return self

    def _setup(self, shared: _Shared) -> None:
        self._shared = shared
        self._has_pool = shared.pool is not None
        self._segment = shared.segment
        self._ring = shared.ring
        self._w = shared.words
        self.name = shared.name
        self._pid = os.getpid()
        self._entry = -1
        _live_handles.add(self)
        _hook_exit()

    def _count(self) -> None:
        shared = self._shared
        self._entry = shared.publishers.join()
        self._pid = os.getpid()
        shared.segment.add_role(L.ROLE_PRODUCER)  # shows in `shmq ls` / `stat`
        # (again here: a forked multiprocessing child that publishes through
        # an inherited handle needs the exit hook in its own process, and
        # the parent may have made the handle before it imported
        # multiprocessing.util, so no after-fork hook re-registers it)
        _hook_exit()
        if shared.codec is None:
            # A counted publisher's publish IS the fast path (C with the
            # compiled core), bound to this handle until close(): measured
            # 14-18 ns less per call (of 135-139 ns) than a method that calls it
            # (docs/topics.md).
            ring = shared.ring
            self.publish = publishing_writer(  # type: ignore[method-assign]
                ring, shared.lock, _dumps, 5, _pack, functools.partial(ring.wake_subscribers, shared.not_empty_sem),
                _weak_method(self, "_publish", f"topic {self.name!r}"),
            )

    def _check(self) -> _Shared:
        shared = self._shared
        if shared is None:
            raise ClosedError(f"topic {getattr(self, 'name', '?')!r} is closed")
        return shared

    @property
    def closed(self) -> bool:
        return self._shared is None

    @property
    def overflow(self) -> str:
        return "drop-oldest" if self._check().ring.drop_oldest else "block"

    @property
    def capacity_bytes(self) -> int:
        return self._check().ring.capacity_bytes

    # -- publishing ---------------------------------------------------------
    def publish(self, obj: Any, timeout: Optional[float] = None) -> None:
        """Publish ``obj`` to every subscriber (pickled once, written once).
        In ``block`` mode waits up to ``timeout`` seconds for the slowest
        live subscriber to make room; raises Full if it does not (nothing was
        published).  Raises MessageTooLarge if the pickle exceeds half the
        ring, BrokenError if the stream has ended (every publisher had
        closed before), ClosedError if this handle is closed."""
        # (A counted publisher's publish is the closure bound in _count.)
        return self._publish(obj, timeout, None)

    def _publish(self, obj: Any, timeout: Optional[float], data: Optional[bytes]) -> None:
        """publish(), given the pickle ``data`` if the fast path made it."""
        shared = self._shared
        if shared is None:
            raise ClosedError(f"topic {getattr(self, 'name', '?')!r} is closed")
        deadline = None if timeout is None else deadline_for(timeout)
        if self._entry < 0 or self._pid != os.getpid():
            if shared.publishers.state() & L.T_PUBLISHERS_DONE:
                raise BrokenError(f"topic {self.name!r} has ended: every publisher had closed before this publish")
            self._count()
        if data is not None:
            pass
        elif shared.codec is None:
            data = _encode(obj)
        else:
            try:
                data = _dumps(obj, 5, buffer_callback=stop_at_large)
            except Exception as exc:
                data = first_pass_failed(obj, exc)
            if data is not LARGE:
                return_slots(shared)  # (also frees the slots whose last views died)
            else:  # (_encode_large takes the slots back first)
                data, lease = self._encode_large(shared, obj, deadline)
                if lease is not None:
                    self._publish_slots(shared, data, lease, deadline)
                    return
        ring = self._ring
        if len(data) > ring.max_payload:
            raise MessageTooLarge(
                f"a message of {len(data)} bytes can never fit topic {self.name!r} "
                f"(at most {ring.max_payload}: half its capacity_bytes {ring.capacity_bytes})"
            )
        gate = not ring.drop_oldest
        while not ring.try_write(data, shared.lock, gate):
            self._wait_for_room(len(data), deadline)
        if self._w[L.W_T_SUB_WAITING]:
            ring.wake_subscribers(shared.not_empty_sem)

    def _encode_large(self, shared: _Shared, obj: Any, deadline: Optional[float]) -> Tuple[bytes, Any]:
        """``obj``'s large buffers copied into slots: (message, lease), or
        (its pickle, None) if a buffer exceeds slot_size.  Waits for free
        slots until ``deadline`` (Full), taking back the slots subscribers
        are done with meanwhile."""
        codec = shared.codec
        while True:
            return_slots(shared)
            left = SLOT_RECHECK_SECONDS
            if deadline is not None:
                left = min(left, max(0.0, deadline - _monotonic()))
            try:
                return codec.encode(obj, timeout=left)
            except Full:
                if deadline is not None and _monotonic() >= deadline:
                    raise Full(
                        f"topic {self.name!r} has no free slot: subscribers still hold or have not read "
                        f"the arrays of earlier messages"
                    ) from None

    def _publish_slots(self, shared: _Shared, data: bytes, lease: Any, deadline: Optional[float]) -> None:
        """Write a slot message, then hold its slots for the ring (see return_slots)."""
        ring, pool = self._ring, shared.pool
        try:
            while not ring.try_write(data, shared.lock, not ring.drop_oldest):
                self._wait_for_room(len(data), deadline)
        except BaseException:
            lease.abort()  # nothing was published
            raise
        end = self._w[L.W_T_TAIL]  # at or after our record's end (another publisher may follow): holding longer is safe
        refs = [(i, pool.generation(i)) for i in lease.indices]
        for i, gen in refs:
            pool.acquire(i, gen).release()  # the hold for the ring (the view is not needed)
        with shared.held_lock:
            shared.held.append((end, refs))
        lease.sent()
        if self._w[L.W_T_SUB_WAITING]:
            ring.wake_subscribers(shared.not_empty_sem)

    def _wait_for_room(self, n: int, deadline: Optional[float]) -> None:
        """Wait in slices until a record of ``n`` bytes fits; between slices
        free the entries of dead subscribers that gate it."""
        from ._errors import Full

        shared = self._shared
        ring = self._ring

        def ready() -> bool:
            ring._gate_epoch = -1
            return ring.room_for(n)

        while True:
            if wait_until(ready, shared.not_full, slice_end(deadline, SLICE_SECONDS)):
                return
            self._reap_gating(n)
            if ring.room_for(n):
                return
            if deadline is not None and _monotonic() >= deadline:
                raise Full(f"topic {self.name!r} is full: a subscriber has not read the oldest message")

    def _reap_gating(self, n: int) -> int:
        shared = self._shared
        ring = self._ring
        dead = [(i, pid, start) for i, pid, start in ring.gating(n) if not P.is_alive(pid, start)]
        if dead:
            with shared.segment.admin_lock():
                for i, pid, start in dead:
                    ring.free(i, pid, start)
            ring._gate_epoch = -1
        return len(dead)

    # -- subscribing --------------------------------------------------------
    def subscribe(self, start: str = "next") -> "Subscription":
        """A new subscription of this process: from the next message
        published (``start="next"``) or from the oldest message the ring
        still holds (``"oldest"``).  Raises TooManyMembers if 64 live
        subscriptions exist, ClosedError if this handle is closed."""
        shared = self._check()
        if start not in _STARTS:
            raise ValueError(f"'start' must be 'next' or 'oldest', got {start!r}")
        return (Subscription if shared.codec is None else _SlotSubscription)(shared, start == "oldest", _key=_KEY)

    # -- the rest -------------------------------------------------------------
    def statistics(self) -> TopicStatistics:
        """Counters of the topic and of every live subscription (dead
        publishers are looked for first)."""
        shared = self._check()
        shared.publishers.scan()
        return _statistics(shared)

    def close(self) -> None:
        """Close this handle (idempotent).  If it was a counted publisher, its
        count ends; the last one ends the stream for the subscribers.
        Subscriptions made from it stay open."""
        shared, self._shared = self._shared, None
        if shared is None:
            return
        _live_handles.discard(self)
        self.__dict__.pop("publish", None)
        entry, self._entry = self._entry, -1
        if entry >= 0 and self._pid == os.getpid() and not shared.segment.closed:
            shared.wake(shared.publishers.leave(entry))
        shared.release()

    def _exit_close(self) -> None:
        if self._pid == os.getpid() or self._entry < 0:
            self.close()

    def unlink(self) -> None:
        """Remove the topic's name (and semaphores) for everybody; handles
        already open keep working.  The creator does this when it ends.
        Also allowed after close()."""
        if self._has_pool:
            P.shm_unlink(P.part_name(self.name, "p"))
        self._segment.unlink()

    def __reduce__(self):
        """The topic's name: the process that unpickles it attaches (not a
        counted publisher until it publishes).  Raises ClosedError if closed."""
        self._check()
        return (Topic.attach, (self.name,))

    def __enter__(self) -> "Topic":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<Topic {getattr(self, 'name', '?')!r}{' closed' if self.closed else ''}>"


def _statistics(shared: _Shared) -> TopicStatistics:
    return topic_statistics(shared.segment)


_KEY = object()


class _SubscriberBell:
    """What ``_sync.wait_until`` needs to sleep on "not empty": announce on
    the subscription's entry (its WAITING flag, then the hint SUB_WAITING),
    sleep on the topic's semaphore, and the per-process adaptive spin state
    every bell carries.  A publisher posts once per flag up and clears the
    flag (the post takes the count).

    The semaphore is shared by every subscriber of the topic, and their
    conditions differ (each waits for a record past its own cursor): one
    that ran ahead and announced after a publisher's scan can take a post
    meant for one that was counted.  A waiter that wakes with its own flag
    still up knows the post was not its own: it posts it again, once per
    wait, and lets the other take it before it sleeps again (at most
    RELAY_SECONDS, yielding the CPU: the post may be a stale one nobody
    waits for).  Without it, the one that was counted slept a whole slice."""

    __slots__ = ("_w", "_flag", "_sem", "_relayed", "spin_budget", "skipped", "long_waits")
    ring_takes_count = True
    RELAY_SECONDS = 0.001

    def __init__(self, words: Any, flag: int, sem: Any) -> None:
        self._w = words
        self._flag = flag
        self._sem = sem
        self._relayed = False
        self.spin_budget = SPIN_SECONDS
        self.skipped = 0
        self.long_waits = 0

    def announce(self) -> None:
        w = self._w
        w[self._flag] = 1
        w[L.W_T_SUB_WAITING] = 1
        self._relayed = False
        full_fence()  # the flag stores before the waiter's re-check of the ring

    def withdraw(self) -> None:
        self._w[self._flag] = 0

    def sleep(self, seconds: float) -> bool:
        sem = self._sem
        if not sem.acquire(True, max(0.0, seconds)):
            return False
        if not self._w[self._flag]:
            return True  # our post (the publisher cleared our flag)
        if not self._relayed:  # another's: hand it on
            self._relayed = True
            sem.release()
            end = _monotonic() + self.RELAY_SECONDS
            while P.sem_value(sem) > 0 and _monotonic() < end:
                _sched_yield()
        return False  # still announced: wait_until re-checks and sleeps again


class Subscription:
    """One subscriber's cursor in a topic (from :meth:`Topic.subscribe`).

    ``receive()``/``receive_nowait()``/iteration deliver every message
    published after it started, in order (per publisher), each once.  Use it
    from one thread of the process that made it.  After :meth:`close`
    returns, nothing more is delivered to it and it no longer holds the
    publishers back.  Not picklable: a process subscribes itself.
    """

    _shared: Optional[_Shared] = None

    def __init__(self, shared: _Shared, oldest: bool, *, _key: object = None) -> None:
        if _key is not _KEY:
            raise TypeError("use Topic.subscribe()")
        pid, start = os.getpid(), P.my_start_us()
        ring = shared.ring
        entry = -1
        for attempt in range(2):
            shared.lock.acquire()
            try:
                with shared.segment.admin_lock():
                    entry, pos, seq = ring.join(pid, start, oldest)
            finally:
                shared.lock.release()
            if entry >= 0:
                break
            if attempt == 0:  # free the entries of dead subscribers, then try again
                with shared.segment.admin_lock():
                    for i, p, s, *_ in ring.entries():
                        if not P.is_alive(p, s):
                            ring.free(i, p, s)
        if entry < 0:
            raise TooManyMembers(f"topic {shared.name!r} has {L.T_SUBSCRIBERS} live subscriptions already")
        shared.retain()
        shared.segment.add_role(L.ROLE_CONSUMER)  # shows in `shmq ls` / `stat`
        self._shared = shared
        self.name = shared.name
        self._start = start
        self._pid = pid
        self._cursor = (Cursor if shared.codec is None else SlotCursor)(ring, entry, pos, seq, shared.not_full)
        # receive() and iteration ARE the Receiver (C with the compiled core):
        # try_read and decoding in one call, the waits in _receive_slow.
        # Bound to this handle: receive() of a backlog measured 89 ns
        # against 106 ns through a method that calls it.
        self._receiver = Receiver(
            self._cursor, _loads, _unpack, _weak_method(self, "_receive_slow", f"subscription to topic {self.name!r}"),
            EndOfChannel,
        )
        if type(self).receive is Subscription.receive:
            self.receive = self._receiver  # type: ignore[method-assign]
        self._bell = _SubscriberBell(shared.words, L.topic_sub_word(entry) + L.TS_WAITING, shared.not_empty_sem)
        self._w = shared.words
        # (a subscription collected without close() closes its Receiver too:
        # a `receive` kept after the subscription was dropped raises
        # ClosedError rather than reading through a freed entry)
        self._finalizer = weakref.finalize(self, _free_subscriber, shared, entry, pid, start, self._receiver)
        self._finalizer.atexit = False
        _live_handles.add(self)
        _hook_exit()

    @property
    def lost(self) -> int:
        """Messages this subscription lost: overwritten (drop-oldest) before it read them."""
        return self._cursor.lost

    @property
    def received(self) -> int:
        """Messages this subscription received."""
        return self._cursor.received

    @property
    def closed(self) -> bool:
        return self._shared is None

    def receive(self, timeout: Optional[float] = None) -> Any:
        """The next message, waiting up to ``timeout`` seconds (Empty if none
        came).  Once every publisher has closed and this subscription has
        read everything: EndOfChannel; if a publisher died without closing:
        BrokenError naming it.  ClosedError if this subscription is closed."""
        # (An open subscription's receive is its Receiver, bound in __init__.)
        return self._receive_slow(timeout)

    def _receive_slow(self, timeout: Optional[float]) -> Any:
        shared = self._shared
        if shared is None:
            raise ClosedError(f"subscription to topic {self.name!r} is closed")
        if timeout is not None and timeout < 0:
            deadline_for(timeout)  # raises ValueError
        data = self._cursor.try_read()
        if data is None:
            data = self._receive_waiting(shared, timeout)
        return _decode(data)

    def receive_nowait(self) -> Any:
        """The next message, or raise Empty at once; otherwise as :meth:`receive`."""
        return self.receive(0)

    def _receive_waiting(self, shared: _Shared, timeout: Optional[float]) -> bytes:
        deadline = deadline_for(timeout)
        cursor, publishers = self._cursor, shared.publishers
        ready = lambda: cursor.can_read() or publishers.state() & L.T_PUBLISHERS_DONE  # noqa: E731
        while True:
            data = cursor.try_read()
            if data is not None:
                return data
            if publishers.state() & L.T_PUBLISHERS_DONE:
                # every publisher's last record was published before its count dropped
                data = cursor.try_read()
                if data is not None:
                    return data
                raise shared.why_ended()
            if deadline is not None and _monotonic() >= deadline:
                if publishers.maybe_scan() & L.T_PUBLISHERS_DONE:
                    continue
                raise Empty(f"topic {self.name!r} has no new message")
            if not wait_until(ready, self._bell, slice_end(deadline, SLICE_SECONDS), SUBSCRIBER_SPIN_SECONDS):
                publishers.maybe_scan()  # one slice over: did a publisher die?

    def __iter__(self) -> Iterator[Any]:
        if type(self).receive is Subscription.receive:
            # the Receiver's __next__ (receive() ending at EndOfChannel),
            # holding this subscription while the loop runs
            return Iteration(self._receiver, self)
        return self

    def __next__(self) -> Any:
        try:
            return self.receive()
        except EndOfChannel:
            raise StopIteration from None

    def statistics(self) -> SubscriberStatistics:
        """This subscription's lag, losses and count."""
        shared = self._shared
        if shared is None:
            raise ClosedError(f"subscription to topic {self.name!r} is closed")
        w, c = self._w, self._cursor
        return SubscriberStatistics(
            self._pid,
            max(0, w[L.W_T_NEXT_SEQ] - max(c.next_seq, w[L.W_T_OLDEST_SEQ])),
            max(0, w[L.W_T_TAIL] - max(c.pos, w[L.W_T_OLDEST])),
            c.lost,
            c.received,
        )

    def close(self) -> None:
        """End this subscription (idempotent): it is delivered nothing more
        and stops gating the publishers when this returns."""
        shared, self._shared = self._shared, None
        if shared is None:
            return
        _live_handles.discard(self)
        self._receiver.close()
        self.__dict__.pop("receive", None)
        self._finalizer.detach()
        if self._pid == os.getpid():
            _free_subscriber(shared, self._cursor.entry, self._pid, self._start)
        shared.release()

    def _exit_close(self) -> None:
        self.close()

    def __reduce__(self):
        raise TypeError("a Subscription is not picklable: subscribe in the process that receives")

    def __enter__(self) -> "Subscription":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<Subscription to {self.name!r}{' closed' if self.closed else ''}>"


class _SlotSubscription(Subscription):
    """A subscription of a topic with a slot pool: a message is a pickle or
    a slot message (a subclass, so that a topic without a pool does not pay
    the test: ~3% of a receive)."""

    def receive(self, timeout: Optional[float] = None) -> Any:
        shared = self._shared
        if shared is None:
            raise ClosedError(f"subscription to topic {self.name!r} is closed")
        if timeout is not None and timeout < 0:
            deadline_for(timeout)  # raises ValueError
        data = self._cursor.try_read()
        if data is None:
            data = self._receive_waiting(shared, timeout)
        if data[0]:  # a pickle (0x80) or a flat tuple (0x01); byte 0: a slot message
            return _decode(data)
        try:  # hold its slots (read-only views), then let the cursor pass its record
            return shared.codec.decode(data)
        finally:
            self._cursor.commit()

    receive.__doc__ = Subscription.receive.__doc__


def _free_subscriber(shared: _Shared, entry: int, pid: int, start: int, receiver: Any = None) -> None:
    if receiver is not None:
        receiver.close()
    if shared.segment.closed or pid != os.getpid():
        return
    with shared.segment.admin_lock():
        shared.ring.free(entry, pid, start)
    if shared.words[L.W_T_PUB_WAITING]:
        shared.not_full.ring()
