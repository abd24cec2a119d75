"""Queue.loan_array: an array written in place in a slot of the queue's pool,
put without a copy (only the slot's number travels).  The loan's life: put
once (read-only afterwards, a second put raises SlotError), or dropped (its
slot comes back); across fork/spawn/forkserver children and a process that
attaches by name; a producer killed holding a loan and a consumer killed
holding the view both give the slot back within a second."""
from __future__ import annotations

import gc
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

import shmq
from conftest import join_all, unique_name

T = 30.0  # bound for any single wait
MiB = 1 << 20
SHAPE = (512, 512)  # 1 MiB of float32


def address(a):
    return a.__array_interface__["data"][0]


def in_use(q):
    q._pool.collect()
    return q._pool.slot_count - q._pool.free_count()


def test_a_loaned_array_travels_without_a_copy():
    with shmq.Queue() as q:
        a = q.loan_array(SHAPE, np.float32)
        assert a.shape == SHAPE and a.dtype == np.float32 and a.flags.writeable and a.flags.c_contiguous
        a[:] = 7
        where = address(a)
        q.put(a)
        b = q.get(timeout=T)
        assert type(b) is np.ndarray and b.shape == SHAPE and b.dtype == np.float32
        assert not b.flags.writeable and float(b.sum()) == 7 * a.size
        assert address(b) == where  # the consumer reads the very bytes the producer wrote
        assert q._pool.statistics().allocations == 1  # one slot, no copy into a second


def test_put_hands_the_array_over_and_a_second_put_raises():
    with shmq.Queue() as q:
        a = q.loan_array(SHAPE, "f4")
        a.fill(1)
        q.put(a)
        assert not a.flags.writeable  # the consumers' now
        with pytest.raises(shmq.SlotError, match="already put"):
            q.put(a)
        with pytest.raises(shmq.SlotError, match="already put"):
            q.put_nowait(a)
        assert q.qsize() == 1
        assert float(q.get(timeout=T)[0, 0]) == 1
        assert q.empty()


def test_a_dropped_loan_gives_its_slot_back():
    with shmq.Queue(slot_count=1) as q:
        a = q.loan_array(SHAPE, np.float32)
        with pytest.raises(shmq.Full):
            q.loan_array(SHAPE, np.float32, timeout=0.05)
        del a
        assert in_use(q) == 0
        t0 = time.monotonic()
        b = q.loan_array(SHAPE, np.float32, timeout=T)  # the same slot, at once
        assert time.monotonic() - t0 < 0.5
        b[:] = 2
        q.put(b)
        del b  # put: dropping it now gives nothing back (the consumer has it)
        assert in_use(q) == 1
        got = q.get(timeout=T)
        assert float(got[0, 0]) == 2
        del got
        assert in_use(q) == 0


def test_a_loan_dropped_inside_a_pool_call_is_given_back_later():
    # A finalizer that finds the pool busy in this process defers the abort
    # to the next pool call instead of blocking (SlotPool.abort_later).
    with shmq.Queue(slot_count=1) as q:
        a = q.loan_array(SHAPE, np.float32)
        pool = q._pool
        with pool._tlock:
            del a
            assert pool._deferred  # queued, not done
        assert in_use(q) == 0  # collect drained it
        q.loan_array(SHAPE, np.float32, timeout=0.5)


def test_a_steady_stream_of_loans_reuses_its_slots():
    with shmq.Queue(slot_count=2) as q:
        for k in range(50):
            a = q.loan_array(SHAPE, np.float32, timeout=T)
            a[:] = k
            q.put(a, timeout=T)
            del a
            b = q.get(timeout=T)
            assert float(b[-1, -1]) == k and not b.flags.writeable
            del b
        assert in_use(q) == 0


def test_the_first_loan_makes_the_pool_fitted_to_it():
    with shmq.Queue() as q:
        a = q.loan_array(3 * MiB, np.uint8)
        assert q._pool.slot_size == 4 * MiB
        del a
        with pytest.raises(shmq.MessageTooLarge):
            q.loan_array(5 * MiB, np.uint8)
        q.put(np.zeros(MiB, np.uint8))  # ordinary puts use the same pool
        assert q.get(timeout=T).nbytes == MiB


def test_loans_with_other_dtypes_and_shapes():
    with shmq.Queue() as q:
        cases = [((300, 300, 3), np.uint8), (100_000, "<i8"), ((64, 64, 8), np.dtype([("x", "<f4"), ("y", "<i4")]))]
        for shape, dtype in cases:
            a = q.loan_array(shape, dtype)
            a.view(np.uint8).reshape(-1)[:] = 5
            q.put(a)
            b = q.get(timeout=T)
            assert b.dtype == np.dtype(dtype) and b.shape == (shape if isinstance(shape, tuple) else (shape,))
            assert (b.view(np.uint8) == 5).all()
        a = q.loan_array([256, 256], "float64")  # a list shape
        assert a.shape == (256, 256)


def test_loan_errors():
    with shmq.Queue() as q:
        with pytest.raises(ValueError, match="at least"):
            q.loan_array(10, np.float32)  # small arrays travel inside their record
        with pytest.raises(ValueError):
            q.loan_array((-1, 70_000), np.uint8)
        with pytest.raises(TypeError):
            q.loan_array(100_000, object)
        held = [q.loan_array(SHAPE, np.float32, timeout=-1)]
        held += [q.loan_array(SHAPE, np.float32, timeout=-1) for _ in range(q._pool.slot_count - 1)]
        with pytest.raises(shmq.Full):
            q.loan_array(SHAPE, np.float32, timeout=-1)  # negative: at once, as multiprocessing has it
        del held
    with shmq.Queue(zero_copy=False) as q:
        with pytest.raises(shmq.SlotError, match="zero_copy=False"):
            q.loan_array(SHAPE, np.float32)
    q = shmq.Queue()
    q.close()
    with pytest.raises(shmq.ClosedError):
        q.loan_array(SHAPE, np.float32)


def test_put_of_a_loan_into_a_full_queue_keeps_the_loan_open():
    with shmq.Queue(maxsize=1) as q:
        q.put("x")
        a = q.loan_array(SHAPE, np.float32)
        a[:] = 3
        with pytest.raises(shmq.Full):
            q.put(a, block=False)
        with pytest.raises(shmq.Full):
            q.put(a, timeout=0.05)
        assert a.flags.writeable  # still ours
        assert q.get(timeout=T) == "x"
        q.put(a, timeout=T)
        assert float(q.get(timeout=T)[0, 0]) == 3


def test_views_and_containers_of_a_loan_are_copied_and_the_loan_stays_open():
    with shmq.Queue(slot_count=4) as q:
        a = q.loan_array(SHAPE, np.float32)
        a[:] = 4
        q.put(a[:256])  # a view: an ordinary array, copied into another slot
        q.put((a, "meta"))  # inside a tuple: copied too
        part = q.get(timeout=T)
        pair = q.get(timeout=T)
        assert float(part.sum()) == 4 * part.size and float(pair[0].sum()) == 4 * a.size and pair[1] == "meta"
        assert address(part) != address(a)
        a[:] = 5  # still the producer's
        q.put(a)
        assert float(q.get(timeout=T)[0, 0]) == 5


def test_put_many_and_joinable_queues_take_loans():
    with shmq.JoinableQueue() as q:
        loans = [q.loan_array(SHAPE, np.float32) for _ in range(3)]
        for k, a in enumerate(loans):
            a[:] = k
        q.put_many([loans[0], "small", loans[1]])
        q.put(loans[2])
        got = [q.get(timeout=T) for _ in range(4)]
        assert [float(g[0, 0]) if isinstance(g, np.ndarray) else g for g in got] == [0, "small", 1, 2]
        assert all(address(g) == address(a) for g, a in zip([got[0], got[2], got[3]], loans))
        for _ in got:
            q.task_done()
        assert q.join(timeout=T)
    with shmq.SimpleQueue() as q:
        a = q.loan_array(SHAPE, np.float32)
        a[:] = 9
        q.put(a)
        assert float(q.get()[0, 0]) == 9


def test_closing_with_a_loan_open_keeps_the_array_mapped():
    # In a child: before the fix the array pointed into an unmapped pool
    # (numpy keeps only the mmap as the base of np.ndarray(buffer=view)).
    code = textwrap.dedent(
        """
        import gc, numpy as np, shmq
        q = shmq.Queue()
        a = q.loan_array((512, 512), np.float32)
        a[:] = 1
        q.close()
        try:
            q.put(a)
        except shmq.ClosedError:
            pass
        else:
            raise SystemExit("put on a closed handle did not raise ClosedError")
        gc.collect()
        a[:] = 2
        print(float(a.sum()))
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", code], env=dict(os.environ), capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(2.0 * 512 * 512)


def test_a_loan_no_slot_will_come_back_for_is_a_private_array():
    # Every slot held by arrays the consumer keeps: as an ordinary put would,
    # the loan stops waiting after the grace period and hands out a private
    # array, copied when put (through the ring: no slot is free).
    with shmq.Queue(slot_count=1) as q:
        a = q.loan_array(SHAPE, np.float32)
        q.put(a)
        kept = q.get(timeout=T)
        t0 = time.monotonic()
        b = q.loan_array(SHAPE, np.float32, timeout=T)
        assert 0.15 < time.monotonic() - t0 < 2
        assert b.flags.owndata and b.flags.writeable
        b[:] = 8
        q.put(b)
        assert not b.flags.writeable
        with pytest.raises(shmq.SlotError, match="already put"):
            q.put(b)
        got = q.get(timeout=T)
        assert float(got[0, 0]) == 8 and address(got) != address(kept)
        c = q.loan_array(SHAPE, np.float32, timeout=-1)  # the same state again: at once
        assert c.flags.owndata
        del kept
        d = q.loan_array(SHAPE, np.float32, timeout=T)  # the slot is back
        assert not d.flags.owndata


# -- across processes ------------------------------------------------------------
def _produce_loans(q, count):
    for k in range(count):
        a = q.loan_array(SHAPE, np.float32, timeout=T)
        a[:] = k
        q.put(a, timeout=T)


def test_loans_from_children_of_every_start_method(ctx):
    q = shmq.Queue(slot_count=2)
    try:
        procs = [ctx.Process(target=_produce_loans, args=(q, 20))]
        procs[0].start()
        seen = []
        for _ in range(20):
            b = q.get(timeout=T)
            assert not b.flags.writeable and float(b.min()) == float(b.max())
            seen.append(float(b[0, 0]))
            del b
        join_all(procs)
        assert procs[0].exitcode == 0
        assert seen == [float(k) for k in range(20)]
    finally:
        q.close()


def _put_inherited(q, a, out):
    try:
        q.put(a)
        out.put("put")
    except shmq.SlotError as exc:
        out.put(f"SlotError: {exc}")


def test_a_forked_child_cannot_put_its_parents_loan():
    import multiprocessing as mp

    ctx = mp.get_context("fork")
    q = shmq.Queue()
    out = shmq.Queue(zero_copy=False)
    try:
        a = q.loan_array(SHAPE, np.float32)
        a[:] = 6
        proc = ctx.Process(target=lambda: _put_inherited(q, a, out))
        proc.start()
        join_all([proc])
        assert out.get(timeout=T).startswith("SlotError: this array was loaned in process")
        assert q.empty()
        q.put(a)  # still the parent's to put
        assert float(q.get(timeout=T)[0, 0]) == 6
    finally:
        q.close()
        out.close()


def test_loans_from_a_process_attached_by_name():
    q = shmq.Queue(name=unique_name("ql"), slot_count=2)
    code = textwrap.dedent(
        f"""
        import numpy as np, shmq
        q = shmq.Queue.attach({q.name!r})
        for k in range(10):
            a = q.loan_array({SHAPE!r}, np.float32, timeout=30)
            a[:] = k
            q.put(a, timeout=30)
        a = q.loan_array({SHAPE!r}, np.float32, timeout=30)  # dropped at exit: given back
        q.close()
        """
    )
    try:
        proc = subprocess.Popen([sys.executable, "-c", code], env=dict(os.environ))
        got = []
        for _ in range(10):
            b = q.get(timeout=T)
            got.append(float(b[1, 1]))
            assert not b.flags.writeable
            del b
        assert proc.wait(T) == 0
        assert got == [float(k) for k in range(10)]
        t0 = time.monotonic()
        while in_use(q) and time.monotonic() - t0 < 2:  # the child's slots come back
            q._pool.reclaim()
            time.sleep(0.01)
        assert in_use(q) == 0
    finally:
        q.close()


# -- crashes -----------------------------------------------------------------------
def _loan_and_wait(q, holding, never):
    a = q.loan_array(SHAPE, np.float32, timeout=T)
    a[:] = 1
    holding.set()
    never.wait(T)  # SIGKILLed here, holding the pool's only slot


def test_a_producer_killed_holding_a_loan_gives_its_slot_back(ctx):
    q = shmq.Queue(slot_count=1, slot_size=MiB)
    holding, never = ctx.Event(), ctx.Event()
    try:
        q.put(np.zeros(SHAPE, np.float32))  # make the pool
        q.get(timeout=T)
        assert in_use(q) == 0  # its slot back with us, free for the child to loan
        proc = ctx.Process(target=_loan_and_wait, args=(q, holding, never))
        proc.start()
        assert holding.wait(60)
        with pytest.raises(shmq.Full):
            q.loan_array(SHAPE, np.float32, timeout=0.05)
        os.kill(proc.pid, signal.SIGKILL)
        proc.join(T)
        assert proc.exitcode == -signal.SIGKILL
        t0 = time.monotonic()
        a = q.loan_array(SHAPE, np.float32, timeout=T)
        assert time.monotonic() - t0 < 1.2
        a[:] = 2
        q.put(a)
        assert float(q.get(timeout=T).sum()) == 2 * a.size
    finally:
        q.close()


def _get_and_hold(q, holding, never, out):
    b = q.get(timeout=T)
    out.put(float(b[0, 0]))
    holding.set()
    never.wait(T)  # SIGKILLed here, holding the view of the only slot


def test_a_consumer_killed_holding_the_view_gives_the_slot_back(ctx):
    q = shmq.Queue(slot_count=1, slot_size=MiB)
    out = shmq.Queue(zero_copy=False)
    holding, never = ctx.Event(), ctx.Event()
    try:
        a = q.loan_array(SHAPE, np.float32)
        a[:] = 3
        q.put(a)
        del a
        proc = ctx.Process(target=_get_and_hold, args=(q, holding, never, out))
        proc.start()
        assert out.get(timeout=60) == 3
        assert holding.wait(T)
        with pytest.raises(shmq.Full):
            q.loan_array(SHAPE, np.float32, timeout=0.05)
        os.kill(proc.pid, signal.SIGKILL)
        proc.join(T)
        assert proc.exitcode == -signal.SIGKILL
        t0 = time.monotonic()
        b = q.loan_array(SHAPE, np.float32, timeout=T)
        assert time.monotonic() - t0 < 1.2
        b[:] = 4
        q.put(b)
        got = q.get(timeout=T)
        assert float(got[0, 0]) == 4 and address(got) == address(b)
    finally:
        q.close()
        out.close()
