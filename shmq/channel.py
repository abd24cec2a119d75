"""Channels: objects between processes, large buffers zero-copy, with an end.

A channel is a ring (the messages) plus a slot pool (the large buffers)::

    tx, rx = shmq.open_channel(slot_size=16 << 20, slot_count=8)

    # producer: copy path -- an existing array is copied once, into a slot
    tx.send({"frame": frame, "meta": {...}})
    # producer: loan path -- build the array in the slot, nothing is copied
    with tx.loan_array((1080, 1920, 3), "uint8") as a:
        render_into(a)                        # sent when the block ends
    tx.close()                                # the stream is finished

    # consumer, any process (pass rx to it, or ReceiveChannel.attach(name))
    for msg in rx:                            # stops after the last message
        ...                                   # arrays are read-only views of the slots

Small objects travel through the ring as pickles, exactly like a queue.
Buffers of at least ``threshold`` bytes (numpy arrays anywhere in the object,
or a top-level bytes-like) go through the pool: the sender copies them into
free slots (or wrote them there in place, with a loan) and only the slot
references travel.  The receiver gets read-only views of the slots; a slot is
returned to its source when the last view of it is gone.  A sender that finds
no free slot waits for one (back-pressure), up to its ``timeout``.

Close semantics follow trio's memory channels, across processes.  Every
endpoint is a *counted handle*; the channel's ring header keeps, per process,
how many send and receive handles it holds (``_layout``: the member table).

* Every send handle closed: receivers drain what is left, then ``receive()``
  raises :class:`~shmq.EndOfChannel` (and ``for x in rx`` stops).  If a process
  died holding a send handle (SIGKILL, a crash in native code), the stream was
  cut, not finished: after the drain receivers get :class:`~shmq.BrokenError`
  naming that process.
* Every receive handle closed (or its process dead): ``send()``, ``loan()``
  raise BrokenError at once, also in a sender blocked on a full ring or pool.
* Both states are persistent.  ``clone()`` makes another counted handle of the
  same side; ``close()`` is idempotent; using a closed handle raises
  ClosedError.  A process that exits normally (also by an exception) closes
  its handles; a killed one is found dead by the next peer that waits (blocked
  calls re-check in slices of ``SLICE_SECONDS``) and counts as closed from then.
* An endpoint pickles as the channel's name plus a *reservation*: one counted
  handle held for whoever unpickles it (a child process), so a parent may
  close its own handle right after starting the child.  An unclaimed
  reservation lapses after ``RESERVE_SECONDS``.  A forked child's inherited
  endpoints are counted handles of the child, reserved the same way at fork.
"""
from __future__ import annotations

import atexit
import os
import sys
import threading
import time
import warnings
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence, Tuple, TypeVar, Union

import numpy as np

from . import _codec
from . import _layout as L
from ._codec import DEFAULT_THRESHOLD, Codec
from ._errors import (
    BrokenError,
    ClosedError,
    Empty,
    EndOfChannel,
    Full,
    LayoutError,
    MessageTooLarge,
    SlotError,
)
from ._members import RECEIVE, RESERVE_SECONDS, SEND, MemberTable
from ._slots import DEFAULT_MAX_MEMBERS, SlotPool, SlotPoolStatistics
from ._ring import RingStatistics
from ._sync import slice_end
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
    "SLICE_SECONDS",
    "RESERVE_SECONDS",
)

DEFAULT_SLOT_SIZE = 1 << 20
DEFAULT_SLOT_COUNT = 16
#: a blocked send/receive/loan re-checks the peers (closed? dead?) this often
SLICE_SECONDS = 0.1

_SEND, _RECEIVE = SEND, RECEIVE
_E = TypeVar("_E", bound="_Endpoint")
_SIDE_NAMES = ("send", "receive")
# Sending stops once every receiver is gone, or once every sender had closed
# (a sender attached after the end must not add to a finished stream).
_SEND_STOPPED = L.CH_RECEIVERS_DONE | L.CH_SENDERS_DONE
_W_STATE = L.W_CH_STATE

_monotonic = time.monotonic


def _slice_of(deadline: Optional[float]) -> float:
    """Seconds of the next wait slice before ``deadline`` (None = no deadline)."""
    if deadline is None:
        return SLICE_SECONDS
    left = deadline - _monotonic()
    return SLICE_SECONDS if left > SLICE_SECONDS else (left if left > 0.0 else 0.0)


@dataclass(frozen=True)
class ChannelStatistics:
    """A snapshot of a channel's ring and pool counters and of its holders."""

    #: the ring carrying the messages (small objects, slot references)
    ring: RingStatistics
    #: the pool carrying the large buffers
    pool: SlotPoolStatistics
    #: open send handles in every process (reserved ones included; dead processes not)
    open_senders: int
    #: open receive handles in every process
    open_receivers: int


def _wake(ring: Ring, pool: SlotPool, bits: int) -> None:
    """Ring the doorbells of the peers that ``bits`` concern, so that a
    blocked receive (senders done) or send (receivers done) re-checks now
    rather than at the end of its slice."""
    w = ring.segment.words
    if bits & L.CH_SENDERS_DONE and w[L.W_CONSUMER_WAITING]:
        bell = getattr(ring, "_not_empty", None)
        if bell is not None:
            bell.ring()
    if bits & L.CH_RECEIVERS_DONE:
        bell = getattr(ring, "_not_full", None)
        if bell is not None and w[L.W_PRODUCER_WAITING]:
            bell.ring()
        bell = getattr(pool, "_bell", None)
        if bell is not None and pool.segment.words[L.W_RETURN_WAITING]:
            bell.ring()


class _Shared:
    """The ring, pool and codec behind the endpoints of one attachment, and
    the attachment's entry in the channel's member table."""

    def __init__(
        self,
        ring: Ring,
        pool: SlotPool,
        threshold: int,
        senders: int,
        receivers: int,
        ticket: Optional[Tuple[int, int]] = None,
    ) -> None:
        self.ring = ring
        self.pool = pool
        self.name = pool.name
        self.words = ring.segment.words
        self.members = MemberTable(ring.segment)
        self._lock = threading.Lock()
        self._fork_ticket: Optional[Tuple[int, int]] = None
        self.entry = -1
        if ticket is not None:
            entry, claimed_senders, claimed_receivers = self.members.claim(ticket)
            if entry >= 0:
                self.entry, senders, receivers = entry, claimed_senders, claimed_receivers
        if self.entry < 0:  # no ticket, or it lapsed: count the handles anew
            self.entry = self.members.join(senders, receivers)
        self.handles = [senders, receivers]
        self.dormant = 0  # endpoints here that were inherited by fork, not passed (see _after_mp_child)
        self.inherited = False  # came through os.fork: not sorted into passed/dormant yet
        self.exited = self.unmapped = False
        self.endpoints: "weakref.WeakSet[_Endpoint]" = weakref.WeakSet()
        self.codec = Codec(pool, ring=ring, threshold=threshold)
        _live.add(self)
        _hook_exit()

    # -- counting ---------------------------------------------------------
    def retain(self, side: int) -> None:
        """One more open handle of ``side`` here (clone, revival)."""
        with self._lock:
            if self.exited:
                raise ClosedError(f"channel {self.name!r} was closed in this process at exit")
            if self.entry < 0:
                self.entry = self.members.join(side == _SEND, side == _RECEIVE)
            else:
                self.members.change(self.entry, side == _SEND, side == _RECEIVE)
            self.handles[side] += 1

    def release(self, side: int, *, dormant: int = 0) -> None:
        """One handle of ``side`` closed (``dormant``: it stays in this process
        uncounted, +1, or such a handle is gone now, -1).  The last handle
        here frees the entry; once none is left, counted or dormant, the
        channel is unmapped here."""
        with self._lock:
            bits = 0
            if side >= 0 and self.entry >= 0 and self.handles[side] > 0:
                self.handles[side] -= 1
                if any(self.handles):
                    bits = self.members.change(self.entry, -(side == _SEND), -(side == _RECEIVE))
                else:
                    bits = self.members.leave(self.entry)
                    self.entry = -1
            self.dormant += dormant
            unmap = self.entry < 0 and not self.dormant and not self.unmapped and not any(self.handles)
            if unmap:
                self.unmapped = True
        if bits:
            _wake(self.ring, self.pool, bits)
        if unmap:
            _live.discard(self)
            self.codec.close()
            self.pool.close()
            self.ring.close()

    def release_all(self) -> None:
        """At process exit: every handle here counts as closed (the mappings
        stay until the interpreter ends)."""
        with self._lock:
            self.exited = True
            if self.entry < 0:
                return
            bits = self.members.leave(self.entry)
            self.entry = -1
            self.handles = [0, 0]
        if bits:
            _wake(self.ring, self.pool, bits)

    def reserve(self, side: int) -> Tuple[int, int]:
        """A ticket for one handle of ``side``, counted from now on."""
        return self.members.reserve(side == _SEND, side == _RECEIVE)

    # -- fork ---------------------------------------------------------------
    def before_fork(self) -> None:
        self._fork_ticket = None
        if self.entry >= 0 and any(self.handles):
            self._fork_ticket = self.members.reserve(*self.handles)

    def after_fork_in_child(self) -> None:
        self._lock = threading.Lock()
        self.inherited = True
        ticket, self._fork_ticket = self._fork_ticket, None
        if ticket is None:
            self.entry, self.handles = -1, [0, 0]  # nothing to inherit: the handles here are uncounted
            return
        self.entry, senders, receivers = self.members.claim(ticket)
        if self.entry < 0:
            self.entry = self.members.join(*self.handles)
        else:
            self.handles = [senders, receivers]

    # -- what happened ----------------------------------------------------
    def why_receive_ended(self) -> Exception:
        """EndOfChannel, or BrokenError if a sender died without closing."""
        if self.members.state() & L.CH_SENDER_DIED:
            return BrokenError(
                f"channel {self.name!r} is broken: sender process {self.members.dead_pid(_SEND)} died without "
                f"closing its send channel; everything it sent before was received"
            )
        return EndOfChannel(f"channel {self.name!r} ended: every sender closed and everything sent was received")

    def why_send_stopped(self) -> BrokenError:
        state = self.members.state()
        if state & L.CH_RECEIVERS_DONE:
            if state & L.CH_RECEIVER_DIED:
                return BrokenError(
                    f"channel {self.name!r} is broken: no receiver is left (receiver process "
                    f"{self.members.dead_pid(_RECEIVE)} died without closing its receive channel)"
                )
            return BrokenError(f"channel {self.name!r} is broken: every receiver closed")
        return BrokenError(f"channel {self.name!r} has ended: every sender had closed before this send")

    def check_send(self) -> None:
        """Between wait slices: look for dead receivers, raise BrokenError if
        sending has stopped."""
        self.members.maybe_scan()
        if self.members.state() & _SEND_STOPPED:
            raise self.why_send_stopped()

    def statistics(self) -> ChannelStatistics:
        self.members.scan()
        senders, receivers = self.members.counts()
        return ChannelStatistics(self.ring.statistics(), self.pool.statistics(), senders, receivers)


# -- the process's attachments: exit and fork ------------------------------------
_live: "weakref.WeakSet[_Shared]" = weakref.WeakSet()
_exit_hook_pid = 0


def _release_all_at_exit() -> None:
    for shared in list(_live):
        try:
            shared.release_all()
        except Exception:  # a closed or removed segment: nothing left to count
            pass


_atexit_registered = False


class _AfterForkToken:
    """multiprocessing keeps after-fork callbacks by a weak reference to an object."""


_after_fork_token = _AfterForkToken()
_after_fork_registered = False


def _hook_exit() -> None:
    """multiprocessing's fork and forkserver children end in os._exit(), which
    skips atexit; they run multiprocessing's exit finalizers instead.  Its
    children clear the finalizers at start (after unpickling their arguments)
    and then run its after-fork callbacks: register again from one of those."""
    global _exit_hook_pid, _after_fork_registered, _atexit_registered
    if not _atexit_registered:
        # Registered after the segments' own finalizers (weakref.finalize's
        # atexit hook), so it runs before they unmap: atexit runs LIFO.
        _atexit_registered = True
        atexit.register(_release_all_at_exit)
    pid = os.getpid()
    if _exit_hook_pid == pid:
        return
    mp_util = sys.modules.get("multiprocessing.util")
    if mp_util is None:
        return  # not using multiprocessing (yet): atexit does it
    _exit_hook_pid = pid
    mp_util.Finalize(None, _release_all_at_exit, exitpriority=10)
    if not _after_fork_registered:
        _after_fork_registered = True
        mp_util.register_after_fork(_after_fork_token, _after_mp_child)


def _after_mp_child(_token: object) -> None:
    """In a multiprocessing child, once it knows its Process object: a forked
    child keeps counted handles only of the endpoints it was *passed* (in the
    Process's arguments or attributes), as a spawned child would get; the
    others it merely inherited go dormant (uncounted, counted again on first
    use), so that a producer child does not keep the receive side open."""
    global _exit_hook_pid
    _exit_hook_pid = 0
    inherited = [shared for shared in list(_live) if shared.inherited]
    if inherited:
        mp = sys.modules.get("multiprocessing")
        passed: set = set()
        if mp is not None:
            _collect_endpoints(vars(mp.current_process()), passed, 3)
        for shared in inherited:
            shared.inherited = False
            for endpoint in list(shared.endpoints):
                if id(endpoint) not in passed and endpoint._shared is shared:
                    endpoint._go_dormant()
    if _live:
        _hook_exit()


def _collect_endpoints(obj: Any, found: set, depth: int) -> None:
    """Add id() of every endpoint in ``obj``, looking ``depth`` containers deep."""
    if isinstance(obj, _Endpoint):
        found.add(id(obj))
    elif depth <= 0:
        return
    elif isinstance(obj, dict):
        for value in list(obj.values()):
            _collect_endpoints(value, found, depth - 1)
    elif isinstance(obj, (tuple, list, set, frozenset)):
        for value in list(obj):
            _collect_endpoints(value, found, depth - 1)
    elif hasattr(obj, "__self__") and not isinstance(obj, type):  # a bound method as the target
        _collect_endpoints(getattr(obj, "__self__", None), found, depth - 1)
        _collect_endpoints(getattr(getattr(obj, "__self__", None), "__dict__", None), found, depth - 1)


def _before_fork() -> None:
    for shared in list(_live):
        try:
            shared.before_fork()
        except Exception:
            shared._fork_ticket = None


def _after_fork_in_parent() -> None:
    for shared in list(_live):
        shared._fork_ticket = None


def _after_fork_in_child() -> None:
    global _exit_hook_pid
    _exit_hook_pid = 0
    shared_list = list(_live)
    for shared in shared_list:
        try:
            shared.after_fork_in_child()
        except Exception:
            shared.entry, shared.handles = -1, [0, 0]
    if shared_list:
        _hook_exit()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(before=_before_fork, after_in_parent=_after_fork_in_parent, after_in_child=_after_fork_in_child)


# -- making channels ----------------------------------------------------------------
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
    """Create a channel; returns ``(send_channel, receive_channel)``, one
    counted handle of each side.

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
        MemberTable.initialise(ring.segment)
        pool = SlotPool.create(slot_size, slot_count, name=name, max_members=max_members, link=ring.name)
    except BaseException:
        ring.unlink()
        ring.close()
        raise
    try:
        shared = _Shared(ring, pool, threshold, 1, 1)
    except BaseException:
        pool.unlink()
        pool.close()
        ring.unlink()
        ring.close()
        raise
    return SendChannel(shared, _token=_TOKEN), ReceiveChannel(shared, _token=_TOKEN)


def _attach(
    name: str, senders: int, receivers: int, threshold: int = DEFAULT_THRESHOLD, ticket: Optional[Tuple[int, int]] = None
) -> _Shared:
    pool = SlotPool.attach(name)
    ring = None
    try:
        link = pool.link
        if not link:
            raise LayoutError(f"{name!r} is a slot pool without a ring, not a channel")
        ring = Ring.attach(link)
        if not MemberTable.is_channel(ring.segment):
            raise LayoutError(f"{name!r} is not a channel: its ring {link!r} has no member table")
        return _Shared(ring, pool, threshold, senders, receivers, ticket)
    except BaseException:
        if ring is not None:
            ring.close()
        pool.close()
        raise


def attach_channel(name: str, *, threshold: int = DEFAULT_THRESHOLD) -> Tuple["SendChannel", "ReceiveChannel"]:
    """Open both endpoints of the channel ``name`` created by any process:
    one counted handle of each side.  A process that only receives should
    close the sender (or use :meth:`ReceiveChannel.attach`), or the channel
    never ends while it lives; likewise a process that only sends.

    Raises FileNotFoundError, PermissionError, LayoutError if ``name`` is not
    an shmq channel of this layout version, TooManyMembers if
    ``CH_MEMBERS`` processes hold it already."""
    shared = _attach(name, 1, 1, threshold)
    return SendChannel(shared, _token=_TOKEN), ReceiveChannel(shared, _token=_TOKEN)


def _unpickle_endpoint(side: int, name: str, threshold: int, ticket: Tuple[int, int]) -> "_Endpoint":
    """An endpoint pickled in another process: claims the handle reserved for
    it (or, once that lapsed, counts a new one)."""
    shared = _attach(name, side == _SEND, side == _RECEIVE, threshold, ticket)
    return _CLASSES[side](shared, _token=_TOKEN)


def _unclosed(shared: _Shared, side: int, what: str) -> None:
    # weakref.finalize callback: takes no reference to the endpoint itself
    warnings.warn(f"unclosed {what}: closed when collected", ResourceWarning, stacklevel=2)
    shared.release(side)


class _Endpoint:
    _shared: Optional[_Shared] = None  # None: closed (or dormant)
    _dormant: Optional[_Shared] = None  # inherited by fork, not passed: counted on first use
    _side = _SEND

    def __init__(self, shared: _Shared, *, _token: object = None) -> None:
        if _token is not _TOKEN:
            raise TypeError("use open_channel() or attach_channel()")
        self._shared = shared
        self.name = shared.name
        self._ring = shared.ring
        self._pool = shared.pool
        self._codec = shared.codec
        self._w = shared.words
        self._watch(shared)
        shared.endpoints.add(self)

    def _watch(self, shared: _Shared) -> None:
        # Not closed when collected in trio; here a leaked handle would keep
        # the channel from ending for as long as its process lives.
        self._finalizer = weakref.finalize(self, _unclosed, shared, self._side, f"{type(self).__name__} {self.name!r}")
        self._finalizer.atexit = False

    def _go_dormant(self) -> None:
        """Uncount this handle in this process (inherited by fork, not passed)."""
        shared, self._shared = self._shared, None
        if shared is not None:
            self._dormant = shared
            self._finalizer.detach()
            shared.release(self._side, dormant=1)

    def _revive(self) -> _Shared:
        """The attachment of a dormant handle, counted again (first use in a
        forked child that was not passed it); ClosedError for a closed one."""
        shared = self._dormant
        if shared is None:
            raise ClosedError(f"{type(self).__name__} {self.name!r} is closed")
        shared.retain(self._side)
        self._dormant = None
        shared.release(-1, dormant=-1)
        self._watch(shared)
        self._shared = shared
        return shared

    @classmethod
    def attach(cls: "type[_E]", name: str, *, threshold: int = DEFAULT_THRESHOLD) -> _E:
        """Open one counted handle of this side of the channel ``name``
        created by any process (``attach_channel`` opens both).  Raises as
        :func:`attach_channel`."""
        side = cls._side
        return cls(_attach(name, side == _SEND, side == _RECEIVE, threshold), _token=_TOKEN)

    def _check(self) -> _Shared:
        shared = self._shared
        if shared is None:
            shared = self._revive()  # raises ClosedError unless dormant
        return shared

    @property
    def closed(self) -> bool:
        return self._shared is None and self._dormant is None

    def clone(self: _E) -> _E:
        """Another counted handle of the same side of the same channel: the
        side stays open until every handle of it is closed.  Raises
        ClosedError if this handle is closed."""
        shared = self._check()
        shared.retain(self._side)
        return type(self)(shared, _token=_TOKEN)

    def close(self) -> None:
        """Close this handle (idempotent).  The last send handle closed ends
        the stream for the receivers; the last receive handle closed makes
        every send fail with BrokenError.  Views already received stay
        valid until they die."""
        shared, self._shared = self._shared, None
        if shared is not None:
            self._finalizer.detach()
            shared.release(self._side)
        dormant, self._dormant = self._dormant, None
        if dormant is not None:
            dormant.release(-1, dormant=-1)

    def unlink(self) -> None:
        """Remove the channel's names (ring, pool, semaphores) for everybody.
        Handles already open keep working."""
        self._pool.unlink()
        self._ring.unlink()

    def statistics(self) -> ChannelStatistics:
        """Ring and pool counters and the open handles, as every attached
        process sees them (dead holders are looked for first)."""
        return self._check().statistics()

    def __reduce__(self):
        """The channel's name and a reserved counted handle for the process
        that unpickles it.  Raises ClosedError if this handle is closed."""
        shared = self._check()
        return (_unpickle_endpoint, (self._side, self.name, self._codec.threshold, shared.reserve(self._side)))

    def __enter__(self: _E) -> _E:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r}{' closed' if self.closed else ''}>"


class SendChannel(_Endpoint):
    """The sending end of a channel (from :func:`open_channel`): one counted
    send handle."""

    _side = _SEND

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
        sent), MessageTooLarge if the message can never fit the ring,
        BrokenError once every receiver is gone (also while waiting),
        ClosedError if this handle is closed."""
        shared = self._shared
        if shared is None:
            shared = self._revive()  # raises ClosedError unless dormant
        if self._w[_W_STATE] & _SEND_STOPPED:
            raise shared.why_send_stopped()
        deadline = None if timeout is None else deadline_for(timeout)
        try:
            data, lease = self._codec.encode(obj, _slice_of(deadline))
        except Full:
            if deadline is not None and _monotonic() >= deadline:
                raise
            data, lease = self._encode_waiting(obj, deadline)
        if lease is None:
            if not self._ring.try_write(data):
                self._write_waiting(data, deadline)
            return
        try:
            if not self._ring.try_write(data):
                self._write_waiting(data, deadline)
        except BaseException:
            lease.abort()
            raise
        lease.sent()

    def send_nowait(self, obj: Any) -> None:
        """Send ``obj`` or raise Full (a WouldBlock) at once; BrokenError
        and ClosedError as :meth:`send`."""
        self.send(obj, 0)

    def _encode_waiting(self, obj: Any, deadline: Optional[float]) -> tuple:
        """Encode again after each slice the pool stayed full, re-checking
        the receivers in between."""
        shared = self._check()
        while True:
            shared.check_send()
            try:
                return self._codec.encode(obj, _slice_of(deadline))
            except Full:
                if deadline is not None and _monotonic() >= deadline:
                    raise

    def _write_waiting(self, data: Any, deadline: Optional[float]) -> None:
        """Wait for room in the ring in slices, re-checking the receivers."""
        shared = self._check()
        ring, w = self._ring, self._w
        n = len(data) if type(data) is bytes else memoryview(data).nbytes
        ready = lambda: w[_W_STATE] & _SEND_STOPPED or ring.can_write(n)  # noqa: E731
        while True:
            shared.check_send()
            if deadline is not None and _monotonic() >= deadline:
                raise Full(f"ring {ring.name!r} of channel {self.name!r} stayed full")
            try:
                ring._block_writing(ready, slice_end(deadline, SLICE_SECONDS))
            except Full:
                continue  # one slice over: look at the receivers again
            if not w[_W_STATE] & _SEND_STOPPED and ring.try_write(data):
                return

    def loan(self, nbytes: int, timeout: Optional[float] = None) -> "SendLoan":
        """A free slot to write ``nbytes`` into in place.  Use it as
        ``with tx.loan(n) as buf: buf[:] = ...`` (sent when the block ends,
        dropped if it raises), or call ``.send()``/``.abort()``.  Raises Full
        if no slot frees up within ``timeout``, MessageTooLarge if ``nbytes``
        exceeds the slot size, BrokenError once every receiver is gone."""
        return self._loan(nbytes, None, timeout)

    def loan_array(self, shape: Union[int, Sequence[int]], dtype: Any = float, timeout: Optional[float] = None) -> "SendLoan":
        """Like :meth:`loan`, for a writable C-contiguous numpy array of
        ``shape`` and ``dtype`` living in the slot; the receiver gets a
        read-only array of the same shape and dtype."""
        nbytes, shape, dtype, header = _codec.array_spec(shape, dtype)
        return self._loan(nbytes, (shape, dtype, header), timeout)

    def _loan(self, nbytes: int, array: Optional[tuple], timeout: Optional[float]) -> "SendLoan":
        shared = self._check()
        if self._w[_W_STATE] & _SEND_STOPPED:
            raise shared.why_send_stopped()
        pool = self._pool
        if not 0 <= nbytes <= pool.slot_size:
            raise MessageTooLarge(f"a loan of {nbytes} bytes can never fit a slot of {pool.slot_size} bytes")
        deadline = None if timeout is None else deadline_for(timeout)
        while True:
            try:
                (index,) = pool.allocate(1, _slice_of(deadline))
                break
            except Full:
                if deadline is not None and _monotonic() >= deadline:
                    raise
                shared.check_send()
        return SendLoan(self, index, nbytes, array)

    def collect(self) -> int:
        """Take back the slots receivers have returned now (running
        ``on_return``); returns how many.  ``send`` does this as needed."""
        return self._pool.collect()

    def reclaim(self) -> int:
        """Scan for processes that died holding or lending slots and take
        those slots back now (sends do this at most every 0.1 s when short)."""
        return self._pool.reclaim()


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
            # Over a uint8 array, not the memoryview itself: numpy would keep
            # only the mmap as its base, without an export, and closing the
            # channel would unmap memory the array still points to.
            self.array = np.ndarray(shape, dtype, np.frombuffer(self.buf, np.uint8))
        self._open = True

    def send(self, nbytes: Optional[int] = None, timeout: Optional[float] = None) -> None:
        """Publish the slot (``nbytes`` of it, default all; not for arrays).
        Raises Full if the ring stays full for ``timeout`` seconds, or
        BrokenError once every receiver is gone: the loan stays open then
        (send again, or abort)."""
        if not self._open:
            raise SlotError(f"loan of slot {self.index} was already sent or aborted")
        channel = self._channel
        shared = channel._check()
        if channel._w[_W_STATE] & _SEND_STOPPED:
            raise shared.why_send_stopped()
        if nbytes is None:
            nbytes = self.nbytes
        elif self.array is not None or not 0 <= nbytes <= self.nbytes:
            raise ValueError(f"'nbytes' must be between 0 and {self.nbytes} (and not given for arrays), got {nbytes}")
        deadline = None if timeout is None else deadline_for(timeout)
        pool = self._pool
        fence = channel._codec.fence
        data = _codec.loan_message(pool, self.index, nbytes, array=self._header, fenced=fence is not None)
        try:
            if not channel._ring.try_write(data):
                channel._write_waiting(data, deadline)
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
    """The receiving end of a channel (from :func:`open_channel`): one
    counted receive handle.  Iterating yields messages until the stream ends."""

    _side = _RECEIVE

    def receive(self, timeout: Optional[float] = None, *, copy: bool = False) -> Any:
        """The next object, waiting up to ``timeout`` seconds (Empty if none
        came).  Large buffers are read-only views of their slots, held until
        the last view dies; ``copy=True`` gives private writable copies and
        returns the slots at once.

        Once every sender has closed and the ring is drained: EndOfChannel;
        if a sender's process died without closing: BrokenError naming it
        (after the drain, too).  ClosedError if this handle is closed."""
        if self._shared is None:
            self._revive()  # raises ClosedError unless dormant
        if timeout is not None and timeout < 0:
            deadline_for(timeout)  # raises ValueError, even when a message is there
        codec = self._codec
        codec.note_consumer()
        data = self._ring.try_read()
        if data is None:
            data = self._read_waiting(timeout)
        return codec.decode(data, copy=copy)

    def receive_nowait(self, *, copy: bool = False) -> Any:
        """The next object, or raise Empty (a WouldBlock) at once;
        EndOfChannel/BrokenError/ClosedError as :meth:`receive`."""
        return self.receive(0, copy=copy)

    def receive_loan(self, timeout: Optional[float] = None) -> "ReceiveLoan":
        """The next object as a :class:`ReceiveLoan`, whose slots go back when
        it is released (explicitly, or at the end of a ``with`` block).
        Raises as :meth:`receive`."""
        if self._shared is None:
            self._revive()  # raises ClosedError unless dormant
        codec = self._codec
        codec.note_consumer()
        data = self._ring.try_read()
        if data is None:
            data = self._read_waiting(timeout)
        obj, tokens = codec.decode_held(data)
        return ReceiveLoan(obj, tokens)

    def _read_waiting(self, timeout: Optional[float]) -> bytes:
        """Wait for a record in slices; between them look for dead senders.
        Raises Empty, EndOfChannel or BrokenError."""
        shared = self._check()
        deadline = deadline_for(timeout)
        ring, w, members = self._ring, self._w, shared.members
        ready = lambda: ring.can_read() or w[_W_STATE] & L.CH_SENDERS_DONE  # noqa: E731
        while True:
            data = ring.try_read()
            if data is not None:
                return data
            if w[_W_STATE] & L.CH_SENDERS_DONE:
                # Every sender's last record was published before its count
                # dropped: one more look, and what is not there never comes.
                data = ring.try_read()
                if data is not None:
                    return data
                raise shared.why_receive_ended()
            if deadline is not None and _monotonic() >= deadline:
                if members.maybe_scan() & L.CH_SENDERS_DONE:
                    continue
                raise Empty(f"channel {self.name!r} is empty")
            try:
                ring._block_reading(slice_end(deadline, SLICE_SECONDS), ready)
            except Empty:
                members.maybe_scan()  # one slice over: did a sender die?

    def __iter__(self) -> "ReceiveChannel":
        return self

    def __next__(self) -> Any:
        try:
            return self.receive()
        except EndOfChannel:
            raise StopIteration from None


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
_CLASSES = (SendChannel, ReceiveChannel)
