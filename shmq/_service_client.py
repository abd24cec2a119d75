"""The client side of :mod:`shmq.service`, and what both sides share: the
record formats, the request-entry words, the memory barrier, the encoding.
See the docstring of ``shmq/service.py`` and docs/services.md."""
from __future__ import annotations

import collections
import concurrent.futures as cf
import dataclasses
import itertools
import os
import pickle
import struct
import threading
import time
import traceback
from typing import Any, Callable, Dict, Iterator, List, Optional, Union

from . import _codec
from . import _layout as L
from . import _platform as P
from ._codec import LARGE, stop_at_large
from ._errors import BrokenError, ClosedError, Full, RemoteError, ShmqError
from ._segment import Segment
from ._slots import SlotPool
from ._stats import ClientStatistics, client_statistics
from ._sync import full_fence as _fence  # cancelling and taking are each "store mine, load theirs" (Dekker)
from ._wait import deadline_for, wait_until
from .ring import Ring

__all__ = (
    "Client",
    "ClientStatistics",
    "Future",
    "MAX_OUTSTANDING",
    "NO_SERVER_GRACE",
    "LIVENESS_INTERVAL",
    "LOST_GRACE",
    "MAX_RETRIES",
)

#: requests one client may have outstanding at once
MAX_OUTSTANDING = L.CL_ENTRIES
#: a client with requests nobody took fails them after this long without any live server
NO_SERVER_GRACE = 1.0
#: how often a waiting client checks the liveness of the servers of its requests
LIVENESS_INTERVAL = 0.1
_SLICE = 0.05
#: a request the servers have read past without recording that they took it,
#: for this long, was lost (its server died in between): it is sent again
LOST_GRACE = 0.2
#: times an idempotent call is sent again after its server died
MAX_RETRIES = 3
_RETRY_SEND_SECONDS = 5.0


class _Resolved(Exception):
    """A retry found its call already resolved (cancelled)."""


_OUTCOME_GRACE = 5.0  # an outcome taken off the ring is set within microseconds; this only bounds a bug
_MIN_SLOT = 1 << 20
_POOL_SLOTS = 8
_THRESHOLD = _codec.DEFAULT_THRESHOLD
_RAW_TYPES = (bytes, bytearray)
_dumps = pickle.dumps
_loads = pickle.loads

# Records carry the payload first and a fixed trailer last.  pickle.loads
# ignores the bytes after a pickle's STOP opcode, so a plain pickle is decoded
# from the record as read, without slicing the payload out (a slot message,
# which starts with the codec's magic, is cut off its trailer first).
#
# request trailer: the client's name (its reply ring), then seq (the
# correlation id), entry, flags and the name's length, a fixed 12 bytes at the
# record's end that one unpack reads.  Each client packs it with one struct of
# its own (``_request_trailer``).
_REQ = struct.Struct("<QHBB")
# reply trailer: seq, kind
_REP = struct.Struct("<QB")
K_PARTIAL, K_RESULT, K_ERROR = 1, 2, 3
#: request flag: the client reads partial replies (``stream``); a server
#: sends none to a request without it (``call``/``submit`` would drop them)
F_PARTIALS = 1

# words of a request entry in a client's table (the map is in _layout: any
# process may read the table, e.g. shmq stat)
E_SEQ, E_CANCEL, E_PID, E_START, E_TAKEN, E_DONE = L.CL_SEQ, L.CL_CANCEL, L.CL_PID, L.CL_START, L.CL_TAKEN, L.CL_DONE
ENTRY_WORDS = L.CL_ENTRY_WORDS
_TABLE_BYTES = MAX_OUTSTANDING * ENTRY_WORDS * 8
_TABLE_BASE = L.DATA_OFFSET // 8

_monotonic = time.monotonic
_perf_ns = time.perf_counter_ns
# The same barrier as _fence (an uncontended lock round trip: locked
# instructions), for the server's take path to inline (a call less, ~15 ns).
_fence_lock = threading.Lock()
_fence_acquire = _fence_lock.acquire
_fence_release = _fence_lock.release

# Bumped in the child after a fork: a client made before the fork belongs to
# the parent (cheaper than os.getpid(), a system call, on every call).
_forks = [0]


def _forked() -> None:
    _forks[0] += 1


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forked)


def _link_to_service(replies: Ring, service: str) -> None:
    """Mark ``replies`` as a client's reply ring of ``service`` (its name in
    the header, then the kind), so that ``shmq ls``/``stat``/``top`` show it
    under the service and ``shmq gc`` judges it by its client alone."""
    raw = service.encode()
    if len(raw) >= L.RP_SERVICE_BYTES:
        return  # (names are at most 42 bytes: cannot happen; the ring would show as a plain ring)
    off = L.W_RP_SERVICE * L.WORD
    seg = replies.segment
    seg.buf[off : off + len(raw)] = raw
    seg.words[L.W_QUEUE_KIND] = L.QUEUE_KIND_REPLIES  # last: readers believe the name only with it


def _request_trailer(name: bytes) -> Callable[..., bytes]:
    """``pack(name, seq, entry, flags, len(name))`` for a client named ``name``."""
    if not 0 < len(name) < 256:
        raise ValueError(f"a client name must be 1-255 bytes, got {len(name)}")
    return struct.Struct(f"<{len(name)}sQHBB").pack


def first_pass(obj: Any) -> Any:
    """``obj``'s pickle when it needs no slot (one pickling pass, as a
    queue's put), else _codec.LARGE: it has a buffer worth a slot.  Raises
    the pickling error of an object that does not pickle."""
    try:
        data = _dumps(obj, 5, buffer_callback=stop_at_large)
    except Exception:
        data = _codec.first_pass(obj)  # (again, through the fallbacks: LARGE, or the error)
    if len(data) >= _THRESHOLD and data is not LARGE and type(obj) in _RAW_TYPES:
        return LARGE  # a large bytes-like goes through a slot too
    return data


class ReadWait:
    """Waits until a ring has a record, as ``Ring._block_reading`` does (the
    same wait loop and adaptive spin), but adds its statistics up here and
    writes them into the ring's words (W_EMPTY_WAITS, W_EMPTY_WAIT_NS) only
    at :meth:`flush`: a service flushes every LIVENESS_INTERVAL (client) or
    every _FLUSH_INTERVAL (server), and on close.  Updating the shared
    counters after every wait cost about 0.3 us on each side of a round
    trip, between the wake-up and the read."""

    __slots__ = ("_ring", "_ready", "_bell", "waits", "wait_ns")

    def __init__(self, ring: Ring) -> None:
        self._ring = ring
        self._ready = ring.can_read
        self._bell = ring._not_empty
        self.waits = 0
        self.wait_ns = 0

    def wait(self, until: float) -> bool:
        """True once the ring has a record; False at ``until`` (monotonic)."""
        t0 = _perf_ns()
        ok = wait_until(self._ready, self._bell, until, self._ring.spin)
        self.waits += 1
        self.wait_ns += _perf_ns() - t0
        return ok

    def flush(self) -> None:
        """Add the waits counted since the last flush to the ring's statistics."""
        n, ns = self.waits, self.wait_ns
        if n:
            self.waits = self.wait_ns = 0
            try:
                w = self._ring.segment.words
                # (wrapping at the int64 limit, as Ring does: a peer could have written any value)
                w[L.W_EMPTY_WAITS] = (w[L.W_EMPTY_WAITS] + n + (1 << 63)) % (1 << 64) - (1 << 63)
                w[L.W_EMPTY_WAIT_NS] = (w[L.W_EMPTY_WAIT_NS] + ns + (1 << 63)) % (1 << 64) - (1 << 63)
            except (ClosedError, ValueError):
                pass  # (closed meanwhile: the statistics go with it)


def _drop_message(data: bytes, resolver: Callable[[str], SlotPool]) -> None:
    """Return the slots of a message nobody will decode."""
    if not _codec.is_slot_message(data):
        return
    try:
        _obj, tokens = _codec.decode_held(data, resolver)
        _codec.release_tokens(tokens)
    except (OSError, ShmqError, ValueError):
        pass  # the pool is gone with its process: nothing to return


def _fitted_pool(obj: Any, name: Optional[str], link: str = "") -> SlotPool:
    """A pool whose slots fit ``obj``'s largest buffer (a power of two, at
    least 1 MiB).  ``link``: what the pool serves, in its header (a server's
    result pool names its service, so ``shmq ls`` shows it there)."""
    largest = _codec.largest_buffer(obj)
    slot = _MIN_SLOT
    while slot < largest:
        slot <<= 1
    if len(link.encode()) >= L.LINK_BYTES:
        link = ""  # (a service name that long: the pool shows on its own)
    return SlotPool.create(slot, _POOL_SLOTS, name=name, link=link)


def _error_info(exc: BaseException) -> bytes:
    tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    try:
        original: Optional[bytes] = pickle.dumps(exc, 5)
    except Exception:
        original = None
    return pickle.dumps((type(exc).__module__ + "." + type(exc).__qualname__, str(exc), tb, original), 5)


def _remote_error(info: bytes) -> RemoteError:
    type_name, message, tb, original = pickle.loads(info)
    err = RemoteError(type_name, message, tb)
    if original is not None:
        try:
            err.__cause__ = pickle.loads(original)
        except Exception:
            pass  # the class does not exist here: the name and text still say what it was
    return err


# -- client ---------------------------------------------------------------------


class Future(cf.Future):
    """A ``concurrent.futures.Future`` for one request.  ``cancel()`` takes
    back a request no server has taken (it is never served), or tells the
    server serving it (``req.cancelled``); either way the future ends
    cancelled and a reply that crosses the cancellation is dropped."""

    # what the client keeps of the request (see _Call)
    pos = 0
    lost_at = 0.0
    data: Optional[bytes] = None
    _retry_obj: Optional[tuple] = None  # (obj,) for an idempotent call: sent again if its server dies
    _retries = 0

    def __init__(self, client: "Client", stream: bool) -> None:
        super().__init__()
        self._client = client
        self.seq = 0
        self.entry = 0
        self.flags = F_PARTIALS if stream else 0
        self.partials: Optional[collections.deque] = collections.deque() if stream else None

    def cancel(self) -> bool:
        if self.done():
            return self.cancelled()
        if not self._client._withdraw(self, cancel=True):
            return False  # an outcome is being delivered
        super().cancel()
        self.set_running_or_notify_cancel()  # wakes wait()/as_completed()
        return True


class _Call:
    """The outcome of one :meth:`Client.call`: what a Future offers the
    client's own code (``done``, ``set_result``, ``set_exception``,
    ``cancel``, ``result``), without a Future's condition variable.  The
    caller waits in ``Client._wait`` (pumping, or on the client's condition
    when another thread pumps), so nothing waits on the call itself; an
    outcome is set at most once, by whoever took the call out of the
    pending table (or cancelled it there).

    The attributes a call rarely changes are class attributes: a call sets
    only what it needs (no ``__slots__``, so the defaults can live here)."""

    _PENDING, _RESULT, _ERROR, _CANCELLED = range(4)
    seq = 0
    entry = 0
    flags = 0  # no F_PARTIALS: a call reads no partial replies
    partials = None
    pos = 0  # the request ring's TAIL after the request was written
    lost_at = 0.0  # when the ring's readers were first seen past an untaken request
    data: Optional[bytes] = None  # the plain payload, kept to send a lost request again
    _retry_obj: Optional[tuple] = None
    _retries = 0
    _state = 0
    _value: Any = None

    def __init__(self, client: "Client") -> None:
        self._client = client

    def done(self) -> bool:
        return self._state != 0

    def cancelled(self) -> bool:
        return self._state == 3

    def set_result(self, value: Any) -> None:
        self._value = value
        self._state = 1

    def set_exception(self, exc: BaseException) -> None:
        self._value = exc
        self._state = 2

    def cancel(self) -> bool:
        if self._state:
            return self._state == 3
        if not self._client._withdraw(self, cancel=True):
            return False  # an outcome is being delivered
        self._state = 3
        return True

    def result(self) -> Any:
        """The reply; raises the call's exception (the caller checked done())."""
        if self._state == 1:
            return self._value
        if self._state == 2:
            exc, self._value = self._value, None  # (no reference cycle through the traceback)
            raise exc
        raise cf.CancelledError()


class Client:
    """The client side of a service in one process: ``call``, ``submit``,
    ``stream``.  Made by :meth:`Service.client`; belongs to the process that
    made it (a child calls ``client()`` on its own handle).

    Threads: any thread may call, submit and stream at once.  The pending
    table (a dict: seq -> call) and the free entries (a deque) are changed
    by single dict/deque operations, each atomic, so the per-call path takes
    no lock: whoever pops a call out of the table owns its outcome.  The
    lock orders only the rarer moves that must be seen whole (a cancel's
    CANCEL store and fence, a retry's swap of correlation ids)."""

    _closed = True

    def __init__(self, service: str, reply_capacity: int, *, _token: object = None) -> None:
        if _token is not _TOKEN:
            raise TypeError("use Service.client()")
        self.service = service
        self._pid = os.getpid()
        self._fork = _forks[0]
        self._requests = Ring.attach(service)
        try:
            self._replies = Ring.create(reply_capacity, multi_producer=True, multi_consumer=False)
            self.name = self._replies.name
            try:
                self._table = Segment.create(L.KIND_BLOB, L.blob_segment_size(_TABLE_BYTES), P.part_name(self.name, "b0"))
                self._table.words[L.W_BLOB_BYTES] = _TABLE_BYTES
                self._table.words[L.W_CL_TAG] = L.CLIENT_TAG
                self._table.register(L.ROLE_CREATOR)
                self._table.publish()
                _link_to_service(self._replies, service)
            except BaseException:
                self._replies.unlink()
                self._replies.close()
                raise
        except BaseException:
            self._requests.close()
            raise
        self._w = self._table.words
        self._rw = self._requests.segment.words  # the request ring's HEAD and TAIL (lost requests)
        self._write_request = self._requests.try_write
        self._read_reply = self._replies.try_read
        self._reply_wait = ReadWait(self._replies)
        self._pool: Optional[SlotPool] = None
        self._encoder = _codec.Codec(None)
        self._decoder = _codec.Codec(None)  # attaches the servers' pools as replies name them
        self._lock = threading.RLock()  # cancels and retries (see the class docstring)
        self._pump_lock = threading.Lock()  # one thread reads the reply ring at a time
        self._cv = threading.Condition(threading.Lock())
        self._free = collections.deque(range(MAX_OUTSTANDING))  # FIFO: an entry is reused as late as possible
        self._pending: Dict[int, Union[Future, _Call]] = {}
        self._cv_waiters = 0  # threads in _wait on self._cv (else nobody needs its notify)
        self._name_bytes = self.name.encode()
        self._trailer = _request_trailer(self._name_bytes)
        self._seqs = itertools.count(1)  # next() is atomic: no lock for the correlation ids
        self._sent = 0
        self._resent = 0
        self._thread: Optional[threading.Thread] = None
        self._next_check = 0.0
        self._no_server_since: Optional[float] = None
        self._closed = False

    # -- public ---------------------------------------------------------
    def call(self, obj: Any, timeout: Optional[float] = None, *, idempotent: bool = False) -> Any:
        """Send ``obj`` to a server and return its reply.  Raises RemoteError
        if the handler failed, BrokenError if its server died or there is no
        live server, TimeoutError after ``timeout`` seconds (the request is
        then cancelled; it also bounds the wait for room: a full request
        ring, or MAX_OUTSTANDING requests already outstanding on this
        client), ClosedError if the client is closed (or was
        made by another process: a forked child calls ``client()`` for one
        of its own).  ``idempotent=True``: if the server dies, send the
        request again (up to MAX_RETRIES times) instead of raising
        BrokenError; the handler may then run more than once."""
        deadline = None if timeout is None else deadline_for(timeout)
        if self._closed or self._fork != _forks[0]:
            self._check()
        fut = _Call(self)
        if idempotent:
            fut._retry_obj = (obj,)
        self._post(fut, obj, deadline)
        if not fut._state and self._pump_lock.acquire(False):
            # The common case, _wait's loop with the call's state read in place:
            # this thread reads the reply ring until its own reply is dispatched.
            try:
                while True:
                    self._pump(deadline, fut)
                    if fut._state or self._closed or (deadline is not None and _monotonic() >= deadline):
                        break
                    if self._cv_waiters:  # (another thread's reply may be among those dispatched)
                        with self._cv:
                            self._cv.notify_all()
            finally:
                self._pump_lock.release()
            if self._cv_waiters:  # (after the release: see _wait)
                with self._cv:
                    self._cv.notify_all()
        if not fut._state and not self._wait(fut.done, deadline):
            if fut.cancel():
                raise TimeoutError(f"no reply from service {self.service!r} within {timeout} s")
            # the outcome won the race with the cancel: it is being set right now
            if not self._wait(fut.done, _monotonic() + _OUTCOME_GRACE):
                raise BrokenError(f"the outcome of a call to service {self.service!r} was lost")  # a bug
        if fut._state == 1:
            return fut._value
        return fut.result()

    def submit(self, obj: Any, timeout: Optional[float] = None, *, idempotent: bool = False) -> Future:
        """Send ``obj`` and return a Future for the reply at once (a thread
        of this client delivers the outcome, so callbacks, ``wait`` and
        ``as_completed`` work).  ``timeout`` bounds only the sending (a full
        request ring, or MAX_OUTSTANDING requests outstanding on this client:
        back-pressure): TimeoutError.  ``idempotent``, and the other errors:
        as for :meth:`call`."""
        fut = self._submit(obj, False, deadline_for(timeout), idempotent)
        self._ensure_thread()
        return fut

    def stream(self, obj: Any, timeout: Optional[float] = None) -> Iterator[Any]:
        """Send ``obj``; yield each partial reply (``req.send_partial``) and
        then the final one.  ``timeout``: the longest wait for the next item
        (TimeoutError).  Leaving the loop early cancels the request."""
        fut = self._submit(obj, True, deadline_for(timeout))
        return self._iterate(fut, timeout)

    def close(self) -> None:
        """Cancel what is outstanding and remove this client's segments
        (replies still in its ring are dropped first, so the servers get
        their slots back)."""
        if self._closed:
            return
        self._closed = True
        pending = list(self._pending.values())
        for fut in pending:
            fut.cancel()
        with self._cv:
            self._cv.notify_all()
        t = self._thread
        if t is not None and t is not threading.current_thread():
            t.join(1.0)
        self._reply_wait.flush()
        if os.getpid() == self._pid:
            # Best effort (the servers also free the slots of a client that is
            # gone): a callback run by a pumping thread may be closing us, with
            # the pump lock held by that very thread.
            if self._pump_lock.acquire(timeout=0.2):
                try:
                    for rec in self._replies.try_read_many(1 << 20):
                        self._drop(rec)
                except ShmqError:
                    pass  # (a broken ring: nothing more to return)
                finally:
                    self._pump_lock.release()
            for seg in (self._replies, self._table, self._pool):
                if seg is not None:
                    seg.unlink()
        for seg in (self._replies, self._table, self._pool, self._requests):
            if seg is not None:
                seg.close()
        self._encoder.close()
        self._decoder.close()

    def statistics(self) -> ClientStatistics:
        """A snapshot of this client's reply ring and requests, read from
        shared memory as any process reads it (``read_statistics(name)``,
        ``shmq stat NAME``).  Raises ClosedError once the client is closed."""
        self._check()
        self._reply_wait.flush()
        seg = self._replies.segment
        stats, _ = client_statistics(self.name, seg, seg.words)
        # What any process reads, but the outstanding requests counted from
        # this process's own table of pending calls: a reply this client has
        # already dispatched is not outstanding, even if its server has not
        # stored DONE yet (it does so just after writing the reply).
        w = self._w
        outstanding = sum(
            1 for f in list(self._pending.values()) if w[_TABLE_BASE + f.entry * ENTRY_WORDS + E_DONE] != f.seq
        )
        return dataclasses.replace(stats, outstanding=outstanding)

    @property
    def closed(self) -> bool:
        return self._closed

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<shmq.service.Client of {self.service!r} replies {getattr(self, 'name', '?')!r}>"

    # -- sending --------------------------------------------------------
    def _check(self) -> None:
        if self._closed:
            raise ClosedError(f"client of service {self.service!r} is closed")
        if self._fork != _forks[0] or os.getpid() != self._pid:
            raise ClosedError(
                f"this client of service {self.service!r} belongs to process {self._pid}:"
                " call client() on the service in this process for one of its own"
            )

    def _submit(self, obj: Any, stream: bool, deadline: Optional[float], idempotent: bool = False) -> Future:
        self._check()
        fut = Future(self, stream)
        if idempotent:
            fut._retry_obj = (obj,)
        self._post(fut, obj, deadline)
        return fut

    def _post(
        self, fut: Union[Future, _Call], obj: Any, deadline: Optional[float], replaces: int = 0, data: Optional[bytes] = None
    ) -> None:
        """Give ``fut`` a fresh entry and correlation id and send ``obj``.
        ``replaces``: the id of the earlier attempt (a retry, which keeps
        its entry), swapped under the lock so that a cancel sees one or the
        other.  Raises TimeoutError if the request ring stays full, or
        MAX_OUTSTANDING requests stay outstanding, past ``deadline``; the
        pickling error.
        ``data``: ``obj``'s plain pickle, already made (a lost request)."""
        lease = None
        if data is None:
            try:
                data = _dumps(obj, 5, buffer_callback=stop_at_large)
            except Exception:
                data = _codec.first_pass(obj)  # (again, through the fallbacks: LARGE, or the error)
            if len(data) >= _THRESHOLD and (data is LARGE or type(obj) in _RAW_TYPES):
                data, lease = self._encode_large(obj, deadline)
            else:
                fut.data = data  # (what a lost request is sent again with)
        try:
            if replaces:  # a retry keeps its entry; the swap of ids is seen whole by a cancel
                with self._lock:
                    if self._pending.pop(replaces, None) is None:
                        raise _Resolved  # cancelled meanwhile
                    seq = self._sent = next(self._seqs)
                    fut.seq = seq
                    entry = fut.entry
                    self._w[_TABLE_BASE + entry * ENTRY_WORDS] = seq  # E_SEQ: a server skips the old attempt
                    self._pending[seq] = fut
            else:
                try:
                    entry = self._free.popleft()
                except IndexError:
                    entry = self._free_entry(deadline)
                seq = self._sent = next(self._seqs)  # (ids count up: the last one is how many were sent)
                fut.seq = seq
                fut.entry = entry
                # (seq is unique per client: CANCEL and TAKEN, compared with it, need no reset)
                self._w[_TABLE_BASE + entry * ENTRY_WORDS] = seq  # E_SEQ
                self._pending[seq] = fut
            record = data + self._trailer(self._name_bytes, seq, entry, fut.flags, len(self._name_bytes))
            try:
                if not self._write_request(record):
                    self._requests.write(record, timeout=None if deadline is None else max(0.0, deadline - _monotonic()))
            except Full:
                self._withdraw(fut, cancel=True)
                raise TimeoutError(f"the request ring of service {self.service!r} stayed full") from None
            except BaseException:
                self._withdraw(fut, cancel=True)
                raise
            fut.pos = self._rw[L.W_TAIL]
        except BaseException:
            if lease is not None:
                lease.abort()
            raise
        if lease is not None:
            lease.sent()

    def _free_entry(self, deadline: Optional[float]) -> int:
        """Back-pressure: all MAX_OUTSTANDING entries are in use; wait
        (reading replies meanwhile, or while another thread reads them) for
        one to come free.  Raises TimeoutError at ``deadline``."""
        free = self._free
        while True:
            if not self._wait(lambda: bool(free), deadline):
                raise TimeoutError(
                    f"{MAX_OUTSTANDING} requests stayed outstanding on this client of service {self.service!r}"
                )
            try:
                return free.popleft()
            except IndexError:
                continue  # another thread took it

    def _encode_large(self, obj: Any, deadline: Optional[float]) -> tuple:
        if self._pool is None:
            self._pool = _fitted_pool(obj, P.part_name(self.name, "p"))
            self._encoder = _codec.Codec(self._pool, ring=self._requests)
        return self._encoder.encode(obj, timeout=None if deadline is None else max(0.0, deadline - _monotonic()))

    def _withdraw(self, fut: Union[Future, _Call], cancel: bool) -> bool:
        """Take ``fut`` out of the pending table; False if an outcome got
        there first.  With ``cancel``, tell the servers (Dekker with
        TAKEN: if it reads "not taken", the server that takes it will see
        CANCEL and skip it)."""
        with self._lock:
            if self._pending.pop(fut.seq, None) is None:
                return False
            if cancel:
                self._w[_TABLE_BASE + fut.entry * ENTRY_WORDS + E_CANCEL] = fut.seq
                _fence()
            self._free.append(fut.entry)
        return True

    # -- receiving ------------------------------------------------------
    def _wait(self, ready: Callable[[], bool], deadline: Optional[float]) -> bool:
        """Pump replies (or let another thread pump them) until ``ready()``
        or ``deadline``."""
        while not ready():
            if self._pump_lock.acquire(False):
                try:
                    if not ready():
                        self._pump(deadline)
                finally:
                    self._pump_lock.release()
                if self._cv_waiters:
                    with self._cv:
                        self._cv.notify_all()
            else:
                now = _monotonic()
                slice_ = _SLICE if deadline is None else min(_SLICE, deadline - now)
                with self._cv:
                    # Counted before the checks, and pumpers read the count
                    # after releasing the pump lock: a pumper that reads 0
                    # released before our count, so either the outcome is
                    # set (ready) or the lock is free (we pump ourselves).
                    self._cv_waiters += 1
                    try:
                        if not ready() and slice_ > 0 and self._pump_lock.locked():
                            self._cv.wait(slice_)
                    finally:
                        self._cv_waiters -= 1
            if ready():
                return True
            if self._closed:
                raise ClosedError(f"client of service {self.service!r} is closed")
            if deadline is not None and _monotonic() >= deadline:
                return False
        return True

    def _pump(self, deadline: Optional[float], call: Optional[_Call] = None) -> None:
        """Dispatch the replies in the ring (up to 64, or until ``call`` has
        its outcome), waiting for one up to a slice (and ``deadline``); check
        the servers every LIVENESS_INTERVAL."""
        read = self._read_reply
        rec = read()
        if rec is None:
            now = _monotonic()
            if now >= self._next_check:
                self._next_check = now + LIVENESS_INTERVAL
                self._check_servers()
                return  # (the caller looks whether that settled its call)
            until = now + _SLICE
            if deadline is not None and deadline < until:
                until = deadline
            if not self._reply_wait.wait(until):
                return
            rec = read()
        n = 64
        while rec is not None:
            self._dispatch(rec)
            if call is not None and call._state:
                return  # (the next pump looks at the clock)
            n -= 1
            if not n:
                break
            rec = read()
        if _monotonic() >= self._next_check:
            self._next_check = _monotonic() + LIVENESS_INTERVAL
            self._check_servers()

    def _check_servers(self) -> None:
        self._reply_wait.flush()
        self._look_at_servers()

    def _dispatch(self, rec: bytes) -> None:
        end = len(rec) - _REP.size
        if end < 1:
            return  # not a reply
        seq, kind = _REP.unpack_from(rec, end)
        pending = self._pending
        if kind == K_PARTIAL:
            fut = pending.get(seq)
            if fut is None or fut.partials is None:
                self._drop(rec)  # crossed a cancellation, or nobody asked
                return
        else:
            fut = pending.pop(seq, None)
            if fut is None:
                self._drop(rec)  # crossed a cancellation or a timeout
                return
            self._free.append(fut.entry)
        try:
            if kind == K_ERROR:
                fut.set_exception(_remote_error(rec))
                return
            obj = _loads(rec) if rec[0] == 0x80 else self._decoder.decode(rec[:end])
        except Exception as exc:  # an undecodable reply fails its call, not the client
            if kind == K_PARTIAL:
                if pending.pop(seq, None) is None:
                    return
                self._free.append(fut.entry)
            fut.set_exception(exc)
            return
        if kind == K_PARTIAL:
            fut.partials.append(obj)
        else:
            fut.set_result(obj)

    def _drop(self, rec: bytes) -> None:
        """Return the slots of a reply nobody will decode."""
        end = len(rec) - _REP.size
        if end >= 1 and rec[0] != 0x80:
            _drop_message(rec[:end], self._decoder.resolve)

    def _look_at_servers(self) -> None:
        """Fail the requests whose server died, send again those lost
        between a server's read and its record of taking them, and, when no
        live server is left for NO_SERVER_GRACE, fail the requests nobody took."""
        pending = list(self._pending.values())
        if not pending:
            self._no_server_since = None
            return
        w = self._w
        head = self._rw[L.W_HEAD]
        now = _monotonic()
        dead: List[Union[Future, _Call]] = []
        untaken: List[Union[Future, _Call]] = []
        lost: List[Union[Future, _Call]] = []
        verdicts: Dict[tuple, bool] = {}
        for fut in pending:
            base = _TABLE_BASE + fut.entry * ENTRY_WORDS
            if w[base + E_TAKEN] == fut.seq:
                who = (w[base + E_PID], w[base + E_START])
                alive = verdicts.get(who)
                if alive is None:
                    alive = verdicts[who] = P.is_alive(*who)
                if not alive:
                    dead.append(fut)
            else:
                untaken.append(fut)
                if fut.pos and head >= fut.pos:  # the servers read past it, and none recorded taking it
                    if not fut.lost_at:
                        fut.lost_at = now
                    elif now - fut.lost_at >= LOST_GRACE:
                        lost.append(fut)
        if untaken and not self._servers_alive():
            if self._no_server_since is None:
                self._no_server_since = now
            elif now - self._no_server_since >= NO_SERVER_GRACE:
                for fut in untaken:
                    if self._withdraw(fut, cancel=True):
                        fut.set_exception(BrokenError(f"service {self.service!r} has no live server"))
        else:
            self._no_server_since = None
        if lost or dead:
            self._count_lost(len(lost) + len(dead))
        if lost:
            self._resend_lost(lost)
        if dead:
            # what the server wrote before it died comes first
            for rec in self._replies.try_read_many(1 << 20):
                self._dispatch(rec)
            for fut in dead:
                base = _TABLE_BASE + fut.entry * ENTRY_WORDS
                pid = w[base + E_PID]
                if fut._retry_obj is not None and fut._retries < MAX_RETRIES and fut.seq in self._pending:
                    self._retry(fut, fut._retry_obj[0])
                    continue
                if self._withdraw(fut, cancel=True):
                    fut.set_exception(
                        BrokenError(f"server process {pid} of service {self.service!r} died while serving the request")
                    )

    def _count_lost(self, n: int) -> None:
        """Add ``n`` calls whose server died while it served them (or after
        reading them) to the service's SV_LOST (the rare path: under the
        request ring's admin lock)."""
        seg = self._requests.segment
        try:
            with seg.admin_lock():
                w = seg.words  # (wrapping at the int64 limit, as the rings' counters do)
                w[L.W_SV_LOST] = (w[L.W_SV_LOST] + n + (1 << 63)) % (1 << 64) - (1 << 63)
        except (ClosedError, OSError, ValueError):
            pass

    def _retry(self, fut: Union[Future, _Call], obj: Any, data: Optional[bytes] = None) -> None:
        """Send ``fut``'s request again under a new correlation id (``obj``,
        or ``data``, its pickle as sent before)."""
        fut._retries += 1
        self._resent += 1
        self._w[L.W_CL_RESENT] = self._resent  # (for shmq stat; retries run one at a time, in the pumping thread)
        fut.lost_at = 0.0
        fut.pos = 0  # (until the new attempt is written)
        self._w[_TABLE_BASE + fut.entry * ENTRY_WORDS + E_CANCEL] = fut.seq  # the old attempt, should it be served after all
        try:
            self._post(fut, obj, _monotonic() + _RETRY_SEND_SECONDS, replaces=fut.seq, data=data)
        except _Resolved:
            pass
        except Exception as exc:  # could not resend: that is the outcome
            self._withdraw(fut, cancel=True)  # if the retry got as far as pending
            if not fut.done():  # else the user's cancel won
                fut.set_exception(exc)

    def _resend_lost(self, lost: List[Union[Future, _Call]]) -> None:
        """Requests the servers read off the ring without recording that they
        took them, for LOST_GRACE: the server that read one died before its
        record (or is stalled there).  Cancel each (Dekker with TAKEN, as a
        user's cancel); one still untaken then was never served and never
        will be, so it is sent again, idempotent or not."""
        w = self._w
        for fut in lost:
            base = _TABLE_BASE + fut.entry * ENTRY_WORDS
            with self._lock:
                if fut.seq not in self._pending:
                    continue
                w[base + E_CANCEL] = fut.seq
                _fence()
                taken = w[base + E_TAKEN] == fut.seq
            if not taken and fut._retries < MAX_RETRIES and (fut.data is not None or fut._retry_obj is not None):
                if fut._retry_obj is not None:
                    self._retry(fut, fut._retry_obj[0])
                else:
                    self._retry(fut, None, fut.data)
            elif taken and fut._retry_obj is not None and fut._retries < MAX_RETRIES:
                self._retry(fut, fut._retry_obj[0])
            elif self._withdraw(fut, cancel=False):
                fut.set_exception(
                    BrokenError(f"a request to service {self.service!r} was lost by a server that stalled or died")
                )

    def _servers_alive(self) -> bool:
        try:
            return any(p.alive and p.role & L.ROLE_CONSUMER for p in self._requests.participants())
        except (ClosedError, ValueError):
            return False

    def _ensure_thread(self) -> None:
        with self._lock:
            t = self._thread
            if t is not None and t.is_alive():
                return
            t = self._thread = threading.Thread(target=self._deliver, name=f"shmq-client-{self.name}", daemon=True)
            t.start()

    def _deliver(self) -> None:
        """The thread behind submit(): pumps while futures are outstanding."""
        idle_since = _monotonic()
        while not self._closed:
            with self._lock:
                busy = bool(self._pending)
            if not busy:
                if _monotonic() - idle_since > 1.0:
                    with self._lock:
                        if not self._pending:
                            self._thread = None
                            return
                with self._cv:
                    self._cv.wait(_SLICE)
                continue
            idle_since = _monotonic()
            if self._pump_lock.acquire(timeout=_SLICE):
                try:
                    self._pump(None)
                except (ClosedError, ValueError):
                    if self._closed:
                        return
                    raise
                finally:
                    self._pump_lock.release()
                with self._cv:
                    self._cv.notify_all()

    def _iterate(self, fut: Future, timeout: Optional[float]) -> Iterator[Any]:
        try:
            while True:
                deadline = deadline_for(timeout)
                if not self._wait(lambda: bool(fut.partials) or fut.done(), deadline):
                    raise TimeoutError(f"no reply from service {self.service!r} within {timeout} s")
                if fut.partials:
                    yield fut.partials.popleft()
                    continue
                yield fut.result(0)
                return
        finally:
            if not fut.done():
                fut.cancel()


_TOKEN = object()
