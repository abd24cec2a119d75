"""Latest: the newest value, for readers that sample the current state.

::

    latest = shmq.Latest(slot_size=8 << 20)   # any process: Latest.attach(name)
    latest.set({"frame": frame, "t": t})      # never waits for readers
    version, value = latest.get_versioned()   # the newest value, never torn

The value lives in a ``ValueCell`` (``shmq._broadcast``): LATEST_BUFFERS
buffers used in turn, each written under the writer lock and read with a
sequence check, so a reader copies a whole value or tries again.

With ``slot_size``, large buffers (numpy arrays of 64 KiB up to
``slot_size``, also inside dicts, lists and tuples) go into slots of a
``SlotPool`` ("<name>.p") once per ``set``; the cell carries the slot
message (``shmq._codec``), and every ``get`` returns read-only views over
the slots (zero-copy).  Who holds a slot:

* the handle that set a value holds its slots while it is the newest
  (``_held``), and gives them back at its next ``set`` once a newer value
  replaced it and no reader has *pinned* it (below), or at ``close``;
* every reader holds the slots of the values it returned while any view of
  them lives (the codec's anchors: a finalizer releases them);
* the pool's source (the setter) frees a slot when every live holder let go;
  holds of dead processes do not count (the pool's janitor).

Pinning, the race a reader must win: it reads a version's slot references
from the cell, then takes its own holds; in between, the setter may replace
the value and give its holds back.  So a reader first stores the version in
its *pin* (its entry of the cell's reader table), fences, and only then
reads the cell.  If the cell's version is still the pinned one, the pin is
*valid*.  If the version moved, the reader pins the new one and tries
again.  Once its own holds are taken, the reader clears its pin.

Every call into the pool that may free a slot (allocation, ``collect``,
``reclaim``: the source's frees and the janitor's, which frees the slots of
dead setters that no live process holds) is made by a setter under the
writer lock, and before it the setter holds the slots of the newest value
and of every pinned version itself (*adopts* them: it reads their slot
references from the cell and takes holds; under the lock nothing can free
them meanwhile).  So the slots of a valid pin are never freed before its
reader took its holds, even when the setter that wrote that version died:
a setter whose scan of the pins missed the pin scanned before the pin's
store was visible, so before the reader loaded the version, so that
version was then the newest (which the setter holds throughout) or the
one it is writing (held too); a later scan sees the pin.  Giving a hold
back frees nothing by itself, so a setter gives back the holds of values
that are neither the newest nor pinned at its next ``set`` (pinned ones
later: less churn), and all of them at ``close``.  If a pinned version's
bytes are no longer in the cell (its reader was descheduled for three
sets), the setter cannot adopt it and makes no pool call this time: it
pickles the value into the cell.  A setter never waits for a pin, and pins
of dead readers are freed (at most every SLICE_SECONDS).

When every slot is held (readers keep views of older values), ``set``
pickles the value into the cell instead (``Full`` if that pickle exceeds
``capacity_bytes``); it never waits.
"""
from __future__ import annotations

import dataclasses
import os
import pickle
import threading
import time
import weakref
from typing import Any, List, Optional, Tuple

from . import _layout as L
from . import _platform as P
from . import _sync
from ._broadcast import LatestStatistics, ValueCell, latest_statistics
from ._codec import LARGE, Codec, first_pass_failed, pickle_in_band, release_tokens, stop_at_large
from ._errors import BrokenError, ClosedError, Empty, Full, MessageTooLarge, SlotError, TooManyMembers
from ._segment import Segment
from ._slots import SlotPool
from ._sync import RobustLock
from ._wait import deadline_for

__all__ = ("Latest", "LatestStatistics", "DEFAULT_CAPACITY_BYTES", "DEFAULT_SLOT_COUNT")

DEFAULT_CAPACITY_BYTES = 1 << 20
DEFAULT_SLOT_COUNT = 8
#: blocked wait() calls re-check this often; dead readers' pins are looked for this often
SLICE_SECONDS = 0.1
_dumps = pickle.dumps
_loads = pickle.loads
_monotonic = time.monotonic


def _check_capacity(capacity_bytes: Any) -> int:
    if not isinstance(capacity_bytes, int) or isinstance(capacity_bytes, bool):
        raise TypeError(f"'capacity_bytes' must be an int, got {capacity_bytes!r}")
    if capacity_bytes < 1024 or capacity_bytes % 8:
        raise ValueError(f"'capacity_bytes' must be a multiple of 8 of at least 1024, got {capacity_bytes}")
    return capacity_bytes


class Latest:
    """The newest value, for readers that sample the current state.

    ``Latest(capacity_bytes, *, name=None, slot_size=None, slot_count=8)``
    creates one; :meth:`attach` opens it by name; it pickles as its name.
    :meth:`set` never waits for readers; :meth:`get` never returns a torn
    value, even if a setter was killed mid-write (it returns the previous
    value then).  ``capacity_bytes``: the largest value (pickled) it can
    hold.  ``slot_size``/``slot_count``: a slot pool (``<name>.p``) for
    large arrays: each goes into a slot once per :meth:`set`, and readers
    get read-only zero-copy views of it (see the module docstring for how
    long a slot stays taken).  Without ``slot_size`` values are pickled.
    """

    _cell: Optional[ValueCell] = None
    _pool: Optional[SlotPool] = None

    def __init__(
        self,
        capacity_bytes: int = DEFAULT_CAPACITY_BYTES,
        *,
        name: Optional[str] = None,
        slot_size: Optional[int] = None,
        slot_count: int = DEFAULT_SLOT_COUNT,
    ) -> None:
        capacity_bytes = _check_capacity(capacity_bytes)
        if slot_size is not None and (not isinstance(slot_size, int) or isinstance(slot_size, bool) or slot_size <= 0):
            raise ValueError(f"'slot_size' must be a positive int or None, got {slot_size!r}")
        if not isinstance(slot_count, int) or isinstance(slot_count, bool) or slot_count <= 0:
            raise ValueError(f"'slot_count' must be a positive int, got {slot_count!r}")
        segment = Segment.create(L.KIND_LATEST, L.latest_segment_size(capacity_bytes), name)
        pool = None
        try:
            ValueCell.initialise(segment, capacity_bytes, slot_count << L.POOL_COUNT_SHIFT | slot_size if slot_size else 0)
            if slot_size:
                pool = SlotPool.create(slot_size, slot_count, name=P.part_name(segment.name, "p"),
                                       max_members=2 * L.L_READERS, link=segment.name)
            self._setup(segment, pool)
            segment.publish()
        except BaseException:
            if pool is not None:
                pool.unlink()
                pool.close()
            segment.unlink()
            segment.close()
            raise

    @classmethod
    def attach(cls, name: str) -> "Latest":
        """Open the Latest ``name`` (and its slot pool, if it has one).
        Raises FileNotFoundError, PermissionError, LayoutError if it is not
        an shmq Latest."""
        segment = Segment.attach(name, L.KIND_LATEST)
        self = cls.__new__(cls)
        try:
            self._setup(segment)
        except BaseException:
            segment.close()
            raise
        return self

    def _setup(self, segment: Segment, pool: Optional[SlotPool] = None) -> None:
        create = segment.is_creator
        self.name = segment.name
        self._segment = segment
        self._lock = RobustLock(P.semaphore(self.name + "-pl", create, lock=True), segment, L.W_L_WRITER_LOCK)
        self._sem = P.semaphore(self.name + "-ne", create)
        cell = ValueCell(segment)
        self._w = segment.words
        #: values may travel through a slot pool; this handle attaches it at
        #: its first use (a reader of pickled values never maps it)
        self._slots = bool(cell.slot_config[0])
        self._codec: Optional[Codec] = None
        self._attach_lock = threading.Lock()
        if pool is not None:
            self._pool = pool
            self._codec = Codec(pool)
        self._init_process()
        self._cell = cell

    def _ensure_pool(self) -> SlotPool:
        pool = self._pool
        if pool is None:
            with self._attach_lock:
                pool = self._pool
                if pool is None:
                    pool = SlotPool.attach(P.part_name(self.name, "p"))
                    self._codec = Codec(pool)
                    self._pool = pool
        return pool

    def _init_process(self) -> None:
        """This process's state of the handle (a forked child starts afresh:
        the parent's holds and reader entry are the parent's)."""
        self._pid = os.getpid()
        self._start_us = P.my_start_us()
        self._reader = -1  # entry in the cell's reader table, taken at the first pinned read
        #: the values whose slots this handle holds, oldest first
        self._held: List[_Hold] = []
        self._mutex = threading.Lock()  # setting threads share _held
        self._pin_lock = threading.Lock()  # reading threads share the pin
        self._next_reap = 0.0  # dead readers' pins: looked for at most every SLICE_SECONDS
        self._next_orphan_scan = 0.0  # slots dead setters left: likewise, when short of slots

    def _check(self) -> ValueCell:
        cell = self._cell
        if cell is None:
            raise ClosedError(f"Latest {getattr(self, 'name', '?')!r} is closed")
        return cell

    def _check_process(self) -> None:
        """A forked child's first pool use: its own holds and reader entry."""
        if self._pid != _sync._PID:
            self._init_process()

    @property
    def closed(self) -> bool:
        return self._cell is None

    @property
    def version(self) -> int:
        """The newest version: 0 if never set, then 1, 2, ... per set."""
        return self._check().version

    @property
    def capacity_bytes(self) -> int:
        return self._check().capacity_bytes

    # -- setting ------------------------------------------------------------
    def set(self, obj: Any) -> int:
        """Make ``obj`` the newest value; returns its version.  Never waits
        for readers.  Raises MessageTooLarge if its pickle (its slot
        message, with a slot pool) exceeds capacity_bytes; with a slot pool
        whose every slot is held, the value is pickled instead, and Full is
        raised (nothing set) if that pickle exceeds capacity_bytes."""
        cell = self._cell
        if cell is None:
            raise ClosedError(f"Latest {getattr(self, 'name', '?')!r} is closed")
        if self._slots:
            return self._set_slots(cell, obj)
        data = _dumps(obj, 5)
        if len(data) > cell.capacity_bytes:
            self._check_fits(cell, data)
        self._lock.acquire()
        try:
            version = cell.write(data)
        finally:
            self._lock.release()
        if self._w[L.W_L_WAITERS] > 0:
            self._wake()
        return version

    def _check_fits(self, cell: ValueCell, data: bytes) -> None:
        if len(data) > cell.capacity_bytes:
            raise MessageTooLarge(
                f"a value of {len(data)} bytes can never fit Latest {self.name!r} of {cell.capacity_bytes} bytes"
            )

    def _set_slots(self, cell: ValueCell, obj: Any) -> int:
        try:  # the first pass: a plain pickle, or LARGE (copying no buffer)
            data = _dumps(obj, 5, buffer_callback=stop_at_large)
        except Exception as exc:
            data = first_pass_failed(obj, exc)
        self._check_process()
        self._ensure_pool()
        with self._mutex:
            self._lock.acquire()
            try:
                version = self._set_slots_locked(cell, obj, data)
            finally:
                self._lock.release()
        self._wake()
        return version

    def _set_slots_locked(self, cell: ValueCell, obj: Any, data: Any) -> int:
        """set() with the writer lock held (see the module docstring)."""
        pool, codec = self._pool, self._codec
        if data is not LARGE:  # no pool call: nothing to adopt
            self._check_fits(cell, data)
            version = cell.write(data)
            if self._held:
                self._give_back(cell, collect=False)
            return version
        safe = self._adopt(cell)
        if safe:
            self._give_back(cell)  # (and pool.collect(): frees, the janitor)
        lease = None
        if safe:
            try:
                data, lease = codec.encode(obj, timeout=0)
            except Full:  # every slot taken: did a dead setter leave any behind?
                safe = False
                if _monotonic() >= self._next_orphan_scan:
                    self._next_orphan_scan = _monotonic() + SLICE_SECONDS
                    if self._free_orphans():
                        try:
                            data, lease = codec.encode(obj, timeout=0)
                            safe = True
                        except (Full, MessageTooLarge):
                            pass
            except MessageTooLarge:  # more arrays than slots
                safe = False
        if not safe:
            data = pickle_in_band(obj)
            if len(data) > cell.capacity_bytes:
                raise Full(
                    f"Latest {self.name!r} has no free slot now (readers hold its {pool.slot_count} slots) and the "
                    f"pickle of {len(data)} bytes exceeds its capacity_bytes {cell.capacity_bytes}: nothing set"
                )
            return cell.write(data)
        if lease is None:  # no buffer fit a slot: a plain pickle
            self._check_fits(cell, data)
            return cell.write(data)
        # Hold the slots for as long as this is the newest value (taken
        # before a reader can see the references, and before sent(): until
        # then nobody frees them).
        refs = [(i, pool.generation(i)) for i in lease.indices]
        for i, gen in refs:
            pool.acquire(i, gen).release()  # the hold stays; the view is not needed
        lease.sent()
        try:
            self._check_fits(cell, data)
            version = cell.write(data)
        except BaseException:
            _release_refs(pool, refs)
            raise
        self._held.append(_Hold(version, pool, refs, None))
        # the value this one replaced, now unless a reader pins it (its
        # slots return at the next allocation: two slots suffice a writer
        # whose readers keep no views)
        self._give_back(cell, collect=False)
        return version

    def _adopt(self, cell: ValueCell) -> bool:
        """Hold the slots of the newest value and of every pinned version
        that this handle does not hold yet (writer lock held).  False if a
        pinned version can no longer be read from the cell: then no pool
        call may free a slot now."""
        pins = cell.pins()
        if pins and _monotonic() >= self._next_reap:
            self._next_reap = _monotonic() + SLICE_SECONDS
            dead = [(i, pid, start) for i, pid, start, _ in pins if not P.is_alive(pid, start)]
            if dead:
                with self._segment.admin_lock():
                    for i, pid, start in dead:
                        cell.leave_reader(i, pid, start)
                pins = cell.pins()
        current = cell.version
        held = {h.version for h in self._held}
        safe = True
        for v in {current, *(pin for *_, pin in pins)}:
            if v == 0 or v in held or v > current:
                continue  # (a pin above the newest version: not valid, its reader tries again)
            data = cell.read_version(v)
            if data is None:
                if v == current:
                    raise BrokenError(f"Latest {self.name!r} is corrupt: its newest version {v} is unreadable")
                safe = False  # overwritten: a reader may still be about to take its slots
                continue
            if data[0]:  # a pickle: no slots
                continue
            try:
                obj, tokens = self._codec.decode_held(data)
            except SlotError:
                continue  # its slots were freed: that pin was never valid
            self._held.append(_Hold(v, None, tokens, obj))
        return safe

    def _free_orphans(self) -> int:
        """Free the slots of dead setters that no live process holds (writer
        lock held, after _adopt: the newest and the pinned values are held,
        so no reader can still reach these).  The janitor frees a dead
        source's slot once its holds are given back, but one killed between
        marking its slots sent and taking its own hold left a slot nobody
        ever held: holding and releasing it makes it the janitor's.
        Returns how many slots were freed."""
        pool = self._pool
        freed = pool.reclaim()  # (dead members marked, what they left freed)
        orphans = []
        for i in range(pool.slot_count):
            info = pool.slot_info(i)
            if info.state != "sent" or not info.source_pid or P.is_alive(info.source_pid):
                continue
            if any(P.is_alive(pid) for pid, _ in info.holders):
                continue
            try:
                pool.acquire(i, info.generation).release()
            except SlotError:
                continue  # freed meanwhile
            pool.release(i, info.generation)
            orphans.append(i)
        if orphans:
            freed += pool.reclaim()
        return freed

    def _give_back(self, cell: ValueCell, collect: bool = True) -> None:
        """Give back the holds of the values a newer one replaced that no
        reader pins, then (``collect``) let the pool free what nobody holds
        (writer lock held, after _adopt)."""
        held = self._held
        if held:
            current = cell.version
            pinned = {pin for *_, pin in cell.pins()}  # (not needed for safety: less churn)
            keep = [h for h in held if h.version == current or h.version in pinned]
            for h in held:
                if h.version != current and h.version not in pinned:
                    h.give_back()
            held[:] = keep
        if collect:
            self._pool.collect()

    def _wake(self) -> None:
        """Post once per reader sleeping in wait() (up to 64)."""
        waiters = self._w[L.W_L_WAITERS]
        if waiters > 0:
            for _ in range(max(0, min(waiters, 64) - P.sem_value(self._sem))):
                self._sem.release()

    # -- reading ------------------------------------------------------------
    def _read(self, cell: ValueCell) -> Tuple[int, Any]:
        while True:
            got = cell.try_read()
            if got is None:
                raise Empty(f"Latest {self.name!r} was never set")
            if got[0] > 0:
                break
        data = got[1]
        if data[0] or not self._slots:  # a pickle (0x80); byte 0: a slot message
            return got[0], _loads(data)
        return self._read_pinned(cell)

    def _read_pinned(self, cell: ValueCell) -> Tuple[int, Any]:
        """(version, value) of the newest value, taking its slots while it is
        pinned (see the module docstring)."""
        self._check_process()
        self._ensure_pool()
        with self._pin_lock:
            entry = self._reader_entry(cell)
            try:
                while True:
                    v = cell.version
                    cell.pin(entry, v)  # (with a full fence: before try_read's load of the version)
                    got = cell.try_read()
                    if got is not None and got[0] == v:
                        data = got[1]
                        return v, (_loads(data) if data[0] else self._codec.decode(data))
            finally:
                cell.unpin(entry)

    def _reader_entry(self, cell: ValueCell) -> int:
        entry = self._reader
        if entry >= 0:
            return entry
        for attempt in range(2):
            with self._segment.admin_lock():
                entry = cell.join_reader(self._pid, self._start_us)
            if entry >= 0:
                self._reader = entry
                # a handle dropped without close() frees its entry when collected
                self._reader_finalizer = weakref.finalize(
                    self, _leave_reader, self._segment, cell, entry, self._pid, self._start_us
                )
                self._reader_finalizer.atexit = False
                return entry
            if attempt == 0:  # free the entries of dead readers, then try again
                w = self._w
                with self._segment.admin_lock():
                    for i in range(L.L_READERS):
                        base = L.latest_reader_word(i)
                        pid, start = w[base + L.LR_PID], w[base + L.LR_START_US]
                        if pid and not P.is_alive(pid, start):
                            cell.leave_reader(i, pid, start)
        raise TooManyMembers(f"Latest {self.name!r} has {L.L_READERS} live reader handles already")

    def get(self) -> Any:
        """The newest value.  Arrays that travelled through the slot pool
        are read-only views of it (zero-copy; ``np.array(x)`` copies one).
        Raises Empty if it was never set, ClosedError if this handle is closed."""
        cell = self._cell
        if cell is not None:
            got = cell.try_read()
            if got is not None and got[0] > 0 and (got[1][0] or not self._slots):
                return _loads(got[1])  # a pickle: no slots to take
        return self._read(self._check())[1]

    def get_versioned(self) -> Tuple[int, Any]:
        """``(version, value)`` of the newest value; Empty if never set."""
        return self._read(self._check())

    def wait(self, newer_than: int = 0, timeout: Optional[float] = None) -> Tuple[int, Any]:
        """Wait up to ``timeout`` seconds for a version above ``newer_than``;
        returns ``(version, value)`` of the newest.  Raises Empty on timeout."""
        cell = self._check()
        deadline = deadline_for(timeout)
        if cell.version <= newer_than:
            seg, w = self._segment, self._w
            while cell.version <= newer_than:
                left = SLICE_SECONDS if deadline is None else min(SLICE_SECONDS, deadline - _monotonic())
                if left <= 0:
                    raise Empty(f"Latest {self.name!r} has no version newer than {newer_than}")
                with seg.admin_lock():
                    w[L.W_L_WAITERS] += 1
                try:
                    if cell.version > newer_than:
                        break
                    self._sem.acquire(True, left)
                finally:
                    with seg.admin_lock():
                        w[L.W_L_WAITERS] = max(0, w[L.W_L_WAITERS] - 1)
        return self._read(cell)

    # -- the rest -------------------------------------------------------------
    def statistics(self) -> LatestStatistics:
        """The version, the newest value's size, the readers waiting and,
        with a slot pool, the slots in use (``shmq stat`` reads the same by
        name, without the slots in use).  ClosedError if closed."""
        self._check()
        stats = latest_statistics(self._segment)
        if self._slots:
            pool_stats = self._ensure_pool().statistics()
            stats = dataclasses.replace(stats, slots_in_use=pool_stats.slot_count - pool_stats.free)
        return stats

    def close(self) -> None:
        """Unmap this handle (idempotent).  Views returned by :meth:`get`
        stay valid (they keep the pool's mapping, and their slots, until
        they die).  The holds of this handle on values it set or held are
        given back, the newest value's too: a setter holds the newest value
        itself before it may free anything (see the module docstring)."""
        cell = self._cell
        if cell is None:
            return
        pool = self._pool
        if pool is not None and self._pid == os.getpid():
            with self._mutex:
                try:
                    self._give_back_all(cell)
                except Exception:  # a slot already given back: the janitors clean up after this process
                    pass
                if self._reader >= 0:
                    self._reader_finalizer.detach()
                    _leave_reader(self._segment, cell, self._reader, self._pid, self._start_us)
                    self._reader = -1
        self._cell = None
        if pool is not None:
            self._codec.close()
            pool.close()  # (deferred while holds or views live: the mapping stays)
        self._segment.close()

    def _give_back_all(self, cell: ValueCell) -> None:
        """Give back every hold of this handle, the newest value's and pinned
        ones' too: no slot is freed but by a setter that holds the newest
        and every pinned value itself first (see the module docstring).
        Before that, as a setter would, free what this handle's pool member
        sent and nobody holds any more (a closed member's slots are
        otherwise left to the janitor of the next setter)."""
        held = self._held
        self._lock.acquire()
        try:
            for h in list(held):  # the values this handle set, and their holds...
                held.remove(h)
                h.give_back()
            if self._adopt(cell):  # ...then as a setter: hold the newest and the pinned,
                self._pool.collect()  # free,
            for h in list(held):  # and let go
                held.remove(h)
                h.give_back()
        finally:
            self._lock.release()

    def unlink(self) -> None:
        """Remove the name (and the slot pool's) for everybody; the creator
        does this when it ends.  Also allowed after close()."""
        if self._slots:
            P.shm_unlink(P.part_name(self.name, "p"))
        self._segment.unlink()

    def __reduce__(self):
        self._check()
        return (Latest.attach, (self.name,))

    def __enter__(self) -> "Latest":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<Latest {getattr(self, 'name', '?')!r}{' closed' if self.closed else ''}>"


def _leave_reader(segment: Segment, cell: ValueCell, entry: int, pid: int, start_us: int) -> None:
    if segment.closed or pid != os.getpid():
        return
    with segment.admin_lock():
        cell.leave_reader(entry, pid, start_us)


class _Hold:
    """The holds of one value on its slots: a value this handle set
    (``refs``: (slot, generation), held through ``pool``), or one it
    adopted (``refs``: the codec's tokens, ``value`` the decoded value,
    kept alive: its anchors' finalizers would release the holds)."""

    __slots__ = ("version", "pool", "refs", "value")

    def __init__(self, version: int, pool: Optional[SlotPool], refs: List[Any], value: Any) -> None:
        self.version = version
        self.pool = pool
        self.refs = refs
        self.value = value

    def give_back(self) -> None:
        if self.pool is None:
            release_tokens(self.refs)
            self.value = None
        else:
            _release_refs(self.pool, self.refs)



def _release_refs(pool: SlotPool, refs: List[Tuple[int, int]]) -> None:
    for i, gen in refs:
        pool.release(i, gen)
