"""Objects <-> message bytes, with large buffers moved through slot pools.

Two message forms share one byte stream:

* **plain**: ``pickle.dumps(obj, protocol=5)``, as any queue would send it.
  Objects without large buffers always take this form, so they cost nothing
  extra (their first byte is pickle's PROTO opcode, 0x80).
* **slot message**: a small header naming a pool and the slots that carry the
  large buffers, then (for pickled objects) the pickle itself, whose
  out-of-band buffers (protocol 5) are those slots, in order::

      0   3  MAGIC b"\\x00SQ"
      3   1  kind: 1 pickle, 2 raw bytes, 3 ndarray
      4   1  flags: bit 0 the object was bytes, bit 1 bytearray, bit 2 the
             dtype is pickled (kind 3, structured dtypes)
      5   2  number of slot references n (uint16)
      7   1  length of the pool name, then the name (ASCII)
      ..     n references: slot index (uint32), generation (uint32),
             buffer length (uint64)
      ..     kind 1: the pickle; kind 3: dtype (length byte + dtype.str, or
             uint32 length + pickled dtype), ndim (byte), shape (ndim int64)

  All integers little-endian.

Encoding copies each large buffer once, into a slot.  Decoding copies
nothing: each slot becomes a read-only numpy ``uint8`` array (the *anchor*)
over the slot; pickle hands it to numpy as the out-of-band buffer, so every
array rebuilt from it, and every view or slice derived from those, has the
anchor as its ``.base`` (numpy stops collapsing the base chain at an array
whose own base is not an array).  A weak reference with a callback watches
the anchor: when the last view dies, the slot is released and returned to its
source.  ``copy=True`` gives private, writable copies and releases at once.

The first pass (``shmq.Queue.put``): a queue pickles every object once with
:func:`stop_at_large` as the buffer callback.  An object without a buffer of
``DEFAULT_THRESHOLD`` bytes or more comes out as its plain pickle, the record;
one with such a buffer stops the pass before anything large is copied, and
:func:`first_pass_failed` answers :data:`LARGE`: the queue then encodes it
again with :func:`encode` (or :func:`pickle_in_band`).  Every pickling here
falls back, once, to ``multiprocessing``'s ForkingPickler (:func:`_pickle`).

A message must be decoded exactly once per delivery.  The consumer reads the
message off the ring *before* it acquires the slots, so a receiver killed
between the two leaves an orphan: once a consumer of the ring is found dead,
the source frees a slot whose message the ring shows consumed but nobody
acquired for ``SlotPool.orphan_seconds`` (see ``RingFence``).  A live
receiver may keep read records undecoded as long as it likes.
"""
from __future__ import annotations

import io
import math
import os
import pickle
import struct
import sys
import time
import weakref
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from . import _layout as L
from . import _torch
from ._copy import copy_into
from ._errors import ClosedError, SlotError
from ._slots import RECLAIM_INTERVAL, SlotPool

__all__ = (
    "DEFAULT_THRESHOLD",
    "MAGIC",
    "LARGE",
    "Codec",
    "Lease",
    "RingFence",
    "encode",
    "decode",
    "is_slot_message",
    "stop_at_large",
    "first_pass",
    "first_pass_failed",
    "pickle_in_band",
    "largest_buffer",
)

#: buffers at least this large travel through a slot instead of the ring
DEFAULT_THRESHOLD = 64 * 1024
MAGIC = b"\x00SQ"
PROTOCOL = 5

K_PICKLE, K_RAW, K_ARRAY = 1, 2, 3
F_BYTES, F_BYTEARRAY, F_PICKLED_DTYPE = 1, 2, 4

_HEAD = struct.Struct("<3sBBHB")  # magic, kind, flags, nrefs, name length
_REF = struct.Struct("<IIQ")
_U32 = struct.Struct("<I")
_dumps = pickle.dumps
_loads = pickle.loads
_RAW_TYPES = (bytes, bytearray, memoryview)
_U8 = np.dtype(np.uint8)
_monotonic = time.monotonic
_modules = sys.modules
_process = [0]  # bumped in forked children: "registered in this process" checks


def _forked() -> None:
    _process[0] += 1


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forked)


class RingFence:
    """Where the messages of a pool travel: a ring's TAIL (``position()``),
    whether its readers have passed a position (``passed(pos)``), and whether
    a process that consumed from it has died (``someone_died()``).  Lets a pool tell
    a message still queued from one consumed by a receiver that died before
    decoding it (a live receiver always decodes what it read, however late)."""

    __slots__ = ("_w", "_segment", "_died", "_checked")

    def __init__(self, ring: Any) -> None:
        self._segment = ring.segment
        self._w = ring.segment.words
        self._died = False
        self._checked = -1.0

    def position(self) -> int:
        return self._w[L.W_TAIL]

    def passed(self, position: int) -> bool:
        return self._w[L.W_HEAD] >= position

    def someone_died(self) -> bool:
        """True once a process registered as a consumer of the ring (see
        :meth:`Codec.note_consumer`), or as a writer of slot messages, is
        found dead (checked at most every
        RECLAIM_INTERVAL)."""
        if not self._died:
            now = _monotonic()
            if now - self._checked >= RECLAIM_INTERVAL:
                self._checked = now
                self._died = any(
                    not p.alive and p.role & (L.ROLE_CONSUMER | L.ROLE_SLOT_WRITER) for p in self._segment.participants()
                )
        return self._died


class Lease:
    """The slots of one encoded message, on the sending side.  Call
    :meth:`sent` once the message is written, or :meth:`abort` if the write
    failed (the slots are freed, nothing was shown to anybody)."""

    __slots__ = ("pool", "indices", "_fence", "_open")

    def __init__(self, pool: SlotPool, indices: List[int], fence: Optional[RingFence]) -> None:
        self.pool = pool
        self.indices = indices
        self._fence = fence
        self._open = True

    def sent(self) -> None:
        if self._open:
            self._open = False
            fence = self._fence
            self.pool.set_fence(self.indices, 0 if fence is None else fence.position())

    def abort(self) -> None:
        if self._open:
            self._open = False
            self.pool.abort(self.indices)

    def __repr__(self) -> str:
        return f"<Lease {self.pool.name!r} slots {self.indices}{' open' if self._open else ''}>"


def is_slot_message(data: Any) -> bool:
    """True if ``data`` is a slot message (not a plain pickle)."""
    return bytes(data[:3]) == MAGIC


# -- encoding -------------------------------------------------------------
_PREFIXES: Dict[tuple, bytes] = {}


def _prefix(pool: SlotPool, kind: int, flags: int, nrefs: int) -> bytes:
    key = (pool.name, kind, flags, nrefs)
    prefix = _PREFIXES.get(key)
    if prefix is None:
        name = pool.name.encode()
        prefix = _HEAD.pack(MAGIC, kind, flags, nrefs, len(name)) + name
        if len(_PREFIXES) > 4096:
            _PREFIXES.clear()
        _PREFIXES[key] = prefix
    return prefix


def encode(
    obj: Any,
    pool: Optional[SlotPool] = None,
    *,
    threshold: int = DEFAULT_THRESHOLD,
    timeout: Optional[float] = None,
    deliveries: int = 1,
    fence: Optional[RingFence] = None,
) -> Tuple[bytes, Optional[Lease]]:
    """Encode ``obj``; returns ``(data, lease)``.

    Without a pool, or without buffers of at least ``threshold`` bytes,
    ``data`` is the plain protocol-5 pickle and ``lease`` is None.  Otherwise
    the large buffers (top-level bytes-likes, and every pickle protocol-5
    out-of-band buffer such as numpy arrays anywhere in ``obj``) are copied
    into slots of ``pool`` -- waiting for free slots up to ``timeout`` seconds
    (back-pressure: raises Full) -- and ``lease`` must be told ``sent()`` or
    ``abort()`` (the slots are not freed before ``sent()``, however quickly
    receivers return them).  ``deliveries``: how many receivers will decode
    ``data`` (broadcast).  ``fence``: the ring ``data`` will be written to.
    """
    if pool is None:
        return _pickle(obj, None), None
    limit = pool.slot_size
    t = type(obj)
    if t is np.ndarray:
        n = obj.nbytes
        if threshold <= n <= limit and obj.flags.c_contiguous and not obj.dtype.hasobject:
            # Skip pickle: the same message a loan_array sends.
            flags, header = dtype_header(obj.dtype, obj.shape)
            try:
                raw = memoryview(obj).cast("B")
            except (ValueError, TypeError):  # a dtype the buffer protocol lacks (datetime64)
                raw = memoryview(obj.reshape(-1).view(np.uint8))
            return _place(pool, [raw], _prefix(pool, K_ARRAY, flags, 1), header, timeout, deliveries, fence)
    elif t in _RAW_TYPES:
        mv = memoryview(obj)
        n = mv.nbytes
        if threshold <= n <= limit and mv.contiguous:
            flags = F_BYTES if type(obj) is bytes else F_BYTEARRAY if type(obj) is bytearray else 0
            return _place(pool, [mv], _prefix(pool, K_RAW, flags, 1), b"", timeout, deliveries, fence)
        return _pickle(obj, None), None
    bufs: List[memoryview] = []

    def big(pb: pickle.PickleBuffer) -> bool:
        try:
            m = pb.raw()
        except BufferError:  # not contiguous: in-band, where pickle decides
            return True
        if threshold <= m.nbytes <= limit:
            bufs.append(m)
            return False
        return True

    data = _pickle(obj, big, bufs)
    if not bufs:
        return data, None
    if len(bufs) > 0xFFFF:
        raise ValueError(f"an object with {len(bufs)} large buffers cannot be sent (at most 65535)")
    return _place(pool, bufs, _prefix(pool, K_PICKLE, 0, len(bufs)), data, timeout, deliveries, fence)


def _pickle(obj: Any, buffer_callback: Optional[Callable], bufs: Optional[list] = None) -> bytes:
    """Protocol-5 pickle of ``obj``; objects only ``multiprocessing``'s
    pickler knows (connections, sockets) work too."""
    try:
        if "torch" in _modules and _torch.holds_tensor(obj):  # CPU tensors as arrays (shmq/_torch.py)
            return _torch.dumps(obj, PROTOCOL, buffer_callback)
        return _dumps(obj, PROTOCOL, buffer_callback=buffer_callback)
    except Exception as exc:
        if bufs:
            bufs.clear()
        return _pickle_refused(obj, buffer_callback, exc)


def _pickle_refused(obj: Any, buffer_callback: Optional[Callable], exc: Exception) -> bytes:
    """The pickle of ``obj``, which plain pickle refused with ``exc``: through
    ``multiprocessing``'s ForkingPickler (the one fallback), or for a
    memoryview, a pickle that rebuilds a read-only memoryview of its bytes.
    Raises ``exc`` if that fails too."""
    if type(obj) is memoryview:
        return _dumps(_MemoryviewOf(obj.tobytes()), PROTOCOL)
    from multiprocessing.reduction import ForkingPickler

    out = io.BytesIO()
    try:
        ForkingPickler(out, PROTOCOL, True, buffer_callback).dump(obj)  # it takes positional arguments only
    except Exception:
        raise exc from None
    return out.getvalue()


class _MemoryviewOf:
    """Pickles as ``memoryview(data)``: a memoryview, which pickle refuses,
    arrives as a read-only memoryview of its bytes (as a large one does
    through a slot)."""

    __slots__ = ("data",)

    def __init__(self, data: bytes) -> None:
        self.data = data

    def __reduce__(self):
        return (memoryview, (self.data,))


# -- the first pass (shmq.Queue.put) -------------------------------------------------
class _LargeBuffer(Exception):
    """Raised by stop_at_large to end the first pass."""


def stop_at_large(buf: pickle.PickleBuffer) -> bool:
    """Buffer callback of the first pass: a small (or non-contiguous) buffer
    stays in the pickle; a large one stops the pass, before it is copied."""
    try:
        with buf.raw() as m:
            large = m.nbytes >= DEFAULT_THRESHOLD
    except BufferError:  # not contiguous: pickled in-band
        return True
    if large:
        raise _LargeBuffer
    return True


class _Large:
    """What the first pass gives for an object with a large buffer: longer
    than any record, so ``put``'s one length test sends it off the fast path."""

    __slots__ = ()

    def __len__(self) -> int:
        return sys.maxsize

    def __repr__(self) -> str:
        return "<an object with large buffers>"


#: The first pass's answer for an object with a large buffer (see _Large).
LARGE = _Large()


def first_pass_failed(obj: Any, exc: Exception) -> Any:
    """The record for ``obj`` when ``pickle.dumps(obj, 5,
    buffer_callback=stop_at_large)`` raised ``exc``: LARGE if it stopped at a
    large buffer (or ``obj`` is a large memoryview, which the codec sends
    through a slot), else the pickle from the fallback; raises ``exc`` if
    ``obj`` cannot be pickled."""
    if type(exc) is _LargeBuffer:
        return LARGE
    if type(obj) is memoryview and obj.nbytes >= DEFAULT_THRESHOLD:
        return LARGE
    return _pickle_refused(obj, None, exc)


def first_pass(obj: Any) -> Any:
    """The first pass over ``obj``: its record (its pickle), or LARGE after
    checking that it pickles (copying no buffer), so that a pickling error
    raises from ``put``.  (``put`` inlines this; ``put_many`` calls it.)"""
    try:
        return _dumps(obj, PROTOCOL, buffer_callback=stop_at_large)
    except Exception as exc:
        data = first_pass_failed(obj, exc)
    if data is LARGE and type(obj) is not memoryview:
        _pickle(obj, _out_of_band)  # raises its pickling error now; copies no buffer
    return data


def _out_of_band(buf: pickle.PickleBuffer) -> bool:
    return False


def pickle_in_band(obj: Any) -> bytes:
    """The protocol-5 pickle of ``obj`` with every buffer in it (what a
    queue without a slot pool sends)."""
    return _pickle(obj, None)


def largest_buffer(obj: Any) -> int:
    """Bytes in the largest buffer ``obj`` pickles out of band (or its
    length, for a bytes-like); 0 if none."""
    if type(obj) in _RAW_TYPES:
        return memoryview(obj).nbytes
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
        _pickle(obj, measure)  # the codec's pickling: torch tensors as arrays
    except Exception:
        pass
    return largest


def _place(
    pool: SlotPool,
    bufs: Sequence[memoryview],
    prefix: bytes,
    tail: bytes,
    timeout: Optional[float],
    deliveries: int,
    fence: Optional[RingFence],
) -> Tuple[bytes, Lease]:
    indices = pool.allocate(len(bufs), timeout)
    try:
        sizes = []
        for i, src in zip(indices, bufs):
            n = src.nbytes
            dst = pool.view(i, n)
            try:
                copy_into(dst, src)
            finally:
                dst.release()
            sizes.append(n)
        gens = pool.mark_sent(indices, sizes, deliveries, fenced=True)
    except BaseException:
        pool.abort(indices)
        raise
    parts = [prefix]
    for ref in zip(indices, gens, sizes):
        parts.append(_REF.pack(*ref))
    parts.append(tail)
    return b"".join(parts), Lease(pool, indices, fence)


_DTYPE_HEADERS: Dict[tuple, Tuple[int, bytes]] = {}


def dtype_header(dtype: np.dtype, shape: Tuple[int, ...]) -> Tuple[int, bytes]:
    """(flags, bytes) describing an array of ``dtype`` and ``shape`` (kind 3)."""
    key = (dtype, shape)
    found = _DTYPE_HEADERS.get(key)
    if found is None:
        found = _dtype_header(dtype, shape)
        if len(_DTYPE_HEADERS) > 4096:
            _DTYPE_HEADERS.clear()
        _DTYPE_HEADERS[key] = found
    return found


_ARRAY_SPECS: Dict[tuple, tuple] = {}


def array_spec(shape: Any, dtype: Any) -> tuple:
    """``(nbytes, shape, dtype, header)`` of a C-contiguous array of ``shape``
    (an int or a sequence of ints) and ``dtype`` (anything numpy.dtype
    takes), for the loans of queues and channels; cached by argument.
    Raises ValueError for a negative dimension, TypeError for a dtype of
    Python objects."""
    try:
        found = _ARRAY_SPECS.get((shape, dtype))
    except TypeError:  # unhashable arguments (a list shape): not cached
        found = None
    if found is not None:
        return found
    key = (shape, dtype)
    shape = (int(shape),) if isinstance(shape, (int, np.integer)) else tuple(int(n) for n in shape)
    if any(n < 0 for n in shape):
        raise ValueError(f"'shape' must not have negative dimensions, got {shape}")
    dtype = np.dtype(dtype)
    found = (math.prod(shape) * dtype.itemsize, shape, dtype, dtype_header(dtype, shape))
    try:
        if len(_ARRAY_SPECS) > 1024:
            _ARRAY_SPECS.clear()
        _ARRAY_SPECS[key] = found
    except TypeError:
        pass
    return found


def _dtype_header(dtype: np.dtype, shape: Tuple[int, ...]) -> Tuple[int, bytes]:
    if dtype.fields is None and dtype.subdtype is None and not dtype.hasobject:
        s = dtype.str.encode()
        head = bytes((len(s),)) + s
        flags = 0
    elif dtype.hasobject:
        raise TypeError(f"arrays of Python objects cannot live in a slot (dtype {dtype})")
    else:
        p = _dumps(dtype, PROTOCOL)
        head = _U32.pack(len(p)) + p
        flags = F_PICKLED_DTYPE
    if len(shape) > 64:
        raise ValueError(f"'shape' may have at most 64 dimensions, got {len(shape)}")
    return flags, head + bytes((len(shape),)) + struct.pack(f"<{len(shape)}q", *shape)


def loan_message(
    pool: SlotPool,
    index: int,
    nbytes: int,
    *,
    array: Optional[Tuple[int, bytes]] = None,
    deliveries: int = 1,
    fenced: bool = False,
) -> bytes:
    """Mark a loaned slot the source filled in place as sent, and return its
    message (raw bytes, or an array when ``array`` is the result of
    :func:`dtype_header`).  With ``fenced``, report the ring position with
    ``pool.set_fence`` after writing the message (or ``pool.unsend``)."""
    (gen,) = pool.mark_sent((index,), (nbytes,), deliveries, fenced)
    if array is None:
        return _prefix(pool, K_RAW, 0, 1) + _REF.pack(index, gen, nbytes)
    return _prefix(pool, K_ARRAY, array[0], 1) + _REF.pack(index, gen, nbytes) + array[1]


# -- decoding -------------------------------------------------------------
# Live anchors: id(weakref) -> (weakref, pool, index, generation, epoch).
_LIVE: Dict[int, tuple] = {}


def _anchor_gone(ref: "weakref.ref") -> None:
    entry = _LIVE.pop(id(ref), None)
    if entry is not None:
        try:
            entry[1].release_later(entry[2], entry[3], entry[4])
        except Exception:  # a finalizer must never raise (interpreter shutdown)
            pass


def _anchor(pool: SlotPool, index: int, gen: int, nbytes: int, tokens: Optional[list]) -> np.ndarray:
    view = pool.acquire(index, gen)
    if view.nbytes != nbytes:
        held = view.nbytes
        view.release()
        pool.release(index, gen)
        raise SlotError(
            f"corrupt slot reference: slot {index} of pool {pool.name!r} holds {held} bytes, "
            f"the message says {nbytes}"
        )
    anchor = np.frombuffer(view, _U8)
    ref = weakref.ref(anchor, _anchor_gone)
    _LIVE[id(ref)] = (ref, pool, index, gen, pool.epoch)
    if tokens is not None:
        tokens.append(id(ref))
    return anchor


def release_tokens(tokens: Sequence[int]) -> int:
    """Release the slots behind ``tokens`` (from :func:`decode_held`) now,
    without waiting for their views to die.  Returns how many were held."""
    count = 0
    for t in tokens:
        entry = _LIVE.pop(t, None)
        if entry is not None:
            entry[1].release(entry[2], entry[3])
            count += 1
    return count


def decode(data: Any, resolver: Optional[Callable[[str], SlotPool]] = None, *, copy: bool = False, exact_types: bool = False) -> Any:
    """The object encoded in ``data``.  ``resolver(name)`` returns the
    attached pool of that name (needed for slot messages).

    Large buffers come back zero-copy and read-only: numpy arrays as arrays,
    raw bytes as a read-only ``memoryview`` (with ``exact_types``, objects
    sent as bytes/bytearray come back as such, copied).  ``copy=True`` gives
    private writable copies instead.  Raises SlotError for a reference that
    names no slot in flight.
    """
    if data[0] == 0x80:
        return _loads(data)
    return decode_held(data, resolver, copy=copy, exact_types=exact_types)[0]


_ARRAY_META: Dict[bytes, Tuple[np.dtype, Tuple[int, ...]]] = {}


def _array_meta(meta: bytes, flags: int) -> Tuple[np.dtype, Tuple[int, ...]]:
    found = _ARRAY_META.get(meta)
    if found is None:
        if flags & F_PICKLED_DTYPE:
            (plen,) = _U32.unpack_from(meta, 0)
            dtype = _loads(meta[4 : 4 + plen])
            off = 4 + plen
        else:
            dlen = meta[0]
            dtype = np.dtype(meta[1 : 1 + dlen].decode())
            off = 1 + dlen
        ndim = meta[off]
        found = (dtype, struct.unpack_from(f"<{ndim}q", meta, off + 1))
        if len(_ARRAY_META) > 4096:
            _ARRAY_META.clear()
        _ARRAY_META[meta] = found
    return found


def decode_held(
    data: Any,
    resolver: Optional[Callable[[str], SlotPool]],
    *,
    copy: bool = False,
    exact_types: bool = False,
) -> Tuple[Any, List[int]]:
    """Like :func:`decode`, also returning tokens for :func:`release_tokens`."""
    if data[:3] != MAGIC:
        return _loads(data), []
    try:
        _, kind, flags, nrefs, nlen = _HEAD.unpack_from(data, 0)
        off = _HEAD.size + nlen
        name = bytes(data[_HEAD.size : off]).decode()
        refs = []
        for _ in range(nrefs):
            refs.append(_REF.unpack_from(data, off))
            off += _REF.size
    except (struct.error, UnicodeDecodeError) as exc:
        raise SlotError(f"corrupt slot message: {exc}") from None
    if resolver is None:
        raise SlotError("a slot message needs a pool resolver to be decoded")
    pool = resolver(name)
    tokens: List[int] = []
    anchors: List[Any] = []
    try:
        for index, gen, nbytes in refs:
            anchors.append(_anchor(pool, index, gen, nbytes, tokens))
        if copy or (exact_types and kind == K_RAW and flags & (F_BYTES | F_BYTEARRAY)):
            if kind == K_RAW and flags & F_BYTES:
                anchors = [a.tobytes() for a in anchors]
            else:
                anchors = [bytearray(a) for a in anchors]
            release_tokens(tokens)
            tokens = []
        if kind == K_ARRAY:
            dtype, shape = _array_meta(bytes(data[off:]), flags)
            obj = np.ndarray(shape, dtype, anchors[0])
        elif kind == K_PICKLE:
            obj = _loads(data[off:], buffers=anchors)
        elif kind == K_RAW:
            a = anchors[0]
            obj = a if isinstance(a, (bytes, bytearray)) else memoryview(a)
        else:
            raise SlotError(f"corrupt slot message: unknown kind {kind}")
    except BaseException:
        release_tokens(tokens)
        raise
    return obj, tokens


class Codec:
    """Encoder and decoder for one endpoint of a queue or channel.

    ``pool``: where this process's large buffers go (None: always plain
    pickles).  ``ring``: the ring the messages travel through, used as the
    pool's fence.  Pools named in received messages are attached on first
    sight and cached; :meth:`close` closes them (each stays mapped until the
    views into it die).
    """

    def __init__(
        self,
        pool: Optional[SlotPool] = None,
        *,
        ring: Any = None,
        threshold: int = DEFAULT_THRESHOLD,
        exact_types: bool = False,
    ) -> None:
        if not isinstance(threshold, int) or threshold < 1:
            raise ValueError(f"'threshold' must be a positive int, got {threshold!r}")
        self.pool = pool
        self.threshold = threshold
        self.exact_types = exact_types
        self.fence = RingFence(ring) if ring is not None and pool is not None else None
        if self.fence is not None:
            pool.fence = self.fence
        self._ring = ring
        self._consumer_in = -1
        self._pools: Dict[str, SlotPool] = {}
        self._by_raw_name: Dict[bytes, SlotPool] = {}  # name as it appears in messages
        self._closed = False

    def note_consumer(self) -> None:
        """Call before reading a message off the ring: lists this process
        with the ring (once per process), so that if it dies between reading
        and decoding, the slots of that message are recognised as orphans."""
        if self._consumer_in != _process[0] and self._ring is not None:
            self._ring.segment.add_role(L.ROLE_CONSUMER)
            self._consumer_in = _process[0]

    def encode(self, obj: Any, timeout: Optional[float] = None, deliveries: int = 1) -> Tuple[bytes, Optional[Lease]]:
        """See :func:`encode`."""
        return encode(
            obj, self.pool, threshold=self.threshold, timeout=timeout, deliveries=deliveries, fence=self.fence
        )

    def decode(self, data: Any, *, copy: bool = False) -> Any:
        """See :func:`decode`."""
        if data[0] == 0x80:
            return _loads(data)
        if not copy and data[:3] == MAGIC and len(data) > 8 and data[3] == K_ARRAY and data[5] == 1 and data[6] == 0:
            # One array in one slot (a loan or a top-level array): the hot path.
            off = _HEAD.size + data[7]
            pool = self._by_raw_name.get(data[_HEAD.size : off])
            if pool is not None:
                index, gen, nbytes = _REF.unpack_from(data, off)
                meta = bytes(data[off + _REF.size :])
                found = _ARRAY_META.get(meta) or _array_meta(meta, data[4])
                return np.ndarray(found[1], found[0], _anchor(pool, index, gen, nbytes, None))
        return decode_held(data, self.resolve, copy=copy, exact_types=self.exact_types)[0]

    def decode_held(self, data: Any, *, copy: bool = False) -> Tuple[Any, List[int]]:
        return decode_held(data, self.resolve, copy=copy, exact_types=self.exact_types)

    def resolve(self, name: str) -> SlotPool:
        """The pool ``name``, attached once per codec."""
        pool = self.pool
        if pool is not None and pool.name == name:
            found = pool
        else:
            found = self._pools.get(name)
            if found is None:
                if self._closed:
                    raise ClosedError("codec is closed")
                found = self._pools[name] = SlotPool.attach(name)
        self._by_raw_name[name.encode()] = found
        return found

    def close(self) -> None:
        """Close the pools this codec attached while decoding (not ``pool``)."""
        self._closed = True
        self._by_raw_name = {}
        pools, self._pools = self._pools, {}
        for p in pools.values():
            p.close()
