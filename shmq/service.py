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
pid and start time and then TAKEN = SEQ when it takes the request, just
after reading it off the ring.  A client that finds the server named in
TAKEN dead fails the call with BrokenError (or sends it again, if it is
idempotent); one that finds the ring's readers past its request and no
TAKEN for LOST_GRACE sends it again (its server died between the read and
the record: it was never served).
"""
from __future__ import annotations

import multiprocessing
import os
import time
import traceback
import types
from typing import Any, Callable, Dict, Iterator, List, Optional

from . import _codec
from . import _layout as L
from . import _platform as P
from ._errors import BrokenError, ClosedError, Full, LayoutError, RemoteError, ShmqError
from ._segment import Segment
from ._codec import LARGE, stop_at_large
from ._service_client import (
    _RAW_TYPES,
    _REP,
    _REQ,
    _SLICE,
    _THRESHOLD,
    _TABLE_BASE,
    _TOKEN,
    E_CANCEL,
    E_DONE,
    E_PID,
    E_SEQ,
    E_START,
    E_TAKEN,
    ENTRY_WORDS,
    F_PARTIALS,
    K_ERROR,
    K_PARTIAL,
    K_RESULT,
    LIVENESS_INTERVAL,
    LOST_GRACE,
    MAX_OUTSTANDING,
    MAX_RETRIES,
    NO_SERVER_GRACE,
    Client,
    ClientStatistics,
    Future,
    ReadWait,
    _drop_message,
    _dumps,
    _error_info,
    _fence_acquire,
    _fence_release,
    _fitted_pool,
    _forks,
    _loads,
    first_pass,
)
from ._slots import SlotPool
from ._stats import ServerStatistics, ServiceStatistics, service_statistics
from ._wait import deadline_for
from .ring import DEFAULT_CAPACITY_BYTES, Ring

__all__ = (
    "Service",
    "ServiceStatistics",
    "ServerStatistics",
    "Client",
    "ClientStatistics",
    "Future",
    "Request",
    "Serving",
    "RemoteError",
    "DEFAULT_CAPACITY_BYTES",
    "MAX_OUTSTANDING",
    "NO_SERVER_GRACE",
    "LIVENESS_INTERVAL",
    "LOST_GRACE",
    "MAX_RETRIES",
    "PEER_SWEEP_INTERVAL",
)

#: how often a server looks for dead or closed clients to forget
PEER_SWEEP_INTERVAL = 1.0
#: how often a busy worker of Service.serve looks whether it was asked to stop
_STOP_LOOK = 0.01
#: how often a receiving server adds its waits to the request ring's statistics
_FLUSH_INTERVAL = 0.1
#: how often a server with a result for a client looks whether it is gone
_GONE_LOOK = 0.1
_monotonic = time.monotonic
_GeneratorType = types.GeneratorType


# -- server ---------------------------------------------------------------------


class _Peer:
    """What a server keeps of one client: its reply ring and request table.
    ``ident``: a number this server gives the client (never reused), which
    the slots of the results sent to it carry as their fence (_ResultFence)."""

    __slots__ = ("server", "name", "ring", "table", "w", "write", "ident", "_gone_at", "_gone")
    # (also the codec's fence while encoding a result for this client: position())

    def __init__(self, server: "Service", name: str, ident: int) -> None:
        self.server = server
        self.name = name
        self.ident = ident
        self.ring = Ring.attach(name)
        try:
            self.table = Segment.attach(P.part_name(name, "b0"), L.KIND_BLOB)
        except BaseException:
            self.ring.close()
            raise
        self.w = self.table.words
        self.write = self.ring.try_write
        self._gone_at = 0.0
        self._gone = False

    def gone(self) -> bool:
        """True if the client closed (its names are gone) or died."""
        if self._gone:
            return True
        try:
            self.ring.segment.check_exists()
        except (BrokenError, ClosedError):
            self._gone = True
            return True
        self._gone = not self.ring.creator_alive()
        return self._gone

    def position(self) -> int:
        """What the slots of a result sent to this client carry as their
        fence (the codec's Lease asks its fence for it): the client's ident."""
        return self.ident

    def gone_lately(self) -> bool:
        """:meth:`gone`, looked up at most every _GONE_LOOK seconds."""
        now = _monotonic()
        if not self._gone and now >= self._gone_at:
            self._gone_at = now + _GONE_LOOK
            self.gone()
        return self._gone

    def forget(self, reclaim: bool) -> None:
        if reclaim:  # the client died: nobody else will remove its names
            for name in (self.name, P.part_name(self.name, "b0"), P.part_name(self.name, "p")):
                P.shm_unlink(name)
        self._gone = True
        self.table.close()
        self.ring.close()


class _ResultFence:
    """The fence of a server's result pool (SlotPool.fence): each slot sent
    carries the ident of the client it went to (``set_fence``), and a slot
    counts as orphaned (SlotPool._orphaned frees it, once nobody holds it)
    as soon as that client is gone -- died or closed, before decoding the
    reply.  One ring fence per pool cannot say this: a server's results go to
    many reply rings."""

    __slots__ = ("_service",)

    def __init__(self, service: "Service") -> None:
        self._service = service

    def position(self) -> int:
        return 0  # (asked only for the slots of a dead source: this pool has one source, us)

    def passed(self, ident: int) -> bool:
        peer = self._service._by_ident.get(ident)
        return peer is None or peer.gone_lately()  # (forgotten peers were gone)

    def someone_died(self) -> bool:
        return True  # passed() already asked whether that client is gone


class Request:
    """One request, on the server that took it.  ``payload`` is what the
    client sent.  Answer with exactly one of :meth:`reply` or :meth:`fail`,
    after any number of :meth:`send_partial`."""

    __slots__ = ("payload", "_peer", "_base", "seq", "flags", "done")

    def __init__(self, peer: _Peer, base: int, seq: int, flags: int, payload: Any) -> None:
        """(``base``: the first word of the request's entry in ``peer.w``.)"""
        self.payload = payload
        self._peer = peer
        self._base = base
        self.seq = seq
        self.flags = flags
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

    @property
    def wants_partials(self) -> bool:
        """True if the client reads partial replies (``stream``); to a
        ``call`` or ``submit``, :meth:`send_partial` sends nothing."""
        return bool(self.flags & F_PARTIALS)

    def send_partial(self, obj: Any, timeout: Optional[float] = None) -> None:
        """Send one partial reply (the client's ``stream`` yields it).  A
        no-op for a client that does not read them (``call``, ``submit``)."""
        if self.flags & F_PARTIALS:
            self._send(K_PARTIAL, obj, timeout)
        elif self.done:
            self._answered()

    def reply(self, obj: Any, timeout: Optional[float] = None) -> None:
        """Send the reply; this ends the request.  ``timeout`` bounds the
        wait for room in the client's reply ring (Full).  Raises the pickling
        error of ``obj`` (the request stays open: ``fail`` it)."""
        if self.done:
            self._answered()
        if timeout is not None:
            deadline_for(timeout)  # (raises ValueError for a bad one, even when there is room)
        peer = self._peer
        w = peer.w
        base = self._base
        seq = self.seq
        try:
            live = w[base + E_SEQ] == seq and w[base + E_CANCEL] != seq
        except ValueError:  # the table was closed: the client is gone
            live = False
        srv = peer.server
        if live:  # (a cancelled request's replies would be dropped by the client anyway)
            # The common case inline: a small pickle that fits the ring now.
            try:
                data = _dumps(obj, 5, buffer_callback=stop_at_large)
            except Exception:
                data = first_pass(obj)  # (the fallbacks: LARGE, or the pickling error)
            # The statistics (docs/services.md "Seeing it"): the server's
            # counter and the entry's DONE, before the client can see the
            # reply (statistics read after a call returns include it), taken
            # back if it is not sent.  Two stores, ~0.1 us.
            counters = srv._counters
            counters[srv._i_replied] += 1
            try:
                w[base + E_DONE] = seq
            except ValueError:  # the table was closed: the client is gone
                pass
            try:
                if len(data) >= _THRESHOLD and (data is LARGE or type(obj) in _RAW_TYPES):
                    live = srv._send_reply(peer, seq, obj, K_RESULT, deadline_for(timeout), self, LARGE)
                elif not peer.write(data + _REP.pack(seq, K_RESULT)):  # (the reply ring is full)
                    live = srv._send_reply(peer, seq, obj, K_RESULT, deadline_for(timeout), self, data)
            except BaseException:
                self._not_sent(L.SV_REPLIED)
                raise
            if not live:
                self._not_sent(L.SV_REPLIED)
        if not live:
            srv._counters[srv._ci + L.SV_DROPPED] += 1
        self.done = True

    def _not_sent(self, counter: int) -> None:
        """Take back what reply/fail counted before sending: the server's
        ``counter`` and the entry's DONE (the request stays open if sending
        raised)."""
        srv = self._peer.server
        srv._counters[srv._ci + counter] -= 1
        try:
            w = self._peer.w
            if w[self._base + E_DONE] == self.seq:
                w[self._base + E_DONE] = 0
        except ValueError:
            pass

    def fail(self, exc: BaseException, timeout: Optional[float] = None) -> None:
        """End the request with ``exc``: the client raises RemoteError
        (with ``exc`` as ``__cause__`` if it unpickles there)."""
        if not isinstance(exc, BaseException):
            raise TypeError(f"'exc' must be an exception, got {type(exc).__name__}")
        self._send(K_ERROR, exc, timeout)

    def _answered(self) -> None:
        raise RuntimeError(f"request {self.seq} of client {self._peer.name!r} was already answered")

    def _send(self, kind: int, obj: Any, timeout: Optional[float]) -> None:
        if self.done:
            self._answered()
        peer = self._peer
        srv = peer.server
        # A cancelled request's replies would be dropped by the client anyway.
        # _send_reply raises (unpicklable object, Full) before anything was
        # sent: the request stays open for fail().
        if kind == K_PARTIAL:
            if not self.cancelled:
                counters = srv._counters
                counters[srv._ci + L.SV_PARTIALS] += 1  # (before the client can see it, as in reply())
                try:
                    if not srv._send_reply(peer, self.seq, obj, kind, deadline_for(timeout), self):
                        counters[srv._ci + L.SV_PARTIALS] -= 1
                except BaseException:
                    counters[srv._ci + L.SV_PARTIALS] -= 1
                    raise
            return
        sent = not self.cancelled
        if sent:  # counted before the client can see it, as in reply()
            srv._counters[srv._ci + L.SV_FAILED] += 1
            try:
                peer.w[self._base + E_DONE] = self.seq
            except ValueError:  # the table was closed: the client is gone
                pass
            try:
                sent = srv._send_reply(peer, self.seq, obj, kind, deadline_for(timeout), self)
            except BaseException:
                self._not_sent(L.SV_FAILED)
                raise
            if not sent:
                self._not_sent(L.SV_FAILED)
        if not sent:
            srv._counters[srv._ci + L.SV_DROPPED] += 1
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
        ring = Ring.create(capacity_bytes, name=name)
        try:
            w = ring.segment.words
            w[L.W_SV_SERVERS] = L.SV_SERVERS
            w[L.W_SV_TAG] = L.SERVICE_TAG
            w[L.W_QUEUE_KIND] = L.QUEUE_KIND_SERVICE  # last: attach() waits for it
        except BaseException:
            ring.unlink()
            ring.close()
            raise
        self._setup(ring)

    @classmethod
    def attach(cls, name: str) -> "Service":
        """Open the service ``name``.  Raises FileNotFoundError, or
        LayoutError if ``name`` is not a service (a queue, a plain ring...)."""
        ring = Ring.attach(name)
        try:
            w = ring.segment.words
            kind = w[L.W_QUEUE_KIND]
            # A service publishes its ring before it writes its kind; a young
            # segment may not have it yet.
            while kind == 0 and time.time_ns() - w[L.W_CREATED_NS] < 500_000_000:
                time.sleep(0.001)
                kind = w[L.W_QUEUE_KIND]
            if kind != L.QUEUE_KIND_SERVICE or w[L.W_SV_TAG] != L.SERVICE_TAG:
                what = "a client's reply ring" if kind == L.QUEUE_KIND_REPLIES else "not a service"
                raise LayoutError(f"{ring.name!r} is {what}: expected a shmq.Service")
        except BaseException:
            ring.close()
            raise
        self = cls.__new__(cls)
        self._setup(ring)
        return self

    def _setup(self, ring: Ring) -> None:
        self._requests = ring
        self.name = ring.name
        self._client: Optional[Client] = None
        self._peers: Dict[bytes, _Peer] = {}  # by reply-ring name, as requests carry it
        self._by_ident: Dict[int, _Peer] = {}
        self._idents = 0
        self._read_request = ring.try_read
        self._request_wait = ReadWait(ring)
        self._next_flush = 0.0
        self._server_start = 0
        self._pool: Optional[SlotPool] = None
        self._encoder = _codec.Codec(None)
        self._decoder = _codec.Codec(None)
        self._server_in = -1  # the fork generation (_forks) this handle was registered as a server in
        self._server_pid = 0
        self._next_sweep = 0.0
        # This server's counters (L.SV_*): its entry in the request ring's
        # server table once it serves, or a private copy (no free entry, or
        # not a server yet) added to SV_RETIRED every _FLUSH_INTERVAL.
        self._counters: memoryview = _private_counters()
        self._ci = 0
        self._i_replied = L.SV_REPLIED
        self._entry = -1
        self._entry_pid = 0
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
        process as a server).  Raises TimeoutError after ``timeout`` seconds,
        ClosedError once this handle is closed."""
        if self._server_in != _forks[0] or self._closed:
            self._check()
            self._register_server()
        deadline = None if timeout is None else deadline_for(timeout)
        while True:
            now = _monotonic()
            if now >= self._next_flush:
                self._housekeeping(now)
            req = self._take()
            if req is not None:
                return req
            now = _monotonic()
            if deadline is not None and now >= deadline:
                raise TimeoutError(f"no request for service {self.name!r} within {timeout} s")
            self._request_wait.wait(now + _SLICE if deadline is None or deadline > now + _SLICE else deadline)
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

    def statistics(self) -> ServiceStatistics:
        """A snapshot of the service, read from shared memory (any process
        sees the same: ``shmq.lowlevel.read_statistics(name)``, ``shmq stat``):
        the request ring, the calls received, replied, failed, cancelled, in
        flight and lost, each server and each client.  Raises ClosedError
        once closed."""
        self._check()
        self._request_wait.flush()
        if self._entry < 0 and any(self._counters):
            self._release_entry()  # (counted privately: add them now)
        return service_statistics(self._requests.segment)

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
        self._by_ident = {}
        self._request_wait.flush()
        if self._entry >= 0 or any(self._counters):
            self._release_entry()
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
        if self._server_in != _forks[0]:
            self._requests.segment.add_role(L.ROLE_CONSUMER)
            if self._pool is not None and self._pool._pid != os.getpid():  # forked: the parent's pool is not ours
                self._pool, self._encoder = None, _codec.Codec(None)
            self._peers = {}
            self._by_ident = {}
            self._server_start = P.my_start_us()
            self._server_pid = os.getpid()
            self._server_in = _forks[0]
            self._claim_entry()

    def _claim_entry(self) -> None:
        """Take an entry of the request ring's server table for this
        process's counters (a free one, or one whose server died: its counts
        go to SV_RETIRED first); with none left, count privately."""
        self._counters, self._ci, self._entry, self._entry_pid = _private_counters(), 0, -1, 0
        self._i_replied = L.SV_REPLIED
        seg = self._requests.segment
        w = seg.words
        pid, start = os.getpid(), self._server_start
        with seg.admin_lock():
            for i in range(min(w[L.W_SV_SERVERS], L.SV_SERVERS)):
                b = L.service_entry_word(i)
                holder = w[b + L.SV_PID]
                if holder and P.is_alive(holder, w[b + L.SV_START_US]):
                    continue  # (also another handle of this process that serves)
                if holder:  # died: keep its counts
                    _fold(w, w, b, free=True)
                w[b + L.SV_START_US] = start
                w[b + L.SV_PID] = pid
                self._counters, self._ci, self._entry, self._entry_pid = w, b, i, pid
                self._i_replied = b + L.SV_REPLIED
                return

    def _release_entry(self) -> None:
        """Add this server's counts to SV_RETIRED (and free its entry)."""
        seg = self._requests.segment
        try:
            with seg.admin_lock():
                if self._entry >= 0:
                    if self._entry_pid == os.getpid() and seg.words[self._ci + L.SV_PID] == self._entry_pid:
                        _fold(seg.words, seg.words, self._ci, free=True)
                elif any(self._counters):
                    _fold(seg.words, self._counters, 0, free=False)
        except (ClosedError, OSError, ValueError):
            pass  # (closed meanwhile: the counts go with it)
        self._counters, self._ci, self._entry, self._entry_pid = _private_counters(), 0, -1, 0
        self._i_replied = L.SV_REPLIED

    def _peer(self, name: bytes) -> Optional[_Peer]:
        """The client whose reply ring is ``name`` (as a request carries it),
        or None if it is gone (or ``name`` is not one)."""
        peer = self._peers.get(name)
        if peer is None:
            self._idents += 1
            try:
                peer = _Peer(self, name.decode("ascii"), self._idents)
            except (OSError, ShmqError, ValueError):  # (UnicodeError is a ValueError)
                return None  # the client is gone
            self._peers[name] = self._by_ident[peer.ident] = peer
        return peer

    def _housekeeping(self, now: float) -> None:
        """Every _FLUSH_INTERVAL while receiving: the request ring's wait
        statistics; every PEER_SWEEP_INTERVAL: the clients that are gone."""
        self._next_flush = now + _FLUSH_INTERVAL
        self._request_wait.flush()
        if self._entry < 0 and any(self._counters):  # (more servers than entries: counted privately)
            self._release_entry()
        if now >= self._next_sweep:
            self._next_sweep = now + PEER_SWEEP_INTERVAL
            self._sweep_peers()

    def _sweep_peers(self) -> None:
        for name, peer in list(self._peers.items()):
            if peer.gone():
                del self._peers[name]
                self._by_ident.pop(peer.ident, None)
                peer.forget(reclaim=not peer.ring.creator_alive())

    def _take(self) -> Optional[Request]:
        """Take one request off the ring, or None.  A cancelled request, or
        one whose client is gone, is dropped here: its handler never runs.

        The request leaves the ring (try_read) before this server records
        taking it in the client's entry: a server killed in between loses
        it, and the client, which sees the ring's readers past its request
        with no server recorded, sends it again (``Client._resend_lost``).
        (Holding the ring's consumer lock through peek/release until the
        record is made cost 0.7 us a request more.)"""
        rec = self._read_request()
        if rec is None:
            return None
        # the trailer (see _service_client): name, then seq, entry, flags, len(name)
        end = len(rec) - _REQ.size
        if end < 2:
            return None  # not a request: dropped
        seq, entry, flags, nlen = _REQ.unpack_from(rec, end)
        end -= nlen  # (now the end of the payload)
        if end < 1 or not nlen:
            return None
        name = rec[end : end + nlen]
        peer = (self._peers.get(name) or self._peer(name)) if entry < MAX_OUTSTANDING else None
        if peer is not None:
            w = peer.w
            base = _TABLE_BASE + entry * ENTRY_WORDS
            try:
                if w[base + E_SEQ] != seq or w[base + E_CANCEL] == seq:
                    peer = None  # answered or cancelled already
                else:
                    w[base + E_PID] = self._server_pid
                    w[base + E_START] = self._server_start
                    w[base + E_TAKEN] = seq
                    _fence_acquire()  # (_fence(), inlined)
                    _fence_release()
                    if w[base + E_CANCEL] == seq:  # the client cancelled as we took it
                        peer = None
            except ValueError:  # the table was closed (swept): the client is gone
                peer = None
        if peer is None:
            self._counters[self._ci + L.SV_SKIPPED] += 1  # (cancelled, or its client is gone)
            if rec[0] != 0x80:
                _drop_message(rec[:end], self._decoder.resolve)
            return None
        try:
            payload = _loads(rec) if rec[0] == 0x80 else self._decoder.decode(rec[:end])
        except Exception as exc:
            Request(peer, base, seq, flags, None).fail(exc)
            return None
        return Request(peer, base, seq, flags, payload)

    def _send_reply(
        self, peer: _Peer, seq: int, obj: Any, kind: int, deadline: Optional[float], req: Request, data: Any = None
    ) -> bool:
        """Send one reply record to ``peer``: through a slot of this server's
        result pool if ``obj`` has a large buffer; waiting (until
        ``deadline``: Full) for room while the client still wants it.
        ``data``: ``first_pass(obj)``, if the caller has it.  True if sent,
        False if dropped (the client cancelled, or is gone)."""
        lease = None
        if kind == K_ERROR:
            data = _error_info(obj)
        elif data is None:
            data = first_pass(obj)
        if data is LARGE:
            if self._pool is None:
                pool = _fitted_pool(obj, None, link=self.name)
                pool.fence = _ResultFence(self)
                pool.orphan_seconds = 0.0  # (an orphan here is a slot sent to a client known gone)
                self._pool = pool
                self._encoder = _codec.Codec(pool)
            self._encoder.fence = peer  # the slots' fence: the client they go to (see _ResultFence)
            while True:  # a pool with no free slot: wait while the client still wants the reply
                try:
                    data, lease = self._encoder.encode(obj, timeout=_SLICE)
                    break
                except Full:
                    if req.cancelled or peer.gone():
                        return False
                    if deadline is not None and _monotonic() >= deadline:
                        raise
        record = data + _REP.pack(seq, kind)
        ring = peer.ring
        try:
            while not ring.try_write(record):
                if req.cancelled or peer.gone():  # nobody will read it: drop, never block on a dead client
                    if lease is not None:
                        lease.abort()
                        lease = None
                    return False
                now = _monotonic()
                if deadline is not None and now >= deadline:
                    raise Full(f"the reply ring of client {peer.name!r} stayed full")
                try:
                    ring._block_writing(lambda: ring.can_write(len(record)), min(now + _SLICE, deadline or now + _SLICE))
                except Full:
                    pass
        except BaseException:
            if lease is not None:
                lease.abort()
            raise
        if lease is not None:
            lease.sent()
        return True


def _private_counters() -> memoryview:
    """Counters laid out as a server-table entry, in this process only."""
    return memoryview(bytearray(L.SV_ENTRY_WORDS * L.WORD)).cast("q")


def _fold(w: memoryview, src: memoryview, base: int, free: bool) -> None:
    """Add the counters at ``src[base:]`` to the request ring's SV_RETIRED
    and zero them (``free``: also give the entry up).  Under the ring's
    admin lock; SV_FOLDS is odd meanwhile, so a reader that sees it change
    reads again (it would count the folded entry twice, or not at all)."""
    # (sums wrap at the int64 limit, as the rings' counters do: a peer could have written any value)
    if w[L.W_SV_FOLDS] & 1:
        w[L.W_SV_FOLDS] = _wrapped(w[L.W_SV_FOLDS] + 1)  # (a folder died mid-fold: the admin lock is ours now)
    w[L.W_SV_FOLDS] = _wrapped(w[L.W_SV_FOLDS] + 1)
    for k in range(L.SV_REPLIED, L.SV_ENTRY_WORDS):
        w[L.W_SV_RETIRED + k] = _wrapped(w[L.W_SV_RETIRED + k] + src[base + k])
        src[base + k] = 0
    if free:
        src[base + L.SV_PID] = 0
    w[L.W_SV_FOLDS] = _wrapped(w[L.W_SV_FOLDS] + 1)


def _wrapped(n: int) -> int:
    return (n + (1 << 63)) % (1 << 64) - (1 << 63)


def _serve_worker(name: str, fn: Callable[[Any], Any], stop: Any, ready: Any) -> None:
    svc = Service.attach(name)
    try:
        svc._register_server()
        ready.release()
        next_look = 0.0
        while True:
            # stop.is_set() costs a semaphore round trip (~0.5 us, a twentieth
            # of a call): look at most every _STOP_LOOK seconds while busy
            now = _monotonic()
            if now >= next_look:
                if stop.is_set():
                    break
                next_look = now + _STOP_LOOK
            try:
                req = svc.receive(timeout=0.1)
            except TimeoutError:
                next_look = 0.0
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
        if type(out) is _GeneratorType:
            partials = req.flags & F_PARTIALS  # (else the client would drop them: not even sent)
            try:
                while True:
                    item = next(out)
                    if req.cancelled:
                        out.close()
                        return
                    if partials:
                        req.send_partial(item)
            except StopIteration as end:
                out = end.value
        req.reply(out)
    except Exception as exc:
        if not req.done:
            req.fail(exc)


