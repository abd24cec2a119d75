"""The slot pool of a shmq queue: its geometry, and its creation on first use.

A queue's large buffers travel through one :class:`~shmq._slots.SlotPool`
named ``<queue>.p``.  The queue's creator only records how it should look:
POOL_CONFIG in the main ring's header (slot count and slot size, the size 0
for "fitted to the first large buffer"; the whole word 0 for
``zero_copy=False``).  The pool itself is made by whichever process first
puts a large buffer, under the main ring's admin lock, and that process then
sets POOL_MADE in the side ring's header (last: nobody attaches a pool half made).
Every other handle attaches it.  Whoever makes it, the pool is attributed to
the queue's creator, which unlinks it with the queue.
"""
from __future__ import annotations

from typing import Any, Optional, Tuple

from . import _layout as L
from . import _platform as P
from ._codec import largest_buffer
from ._errors import BrokenError, LayoutError, NoFreeName
from ._ring import RingBuffer
from ._slots import SlotPool

__all__ = (
    "DEFAULT_SLOT_SIZE",
    "DEFAULT_SLOT_COUNT",
    "AUTO_POOL_BYTES",
    "MAX_SLOT_COUNT",
    "POOL_MEMBERS",
    "config_word",
    "fitted_geometry",
    "open_pool",
)

#: Defaults of the slot pool for large buffers, made on the first one.  With
#: ``slot_size=None`` (the default) a slot is the first large buffer's size
#: rounded up to a power of two, at least DEFAULT_SLOT_SIZE; the pool reserves
#: at most AUTO_POOL_BYTES and a quarter of the free space of /dev/shm, with
#: fewer slots if need be (at least 2; else DEFAULT_SLOT_SIZE slots).
DEFAULT_SLOT_SIZE = 1 << 20
DEFAULT_SLOT_COUNT = 8
AUTO_POOL_BYTES = 512 << 20
MAX_SLOT_COUNT = 4096
POOL_MEMBERS = 128  # processes using one queue's pool at once
_CREATE_TRIES = 3


def config_word(zero_copy: bool, slot_size: Optional[int], slot_count: int) -> int:
    """The POOL_CONFIG word for a queue's arguments (validated by the caller)."""
    return slot_count << L.POOL_COUNT_SHIFT | (slot_size or 0) if zero_copy else 0


def read_config(main: RingBuffer) -> Tuple[bool, int, int]:
    """``(zero_copy, slot_size, slot_count)`` from the main ring's header
    (slot_size 0: fitted when the pool is made)."""
    config = main.segment.words[L.W_POOL_CONFIG]
    return config != 0, config & ((1 << L.POOL_COUNT_SHIFT) - 1), config >> L.POOL_COUNT_SHIFT


def fitted_geometry(largest: int, slot_count: int, shm_free: Optional[int]) -> Tuple[int, int]:
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


def open_pool(main: RingBuffer, side: RingBuffer, first: Any, owner: bool, largest: Optional[int] = None) -> SlotPool:
    """The slot pool of the queue of ``main`` and ``side``: attached, or
    created now if nobody did yet, sized for ``first`` (the object being put)
    or ``largest`` (bytes: a loan) when its size is fitted.  ``owner``: this process created the queue (it
    keeps the pool's name; another maker hands it over).  Raises
    SharedMemoryFull, or BrokenError if the pool was removed."""
    name = P.part_name(main.name, "p")
    # Under the lock its creator publishes it under: never a pool half made.
    with main.segment.admin_lock():
        if not side.segment.words[L.W_POOL_MADE]:
            return _create(main, side, name, first, owner, largest)
    try:
        return SlotPool.attach(name)
    except FileNotFoundError as exc:
        raise BrokenError(f"the slot pool of queue {main.name!r} is gone (was the queue unlinked?)") from exc


def _create(
    main: RingBuffer, side: RingBuffer, name: str, first: Any, owner: bool, largest: Optional[int] = None
) -> SlotPool:
    """Create the pool and publish its name (admin lock held)."""
    _, slot_size, slot_count = read_config(main)
    if not slot_size:
        if largest is None:
            largest = largest_buffer(first)
        slot_size, slot_count = fitted_geometry(largest, slot_count, P.shm_free_bytes())
    for _ in range(_CREATE_TRIES):
        try:
            pool = SlotPool.create(slot_size, slot_count, name=name, max_members=POOL_MEMBERS, link=main.name)
            break
        except FileExistsError:
            # Left by a process killed while making it: complete and ours, or removed.
            try:
                pool = SlotPool.attach(name)
            except (FileNotFoundError, LayoutError):
                P.shm_unlink(name)
                continue
            if pool.link == main.name:
                break
            pool.close()
            P.shm_unlink(name)
    else:
        raise NoFreeName(f"could not create the slot pool {name!r} of queue {main.name!r}: the name stays taken")
    sw = side.segment.words
    try:
        w, mw = pool.segment.words, main.segment.words
        # Attributed to the queue's creator, like a blob: `shmq gc` keeps it while the queue lives.
        w[L.W_CREATOR_PID] = mw[L.W_CREATOR_PID]
        w[L.W_CREATOR_START_US] = mw[L.W_CREATOR_START_US]
        if not owner:
            pool.segment.disown()  # the queue's owner unlinks it with the queue
        sw[L.W_POOL_MADE] = 1
        # The owner unlinks the main ring first and the pool last: if the
        # ring is still there, the owner's unlink will also remove the pool.
        main.segment.check_exists()
    except BaseException:
        sw[L.W_POOL_MADE] = 0
        pool.close()
        P.shm_unlink(name)
        raise
    return pool
