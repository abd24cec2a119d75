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

Large buffers (zero copy)
    An object carrying buffers of at least ``ZERO_COPY_THRESHOLD`` (64 KiB)
    and at most the pool's slot size -- numpy arrays anywhere in it, anything
    with pickle protocol-5 out-of-band buffers, a top-level bytes-like -- is
    encoded by ``shmq._codec``: each such buffer is copied once into a slot
    of the queue's *slot pool* and the record carries the slot references
    (docs/zero_copy.md).  The receiver gets read-only arrays over the slots,
    copying nothing; a slot returns to its producer when the last view of it
    dies.  The first pickling pass tells the two kinds apart at no cost to
    small objects: its buffer callback stops it at the first large buffer.
    The pool is created on the first large buffer, by whichever process puts
    it, under the main ring's admin lock; its name goes in the side ring's
    header.  A full pool makes ``put`` wait like a full queue, unless the
    slots are held by receivers rather than queued (see ``_encode_pooled``):
    the item is then copied through the ring or the side path instead.

Lifetime
    The process that creates a queue owns its names: it unlinks the main
    ring, the side ring, the slot pool and any blob of the queue when the
    last handle it holds is closed (or garbage collected), and at exit.  Other
    processes only close their handles (a pool one of them creates is
    attributed to the queue's creator, like a blob).  A handle pickles as the
    queue's name.
"""
from __future__ import annotations

import os
import pickle
import secrets
import sys
import threading
import time
import types
import weakref
from collections import deque
from typing import Any, Deque, Dict, Iterable, List, Optional, Sequence

from . import _codec as C
from . import _layout as L
from . import _platform as P
from ._copy import copy_into
from ._errors import BrokenError, Empty, Full, LayoutError, MessageTooLarge, SharedMemoryFull, SlotError
from ._ring import DEFAULT_CAPACITY_BYTES, _closed_class
from ._segment import Segment
from ._slots import SlotPool
from ._stats import RingStatistics
from ._sync import Doorbell
from ._wait import wait_until
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
#: Defaults of the slot pool for large buffers, made on the first one.  With
#: ``slot_size=None`` (the default) a slot is the first large buffer's size
#: rounded up to a power of two, at least DEFAULT_SLOT_SIZE; the pool reserves
#: at most AUTO_POOL_BYTES and a quarter of the free space of /dev/shm, with
#: fewer slots if need be (at least 2; else DEFAULT_SLOT_SIZE slots).
DEFAULT_SLOT_SIZE = 1 << 20
DEFAULT_SLOT_COUNT = 8
AUTO_POOL_BYTES = 512 << 20
#: Buffers at least this large travel through a slot; smaller ones in the pickle.
ZERO_COPY_THRESHOLD = C.DEFAULT_THRESHOLD

_PROTOCOL = 5
_SIDE_RING_BYTES = 16 << 10  # about 400 large items in flight
_DESC_BYTES = 8 + P.MAX_NAME_LENGTH  # side record: payload length + blob name
_SIDE_NAME_OFFSET = L.W_SIDE_NAME * L.WORD
_POOL_NAME_OFFSET = L.W_POOL_NAME * L.WORD
_MAX_SLOT_COUNT = 4096
_POOL_MEMBERS = 128  # processes using one queue's pool at once
# A put finding no free slot waits in slices of _POOL_SLICE; after _POOL_GRACE
# it copies instead if some slots are out of the queue (see _encode_pooled).
_POOL_SLICE = 0.05
_POOL_GRACE = 0.2
_RAW_TYPES = (bytes, bytearray)
_MAGIC = C.MAGIC
_NOTHING = object()

_monotonic = time.monotonic
_dumps = pickle.dumps


# -- serialisation ---------------------------------------------------------------
# put pickles once with _oob as the buffer callback (inlined there; _encode for
# put_many).  An object without a large buffer gets its plain pickle, the
# record; one with a large buffer gets _LARGE and is encoded again by the slot
# codec (or plainly, with zero_copy=False).  get unpickles a record with
# _decode; a slot message (it starts with MAGIC, which pickle refuses at once)
# goes to the codec.


class _LargeBuffer(Exception):
    """Raised by _oob to stop the first pickling pass."""


def _oob(buf: pickle.PickleBuffer) -> bool:
    """Buffer callback of the first pass: a small (or non-contiguous) buffer
    stays in the pickle; a large one stops the pass, before it is copied."""
    try:
        with buf.raw() as m:
            large = m.nbytes >= ZERO_COPY_THRESHOLD
    except BufferError:  # not contiguous: pickled in-band
        return True
    if large:
        raise _LargeBuffer
    return True


def _out_of_band(buf: pickle.PickleBuffer) -> bool:
    return False


class _Deferred:
    """What the first pass gives for an object with a large buffer: longer
    than any record, so ``put``'s one length test sends it off the fast path."""

    __slots__ = ()

    def __len__(self) -> int:
        return sys.maxsize

    def __repr__(self) -> str:
        return "<an object with large buffers>"


_LARGE = _Deferred()


def _encode(obj: Any) -> Any:
    """The bytes-like record for ``obj`` -- its pickle (protocol 5), made in
    the caller so a pickling error raises from ``put`` -- or _LARGE if it
    carries a large buffer (checked picklable, then encoded later by
    ``_put_big``).  Objects only ``multiprocessing``'s pickler knows
    (connections, sockets) work too."""
    try:
        return _dumps(obj, _PROTOCOL, buffer_callback=_oob)
    except _LargeBuffer:
        C._pickle(obj, _out_of_band)  # raises its pickling error now; copies no buffer
        return _LARGE
    except Exception as exc:
        return _encode_other(obj, exc)


def _encode_error(obj: Any, exc: Exception) -> Any:
    """The record for ``obj`` when the first pass raised ``exc``."""
    return _LARGE if type(exc) is _LargeBuffer else _encode_other(obj, exc)


def _encode_other(obj: Any, exc: Exception) -> Any:
    """The first pass failed with ``exc``."""
    if type(obj) is memoryview:
        return _LARGE  # the codec sends a large one as raw bytes; pickle takes none
    return _forking_dumps(obj, exc)


def _encode_plain(obj: Any) -> Any:
    """The protocol-5 pickle of ``obj`` with every buffer in it."""
    try:
        return _dumps(obj, _PROTOCOL)
    except Exception as exc:
        return _forking_dumps(obj, exc)


def _forking_dumps(obj: Any, exc: Exception) -> Any:
    from multiprocessing.reduction import ForkingPickler

    try:
        return ForkingPickler.dumps(obj, _PROTOCOL)
    except Exception:
        raise exc from None


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


def _pool_state(pool: SlotPool) -> tuple:
    """``(queued, signature)`` of ``pool``: whether some slot holds an item
    still in the queue (sent and not yet acquired by every receiver it was
    sent to, or loaned: being written), and a value that changes whenever
    any slot changes hands.  Reads the pool's tables (see _layout); writes
    nothing."""
    w = pool.segment.words
    n = w[L.W_SLOT_COUNT]
    slots = w[L.W_SLOT_TABLE] >> 3
    holds = w[L.W_HOLD_TABLE] >> 3
    members = min(w[L.W_MEMBERS_HIGH], w[L.W_MAX_MEMBERS])
    mask = L.HOLD_RELEASED_MASK
    queued = False
    signature = []
    for i in range(n):
        s = slots + i * L.SLOT_WORDS
        state = w[s + L.S_STATE]
        acquired = released = 0
        for m in range(members):
            v = w[holds + m * n + i]
            acquired += v >> 32
            released += v & mask
        signature.append((state, w[s + L.S_GEN], acquired, released))
        if state == L.SLOT_LOANED or (state == L.SLOT_SENT and acquired < w[s + L.S_DELIVERIES]):
            queued = True
    return queued, tuple(signature)


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
        q._zc_lock = threading.Lock()
        if q._stash:  # records the parent took: they are the parent's to return
            q._stash.clear()
            q._reset_readers()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def _largest_buffer(obj: Any) -> int:
    """Bytes in the largest buffer ``obj`` pickles out of band (or its length,
    for a bytes-like); 0 if none."""
    if type(obj) in _RAW_TYPES:
        return len(obj)
    largest = 0

    def measure(buf: pickle.PickleBuffer) -> bool:
        nonlocal largest
        try:
            with buf.raw() as m:
                largest = max(largest, m.nbytes)
        except BufferError:
            pass
        return False  # out of band: measured, not copied

    try:
        C._pickle(obj, measure)  # (the codec's pickling: torch tensors as arrays)
    except Exception:
        pass
    return largest


def _fitted_geometry(largest: int, slot_count: int, shm_free: Optional[int]) -> tuple:
    """Slots of ``largest`` bytes rounded up to a power of two (at least
    DEFAULT_SLOT_SIZE), ``slot_count`` of them or as many as the budget allows:
    AUTO_POOL_BYTES and a quarter of ``shm_free``.  Below 2 slots of that size,
    DEFAULT_SLOT_SIZE slots (the large buffer then takes the side path)."""
    size = max(DEFAULT_SLOT_SIZE, 1 << max(largest - 1, 0).bit_length())
    budget = AUTO_POOL_BYTES if shm_free is None else min(AUTO_POOL_BYTES, shm_free // 4)
    count = min(slot_count, budget // size)
    if count >= min(2, slot_count):
        return size, count
    return DEFAULT_SLOT_SIZE, slot_count


def _pool_name(side_name: str) -> str:
    """The name of a queue's slot pool: its side ring's, ending in "p"."""
    return side_name[:-1] + "p"


def _unlink_queue(main: Ring, side: Ring, blob_prefix: str) -> None:
    main.unlink()
    side.unlink()
    for name in P.list_shm_names():
        if name.startswith(blob_prefix):
            P.shm_unlink(name)
    P.shm_unlink(_pool_name(side.name))  # last: see _QueueBase._create_pool


def _release_handle(main: Ring, side: Ring, owner_pid: int, blob_prefix: str, zc: list) -> None:
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
            _unlink_queue(main, side, blob_prefix)
    codec, pool = zc
    zc[:] = [None, None]
    if codec is not None:
        codec.close()
    if pool is not None:
        pool.close()  # (the mapping stays while received arrays view it)
    side.close()
    main.close()


def _deadline(timeout: Optional[float]) -> Optional[float]:
    # multiprocessing.Queue treats a negative timeout as 0.
    return None if timeout is None else _monotonic() + max(timeout, 0.0)


def _load_blob(name: str, nbytes: int, queue_name: str, decode) -> Any:
    try:
        seg = Segment.attach(name, L.KIND_BLOB)
    except FileNotFoundError as exc:
        raise BrokenError(
            f"a large item of queue {queue_name!r} is gone: {name!r} was removed (was the queue unlinked?)"
        ) from exc
    try:
        with seg.buf[L.DATA_OFFSET : L.DATA_OFFSET + nbytes] as view:
            return decode(view)
    finally:
        seg.close()


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
        for arg, value, high in (("slot_size", slot_size, 1 << 40), ("slot_count", slot_count, _MAX_SLOT_COUNT)):
            if value is None and arg == "slot_size":
                continue
            if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= high:
                raise ValueError(f"'{arg}' must be an int between 1 and {high}, got {value!r}")
        # slot size 0: chosen when the pool is made (_pool_geometry)
        pool_config = slot_count << L.POOL_COUNT_SHIFT | (slot_size or 0) if zero_copy else 0
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
            main.segment.words[L.W_POOL_CONFIG] = pool_config
            main.segment.words[L.W_QUEUE_KIND] = self._KIND  # last: attach() waits for it
            self._setup(main, side, sems, os.getpid())
            with _owner_lock:
                _owner_handles[main.name] = 1
        except BaseException:
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
        config = self._w[L.W_POOL_CONFIG]
        self._zero_copy = config != 0
        self._pooled_puts = self._zero_copy  # large buffers go to the pool when put
        self._slot_size = config & ((1 << L.POOL_COUNT_SHIFT) - 1)  # 0: not known before the pool is open
        self._slot_count = config >> L.POOL_COUNT_SHIFT
        self._owner_pid = owner_pid
        self._zc: list = [None, None]  # [codec, pool], for the finalizer
        self._zc_lock = threading.Lock()
        self._consumer_pid = 0  # the process that listed itself as a consumer of the ring
        self._stuck_pool: Optional[tuple] = None  # the pool's state when a put last copied instead
        # Hot methods bound once: one lookup each on the put/get paths.
        self._try_write = main.try_write
        # put and get: the ring's closures with the pickling inlined (one
        # Python frame per item), bound to this handle over the methods below
        # unless a subclass overrides them.  (Bound methods pickle as the
        # handle's put and get; they make a reference cycle, which the garbage
        # collector takes care of for a handle dropped without close().)
        self._fast_put = main.encoding_writer(
            _dumps, _PROTOCOL, _oob, _encode_error, self._inline_max, _QueueBase._put_long, _QueueBase._put_wait
        )
        self._stash: Deque[Any] = deque()  # records get_many took but could not return
        self._fast_get = main.decoding_reader(
            _decode, _QueueBase._decode_other, _QueueBase._get_slow, self._stash, _QueueBase._get_stashed
        )
        for attr, fast in (("put", self._fast_put), ("get", self._fast_get)):
            method = getattr(_QueueBase, attr)
            fast.__name__, fast.__qualname__, fast.__doc__ = attr, method.__qualname__, method.__doc__
            if getattr(type(self), attr) is method:
                setattr(self, attr, types.MethodType(fast, self))
        self._reset_readers()
        # Threads of this process share the handle's reserve() (large puts)
        # and peek() (large gets) state: one of each at a time.
        self._put_tlock = threading.Lock()
        self._get_tlock = threading.Lock()
        self._closed = False
        self._finalizer = weakref.finalize(
            self, _release_handle, main, side, owner_pid, self._blob_prefix, self._zc
        )
        _live.add(self)

    def __reduce__(self):
        return (_attach, (self.name,))

    # -- putting ----------------------------------------------------------
    def put(self, obj: Any, block: bool = True, timeout: Optional[float] = None) -> None:
        """Put ``obj`` into the queue, waiting (up to ``timeout`` seconds) for
        room if ``block``.  Raises queue.Full (shmq.Full) if there is none;
        pickling errors raise here and leave the queue as it was."""
        # (the first pass of _encode, then the record, or _put_long)
        self._fast_put(self, obj, block, timeout)

    def put_nowait(self, obj: Any) -> None:
        """``put(obj, False)``."""
        self.put(obj, False)

    def put_many(self, items: Iterable[Any], block: bool = True, timeout: Optional[float] = None) -> None:
        """Put every item of ``items``, in order, publishing runs of small
        items at once.  Every item is pickled first, so a pickling error puts
        nothing.  Raises Full if ``timeout`` expires (the message says how
        many items were put: those before it)."""
        if not isinstance(items, (list, tuple)):
            items = list(items)
        try:  # no Python call per item while every item is small and plain
            datas = [_dumps(obj, _PROTOCOL, buffer_callback=_oob) for obj in items]
        except Exception:
            datas = [_encode(obj) for obj in items]
        main = self._ring
        limit = self._inline_max
        total = len(datas)
        deadline = _deadline(timeout) if block else None
        i = 0
        while i < total:
            if len(datas[i]) > limit:
                try:
                    self._put_big(items[i], datas[i], block, deadline)
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

    def _put_long(self, obj: Any, data: Any, block: bool, timeout: Optional[float]) -> None:
        self._put_big(obj, data, block, _deadline(timeout) if block else None)

    def _put_wait(self, data: Any, block: bool, timeout: Optional[float]) -> None:
        if not block:
            raise Full(f"queue {self.name!r} is full")
        # (multiprocessing.Queue treats a negative timeout as 0; Ring refuses it)
        self._ring.write(data, None if timeout is None else max(timeout, 0.0))

    def _put_big(self, obj: Any, data: Any, block: bool, deadline: Optional[float]) -> None:
        """Put ``obj``, whose first pass gave ``data``: a record too long for
        the ring, or _LARGE (it has a large buffer)."""
        if self._pooled_puts and data is not _LARGE and C._torch.holds_tensor(obj):
            data = _LARGE  # torch tensors go to the codec, which moves them as arrays (shmq/_torch.py)
        if self._pooled_puts and (data is _LARGE or type(obj) in _RAW_TYPES):
            data, lease = self._encode_pooled(obj, data, block, deadline)
            if lease is not None:
                self._send_leased(data, lease, block, deadline)
                return
        elif data is _LARGE:
            data = _encode_plain(obj)
        if len(data) <= self._inline_max:
            self._write_small(data, block, deadline)
        else:
            self._put_large(data, block, deadline)

    def _write_small(self, data: Any, block: bool, deadline: Optional[float]) -> None:
        if self._try_write(data):
            return
        if not block:
            raise Full(f"queue {self.name!r} is full")
        self._ring.write(data, None if deadline is None else max(0.0, deadline - _monotonic()))

    def _encode_pooled(self, obj: Any, data: Any, block: bool, deadline: Optional[float]) -> tuple:
        """``(record, lease)``: a slot message and its Lease, or a plain
        record and None -- when no buffer fits a slot, when the object has
        more large buffers than the pool has slots, or when no slot frees up
        but none holds an item still in the queue (see below).

        Back-pressure: with no free slot, ``put`` waits for one (Full when
        ``timeout`` expires, at once if not ``block``) as long as some slot
        holds an item still in the queue (``_pool_state``): consumers will
        take it.  Slots that are all out of the queue -- held by receivers'
        arrays (a consumer keeping every item it got, say), or returned to a
        producer that has not put since (only the producer that sent a slot
        frees it) -- may never come back while this producer waits, so the
        item is copied through the ring or the side path instead, where
        back-pressure still applies: after ``_POOL_GRACE`` seconds, or at
        once if not ``block`` or if nothing in the pool moved since this
        handle last did so."""
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
                return (_encode_plain(obj) if data is _LARGE else data), None
            if data is not _LARGE and len(obj) > self._slot_size:
                return data, None
        if self._consumer_pid != os.getpid():
            self._note_consumer()
        started = _monotonic()
        while True:
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
            queued, signature = _pool_state(codec.pool)
            now = _monotonic()
            if not queued and (not block or signature == self._stuck_pool or now - started >= _POOL_GRACE):
                self._stuck_pool = signature
                break
            if not block or (deadline is not None and now >= deadline):
                raise Full(f"queue {self.name!r} is full: no free slot for a large buffer") from None
        return (_encode_plain(obj) if data is _LARGE else data), None

    def _send_leased(self, data: Any, lease: C.Lease, block: bool, deadline: Optional[float]) -> None:
        """Write the slot message ``data``, then tell its lease."""
        try:
            if len(data) <= self._inline_max:
                self._write_small(data, block, deadline)
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

    def _open_codec(self, first: Any = None) -> C.Codec:
        """This handle's codec, with the queue's slot pool (attached, or
        created if nobody did yet, with slots sized for ``first``, the object
        being put); for decoding, any handle may need it."""
        with self._zc_lock:
            codec = self._codec
            if codec is None:
                pool = self._open_pool(first) if self._zero_copy else None
                if pool is not None:
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

    def _published_pool(self) -> Optional[str]:
        buf = self._side.segment.buf
        raw = bytes(buf[_POOL_NAME_OFFSET : _POOL_NAME_OFFSET + L.POOL_NAME_BYTES]).rstrip(b"\0")
        return raw.decode("ascii") if raw else None

    def _open_pool(self, first: Any) -> SlotPool:
        # Under the lock its creator writes the name under: never half a name.
        with self._ring.segment.admin_lock():
            name = self._published_pool()
            if name is None:
                return self._create_pool(*self._pool_geometry(first))
        try:
            return SlotPool.attach(name)
        except FileNotFoundError as exc:
            raise BrokenError(f"the slot pool of queue {self.name!r} is gone (was the queue unlinked?)") from exc

    def _pool_geometry(self, first: Any) -> tuple:
        """``(slot_size, slot_count)`` of the pool to make: as configured, or
        (``slot_size=None``) fitted to the largest buffer of ``first``."""
        if self._slot_size:
            return self._slot_size, self._slot_count
        return _fitted_geometry(_largest_buffer(first), self._slot_count, P.shm_free_bytes())

    def _create_pool(self, slot_size: int, slot_count: int) -> SlotPool:
        """Create the pool and publish its name (admin lock held).  Its name
        follows from the side ring's, so the owner unlinks it whoever made it."""
        name = _pool_name(self._side.name)
        for _ in range(3):
            try:
                pool = SlotPool.create(
                    slot_size, slot_count, name=name, max_members=_POOL_MEMBERS, link=self._ring.name
                )
                break
            except FileExistsError:
                # Left by a process killed while making it: complete and ours, or removed.
                try:
                    pool = SlotPool.attach(name)
                except (FileNotFoundError, LayoutError):
                    P.shm_unlink(name)
                    continue
                if pool.link == self._ring.name:
                    break
                pool.close()
                P.shm_unlink(name)
        else:
            raise FileExistsError(f"could not create the slot pool {name!r} of queue {self.name!r}")
        buf = self._side.segment.buf
        try:
            seg = pool.segment
            # Attributed to the queue's creator, like a blob: `shmq gc` keeps it while the queue lives.
            seg.words[L.W_CREATOR_PID] = self._w[L.W_CREATOR_PID]
            seg.words[L.W_CREATOR_START_US] = self._w[L.W_CREATOR_START_US]
            if self._owner_pid != os.getpid():
                seg.disown()  # the queue's owner unlinks it with the queue
            buf[_POOL_NAME_OFFSET : _POOL_NAME_OFFSET + L.POOL_NAME_BYTES] = name.encode("ascii").ljust(
                L.POOL_NAME_BYTES, b"\0"
            )
            # The owner unlinks the main ring first and the pool last: if the
            # ring is still there, the owner's unlink will also remove the pool.
            self._ring.segment.check_exists()
        except BaseException:
            buf[_POOL_NAME_OFFSET : _POOL_NAME_OFFSET + L.POOL_NAME_BYTES] = bytes(L.POOL_NAME_BYTES)
            pool.close()
            P.shm_unlink(name)
            raise
        return pool

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
            dst = seg.buf[L.DATA_OFFSET : L.DATA_OFFSET + nbytes]
            try:
                copy_into(dst, memoryview(data))
            finally:
                dst.release()
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
        deadline = _deadline(timeout) if block else None
        while True:
            if data:
                return self._decode_record(data)
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
                    try:
                        out.append(_decode(rec))
                    except Exception as exc:
                        out.append(self._decode_other(rec, exc))
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

    def _decode_record(self, data: Any) -> Any:
        try:
            return _decode(data)
        except Exception as exc:
            return self._decode_other(data, exc)

    def _decode_other(self, data: Any, exc: Exception) -> Any:
        """A record ``_decode`` refused with ``exc``: a slot message, or one
        decoded ahead (``_Ready``); any other record raises ``exc``."""
        if type(data) is not _Ready and data[:3] != _MAGIC:
            raise exc
        try:
            if type(data) is _Ready:
                return data.get()
            if type(data) is memoryview and not data.readonly:
                data = data.toreadonly()  # a blob's view: the codec hashes parts of it
            codec = self._codec or self._open_codec()
            return codec.decode(data)
        except Exception as error:
            raise error from None  # not "during handling of" pickle's refusal

    def _decode_ahead(self, rec: Any) -> Any:
        if rec and type(rec) is not _Ready and rec[:3] == _MAGIC:
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
            self._try_read = self._pop_stash  # type: ignore[method-assign]
            self._try_read_many = self._pop_stash_many  # type: ignore[method-assign]
        else:
            self._try_read = self._ring.try_read  # type: ignore[method-assign]
            self._try_read_many = self._ring.try_read_many  # type: ignore[method-assign]

    def _note_consumer(self) -> None:
        """List this process as a consumer of the main ring (a producer of
        slot messages: if it dies between allocating slots and writing its
        message, the pool frees them by the orphan rule)."""
        self._ring.segment.add_role(L.ROLE_CONSUMER)
        self._consumer_pid = os.getpid()

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
                return _load_blob(name, nbytes, self.name, self._decode_record)
            except SlotError:
                # A slot message whose slots are no longer in flight: a
                # consumer killed while decoding it had acquired them (the
                # item went with it, as a small item goes with a consumer
                # killed after reading it), and they were freed since.
                return _NOTHING
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
        self.__dict__.pop("put", None)
        self.__dict__.pop("get", None)
        _live.discard(self)
        self._finalizer()
        self.__class__ = _closed_class(type(self), _KEEP_OPEN)

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
_KEEP_OPEN = ("join_thread", "cancel_join_thread")


def _attach(name: str) -> _QueueBase:
    """Unpickle a queue handle: attach by name, as the class it was created as."""
    return _QueueBase.attach(name)
