"""The side path of a shmq queue: items whose pickle is too long for its ring.

A producer writes the pickle into a segment of its own, a *blob* (kind 3, see
``_layout``) named ``<queue>.b<16 hex digits>``.  Then, holding room in both
rings, it publishes a 16-byte record in the queue's *side ring*
``<queue>.s`` -- the pickle's length and the blob's number -- and an empty
*marker* record in the main ring, which keeps the item's place in the order
and in ``qsize()``/``maxsize``.  A consumer that reads a marker takes the
oldest side record with ``peek()``, decodes the blob in place, and only then
releases the record and unlinks the blob: a consumer killed meanwhile leaves
the item to the others.  A side record whose marker was read by a consumer
that died, or whose producer died before writing the marker, is an *orphan*:
any consumer that finds the main ring empty takes it.

Blob bytes in flight are bounded by the side ring's SIDE_LIMIT (one item is
always admitted when none is in flight): the side path has back-pressure too.

Nothing here blocks (the queue waits: ``shmq.queue``).  What is read from
shared memory is checked before it is used: a side record that does not name
one of this queue's blobs, a blob whose header does not match its record, or
ring indices outside the ring raise ``BrokenError``; only a segment verified
to be this queue's blob is ever unlinked.
"""
from __future__ import annotations

import secrets
import struct
import threading
from typing import Any, Callable, List

from . import _layout as L
from . import _platform as P
from ._copy import copy_into
from ._errors import BrokenError, LayoutError, NoFreeName
from ._ring import RingBuffer
from ._segment import Segment

__all__ = ("SidePath", "Blob", "NOTHING", "SIDE_RING_BYTES", "check_ring", "blob_names")

SIDE_RING_BYTES = 16 << 10  # about 680 large items in flight
#: A side record: the pickle's length in bytes, the blob's number.
RECORD = struct.Struct("<QQ")
#: Largest blob payload a record may claim (keeps the byte counters in int64).
MAX_BLOB_BYTES = 1 << 56
_BLOB_TRIES = 64
_SIDE_TRIES = 3

#: What :meth:`SidePath.take` returns when another consumer took the item.
NOTHING = object()


def check_ring(ring: RingBuffer) -> None:
    """Raise BrokenError unless ``ring``'s HEAD and TAIL could have been
    written by shmq: aligned, HEAD <= TAIL <= HEAD + capacity."""
    w = ring.segment.words
    # HEAD before and after TAIL: both only grow, so a live ring always has
    # head <= tail <= later head + capacity, however busy (one read of each
    # could mix two moments).
    head = w[L.W_HEAD]
    tail = w[L.W_TAIL]
    later = w[L.W_HEAD]
    if head < 0 or (head | tail) & 7 or not head <= tail <= later + ring.capacity_bytes or later < head:
        raise BrokenError(
            f"ring {ring.name!r} is corrupt: HEAD {head}, TAIL {tail} for a capacity of "
            f"{ring.capacity_bytes} bytes (was its memory written by something else?)"
        )


class Blob:
    """A blob this process made: ``name``, ``nbytes`` of payload, its
    ``number``; ``published`` once a side record names it."""

    __slots__ = ("name", "nbytes", "number", "published")

    def __init__(self, name: str, nbytes: int, number: int) -> None:
        self.name = name
        self.nbytes = nbytes
        self.number = number
        self.published = False


class SidePath:
    """The side ring of the queue whose main ring is ``main``, and its blobs.

    Make with :meth:`create` (the queue's creator) or :meth:`attach`.
    Threads of a process share one SidePath: a thread lock per direction
    serialises the rings' reserve() and peek() state of this handle."""

    def __init__(self, main: RingBuffer, side: RingBuffer) -> None:
        self.main = main
        self.ring = side
        self.queue_name = main.name
        self._mw = main.segment.words
        self._sw = side.segment.words
        self._blob_stem = main.name + ".b"
        self.reset_locks()

    def reset_locks(self) -> None:
        """New thread locks (a forked child must not inherit held ones)."""
        self._put_tlock = threading.Lock()
        self._get_tlock = threading.Lock()

    # -- construction -----------------------------------------------------------
    @classmethod
    def create(cls, main: RingBuffer, limit: int, ring_type: Callable[..., Any]) -> "SidePath":
        """Create the side ring ``<queue>.s`` (a ``ring_type``, the blocking
        Ring) admitting ``limit`` blob bytes in flight.  A side ring of that
        name whose creator is dead (left by a killed queue of the same name)
        is removed first.  Raises FileExistsError if a live segment has the
        name, NoFreeName if it stays taken."""
        name = P.part_name(main.name, "s")
        for _ in range(_SIDE_TRIES):
            try:
                side = ring_type.create(SIDE_RING_BYTES, name=name)
                break
            except FileExistsError:
                _remove_dead_side_ring(name, ring_type)
        else:
            raise NoFreeName(f"could not create the side ring {name!r}: the name stays taken")
        w = side.segment.words
        w[L.W_SIDE_LIMIT] = limit
        w[L.W_QUEUE_KIND] = L.QUEUE_KIND_SIDE
        return cls(main, side)

    @classmethod
    def attach(cls, main: RingBuffer, ring_type: Callable[..., Any]) -> "SidePath":
        """Attach the side ring of ``main``.  Raises FileNotFoundError or
        LayoutError (not a side ring)."""
        side = ring_type.attach(P.part_name(main.name, "s"))
        if side.segment.words[L.W_QUEUE_KIND] != L.QUEUE_KIND_SIDE:
            side.close()
            raise LayoutError(f"{side.name!r} is not the side ring of queue {main.name!r}")
        return cls(main, side)

    # -- producing --------------------------------------------------------------
    def admits(self, nbytes: int) -> bool:
        """Whether the side path takes ``nbytes`` more now."""
        sw = self._sw
        in_flight = sw[L.W_SIDE_BYTES_IN] - sw[L.W_SIDE_BYTES_OUT]
        # An empty side ring means nothing is in flight, whatever the counters
        # say (a process killed between two updates can skew them).
        return in_flight <= 0 or in_flight + nbytes <= sw[L.W_SIDE_LIMIT] or self.ring.empty()

    def room_for(self, nbytes: int) -> bool:
        """Whether a record and its marker fit now and the limit admits
        ``nbytes`` (a hint: no lock)."""
        return self.main.can_write(0) and self.ring.can_write(RECORD.size) and self.admits(nbytes)

    def make_blob(self, data: Any) -> Blob:
        """Copy ``data`` (a bytes-like) into a new blob of this queue, not yet
        published (remove it with :meth:`discard` if it never is).  Raises
        SharedMemoryFull, or NoFreeName if no free name turned up."""
        nbytes = len(data)
        for _ in range(_BLOB_TRIES):
            number = secrets.randbits(64)
            name = f"{self._blob_stem}{number:016x}"
            try:
                seg = Segment.create(L.KIND_BLOB, L.blob_segment_size(nbytes), name)
                break
            except FileExistsError:
                continue
        else:
            raise NoFreeName(f"no free name for a large item of queue {self.queue_name!r} in {_BLOB_TRIES} tries")
        try:
            w = seg.words
            w[L.W_BLOB_BYTES] = nbytes
            # Attributed to the queue's creator, so `shmq gc` keeps it while the queue lives.
            w[L.W_CREATOR_PID] = self._mw[L.W_CREATOR_PID]
            w[L.W_CREATOR_START_US] = self._mw[L.W_CREATOR_START_US]
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
        return Blob(name, nbytes, number)

    def discard(self, blob: Blob) -> None:
        """Remove a blob that was never published (if it was, a consumer or
        the queue's owner removes it)."""
        if not blob.published:
            P.shm_unlink(blob.name)

    def try_publish(self, blob: Blob) -> bool:
        """Publish ``blob``'s side record and its marker, both or neither.
        False if there is no room now (or the limit does not admit it)."""
        main, side = self.main, self.ring
        record = RECORD.pack(blob.nbytes, blob.number)
        with self._put_tlock:
            if main.reserve(0) is None:  # holds the main producer lock until commit/abort
                return False
            try:
                view = side.reserve(RECORD.size)
                if view is None:
                    main.abort()
                    return False
                if not self.admits(blob.nbytes):
                    view.release()
                    side.abort()
                    main.abort()
                    return False
                view[:] = record
                view.release()
                self._sw[L.W_SIDE_BYTES_IN] += blob.nbytes
                blob.published = True  # (just before: a commit cut short may still publish)
                side.commit()
            except BaseException:
                side.abort()
                main.abort()
                raise
            main.commit()
        return True

    # -- consuming --------------------------------------------------------------
    def orphan_waiting(self) -> bool:
        """A side record waits that no live consumer is taking: its marker
        was read by a consumer that died, or its producer died before
        publishing the marker.  (True too if the side ring's indices are
        corrupt, so that :meth:`take` reports it.)"""
        sw = self._sw
        head, tail = sw[L.W_HEAD], sw[L.W_TAIL]
        if head == tail:
            return False
        owner = sw[L.W_CONSUMER_LOCK]
        return owner == 0 or not P.is_alive(owner) or not 0 < tail - head <= self.ring.capacity_bytes

    def take(self, decode: Callable[[memoryview], Any]) -> Any:
        """Take the oldest large item: ``decode`` (of a read-only view of the
        blob's payload), or NOTHING if another consumer took it.  The record
        stays in the side ring until ``decode`` returned (or raised: the
        item is consumed either way), then the blob is unlinked.  Raises
        BrokenError if the record does not name one of this queue's blobs
        (the record is dropped; nothing is unlinked) or the blob is gone."""
        side = self.ring
        with self._get_tlock:
            check_ring(side)
            view = side.peek()  # holds the side consumer lock until release()
            if view is None:
                return NOTHING
            try:
                record = bytes(view)
            finally:
                view.release()
            counted = 0
            ours = None  # the blob's name, once verified to be this queue's
            try:
                if len(record) != RECORD.size:
                    raise BrokenError(
                        f"a side record of queue {self.queue_name!r} is {len(record)} bytes long, "
                        f"not {RECORD.size}: the queue's memory was written by something else"
                    )
                nbytes, number = RECORD.unpack(record)
                if not 0 < nbytes <= MAX_BLOB_BYTES:
                    raise BrokenError(f"a side record of queue {self.queue_name!r} claims {nbytes} bytes")
                counted = nbytes
                name = f"{self._blob_stem}{number:016x}"
                seg = self._open_blob(name, nbytes)
                ours = name
                try:
                    view = seg.buf[L.DATA_OFFSET : L.DATA_OFFSET + nbytes]
                    readonly = view.toreadonly()
                    try:
                        return decode(readonly)
                    finally:
                        readonly.release()
                        view.release()
                finally:
                    seg.close()
            finally:
                if counted:
                    self._count_out(counted)
                side.release()  # the item is taken: from here on it is this consumer's
                if ours is not None:
                    P.shm_unlink(ours)

    def _open_blob(self, name: str, nbytes: int) -> Segment:
        """Attach blob ``name`` and check that it is the one its record
        describes: a blob of ``nbytes``, attributed to this queue's creator."""
        try:
            seg = Segment.attach(name, L.KIND_BLOB)
        except FileNotFoundError as exc:
            raise BrokenError(
                f"a large item of queue {self.queue_name!r} is gone: {name!r} was removed (was the queue unlinked?)"
            ) from exc
        except (LayoutError, OSError) as exc:
            raise BrokenError(f"a side record of queue {self.queue_name!r} names {name!r}, not a blob") from exc
        w, mw = seg.words, self._mw
        if (
            w[L.W_BLOB_BYTES] != nbytes
            or L.DATA_OFFSET + nbytes > seg.size
            or w[L.W_CREATOR_PID] != mw[L.W_CREATOR_PID]
            or w[L.W_CREATOR_START_US] != mw[L.W_CREATOR_START_US]
        ):
            found = w[L.W_BLOB_BYTES]
            seg.close()
            raise BrokenError(
                f"blob {name!r} does not match the side record of queue {self.queue_name!r} "
                f"({found} bytes, the record says {nbytes}, or another creator): left in place"
            )
        return seg

    def _count_out(self, nbytes: int) -> None:
        sw = self._sw
        out = sw[L.W_SIDE_BYTES_OUT] + nbytes
        # (a corrupt counter must not overflow the word: resynchronise instead)
        sw[L.W_SIDE_BYTES_OUT] = out if out < 1 << 62 else sw[L.W_SIDE_BYTES_IN]

    # -- lifetime ---------------------------------------------------------------
    def blob_names(self) -> List[str]:
        """Names of this queue's blobs now in /dev/shm."""
        return blob_names(self.queue_name)

    def close(self) -> None:
        self.ring.close()


def _remove_dead_side_ring(name: str, ring_type: Callable[..., Any]) -> None:
    """Unlink ``name`` if it is a side ring whose creator is dead (or a
    segment left half made); raise FileExistsError if it is anything else."""
    try:
        old = ring_type.attach(name)
    except FileNotFoundError:
        return
    except LayoutError:  # never published: its creator was killed making it
        P.shm_unlink(name)
        return
    try:
        dead_side = old.segment.words[L.W_QUEUE_KIND] == L.QUEUE_KIND_SIDE and not old.creator_alive()
    finally:
        old.close()
    if not dead_side:
        raise FileExistsError(f"{name!r}, the name of a queue's side ring, is taken by a live segment")
    P.shm_unlink(name)


def blob_names(queue_name: str) -> List[str]:
    """Names of the blobs of queue ``queue_name`` now in /dev/shm."""
    stem = queue_name + ".b"
    return [n for n in P.list_shm_names() if n.startswith(stem) and P.owner_of(n) == queue_name]
