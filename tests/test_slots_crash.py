"""Crash recovery of slot pools: SIGKILL holders, sources, a receiver
between reading and decoding, and a pool-lock holder.  Each test measures how
long the slots took to come back and holds it to a bound."""
import os
import signal
import time

import numpy as np
import pytest

import shmq
from conftest import join_all
from shmq._slots import RECLAIM_INTERVAL, SlotPool

ORPHAN_SECONDS = 1.0  # set on the pools of the orphan tests (default 5 s)

# Reclaim runs at most every RECLAIM_INTERVAL while a source waits for slots;
# allow for process-table lookups on a loaded two-core machine.
BOUND = RECLAIM_INTERVAL + 1.5


def kill(proc):
    os.kill(proc.pid, signal.SIGKILL)
    join_all([proc], timeout=30)
    assert proc.exitcode == -signal.SIGKILL


def timed_allocate(pool, count, timeout=10.0):
    t0 = time.monotonic()
    got = pool.allocate(count, timeout=timeout)
    return got, time.monotonic() - t0


def send(pool, payloads):
    indices = pool.allocate(len(payloads), timeout=5)
    for i, data in zip(indices, payloads):
        v = pool.view(i, len(data))
        v[:] = data
        v.release()
    return list(zip(indices, pool.mark_sent(indices, [len(d) for d in payloads])))


# -- holders ---------------------------------------------------------------
def _hold_and_hang(name, refs, ready, never):
    pool = SlotPool.attach(name)
    views = [pool.acquire(i, g) for i, g in refs]  # noqa: F841 (held until killed)
    ready.set()
    never.wait(60)


def test_slots_held_by_a_killed_holder_return_to_their_source(ctx):
    pool = SlotPool.create(4096, 4)
    try:
        returned = []
        pool.on_return = returned.append
        refs = send(pool, [bytes([k]) * 64 for k in range(4)])
        ready, never = ctx.Event(), ctx.Event()
        proc = ctx.Process(target=_hold_and_hang, args=(pool.name, refs, ready, never))
        proc.start()
        assert ready.wait(60)
        assert len(pool.slot_info(refs[0][0]).holders) == 1
        assert pool.try_allocate() is None
        kill(proc)
        got, elapsed = timed_allocate(pool, 4)
        assert elapsed < BOUND, f"slots came back after {elapsed:.2f}s"
        assert sorted(got) == sorted(i for i, _ in refs)
        assert sorted(returned) == sorted(i for i, _ in refs)  # returned to the source, callback ran
        assert pool.statistics().members == ((os.getpid(), True),)  # the dead entry was recycled
        pool.abort(got)
    finally:
        pool.close()
        pool.unlink()


# -- sources -------------------------------------------------------------------
def _loan_and_hang(name, ready, never):
    pool = SlotPool.attach(name)
    (a, b) = pool.allocate(2)
    v = pool.view(a)
    v[:4] = b"half"  # noqa: F841 (a producer killed mid-write)
    ready.set()
    never.wait(60)


def test_slots_loaned_by_a_killed_producer_are_reclaimed(ctx):
    pool = SlotPool.create(4096, 3)
    try:
        ready, never = ctx.Event(), ctx.Event()
        proc = ctx.Process(target=_loan_and_hang, args=(pool.name, ready, never))
        proc.start()
        assert ready.wait(60)
        assert pool.statistics().loaned == 2
        kill(proc)
        got, elapsed = timed_allocate(pool, 3)
        assert elapsed < BOUND
        stats = pool.statistics()
        assert stats.reclaimed == 2 and stats.loaned == 3
        pool.abort(got)
    finally:
        pool.close()
        pool.unlink()


def _send_and_hang(name, out, never):
    pool = SlotPool.attach(name)
    out.put(send(pool, [b"one" * 100, b"two" * 100, b"six" * 100]))
    never.wait(60)


def test_slots_sent_by_a_killed_source_stay_readable_then_are_reclaimed(ctx):
    pool = SlotPool.create(4096, 4)
    try:
        out, never = ctx.Queue(), ctx.Event()
        proc = ctx.Process(target=_send_and_hang, args=(pool.name, out, never))
        proc.start()
        refs = out.get(timeout=60)
        held = [pool.acquire(*r) for r in refs[:2]]
        kill(proc)
        # The source is gone, its messages are not: the pool belongs to its creator.
        assert [bytes(v[:3]) for v in held] == [b"one", b"two"]
        late = pool.acquire(*refs[2])  # the message still "in flight" when it died
        assert bytes(late[:3]) == b"six"
        assert pool.reclaim() == 0  # still held: nothing may be freed yet
        for v, r in zip(held + [late], refs):
            v.release()
            pool.release(*r)
        got, elapsed = timed_allocate(pool, 4)
        assert elapsed < BOUND
        assert pool.statistics().reclaimed == 3
        pool.abort(got)
    finally:
        pool.close()
        pool.unlink()


# -- channels: a killed consumer, a killed producer -----------------------------
def _receive_and_hang(rx, ready, never):
    arrays = [rx.receive(timeout=30) for _ in range(3)]  # noqa: F841 (views held when killed)
    ready.set()
    never.wait(60)


def test_channel_consumer_killed_while_holding_views(ctx):
    tx, rx = shmq.open_channel(1 << 16, slot_size=1 << 16, slot_count=3, threshold=1024)
    try:
        ready, never = ctx.Event(), ctx.Event()
        proc = ctx.Process(target=_receive_and_hang, args=(rx, ready, never))
        proc.start()
        for k in range(3):
            tx.send(np.full(4096, k, np.float64), timeout=30)
        assert ready.wait(60)
        with pytest.raises(shmq.Full):
            tx.send(np.zeros(4096), timeout=0)
        kill(proc)
        t0 = time.monotonic()
        for k in range(3):
            with tx.loan_array(4096, np.float64, timeout=10) as a:
                a[:] = k
        assert time.monotonic() - t0 < BOUND
        for k in range(3):
            assert rx.receive(timeout=10)[7] == k
    finally:
        tx.unlink()
        tx.close()
        rx.close()


def _loan_in_channel_and_hang(tx, ready, never):
    loan = tx.loan_array((64, 64), np.uint8)  # noqa: F841
    tx.send(np.ones(1024, np.uint8) * 9, timeout=10)  # a sent, unread message
    ready.set()
    never.wait(60)


def test_channel_producer_killed_with_an_open_loan_and_an_unread_message(ctx):
    tx, rx = shmq.open_channel(1 << 16, slot_size=1 << 14, slot_count=2, threshold=512)
    try:
        ready, never = ctx.Event(), ctx.Event()
        proc = ctx.Process(target=_loan_in_channel_and_hang, args=(tx, ready, never))
        proc.start()
        assert ready.wait(60)
        kill(proc)
        msg = rx.receive(timeout=10)  # the dead producer's message is still there
        assert msg.sum() == 9 * 1024
        del msg
        t0 = time.monotonic()
        with tx.loan(100, timeout=10), tx.loan(100, timeout=10):
            pass
        assert time.monotonic() - t0 < BOUND
        assert tx.statistics().pool.reclaimed == 2
        assert rx.receive(timeout=10).nbytes == 100
        assert rx.receive(timeout=10).nbytes == 100
    finally:
        tx.unlink()
        tx.close()
        rx.close()


def _read_but_never_decode(rx, ready, never):
    rx._codec.note_consumer()  # as receive() does before reading
    rx._ring.read(timeout=30)  # the message left the ring; the slot was never acquired
    ready.set()
    never.wait(60)


def test_receiver_killed_between_read_and_decode_leaves_an_orphan_that_is_freed():
    import multiprocessing as mp

    ctx = mp.get_context("fork")  # the start method does not matter here; the wait is ORPHAN_SECONDS
    tx, rx = shmq.open_channel(1 << 16, slot_size=1 << 14, slot_count=1, threshold=512)
    tx._pool.orphan_seconds = ORPHAN_SECONDS
    try:
        ready, never = ctx.Event(), ctx.Event()
        proc = ctx.Process(target=_read_but_never_decode, args=(rx, ready, never))
        proc.start()
        tx.send(np.arange(1000), timeout=10)
        assert ready.wait(60)
        kill(proc)
        t0 = time.monotonic()
        with tx.loan(10, timeout=ORPHAN_SECONDS + 10):
            pass
        elapsed = time.monotonic() - t0
        assert ORPHAN_SECONDS * 0.5 <= elapsed < ORPHAN_SECONDS + BOUND
        assert tx.statistics().pool.orphaned == 1
        assert rx.receive(timeout=10).nbytes == 10
    finally:
        tx.unlink()
        tx.close()
        rx.close()


# -- locks and member entries ------------------------------------------------------
def _take_pool_lock_and_hang(name, ready, never):
    pool = SlotPool.attach(name)
    pool._lock.acquire()
    ready.set()
    never.wait(60)


def test_pool_lock_holder_killed(ctx):
    pool = SlotPool.create(64, 2)
    try:
        ready, never = ctx.Event(), ctx.Event()
        proc = ctx.Process(target=_take_pool_lock_and_hang, args=(pool.name, ready, never))
        proc.start()
        assert ready.wait(60)
        kill(proc)
        got, elapsed = timed_allocate(pool, 2)
        assert elapsed < BOUND
        pool.abort(got)
    finally:
        pool.close()
        pool.unlink()


def _attach_hold_die(name, ref):
    pool = SlotPool.attach(name)
    pool.acquire(*ref)
    os._exit(0)  # no close, no finalizers: as good as killed


def test_member_entries_of_dead_processes_are_recycled():
    import multiprocessing as mp

    fork = mp.get_context("fork")
    pool = SlotPool.create(64, 1, max_members=3)
    try:
        for _ in range(6):  # twice as many processes as entries
            (ref,) = send(pool, [b"m"])
            proc = fork.Process(target=_attach_hold_die, args=(pool.name, ref))
            proc.start()
            join_all([proc])
            assert proc.exitcode == 0
            got, elapsed = timed_allocate(pool, 1)
            assert elapsed < BOUND
            pool.abort(got)
        assert len(pool.statistics().members) == 1
    finally:
        pool.close()
        pool.unlink()


def test_a_live_receiver_may_decode_a_read_message_late():
    # No process died: a message read off the ring but not decoded yet is
    # not an orphan, however long it waits (a queue's get_many keeps records).
    tx, rx = shmq.open_channel(1 << 16, slot_size=1 << 14, slot_count=1, threshold=512)
    tx._pool.orphan_seconds = ORPHAN_SECONDS
    try:
        tx.send(np.arange(1000), timeout=10)
        rx._codec.note_consumer()
        record = rx._ring.read(timeout=10)
        with pytest.raises(shmq.Full):
            tx.send(np.arange(1000), timeout=ORPHAN_SECONDS + 0.5)
        assert rx._codec.decode(record)[999] == 999
        tx.send(np.arange(1000), timeout=10)  # the slot came back after the late decode
    finally:
        tx.unlink()
        tx.close()
        rx.close()


def _use_and_vanish(name, ref):
    pool = SlotPool.attach(name)
    pool.acquire(*ref).release()
    pool.release(*ref)
    os._exit(0)  # no close: the entry stays, with a dead pid


def test_a_full_member_table_reuses_entries_of_dead_processes():
    import multiprocessing as mp

    fork = mp.get_context("fork")
    pool = SlotPool.create(64, 2, max_members=2)
    try:
        for _ in range(4):
            (ref,) = send(pool, [b"j"])
            proc = fork.Process(target=_use_and_vanish, args=(pool.name, ref))
            proc.start()
            join_all([proc])
            assert proc.exitcode == 0
            assert pool.collect() == 1  # no janitor pass ran: the joiner found the entry itself
        assert pool.statistics().reclaimed == 0
    finally:
        pool.close()
        pool.unlink()


# -- corrupt or hostile shared words -------------------------------------------
# Every word of the pool's kind header and a sample of its table words, set to
# hostile values, one case per child process with a time limit: each call of
# the scenario works or raises a ShmqError, none hangs past its timeout, and
# the interpreter survives.
from shmq import ShmqError  # noqa: E402
from shmq import _layout as L  # noqa: E402
from shmq import _platform as P  # noqa: E402
from conftest import unique_name  # noqa: E402

HOSTILE = (-1, 1 << 40, 3)
CASE_SECONDS = 20.0  # a case's scenario takes well under 2 s (timeouts of 0.2 s)
_TABLE_SAMPLE = (
    [("slot", k, f) for k in (0, 1) for f in range(6)]
    + [("member", 0, f) for f in range(8)]
    + [("member", 1, f) for f in (L.M_RQ_HEAD, L.M_RQ_TAIL, L.M_STATE, L.M_PID)]
    + [("hold", 0, 0), ("hold", 1, 0), ("rq", 0, 0), ("rq", 0, 1), ("rq", 1, 0)]
)
CORRUPT_CASES = [("header", w, 0) for w in range(L.W_KIND_HEADER, L.W_POOL_HEADER_END)] + _TABLE_SAMPLE


def _word_of(pool, where):
    kind, a, b = where
    if kind == "header":
        return a
    if kind == "slot":
        return pool._slots + a * L.SLOT_WORDS + b
    if kind == "member":
        return pool._members + a * L.MEMBER_WORDS + b
    if kind == "hold":
        return pool._holdw + a * pool.slot_count + b
    return pool._rqw + a * pool._q + b  # "rq"


def _attempt(errors, what, fn):
    t0 = time.monotonic()
    try:
        fn()
    except ShmqError:
        pass
    except BaseException as exc:  # noqa: BLE001 - reported by the parent
        errors.append(f"{what}: {exc!r}")
    if time.monotonic() - t0 > 3.0:
        errors.append(f"{what}: took {time.monotonic() - t0:.1f} s (timeouts are 0.2 s)")


def _corrupt_main(name, where, value, conn):
    errors = []
    pool = SlotPool.create(4096, 4, name=name)
    other = None
    try:
        # Traffic first: a member entry, a round trip, one slot in flight
        # with a return queued, one held by this process.
        refs = send(pool, [b"a" * 64, b"b" * 64, b"c" * 64])
        view = pool.acquire(*refs[0])
        view.release()
        pool.release(*refs[0])
        held = pool.acquire(*refs[2])
        pool.segment.words[_word_of(pool, where)] = value

        def round_trip():
            for i, g in send_fast(pool):
                pool.acquire(i, g).release()
                pool.release(i, g)
            pool.collect()

        def send_fast(p):
            idx = p.allocate(1, timeout=0.2)
            return list(zip(idx, p.mark_sent(idx, [8])))

        def attach_and_hold():
            nonlocal other
            other = SlotPool.attach(name)
            other.acquire(*refs[1]).release()
            other.release(*refs[1])
            other.statistics()

        steps = [
            ("allocate", lambda: pool.allocate(2, timeout=0.2)),
            ("round trip", round_trip),
            ("try_allocate", lambda: pool.try_allocate(1)),
            ("collect", pool.collect),
            ("reclaim", pool.reclaim),
            ("statistics", pool.statistics),
            ("slot_info", lambda: [pool.slot_info(i) for i in range(pool.slot_count)]),
            ("repr", lambda: repr(pool)),
            ("attach", attach_and_hold),
            ("release held", lambda: (held.release(), pool.release(*refs[2]))),
            ("round trip again", round_trip),
        ]
        for what, fn in steps:
            _attempt(errors, what, fn)
    finally:
        for p in (other, pool):
            if p is not None:
                _attempt(errors, "close", p.close)
        _attempt(errors, "unlink", pool.unlink)
    conn.send(errors)


def test_corrupt_pool_words_raise_or_work_never_hang():
    ctx = __import__("multiprocessing").get_context("fork")
    failures = []
    running = []

    def reap(entry, hard):
        proc, conn, name, label = entry
        got = conn.recv() if conn.poll(0 if not hard else CASE_SECONDS) else None
        if got is None:
            proc.kill()
            failures.append(f"{label}: no answer within {CASE_SECONDS:.0f} s (hang)")
        elif got:
            failures.append(f"{label}: {got}")
        proc.join(10)
        if got is not None and proc.exitcode != 0:
            failures.append(f"{label}: exit code {proc.exitcode}")
        for n in [name] + [name + s for s in P.SEM_SUFFIXES]:  # a killed case leaves its parts
            P.shm_unlink(n) if "-" not in n[len(name):] else P.sem_unlink(n)

    cases = [(where, value) for where in CORRUPT_CASES for value in HOSTILE]
    for where, value in cases:
        name = unique_name("bad")
        here, there = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=_corrupt_main, args=(name, where, value, there))
        proc.start()
        there.close()
        running.append((proc, here, name, f"{where} = {value}"))
        if len(running) >= 3:
            reap(running.pop(0), hard=True)
    while running:
        reap(running.pop(0), hard=True)
    assert not failures, f"{len(failures)} of {len(cases)} cases failed:\n" + "\n".join(failures[:40])


def test_entries_of_dead_holders_are_reused_while_their_slot_stays_in_flight():
    # A holder that gave back its holds and died leaves nothing to keep: its
    # entry is reused though the slot it held is still in flight.  One that
    # died holding keeps its entry until the slot comes back.
    import multiprocessing as mp

    fork = mp.get_context("fork")
    pool = SlotPool.create(64, 2, max_members=2)

    def child(target, ref):
        proc = fork.Process(target=target, args=(pool.name, ref))
        proc.start()
        join_all([proc])
        return proc.exitcode

    try:
        (ref,) = send(pool, [b"k"])
        for _ in range(6):
            assert child(_use_and_vanish, ref) == 0
        assert pool.slot_info(ref[0]).state == "sent"
        assert child(_attach_hold_die, ref) == 0
        assert child(_use_and_vanish, ref) != 0  # ShmqError: the dead holder's entry is kept
        assert pool.slot_info(ref[0]).state == "sent"
        assert pool.reclaim() == 1  # its hold no longer counts: the slot comes back...
        (ref,) = send(pool, [b"l"])
        assert child(_use_and_vanish, ref) == 0  # ...and with it the entry
        assert pool.collect() == 1
    finally:
        pool.close()
        pool.unlink()
