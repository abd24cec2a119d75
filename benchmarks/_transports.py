"""The transports the benchmarks compare, behind one small interface.

``prepare()`` runs in the parent before any child is forked; ``sender()`` /
``receiver()`` open an endpoint in whichever process uses it; ``send``,
``recv``, ``send_batched``, ``recv_batched`` and ``recv_until_stop`` are the
timed loops, written once per transport so the loop itself costs the same
for everybody; ``getter``/``batch_getter`` hand out the bare receive call,
for a loop that must see every message (written once, by its caller).
Message kinds: ``"raw"`` (bytes), ``"obj"`` (any picklable object: a
transport that moves bytes pickles it, as a user would), and ``"array"`` (a
uint8 numpy array: sent as its buffer where the transport takes buffers,
pickled otherwise).  ``one_to_one`` and ``fan_in`` run one measurement.
"""
from __future__ import annotations

import functools
import itertools
import os
import pickle
import tempfile
import time
from contextlib import nullcontext
from typing import Any, Callable, List, Optional

import numpy as np

import _harness
import shmq
from _harness import CTX, BenchError, children, expect, library_available, pin, unpinned

STOP_RAW = b""

_dumps = pickle.dumps
_loads = pickle.loads
_counter = itertools.count()


def stop_for(kind: str) -> Any:
    return None if kind == "obj" else STOP_RAW


def _is_stop(m: Any) -> bool:
    return m is None or (type(m) is bytes and not m)


class Transport:
    name = "?"
    #: the message kinds this transport can move
    kinds = ("raw", "obj", "array")
    batched = False

    def __init__(self, kind: str, msg_size: int = 64) -> None:
        if kind not in self.kinds:
            raise ValueError(f"{self.name} cannot move {kind!r} messages")
        self.kind = kind
        self.msg_size = msg_size

    def prepare(self) -> None:
        pass

    def sender(self) -> Any:
        raise NotImplementedError

    def receiver(self) -> Any:
        raise NotImplementedError

    def close_end(self, end: Any) -> None:
        pass

    def cleanup(self) -> None:
        pass

    def send_batched(self, end: Any, msgs: List[Any], batch: int) -> None:
        raise NotImplementedError

    def recv_batched(self, end: Any, n: int, batch: int) -> Any:
        raise NotImplementedError

    def getter(self, end: Any) -> Callable[[], Any]:
        """The call that receives one message (blocking, bounded where the
        library takes a timeout)."""
        raise NotImplementedError

    def batch_getter(self, end: Any) -> Callable[[int], List[Any]]:
        """The call ``get(k)`` that receives 1 to ``k`` messages (blocking
        for the first)."""
        raise NotImplementedError


class ShmqRing(Transport):
    """shmq.Ring: bytes in place; objects pickled by the caller (protocol 5)."""

    name = "shmq Ring"
    batched = True

    def __init__(self, kind: str, msg_size: int = 64, capacity: int = 1 << 20, multi: bool = False) -> None:
        super().__init__(kind, msg_size)
        self.capacity = max(capacity, 4 * (msg_size + 16))
        self.multi = multi
        self.ring: Optional[shmq.Ring] = None

    def prepare(self) -> None:
        self.ring = shmq.Ring.create(self.capacity, multi_producer=self.multi, multi_consumer=self.multi)
        self._owner = os.getpid()

    def _end(self) -> Any:
        assert self.ring is not None
        return self.ring if os.getpid() == self._owner else shmq.Ring.attach(self.ring.name)

    sender = receiver = _end

    def close_end(self, end: Any) -> None:
        if end is not self.ring:
            end.close()

    def cleanup(self) -> None:
        if self.ring is not None:
            self.ring.close()
            self.ring.unlink()
            self.ring = None

    def send(self, end: Any, msgs: List[Any]) -> None:
        write = end.write
        if self.kind == "obj":
            for m in msgs:
                write(_dumps(m, 5))
        else:
            for m in msgs:
                write(m)

    def recv(self, end: Any, n: int) -> Any:
        read = end.read
        m = None
        if self.kind == "obj":
            for _ in range(n):
                m = _loads(read())
        elif self.kind == "array":
            for _ in range(n):
                m = np.frombuffer(read(), np.uint8)
        else:
            for _ in range(n):
                m = read()
        return m

    def send_batched(self, end: Any, msgs: List[Any], batch: int) -> None:
        write_many = end.write_many
        obj = self.kind == "obj"
        for i in range(0, len(msgs), batch):
            chunk = msgs[i : i + batch]
            write_many([_dumps(m, 5) for m in chunk] if obj else chunk)

    def recv_batched(self, end: Any, n: int, batch: int) -> Any:
        read_many = end.read_many
        got = 0
        m = None
        obj = self.kind == "obj"
        while got < n:
            items = read_many(min(batch, n - got))
            got += len(items)
            m = [_loads(b) for b in items][-1] if obj else items[-1]
        return m

    def recv_until_stop(self, end: Any) -> int:
        read = end.read
        n = 0
        if self.kind == "obj":
            while _loads(read()) is not None:
                n += 1
        else:
            while read():
                n += 1
        return n

    def send_stop(self, end: Any) -> None:
        end.write(_dumps(None, 5) if self.kind == "obj" else STOP_RAW)

    def recv_until_stop_batched(self, end: Any, batch: int) -> int:
        read_many = end.read_many
        n = 0
        while True:
            items = read_many(batch)
            if self.kind == "obj":
                items = [_loads(b) for b in items]
            stops = sum(1 for m in items if _is_stop(m))
            n += len(items) - stops
            if stops:
                for _ in range(stops - 1):  # the other consumers' stops
                    self.send_stop(end)
                return n


class MpQueue(Transport):
    """multiprocessing.Queue: everything pickled, a feeder thread, a pipe."""

    name = "mp.Queue"

    def prepare(self) -> None:
        self.q = CTX.Queue()

    def sender(self) -> Any:
        return self.q

    receiver = sender

    def cleanup(self) -> None:
        self.q.cancel_join_thread()
        self.q.close()

    def send(self, end: Any, msgs: List[Any]) -> None:
        put = end.put
        for m in msgs:
            put(m)

    def recv(self, end: Any, n: int) -> Any:
        get = end.get
        m = None
        for _ in range(n):
            m = get()
        return m

    def recv_until_stop(self, end: Any) -> int:
        get = end.get
        n = 0
        while not _is_stop(get()):
            n += 1
        return n

    def send_stop(self, end: Any) -> None:
        end.put(stop_for(self.kind))

    def getter(self, end: Any) -> Callable[[], Any]:
        return end.get


class FasterFifo(Transport):
    """faster_fifo.Queue: a shared-memory circular buffer driven from C."""

    name = "faster-fifo"
    batched = True

    def __init__(self, kind: str, msg_size: int = 64, capacity: int = 1 << 20) -> None:
        super().__init__(kind, msg_size)
        self.capacity = max(capacity, 4 * (msg_size + 1024))

    def prepare(self) -> None:
        import faster_fifo

        if self.kind == "raw":
            self.q = faster_fifo.Queue(self.capacity, loads=bytes, dumps=lambda x: x)
        else:
            self.q = faster_fifo.Queue(self.capacity)

    def sender(self) -> Any:
        return self.q

    receiver = sender

    def cleanup(self) -> None:
        self.q.close()

    def send(self, end: Any, msgs: List[Any]) -> None:
        put = end.put
        for m in msgs:
            put(m, True, 60)

    def recv(self, end: Any, n: int) -> Any:
        get = end.get
        m = None
        for _ in range(n):
            m = get(True, 60)
        return m

    def send_batched(self, end: Any, msgs: List[Any], batch: int) -> None:
        put_many = end.put_many
        for i in range(0, len(msgs), batch):
            put_many(msgs[i : i + batch], True, 60)

    def recv_batched(self, end: Any, n: int, batch: int) -> Any:
        get_many = end.get_many
        got = 0
        m = None
        while got < n:
            items = get_many(True, 60, max_messages_to_get=min(batch, n - got))
            got += len(items)
            m = items[-1]
        return m

    def recv_until_stop(self, end: Any) -> int:
        get = end.get
        n = 0
        while not _is_stop(get(True, 60)):
            n += 1
        return n

    def getter(self, end: Any) -> Callable[[], Any]:
        return functools.partial(end.get, True, 60)

    def batch_getter(self, end: Any) -> Callable[[int], List[Any]]:
        get_many = end.get_many
        return lambda k: get_many(True, 60, max_messages_to_get=k)

    def send_stop(self, end: Any) -> None:
        end.put(stop_for(self.kind), True, 60)

    def recv_until_stop_batched(self, end: Any, batch: int) -> int:
        get_many = end.get_many
        n = 0
        while True:
            items = get_many(True, 60, max_messages_to_get=batch)
            stops = sum(1 for m in items if _is_stop(m))
            n += len(items) - stops
            if stops:
                for _ in range(stops - 1):  # the other consumers' stops
                    self.send_stop(end)
                return n


class Zmq(Transport):
    """pyzmq PUSH/PULL over ipc://; objects with send_pyobj, buffers zero-copy
    from 64 KiB up.  ``bind`` says which side binds (the single one)."""

    name = "pyzmq ipc"

    def __init__(self, kind: str, msg_size: int = 64, bind: str = "receiver") -> None:
        super().__init__(kind, msg_size)
        self.bind = bind
        self.copy = msg_size < 65536

    def prepare(self) -> None:
        path = os.path.join(tempfile.gettempdir(), f"shmq-bench-{os.getpid()}-{next(_counter)}.ipc")
        self.path = path
        self.address = "ipc://" + path

    def _socket(self, kind: int, bind: bool) -> Any:
        import zmq

        ctx = zmq.Context()  # never the parent's: a context does not survive fork
        sock = ctx.socket(kind)
        sock.setsockopt(zmq.LINGER, 0)
        if bind:
            sock.bind(self.address)
        else:
            sock.connect(self.address)
        return sock

    def sender(self) -> Any:
        import zmq

        return self._socket(zmq.PUSH, self.bind == "sender")

    def receiver(self) -> Any:
        import zmq

        return self._socket(zmq.PULL, self.bind == "receiver")

    def close_end(self, end: Any) -> None:
        import zmq

        ctx = end.context
        # A sender's queued messages must still go out (bounded); a
        # receiver's leftovers (extra stops) are dropped.
        end.close(5000 if end.socket_type == zmq.PUSH else 0)
        ctx.term()

    def cleanup(self) -> None:
        try:
            os.unlink(self.path)
        except OSError:
            pass

    def send(self, end: Any, msgs: List[Any]) -> None:
        if self.kind == "obj":
            send = end.send_pyobj
            for m in msgs:
                send(m)
        else:
            send = end.send
            copy = self.copy
            for m in msgs:
                send(m, copy=copy)

    def recv(self, end: Any, n: int) -> Any:
        m = None
        if self.kind == "obj":
            recv = end.recv_pyobj
            for _ in range(n):
                m = recv()
        elif self.kind == "array":
            recv = end.recv
            for _ in range(n):
                m = np.frombuffer(recv(copy=False).buffer, np.uint8)
        else:
            recv = end.recv
            copy = self.copy
            for _ in range(n):
                m = recv(copy=copy)
        return m

    def recv_until_stop(self, end: Any) -> int:
        n = 0
        if self.kind == "obj":
            recv = end.recv_pyobj
            while recv() is not None:
                n += 1
        else:
            recv = end.recv
            while recv():
                n += 1
        return n

    def getter(self, end: Any) -> Callable[[], Any]:
        return end.recv_pyobj if self.kind == "obj" else end.recv

    def send_stop(self, end: Any) -> None:
        import zmq

        try:
            if self.kind == "obj":
                end.send_pyobj(None, zmq.NOBLOCK)
            else:
                end.send(STOP_RAW, zmq.NOBLOCK)
        except zmq.Again:
            pass


class Pipe(Transport):
    """os.pipe with fixed-size messages and no framing: the kernel's floor."""

    name = "os.pipe"
    kinds = ("raw", "array")

    def prepare(self) -> None:
        self.r, self.w = os.pipe()

    def sender(self) -> Any:
        return self.w

    def receiver(self) -> Any:
        return self.r

    def cleanup(self) -> None:
        os.close(self.r)
        os.close(self.w)

    def send(self, end: Any, msgs: List[Any]) -> None:
        write = os.write
        size = self.msg_size
        for m in msgs:
            done = write(end, m)
            if done < size:
                view = memoryview(m).cast("B")
                while done < size:
                    done += write(end, view[done:])

    def recv(self, end: Any, n: int) -> Any:
        size = self.msg_size
        buf = bytearray(size)
        view = memoryview(buf)
        readinto = os.readv
        for _ in range(n):
            got = readinto(end, [view])
            while got < size:
                got += readinto(end, [view[got:]])
        return buf


class Iceoryx2(Transport):
    """iceoryx2 publish-subscribe (when installed; checked with 0.10): 64-byte
    ctypes payloads, loaned and written in place, a publisher that retries
    until delivered, a polling subscriber."""

    name = "iceoryx2"
    kinds = ("raw",)

    def prepare(self) -> None:
        self.service_name = f"shmq/bench/{os.getpid()}/{next(_counter)}"

    def _service(self) -> Any:
        import ctypes

        import iceoryx2 as iox2

        class Payload(ctypes.Structure):
            _fields_ = [("data", ctypes.c_uint8 * 64)]

        node = iox2.NodeBuilder.new().create(iox2.ServiceType.Ipc)
        service = (
            node.service_builder(iox2.ServiceName.new(self.service_name))
            .publish_subscribe(Payload)
            .subscriber_max_buffer_size(1024)
            .enable_safe_overflow(False)
            .open_or_create()
        )
        return node, service, Payload

    def sender(self) -> Any:
        import iceoryx2 as iox2

        node, service, payload = self._service()
        builder = service.publisher_builder()
        if hasattr(iox2, "BackpressureStrategy"):  # 0.10
            builder = builder.backpressure_strategy(iox2.BackpressureStrategy.RetryUntilDelivered)
        else:
            builder = builder.unable_to_deliver_strategy(iox2.UnableToDeliverStrategy.Block)
        return (node, service, builder.create(), payload())

    def receiver(self) -> Any:
        node, service, _ = self._service()
        return (node, service, service.subscriber_builder().create())

    def send(self, end: Any, msgs: List[Any]) -> None:
        pub, value = end[2], end[3]
        for _ in msgs:
            pub.loan_uninit().write_payload(value).send()

    def recv(self, end: Any, n: int) -> Any:
        sub = end[2]
        got = 0
        m = None
        while got < n:
            sample = sub.receive()
            if sample is not None:
                m = sample.payload()
                got += 1
        return m


def peers(kind: str, msg_size: int = 64, **ring: Any) -> List[Transport]:
    """shmq Ring and every installed peer that can move ``kind`` messages."""
    out: List[Transport] = [ShmqRing(kind, msg_size, **ring), MpQueue(kind, msg_size)]
    if library_available("faster_fifo"):
        out.append(FasterFifo(kind, msg_size))
    if library_available("zmq"):
        out.append(Zmq(kind, msg_size))
    if kind in Iceoryx2.kinds and msg_size == 64 and library_available("iceoryx2"):
        out.append(Iceoryx2(kind, msg_size))
    return out


# -- one producer -> one consumer ---------------------------------------------


def _receive_main(t: Transport, n: int, warmup: int, batch: int, conn: Any, pinned: bool = True) -> None:
    if pinned:
        pin(1)
    end = t.receiver()
    conn.send("ready")
    t.recv(end, warmup)
    conn.send("warm")
    if batch > 1:
        t.recv_batched(end, n, batch)
    else:
        t.recv(end, n)
    conn.send(time.perf_counter())
    t.close_end(end)


def one_to_one(t: Transport, msgs: List[Any], warmup: List[Any], batch: int = 1, pinned: bool = True) -> float:
    """Seconds from the first timed send in this process to the moment a
    child process has received all of ``msgs`` (``perf_counter`` is one
    clock for every process on Linux).  ``warmup`` goes first, untimed.
    ``pinned=False``: both processes may run on every core (this one for the
    duration of the call), as they would in a user's program."""
    with (nullcontext() if pinned else unpinned()):
        return _one_to_one(t, msgs, warmup, batch, pinned)


def _one_to_one(t: Transport, msgs: List[Any], warmup: List[Any], batch: int, pinned: bool) -> float:
    t.prepare()
    try:
        parent, child = CTX.Pipe()
        with children(_receive_main, [(t, len(msgs), len(warmup), batch, child, pinned)]):
            child.close()
            expect(parent, "ready")
            end = t.sender()
            try:
                t.send(end, warmup)
                expect(parent, "warm")
                t0 = time.perf_counter()
                if batch > 1:
                    t.send_batched(end, msgs, batch)
                else:
                    t.send(end, msgs)
                t1 = expect(parent, "the end time")
            finally:
                t.close_end(end)
        return t1 - t0
    finally:
        t.cleanup()


# -- several producers -> one consumer ----------------------------------------


def _produce_main(
    t: Transport, make: Callable[[int], List[Any]], index: int, batch: int, go: Any, done: Any, conn: Any
) -> None:
    pin(1)
    msgs = make(index)  # built here, before the clock starts (no copy-on-write faults while timed)
    end = t.sender()
    try:
        conn.send("ready")
        if not go.wait(_harness.MEASURE_TIMEOUT):  # set once every producer is ready
            raise BenchError("producer never released")
        t0 = time.perf_counter()
        if batch > 1:
            t.send_batched(end, msgs, batch)
        else:
            t.send(end, msgs)
        conn.send(t0)
        # Keep the end open until the consumer has everything: a pyzmq PUSH
        # closed while the PULL side is at its high-water mark drops what it
        # still holds, linger or not (libzmq issues #1922, #3774).
        done.wait(_harness.MEASURE_TIMEOUT)
    finally:
        t.close_end(end)


def fan_in(
    t: Transport,
    n_each: int,
    make: Callable[[int], List[Any]],
    producers: int = 4,
    batch: int = 1,
    receive: Optional[Callable[[Any, int], Any]] = None,
) -> float:
    """Seconds from the first send of any of ``producers`` child processes
    (producer ``p`` sends ``make(p)``: ``n_each`` messages, built in the
    child before the clock starts) until this process has received all
    ``producers * n_each``.  ``receive(end, n)`` receives them (default: the
    transport's ``recv``/``recv_batched``).  The receiving end is opened
    before the producers start, so a binding receiver (pyzmq) is there when
    they connect; the producers close their ends only after the last
    message is received."""
    t.prepare()
    try:
        end = t.receiver()
        try:
            go, done = CTX.Event(), CTX.Event()
            pipes = [CTX.Pipe() for _ in range(producers)]
            args = [(t, make, p, batch, go, done, child) for p, (_, child) in enumerate(pipes)]
            with children(_produce_main, args):
                try:
                    for parent, child in pipes:
                        child.close()
                        expect(parent, "ready")
                    go.set()
                    n = n_each * producers
                    if receive is not None:
                        receive(end, n)
                    elif batch > 1:
                        t.recv_batched(end, n, batch)
                    else:
                        t.recv(end, n)
                    t1 = time.perf_counter()
                finally:
                    done.set()
                t0 = min(expect(parent, "a producer's start time") for parent, _ in pipes)
        finally:
            t.close_end(end)
        return t1 - t0
    finally:
        t.cleanup()
