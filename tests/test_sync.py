"""RobustLock and Doorbell across real processes, including holders killed
with SIGKILL at the awkward moments."""
from __future__ import annotations

import multiprocessing as mp
import os
import signal
import subprocess
import sys
import threading
import time

import psutil
import pytest

from shmq import _layout as L
from shmq import _platform as P
from shmq._segment import Segment
from shmq._sync import SLICE_SECONDS, STALE_SECONDS, Doorbell, RobustLock

from _core_helpers import is_zombie, read_line, wait_for
from conftest import join_all

CTX = mp.get_context("fork")
W_LOCK = L.W_PRODUCER_LOCK
W_COUNTER = L.DATA_OFFSET // 8  # first word of the data area
W_INSIDE = W_COUNTER + 8  # pid of whoever is inside the critical section
W_FLAG = L.W_CONSUMER_WAITING


@pytest.fixture
def lockseg():
    """A published segment plus the semaphores a lock and a doorbell need
    (named with suffixes that Segment.unlink removes)."""
    seg = Segment.create(L.KIND_RING, L.DATA_OFFSET + 4096)
    sem = P.sem_create(seg.name + "-pl", 1, 1)
    bell = P.sem_create(seg.name + "-ne", 0)
    seg.publish()
    yield seg
    del sem, bell
    seg.close()
    seg.unlink()


class Opened:
    """What a process needs to use the lock and the doorbell of ``name``."""

    def __init__(self, name, stale_after=STALE_SECONDS):
        self.seg = Segment.attach(name)
        self.sem = P.sem_open(name + "-pl", 1)
        self.bell_sem = P.sem_open(name + "-ne")
        self.lock = RobustLock(self.sem, self.seg, W_LOCK, stale_after)
        self.bell = Doorbell(self.bell_sem, self.seg.words, W_FLAG)
        self.words = self.seg.words

    def close(self):
        self.sem = self.bell_sem = self.lock = self.bell = None
        self.seg.close()


def critical_section(words, spins=50):
    """Increment the counter non-atomically and check nobody else is inside."""
    me = os.getpid()
    assert words[W_INSIDE] == 0, f"{words[W_INSIDE]} is inside the lock together with {me}"
    words[W_INSIDE] = me
    v = words[W_COUNTER]
    for _ in range(spins):
        pass
    words[W_COUNTER] = v + 1
    assert words[W_INSIDE] == me
    words[W_INSIDE] = 0


def psutil_sleeping(pid):
    try:
        return psutil.Process(pid).status() in (psutil.STATUS_SLEEPING, psutil.STATUS_DISK_SLEEP)
    except psutil.NoSuchProcess:
        return False


# -- mutual exclusion --------------------------------------------------------------
def _hammer(name, rounds, errors):
    o = Opened(name)
    try:
        for _ in range(rounds):
            assert o.lock.acquire(timeout=30)
            try:
                critical_section(o.words)
            finally:
                o.lock.release()
    except BaseException as exc:
        errors.put(repr(exc))
        raise
    finally:
        o.close()


def test_mutual_exclusion_across_processes(lockseg):
    errors = CTX.Queue()
    procs = [CTX.Process(target=_hammer, args=(lockseg.name, 3000, errors)) for _ in range(3)]
    for p in procs:
        p.start()
    me = Opened(lockseg.name)
    try:
        for _ in range(1000):
            assert me.lock.acquire(timeout=30)
            try:
                critical_section(me.words)
            finally:
                me.lock.release()
        join_all(procs)
    finally:
        me.close()
    failed = [errors.get(timeout=5) for p in procs if p.exitcode != 0]
    assert not failed, failed
    assert lockseg.words[W_COUNTER] == 3 * 3000 + 1000
    assert lockseg.words[W_LOCK] == 0
    assert P.sem_value(P.sem_open(lockseg.name + "-pl")) == 1


def test_acquire_timeout_and_holder(lockseg):
    o = Opened(lockseg.name)
    try:
        assert o.lock.holder() == 0
        assert o.lock.acquire()
        assert o.lock.holder() == os.getpid()
        gen = o.words[W_LOCK + 1]
        # held by a live process (this one): a timed acquire gives up, no recovery
        t0 = time.monotonic()
        assert o.lock.acquire(timeout=0.2) is False
        elapsed = time.monotonic() - t0
        assert 0.19 <= elapsed < 5
        assert o.words[W_LOCK + 1] == gen and o.lock.holder() == os.getpid()
        assert o.lock.acquire(timeout=0) is False
        o.lock.release()
        assert o.lock.holder() == 0 and P.sem_value(o.sem) == 1
        assert o.lock.acquire(timeout=0)
        assert o.words[W_LOCK + 1] == gen + 1  # the generation moves on every acquire
        o.lock.release()
    finally:
        o.close()


# -- holders that die ------------------------------------------------------------------
def _hold_until_killed(name, ready, raw):
    o = Opened(name)
    if raw:
        # killed "between the semaphore and the owner word": the owner word stays 0
        o.sem.acquire()
    else:
        o.lock.acquire()
    ready.send(os.getpid())
    ready.poll(120)  # never answered: we get killed here


def _start_holder(name, raw):
    here, there = CTX.Pipe()
    p = CTX.Process(target=_hold_until_killed, args=(name, there, raw))
    p.start()
    assert here.poll(30), "holder did not start"
    assert here.recv() == p.pid
    return p, here


def test_releasing_a_free_lock_raises_and_never_admits_two_holders(lockseg):
    o = Opened(lockseg.name)
    try:
        assert o.lock.acquire()
        o.lock.release()
        with pytest.raises(ValueError):
            o.lock.release()
        assert P.sem_value(o.sem) == 1
        assert o.lock.acquire(timeout=0)
        assert o.lock.acquire(timeout=0) is False  # still a mutex
        o.lock.release()
    finally:
        o.close()


@pytest.mark.parametrize("reap", [False, True], ids=["zombie", "reaped"])
def test_killed_holder_is_recovered_quickly(lockseg, reap):
    p, conn = _start_holder(lockseg.name, raw=False)
    o = Opened(lockseg.name)
    try:
        assert o.lock.holder() == p.pid
        assert o.lock.acquire(timeout=0.1) is False  # alive: not stolen
        p.kill()
        if reap:
            join_all([p])
        else:
            wait_for(lambda: is_zombie(p.pid), what="a zombie holder")
        t0 = time.monotonic()
        assert o.lock.acquire(timeout=10)
        elapsed = time.monotonic() - t0
        assert elapsed < 2.0, f"recovered after {elapsed:.2f}s"
        assert o.lock.holder() == os.getpid()
        o.lock.release()
        assert P.sem_value(o.sem) == 1
    finally:
        o.close()
        conn.close()
        join_all([p])


def test_holder_killed_before_writing_its_pid_is_recovered(lockseg):
    p, conn = _start_holder(lockseg.name, raw=True)
    o = Opened(lockseg.name, stale_after=STALE_SECONDS)
    try:
        assert o.lock.holder() == 0 and P.sem_value(o.sem) == 0
        p.kill()
        join_all([p])
        t0 = time.monotonic()
        assert o.lock.acquire(timeout=10)
        elapsed = time.monotonic() - t0
        # recovered only after the owner word stayed empty for stale_after
        assert STALE_SECONDS - SLICE_SECONDS <= elapsed < STALE_SECONDS + 2.0, elapsed
        o.lock.release()
        assert P.sem_value(o.sem) == 1
    finally:
        o.close()
        conn.close()


def test_a_lock_with_a_progress_word_watches_it_instead_of_a_generation(lockseg):
    # A ring's locks: the side's message counter shows progress, and acquire
    # leaves the generation alone.
    o = Opened(lockseg.name)
    lock = RobustLock(o.sem, o.seg, W_LOCK, stale_after=0.3, w_progress=W_COUNTER)
    try:
        gen = o.words[W_LOCK + 1]
        assert lock.acquire(timeout=0)
        assert lock.holder() == os.getpid() and o.words[W_LOCK + 1] == gen
        lock.release()
        # taken with no owner written (a holder killed before its pid store),
        # but the counter keeps moving for a while: not stale until it stops
        assert o.sem.acquire(False)
        moving_until = time.monotonic() + 1.0
        stop = threading.Event()

        def count():
            while not stop.is_set() and time.monotonic() < moving_until:
                o.words[W_COUNTER] += 1
                stop.wait(0.01)

        counter = threading.Thread(target=count)
        counter.start()
        try:
            assert lock.acquire(timeout=10)  # recovered
            assert time.monotonic() >= moving_until
        finally:
            stop.set()
            counter.join(10)
        assert o.words[W_LOCK + 1] == gen + 1  # recoveries still bump the generation
        lock.release()
        assert P.sem_value(o.sem) == 1
    finally:
        o.close()


def _wait_and_count(name, results):
    o = Opened(name)
    try:
        t0 = time.monotonic()
        ok = o.lock.acquire(timeout=20)
        if ok:
            try:
                critical_section(o.words, spins=2000)
            finally:
                o.lock.release()
        results.send((ok, time.monotonic() - t0))
    finally:
        o.close()


@pytest.mark.parametrize("raw", [False, True], ids=["dead-owner", "empty-owner"])
def test_recovery_happens_exactly_once(lockseg, raw):
    holder, conn = _start_holder(lockseg.name, raw=raw)
    waiters, pipes = [], []
    for _ in range(4):
        here, there = CTX.Pipe(duplex=False)
        w = CTX.Process(target=_wait_and_count, args=(lockseg.name, there))
        w.start()
        waiters.append(w)
        pipes.append(here)
    try:
        # let every waiter reach the slow path before the holder dies
        wait_for(lambda: all(psutil_sleeping(w.pid) for w in waiters), what="waiters to block")
        holder.kill()
        results = []
        for here in pipes:
            assert here.poll(30), "a waiter never got the lock"
            results.append(here.recv())
        join_all(waiters + [holder])
    finally:
        conn.close()
        join_all(waiters + [holder])
    assert all(ok for ok, _ in results), results
    assert max(t for _, t in results) < 20
    assert [w.exitcode for w in waiters] == [0] * 4
    assert lockseg.words[W_COUNTER] == 4
    # one post, not one per waiter that noticed the dead holder
    assert P.sem_value(P.sem_open(lockseg.name + "-pl")) == 1
    assert lockseg.words[W_LOCK] == 0


def test_released_lock_is_not_recovered_twice_by_a_slow_waiter(lockseg):
    # A waiter that saw the dead owner must not post again after somebody else
    # recovered and re-took the lock: its snapshot no longer matches.
    o = Opened(lockseg.name)
    try:
        p, conn = _start_holder(lockseg.name, raw=False)
        snap = (o.words[W_LOCK], o.words[W_LOCK + 1])
        p.kill()
        join_all([p])
        conn.close()
        assert o.lock.acquire(timeout=10)  # recovers (snapshot -> new generation) and takes it
        o.lock._recover(snap)  # the slow waiter's stale snapshot: a no-op
        assert P.sem_value(o.sem) == 0 and o.lock.holder() == os.getpid()
        o.lock.release()
        assert P.sem_value(o.sem) == 1
    finally:
        o.close()


# -- Ctrl-C while waiting for the lock ------------------------------------------------------
SIGNALLED_WAITER = """
import signal, sys, time
from shmq._segment import Segment
from shmq import _platform as P, _layout as L
from shmq._sync import Doorbell, RobustLock

def on_alarm(signum, frame):
    raise TimeoutError("alarm")

signal.signal(signal.SIGALRM, on_alarm)
seg = Segment.attach(sys.argv[1])
lock = RobustLock(P.sem_open(sys.argv[1] + "-pl"), seg, L.W_PRODUCER_LOCK)
bell = Doorbell(P.sem_open(sys.argv[1] + "-ne"), seg.words, L.W_CONSUMER_WAITING)
print("waiting", flush=True)
try:
    if sys.argv[2] == "lock":
        lock.acquire()
    else:
        bell.sleep(60)
except (KeyboardInterrupt, TimeoutError) as exc:
    print("interrupted", type(exc).__name__, flush=True)
    seg.close()
    sys.exit(0)
print("returned?!", flush=True)
sys.exit(3)
"""


@pytest.mark.parametrize("sig", ["SIGINT", "SIGALRM"])
@pytest.mark.parametrize("what", ["lock", "doorbell"])
def test_signals_interrupt_a_wait(lockseg, what, sig):
    # A signal handler's exception must end the wait (posix_ipc, which shmq
    # used before, turned all but KeyboardInterrupt into its SignalError).
    o = Opened(lockseg.name)
    assert o.lock.acquire()
    try:
        with subprocess.Popen(
            [sys.executable, "-c", SIGNALLED_WAITER, lockseg.name, what], stdout=subprocess.PIPE, bufsize=0
        ) as proc:
            try:
                assert read_line(proc.stdout) == b"waiting\n"
                wait_for(lambda: psutil_sleeping(proc.pid), what="the waiter to block")
                t0 = time.monotonic()
                proc.send_signal(getattr(signal, sig))
                expected = "KeyboardInterrupt" if sig == "SIGINT" else "TimeoutError"
                assert read_line(proc.stdout, timeout=10) == f"interrupted {expected}\n".encode()
                assert time.monotonic() - t0 < 5
                assert proc.wait(10) == 0
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait(10)
    finally:
        o.lock.release()
        o.close()


# -- doorbell ------------------------------------------------------------------------
def _sleeper(name, conn, seconds):
    o = Opened(name)
    try:
        o.bell.announce()
        conn.send("announced")
        t0 = time.monotonic()
        rung = o.bell.sleep(seconds)
        conn.send((rung, time.monotonic() - t0))
    finally:
        o.close()


def test_doorbell_wakes_a_sleeper_in_another_process(lockseg):
    here, there = CTX.Pipe()
    p = CTX.Process(target=_sleeper, args=(lockseg.name, there, 30.0))
    p.start()
    try:
        assert here.poll(30) and here.recv() == "announced"
        assert lockseg.words[W_FLAG] == 1
        wait_for(lambda: psutil_sleeping(p.pid), what="the sleeper to sleep")
        o = Opened(lockseg.name)
        try:
            o.bell.ring()
            assert o.words[W_FLAG] == 0  # ringing lowers the flag
        finally:
            o.close()
        assert here.poll(30)
        rung, elapsed = here.recv()
        assert rung is True and elapsed < 10
        join_all([p])
        assert p.exitcode == 0
    finally:
        join_all([p])


def test_doorbell_sleep_times_out_without_a_ring(lockseg):
    o = Opened(lockseg.name)
    try:
        o.bell.announce()
        t0 = time.monotonic()
        assert o.bell.sleep(0.05) is False
        assert 0.045 <= time.monotonic() - t0 < 5
        assert o.words[W_FLAG] == 1
        # a ring with nobody asleep is remembered: the next sleep returns at once
        o.bell.ring()
        t0 = time.monotonic()
        assert o.bell.sleep(10) is True
        assert time.monotonic() - t0 < 5
    finally:
        o.close()


@pytest.mark.parametrize("how", ["ring twice", "ring_all"])
def test_doorbell_counts_its_sleepers_so_each_ring_wakes_one(lockseg, how):
    """Two sleepers on one bell: the flag word counts them, and two rings in
    a row wake both (a flag the first ring cleared would leave the second
    sleeper to its slice); ring_all wakes every one at once."""
    pairs = [CTX.Pipe() for _ in range(2)]
    procs = [CTX.Process(target=_sleeper, args=(lockseg.name, there, 30.0)) for _, there in pairs]
    for p in procs:
        p.start()
    try:
        for here, _ in pairs:
            assert here.poll(30) and here.recv() == "announced"
        assert lockseg.words[W_FLAG] == 2
        o = Opened(lockseg.name)
        try:
            if how == "ring_all":
                o.bell.ring_all()
                assert o.words[W_FLAG] == 0
            else:
                for left in (1, 0):
                    assert o.words[W_FLAG]  # what a poster checks before ringing
                    o.bell.ring()
                    assert o.words[W_FLAG] == left
        finally:
            o.close()
        for here, _ in pairs:
            assert here.poll(30)
            rung, elapsed = here.recv()
            assert rung is True and elapsed < 10
        join_all(procs)
        assert [p.exitcode for p in procs] == [0, 0]
    finally:
        join_all(procs)


def test_wait_until_withdraws_and_validates_deadlines(lockseg):
    from shmq._sync import deadline_for, deadline_for_mp, remaining, wait_until

    o = Opened(lockseg.name)
    try:
        assert wait_until(lambda: False, o.bell, time.monotonic() + 0.05) is False
        assert o.words[W_FLAG] == 0  # a waiter that timed out took its count back
        assert wait_until(lambda: True, o.bell, None) is True
        for bad in (float("nan"), -1, -0.5):
            with pytest.raises(ValueError):
                deadline_for(bad)
        with pytest.raises(ValueError):
            deadline_for_mp(float("nan"))
        assert deadline_for_mp(-5) <= time.monotonic()  # multiprocessing.Queue: negative means 0
        assert deadline_for(None) is None and remaining(None) is None
        assert remaining(time.monotonic() - 1) == 0.0
        with pytest.raises(TypeError):
            deadline_for("1")
    finally:
        o.close()
