"""Services: request/reply, streamed partial replies and cancellable futures.

A service is a named request ring served by any number of server processes
(work sharing: each request goes to exactly one of them)::

    svc = shmq.Service(name="resize")            # or Service.attach("resize")
    for req in svc:                              # a server process
        req.reply(resize(req.payload))

    client = shmq.Service.attach("resize").client()   # any process
    small = client.call(image, timeout=5)
    fut = client.submit(image)                   # a concurrent.futures.Future

The pieces (all in /dev/shm, see docs/services.md):

* ``<service>``: the request ring (multi-producer, multi-consumer).  Its
  participant table says who serves: a process that received from it is
  listed with the consumer role.
* Per client (generated name ``shmq_..._<pid>_<hex>``, so ``shmq gc``
  attributes it to the client's pid): a reply ring, many producers (the
  servers), one consumer (the client); ``<client>.b0``, a table of request
  entries; ``<client>.p``, a slot pool for large arguments, made on first use.
* Per server process: a slot pool for large results, made on first use.

A request entry (8 words, one per outstanding request of the client) is how
client and server agree without a message: the client writes SEQ (the
correlation id) before sending and CANCEL to cancel; the server writes its
pid and start time and then TAKEN = SEQ when it takes the request, before
the request leaves the ring (it holds the ring's consumer lock through
``peek``/``release``: a server killed before ``release`` leaves the request
to the next server).  A client that finds the server named in TAKEN dead
fails the call with BrokenError.
"""
from __future__ import annotations

import collections
import concurrent.futures as cf
import inspect
import multiprocessing
import os
import pickle
import struct
import threading
import time
import traceback
from typing import Any, Callable, Dict, Iterator, List, Optional

from . import _codec
from . import _layout as L
from . import _platform as P
from ._errors import BrokenError, ClosedError, Empty, Full, RemoteError, ShmqError
from ._segment import Segment
from ._slots import SlotPool
from ._wait import deadline_for
from .ring import DEFAULT_CAPACITY_BYTES, Ring

__all__ = ("Service", "Client", "Request", "Serving", "RemoteError", "DEFAULT_CAPACITY_BYTES")

#: requests one client may have outstanding at once
MAX_OUTSTANDING = 1024
#: a client with requests nobody took fails them after this long without any live server
NO_SERVER_GRACE = 1.0
#: how often a waiting client checks the liveness of the servers of its requests
LIVENESS_INTERVAL = 0.1
#: how often a server looks for dead or closed clients to forget
PEER_SWEEP_INTERVAL = 1.0
_SLICE = 0.05
#: times an idempotent call is sent again after its server died
MAX_RETRIES = 3
_RETRY_SEND_SECONDS = 5.0


class _Resolved(Exception):
    """A retry found its call already resolved (cancelled)."""

_OUTCOME_GRACE = 5.0  # an outcome taken off the ring is set within microseconds; this only bounds a bug
_MIN_SLOT = 1 << 20
_POOL_SLOTS = 8

# request record: seq, entry, length of the client's name; then the name and the payload
_REQ = struct.Struct("<QIB")
# reply record: seq, entry, kind; then the payload
_REP = struct.Struct("<QIB")
K_PARTIAL, K_RESULT, K_ERROR = 1, 2, 3

# words of a request entry in a client's table
E_SEQ, E_CANCEL, E_PID, E_START, E_TAKEN = range(5)
ENTRY_WORDS = 8
_TABLE_BYTES = MAX_OUTSTANDING * ENTRY_WORDS * 8
_TABLE_BASE = L.DATA_OFFSET // 8

_monotonic = time.monotonic
_fence_lock = threading.Lock()


def _fence() -> None:
    """A full memory barrier.  x86-64 may let a load pass an earlier store
    (the store buffer); cancelling and taking are each "store my word, then
    load the other's" (Dekker), which needs the store drained first.  An
    uncontended threading.Lock round trip is a locked instruction (sem_trywait
    and sem_post in CPython's lock), which drains it."""
    _fence_lock.acquire()
    _fence_lock.release()


def _drop_message(data: bytes, resolver: Callable[[str], SlotPool]) -> None:
    """Return the slots of a message nobody will decode."""
    if not _codec.is_slot_message(data):
        return
    try:
        _obj, tokens = _codec.decode_held(data, resolver)
        _codec.release_tokens(tokens)
    except (OSError, ShmqError, ValueError):
        pass  # the pool is gone with its process: nothing to return


def _plain(obj: Any) -> Any:
    """``obj``'s pickle when it needs no slot (one pickling pass, as a
    queue's put), else _codec.LARGE: it has a buffer worth a slot."""
    data = _codec.first_pass(obj)
    if data is not _codec.LARGE and len(data) >= _codec.DEFAULT_THRESHOLD and type(obj) in (bytes, bytearray):
        return _codec.LARGE  # a large bytes-like goes through a slot too
    return data


def _fitted_pool(obj: Any, name: Optional[str]) -> SlotPool:
    """A pool whose slots fit ``obj``'s largest buffer (a power of two, at
    least 1 MiB)."""
    largest = _codec.largest_buffer(obj)
    slot = _MIN_SLOT
    while slot < largest:
        slot <<= 1
    return SlotPool.create(slot, _POOL_SLOTS, name=name)


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

    def __init__(self, client: "Client", seq: int, entry: int, stream: bool) -> None:
        super().__init__()
        self._client = client
        self.seq = seq
        self.entry = entry
        self.partials: Optional[collections.deque] = collections.deque() if stream else None
        self._retry_obj: Optional[tuple] = None  # (obj,) for an idempotent call: sent again if its server dies
        self._retries = 0

    def cancel(self) -> bool:
        if self.done():
            return self.cancelled()
        if not self._client._withdraw(self, cancel=True):
            return False  # an outcome is being delivered
        super().cancel()
        self.set_running_or_notify_cancel()  # wakes wait()/as_completed()
        return True


class Client:
    """The client side of a service in one process: ``call``, ``submit``,
    ``stream``.  Made by :meth:`Service.client`; belongs to the process that
    made it (a child calls ``client()`` on its own handle)."""

    _closed = True

    def __init__(self, service: str, reply_capacity: int, *, _token: object = None) -> None:
        if _token is not _TOKEN:
            raise TypeError("use Service.client()")
        self.service = service
        self._pid = os.getpid()
        self._requests = Ring.attach(service)
        try:
            self._replies = Ring.create(reply_capacity, multi_producer=True, multi_consumer=False)
            self.name = self._replies.name
            try:
                self._table = Segment.create(L.KIND_BLOB, L.blob_segment_size(_TABLE_BYTES), P.part_name(self.name, "b0"))
                self._table.words[L.W_BLOB_BYTES] = _TABLE_BYTES
                self._table.register(L.ROLE_CREATOR)
                self._table.publish()
            except BaseException:
                self._replies.unlink()
                self._replies.close()
                raise
        except BaseException:
            self._requests.close()
            raise
        self._w = self._table.words
        self._pool: Optional[SlotPool] = None
        self._encoder = _codec.Codec(None)
        self._decoder = _codec.Codec(None)  # attaches the servers' pools as replies name them
        self._lock = threading.RLock()  # the pending table and the entries
        self._pump_lock = threading.Lock()  # one thread reads the reply ring at a time
        self._cv = threading.Condition(threading.Lock())
        self._free = collections.deque(range(MAX_OUTSTANDING))  # FIFO: an entry is reused as late as possible
        self._pending: Dict[int, Future] = {}
        self._seq = 0
        self._thread: Optional[threading.Thread] = None
        self._next_check = 0.0
        self._no_server_since: Optional[float] = None
        self._closed = False

    # -- public ---------------------------------------------------------
    def call(self, obj: Any, timeout: Optional[float] = None, *, idempotent: bool = False) -> Any:
        """Send ``obj`` to a server and return its reply.  Raises RemoteError
        if the handler failed, BrokenError if its server died or there is no
        live server, TimeoutError after ``timeout`` seconds (the request is
        then cancelled).  ``idempotent=True``: if the server dies, send the
        request again (up to MAX_RETRIES times) instead of raising
        BrokenError; the handler may then run more than once."""
        deadline = deadline_for(timeout)
        fut = self._submit(obj, False, deadline, idempotent)
        if not self._wait(fut.done, deadline):
            if fut.cancel():
                raise cf.TimeoutError(f"no reply from service {self.service!r} within {timeout} s")
            # the outcome won the race with the cancel: it is being set right now
        return fut.result(_OUTCOME_GRACE)

    def submit(self, obj: Any, timeout: Optional[float] = None, *, idempotent: bool = False) -> Future:
        """Send ``obj`` and return a Future for the reply at once (a thread
        of this client delivers the outcome, so callbacks, ``wait`` and
        ``as_completed`` work).  ``timeout`` bounds only the sending (a full
        request ring): TimeoutError.  ``idempotent``: as for :meth:`call`."""
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
        """Cancel what is outstanding and remove this client's segments."""
        if self._closed:
            return
        self._closed = True
        with self._lock:
            pending = list(self._pending.values())
        for fut in pending:
            fut.cancel()
        with self._cv:
            self._cv.notify_all()
        t = self._thread
        if t is not None and t is not threading.current_thread():
            t.join(1.0)
        if os.getpid() == self._pid:
            for seg in (self._replies, self._table, self._pool):
                if seg is not None:
                    seg.unlink()
        for seg in (self._replies, self._table, self._pool, self._requests):
            if seg is not None:
                seg.close()
        self._encoder.close()
        self._decoder.close()

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
        if os.getpid() != self._pid:
            raise ShmqError("a service client belongs to the process that made it: call client() in this process")

    def _submit(self, obj: Any, stream: bool, deadline: Optional[float], idempotent: bool = False) -> Future:
        self._check()
        fut = Future(self, 0, 0, stream)
        if idempotent:
            fut._retry_obj = (obj,)
        self._post(fut, obj, deadline)
        return fut

    def _post(self, fut: Future, obj: Any, deadline: Optional[float], replaces: int = 0) -> None:
        """Give ``fut`` a fresh entry and correlation id and send ``obj``.
        ``replaces``: the id of the earlier attempt (a retry), withdrawn
        under the same lock so that a cancel sees one or the other."""
        data, lease = _plain(obj), None
        if data is _codec.LARGE:
            if self._pool is None:
                self._pool = _fitted_pool(obj, P.part_name(self.name, "p"))
                self._encoder = _codec.Codec(self._pool, ring=self._requests)
            data, lease = self._encoder.encode(obj, timeout=None if deadline is None else max(0.0, deadline - _monotonic()))
        try:
            with self._lock:
                if replaces:
                    if self._pending.pop(replaces, None) is None:
                        raise _Resolved  # cancelled meanwhile
                    self._free.append(fut.entry)
                if not self._free:
                    raise ShmqError(f"more than {MAX_OUTSTANDING} requests outstanding on one client")
                entry = self._free.popleft()
                self._seq += 1
                seq = self._seq
                fut.seq, fut.entry = seq, entry
                base = _TABLE_BASE + entry * ENTRY_WORDS
                w = self._w
                w[base + E_CANCEL] = 0
                w[base + E_TAKEN] = 0
                w[base + E_SEQ] = seq
                self._pending[seq] = fut
            name = self.name.encode()
            record = _REQ.pack(seq, entry, len(name)) + name + data
            try:
                self._requests.write(record, timeout=None if deadline is None else max(0.0, deadline - _monotonic()))
            except Full:
                self._withdraw(fut, cancel=True)
                raise cf.TimeoutError(f"the request ring of service {self.service!r} stayed full") from None
            except BaseException:
                self._withdraw(fut, cancel=True)
                raise
        except BaseException:
            if lease is not None:
                lease.abort()
            raise
        if lease is not None:
            lease.sent()

    def _withdraw(self, fut: Future, cancel: bool) -> bool:
        """Take ``fut`` out of the pending table; False if an outcome got
        there first.  With ``cancel``, tell the servers (Dekker with
        TAKEN: if it reads "not taken", the server that takes it will see
        CANCEL and skip it)."""
        with self._lock:
            if self._pending.pop(fut.seq, None) is None:
                return False
            base = _TABLE_BASE + fut.entry * ENTRY_WORDS
            if cancel:
                self._w[base + E_CANCEL] = fut.seq
                _fence()
            self._free.append(fut.entry)
        return True

    # -- receiving ------------------------------------------------------
    def _wait(self, ready: Callable[[], bool], deadline: Optional[float]) -> bool:
        """Pump replies (or let another thread pump them) until ``ready()``
        or ``deadline``."""
        while not ready():
            now = _monotonic()
            if deadline is not None and now >= deadline:
                return False
            slice_ = _SLICE if deadline is None else min(_SLICE, deadline - now)
            if self._pump_lock.acquire(False):
                try:
                    if not ready():
                        self._pump(slice_)
                finally:
                    self._pump_lock.release()
                with self._cv:
                    self._cv.notify_all()
            else:
                with self._cv:
                    if not ready():
                        self._cv.wait(slice_)
            if self._closed and not ready():
                raise ClosedError(f"client of service {self.service!r} is closed")
        return True

    def _pump(self, timeout: float) -> None:
        try:
            records = self._replies.read_many(64, timeout=timeout)
        except Empty:
            records = []
        for rec in records:
            self._dispatch(rec)
        if _monotonic() >= self._next_check:
            self._next_check = _monotonic() + LIVENESS_INTERVAL
            self._check_servers()

    def _dispatch(self, rec: bytes) -> None:
        try:
            seq, _entry, kind = _REP.unpack_from(rec)
        except struct.error:
            return
        payload = rec[_REP.size :]
        with self._lock:
            fut = self._pending.get(seq)
            if fut is not None and kind != K_PARTIAL:
                del self._pending[seq]
                self._free.append(fut.entry)
        if fut is None or (kind == K_PARTIAL and fut.partials is None):
            _drop_message(payload, self._decoder.resolve)  # crossed a cancellation, or nobody asked
            return
        try:
            if kind == K_ERROR:
                fut.set_exception(_remote_error(payload))
                return
            obj = self._decoder.decode(payload)
        except Exception as exc:  # an undecodable reply fails its call, not the client
            if kind == K_PARTIAL:
                with self._lock:
                    if self._pending.pop(seq, None) is None:
                        return
                    self._free.append(fut.entry)
            fut.set_exception(exc)
            return
        if kind == K_PARTIAL:
            fut.partials.append(obj)
        else:
            fut.set_result(obj)

    def _check_servers(self) -> None:
        """Fail the requests whose server died, and, when no live server is
        left for NO_SERVER_GRACE, the requests nobody took."""
        with self._lock:
            pending = list(self._pending.values())
        if not pending:
            self._no_server_since = None
            return
        w = self._w
        dead: List[Future] = []
        untaken: List[Future] = []
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
        now = _monotonic()
        if untaken and not self._servers_alive():
            if self._no_server_since is None:
                self._no_server_since = now
            elif now - self._no_server_since >= NO_SERVER_GRACE:
                for fut in untaken:
                    if self._withdraw(fut, cancel=True):
                        fut.set_exception(BrokenError(f"service {self.service!r} has no live server"))
        else:
            self._no_server_since = None
        if dead:
            # what the server wrote before it died comes first
            for rec in self._replies.try_read_many(1 << 20):
                self._dispatch(rec)
            for fut in dead:
                base = _TABLE_BASE + fut.entry * ENTRY_WORDS
                pid = w[base + E_PID]
                if fut._retry_obj is not None and fut._retries < MAX_RETRIES and fut.seq in self._pending:
                    fut._retries += 1
                    w[base + E_CANCEL] = fut.seq  # the dead server's attempt, should it be served after all
                    try:
                        self._post(fut, fut._retry_obj[0], _monotonic() + _RETRY_SEND_SECONDS, replaces=fut.seq)
                        continue
                    except _Resolved:
                        continue
                    except Exception as exc:  # could not resend: that is the outcome
                        self._withdraw(fut, cancel=True)  # if the retry got as far as pending
                        if not fut.done():  # else the user's cancel won
                            fut.set_exception(exc)
                        continue
                if self._withdraw(fut, cancel=True):
                    fut.set_exception(
                        BrokenError(f"server process {pid} of service {self.service!r} died while serving the request")
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
                    self._pump(_SLICE)
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
                    raise cf.TimeoutError(f"no reply from service {self.service!r} within {timeout} s")
                if fut.partials:
                    yield fut.partials.popleft()
                    continue
                yield fut.result(0)
                return
        finally:
            if not fut.done():
                fut.cancel()


# -- server ---------------------------------------------------------------------


class _Peer:
    """What a server keeps of one client: its reply ring and request table."""

    __slots__ = ("name", "ring", "table", "w")

    def __init__(self, name: str) -> None:
        self.name = name
        self.ring = Ring.attach(name)
        try:
            self.table = Segment.attach(P.part_name(name, "b0"), L.KIND_BLOB)
        except BaseException:
            self.ring.close()
            raise
        self.w = self.table.words

    def gone(self) -> bool:
        """True if the client closed (its names are gone) or died."""
        try:
            self.ring.segment.check_exists()
        except BrokenError:
            return True
        return not self.ring.creator_alive()

    def forget(self, reclaim: bool) -> None:
        if reclaim:  # the client died: nobody else will remove its names
            for name in (self.name, P.part_name(self.name, "b0"), P.part_name(self.name, "p")):
                P.shm_unlink(name)
        self.table.close()
        self.ring.close()


class Request:
    """One request, on the server that took it.  ``payload`` is what the
    client sent.  Answer with exactly one of :meth:`reply` or :meth:`fail`,
    after any number of :meth:`send_partial`."""

    def __init__(self, server: "Service", peer: _Peer, entry: int, seq: int, payload: Any) -> None:
        self.payload = payload
        self._server = server
        self._peer = peer
        self._base = _TABLE_BASE + entry * ENTRY_WORDS
        self._entry = entry
        self.seq = seq
        self.done = False

    @property
    def cancelled(self) -> bool:
        """True once the client cancelled the request (or gave up on it, or
        died): a handler may stop early; what it sends is dropped."""
        w = self._peer.w
        try:
            return w[self._base + E_SEQ] != self.seq or w[self._base + E_CANCEL] == self.seq
        except ValueError:  # the table was closed: the client is gone
            return True

    def send_partial(self, obj: Any, timeout: Optional[float] = None) -> None:
        """Send one partial reply (the client's ``stream`` yields it)."""
        self._send(K_PARTIAL, obj, timeout)

    def reply(self, obj: Any, timeout: Optional[float] = None) -> None:
        """Send the reply; this ends the request.  ``timeout`` bounds the
        wait for room in the client's reply ring (Full)."""
        self._send(K_RESULT, obj, timeout)

    def fail(self, exc: BaseException, timeout: Optional[float] = None) -> None:
        """End the request with ``exc``: the client raises RemoteError
        (with ``exc`` as ``__cause__`` if it unpickles there)."""
        if not isinstance(exc, BaseException):
            raise TypeError(f"'exc' must be an exception, got {type(exc).__name__}")
        self._send(K_ERROR, exc, timeout)

    def _send(self, kind: int, obj: Any, timeout: Optional[float]) -> None:
        if self.done:
            raise RuntimeError(f"request {self.seq} of client {self._peer.name!r} was already answered")
        if not self.cancelled:  # a cancelled request's replies would be dropped by the client anyway
            # raises (unpicklable object, Full) before anything was sent: the request stays open for fail()
            self._server._send_reply(self._peer, _REP.pack(self.seq, self._entry, kind), obj, kind, deadline_for(timeout), self)
        if kind != K_PARTIAL:
            self.done = True

    def __repr__(self) -> str:
        return f"<shmq.service.Request {self.seq} from {self._peer.name!r}{' answered' if self.done else ''}>"


class Serving:
    """Worker processes started by :meth:`Service.serve`."""

    def __init__(self, processes: list, stop: Any) -> None:
        self.processes = processes
        self._stop = stop

    def close(self, timeout: float = 5.0) -> None:
        """Ask the workers to stop (each finishes its current request) and
        join them; those still running after ``timeout`` seconds are killed."""
        self._stop.set()
        self.join(timeout)
        for p in self.processes:
            if p.is_alive():
                p.kill()
                p.join(5.0)

    def join(self, timeout: Optional[float] = None) -> bool:
        """Wait for the workers to end; True if they all did."""
        deadline = deadline_for(timeout)
        for p in self.processes:
            p.join(None if deadline is None else max(0.0, deadline - _monotonic()))
        return not any(p.is_alive() for p in self.processes)

    def __enter__(self) -> "Serving":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Service:
    """A named request endpoint.  ``Service(name=None, capacity_bytes=...)``
    creates it (the creating process unlinks it at normal exit);
    ``Service.attach(name)`` opens it from any process; a Service pickles as
    its name.  Server side: :meth:`receive`, iteration, :meth:`serve`;
    client side: :meth:`client`."""

    _closed = True

    def __init__(self, *, name: Optional[str] = None, capacity_bytes: int = DEFAULT_CAPACITY_BYTES) -> None:
        self._setup(Ring.create(capacity_bytes, name=name))

    @classmethod
    def attach(cls, name: str) -> "Service":
        """Open the service ``name``.  Raises FileNotFoundError, or
        LayoutError if ``name`` is not an shmq ring."""
        self = cls.__new__(cls)
        self._setup(Ring.attach(name))
        return self

    def _setup(self, ring: Ring) -> None:
        self._requests = ring
        self.name = ring.name
        self._client: Optional[Client] = None
        self._peers: Dict[str, _Peer] = {}
        self._pool: Optional[SlotPool] = None
        self._encoder = _codec.Codec(None)
        self._decoder = _codec.Codec(None)
        self._server_in = 0
        self._next_sweep = 0.0
        self._closed = False

    def __reduce__(self):
        if self._closed:
            raise ClosedError(f"service {self.name!r} is closed")
        return (Service.attach, (self.name,))

    # -- client side ----------------------------------------------------
    def client(self, *, reply_capacity_bytes: int = DEFAULT_CAPACITY_BYTES) -> Client:
        """This process's client of the service (made on first use)."""
        self._check()
        c = self._client
        if c is None or c.closed or c._pid != os.getpid():
            c = self._client = Client(self.name, reply_capacity_bytes, _token=_TOKEN)
        return c

    # -- server side ----------------------------------------------------
    def receive(self, timeout: Optional[float] = None) -> Request:
        """The next request for this service (the first call lists this
        process as a server).  Raises TimeoutError after ``timeout`` seconds."""
        self._check()
        self._register_server()
        deadline = deadline_for(timeout)
        ring = self._requests
        while True:
            now = _monotonic()
            if now >= self._next_sweep:
                self._next_sweep = now + PEER_SWEEP_INTERVAL
                self._sweep_peers()
            req = self._take()
            if req is not None:
                return req
            now = _monotonic()
            if deadline is not None and now >= deadline:
                raise cf.TimeoutError(f"no request for service {self.name!r} within {timeout} s")
            until = now + _SLICE if deadline is None else min(deadline, now + _SLICE)
            try:
                ring._block_reading(until)
            except Empty:
                pass
            if self._closed:
                raise ClosedError(f"service {self.name!r} is closed")

    def __iter__(self) -> Iterator[Request]:
        while True:
            yield self.receive()

    def serve(self, fn: Callable[[Any], Any], workers: int = 1, *, ctx: Any = None, ready_timeout: float = 60.0) -> Serving:
        """Run ``fn(payload)`` for each request in ``workers`` new processes
        (``ctx``: a multiprocessing context, default the default one).  Its
        return value is the reply; a generator function's yields are partial
        replies and its return value the reply; an exception becomes
        ``req.fail``.  Returns once every worker is listed as a server."""
        self._check()
        if not isinstance(workers, int) or isinstance(workers, bool) or workers < 1:
            raise ValueError(f"'workers' must be a positive int, got {workers!r}")
        ctx = ctx or multiprocessing.get_context()
        stop = ctx.Event()
        ready = ctx.Semaphore(0)
        procs = [
            ctx.Process(target=_serve_worker, args=(self.name, fn, stop, ready), name=f"shmq-serve-{self.name}-{i}", daemon=True)
            for i in range(workers)
        ]
        serving = Serving(procs, stop)
        for p in procs:
            p.start()
        deadline = _monotonic() + ready_timeout
        for _ in procs:
            while not ready.acquire(timeout=0.1):
                if not any(p.is_alive() for p in procs) or _monotonic() > deadline:
                    serving.close(1.0)
                    raise BrokenError(f"the workers of service {self.name!r} did not start")
        return serving

    def servers(self) -> List[int]:
        """Pids of the live processes listed as servers of the service."""
        self._check()
        return [p.pid for p in self._requests.participants() if p.alive and p.role & L.ROLE_CONSUMER]

    # -- lifetime -------------------------------------------------------
    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """End this handle (and this process's client).  Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._client is not None and self._client._pid == os.getpid():
            self._client.close()
        for peer in self._peers.values():
            peer.forget(False)
        self._peers = {}
        self._encoder.close()
        self._decoder.close()
        if self._pool is not None:
            self._pool.close()
        self._requests.close()

    def unlink(self) -> None:
        """Remove the service's name for every process."""
        self._requests.unlink()

    def __enter__(self) -> "Service":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<shmq.Service {self.name!r}{' closed' if self._closed else ''}>"

    # -- internals ------------------------------------------------------
    def _check(self) -> None:
        if self._closed:
            raise ClosedError(f"service {self.name!r} is closed")

    def _register_server(self) -> None:
        pid = os.getpid()
        if self._server_in != pid:
            self._requests.segment.add_role(L.ROLE_CONSUMER)
            if self._pool is not None and self._pool._pid != pid:  # forked: the parent's pool is not ours
                self._pool, self._encoder = None, _codec.Codec(None)
            self._peers = {}
            self._server_in = pid

    def _peer(self, name: str) -> Optional[_Peer]:
        peer = self._peers.get(name)
        if peer is None:
            try:
                peer = self._peers[name] = _Peer(name)
            except (OSError, ShmqError, ValueError):
                return None  # the client is gone
        return peer

    def _sweep_peers(self) -> None:
        for name, peer in list(self._peers.items()):
            if peer.gone():
                del self._peers[name]
                peer.forget(reclaim=not peer.ring.creator_alive())

    def _take(self) -> Optional[Request]:
        """Take one request off the ring, or None.  A cancelled request, or
        one whose client is gone, is dropped here: its handler never runs."""
        ring = self._requests
        view = ring.peek()
        if view is None:
            return None
        peer = None
        try:
            try:
                seq, entry, nlen = _REQ.unpack_from(view)
                name = bytes(view[_REQ.size : _REQ.size + nlen]).decode("ascii")
                data = bytes(view[_REQ.size + nlen :])
            except (struct.error, UnicodeError):
                return None  # not a request: dropped
            finally:
                view.release()
            if entry < MAX_OUTSTANDING:
                peer = self._peer(name)
            if peer is not None:
                w = peer.w
                base = _TABLE_BASE + entry * ENTRY_WORDS
                if w[base + E_SEQ] != seq or w[base + E_CANCEL] == seq:
                    peer = None  # answered or cancelled already
                else:
                    w[base + E_PID] = os.getpid()
                    w[base + E_START] = P.my_start_us()
                    w[base + E_TAKEN] = seq
                    _fence()
                    if w[base + E_CANCEL] == seq:  # the client cancelled as we took it
                        peer = None
        finally:
            ring.release()
        if peer is None:
            _drop_message(data, self._decoder.resolve)
            return None
        try:
            payload = self._decoder.decode(data)
        except Exception as exc:
            req = Request(self, peer, entry, seq, None)
            req.fail(exc)
            return None
        return Request(self, peer, entry, seq, payload)

    def _send_reply(self, peer: _Peer, header: bytes, obj: Any, kind: int, deadline: Optional[float], req: Request) -> None:
        if kind == K_ERROR:
            data, lease = _error_info(obj), None
        else:
            data, lease = _plain(obj), None
        if data is _codec.LARGE:
            if self._pool is None:
                self._pool = _fitted_pool(obj, None)
                self._encoder = _codec.Codec(self._pool)
            while True:  # a pool with no free slot: wait while the client still wants the reply
                try:
                    data, lease = self._encoder.encode(obj, timeout=_SLICE)
                    break
                except Full:
                    if req.cancelled or peer.gone():
                        return
                    if deadline is not None and _monotonic() >= deadline:
                        raise
        record = header + data
        ring = peer.ring
        try:
            while not ring.try_write(record):
                if req.cancelled or peer.gone():  # nobody will read it: drop, never block on a dead client
                    if lease is not None:
                        lease.abort()
                        lease = None
                    return
                now = _monotonic()
                if deadline is not None and now >= deadline:
                    raise Full(f"the reply ring of client {peer.name!r} stayed full")
                try:
                    ring._block_writing(lambda: ring.can_write(len(record)), None, min(now + _SLICE, deadline or now + _SLICE))
                except Full:
                    pass
        except BaseException:
            if lease is not None:
                lease.abort()
            raise
        if lease is not None:
            lease.sent()


def _serve_worker(name: str, fn: Callable[[Any], Any], stop: Any, ready: Any) -> None:
    svc = Service.attach(name)
    try:
        svc._register_server()
        ready.release()
        while not stop.is_set():
            try:
                req = svc.receive(timeout=0.1)
            except cf.TimeoutError:
                continue
            try:
                _handle(req, fn)
            except Exception:  # the outcome could not be sent (e.g. an unpicklable exception): keep serving
                traceback.print_exc()
    finally:
        svc.close()


def _handle(req: Request, fn: Callable[[Any], Any]) -> None:
    try:
        out = fn(req.payload)
        if inspect.isgenerator(out):
            try:
                while True:
                    item = next(out)
                    if req.cancelled:
                        out.close()
                        return
                    req.send_partial(item)
            except StopIteration as end:
                out = end.value
        req.reply(out)
    except Exception as exc:
        if not req.done:
            req.fail(exc)


_TOKEN = object()
