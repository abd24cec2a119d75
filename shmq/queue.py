"""Queue, JoinableQueue, SimpleQueue: ``multiprocessing``'s queues, on shared memory.

Same names, signatures, defaults and exceptions as ``multiprocessing.Queue``
and friends; the differences are deliberate and listed in ``docs/queue.md``.
docs/design.md ("The life of a message") follows an item from ``put`` to
shared memory and back.

A queue is a main ring (a :class:`~shmq.ring.Ring` named after the queue)
and parts named after it: the side ring ``<queue>.s`` and large-item blobs
``<queue>.b<hex>`` (``shmq._side``), and the slot pool ``<queue>.p``
(``shmq._queue_pool``).

``put`` pickles the object in the calling thread, once (the *first pass*,
``shmq._codec``: protocol 5, no lock held), and writes the pickle as one
record of the main ring: the item is visible to every process as soon as
``put`` returns, and nothing is left to flush when the process exits.
``get`` copies a record out (under the ring's consumer lock) and unpickles
it after the lock is gone.  Both are the ring's closures with the pickling
inlined (``RingBuffer.encoding_writer`` / ``decoding_reader``), bound to the
handle: one Python frame per item.  Anything else leaves that fast path
through the closures' hooks (``_put_long``, ``_put_full``, ``_get_slow``):

* an object with a buffer of 64 KiB or more (numpy arrays...) is encoded by
  the slot codec: its buffers go into slots of the pool, the record carries
  references (docs/zero_copy.md);
* an array made by ``loan_array`` already lives in a slot: ``put`` sends
  the slot's number, nothing is copied (``_put_loaned``);
* a pickle longer than a quarter of the ring goes through the side path;
* a full ring or an empty one makes the call wait, up to its timeout.

Lifetime: the process that creates a queue owns its names.  It unlinks the
main ring and every part when the last handle it holds is closed (or
garbage collected), and at exit.  Other processes only close their handles.
A handle pickles as the queue's name.
"""
from __future__ import annotations

import os
import pickle
import threading
import time
import types
import weakref
from collections import deque
from typing import Any, Callable, Deque, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np

from . import _codec as C
from . import _layout as L
from . import _platform as P
from ._errors import BrokenError, ClosedError, Empty, Full, LayoutError, MessageTooLarge, SharedMemoryFull, SlotError
from ._queue_pool import (
    AUTO_POOL_BYTES,
    DEFAULT_SLOT_COUNT,
    DEFAULT_SLOT_SIZE,
    MAX_SLOT_COUNT,
    config_word,
    open_pool,
    read_config,
)
from ._ring import DEFAULT_CAPACITY_BYTES
from ._side import NOTHING, SidePath, blob_names, check_ring
from ._segment import call_at_exit, call_now, cancel_at_exit
from ._slots import SlotPool
from ._ring import RingStatistics
from ._sync import Doorbell
from ._wait import deadline_for_mp, wait_until
from .ring import Ring

__all__ = (
    "Queue",
    "JoinableQueue",
    "SimpleQueue",
    "DEFAULT_SIDE_CAPACITY_BYTES",
    "DEFAULT_SLOT_SIZE",
    "DEFAULT_SLOT_COUNT",
    "AUTO_POOL_BYTES",
    "ZERO_COPY_THRESHOLD",
)

#: Smallest default for ``side_capacity_bytes`` (the default is the larger of
#: this and 16 times ``capacity_bytes``).
DEFAULT_SIDE_CAPACITY_BYTES = 64 << 20
#: Buffers at least this large travel through a slot; smaller ones in the pickle.
ZERO_COPY_THRESHOLD = C.DEFAULT_THRESHOLD

_PROTOCOL = C.PROTOCOL
# A put finding no free slot waits in slices of _POOL_SLICE; after _POOL_GRACE
# it copies instead if no slot holds an item still in the queue (_encode_pooled).
_POOL_SLICE = 0.05
_POOL_GRACE = 0.2
_RAW_TYPES = (bytes, bytearray)
_LARGE = C.LARGE

_monotonic = time.monotonic
_dumps = pickle.dumps
#: Record (any buffer) -> object, for every record but slot messages.
_decode = pickle.loads


class _Ready:
    """A slot message ``get_many`` decoded ahead of its turn, in the stash (so
    no undecoded slot message waits there): the object, or the error."""

    __slots__ = ("obj", "exc")

    def __init__(self, obj: Any, exc: Optional[BaseException] = None) -> None:
        self.obj = obj
        self.exc = exc

    def get(self) -> Any:
        if self.exc is not None:
            raise self.exc
        return self.obj


#: Left in a closed handle's stash: a ``get`` bound before ``close()`` (the
#: ring's closure checks the stash first) then reaches ``_get_stashed``,
#: which raises ClosedError.
_CLOSED_MARK = _Ready(None, None)


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
        q._side.reset_locks()
        q._zc_lock = threading.Lock()
        if q._stash:  # records the parent took: they are the parent's to return
            q._stash.clear()
            q._reset_readers()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def _unlink_queue(main: Ring, side: Ring) -> None:
    """Remove the queue's names: its rings, its blobs, then its pool."""
    main.unlink()
    side.unlink()
    for name in blob_names(main.name):
        P.shm_unlink(name)
    P.shm_unlink(P.part_name(main.name, "p"))  # last: see _queue_pool._create


def _release_handle(main: Ring, side: Ring, owner_pid: int, zc: list) -> None:
    """Close one handle (its finalizer: gets names, never the handle).
    ``zc``: [codec, pool] once the handle opened them."""
    if owner_pid == os.getpid():
        with _owner_lock:
            left = _owner_handles.get(main.name, 0) - 1
            if left > 0:
                _owner_handles[main.name] = left
            else:
                _owner_handles.pop(main.name, None)
        if left == 0:
            call_now(main.name)  # _unlink_queue, unless the process's exit cleanup did it
    codec, pool = zc
    zc[:] = [None, None]
    if codec is not None:
        codec.close()
    if pool is not None:
        pool.close()  # (the mapping stays while received arrays view it)
    side.close()
    main.close()


# -- loans (Queue.loan_array) ----------------------------------------------


class _Loan:
    """A slot lent to this process's caller as an array (``loan_array``),
    until the array is put (``sent``) or dies.  ``index`` -1, ``pool``
    None: a private array (no slot was free), copied when put."""

    __slots__ = ("index", "nbytes", "header", "pool", "epoch", "pid", "sent", "ref")

    def __init__(
        self, index: int, nbytes: int, header: Tuple[int, bytes], pool: Optional[SlotPool], epoch: int
    ) -> None:
        self.index = index
        self.nbytes = nbytes
        self.header = header
        self.pool = pool
        self.epoch = epoch
        self.pid = os.getpid()
        self.sent = False
        self.ref: Any = None  # weakref.ref to the array


def _loan_dropped(loans: Dict[int, _Loan], key: int) -> None:
    """The loaned array died (its weakref's callback, run while it is freed,
    so no other object has its id yet): forget it, and give its slot back
    unless it was put."""
    loan = loans.pop(key, None)
    if loan is not None and loan.pool is not None and not loan.sent and loan.pid == os.getpid():
        loan.pool.abort_later(loan.index, loan.epoch)  # never raises, never blocks




class _QueueBase:
    """Everything the three queue classes share (see the module docstring)."""

    _KIND = 0
    _closed = True  # until a constructor finishes
    #: The slot pool and codec of this handle, opened on first use (None until then).
    _pool: Optional[SlotPool] = None
    _codec: Optional[C.Codec] = None
    __class_getitem__ = classmethod(types.GenericAlias)

    def __init__(
        self,
        maxsize: int = 0,
        *,
        capacity_bytes: int = DEFAULT_CAPACITY_BYTES,
        name: Optional[str] = None,
        side_capacity_bytes: Optional[int] = None,
        zero_copy: bool = True,
        slot_size: Optional[int] = None,
        slot_count: int = DEFAULT_SLOT_COUNT,
    ) -> None:
        if not isinstance(maxsize, int) or isinstance(maxsize, bool):
            raise TypeError(f"'maxsize' must be an int, got {type(maxsize).__name__}")
        if side_capacity_bytes is not None and (
            not isinstance(side_capacity_bytes, int) or isinstance(side_capacity_bytes, bool) or side_capacity_bytes < 1
        ):
            raise ValueError(f"'side_capacity_bytes' must be a positive int, got {side_capacity_bytes!r}")
        for arg, value, high in (("slot_size", slot_size, 1 << 40), ("slot_count", slot_count, MAX_SLOT_COUNT)):
            if value is None and arg == "slot_size":
                continue
            if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= high:
                raise ValueError(f"'{arg}' must be an int between 1 and {high}, got {value!r}")
        if isinstance(name, str) and P.owner_of(name.lstrip("/")) is not None:
            raise ValueError(
                f"'name' must not end like a queue's part ('.s', '.p', '.b' and hex digits), got {name!r}"
            )
        main = Ring.create(capacity_bytes, max_messages=max(maxsize, 0), name=name)
        side: Optional[SidePath] = None
        try:
            if side_capacity_bytes is None:
                side_capacity_bytes = max(DEFAULT_SIDE_CAPACITY_BYTES, 16 * main.capacity_bytes)
            side = SidePath.create(main, side_capacity_bytes, Ring)
            sems = self._open_semaphores(main.name, create=True)
            main.segment.words[L.W_POOL_CONFIG] = config_word(zero_copy, slot_size, slot_count)
            main.segment.words[L.W_QUEUE_KIND] = self._KIND  # last: attach() waits for it
            self._setup(main, side, sems, os.getpid())
            with _owner_lock:
                _owner_handles[main.name] = 1
            call_at_exit(main.name, _unlink_queue, main, side.ring)  # also at os._exit/SIGTERM
        except BaseException:
            if side is not None:
                side.ring.unlink()
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
            side = SidePath.attach(main, Ring)
            self = qcls.__new__(qcls)
            sems = self._open_semaphores(main.name, create=False)
            owner_pid = 0
            with _owner_lock:
                if main.name in _owner_handles:
                    _owner_handles[main.name] += 1
                    owner_pid = os.getpid()
            self._setup(main, side, sems, owner_pid)
        except BaseException:
            if side is not None:
                side.close()
            main.close()
            raise
        return self

    def _open_semaphores(self, name: str, create: bool) -> list:
        return []

    def _setup(self, main: Ring, side: SidePath, sems: list, owner_pid: int) -> None:
        self.name = main.name
        self._ring = main
        self._side = side
        self._w = main.segment.words
        self._inline_max = min(main.max_payload, main.capacity_bytes // 4)
        self._zero_copy, self._slot_size, _ = read_config(main)  # slot size 0: not known before the pool is open
        self._pooled_puts = self._zero_copy  # large buffers go to the pool when put
        self._owner_pid = owner_pid
        self._zc: list = [None, None]  # [codec, pool], for the finalizer
        self._zc_lock = threading.Lock()
        self._consumer_pid = 0  # the process that listed itself as a consumer of the ring
        self._stuck_pool: Optional[tuple] = None  # the pool's state when a put last copied instead
        self._try_write = main.try_write
        self._stash: Deque[Any] = deque()  # records get_many took but could not return
        self._loans: Dict[int, _Loan] = {}  # id(array) -> its loan, while the loaned array lives
        self._fast_put = main.encoding_writer(
            _dumps, _PROTOCOL, C.stop_at_large, C.first_pass_failed, self._inline_max,
            _QueueBase._put_long, _QueueBase._put_full,
        )  # fmt: skip
        self._fast_get = main.decoding_reader(
            _decode, _QueueBase._decode_other, _QueueBase._get_slow, self._stash, _QueueBase._get_stashed
        )
        # put and get ARE those closures, bound to this handle (unless a
        # subclass overrides them): measured about 40 ns (5%) less per call than a
        # method that calls them (docs/design.md).  Bound methods pickle as
        # the handle's put and get; they make a reference cycle, which the
        # garbage collector takes care of for a handle dropped without close().
        for attr, fast in (("put", self._fast_put), ("get", self._fast_get)):
            method = getattr(_QueueBase, attr)
            fast.__name__, fast.__qualname__, fast.__doc__ = attr, method.__qualname__, method.__doc__
            if getattr(type(self), attr) is method:
                setattr(self, attr, types.MethodType(fast, self))
        self._reset_readers()
        self._closed = False
        self._finalizer = weakref.finalize(self, _release_handle, main, side.ring, owner_pid, self._zc)
        _live.add(self)

    def __reduce__(self):
        if self._closed:  # as multiprocessing refuses to pickle closed things
            raise self._closed_error()
        return (_attach, (self.name,))

    def _closed_error(self) -> ClosedError:
        return ClosedError(f"{type(self).__name__} {self.name!r} is closed")

    # -- putting ----------------------------------------------------------
    def put(self, obj: Any, block: bool = True, timeout: Optional[float] = None) -> None:
        """Put ``obj`` into the queue, waiting (up to ``timeout`` seconds) for
        room if ``block``.  Raises queue.Full (shmq.Full) if there is none;
        pickling errors raise here and leave the queue as it was."""
        # (Run only by a subclass's super().put and on a closed handle: an
        # open handle's put is self._fast_put, bound in _setup.)
        if self._closed:
            raise self._closed_error()
        self._fast_put(self, obj, block, timeout)

    def put_nowait(self, obj: Any) -> None:
        """``put(obj, False)``."""
        self.put(obj, False)

    def put_many(self, items: Iterable[Any], block: bool = True, timeout: Optional[float] = None) -> None:
        """Put every item of ``items``, in order, publishing runs of small
        items at once.  Every item is pickled first, so a pickling error puts
        nothing.  Raises Full if ``timeout`` expires (the message says how
        many items were put: those before it)."""
        if self._closed:
            raise self._closed_error()
        if not isinstance(items, (list, tuple)):
            items = list(items)
        try:  # no Python call per item while every item is small and plain
            datas = [_dumps(obj, _PROTOCOL, buffer_callback=C.stop_at_large) for obj in items]
        except Exception:
            datas = [C.first_pass(obj) for obj in items]
        main = self._ring
        limit = self._inline_max
        total = len(datas)
        deadline = deadline_for_mp(timeout) if block else None
        i = put = 0  # put: items written so far
        try:
            while i < total:
                if len(datas[i]) > limit:
                    self._put_big(items[i], datas[i], block, deadline)
                    i = put = i + 1
                    continue
                j = i + 1
                while j < total and len(datas[j]) <= limit:
                    j += 1
                run = datas[i:j] if i or j < total else datas
                done = main.try_write_many(run)
                while done < len(run):
                    put = i + done
                    if not block:
                        raise Full(f"queue {self.name!r} is full")
                    nbytes = len(run[done])
                    self._wait_for_room(main, lambda: main.can_write(nbytes), deadline)
                    done += main.try_write_many(run[done:])
                i = put = j
        except Full:
            raise Full(f"queue {self.name!r} is full: {put} of {total} items were put") from None
        except Exception:
            if self._closed:
                raise self._closed_error() from None
            raise

    def _put_long(self, obj: Any, data: Any, block: bool, timeout: Optional[float]) -> None:
        """``put``'s way out for a record longer than a quarter of the ring
        (or LARGE: ``obj`` has a large buffer)."""
        try:
            self._put_big(obj, data, block, deadline_for_mp(timeout) if block else None)
        except Exception:
            if self._closed:
                raise self._closed_error() from None
            raise

    def _put_full(self, data: Any, block: bool, timeout: Optional[float]) -> None:
        """``put``'s way out when the ring had no room for the record."""
        try:
            self._write_record(data, block, deadline_for_mp(timeout) if block else None)
        except Exception:
            if self._closed:
                raise self._closed_error() from None
            raise

    def _write_record(self, data: Any, block: bool, deadline: Optional[float]) -> None:
        """Write ``data`` as one record of the main ring, waiting for room
        (until ``deadline``) if ``block``.  Raises Full."""
        ring = self._ring
        nbytes = len(data)
        while not self._try_write(data):
            if not block:
                raise Full(f"queue {self.name!r} is full")
            self._wait_for_room(ring, lambda: ring.can_write(nbytes), deadline)

    def _wait_for_room(self, ring: Ring, room: Callable[[], bool], deadline: Optional[float]) -> None:
        """Wait until ``room()`` (checked after a write found no room).
        Raises Full once ``deadline`` has passed, BrokenError if ``ring``'s
        indices are corrupt (which could make ``room()`` and the write
        disagree forever)."""
        if deadline is not None and _monotonic() >= deadline:
            raise Full(f"queue {self.name!r} is full")
        check_ring(ring)
        ring._block_writing(room, deadline)

    def _put_big(self, obj: Any, data: Any, block: bool, deadline: Optional[float]) -> None:
        """Put ``obj``, whose first pass gave ``data``: a record too long for
        the ring, or LARGE (it has a large buffer)."""
        if self._loans:
            loan = self._loans.get(id(obj))
            if loan is not None and loan.ref() is obj:
                if loan.index >= 0 or loan.sent or loan.pid != os.getpid():
                    self._put_loaned(loan, block, deadline)
                    return
                # A loan no slot was free for (loan_array): put like any array.
                self._put_copied(obj, data, block, deadline)
                loan.sent = True
                obj.flags.writeable = False
                return
        self._put_copied(obj, data, block, deadline)

    def _put_copied(self, obj: Any, data: Any, block: bool, deadline: Optional[float]) -> None:
        """``_put_big`` for anything but a loaned array: copied into slots, or
        through the ring or the side path."""
        if self._pooled_puts and data is not _LARGE and C._torch.holds_tensor(obj):
            data = _LARGE  # torch tensors go to the codec, which moves them as arrays (shmq/_torch.py)
        if self._pooled_puts and (data is _LARGE or type(obj) in _RAW_TYPES):
            data, lease = self._encode_pooled(obj, data, block, deadline)
            if lease is not None:
                self._send_leased(data, lease, block, deadline)
                return
        elif data is _LARGE:
            data = C.pickle_in_band(obj)
        if len(data) <= self._inline_max:
            self._write_record(data, block, deadline)
        else:
            self._put_large(data, block, deadline)

    def _encode_pooled(self, obj: Any, data: Any, block: bool, deadline: Optional[float]) -> tuple:
        """``(record, lease)``: a slot message and its Lease, or a plain
        record and None -- when no buffer fits a slot, when the object has
        more large buffers than the pool has slots, or when no slot frees up
        but none holds an item still in the queue (see below).

        Back-pressure: with no free slot, ``put`` waits for one (Full when
        ``timeout`` expires, at once if not ``block``) as long as some slot
        holds an item still in the queue (``SlotPool.in_transit``): consumers
        will take it.  Slots that are all out of the queue -- held by
        receivers' arrays (a consumer keeping every item it got, say), or
        returned to a producer that has not put since (only the producer that
        sent a slot frees it) -- may never come back while this producer
        waits, so the item is copied through the ring or the side path
        instead, where back-pressure still applies: after ``_POOL_GRACE``
        seconds, or at once if not ``block`` or if nothing in the pool moved
        since this handle last did so."""
        if data is not _LARGE:  # a top-level bytes or bytearray
            if not ZERO_COPY_THRESHOLD <= len(obj) <= (self._slot_size or 1 << 62):
                return data, None
        codec = self._codec
        if codec is None:
            try:
                codec = self._open_codec(obj)
            except SharedMemoryFull:
                # No room in /dev/shm for the pool: this handle copies, as
                # with zero_copy=False (and the next handle tries again).
                self._pooled_puts = False
                return (C.pickle_in_band(obj) if data is _LARGE else data), None
            if data is not _LARGE and len(obj) > self._slot_size:
                return data, None
        if self._consumer_pid != os.getpid():
            self._note_consumer()
        pool = codec.pool
        started = _monotonic()
        while True:
            if not pool.return_queue_intact():
                raise BrokenError(f"the slot pool of queue {self.name!r} is corrupt (its return queue indices)")
            if not block:
                wait = 0.0
            elif deadline is None:
                wait = _POOL_SLICE
            else:
                wait = max(0.0, min(_POOL_SLICE, deadline - _monotonic()))
            try:
                return codec.encode(obj, wait)
            except Full:
                pass
            except MessageTooLarge:  # more large buffers than the pool has slots
                break
            in_transit, signature = pool.in_transit()
            now = _monotonic()
            if not in_transit and (not block or signature == self._stuck_pool or now - started >= _POOL_GRACE):
                self._stuck_pool = signature
                break
            if not block or (deadline is not None and now >= deadline):
                raise Full(f"queue {self.name!r} is full: no free slot for a large buffer") from None
        return (C.pickle_in_band(obj) if data is _LARGE else data), None

    # -- loans ----------------------------------------------------------
    def loan_array(
        self, shape: Union[int, Sequence[int]], dtype: Any = float, timeout: Optional[float] = None
    ) -> np.ndarray:
        """A writable C-contiguous numpy array of ``shape`` and ``dtype``
        living in a free slot of the queue's pool (made now if no put made
        it yet, with slots fitted to this array), to fill in place and hand
        to :meth:`put`, which then sends only the slot's number: no copy.
        The consumer gets the same read-only view a put of an ordinary large
        array gives.

        After ``put(array)`` the array belongs to the consumers: it turns
        read-only, must not be touched again (its slot is reused for later
        items), and putting it again raises SlotError.  An array dropped
        without being put gives its slot back.  Only the array itself, put
        on its own, travels without a copy (a view of it, or a tuple holding
        it, is copied like any other array).

        Waits up to ``timeout`` seconds for a free slot (None: as long as it
        takes; negative: not at all, as ``multiprocessing`` has it), with the
        rule of an ordinary put (docs/queue.md): while no slot holds an item
        still in the queue -- every slot is held by consumers' arrays, or was
        returned to another producer that has not put since, and may not
        come back while we wait -- the array is a private one after
        0.2 s (at once with a negative timeout), which ``put`` copies like
        any other.

        Raises Full (queue.Full) if no slot frees up in time,
        MessageTooLarge if the array can never fit a slot of the pool,
        ValueError for an array of fewer than ZERO_COPY_THRESHOLD bytes (put
        such an array directly: it travels inside its record) or a bad
        shape, TypeError for a dtype of Python objects, SlotError if the
        queue was made with ``zero_copy=False``, ClosedError if this handle
        is closed."""
        if self._closed:
            raise self._closed_error()
        nbytes, shape, dtype, header = C.array_spec(shape, dtype)
        if nbytes < ZERO_COPY_THRESHOLD:
            raise ValueError(
                f"a loaned array must have at least {ZERO_COPY_THRESHOLD} bytes, got {nbytes}: "
                "put a smaller array directly (it travels inside its record)"
            )
        if not self._zero_copy:
            raise SlotError(f"queue {self.name!r} was made with zero_copy=False: it has no slot pool to loan from")
        codec = self._codec
        if codec is None:
            codec = self._open_codec(largest=nbytes)
        pool = codec.pool
        if pool is None or not self._pooled_puts:
            raise SlotError(f"queue {self.name!r} has no slot pool to loan from (no room in /dev/shm for it)")
        if nbytes > pool.slot_size:
            raise MessageTooLarge(
                f"an array of {nbytes} bytes can never fit a slot of queue {self.name!r} ({pool.slot_size} bytes)"
            )
        if self._consumer_pid != os.getpid():
            self._note_consumer()
        deadline = deadline_for_mp(timeout)
        started = _monotonic()
        try:
            while True:
                if not pool.return_queue_intact():
                    raise BrokenError(f"the slot pool of queue {self.name!r} is corrupt (its return queue indices)")
                wait = _POOL_SLICE if deadline is None else max(0.0, min(_POOL_SLICE, deadline - _monotonic()))
                try:
                    (index,) = pool.allocate(1, wait)
                    break
                except Full:
                    pass
                if self._closed:
                    raise self._closed_error() from None
                # The rule of _encode_pooled: slots all out of the queue may never come back.
                in_transit, signature = pool.in_transit()
                now = _monotonic()
                once = deadline is not None and deadline <= started
                if not in_transit and (once or signature == self._stuck_pool or now - started >= _POOL_GRACE):
                    self._stuck_pool = signature
                    return self._private_loan(shape, dtype, nbytes, header)
                if deadline is not None and now >= deadline:
                    raise Full(f"queue {self.name!r} is full: no free slot to loan") from None
        except Exception:
            if self._closed:
                raise self._closed_error() from None
            raise
        try:
            # Over a uint8 array that holds the view: the mapping stays while
            # the array lives (np.ndarray over the view would keep only the
            # mmap, without an export: a close would unmap it under the array).
            array = np.ndarray(shape, dtype, np.frombuffer(pool.view(index, nbytes), np.uint8))
            loan = _Loan(index, nbytes, header, pool, pool.epoch)
            key = id(array)
            loans = self._loans
            loan.ref = weakref.ref(array, lambda ref, key=key, loans=loans: _loan_dropped(loans, key))
            loans[key] = loan
        except BaseException:
            pool.abort([index])
            raise
        return array

    def _private_loan(self, shape: tuple, dtype: np.dtype, nbytes: int, header: tuple) -> np.ndarray:
        """A loan no slot is free for: a private array, copied when put."""
        array = np.empty(shape, dtype)
        loan = _Loan(-1, nbytes, header, None, 0)
        key = id(array)
        loans = self._loans
        loan.ref = weakref.ref(array, lambda ref, key=key, loans=loans: _loan_dropped(loans, key))
        loans[key] = loan
        return array

    def _put_loaned(self, loan: "_Loan", block: bool, deadline: Optional[float]) -> None:
        """Send the slot of a loaned array (``put``'s way for one)."""
        if loan.sent:
            raise SlotError(f"this loaned array (slot {loan.index}) was already put: loan a new one for each item")
        if loan.pid != os.getpid():
            raise SlotError(f"this array was loaned in process {loan.pid}: a loan is put by the process that made it")
        pool = loan.pool
        codec = self._codec
        if codec is None or pool is not codec.pool:
            raise SlotError(f"this array was loaned by another handle of queue {self.name!r}: put it through that one")
        fence = codec.fence
        data = C.loan_message(pool, loan.index, loan.nbytes, array=loan.header, fenced=fence is not None)
        try:
            self._write_record(data, block, deadline)
        except BaseException:
            pool.unsend((loan.index,))  # the loan stays open: put again, or drop the array
            raise
        loan.sent = True
        array = loan.ref()
        if array is not None:
            array.flags.writeable = False  # the slot belongs to the consumers now
        if fence is not None:
            pool.set_fence((loan.index,), fence.position())

    def _send_leased(self, data: Any, lease: C.Lease, block: bool, deadline: Optional[float]) -> None:
        """Write the slot message ``data``, then tell its lease."""
        try:
            if len(data) <= self._inline_max:
                self._write_record(data, block, deadline)
                fenced = True
            else:  # a large in-band part too (a buffer larger than a slot, say)
                self._put_large(data, block, deadline)
                fenced = False
        except BaseException:
            lease.abort()
            raise
        if fenced:
            lease.sent()
        else:
            # In a blob, the message leaves the side ring only once a consumer
            # decoded it, so the main ring's position says nothing about it:
            # no fence (the orphan rule never applies; see docs/zero_copy.md).
            lease.pool.set_fence(lease.indices, 0)

    def _open_codec(self, first: Any = None, largest: Optional[int] = None) -> C.Codec:
        """This handle's codec, with the queue's slot pool (attached, or
        created if nobody did yet, with slots sized for ``first``, the object
        being put, or for ``largest`` bytes); for decoding, any handle may need it."""
        with self._zc_lock:
            codec = self._codec
            if codec is None:
                pool = None
                if self._zero_copy:
                    owner = self._owner_pid == os.getpid()
                    pool = open_pool(self._ring, self._side.ring, first, owner, largest=largest)
                    self._slot_size = pool.slot_size
                try:
                    codec = C.Codec(pool, ring=self._ring, threshold=ZERO_COPY_THRESHOLD, exact_types=True)
                except BaseException:
                    if pool is not None:
                        pool.close()
                    raise
                self._zc[:] = [codec, pool]
                self._pool = pool
                self._codec = codec
            return codec

    def _put_large(self, data: Any, block: bool, deadline: Optional[float]) -> None:
        """Put the record ``data`` through the side path (``shmq._side``)."""
        side = self._side
        nbytes = len(data)

        def room() -> bool:
            return side.room_for(nbytes)

        # Wait before making the blob, so a producer blocked here holds nothing.
        while not room():
            if not block:
                raise Full(f"queue {self.name!r} is full")
            self._wait_for_side(deadline, room)
        blob = side.make_blob(data)
        try:
            while not side.try_publish(blob):
                if not block:
                    raise Full(f"queue {self.name!r} is full")
                self._wait_for_side(deadline, room)
        except BaseException:
            side.discard(blob)  # (unless published: then it is the consumers')
            raise

    def _wait_for_side(self, deadline: Optional[float], room: Callable[[], bool]) -> None:
        ring = self._ring if not self._ring.can_write(0) else self._side.ring
        check_ring(self._side.ring)
        self._wait_for_room(ring, room, deadline)

    # -- getting ----------------------------------------------------------
    def get(self, block: bool = True, timeout: Optional[float] = None) -> Any:
        """Remove and return the oldest item, waiting (up to ``timeout``
        seconds) for one if ``block``.  Raises queue.Empty (shmq.Empty)."""
        # (Run by a subclass's super().get, on a closed handle, and with
        # records in the stash: an open handle's get is self._fast_get.)
        if self._closed:
            raise self._closed_error()
        data = self._try_read()
        if data:
            try:
                return _decode(data)
            except Exception as exc:
                return self._decode_other(data, exc)
        return self._get_slow(data, block, timeout)

    def _get_stashed(self, block: bool, timeout: Optional[float]) -> Any:
        return _QueueBase.get(self, block, timeout)  # the method: _try_read is _pop_stash

    def get_nowait(self) -> Any:
        """``get(False)``."""
        return self.get(False)

    def _get_slow(self, data: Optional[bytes], block: bool, timeout: Optional[float]) -> Any:
        """``get``'s way out: ``data`` is None (the ring was empty), b"" (a
        marker: the item is on the side path) or a record to decode."""
        deadline = deadline_for_mp(timeout) if block else None
        try:
            while True:
                if data:
                    return self._decode_record(data)
                if data is not None or self._side.orphan_waiting():  # a marker, or a large item left behind
                    obj = self._take_side()
                    if obj is not NOTHING:
                        return obj
                    self._check_progress(deadline)
                elif not block:
                    raise Empty(f"queue {self.name!r} is empty")
                else:
                    self._ring._block_reading(deadline, self._readable)
                data = self._try_read()
        except Exception:
            if self._closed:
                raise self._closed_error() from None
            raise

    def _check_progress(self, deadline: Optional[float]) -> None:
        """After a marker whose item another consumer took: raise Empty once
        ``deadline`` has passed, BrokenError if the main ring's indices are
        corrupt (a loop reading garbage as markers would never end)."""
        check_ring(self._ring)
        if deadline is not None and _monotonic() >= deadline:
            raise Empty(f"queue {self.name!r} is empty")

    def get_many(self, max_items: int = 1 << 30, block: bool = True, timeout: Optional[float] = None) -> List[Any]:
        """Remove and return up to ``max_items`` items (at least one: waits
        like ``get``), taking their records at once."""
        if self._closed:
            raise self._closed_error()
        if max_items < 1:
            raise ValueError(f"'max_items' must be at least 1, got {max_items!r}")
        deadline = deadline_for_mp(timeout) if block else None
        try:
            check_ring(self._ring)  # (a corrupt HEAD or TAIL would make the batch endless)
            records = self._try_read_many(max_items)
            while True:
                if records:
                    out = self._decode_batch(records)
                    if out:
                        return out
                    self._check_progress(deadline)
                elif self._side.orphan_waiting():
                    obj = self._take_side()
                    if obj is not NOTHING:
                        return [obj]
                    self._check_progress(deadline)
                elif not block:
                    raise Empty(f"queue {self.name!r} is empty")
                else:
                    self._ring._block_reading(deadline, self._readable)
                check_ring(self._ring)
                records = self._try_read_many(max_items)
        except Exception:
            if self._closed:
                raise self._closed_error() from None
            raise

    def _decode_batch(self, records: Sequence[Any]) -> List[Any]:
        """Unpickle ``records``.  A large item is returned only first in a
        batch; the records not returned are kept for this handle's next get."""
        out: List[Any] = []
        i, n = 0, len(records)
        try:
            while i < n:
                rec = records[i]
                if rec:
                    try:
                        out.append(_decode(rec))
                    except Exception as exc:
                        out.append(self._decode_other(rec, exc))
                elif out:
                    break  # a large item: it starts the next batch
                else:
                    obj = self._take_side()
                    if obj is not NOTHING:
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

    def _decode_record(self, data: Any) -> Any:
        try:
            return _decode(data)
        except Exception as exc:
            return self._decode_other(data, exc)

    def _decode_other(self, data: Any, exc: Exception) -> Any:
        """A record ``_decode`` refused with ``exc``: a slot message, or one
        decoded ahead (``_Ready``); any other record raises ``exc``."""
        if type(data) is not _Ready and data[:3] != C.MAGIC:
            raise exc
        try:
            if type(data) is _Ready:
                return data.get()
            codec = self._codec or self._open_codec()
            return codec.decode(data)
        except Exception as error:
            raise error from None  # not "during handling of" pickle's refusal

    def _decode_ahead(self, rec: Any) -> Any:
        if rec and type(rec) is not _Ready and rec[:3] == C.MAGIC:
            try:
                return _Ready(self._decode_record(rec))
            except Exception as exc:
                return _Ready(None, exc)
        return rec

    def _stash_records(self, records: Sequence[Any]) -> None:
        if records:
            if self._zero_copy:
                # Decode slot messages now: a message read but not decoded for
                # long may be taken for an orphan once some consumer died.
                records = [self._decode_ahead(rec) for rec in records]
            self._stash.extendleft(reversed(records))
            self._reset_readers()

    def _pop_stash(self) -> Optional[bytes]:
        stash = self._stash
        rec = stash.popleft() if stash else None
        if not stash:
            self._reset_readers()
        return self._try_read() if rec is None else rec

    def _pop_stash_many(self, max_items: int) -> List[Any]:
        stash = self._stash
        out = [stash.popleft() for _ in range(min(max_items, len(stash)))]
        if not stash:
            self._reset_readers()
        return out or self._try_read_many(max_items)

    def _reset_readers(self) -> None:
        """Point ``_try_read``/``_try_read_many`` at the stash if it holds
        records, else at the ring.  (The ring lists this process as a consumer
        before its first record is taken: the orphan rule of docs/zero_copy.md.)"""
        if self._stash:
            self._try_read = self._pop_stash
            self._try_read_many = self._pop_stash_many
        else:
            self._try_read = self._ring.try_read
            self._try_read_many = self._ring.try_read_many

    def _note_consumer(self) -> None:
        """List this process in the main ring as a writer of slot messages:
        if it dies between allocating slots and writing its message, the pool
        frees them by the orphan rule (as for a consumer that dies)."""
        self._ring.segment.add_role(L.ROLE_SLOT_WRITER)
        self._consumer_pid = os.getpid()

    def _readable(self) -> bool:
        """What a blocked get waits for (also true once the handle is closed,
        so that a thread blocked in get raises ClosedError within a slice)."""
        return self._closed or self._ring.can_read() or self._side.orphan_waiting()

    def _take_side(self) -> Any:
        """Take the oldest large item (``shmq._side``); NOTHING if another
        consumer took it."""
        try:
            return self._side.take(self._decode_record)
        except SlotError:
            # A slot message whose slots are no longer in flight: a consumer
            # killed while decoding it had acquired them (the item went with
            # it, as a small item goes with a consumer killed after reading
            # it), and they were freed since.
            return NOTHING

    # -- state --------------------------------------------------------------
    def qsize(self) -> int:
        """Items in the queue now, exact (read from the shared counters)."""
        if self._closed:
            raise self._closed_error()
        return self._ring.qsize() + len(self._stash)

    def empty(self) -> bool:
        """``qsize() == 0``."""
        if self._closed:
            raise self._closed_error()
        return not self._stash and self._ring.qsize() == 0

    def full(self) -> bool:
        """True when ``maxsize`` items are held, or the ring has no byte left."""
        if self._closed:
            raise self._closed_error()
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
        if self._closed:
            raise self._closed_error()
        return self._ring.statistics()

    # -- lifetime -------------------------------------------------------------
    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Close this handle (idempotent).  Other handles and processes are
        unaffected; in the creating process, closing the last handle unlinks
        the queue.  Afterwards every method but ``close``, ``unlink``,
        ``join_thread`` and ``cancel_join_thread`` raises ClosedError, also
        in threads blocked in ``get`` or ``put`` (within 20 ms)."""
        if self._closed:
            return
        self._closed = True
        self._stash.clear()
        self._stash.append(_CLOSED_MARK)
        self.__dict__.pop("put", None)
        self.__dict__.pop("get", None)
        _live.discard(self)
        self._finalizer()

    def join_thread(self) -> None:
        """No-op: there is no feeder thread to wait for."""

    def cancel_join_thread(self) -> None:
        """No-op: there is no feeder thread; a process never waits at exit."""

    def unlink(self) -> None:
        """Remove the queue's names (its rings, its slot pool and any large
        item not yet taken) for every process.  Open handles keep working on what they have
        mapped.  The creating process does this when its last handle closes."""
        with _owner_lock:
            _owner_handles.pop(self.name, None)
        cancel_at_exit(self.name)
        _unlink_queue(self._ring, self._side.ring)

    def __enter__(self):
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        kind = type(self).__name__
        if self._closed:
            return f"<shmq.{kind} {self.name!r} closed>"
        return f"<shmq.{kind} {self.name!r} {self.qsize()} items>"


class Queue(_QueueBase):
    """``Queue(maxsize=0, *, capacity_bytes=1 MiB, name=None, side_capacity_bytes=None,
    zero_copy=True, slot_size=None, slot_count=8)``

    A process-shared FIFO queue: ``multiprocessing.Queue``'s API on a
    shared-memory ring.  ``maxsize`` > 0 limits the number of items;
    ``capacity_bytes`` is the ring's size (small items are stored in it, so it
    also bounds the queue); items whose pickle exceeds a quarter of it go
    through the side path, at most ``side_capacity_bytes`` of them in flight
    (default: the larger of 64 MiB and 16 x ``capacity_bytes``).  ``name``
    picks the shared-memory name (``Queue.attach(name)`` from anywhere).

    Large buffers (numpy arrays, bytes, protocol-5 out-of-band buffers of 64
    KiB up to ``slot_size``) travel through a pool of ``slot_count`` slots,
    made on the first one (``slot_size=None``: slots the size of that first
    large buffer, rounded up to a power of two, at least 1 MiB, the pool at
    most 512 MiB and a quarter of the free /dev/shm): the receiver gets
    read-only arrays over the slot, which returns when the last view of it
    dies.  ``zero_copy=False`` pickles
    them into the ring like any object (private, writable arrays).
    """

    _KIND = L.QUEUE_KIND_QUEUE


class JoinableQueue(Queue):
    """A Queue that also counts unfinished tasks: ``task_done()`` and
    ``join()``, as ``multiprocessing.JoinableQueue``.  The count lives in
    shared memory: items put minus ``task_done()`` calls."""

    _KIND = L.QUEUE_KIND_JOINABLE

    def _open_semaphores(self, name: str, create: bool) -> list:
        return [P.semaphore(name + "-jd", create)]

    def _setup(self, main: Ring, side: SidePath, sems: list, owner_pid: int) -> None:
        super()._setup(main, side, sems, owner_pid)
        self._join_bell = Doorbell(sems[0], self._w, L.W_JOIN_WAITING)
        # Updates of TASKS_DONE borrow the side ring's producer lock: large
        # puts hold it for microseconds, nothing else takes it.
        self._task_lock = side.ring._plock

    def task_done(self) -> None:
        """Say one item taken with ``get`` has been processed.  Raises
        ValueError if called more times than items were put."""
        if self._closed:
            raise self._closed_error()
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
            self._join_bell.ring_all()

    def join(self, *, timeout: Optional[float] = None) -> bool:
        """Wait until every item put has been marked done with
        ``task_done()``.  Returns True, or False if ``timeout`` (seconds)
        expired first."""
        if self._closed:
            raise self._closed_error()
        w = self._w
        try:
            done = wait_until(
                lambda: self._closed or w[L.W_MSGS_IN] - w[L.W_TASKS_DONE] <= 0, self._join_bell, deadline_for_mp(timeout)
            )
            if self._closed:
                raise self._closed_error()
            return done
        except Exception:
            if self._closed:
                raise self._closed_error() from None
            raise


class SimpleQueue(_QueueBase):
    """``SimpleQueue(*, capacity_bytes=1 MiB, name=None, side_capacity_bytes=None,
    zero_copy=True, slot_size=None, slot_count=8)``

    ``multiprocessing.SimpleQueue``'s ``put(obj)``, ``get()``, ``empty()``,
    ``close()`` (and the rest of Queue's methods, ``maxsize`` aside)."""

    _KIND = L.QUEUE_KIND_SIMPLE

    def __init__(
        self,
        *,
        capacity_bytes: int = DEFAULT_CAPACITY_BYTES,
        name: Optional[str] = None,
        side_capacity_bytes: Optional[int] = None,
        zero_copy: bool = True,
        slot_size: Optional[int] = None,
        slot_count: int = DEFAULT_SLOT_COUNT,
    ) -> None:
        super().__init__(
            0,
            capacity_bytes=capacity_bytes,
            name=name,
            side_capacity_bytes=side_capacity_bytes,
            zero_copy=zero_copy,
            slot_size=slot_size,
            slot_count=slot_count,
        )


_KINDS = {L.QUEUE_KIND_QUEUE: Queue, L.QUEUE_KIND_JOINABLE: JoinableQueue, L.QUEUE_KIND_SIMPLE: SimpleQueue}


def _attach(name: str) -> _QueueBase:
    """Unpickle a queue handle: attach by name, as the class it was created as."""
    return _QueueBase.attach(name)
