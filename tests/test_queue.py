"""shmq.Queue / JoinableQueue / SimpleQueue: what they promise beyond
multiprocessing's queues, with real processes and real shared memory.

(CPython's own queue tests, run against shmq, are in test_queue_cpython.py;
whole programs in test_queue_programs.py.)
"""
from __future__ import annotations

import concurrent.futures
import gc
import hashlib
import inspect
import multiprocessing as mp
import multiprocessing.queues as mpq
import os
import pickle
import queue as pyqueue
import random
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest

import shmq
from shmq import _layout as L
from shmq import _platform as P
from conftest import join_all, unique_name

T = 30.0  # generous bound for any single wait
MiB = 1 << 20


def shm_names():
    return set(os.listdir("/dev/shm"))


def blobs(q):
    return sorted(n for n in shm_names() if n.startswith(q.name + ".b"))


def queue_names(q):
    """Every /dev/shm entry of the queue (rings, semaphores, blobs, slot pool:
    every part is named after the queue)."""
    return sorted(n for n in shm_names() if q.name in n)


def digest(obj) -> str:
    return hashlib.sha256(pickle.dumps(obj, 5)).hexdigest()


# -- the standard library's API --------------------------------------------------


def _params(func):
    return [(p.name, p.default, p.kind) for p in inspect.signature(func).parameters.values()]


@pytest.mark.parametrize(
    "method",
    ["put", "get", "put_nowait", "get_nowait", "qsize", "empty", "full", "close", "join_thread", "cancel_join_thread"],
)
def test_signatures_are_multiprocessings(method):
    assert _params(getattr(shmq.Queue, method)) == _params(getattr(mpq.Queue, method))


def test_joinable_and_simple_signatures():
    assert _params(shmq.JoinableQueue.task_done) == _params(mpq.JoinableQueue.task_done)
    # join() adds only a keyword-only timeout
    assert _params(shmq.JoinableQueue.join)[:1] == _params(mpq.JoinableQueue.join)
    for method in ("put", "get", "empty", "close"):
        ours, theirs = _params(getattr(shmq.SimpleQueue, method)), _params(getattr(mpq.SimpleQueue, method))
        assert ours[: len(theirs)] == theirs
        assert all(default is not inspect.Parameter.empty for _, default, _ in ours[len(theirs) :])
    q_init = inspect.signature(shmq.Queue).parameters
    assert list(q_init)[0] == "maxsize" and q_init["maxsize"].default == 0
    assert all(p.kind is p.KEYWORD_ONLY for p in list(q_init.values())[1:])
    assert all(p.kind is p.KEYWORD_ONLY for p in inspect.signature(shmq.SimpleQueue).parameters.values())


def test_exceptions_are_the_standard_ones():
    q = shmq.Queue(1)
    try:
        q.put(1)
        with pytest.raises(pyqueue.Full):
            q.put_nowait(2)
        with pytest.raises(shmq.Full):
            q.put(2, timeout=0.01)
        # a negative timeout means "do not wait", as in multiprocessing.Queue
        with pytest.raises(pyqueue.Full):
            q.put(2, True, -1)
        assert q.get(True, -1) == 1
        with pytest.raises(pyqueue.Empty):
            q.get(True, -1)
        with pytest.raises(shmq.Empty):
            q.get_nowait()
    finally:
        q.close()
    with pytest.raises(shmq.ClosedError, match=r"^Queue '.*' is closed$"):
        q.get()
    assert isinstance(shmq.ClosedError("x"), ValueError)
    j = shmq.JoinableQueue()
    with pytest.raises(ValueError, match=r"^task_done\(\) called too many times$"):
        j.task_done()
    j.close()


def test_bad_arguments():
    with pytest.raises(TypeError, match=r"^'maxsize' must be an int, got str$"):
        shmq.Queue("3")
    with pytest.raises(ValueError, match=r"^'side_capacity_bytes' must be a positive int, got 0$"):
        shmq.Queue(side_capacity_bytes=0)
    with pytest.raises(ValueError, match="capacity_bytes"):
        shmq.Queue(capacity_bytes=10)
    q = shmq.Queue()
    with pytest.raises(ValueError, match=r"^'max_items' must be at least 1, got 0$"):
        q.get_many(0)
    q.close()


def test_closed_handle_state_and_no_ops():
    q = shmq.Queue()
    name = q.name
    q.cancel_join_thread()
    q.close()
    q.close()
    q.join_thread()  # documented no-ops, also after close
    q.cancel_join_thread()
    assert q.closed and repr(q) == f"<shmq.Queue {name!r} closed>"
    for call in (q.put_nowait, q.put_many):
        with pytest.raises(shmq.ClosedError):
            call([1])
    for call in (q.qsize, q.empty, q.full, q.get_many, q.statistics):
        with pytest.raises(shmq.ClosedError):
            call()
    assert type(q) is shmq.Queue  # (no class swap: a check in each method)
    # one rule for every handle, as multiprocessing refuses closed things
    ring = shmq.Ring.create(1024)
    ring.unlink()
    for handle in (q, ring):
        handle.close()
        with pytest.raises(shmq.ClosedError, match=r"is closed$"):
            pickle.dumps(handle)
    with pytest.raises(shmq.ClosedError, match=r"^Queue '.*' is closed$"):
        pickle.dumps(q.put)  # a bound method pickles its handle


def test_properties_repr_statistics_context_manager():
    with shmq.Queue(5, capacity_bytes=1 << 16) as q:
        assert q.maxsize == 5 and q.capacity_bytes == 1 << 16
        q.put("x")
        assert repr(q) == f"<shmq.Queue {q.name!r} 1 items>"
        st = q.statistics()
        assert st.name == q.name and st.messages_in == 1 and st.messages_used == 1 and st.max_messages == 5
        assert q.get() == "x" and q.statistics().messages_out == 1
    assert q.closed
    assert shmq.Queue[int] is not None  # generic alias, as multiprocessing's


# -- passing a queue anywhere -------------------------------------------------------


def test_pickles_as_its_name():
    for cls in (shmq.Queue, shmq.JoinableQueue, shmq.SimpleQueue):
        q = cls()
        data = pickle.dumps(q)
        assert q.name.encode() in data and len(data) < 200
        q2 = pickle.loads(data)
        assert type(q2) is cls and q2.name == q.name and q2 is not q
        q2.put("through the copy")
        assert q.get(timeout=T) == "through the copy"
        q2.close()
        q.close()


def _echo(q_in, q_out):
    q_out.put(("echo", q_in.get(timeout=T)))
    q_in.close()
    q_out.close()


def test_process_args_every_start_method(ctx):
    q_in, q_out = shmq.Queue(), shmq.JoinableQueue()
    p = ctx.Process(target=_echo, args=(q_in, q_out))
    p.start()
    q_in.put({"hello": [1, 2]})
    assert q_out.get(timeout=T) == ("echo", {"hello": [1, 2]})
    join_all([p])
    assert p.exitcode == 0
    q_in.close()
    q_out.close()


_WORKER_QUEUE = None


def _init_worker(q):
    global _WORKER_QUEUE
    _WORKER_QUEUE = q


def _report(x):
    _WORKER_QUEUE.put(("initializer", x))
    return x


def _report_to(q, x):
    q.put(("argument", x))
    return x * 2


def test_pool_initializer_and_apply_async(ctx):
    q = shmq.Queue()
    pool = ctx.Pool(2, initializer=_init_worker, initargs=(q,))
    try:
        assert sorted(pool.map(_report, range(4))) == [0, 1, 2, 3]
        assert pool.apply_async(_report_to, (q, 21)).get(T) == 42
    finally:
        pool.close()
        pool.join()
    got = sorted(q.get(timeout=T) for _ in range(5))
    assert got == [("argument", 21)] + [("initializer", i) for i in range(4)]
    q.close()


def test_process_pool_executor_initializer(ctx):
    q = shmq.Queue()
    with concurrent.futures.ProcessPoolExecutor(2, mp_context=ctx, initializer=_init_worker, initargs=(q,)) as ex:
        assert sorted(ex.map(_report, range(3))) == [0, 1, 2]
        assert ex.submit(_report_to, q, 5).result(T) == 10
    got = sorted(q.get(timeout=T) for _ in range(4))
    assert got == [("argument", 5)] + [("initializer", i) for i in range(3)]
    q.close()


def _answer_on_enclosed(outer):
    reply_q, item = outer.get(timeout=T)
    reply_q.put(item + 1)
    reply_q.close()


def test_queue_inside_another_queues_message(ctx):
    outer, reply = shmq.Queue(), shmq.SimpleQueue()
    p = ctx.Process(target=_answer_on_enclosed, args=(outer,))
    p.start()
    outer.put((reply, 41))
    assert reply.get(timeout=T) == 42
    join_all([p])
    assert p.exitcode == 0
    outer.close()
    reply.close()


_UNRELATED = textwrap.dedent(
    """
    import sys, shmq
    q = shmq.Queue.attach(sys.argv[1])
    item = q.get(timeout=30)
    q.put(("from pid", item))
    if isinstance(q, shmq.JoinableQueue):
        q.task_done()
    print(type(q).__name__)
    q.close()
    """
)


@pytest.mark.parametrize("cls", [shmq.Queue, shmq.JoinableQueue])
def test_attach_from_an_unrelated_process(cls):
    q = cls(name=unique_name("att"))
    big = bytes(range(256)) * 8192  # 2 MiB: through the side path
    q.put(big)
    res = subprocess.run([sys.executable, "-c", _UNRELATED, q.name], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == cls.__name__
    assert q.get(timeout=T) == ("from pid", big)
    if cls is shmq.JoinableQueue:
        q.task_done()  # the reply
        assert q.join(timeout=T)
    q.close()


def test_attach_errors():
    with pytest.raises(FileNotFoundError):
        shmq.Queue.attach(unique_name("none"))
    q, s, j = shmq.Queue(), shmq.SimpleQueue(), shmq.JoinableQueue()
    try:
        a = shmq.Queue.attach(j.name)
        assert type(a) is shmq.JoinableQueue  # a JoinableQueue is a Queue
        a.close()
        with pytest.raises(shmq.LayoutError, match=r"is a shmq.Queue, expected a shmq.JoinableQueue$"):
            shmq.JoinableQueue.attach(q.name)
        with pytest.raises(shmq.LayoutError, match=r"is a shmq.SimpleQueue, expected a shmq.Queue$"):
            shmq.Queue.attach(s.name)
        with pytest.raises(shmq.LayoutError, match=r"is the side ring of a queue"):
            shmq.Queue.attach(q._side.ring.name)
        with shmq.Ring.create(4096) as ring:
            try:
                with pytest.raises(shmq.LayoutError, match=r"is a ring, not a queue"):
                    shmq.Queue.attach(ring.name)
            finally:
                ring.unlink()
    finally:
        for x in (q, s, j):
            x.close()


# -- put pickles in the caller ------------------------------------------------------


def test_unpicklable_raises_from_put_and_the_queue_goes_on():
    q = shmq.Queue(2)
    with pytest.raises((pickle.PicklingError, AttributeError, TypeError)):
        q.put(lambda: 1)
    with pytest.raises(TypeError):
        q.put(threading.Lock())
    assert q.qsize() == 0 and q.empty()
    with pytest.raises((pickle.PicklingError, AttributeError, TypeError)):
        q.put_many([1, 2, lambda: 3])  # pickled first: nothing is put
    assert q.qsize() == 0
    q.put(1)
    q.put(2)
    assert q.full() and [q.get(), q.get()] == [1, 2]
    q.close()


def _use_socket(q):
    sock = q.get(timeout=T)
    sock.sendall(b"through a socket that came through shmq")
    sock.close()


def test_objects_only_multiprocessings_pickler_knows(ctx):
    # A socket does not pickle; mp.Queue's pickler (ForkingPickler) passes it
    # to another process, and so does shmq (it falls back to that pickler).
    q = shmq.Queue()
    ours, theirs = socket.socketpair()
    p = ctx.Process(target=_use_socket, args=(q,))
    p.start()
    q.put(theirs)
    theirs.close()
    ours.settimeout(T)
    assert ours.recv(100) == b"through a socket that came through shmq"
    join_all([p])
    ours.close()
    q.close()


# -- visibility, exact sizes, exit ---------------------------------------------------


def _put_then_signal(q, done, go, items):
    for item in items:
        q.put(item)
    done.set()
    go.wait(T)  # keep running until the parent looked


def test_an_item_is_visible_as_soon_as_put_returns(ctx):
    q = shmq.Queue()
    done, go = ctx.Event(), ctx.Event()
    big = np.arange(MiB, dtype=np.int32)  # 4 MiB: the side path
    p = ctx.Process(target=_put_then_signal, args=(q, done, go, ["small", big]))
    p.start()
    assert done.wait(T)
    # no sleep: the items are in shared memory once put() returned
    assert q.qsize() == 2 and not q.empty()
    assert q.get_nowait() == "small"
    assert np.array_equal(q.get_nowait(), big)
    assert q.empty()
    go.set()
    join_all([p])
    q.close()


def _put_n(q, n):
    for i in range(n):
        q.put(i)


def test_qsize_empty_full_are_exact(ctx):
    q = shmq.Queue(7)
    p = ctx.Process(target=_put_n, args=(q, 7))
    p.start()
    join_all([p])
    assert (q.qsize(), q.empty(), q.full()) == (7, False, True)
    for left in range(6, -1, -1):
        q.get_nowait()
        assert (q.qsize(), q.empty(), q.full()) == (left, left == 0, False)
    q.close()


def _flood_and_exit(q, n_small, large):
    for i in range(n_small):
        q.put(("item", i, b"x" * 100))
    q.put(large)


def _drain_count(q, results, n):
    for _ in range(n):
        q.get(timeout=T)
    results.put(("drained", q.qsize()))


def test_a_producer_exits_at_once_and_its_items_stay(ctx):
    # 3 MB of unread items: an mp.Queue producer would hang at exit (its
    # feeder thread cannot flush into a full pipe).
    q = shmq.Queue(capacity_bytes=8 * MiB)
    large = np.ones(3 * MiB, np.uint8)
    p = ctx.Process(target=_flood_and_exit, args=(q, 20_000, large))
    p.start()
    join_all([p], timeout=60)
    assert p.exitcode == 0
    assert q.qsize() == 20_001
    # another process reads them after their producer is gone
    results = shmq.Queue()
    reader = ctx.Process(target=_drain_count, args=(q, results, 20_001 - 3))
    for i in range(3):
        assert q.get(timeout=T) == ("item", i, b"x" * 100)
    reader.start()
    assert results.get(timeout=60) == ("drained", 0)
    join_all([reader])
    assert not blobs(q)
    q.close()
    results.close()


# -- large items ----------------------------------------------------------------


def _large_producer(q, seed):
    rng = np.random.default_rng(seed)
    for i in range(6):
        q.put(("small", i))
        q.put(rng.integers(0, 255, size=(2 + i) * MiB, dtype=np.uint8))
    q.put(b"\xab" * (10 * MiB))
    q.put({"frame": rng.standard_normal((512, 512, 4)), "meta": {"i": 99}, "tags": ["a"] * 100})


def test_items_larger_than_the_ring(ctx):
    q = shmq.Queue(capacity_bytes=64 << 10, side_capacity_bytes=8 * MiB)
    p = ctx.Process(target=_large_producer, args=(q, 7))
    p.start()
    rng = np.random.default_rng(7)
    for i in range(6):
        assert q.get(timeout=T) == ("small", i)
        assert np.array_equal(q.get(timeout=T), rng.integers(0, 255, size=(2 + i) * MiB, dtype=np.uint8))
    assert q.get(timeout=T) == b"\xab" * (10 * MiB)
    last = q.get(timeout=T)
    assert np.array_equal(last["frame"], rng.standard_normal((512, 512, 4))) and last["meta"] == {"i": 99}
    join_all([p])
    assert p.exitcode == 0 and not blobs(q) and q.empty()
    q.close()


def test_side_path_back_pressure():
    item = b"\x01" * MiB  # pickled: a few bytes more than 1 MiB
    # (zero_copy=False: with it, a 1 MiB bytes object would take a slot)
    q = shmq.Queue(capacity_bytes=64 << 10, side_capacity_bytes=3 * MiB, zero_copy=False)
    try:
        q.put(item)
        q.put(item)
        with pytest.raises(pyqueue.Full):
            q.put_nowait(item)
        t0 = time.monotonic()
        with pytest.raises(pyqueue.Full):
            q.put(item, timeout=0.2)
        assert time.monotonic() - t0 >= 0.15
        assert len(blobs(q)) == 2 and q.qsize() == 2  # nothing made for the refused puts
        # a taker makes room once the put is waiting; the put then goes through
        taker = threading.Thread(target=_get_when_a_producer_waits, args=(q, q._side.ring.segment.words))
        taker.start()
        q.put(item, timeout=T)
        taker.join(T)
        assert q.qsize() == 2 and len(blobs(q)) == 2
        assert [q.get(timeout=T) for _ in range(2)] == [item, item]
        # one item is always admitted when none is in flight, however large
        huge = b"\x02" * (5 * MiB)
        q.put_nowait(huge)
        with pytest.raises(pyqueue.Full):
            q.put_nowait(item)
        assert q.get(timeout=T) == huge and not blobs(q)
    finally:
        q.close()


def _get_when_a_producer_waits(q, words):
    deadline = time.monotonic() + T
    while not words[L.W_PRODUCER_WAITING] and time.monotonic() < deadline:
        os.sched_yield()
    q.get(timeout=T)


def test_large_items_count_against_maxsize():
    q = shmq.Queue(2, capacity_bytes=64 << 10, zero_copy=False)
    q.put(b"y" * MiB)
    q.put("small")
    assert q.full()
    with pytest.raises(pyqueue.Full):
        q.put(b"y" * MiB, timeout=0.05)
    assert len(blobs(q)) == 1
    assert q.get() == b"y" * MiB and q.get() == "small"
    q.close()


def test_the_owner_removes_items_nobody_took():
    q = shmq.Queue(capacity_bytes=64 << 10, zero_copy=False)
    for _ in range(3):
        q.put(b"z" * MiB)
    assert len(blobs(q)) == 3
    names = queue_names(q)
    assert len(names) >= 3 + 2 + 8
    q.close()
    assert not (set(names) & shm_names())


@pytest.mark.skipif(os.environ.get("SHMQ_BIG_TESTS") != "1", reason="needs SHMQ_BIG_TESTS=1 (1 GB of memory)")
def test_a_1_gb_item(ctx):
    q = shmq.Queue()
    big = np.zeros(1 << 30, np.uint8)
    big[:: 1 << 20] = 7
    results = shmq.Queue()
    p = ctx.Process(target=_sum_first, args=(q, results))
    p.start()
    q.put(big)
    del big
    assert results.get(timeout=300) == 7 * 1024
    join_all([p], timeout=300)
    assert not blobs(q)
    q.close()
    results.close()


def _sum_first(q, results):
    results.put(int(q.get(timeout=300).sum()))


# -- batches ------------------------------------------------------------------


def test_put_many_get_many():
    q = shmq.Queue(capacity_bytes=256 << 10)
    items = [("i", i) for i in range(3000)]
    items[100] = b"L" * 200_000  # large items, in their place
    items[101] = b"M" * 300_000
    items[2000] = np.arange(100_000)
    done = threading.Event()

    def producer():
        q.put_many(items[:1500], timeout=T)
        q.put_many(items[1500:], timeout=T)
        done.set()

    t = threading.Thread(target=producer)
    t.start()
    got = []
    while len(got) < len(items):
        batch = q.get_many(500, timeout=T)
        assert 1 <= len(batch) <= 500
        got.extend(batch)
    t.join(T)
    assert done.is_set()
    assert got[:100] == items[:100] and got[102:2000] == items[102:2000] and got[2001:] == items[2001:]
    assert got[100] == items[100] and got[101] == items[101] and np.array_equal(got[2000], items[2000])
    with pytest.raises(pyqueue.Empty):
        q.get_many(timeout=0.05)
    with pytest.raises(pyqueue.Empty):
        q.get_many(block=False)
    q.close()


def test_put_many_when_full_says_how_many_were_put():
    q = shmq.Queue(3)
    with pytest.raises(pyqueue.Full, match=r"3 of 5 items were put$"):
        q.put_many(range(5), timeout=0.05)
    with pytest.raises(pyqueue.Full, match=r"0 of 2 items were put$"):
        q.put_many([7, 8], block=False)
    assert q.get_many() == [0, 1, 2]
    q.close()


class Poison:
    """Pickles fine, fails to unpickle."""

    def __reduce__(self):
        return (_explode, ("poison",))


def _explode(what):
    raise RuntimeError(f"cannot unpickle {what}")


def test_an_item_that_fails_to_unpickle():
    q = shmq.Queue()
    q.put(Poison())
    q.put("next")
    with pytest.raises(RuntimeError, match="cannot unpickle poison"):
        q.get()
    assert q.get() == "next"  # the bad item was taken, as multiprocessing.Queue does
    # in a batch: the items before it are returned, the error comes next, then the rest
    q.put_many([1, 2, Poison(), 3, 4])
    assert q.get_many() == [1, 2]
    assert q.qsize() == 3 and not q.empty()
    with pytest.raises(RuntimeError):
        q.get_many()
    assert q.get_many() == [3, 4] and q.empty()
    q.put_many([Poison(), 5])
    with pytest.raises(RuntimeError):
        q.get_many()
    assert q.get_nowait() == 5
    q.close()


# -- put and get are the ring's closures (RingBuffer.encoding_writer / decoding_reader) --


def test_put_and_get_hoisted_before_first_use():
    q = shmq.Queue(capacity_bytes=1 << 12)  # wraps many times
    try:
        put, get = q.put, q.get  # as a hot loop would, before any get
        for i in range(2001):
            put((i, "x" * (i % 97)))
            if i % 3 == 2:
                for j in range(i - 2, i + 1):
                    assert get(timeout=T) == (j, "x" * (j % 97))
        assert q.empty()
        # a batch that stops at a bad item keeps the rest for this handle:
        # the hoisted get sees them first, then the ring again
        q.put_many([1, Poison(), 2])
        assert q.get_many() == [1]
        with pytest.raises(RuntimeError, match="poison"):
            get()
        put(3)
        assert [get(timeout=T), get(timeout=T)] == [2, 3]
        with pytest.raises(pyqueue.Empty):
            get(timeout=0.01)
    finally:
        q.close()


def _call(func, *args):
    return func(*args)


@pytest.mark.parametrize("ctx", ["fork", "spawn", "forkserver"], indirect=True)
def test_put_and_get_pickle_as_the_handles_methods(ctx):
    q = shmq.Queue()
    try:
        put, get = pickle.loads(pickle.dumps((q.put, q.get)))
        assert put.__self__ is not q and put.__self__.name == q.name and put.__name__ == "put"
        put("through a copy")
        assert q.get(timeout=T) == "through a copy"
        q.put("back")
        assert get(timeout=T) == "back"
        put.__self__.close()
        # as a Process target, and through a pool
        p = ctx.Process(target=q.put, args=("from a child",))
        p.start()
        join_all([p])
        assert p.exitcode == 0 and q.get(timeout=T) == "from a child"
        with ctx.Pool(1) as pool:
            pool.apply(_call, (q.put, "from a pool"))
            assert q.get(timeout=T) == "from a pool"
            q.put("to a pool")
            assert pool.apply(_call, (q.get, True, T)) == "to a pool"
        for method in ("put", "get"):
            ours = [(p.name, p.default) for p in inspect.signature(getattr(q, method)).parameters.values()]
            theirs = [(p.name, p.default) for p in inspect.signature(getattr(mpq.Queue, method)).parameters.values()]
            assert ours == theirs[1:]
    finally:
        q.close()


class LoggingQueue(shmq.Queue):
    def put(self, obj, block=True, timeout=None):
        self.log.append(("put", obj))
        super().put(obj, block, timeout)

    def get(self, block=True, timeout=None):
        obj = super().get(block, timeout)
        self.log.append(("get", obj))
        return obj


def test_a_subclass_overriding_put_and_get_is_called():
    q = LoggingQueue()
    q.log = []
    try:
        q.put("a")
        q.put_nowait("b")
        assert q.get() == "a" and q.get_nowait() == "b"
        assert q.log == [("put", "a"), ("put", "b"), ("get", "a"), ("get", "b")]
    finally:
        q.close()


def test_hoisted_put_and_get_of_a_closed_handle_raise_and_free_the_lock():
    q = shmq.Queue()
    try:
        other = shmq.Queue.attach(q.name)
        put, get = other.put, other.get
        other.close()
        with pytest.raises(ValueError):
            put(1)
        with pytest.raises(ValueError):
            get()
        # the producer lock was released (else this waits for stale-lock recovery)
        q.put(1, timeout=0.2)
        assert q.get(timeout=T) == 1
    finally:
        q.close()


def _get_and_report_role(q, conn):
    item = q.get(timeout=T)
    me = [p for p in q._ring.participants() if p.pid == os.getpid()]
    conn.send((item, bool(me and me[0].role & L.ROLE_CONSUMER)))


def test_a_forked_child_is_listed_as_a_consumer_by_its_first_get():
    ctx = mp.get_context("fork")
    q = shmq.Queue()
    try:
        q.put(1)
        q.put(2)
        assert q.get() == 1  # this handle has seen TAIL past the child's first record
        here, there = ctx.Pipe(duplex=False)
        p = ctx.Process(target=_get_and_report_role, args=(q, there))
        p.start()
        assert here.poll(T) and here.recv() == (2, True)
        join_all([p])
    finally:
        q.close()


def _get_nowait_in_child(q, conn):
    try:
        conn.send(("got", q.get_nowait()))
    except pyqueue.Empty:
        conn.send(("empty", None))
    except Exception as exc:
        conn.send(("raised", repr(exc)))


def test_a_forked_child_does_not_inherit_records_its_parent_took():
    ctx = mp.get_context("fork")
    q = shmq.Queue()
    try:
        q.put_many([1, Poison(), 2])
        assert q.get_many() == [1]  # Poison() and 2 are kept for this handle
        here, there = ctx.Pipe(duplex=False)
        p = ctx.Process(target=_get_nowait_in_child, args=(q, there))
        p.start()
        assert here.poll(T) and here.recv() == ("empty", None)
        join_all([p])
        with pytest.raises(RuntimeError, match="poison"):
            q.get()
        assert q.get_nowait() == 2 and q.empty()
    finally:
        q.close()


# -- threads ----------------------------------------------------------------------


def test_one_handle_many_threads():
    q = shmq.Queue(capacity_bytes=64 << 10, side_capacity_bytes=4 * MiB)
    n_threads, per = 4, 1500
    got, errors = [], []

    def produce(t):
        try:
            for i in range(per):
                q.put((t, i, b"B" * 40_000) if i % 300 == 7 else (t, i), timeout=T)
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    def consume():
        try:
            while True:
                batch = q.get_many(16, timeout=T) if random.random() < 0.5 else [q.get(timeout=T)]
                got.extend(item[:2] for item in batch if item is not None)
                if None in batch:
                    for _ in range(batch.count(None) - 1):
                        q.put(None)  # another consumer's sentinel
                    return
        except BaseException as e:  # pragma: no cover
            errors.append(e)

    producers = [threading.Thread(target=produce, args=(t,)) for t in range(n_threads)]
    consumers = [threading.Thread(target=consume) for _ in range(n_threads)]
    for t in producers + consumers:
        t.start()
    for t in producers:
        t.join(60)
    for _ in consumers:
        q.put(None)
    for t in consumers:
        t.join(60)
    assert not errors and not any(t.is_alive() for t in producers + consumers)
    assert sorted(got) == [(t, i) for t in range(n_threads) for i in range(per)]
    assert not blobs(q)
    q.close()


# -- JoinableQueue -------------------------------------------------------------------


def _work_when_allowed(q, go):
    go.wait(T)
    for _ in range(3):
        q.get(timeout=T)
        q.task_done()


def test_join_waits_for_every_task_done(ctx):
    q = shmq.JoinableQueue(capacity_bytes=64 << 10)
    go = ctx.Event()
    p = ctx.Process(target=_work_when_allowed, args=(q, go))
    p.start()
    q.put(1)
    q.put(b"large" * 100_000)
    q.put_many([3])
    assert q.join(timeout=0.2) is False
    go.set()
    assert q.join(timeout=T) is True
    join_all([p])
    with pytest.raises(ValueError):
        q.task_done()
    assert q.join() is True
    q.close()


# -- the owner's names -------------------------------------------------------------------


def test_the_last_handle_of_the_creator_unlinks():
    q = shmq.Queue()
    names = queue_names(q)
    other = shmq.Queue.attach(q.name)  # same process: also the creator's handle
    q.close()
    assert set(names) <= shm_names()
    other.put("still here")
    assert other.get() == "still here"
    other.close()
    assert not (set(names) & shm_names())


def _attach_and_close(name, out):
    q = shmq.Queue.attach(name)
    q.put("bye")
    q.close()
    out.put("closed")


def test_an_attacher_closing_unlinks_nothing(ctx):
    q = shmq.Queue()
    names = queue_names(q)
    p = ctx.Process(target=_attach_and_close, args=(q.name, q))
    p.start()
    join_all([p])
    assert set(names) <= shm_names()
    assert [q.get(timeout=T), q.get(timeout=T)] == ["bye", "closed"]
    q.close()


def test_a_dropped_creator_handle_unlinks():
    q = shmq.Queue(capacity_bytes=64 << 10)
    q.put(b"b" * MiB)
    names = queue_names(q)
    del q
    gc.collect()
    assert not (set(names) & shm_names())


_CREATOR = textwrap.dedent(
    """
    import os, sys, time, shmq
    mode = sys.argv[1]
    q = shmq.Queue(name=sys.argv[2], capacity_bytes=1 << 16, side_capacity_bytes=3 << 20, zero_copy=False)
    j = shmq.JoinableQueue(name=sys.argv[3])
    q.put(b"x" * (1 << 20)); j.put("task")        # a large item: a blob
    print(q._side.ring.name, q.name + '.b', j._side.ring.name, flush=True)
    if mode == "exception":
        raise RuntimeError("boom")
    if mode == "sigint-get":
        print("ready", flush=True); j.get(); j.get()
    if mode == "sigint-put":
        q.put(b"y" * (1 << 20))                     # still room on the side path
        print("ready", flush=True)
        q.put(b"z" * (1 << 20))                     # blocks: no room
    """
)


@pytest.mark.parametrize("mode", ["normal", "exception", "sigint-get", "sigint-put"])
def test_a_creator_exit_leaves_nothing(mode):
    qname, jname = unique_name("cq"), unique_name("cj")
    proc = subprocess.Popen(
        [sys.executable, "-c", _CREATOR, mode, qname, jname],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        side, prefix, jside = proc.stdout.readline().split()
        if mode.startswith("sigint"):
            assert proc.stdout.readline().strip() == "ready"
            proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    # an uncaught KeyboardInterrupt ends Python with SIGINT, after atexit
    assert proc.returncode == {"normal": 0, "exception": 1}.get(mode, -signal.SIGINT), err
    if mode.startswith("sigint"):
        assert "KeyboardInterrupt" in err
    left = [n for n in shm_names() if any(s in n for s in (qname, jname, side, prefix, jside))]
    assert not left


# -- SIGKILL ---------------------------------------------------------------------------


def _consume_into(q, results, tag):
    while True:
        item = q.get(timeout=T)
        if item is None:
            results.put((tag, "done"))
            return
        results.put((tag, item))


def test_a_consumer_killed_while_waiting(ctx):
    q, results = shmq.Queue(), shmq.Queue()
    victim = ctx.Process(target=_consume_into, args=(q, results, "victim"))
    survivor = ctx.Process(target=_consume_into, args=(q, results, "survivor"))
    victim.start()
    survivor.start()
    q.put("warm-up")  # whoever takes it, both are running afterwards
    assert results.get(timeout=T)[1] == "warm-up"
    q.put_many(["a", "b"])
    assert sorted(results.get(timeout=T)[1] for _ in range(2)) == ["a", "b"]
    os.kill(victim.pid, signal.SIGKILL)
    join_all([victim])
    items = list(range(200)) + [b"L" * 500_000]
    q.put_many(items)
    q.put(None)
    got = [results.get(timeout=T) for _ in range(len(items) + 1)]
    assert all(tag == "survivor" for tag, _ in got)
    assert [x for _, x in got[:-1]] == items and got[-1][1] == "done"
    join_all([survivor])
    q.close()
    results.close()


class Stall:
    """A large item whose first unpickling, in the victim, stalls forever
    (after saying so on ``signal_q``); later ones return the payload."""

    def __init__(self, payload, signal_q, flag):
        self.payload, self.signal_q, self.flag = payload, signal_q, flag

    def __reduce__(self):
        return (_stall_or_restore, (self.payload, self.signal_q, self.flag))


def _stall_or_restore(payload, signal_q, flag):
    try:
        fd = os.open(flag, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        signal_q.put(("restored in", os.getpid()))
        signal_q.close()
        return payload
    os.close(fd)
    signal_q.put(("stalled in", os.getpid()))
    threading.Event().wait()  # until SIGKILL


def test_a_consumer_killed_while_taking_a_large_item(ctx, tmp_path):
    q, results, signals = shmq.Queue(capacity_bytes=64 << 10), shmq.Queue(), shmq.Queue()
    payload = os.urandom(3 * MiB)
    victim = ctx.Process(target=_consume_into, args=(q, results, "victim"))
    victim.start()
    q.put(Stall(payload, signals, str(tmp_path / "flag")))
    what, pid = signals.get(timeout=60)
    assert (what, pid) == ("stalled in", victim.pid)
    os.kill(victim.pid, signal.SIGKILL)
    join_all([victim])
    survivor = ctx.Process(target=_consume_into, args=(q, results, "survivor"))
    survivor.start()
    assert signals.get(timeout=60) == ("restored in", survivor.pid)
    assert results.get(timeout=60) == ("survivor", payload)
    q.put("after")
    q.put(None)
    assert [results.get(timeout=T) for _ in range(2)] == [("survivor", "after"), ("survivor", "done")]
    join_all([survivor])
    assert not blobs(q)
    for x in (q, results, signals):
        x.close()


def _hold_lock_forever(name, which, ready):
    q = shmq.Queue.attach(name)
    lock = {"producer": q._ring._plock, "consumer": q._ring._clock, "side": q._side.ring._plock}[which]
    lock.acquire()
    ready.set()
    threading.Event().wait()  # until SIGKILL


@pytest.mark.parametrize("which", ["producer", "consumer", "side"])
def test_a_process_killed_holding_a_lock(which):
    ctx = mp.get_context("fork")
    q = shmq.JoinableQueue(capacity_bytes=64 << 10)
    q.put("before")
    ready = ctx.Event()
    p = ctx.Process(target=_hold_lock_forever, args=(q.name, which, ready))
    p.start()
    assert ready.wait(T)
    os.kill(p.pid, signal.SIGKILL)
    join_all([p])
    t0 = time.monotonic()
    q.put("after", timeout=T)
    q.put(b"L" * MiB, timeout=T)
    assert q.get(timeout=T) == "before" and q.get(timeout=T) == "after" and q.get(timeout=T) == b"L" * MiB
    for _ in range(3):
        q.task_done()
    assert q.join(timeout=T)
    assert time.monotonic() - t0 < 10  # a dead holder costs a fraction of a second
    q.close()


def _numbered_producer(q, index, progress, count):
    for i in range(count):
        q.put((index, i, b"P" * 300_000) if i % 50 == 3 else (index, i))
        progress[index] = i + 1  # after put() returned: the item is in the queue


def _collect_until_none(q, results):
    got = []
    while True:
        batch = q.get_many(64, timeout=60)
        got.extend(item[:2] for item in batch if item is not None)
        if None in batch:
            for _ in range(batch.count(None) - 1):
                q.put(None)  # another consumer's sentinel
            results.put(got)
            return


def test_producers_killed_at_random_times_lose_nothing_put():
    ctx = mp.get_context("fork")
    q, results = shmq.Queue(capacity_bytes=256 << 10, side_capacity_bytes=2 * MiB), shmq.Queue()
    n, count = 4, 3000
    progress = ctx.Array("q", n, lock=False)
    consumers = [ctx.Process(target=_collect_until_none, args=(q, results)) for _ in range(2)]
    producers = [ctx.Process(target=_numbered_producer, args=(q, i, progress, count)) for i in range(n)]
    for p in consumers + producers:
        p.start()
    rng = random.Random(1234)
    for index in (0, 1):  # kill two producers at random points of their run
        point = rng.randrange(100, 2000)
        while progress[index] < point and producers[index].is_alive():
            os.sched_yield()
        os.kill(producers[index].pid, signal.SIGKILL)
    join_all(producers, timeout=60)
    q.put_many([None, None])
    got = results.get(timeout=60) + results.get(timeout=60)
    join_all(consumers)
    assert len(got) == len(set(got)), "an item was delivered twice"
    got = set(got)
    for i in range(n):
        fully_put = {(i, k) for k in range(progress[i])}
        assert fully_put <= got, f"producer {i}: lost {sorted(fully_put - got)[:5]}"
        assert {x for x in got if x[0] == i} <= {(i, k) for k in range(progress[i] + 1)}
    q.close()
    assert not blobs(q)
    results.close()


def _report_each(q, results):
    while True:
        item = q.get(timeout=60)
        results.put(item)  # a kill between get() and here loses this one item
        if item is None:
            return


def test_consumers_killed_at_random_times_lose_at_most_what_they_held():
    ctx = mp.get_context("fork")
    q = shmq.Queue(capacity_bytes=128 << 10, side_capacity_bytes=4 * MiB)
    results = shmq.Queue(capacity_bytes=4 * MiB)
    items = [(i, b"C" * 200_000) if i % 40 == 5 else (i,) for i in range(4000)]
    consumers = [ctx.Process(target=_report_each, args=(q, results)) for _ in range(4)]
    for p in consumers:
        p.start()
    got = []
    killed = 0
    rng = random.Random(99)
    kill_at = sorted(rng.sample(range(200, 3500), 3))
    for i, item in enumerate(items):
        q.put(item, timeout=T)
        if kill_at and i == kill_at[0]:
            kill_at.pop(0)
            os.kill(consumers[killed].pid, signal.SIGKILL)
            killed += 1
        while True:  # keep the results queue drained as we go
            try:
                got.append(results.get_nowait())
            except pyqueue.Empty:
                break
    survivors = consumers[killed:]
    for _ in survivors:
        q.put(None)
    join_all(consumers, timeout=60)
    while not results.empty():
        got.append(results.get_nowait())
    got = [g for g in got if g is not None]
    ids = [g[0] for g in got]
    assert len(ids) == len(set(ids)), "an item was delivered twice"
    missing = set(range(len(items))) - set(ids)
    assert len(missing) <= killed, sorted(missing)
    assert q.empty() and not blobs(q)
    q.close()
    results.close()


# -- hostile or corrupt shared memory (issue 16, items 6, 7) -------------------------------

_CORRUPT = textwrap.dedent(
    """
    import sys, time
    import numpy as np
    import shmq
    from shmq import _layout as L
    case, name = sys.argv[1], sys.argv[2]
    q = shmq.Queue(name=name, capacity_bytes=1 << 16)
    mw, sw = q._ring.segment.words, q._side.ring.segment.words
    saved = []

    def corrupt(words, index, value):
        saved.append((words, index, words[index]))
        words[index] = value

    if case == "rq-tail":
        q.put(np.ones(100_000)); q.get(timeout=5)
        pool = q._pool
        mb = (pool.segment.words[L.W_MEMBER_TABLE] >> 3) + pool._member * L.MEMBER_WORDS
    if case in ("side-nbytes", "blob-bytes", "side-head-misaligned"):
        q.put(b"x" * 40_000)  # a large item: a blob, a side record, a marker
    t0 = time.monotonic()
    try:
        if case == "main-head":  # past TAIL: the zeros beyond read as markers
            corrupt(mw, L.W_HEAD, mw[L.W_TAIL] + 64)
            q.get(timeout=1)
        elif case == "main-head-many":
            corrupt(mw, L.W_HEAD, mw[L.W_TAIL] + 64)
            q.get_many(timeout=1)
        elif case == "side-head":
            corrupt(sw, L.W_HEAD, sw[L.W_TAIL] + 64)
            q.get(timeout=1)
        elif case == "side-head-misaligned":
            corrupt(sw, L.W_HEAD, 3)
            q.get(timeout=1)
        elif case == "side-tail":
            corrupt(sw, L.W_TAIL, sw[L.W_HEAD] + (1 << 40))
            q.put(b"x" * 40_000, timeout=1)
        elif case == "side-nbytes":  # the record claims 2**64 - 1 bytes
            corrupt(sw, ((L.DATA_OFFSET + sw[L.W_HEAD] % q._side.ring.capacity_bytes) >> 3) + 1, -1)
            q.get(timeout=1)
        elif case == "blob-bytes":
            from shmq._segment import Segment
            seg = Segment.attach(q._side.blob_names()[0], L.KIND_BLOB)
            seg.words[L.W_BLOB_BYTES] = 1 << 50
            seg.close()
            q.get(timeout=1)
        elif case == "rq-tail":
            corrupt(pool.segment.words, mb + L.M_RQ_TAIL, 1 << 60)
            q.put(np.ones(100_000), timeout=1)
        outcome = "returned"
    except shmq.BrokenError:
        outcome = "BrokenError"  # CorruptError included
    except Exception as exc:
        outcome = type(exc).__name__
    elapsed = time.monotonic() - t0
    for words, index, value in saved:
        words[index] = value
    q.put("after")  # the queue still answers (the bad item, if any, was dropped)
    print(outcome, elapsed, q.get(timeout=5), flush=True)
    q.close()
    """
)


@pytest.mark.parametrize(
    "case",
    ["main-head", "main-head-many", "side-head", "side-head-misaligned", "side-tail", "side-nbytes", "blob-bytes", "rq-tail"],
)
def test_corrupt_words_raise_broken_within_the_timeout(case):
    """Before: main-head, main-head-many and rq-tail spun at 100% CPU for
    ever; side-nbytes left the side consumer lock held; side-head gave a
    ValueError about a name.  Now: BrokenError at once, and nothing hangs."""
    proc = subprocess.run(
        [sys.executable, "-c", _CORRUPT, case, unique_name("cw")],
        capture_output=True, text=True, timeout=60, env=dict(os.environ),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    outcome, elapsed, after = proc.stdout.split()
    assert outcome == "BrokenError" and float(elapsed) < 1.2 and after == "after", proc.stdout


def _forge_large_item(q, record: bytes) -> None:
    """Publish a side record and its marker as a producer would, with any bytes."""
    q._side.ring.write(record)
    q._ring.write(b"")


def test_a_forged_side_record_never_removes_another_segment():
    q = shmq.Queue(capacity_bytes=1 << 16)
    victim = shmq.Ring.create(1024, name=unique_name("victim"))
    # a segment in the queue's own namespace that is not one of its blobs
    imposter = shmq.Ring.create(1024, name=q.name + ".b" + "00000000deadbeef")
    try:
        # the side record before parts were named after the queue: length + any name
        _forge_large_item(q, (100).to_bytes(8, "little") + victim.name.encode())
        with pytest.raises(shmq.BrokenError, match="bytes long"):
            q.get(timeout=T)
        _forge_large_item(q, (100).to_bytes(8, "little") + (0xDEADBEEF).to_bytes(8, "little"))
        with pytest.raises(shmq.BrokenError, match="not a blob"):
            q.get(timeout=T)
        _forge_large_item(q, (100).to_bytes(8, "little") + (0xFEED).to_bytes(8, "little"))
        with pytest.raises(shmq.BrokenError, match="is gone"):
            q.get(timeout=T)
        assert victim.name in shm_names() and imposter.name in shm_names()
        # the forged records were dropped; the queue goes on, large items too
        q.put("small")
        q.put(b"L" * 50_000)
        assert q.get(timeout=T) == "small" and q.get(timeout=T) == b"L" * 50_000
        assert blobs(q) == [imposter.name]
    finally:
        for r in (victim, imposter):
            r.unlink()
            r.close()
        q.close()


def test_parts_are_named_after_the_queue():
    name = unique_name("pn")
    q = shmq.Queue(name=name, capacity_bytes=1 << 16)
    try:
        q.put(np.ones(100_000))  # the pool
        q.put(b"B" * 50_000)  # below the slot threshold, above a quarter of the ring: a blob
        q.put(np.ones(3 << 20))  # larger than a slot: through the side path
        ours = sorted(n for n in P.list_shm_names() if n.startswith(name))
        blob = [n for n in ours if n.startswith(name + ".b")]
        assert len(blob) == 2 and sorted(set(ours) - set(blob)) == [name, name + ".p", name + ".s"]
        assert {P.owner_of(n) for n in ours[1:]} == {name}
        assert q.get(timeout=T).sum() == 100_000 and q.get(timeout=T) == b"B" * 50_000
        assert q.get(timeout=T).sum() == 3 << 20
        with pytest.raises(ValueError, match=r"must not end like a queue's part"):
            shmq.Queue(name=name + ".s")
    finally:
        q.close()
    assert not [n for n in shm_names() if name in n]


def test_memoryviews_of_every_size():
    for zero_copy in (True, False):
        q = shmq.Queue(capacity_bytes=1 << 16, zero_copy=zero_copy)
        try:
            for size in (0, 3, 20_000, 100_000):
                data = bytes(range(256)) * (size // 256) + b"m" * (size % 256)
                q.put(memoryview(data))
                back = q.get(timeout=T)
                assert type(back) is memoryview and back.readonly and back.tobytes() == data
            q.put_many([memoryview(b""), memoryview(b"ab")])
            assert [m.tobytes() for m in q.get_many()] == [b"", b"ab"]
        finally:
            q.close()


def _blocked_in(thread: threading.Thread, function: str) -> bool:
    frame = sys._current_frames().get(thread.ident)
    while frame is not None:
        if frame.f_code.co_name == function:
            return True
        frame = frame.f_back
    return False


def _wait_blocked(threads, function="wait_until"):
    deadline = time.monotonic() + T
    while not all(_blocked_in(t, function) for t in threads):
        assert time.monotonic() < deadline, "the threads never blocked"
        time.sleep(0.001)


def test_threads_blocked_in_get_or_put_get_closed_error_when_another_closes():
    """Before: now and then ``ValueError: released memoryview`` (or a
    TypeError) instead of ClosedError (about 3% of the calls racing close())."""
    for rep in range(100):
        q = shmq.Queue(1)
        results = []
        go = threading.Event()

        def call(method, *args):
            go.wait()
            try:
                method(*args, timeout=T)
                results.append("returned")
            except BaseException as exc:  # noqa: BLE001 - the test reports what came out
                results.append(exc)

        if rep % 10 == 9:  # now and then, producers blocked on a full queue instead
            q.put("fills it")
            threads = [threading.Thread(target=call, args=(q.put, "no room")) for _ in range(4)]
        else:
            threads = [threading.Thread(target=call, args=(q.get,)) for _ in range(4)]
        for t in threads:
            t.start()
        go.set()
        if rep % 2:  # blocked for sure; else close() races the calls
            _wait_blocked(threads)
        t0 = time.monotonic()
        q.close()
        for t in threads:
            t.join(T)
        assert time.monotonic() - t0 < 1.0
        assert all(type(r) is shmq.ClosedError for r in results), results


def test_out_of_names_for_blobs_is_no_free_name(monkeypatch):
    from shmq import _side

    q = shmq.Queue(capacity_bytes=1 << 16)
    taken = shmq.Ring.create(1024, name=q.name + ".b0000000000001234")
    try:
        monkeypatch.setattr(_side.secrets, "randbits", lambda bits: 0x1234)
        with pytest.raises(shmq.NoFreeName, match=r"no free name for a large item"):
            q.put(b"x" * 50_000)
        assert not isinstance(shmq.NoFreeName("x"), FileExistsError)
        assert q.qsize() == 0 and blobs(q) == [taken.name]
    finally:
        taken.unlink()
        taken.close()
        q.close()


def test_a_dead_queues_side_ring_is_replaced_a_live_segment_is_not():
    name = unique_name("dq")
    code = f"import os, shmq; q = shmq.Queue(name={name!r}); print(flush=True); os.kill(os.getpid(), 9)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=60, env=dict(os.environ))
    assert proc.returncode == -signal.SIGKILL and name + ".s" in shm_names()
    P.shm_unlink(name)  # the main ring is gone (say, `shmq gc --prefix` removed it first)
    q = shmq.Queue(name=name)  # the dead queue's side ring is removed and made anew
    try:
        q.put(b"y" * (1 << 19))
        assert q.get(timeout=T) == b"y" * (1 << 19)
    finally:
        q.close()
    assert not [n for n in shm_names() if name in n]
    live = shmq.Ring.create(1024, name=name + ".s")
    try:
        with pytest.raises(FileExistsError, match=r"is taken by a live segment"):
            shmq.Queue(name=name)
        assert sorted(n for n in shm_names() if name in n and not n.startswith("sem.")) == [live.name]
    finally:
        live.unlink()
        live.close()


def test_a_join_blocked_when_another_thread_closes_gets_closed_error():
    j = shmq.JoinableQueue()
    j.put("a task nobody finishes")
    results = []

    def join():
        try:
            results.append(j.join(timeout=T))
        except BaseException as exc:  # noqa: BLE001 - the test reports what came out
            results.append(exc)

    t = threading.Thread(target=join)
    t.start()
    _wait_blocked([t])
    j.close()
    t.join(T)
    assert len(results) == 1 and type(results[0]) is shmq.ClosedError, results
