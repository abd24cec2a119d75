"""Channels: objects between processes, large buffers zero-copy.

A channel is a ring (the messages) plus a slot pool (the large buffers)::

    tx, rx = shmq.open_channel(slot_size=16 << 20, slot_count=8)

    # producer: copy path -- an existing array is copied once, into a slot
    tx.send({"frame": frame, "meta": {...}})
    # producer: loan path -- build the array in the slot, nothing is copied
    with tx.loan_array((1080, 1920, 3), "uint8") as a:
        render_into(a)                        # sent when the block ends

    # consumer, any process (``attach_channel(tx.name)``, or pass rx to it)
    msg = rx.receive()                        # arrays are read-only views of the slots
    with rx.receive_loan() as view: ...       # slot returned when the block ends

Small objects travel through the ring as pickles, exactly like a queue.
Buffers of at least ``threshold`` bytes (numpy arrays anywhere in the object,
or a top-level bytes-like) go through the pool: the sender copies them into
free slots (or wrote them there in place, with a loan) and only the slot
references travel.  The receiver gets read-only views of the slots; a slot is
returned to its source when the last view of it is gone.  A sender that finds
no free slot waits for one (back-pressure), up to its ``timeout``.

Both endpoints pickle as the channel's name, so they can be handed to child
processes of any start method; ``attach_channel(name)`` opens both from an
unrelated process.  ``close()`` ends a handle; the creating process owns the
names and unlinks them at normal exit (or call ``unlink()``).
"""
from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence, Tuple, Union

import numpy as np

from . import _codec
from ._codec import DEFAULT_THRESHOLD, Codec
from ._errors import ClosedError, LayoutError, MessageTooLarge, SlotError
from ._slots import DEFAULT_MAX_MEMBERS, SlotPool, SlotPoolStatistics
from ._stats import RingStatistics
from ._wait import deadline_for
from .ring import DEFAULT_CAPACITY_BYTES, Ring

__all__ = (
    "ChannelStatistics",
    "ReceiveChannel",
    "ReceiveLoan",
    "SendChannel",
    "SendLoan",
    "attach_channel",
    "open_channel",
    "DEFAULT_SLOT_SIZE",
    "DEFAULT_SLOT_COUNT",
)

DEFAULT_SLOT_SIZE = 1 << 20
DEFAULT_SLOT_COUNT = 16

_monotonic = time.monotonic


def _remaining(deadline: Optional[float]) -> Optional[float]:
    return None if deadline is None else max(0.0, deadline - _monotonic())


@dataclass(frozen=True)
class ChannelStatistics:
    """A snapshot of a channel's ring and pool counters."""

    #: the ring carrying the messages (small objects, slot references)
    ring: RingStatistics
    #: the pool carrying the large buffers
    pool: SlotPoolStatistics


class _Shared:
    """The ring, pool and codec behind the endpoints of one process."""

    def __init__(self, ring: Ring, pool: SlotPool, threshold: int, refs: int) -> None:
        self.ring = ring
        self.pool = pool
        self.name = pool.name
        self.codec = Codec(pool, ring=ring, threshold=threshold)
        self._refs = refs
        self._lock = threading.Lock()

    def drop(self) -> None:
        with self._lock:
            self._refs -= 1
            last = self._refs == 0
        if last:
            self.codec.close()
            self.pool.close()
            self.ring.close()

    def unlink(self) -> None:
        self.pool.unlink()
        self.ring.unlink()

    def statistics(self) -> ChannelStatistics:
        return ChannelStatistics(self.ring.statistics(), self.pool.statistics())


def open_channel(
    capacity_bytes: int = DEFAULT_CAPACITY_BYTES,
    *,
    slot_size: int = DEFAULT_SLOT_SIZE,
    slot_count: int = DEFAULT_SLOT_COUNT,
    threshold: int = DEFAULT_THRESHOLD,
    max_messages: int = 0,
    name: Optional[str] = None,
    multi_producer: bool = True,
    multi_consumer: bool = True,
    max_members: int = DEFAULT_MAX_MEMBERS,
) -> Tuple["SendChannel", "ReceiveChannel"]:
    """Create a channel; returns ``(send_channel, receive_channel)``.

    ``capacity_bytes``/``max_messages``: the ring of messages (small objects
    and slot references).  ``slot_size``/``slot_count``: the pool of large
    buffers; at most ``slot_count`` of them are in flight at once, and a
    buffer larger than ``slot_size`` travels through the ring instead.
    ``threshold``: the smallest buffer that goes through the pool.
    ``multi_producer=False``/``multi_consumer=False`` drop the ring's lock on
    that side: then one thread of one process may send/receive.
    ``max_members``: processes that may use the pool at once.

    Raises TypeError/ValueError for bad arguments, FileExistsError if
    ``name`` is taken, SharedMemoryFull if /dev/shm has no room.
    """
    if not isinstance(threshold, int) or isinstance(threshold, bool) or threshold < 1:
        raise ValueError(f"'threshold' must be a positive int, got {threshold!r}")
    ring = Ring.create(
        capacity_bytes, max_messages=max_messages, multi_producer=multi_producer, multi_consumer=multi_consumer
    )
    try:
        pool = SlotPool.create(slot_size, slot_count, name=name, max_members=max_members, link=ring.name)
    except BaseException:
        ring.unlink()
        ring.close()
        raise
    shared = _Shared(ring, pool, threshold, refs=2)
    return SendChannel(shared, _token=_TOKEN), ReceiveChannel(shared, _token=_TOKEN)


def _attach(name: str, refs: int, threshold: int = DEFAULT_THRESHOLD) -> _Shared:
    pool = SlotPool.attach(name)
    try:
        link = pool.link
        if not link:
            raise LayoutError(f"{name!r} is a slot pool without a ring, not a channel")
        ring = Ring.attach(link)
    except BaseException:
        pool.close()
        raise
    return _Shared(ring, pool, threshold, refs)


def attach_channel(name: str, *, threshold: int = DEFAULT_THRESHOLD) -> Tuple["SendChannel", "ReceiveChannel"]:
    """Open both endpoints of the channel ``name`` created by any process.

    Raises FileNotFoundError, PermissionError, or LayoutError if ``name`` is
    not an shmq channel of this layout version."""
    shared = _attach(name, 2, threshold)
    return SendChannel(shared, _token=_TOKEN), ReceiveChannel(shared, _token=_TOKEN)


def _attach_sender(name: str, threshold: int) -> "SendChannel":
    return SendChannel(_attach(name, 1, threshold), _token=_TOKEN)


def _attach_receiver(name: str) -> "ReceiveChannel":
    return ReceiveChannel(_attach(name, 1), _token=_TOKEN)


class _Endpoint:
    _shared: Optional[_Shared] = None

    def __init__(self, shared: _Shared, *, _token: object = None) -> None:
        if _token is not _TOKEN:
            raise TypeError("use open_channel() or attach_channel()")
        self._shared = shared
        self.name = shared.name
        self._ring = shared.ring
        self._pool = shared.pool
        self._codec = shared.codec

    def _check(self) -> _Shared:
        shared = self._shared
        if shared is None:
            raise ClosedError(f"{type(self).__name__} {self.name!r} is closed")
        return shared

    @property
    def closed(self) -> bool:
        return self._shared is None

    def close(self) -> None:
        """End this handle (idempotent).  The channel stays for the others;
        views already received stay valid until they die."""
        shared, self._shared = self._shared, None
        if shared is not None:
            shared.drop()

    def unlink(self) -> None:
        """Remove the channel's names (ring, pool, semaphores) for everybody.
        Handles already open keep working."""
        self._pool.unlink()
        self._ring.unlink()

    def statistics(self) -> ChannelStatistics:
        """Ring and pool counters, as every attached process sees them."""
        return self._check().statistics()

    def __enter__(self):
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r}{' closed' if self.closed else ''}>"


class SendChannel(_Endpoint):
    """The sending end of a channel (from :func:`open_channel`)."""

    def __reduce__(self):
        return (_attach_sender, (self.name, self._codec.threshold))

    @property
    def on_return(self) -> Optional[Callable[[int], Any]]:
        """Called with the slot index for every slot this process sent that
        came back (during ``send``/``loan``/``collect`` calls of this process)."""
        return self._pool.on_return

    @on_return.setter
    def on_return(self, callback: Optional[Callable[[int], Any]]) -> None:
        self._pool.on_return = callback

    def send(self, obj: Any, timeout: Optional[float] = None) -> None:
        """Send ``obj``, waiting up to ``timeout`` seconds for a free slot and
        for room in the ring.  Raises Full if the timeout expires (nothing was
        sent), MessageTooLarge if the message can never fit the ring."""
        self._check()
        deadline = deadline_for(timeout)
        data, lease = self._codec.encode(obj, timeout)
        if lease is None:
            self._ring.write(data, _remaining(deadline))
            return
        try:
            self._ring.write(data, _remaining(deadline))
        except BaseException:
            lease.abort()
            raise
        lease.sent()

    def send_nowait(self, obj: Any) -> None:
        """Send ``obj`` or raise Full (a WouldBlock) at once."""
        self.send(obj, 0)

    def loan(self, nbytes: int, timeout: Optional[float] = None) -> "SendLoan":
        """A free slot to write ``nbytes`` into in place.  Use it as
        ``with tx.loan(n) as buf: buf[:] = ...`` (sent when the block ends,
        dropped if it raises), or call ``.send()``/``.abort()``.  Raises Full
        if no slot frees up within ``timeout``, MessageTooLarge if ``nbytes``
        exceeds the slot size."""
        return self._loan(nbytes, None, timeout)

    def loan_array(self, shape: Union[int, Sequence[int]], dtype: Any = float, timeout: Optional[float] = None) -> "SendLoan":
        """Like :meth:`loan`, for a writable C-contiguous numpy array of
        ``shape`` and ``dtype`` living in the slot; the receiver gets a
        read-only array of the same shape and dtype."""
        try:
            spec = _ARRAY_SPECS.get((shape, dtype))
        except TypeError:  # unhashable arguments (a list shape)
            spec = None
        if spec is None:
            spec = _array_spec(shape, dtype)
        return self._loan(spec[0], spec[1], timeout)

    def _loan(self, nbytes: int, array: Optional[tuple], timeout: Optional[float]) -> "SendLoan":
        self._check()
        pool = self._pool
        if not 0 <= nbytes <= pool.slot_size:
            raise MessageTooLarge(f"a loan of {nbytes} bytes can never fit a slot of {pool.slot_size} bytes")
        (index,) = pool.allocate(1, timeout)
        return SendLoan(self, index, nbytes, array)

    def collect(self) -> int:
        """Take back the slots receivers have returned now (running
        ``on_return``); returns how many.  ``send`` does this as needed."""
        return self._pool.collect()

    def reclaim(self) -> int:
        """Scan for processes that died holding or lending slots and take
        those slots back now (sends do this at most every 0.1 s when short)."""
        return self._pool.reclaim()


_ARRAY_SPECS: dict = {}


def _array_spec(shape: Any, dtype: Any) -> tuple:
    """(nbytes, (shape, dtype, header)) for loan_array, cached by argument."""
    key = (shape, dtype)
    shape = (int(shape),) if isinstance(shape, (int, np.integer)) else tuple(int(n) for n in shape)
    if any(n < 0 for n in shape):
        raise ValueError(f"'shape' must not have negative dimensions, got {shape}")
    dtype = np.dtype(dtype)
    spec = (math.prod(shape) * dtype.itemsize, (shape, dtype, _codec.dtype_header(dtype, shape)))
    try:
        if len(_ARRAY_SPECS) > 1024:
            _ARRAY_SPECS.clear()
        _ARRAY_SPECS[key] = spec
    except TypeError:
        pass
    return spec


class SendLoan:
    """A slot lent to the producer to write in place (from
    :meth:`SendChannel.loan` / :meth:`SendChannel.loan_array`).

    ``buf`` is a writable memoryview of ``nbytes``; ``array`` the writable
    array for ``loan_array`` (else None).  ``send()`` publishes it (nothing is
    copied), ``abort()`` gives the slot back unsent.  As a context manager it
    yields ``array`` (or ``buf``) and sends at the end of the block, or aborts
    if the block raises.  Neither may be used after sending.
    """

    def __init__(self, channel: SendChannel, index: int, nbytes: int, array: Optional[tuple]) -> None:
        self._channel = channel
        self._pool = channel._pool
        self.index = index
        self.nbytes = nbytes
        self.buf: Optional[memoryview] = self._pool.view(index, nbytes)
        self._header = None
        self.array: Optional[np.ndarray] = None
        if array is not None:
            shape, dtype, self._header = array
            self.array = np.ndarray(shape, dtype, self.buf)
        self._open = True

    def send(self, nbytes: Optional[int] = None, timeout: Optional[float] = None) -> None:
        """Publish the slot (``nbytes`` of it, default all; not for arrays).
        Raises Full if the ring stays full for ``timeout`` seconds: the loan
        stays open then (send again, or abort)."""
        if not self._open:
            raise SlotError(f"loan of slot {self.index} was already sent or aborted")
        channel = self._channel
        channel._check()
        if nbytes is None:
            nbytes = self.nbytes
        elif self.array is not None or not 0 <= nbytes <= self.nbytes:
            raise ValueError(f"'nbytes' must be between 0 and {self.nbytes} (and not given for arrays), got {nbytes}")
        pool = self._pool
        fence = channel._codec.fence
        data = _codec.loan_message(pool, self.index, nbytes, array=self._header, fenced=fence is not None)
        try:
            channel._ring.write(data, timeout)
        except BaseException:
            pool.unsend((self.index,))
            raise
        self._finish()
        if fence is not None:
            pool.set_fence((self.index,), fence.position())

    def abort(self) -> None:
        """Give the slot back unsent (idempotent)."""
        if self._open:
            self._finish()
            self._pool.abort([self.index])

    def _finish(self) -> None:
        self._open = False
        array, self.array = self.array, None
        buf, self.buf = self.buf, None
        if array is not None:
            array.flags.writeable = False  # the slot belongs to the receivers now
        else:
            try:
                buf.release()
            except BufferError:
                pass  # the caller still exports it; the slot is no longer theirs anyway

    def __enter__(self):
        return self.array if self.array is not None else self.buf

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if not self._open:
            return
        if exc_type is not None:
            self.abort()
            return
        try:
            self.send()
        except BaseException:
            self.abort()
            raise

    def __repr__(self) -> str:
        return f"<SendLoan slot {self.index} of {self._pool.name!r}, {self.nbytes} bytes{'' if self._open else ', done'}>"


class ReceiveChannel(_Endpoint):
    """The receiving end of a channel (from :func:`open_channel`)."""

    def __reduce__(self):
        return (_attach_receiver, (self.name,))

    def receive(self, timeout: Optional[float] = None, *, copy: bool = False) -> Any:
        """The next object, waiting up to ``timeout`` seconds (Empty if none
        came).  Large buffers are read-only views of their slots, held until
        the last view dies; ``copy=True`` gives private writable copies and
        returns the slots at once."""
        self._check()
        codec = self._codec
        codec.note_consumer()
        return codec.decode(self._ring.read(timeout), copy=copy)

    def receive_nowait(self, *, copy: bool = False) -> Any:
        """The next object, or raise Empty (a WouldBlock) at once."""
        self._check()
        codec = self._codec
        codec.note_consumer()
        return codec.decode(self._ring.read_nowait(), copy=copy)

    def receive_loan(self, timeout: Optional[float] = None) -> "ReceiveLoan":
        """The next object as a :class:`ReceiveLoan`, whose slots go back when
        it is released (explicitly, or at the end of a ``with`` block)."""
        self._check()
        codec = self._codec
        codec.note_consumer()
        obj, tokens = codec.decode_held(self._ring.read(timeout))
        return ReceiveLoan(obj, tokens)

    def __iter__(self):
        return self

    def __next__(self) -> Any:
        return self.receive()


class ReceiveLoan:
    """A received object whose slots stay borrowed until :meth:`release`.

    ``obj`` is the object; ``array`` it, if it is an array; ``buf`` a
    read-only memoryview of it, if it is an array or raw bytes.  As a context
    manager it yields ``obj`` and releases at the end of the block.  Views
    taken from it must not be used after the release: the slot may be reused.
    """

    def __init__(self, obj: Any, tokens: list) -> None:
        self.obj = obj
        self._tokens = tokens
        self._released = False

    @property
    def array(self) -> Optional[np.ndarray]:
        return self.obj if isinstance(self.obj, np.ndarray) else None

    @property
    def buf(self) -> Optional[memoryview]:
        obj = self.obj
        if isinstance(obj, memoryview):
            return obj
        if isinstance(obj, np.ndarray) and obj.flags.c_contiguous:
            return memoryview(obj).cast("B")
        return None

    def release(self) -> None:
        """Return the slots now.  Raises SlotError if already released."""
        if self._released:
            raise SlotError("this loan was already released")
        self._released = True
        obj, self.obj = self.obj, None
        if isinstance(obj, memoryview):
            try:
                obj.release()
            except BufferError:
                pass
        _codec.release_tokens(self._tokens)

    @property
    def released(self) -> bool:
        return self._released

    def __enter__(self) -> Any:
        return self.obj

    def __exit__(self, *exc: object) -> None:
        if not self._released:
            self.release()

    def __repr__(self) -> str:
        return f"<ReceiveLoan {type(self.obj).__name__}{' released' if self._released else ''}>"


_TOKEN = object()
