"""Queue, JoinableQueue, SimpleQueue: ``multiprocessing``'s queues, on shared memory.

Same names, signatures, defaults and exceptions as ``multiprocessing.Queue``
and friends; the differences are deliberate and listed in ``docs/queue.md``.

How an item travels
    ``put`` pickles the object in the calling thread (protocol 5, no lock
    held) and writes the bytes as one record of the queue's *main ring*: the
    item is visible to every process as soon as ``put`` returns, and nothing
    is left to flush when the process exits.  ``get`` copies a record out
    (under the ring's consumer lock) and unpickles it after the lock is gone.

Large items
    An item whose pickle is larger than a quarter of the ring goes through a
    *side path*: the producer writes it into a segment of its own (a *blob*),
    then, holding room for both, writes a small record naming the blob in the
    queue's *side ring* and an empty *marker* record in the main ring, which
    keeps the item's place in the order and in ``qsize()``.  A consumer that
    reads a marker takes the oldest side record with ``peek()``, unpickles
    the blob, and only then releases the record and unlinks the blob: a
    consumer killed meanwhile leaves the item to the others.  Blob bytes in
    flight are bounded by ``side_capacity_bytes`` (one item is always
    admitted when none is in flight), so the side path has back-pressure too.

Lifetime
    The process that creates a queue owns its names: it unlinks the main
    ring, the side ring and any blob of the queue when the last handle it
    holds is closed (or garbage collected), and at exit.  Other processes only
    close their handles.  A handle pickles as the queue's name.
"""
from __future__ import annotations

import os
import pickle
import secrets
import threading
import time
import types
import weakref
from collections import deque
from typing import Any, Deque, Dict, Iterable, List, Optional, Sequence

from . import _layout as L
from . import _platform as P
from ._errors import BrokenError, Empty, Full, LayoutError
from ._ring import DEFAULT_CAPACITY_BYTES, _closed_class
from ._segment import Segment
from ._stats import RingStatistics
from ._sync import Doorbell
from ._wait import wait_until
from .ring import Ring

__all__ = ("Queue", "JoinableQueue", "SimpleQueue", "DEFAULT_SIDE_CAPACITY_BYTES")

#: Smallest default for ``side_capacity_bytes`` (the default is the larger of
#: this and 16 times ``capacity_bytes``).
DEFAULT_SIDE_CAPACITY_BYTES = 64 << 20

_PROTOCOL = 5
_SIDE_RING_BYTES = 16 << 10  # about 400 large items in flight
_DESC_BYTES = 8 + P.MAX_NAME_LENGTH  # side record: payload length + blob name
_SIDE_NAME_OFFSET = L.W_SIDE_NAME * L.WORD
_NOTHING = object()

_monotonic = time.monotonic
_dumps = pickle.dumps


# -- serialisation: the two functions a codec plugs into ---------------------


def _encode(obj: Any) -> Any:
    """The bytes-like record for ``obj``: its pickle (protocol 5), made in the
    caller so a pickling error raises from ``put``.  Objects only
    ``multiprocessing``'s pickler knows (connections, sockets) work too."""
    try:
        return _dumps(obj, _PROTOCOL)
    except Exception as exc:
        from multiprocessing.reduction import ForkingPickler

        try:
            return ForkingPickler.dumps(obj, _PROTOCOL)
        except Exception:
            raise exc from None


#: Record (any buffer) -> object.
_decode = pickle.loads


# -- ownership ----------------------------------------------------------------

# Queue name -> handles open in the process that created the queue.
_owner_handles: Dict[str, int] = {}
_owner_lock = threading.Lock()
_live: "weakref.WeakSet[_QueueBase]" = weakref.WeakSet()


def _after_fork_in_child() -> None:
    global _owner_lock
    _owner_lock = threading.Lock()
    _owner_handles.clear()  # a child owns nothing; inherited handles are attachers
    for q in list(_live):
        q._put_tlock = threading.Lock()
        q._get_tlock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def _unlink_queue(main: Ring, side: Ring, blob_prefix: str) -> None:
    main.unlink()
    side.unlink()
    for name in P.list_shm_names():
        if name.startswith(blob_prefix):
            P.shm_unlink(name)


def _release_handle(main: Ring, side: Ring, sems: tuple, owner_pid: int, blob_prefix: str) -> None:
    """Close one handle (its finalizer: gets names, never the handle)."""
    if owner_pid == os.getpid():
        with _owner_lock:
            left = _owner_handles.get(main.name, 0) - 1
            if left > 0:
                _owner_handles[main.name] = left
            else:
                _owner_handles.pop(main.name, None)
        if left == 0:
            _unlink_queue(main, side, blob_prefix)
    for sem in sems:
        try:
            sem.close()
        except Exception:
            pass
    side.close()
    main.close()


def _deadline(timeout: Optional[float]) -> Optional[float]:
    # multiprocessing.Queue treats a negative timeout as 0.
    return None if timeout is None else _monotonic() + max(timeout, 0.0)


def _load_blob(name: str, nbytes: int, queue_name: str) -> Any:
    try:
        seg = Segment.attach(name, L.KIND_BLOB)
    except FileNotFoundError as exc:
        raise BrokenError(
            f"a large item of queue {queue_name!r} is gone: {name!r} was removed (was the queue unlinked?)"
        ) from exc
    try:
        with seg.buf[L.DATA_OFFSET : L.DATA_OFFSET + nbytes] as view:
            return _decode(view)
    finally:
        seg.close()


class _QueueBase:
    """Everything the three queue classes share (see the module docstring)."""

    _KIND = 0
    _closed = True  # until a constructor finishes
    __class_getitem__ = classmethod(types.GenericAlias)

    def __init__(
        self,
        maxsize: int = 0,
        *,
        capacity_bytes: int = DEFAULT_CAPACITY_BYTES,
        name: Optional[str] = None,
        side_capacity_bytes: Optional[int] = None,
    ) -> None:
        if not isinstance(maxsize, int) or isinstance(maxsize, bool):
            raise TypeError(f"'maxsize' must be an int, got {type(maxsize).__name__}")
        if side_capacity_bytes is not None and (
            not isinstance(side_capacity_bytes, int) or isinstance(side_capacity_bytes, bool) or side_capacity_bytes < 1
        ):
            raise ValueError(f"'side_capacity_bytes' must be a positive int, got {side_capacity_bytes!r}")
        main = Ring.create(capacity_bytes, max_messages=max(maxsize, 0), name=name)
        side: Optional[Ring] = None
        sems: list = []
        try:
            if side_capacity_bytes is None:
                side_capacity_bytes = max(DEFAULT_SIDE_CAPACITY_BYTES, 16 * main.capacity_bytes)
            side = _create_side_ring(side_capacity_bytes)
            buf = main.segment.buf
            buf[_SIDE_NAME_OFFSET : _SIDE_NAME_OFFSET + L.SIDE_NAME_BYTES] = side.name.encode().ljust(
                L.SIDE_NAME_BYTES, b"\0"
            )
            sems = self._open_semaphores(main.name, create=True)
            main.segment.words[L.W_QUEUE_KIND] = self._KIND  # last: attach() waits for it
            self._setup(main, side, sems, os.getpid())
            with _owner_lock:
                _owner_handles[main.name] = 1
        except BaseException:
            for sem in sems:
                sem.close()
            if side is not None:
                side.unlink()
                side.close()
            main.unlink()
            main.close()
            raise

    @classmethod
    def attach(cls, name: str):
        """Open the queue ``name``, created by any process.

        Returns an instance of the class the queue was created as
        (``Queue.attach`` of a JoinableQueue gives a JoinableQueue).  Raises
        FileNotFoundError, PermissionError, or LayoutError if ``name`` is not
        a queue of this class."""
        main = Ring.attach(name)
        side = None
        sems: list = []
        try:
            words = main.segment.words
            kind = words[L.W_QUEUE_KIND]
            # A queue publishes its ring before it writes its kind; a young
            # segment may not have it yet.
            while kind == 0 and time.time_ns() - words[L.W_CREATED_NS] < 500_000_000:
                time.sleep(0.001)
                kind = words[L.W_QUEUE_KIND]
            qcls = _KINDS.get(kind)
            if qcls is None:
                what = "the side ring of a queue" if kind == L.QUEUE_KIND_SIDE else "a ring, not a queue"
                raise LayoutError(f"{main.name!r} is {what}: expected a shmq.{cls.__name__}")
            if not issubclass(qcls, cls):
                raise LayoutError(f"{main.name!r} is a shmq.{qcls.__name__}, expected a shmq.{cls.__name__}")
            raw = bytes(main.segment.buf[_SIDE_NAME_OFFSET : _SIDE_NAME_OFFSET + L.SIDE_NAME_BYTES])
            side = Ring.attach(raw.rstrip(b"\0").decode("ascii"))
            self = qcls.__new__(qcls)
            sems = self._open_semaphores(main.name, create=False)
            owner_pid = 0
            with _owner_lock:
                if main.name in _owner_handles:
                    _owner_handles[main.name] += 1
                    owner_pid = os.getpid()
            self._setup(main, side, sems, owner_pid)
        except BaseException:
            for sem in sems:
                sem.close()
            if side is not None:
                side.close()
            main.close()
            raise
        return self

    def _open_semaphores(self, name: str, create: bool) -> list:
        return []

    def _setup(self, main: Ring, side: Ring, sems: list, owner_pid: int) -> None:
        self.name = main.name
        self._ring = main
        self._side = side
        self._w = main.segment.words
        self._sw = side.segment.words
        self._inline_max = min(main.max_payload, main.capacity_bytes // 4)
        self._blob_prefix = side.name[:-1] + "b"
        # Hot methods bound once: one lookup each on the put/get paths.
        self._try_write = main.try_write
        self._try_read = main.try_read
        self._try_read_many = main.try_read_many
        self._stash: Deque[Any] = deque()  # records get_many took but could not return
        # Threads of this process share the handle's reserve() (large puts)
        # and peek() (large gets) state: one of each at a time.
        self._put_tlock = threading.Lock()
        self._get_tlock = threading.Lock()
        self._closed = False
        self._finalizer = weakref.finalize(self, _release_handle, main, side, tuple(sems), owner_pid, self._blob_prefix)
        _live.add(self)

    def __reduce__(self):
        return (_attach, (self.name,))

    # -- putting ----------------------------------------------------------
    def put(self, obj: Any, block: bool = True, timeout: Optional[float] = None) -> None:
        """Put ``obj`` into the queue, waiting (up to ``timeout`` seconds) for
        room if ``block``.  Raises queue.Full (shmq.Full) if there is none;
        pickling errors raise here and leave the queue as it was."""
        data = _encode(obj)
        if len(data) <= self._inline_max:
            if self._try_write(data):
                return
            self._put_wait(data, block, timeout)
        else:
            self._put_large(data, block, _deadline(timeout) if block else None)

    def put_nowait(self, obj: Any) -> None:
        """``put(obj, False)``."""
        self.put(obj, False)

    def put_many(self, items: Iterable[Any], block: bool = True, timeout: Optional[float] = None) -> None:
        """Put every item of ``items``, in order, publishing runs of small
        items at once.  Every item is pickled first, so a pickling error puts
        nothing.  Raises Full if ``timeout`` expires (the message says how
        many items were put: those before it)."""
        datas = [_encode(obj) for obj in items]
        main = self._ring
        limit = self._inline_max
        total = len(datas)
        deadline = _deadline(timeout) if block else None
        i = 0
        while i < total:
            if len(datas[i]) > limit:
                try:
                    self._put_large(datas[i], block, deadline)
                except Full:
                    raise Full(f"queue {self.name!r} is full: {i} of {total} items were put") from None
                i += 1
                continue
            j = i + 1
            while j < total and len(datas[j]) <= limit:
                j += 1
            run = datas[i:j] if i or j < total else datas
            done = main.try_write_many(run)
            while done < len(run):
                if not block:
                    raise Full(f"queue {self.name!r} is full: {i + done} of {total} items were put")
                nbytes = len(run[done])
                try:
                    main._block_writing(lambda: main.can_write(nbytes), None, deadline)
                except Full:
                    raise Full(f"queue {self.name!r} is full: {i + done} of {total} items were put") from None
                done += main.try_write_many(run[done:])
            i = j

    def _put_wait(self, data: Any, block: bool, timeout: Optional[float]) -> None:
        if not block:
            raise Full(f"queue {self.name!r} is full")
        deadline = _deadline(timeout)
        main = self._ring
        nbytes = len(data)
        while True:
            main._block_writing(lambda: main.can_write(nbytes), None, deadline)
            if main.try_write(data):
                return

    def _put_large(self, data: Any, block: bool, deadline: Optional[float]) -> None:
        nbytes = len(data)

        def room() -> bool:
            return self._ring.can_write(0) and self._side.can_write(_DESC_BYTES) and self._admits(nbytes)

        # Wait before making the blob, so a producer blocked here holds nothing.
        if not room():
            if not block:
                raise Full(f"queue {self.name!r} is full")
            self._wait_large(room, deadline)
        name = self._new_blob(data)
        published = [False]  # set just before the record naming the blob is published
        try:
            record = nbytes.to_bytes(8, "little") + name.encode("ascii")
            while not self._commit_large(record, nbytes, published):
                if not block:
                    raise Full(f"queue {self.name!r} is full")
                self._wait_large(room, deadline)
        except BaseException:
            if not published[0]:  # (if it was, at worst the owner removes it later)
                P.shm_unlink(name)
            raise

    def _admits(self, nbytes: int) -> bool:
        """Whether the side path takes ``nbytes`` more now."""
        sw = self._sw
        in_flight = sw[L.W_SIDE_BYTES_IN] - sw[L.W_SIDE_BYTES_OUT]
        # An empty side ring means nothing is in flight, whatever the counters
        # say (a process killed between two updates can skew them).
        return in_flight <= 0 or in_flight + nbytes <= sw[L.W_SIDE_LIMIT] or self._side.empty()

    def _wait_large(self, room, deadline: Optional[float]) -> None:
        ring = self._side if self._ring.can_write(0) else self._ring
        ring._block_writing(room, None, deadline)

    def _new_blob(self, data: Any) -> str:
        nbytes = len(data)
        prefix = self._blob_prefix
        for _ in range(64):
            name = prefix + secrets.token_hex(8)[: P.MAX_NAME_LENGTH - len(prefix)]
            try:
                seg = Segment.create(L.KIND_BLOB, L.blob_segment_size(nbytes), name)
                break
            except FileExistsError:
                continue
        else:
            raise FileExistsError(f"no free name for a large item of queue {self.name!r} (prefix {prefix!r})")
        try:
            w = seg.words
            w[L.W_BLOB_BYTES] = nbytes
            # Attributed to the queue's creator, so `shmq gc` keeps it while the queue lives.
            w[L.W_CREATOR_PID] = self._w[L.W_CREATOR_PID]
            w[L.W_CREATOR_START_US] = self._w[L.W_CREATOR_START_US]
            seg.buf[L.DATA_OFFSET : L.DATA_OFFSET + nbytes] = data
            seg.publish()
            seg.disown()  # the consumer that takes it unlinks it, or the queue's owner
        except BaseException:
            seg.unlink()
            seg.close()
            raise
        seg.close()
        return name

    def _commit_large(self, record: bytes, nbytes: int, published: list) -> bool:
        """Publish a side record and its marker, or nothing (False: no room)."""
        main, side = self._ring, self._side
        with self._put_tlock:
            if main.reserve(0) is None:  # holds the main producer lock until commit/abort
                return False
            try:
                view = side.reserve(len(record))
                if view is None:
                    main.abort()
                    return False
                if not self._admits(nbytes):
                    side.abort()
                    main.abort()
                    return False
                view[: len(record)] = record
                view.release()
                self._sw[L.W_SIDE_BYTES_IN] += nbytes
                published[0] = True
                side.commit(len(record))
            except BaseException:
                side.abort()
                main.abort()
                raise
            main.commit()
        return True

    # -- getting ----------------------------------------------------------
    def get(self, block: bool = True, timeout: Optional[float] = None) -> Any:
        """Remove and return the oldest item, waiting (up to ``timeout``
        seconds) for one if ``block``.  Raises queue.Empty (shmq.Empty)."""
        data = self._try_read()
        if data:
            return _decode(data)
        return self._get_slow(data, block, timeout)

    def get_nowait(self) -> Any:
        """``get(False)``."""
        return self.get(False)

    def _get_slow(self, data: Optional[bytes], block: bool, timeout: Optional[float]) -> Any:
        deadline = _deadline(timeout) if block else None
        while True:
            if data:
                return _decode(data)
            if data is not None or self._orphan_ready():  # a marker, or a large item left behind
                obj = self._take_side()
                if obj is not _NOTHING:
                    return obj
            elif not block:
                raise Empty(f"queue {self.name!r} is empty")
            else:
                self._ring._block_reading(deadline, self._readable)
            data = self._try_read()

    def get_many(self, max_items: int = 1 << 30, block: bool = True, timeout: Optional[float] = None) -> List[Any]:
        """Remove and return up to ``max_items`` items (at least one: waits
        like ``get``), taking their records at once."""
        if max_items < 1:
            raise ValueError(f"'max_items' must be at least 1, got {max_items!r}")
        records = self._try_read_many(max_items)
        deadline = _deadline(timeout) if block else None
        while True:
            if records:
                out = self._decode_batch(records)
                if out:
                    return out
            elif self._orphan_ready():
                obj = self._take_side()
                if obj is not _NOTHING:
                    return [obj]
            elif not block:
                raise Empty(f"queue {self.name!r} is empty")
            else:
                self._ring._block_reading(deadline, self._readable)
            records = self._try_read_many(max_items)

    def _decode_batch(self, records: Sequence[Any]) -> List[Any]:
        """Unpickle ``records``.  A large item is returned only first in a
        batch; the records not returned are kept for this handle's next get."""
        out: List[Any] = []
        i, n = 0, len(records)
        try:
            while i < n:
                rec = records[i]
                if rec:
                    out.append(_decode(rec))
                elif out:
                    break  # a large item: it starts the next batch
                else:
                    obj = self._take_side()
                    if obj is not _NOTHING:
                        out.append(obj)
                i += 1
        except Exception:
            if out and records[i]:
                self._stash_records(records[i:])  # its error comes with the next get
                return out
            self._stash_records(records[i + 1 :])
            raise
        except BaseException:
            self._stash_records(records[i + 1 :])
            raise
        self._stash_records(records[i:])
        return out

    def _stash_records(self, records: Sequence[Any]) -> None:
        if records:
            self._stash.extendleft(reversed(records))
            self._try_read = self._pop_stash  # type: ignore[method-assign]
            self._try_read_many = self._pop_stash_many  # type: ignore[method-assign]

    def _pop_stash(self) -> Optional[bytes]:
        stash = self._stash
        rec = stash.popleft() if stash else None
        if not stash:
            self._try_read = self._ring.try_read  # type: ignore[method-assign]
            self._try_read_many = self._ring.try_read_many  # type: ignore[method-assign]
        return self._try_read() if rec is None else rec

    def _pop_stash_many(self, max_items: int) -> List[Any]:
        stash = self._stash
        out = [stash.popleft() for _ in range(min(max_items, len(stash)))]
        if not stash:
            self._try_read = self._ring.try_read  # type: ignore[method-assign]
            self._try_read_many = self._ring.try_read_many  # type: ignore[method-assign]
        return out or self._try_read_many(max_items)

    def _readable(self) -> bool:
        return self._ring.can_read() or self._orphan_ready()

    def _orphan_ready(self) -> bool:
        """A side record waits that no live consumer is taking: its marker
        was read by a consumer that died, or its producer died before
        publishing the marker."""
        sw = self._sw
        if sw[L.W_HEAD] == sw[L.W_TAIL]:
            return False
        owner = sw[L.W_CONSUMER_LOCK]
        return owner == 0 or not P.is_alive(owner)

    def _take_side(self) -> Any:
        """Take the oldest large item; _NOTHING if another consumer took it.
        Its record stays in the side ring until the item is unpickled."""
        side = self._side
        with self._get_tlock:
            view = side.peek()  # holds the side consumer lock until release()
            if view is None:
                return _NOTHING
            try:
                nbytes = int.from_bytes(view[:8], "little")
                name = bytes(view[8:]).decode("ascii")
            finally:
                view.release()
            try:
                return _load_blob(name, nbytes, self.name)
            finally:
                self._sw[L.W_SIDE_BYTES_OUT] += nbytes
                side.release()
                P.shm_unlink(name)

    # -- state --------------------------------------------------------------
    def qsize(self) -> int:
        """Items in the queue now, exact (read from the shared counters)."""
        return self._ring.qsize() + len(self._stash)

    def empty(self) -> bool:
        """``qsize() == 0``."""
        return not self._stash and self._ring.qsize() == 0

    def full(self) -> bool:
        """True when ``maxsize`` items are held, or the ring has no byte left."""
        return self._ring.full()

    @property
    def maxsize(self) -> int:
        """The item limit (0: limited by ``capacity_bytes`` only)."""
        return self._ring.max_messages

    @property
    def capacity_bytes(self) -> int:
        """Size of the ring's data area: what small items in the queue can occupy."""
        return self._ring.capacity_bytes

    def statistics(self) -> RingStatistics:
        """A snapshot of the main ring's shared counters (the same in every process)."""
        return self._ring.statistics()

    # -- lifetime -------------------------------------------------------------
    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Close this handle (idempotent).  Other handles and processes are
        unaffected; in the creating process, closing the last handle unlinks
        the queue."""
        if self._closed:
            return
        self._closed = True
        self._stash.clear()
        _live.discard(self)
        self._finalizer()
        self.__class__ = _closed_class(type(self), _KEEP_OPEN)

    def join_thread(self) -> None:
        """No-op: there is no feeder thread to wait for."""

    def cancel_join_thread(self) -> None:
        """No-op: there is no feeder thread; a process never waits at exit."""

    def unlink(self) -> None:
        """Remove the queue's names (its rings and any large item not yet
        taken) for every process.  Open handles keep working on what they have
        mapped.  The creating process does this when its last handle closes."""
        with _owner_lock:
            _owner_handles.pop(self.name, None)
        _unlink_queue(self._ring, self._side, self._blob_prefix)

    def __enter__(self):
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        kind = type(self).__mro__[1 if getattr(type(self), "_is_closed_class", False) else 0].__name__
        if self._closed:
            return f"<shmq.{kind} {self.name!r} closed>"
        return f"<shmq.{kind} {self.name!r} {self.qsize()} items>"


def _create_side_ring(limit: int) -> Ring:
    stem = P.name_stem()
    for _ in range(16):
        try:
            side = Ring.create(_SIDE_RING_BYTES, name=f"{stem}q{secrets.token_hex(3)}s")
            break
        except FileExistsError:
            continue
    else:
        raise FileExistsError(f"could not find a free name for a queue's side ring like {stem}q......s")
    w = side.segment.words
    w[L.W_SIDE_LIMIT] = limit
    w[L.W_QUEUE_KIND] = L.QUEUE_KIND_SIDE
    return side


class Queue(_QueueBase):
    """``Queue(maxsize=0, *, capacity_bytes=1 MiB, name=None, side_capacity_bytes=None)``

    A process-shared FIFO queue: ``multiprocessing.Queue``'s API on a
    shared-memory ring.  ``maxsize`` > 0 limits the number of items;
    ``capacity_bytes`` is the ring's size (small items are stored in it, so it
    also bounds the queue); items whose pickle exceeds a quarter of it go
    through the side path, at most ``side_capacity_bytes`` of them in flight
    (default: the larger of 64 MiB and 16 x ``capacity_bytes``).  ``name``
    picks the shared-memory name (``Queue.attach(name)`` from anywhere).
    """

    _KIND = L.QUEUE_KIND_QUEUE


class JoinableQueue(Queue):
    """A Queue that also counts unfinished tasks: ``task_done()`` and
    ``join()``, as ``multiprocessing.JoinableQueue``.  The count lives in
    shared memory: items put minus ``task_done()`` calls."""

    _KIND = L.QUEUE_KIND_JOINABLE

    def _open_semaphores(self, name: str, create: bool) -> list:
        bell = name + "-jd"
        return [P.sem_create(bell, 0) if create else P.sem_open(bell)]

    def _setup(self, main: Ring, side: Ring, sems: list, owner_pid: int) -> None:
        super()._setup(main, side, sems, owner_pid)
        self._join_bell = Doorbell(sems[0], self._w, L.W_JOIN_WAITING)
        # Updates of TASKS_DONE borrow the side ring's producer lock: large
        # puts hold it for microseconds, nothing else takes it.
        self._task_lock = side._plock

    def task_done(self) -> None:
        """Say one item taken with ``get`` has been processed.  Raises
        ValueError if called more times than items were put."""
        w = self._w
        lock = self._task_lock
        lock.acquire()
        try:
            done = w[L.W_TASKS_DONE]
            if done >= w[L.W_MSGS_IN]:
                raise ValueError("task_done() called too many times")
            done += 1
            w[L.W_TASKS_DONE] = done
        finally:
            lock.release()
        if done == w[L.W_MSGS_IN] and w[L.W_JOIN_WAITING]:
            self._join_bell.ring()

    def join(self, *, timeout: Optional[float] = None) -> bool:
        """Wait until every item put has been marked done with
        ``task_done()``.  Returns True, or False if ``timeout`` (seconds)
        expired first."""
        w = self._w
        return wait_until(lambda: w[L.W_MSGS_IN] - w[L.W_TASKS_DONE] <= 0, self._join_bell, _deadline(timeout))


class SimpleQueue(_QueueBase):
    """``SimpleQueue(*, capacity_bytes=1 MiB, name=None, side_capacity_bytes=None)``

    ``multiprocessing.SimpleQueue``'s ``put(obj)``, ``get()``, ``empty()``,
    ``close()`` (and the rest of Queue's methods, ``maxsize`` aside)."""

    _KIND = L.QUEUE_KIND_SIMPLE

    def __init__(
        self,
        *,
        capacity_bytes: int = DEFAULT_CAPACITY_BYTES,
        name: Optional[str] = None,
        side_capacity_bytes: Optional[int] = None,
    ) -> None:
        super().__init__(0, capacity_bytes=capacity_bytes, name=name, side_capacity_bytes=side_capacity_bytes)


_KINDS = {L.QUEUE_KIND_QUEUE: Queue, L.QUEUE_KIND_JOINABLE: JoinableQueue, L.QUEUE_KIND_SIMPLE: SimpleQueue}
_KEEP_OPEN = ("join_thread", "cancel_join_thread")


def _attach(name: str) -> _QueueBase:
    """Unpickle a queue handle: attach by name, as the class it was created as."""
    return _QueueBase.attach(name)
