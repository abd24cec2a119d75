"""shmq.Queue with its slot pool: large buffers (numpy arrays, bytes, dicts
of arrays) are copied once into slots and received as read-only zero-copy
views; small objects keep going through the ring.  Across processes of every
start method, with back-pressure, crash recovery and cleanup of every name."""
from __future__ import annotations

import gc
import os
import pickle
import queue as pyqueue
import signal
import threading
import time

import numpy as np
import pytest

import shmq
from shmq import _codec as C
from shmq import _layout as L
from conftest import join_all

T = 30.0  # bound for any single wait
KiB, MiB = 1 << 10, 1 << 20


def shm_names():
    return set(os.listdir("/dev/shm"))


def pool_name(q):
    return q.name + ".p"


def anchored(a):
    """The base chain of a received array ends in a read-only uint8 array (the
    slot's anchor) that owns no memory of its own."""
    chain = [a]
    while isinstance(chain[-1].base, np.ndarray):
        chain.append(chain[-1].base)
    anchor = chain[-1]
    return len(chain) >= 2 and anchor.dtype == np.uint8 and not anchor.flags.owndata and not anchor.flags.writeable


def in_use(q):
    """Slots not free (after the producer took back what was returned)."""
    q._pool.collect()
    return q._pool.slot_count - q._pool.free_count()


def frame(k, shape=(256, 256)):
    return np.full(shape, k, np.float32)


# -- across processes ----------------------------------------------------------------
def _consume(q, count, out):
    got = []
    for _ in range(count):
        msg = q.get(timeout=T)
        arrays = msg if isinstance(msg, dict) else {"": msg}
        got.append(
            {
                k: (v.dtype.str, v.shape, float(v.sum()), v.flags.writeable, anchored(v))
                for k, v in arrays.items()
                if isinstance(v, np.ndarray)
            }
        )
    out.put(got)


def test_arrays_and_dicts_of_arrays_across_processes(ctx):
    q = shmq.Queue(slot_count=4)
    out = shmq.Queue(zero_copy=False)
    try:
        # Two messages put before the child exists: it attaches by name (spawn,
        # forkserver) or inherits the handle (fork), and resolves the pool by name.
        msgs = [frame(0), {"image": frame(1, (512, 256)), "labels": np.arange(20000), "id": 1}]
        for m in msgs:
            q.put(m)
        proc = ctx.Process(target=_consume, args=(q, 12, out))
        proc.start()
        for k in range(2, 12):  # more than the pool's 4 slots: slots are reused
            m = frame(k) if k % 2 == 0 else {"image": frame(k, (512, 256)), "labels": np.arange(20000) + k}
            q.put(m, timeout=T)
            msgs.append(m)
        got = out.get(timeout=60)
        join_all([proc])
        assert proc.exitcode == 0
        expected = []
        for m in msgs:
            arrays = m if isinstance(m, dict) else {"": m}
            expected.append(
                {k: (v.dtype.str, v.shape, float(v.sum()), False, True) for k, v in arrays.items() if isinstance(v, np.ndarray)}
            )
        assert got == expected  # right data, read-only, views of a slot
        stats = q._pool.statistics()
        assert stats.allocations == 18 and stats.slot_count == 4  # 6 single + 6 double messages
        assert q.empty()
    finally:
        q.close()
        out.close()
    assert pool_name(q) not in shm_names()


def _produce(q, count, done):
    for k in range(count):
        q.put({"k": k, "a": frame(k)}, timeout=T)
    assert done.wait(T)
    q.close()


def test_a_child_creates_the_pool_and_the_owner_unlinks_it(ctx):
    """The first large buffer is put by an attacher: it creates the pool,
    which outlives it and is removed with the queue by the owner."""
    q = shmq.Queue(slot_count=2)
    name = pool_name(q)
    done = ctx.Event()
    proc = ctx.Process(target=_produce, args=(q, 5, done))
    try:
        proc.start()
        for k in range(5):
            msg = q.get(timeout=T)
            assert msg["k"] == k and float(msg["a"].sum()) == 256 * 256 * k and not msg["a"].flags.writeable
            del msg
        done.set()
        join_all([proc])
        assert proc.exitcode == 0
        assert name in shm_names()  # the attacher that made it did not unlink it
        q.put(frame(9))  # the owner uses the same pool
        assert q._pool.name == name and float(q.get(timeout=T).sum()) == 256 * 256 * 9
    finally:
        q.close()
    assert not {n for n in shm_names() if name in n}  # segment and its semaphores


def _produce_tagged(q, tag, count, done):
    for k in range(count):
        q.put({"tag": tag, "k": k, "a": np.full(40_000, tag * 100 + k, np.int32)}, timeout=T)
    assert done.wait(T)


def test_several_producers_share_the_pool(ctx):
    """Producers race to make the pool, then share its 4 slots; every item
    arrives, in each producer's order, whether through a slot or copied."""
    q = shmq.Queue(slot_count=4)
    done = ctx.Event()
    procs = [ctx.Process(target=_produce_tagged, args=(q, tag, 10, done)) for tag in range(3)]
    try:
        for p in procs:
            p.start()
        seen = {0: [], 1: [], 2: []}
        for _ in range(30):
            msg = q.get(timeout=T)
            assert int(msg["a"][0]) == int(msg["a"][-1]) == msg["tag"] * 100 + msg["k"]
            seen[msg["tag"]].append(msg["k"])
            del msg
        assert seen == {t: list(range(10)) for t in range(3)}
        done.set()
        join_all(procs)
        assert [p.exitcode for p in procs] == [0, 0, 0]
        assert q._pool is not None and q.empty()
    finally:
        done.set()
        q.close()


# -- what the receiver gets --------------------------------------------------------------
def test_received_arrays_are_read_only_views_that_keep_their_slot():
    q = shmq.Queue(slot_count=2)
    try:
        q.put({"x": np.arange(100_000, dtype=np.int64), "meta": "m"})
        msg = q.get(timeout=T)
        x = msg["x"]
        assert not x.flags.writeable and anchored(x)
        with pytest.raises(ValueError):
            x[0] = 1
        part = x[10:20].reshape(2, 5).T  # views of views
        del msg, x
        gc.collect()
        assert in_use(q) == 1  # the slot stays borrowed while a view is alive
        assert part.sum() == sum(range(10, 20)) and part.shape == (5, 2)
        del part
        gc.collect()
        assert in_use(q) == 0
    finally:
        q.close()


def test_received_arrays_outlive_the_queue():
    q = shmq.Queue()
    name = pool_name(q)
    q.put({"a": np.arange(50_000)})
    a = q.get(timeout=T)["a"]
    q.close()  # the owner's last handle: everything unlinked...
    assert not {n for n in shm_names() if name in n}
    assert int(a[-1]) == 49_999 and int(a.sum()) == sum(range(50_000))  # ...the view still reads the slot
    del a
    gc.collect()  # the pool handle finishes closing now (no unclosed-segment warning)


def test_small_objects_and_small_arrays_keep_going_through_the_ring():
    q = shmq.Queue()
    try:
        limit = shmq.queue.ZERO_COPY_THRESHOLD // 8  # int64 elements
        small = np.arange(limit - 1, dtype=np.int64)
        for obj in [(1, "abc", 1.5), {"a": [1, 2]}, small, b"b" * 1000, "s" * 100_000]:
            q.put(obj)
            back = q.get(timeout=T)
            if isinstance(obj, np.ndarray):
                assert back.flags.writeable and np.array_equal(back, obj)  # a private copy
            else:
                assert back == obj
        assert q._pool is None and pool_name(q) not in shm_names()  # never needed: never made
        q.put(np.arange(limit, dtype=np.int64))  # exactly the threshold: a slot
        assert not q.get(timeout=T).flags.writeable and q._pool is not None
    finally:
        q.close()


def test_bytes_and_bytearrays_come_back_as_such():
    q = shmq.Queue(capacity_bytes=64 * KiB)
    try:
        for obj in [b"\x01" * MiB, bytearray(b"\x02" * (300 * KiB))]:
            q.put(obj)
            back = q.get(timeout=T)
            assert type(back) is type(obj) and back == obj
        assert q._pool.statistics().allocations == 2  # through slots, not blobs
    finally:
        q.close()


def test_zero_copy_false_gives_plain_writable_arrays():
    q = shmq.Queue(zero_copy=False)
    try:
        a = np.arange(200_000, dtype=np.float64)
        q.put({"a": a})
        back = q.get(timeout=T)["a"]
        assert back.flags.writeable and np.array_equal(back, a)
        back[0] = -1  # private
        assert q._pool is None and pool_name(q) not in shm_names()
    finally:
        q.close()
    s = shmq.SimpleQueue(zero_copy=False)
    j = shmq.JoinableQueue(slot_size=256 * KiB, slot_count=2)
    try:
        s.put(np.ones(100_000))
        assert s.get().flags.writeable
        j.put(np.ones(30_000))
        assert not j.get(timeout=T).flags.writeable and j._pool.slot_size == 256 * KiB
        j.task_done()
        assert j.join(timeout=T)
    finally:
        s.close()
        j.close()


# -- slot size fitted to the first large buffer ---------------------------------------
def _put_after_pool(q, ready, nbytes, out):
    """Attached before the pool exists; puts once another process made it."""
    assert ready.wait(T)
    q.put(b"\x07" * nbytes, timeout=T)
    out.put(q._slot_size)
    q.close()


def test_the_pool_fits_the_first_large_buffer(ctx):
    """With the default slot_size, a 16 MiB array goes through one 16 MiB
    slot, not the side path; a handle opened before the pool existed learns
    the slot size from the pool (a 3 MiB bytes fits, a 17 MiB one does not)."""
    q = shmq.Queue()
    out = shmq.Queue(zero_copy=False)
    ready = ctx.Event()
    procs = [ctx.Process(target=_put_after_pool, args=(q, ready, n, out)) for n in (3 * MiB, 17 * MiB)]
    try:
        for p in procs:
            p.start()
        a = np.arange(4 * MiB, dtype=np.float32)  # 16 MiB
        q.put(a)
        pool = q._pool
        assert (pool.slot_size, pool.slot_count) == (16 * MiB, 8)
        back = q.get(timeout=T)
        assert not back.flags.writeable and anchored(back) and np.array_equal(back, a)
        del back
        ready.set()
        sizes = sorted(len(q.get(timeout=T)) for _ in procs)
        assert sizes == [3 * MiB, 17 * MiB] and [out.get(timeout=T) for _ in procs] == [16 * MiB] * 2
        join_all(procs)
        assert [p.exitcode for p in procs] == [0, 0]
        assert pool.statistics().allocations == 2  # the array and the 3 MiB bytes; 17 MiB took the side path
    finally:
        q.close()
        out.close()


def test_the_first_large_buffer_inside_a_dict_sizes_the_slots():
    q = shmq.Queue(slot_count=3)
    try:
        q.put({"small": np.ones(10), "big": np.ones(3 * MiB, np.uint8), "mid": np.ones(100_000)})
        assert (q._pool.slot_size, q._pool.slot_count) == (4 * MiB, 3)
        msg = q.get(timeout=T)
        assert msg["big"].shape == (3 * MiB,) and not msg["big"].flags.writeable and not msg["mid"].flags.writeable
    finally:
        q.close()


@pytest.mark.parametrize(
    "largest, count, free, expected",
    [
        (64 * KiB, 8, None, (MiB, 8)),  # never below the default
        (16 * MiB, 8, None, (16 * MiB, 8)),
        (16 * MiB + 1, 8, None, (32 * MiB, 8)),  # a power of two: room for larger ones later
        (100 * MiB, 8, None, (128 * MiB, 4)),  # at most AUTO_POOL_BYTES (512 MiB)
        (16 * MiB, 8, 256 * MiB, (16 * MiB, 4)),  # at most a quarter of the free /dev/shm
        (16 * MiB, 8, 64 * MiB, (MiB, 8)),  # not even 2 slots: default slots, the array takes the side path
        (16 * MiB, 1, 64 * MiB, (16 * MiB, 1)),  # one slot asked for, one slot fits
    ],
)
def test_fitted_geometry(largest, count, free, expected):
    from shmq._queue_pool import fitted_geometry

    assert fitted_geometry(largest, count, free) == expected


def test_a_pool_dev_shm_cannot_hold_means_copies():
    q = shmq.Queue(slot_size=1 << 40, slot_count=1)  # 1 TiB: reserved only when made
    try:
        a = np.arange(100_000, dtype=np.float64)
        q.put(a)  # no room for the pool: no error, the item is pickled instead
        back = q.get(timeout=T)
        assert back.flags.writeable and np.array_equal(back, a)
        assert q._pool is None and pool_name(q) not in shm_names()
    finally:
        q.close()


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, 1 << 41, "1"])
def test_pool_options_are_checked(bad):
    with pytest.raises(ValueError):
        shmq.Queue(slot_size=bad)
    with pytest.raises(ValueError):
        shmq.Queue(slot_count=bad)


def test_buffers_that_do_not_fit_slots_travel_as_before():
    """Larger than a slot: the side path; more large buffers than slots, or
    non-contiguous arrays: pickled in the record.  All arrive intact."""
    q = shmq.Queue(slot_size=256 * KiB, slot_count=2, capacity_bytes=256 * KiB)
    try:
        big = np.arange(MiB, dtype=np.int32)  # 4 MiB
        q.put(big)
        back = q.get(timeout=T)
        assert back.flags.writeable and np.array_equal(back, big)
        three = [np.full(20_000, k) for k in range(3)]  # 3 buffers, 2 slots
        q.put(three)
        assert all(a.flags.writeable and np.array_equal(a, b) for a, b in zip(q.get(timeout=T), three))
        strided = np.arange(100_000, dtype=np.float64)[::2]
        q.put(strided)
        assert np.array_equal(q.get(timeout=T), strided)
        # one buffer in a slot, one too large for a slot: the message itself
        # goes through the side path; the slot is still read in place
        mixed = {"small": np.ones(20_000), "large": np.arange(MiB, dtype=np.int32)}
        q.put(mixed)
        back = q.get(timeout=T)
        assert not back["small"].flags.writeable and anchored(back["small"])
        assert back["large"].flags.writeable and np.array_equal(back["large"], mixed["large"])
        del back
        gc.collect()
        assert in_use(q) == 0 and q.empty()
    finally:
        q.close()


def test_slot_messages_through_the_side_path_of_a_tiny_ring():
    q = shmq.Queue(capacity_bytes=256)  # even a one-array slot message is too long to go inline
    try:
        a = np.ones((200, 200, 2))
        q.put(a)
        back = q.get(timeout=T)
        assert not back.flags.writeable and np.array_equal(back, a)
    finally:
        q.close()


def test_put_many_and_get_many_with_arrays():
    q = shmq.Queue(slot_count=4, capacity_bytes=256 * KiB)
    try:
        with pytest.raises((pickle.PicklingError, AttributeError, TypeError)):
            q.put_many([1, {"a": np.ones(20_000), "f": lambda: 0}])
        assert q.empty() and (q._pool is None or in_use(q) == 0)  # a pickling error puts nothing
        # b"L" * (MiB + 1) is larger than a slot: a blob and its marker
        items = ["s0", np.full(20_000, 1.0), b"L" * (MiB + 1), np.full(20_000, 2.0), "s1", np.ones(300_000, np.uint8)]
        q.put_many(items, timeout=T)
        got = q.get_many(10, timeout=T)
        assert len(got) == 2  # stops before the large item; the rest is kept for the next calls...
        assert [type(r).__name__ for r in q._stash] == ["bytes", "_Ready", "bytes", "_Ready"]  # ...decoded
        while len(got) < len(items):
            got += q.get_many(10, timeout=T)
        assert got[0] == "s0" and got[4] == "s1" and got[2] == items[2]
        for k in (1, 3, 5):
            assert np.array_equal(got[k], items[k]) and not got[k].flags.writeable
        del got
        gc.collect()
        assert in_use(q) == 0
    finally:
        q.close()


# -- back-pressure ---------------------------------------------------------------------
def test_slots_are_reused_after_release():
    q = shmq.Queue(slot_count=2)
    try:
        for k in range(10):
            q.put(frame(k), timeout=T)
            a = q.get(timeout=T)
            assert a[0, 0] == k and not a.flags.writeable
            del a
        stats = q._pool.statistics()
        assert stats.allocations == 10 and stats.slot_count == 2
    finally:
        q.close()


def test_a_full_pool_makes_put_wait_like_a_full_queue():
    q = shmq.Queue(slot_count=2)
    try:
        q.put(frame(1))
        q.put(frame(2))  # both slots hold queued items
        with pytest.raises(pyqueue.Full):
            q.put_nowait(frame(3))
        t0 = time.monotonic()
        with pytest.raises(shmq.Full):
            q.put(frame(3), timeout=0.3)
        assert 0.25 <= time.monotonic() - t0 < 5
        assert q.qsize() == 2 and in_use(q) == 2  # nothing left behind by the refused puts
        # a consumer that frees a slot while the producer waits lets it through
        got = []
        words = q._pool.segment.words

        def taker():
            deadline = time.monotonic() + T
            while not words[L.W_RETURN_WAITING] and time.monotonic() < deadline:
                os.sched_yield()
            a = q.get(timeout=T)
            got.append(float(a.sum()))
            del a

        th = threading.Thread(target=taker)
        th.start()
        q.put(frame(3), timeout=T)
        th.join(T)
        assert got == [256 * 256 * 1.0]
        rest = [q.get(timeout=T) for _ in range(2)]
        assert [float(a.sum()) for a in rest] == [256 * 256 * 2.0, 256 * 256 * 3.0]
        assert not any(a.flags.writeable for a in rest)  # the third waited for a slot: no copy
    finally:
        q.close()


def test_a_receiver_keeping_every_slot_does_not_block_put():
    """Keeping all received arrays (results = [q.get() ...]) would starve a
    producer waiting for slots: after a short wait, items are copied."""
    q = shmq.Queue(slot_count=2)
    try:
        kept = []
        t0 = time.monotonic()
        for k in range(6):
            q.put(frame(k), timeout=T)
            kept.append(q.get(timeout=T))
        assert time.monotonic() - t0 < 10
        assert [float(a[0, 0]) for a in kept] == [0, 1, 2, 3, 4, 5]
        assert [a.flags.writeable for a in kept] == [False, False, True, True, True, True]
        del kept
        gc.collect()
        q.put(frame(7), timeout=T)  # slots again once released
        assert not q.get(timeout=T).flags.writeable
    finally:
        q.close()


def test_slots_left_with_an_idle_producer_do_not_block_another():
    """Only the producer that sent a slot takes it back (at its next put):
    another producer does not wait for that; it copies its item."""
    q = shmq.Queue(slot_count=2)
    try:
        with shmq.Queue.attach(q.name) as other:
            for k in range(2):
                q.put(frame(k))
            for k in range(2):
                assert float(q.get(timeout=T)[0, 0]) == k  # returned to q, which puts no more
            t0 = time.monotonic()
            other.put(frame(5), timeout=T)
            assert time.monotonic() - t0 < 5
            back = q.get(timeout=T)
            assert float(back[0, 0]) == 5 and back.flags.writeable  # copied through the ring
            q.put(frame(6))  # q takes its slots back
            back = q.get(timeout=T)
            assert float(back[0, 0]) == 6 and not back.flags.writeable
    finally:
        q.close()


# -- crashes -----------------------------------------------------------------------------
def _hold_and_wait(q, count, holding, never, out):
    held = [q.get(timeout=T) for _ in range(count)]
    out.put([float(a.sum()) for a in held])
    holding.set()
    never.wait(T)  # SIGKILLed while waiting here, holding every slot


def test_slots_of_a_killed_consumer_come_back(ctx):
    q = shmq.Queue(slot_count=3)
    out = shmq.Queue(zero_copy=False)
    holding, never = ctx.Event(), ctx.Event()
    try:
        for k in range(3):
            q.put(frame(k))
        proc = ctx.Process(target=_hold_and_wait, args=(q, 3, holding, never, out))
        proc.start()
        assert out.get(timeout=60) == [256 * 256 * float(k) for k in range(3)]
        assert holding.wait(T)
        os.kill(proc.pid, signal.SIGKILL)
        proc.join(T)
        assert proc.exitcode == -signal.SIGKILL
        t0 = time.monotonic()
        for k in range(3):  # all three slots are needed again
            q.put(frame(10 + k), timeout=T)
        elapsed = time.monotonic() - t0
        assert elapsed < 2.0, elapsed
        back = [q.get(timeout=T) for _ in range(3)]
        assert [float(a[0, 0]) for a in back] == [10, 11, 12]
        assert not any(a.flags.writeable for a in back)  # through the reclaimed slots, not copies
    finally:
        q.close()
        out.close()


def _read_and_die(q, out):
    out.put(bool(q._try_read()))  # took the record off the ring (listing itself as a consumer)...
    os.kill(os.getpid(), signal.SIGKILL)  # ...and died before decoding it


def test_a_message_read_by_a_consumer_killed_before_decoding_frees_its_slot(ctx):
    q = shmq.Queue(slot_count=1)
    out = shmq.Queue(zero_copy=False)
    try:
        q.put(frame(1))
        q._pool.orphan_seconds = 0.5  # (a source's setting; 5 s by default)
        proc = ctx.Process(target=_read_and_die, args=(q, out))
        proc.start()
        assert out.get(timeout=60) is True
        proc.join(T)
        assert proc.exitcode == -signal.SIGKILL and q.empty()
        assert any(not p.alive and p.role & L.ROLE_CONSUMER for p in q._ring.segment.participants())
        t0 = time.monotonic()
        q.put(frame(2), timeout=T)  # the only slot: freed as an orphan, not copied around
        assert 0.4 < time.monotonic() - t0 < 5
        back = q.get(timeout=T)
        assert float(back.sum()) == 256 * 256 * 2 and not back.flags.writeable
        assert q._pool.statistics().orphaned == 1
    finally:
        q.close()
        out.close()


def _encode_and_die(q, out):
    data, lease = q._encode_pooled(frame(5), C.LARGE, True, None)
    out.put(lease is not None)  # slots allocated and marked sent...
    os.kill(os.getpid(), signal.SIGKILL)  # ...and the message never written


def test_slots_of_a_producer_killed_before_writing_come_back(ctx):
    q = shmq.Queue(slot_count=1)
    out = shmq.Queue(zero_copy=False)
    try:
        q.put(frame(1))
        assert float(q.get(timeout=T).sum()) == 256 * 256
        assert in_use(q) == 0  # the pool exists, its slot taken back by its producer (us)
        q._pool.orphan_seconds = 0.5
        proc = ctx.Process(target=_encode_and_die, args=(q, out))
        proc.start()
        assert out.get(timeout=60) is True
        proc.join(T)
        assert proc.exitcode == -signal.SIGKILL and q.empty()
        t0 = time.monotonic()
        q.put(frame(2), timeout=T)
        assert time.monotonic() - t0 < 5
        back = q.get(timeout=T)
        assert float(back.sum()) == 256 * 256 * 2 and not back.flags.writeable
    finally:
        q.close()
        out.close()


def _get_in_child(q, out):
    a = q.get(timeout=T)
    out.put((float(a.sum()), a.flags.writeable, anchored(a)))


def test_a_queue_pickled_by_name_decodes_pool_messages(ctx):
    q = shmq.Queue()
    out = shmq.Queue(zero_copy=False)
    try:
        q.put(frame(3))
        data = pickle.dumps(q)  # the name only
        assert len(data) < 200
        with pickle.loads(data) as again:  # a second handle, attached by name
            proc = ctx.Process(target=_get_in_child, args=(again, out))
            proc.start()
            assert out.get(timeout=60) == (256 * 256 * 3.0, False, True)
            join_all([proc])
        assert proc.exitcode == 0
    finally:
        q.close()
        out.close()


def test_slot_messages_are_what_the_codec_makes():
    q = shmq.Queue()
    try:
        q.put(frame(1))
        raw = q._ring.read(timeout=T)  # the record, as a consumer reads it
        assert C.is_slot_message(raw)
        a = q._decode_record(raw)
        assert float(a.sum()) == 256 * 256
    finally:
        q.close()
